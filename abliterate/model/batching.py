"""`--batch-size auto`: one batch size per run, chosen from forward passes of the loaded model on real prompts.

- On CUDA: the largest batch (1, 2, 4, ... up to `CUDA_MAX`, and the number of prompts) whose forward pass
  over the longest prompts fits in memory; a size that runs out of memory is caught
  (`torch.cuda.OutOfMemoryError`), the cache emptied, and the previous size kept.
- On the CPU: the fastest per prompt among 1, 2, 4, ... `CPU_MAX` (and the number of prompts), each timed on
  a window of length-sorted prompts around the median length, after a tiny warm-up; growing stops at the
  first size that is not at least `MIN_GAIN` faster per prompt than the best so far.

Forward passes here are the ones the direction search makes: last-position logits only, no cache, no grad.
The chosen size is a plain int; `fixed_batch_size` gets it back out of the settings wherever a number is needed.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from abliterate.errors import ModelError, UsageError
from abliterate.model.chat import encode, render

log = logging.getLogger(__name__)

BatchSize = int | Literal["auto"]
AUTO = "auto"
CUDA_MAX = 256  # largest batch tried on a GPU
CPU_MAX = 64  # largest batch tried on the CPU (throughput stops improving well before on small models)
MIN_GAIN = 0.05  # a larger CPU batch must be this much faster per prompt to be kept
TIMING_REPEATS = 2  # best of this many timed forward passes per CPU size


def fixed_batch_size(value: BatchSize) -> int:
    """The batch size as a number; `auto` must have been resolved (`direction.search.resolve_batch_size`) first."""
    if value == AUTO:
        raise UsageError(
            "--batch-size auto is not resolved for this command",
            hint="give a number, e.g. --batch-size 16 (auto works for edit, directions, crosslingual, optimize)",
        )
    return int(value)


def sizes_to_try(limit: int, n_prompts: int) -> list[int]:
    """Powers of two up to `limit`, capped at `n_prompts` (which is tried itself when it is smaller)."""
    cap = max(1, min(limit, n_prompts))
    sizes = []
    size = 1
    while size < cap:
        sizes.append(size)
        size *= 2
    return [*sizes, cap]


def largest_fitting(sizes: Sequence[int], fits: Callable[[int], bool]) -> int | None:
    """The last size of the increasing `sizes` for which `fits` holds, stopping at the first that fails."""
    best = None
    for size in sizes:
        if not fits(size):
            break
        best = size
    return best


def fastest(sizes: Sequence[int], seconds_per_prompt: Callable[[int], float], min_gain: float = MIN_GAIN) -> int:
    """The size with the lowest time per prompt, growing only while each step gains at least `min_gain`."""
    best, best_time = sizes[0], seconds_per_prompt(sizes[0])
    log.debug("batch size %d: %.2f ms per prompt", best, best_time * 1e3)
    for size in sizes[1:]:
        seconds = seconds_per_prompt(size)
        log.debug("batch size %d: %.2f ms per prompt", size, seconds * 1e3)
        if seconds > best_time * (1.0 - min_gain):
            break
        best, best_time = size, seconds
    return best


def _pad(tokenizer: PreTrainedTokenizerBase, ids: list[list[int]]) -> BatchEncoding:
    return tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")


def _forward(model: PreTrainedModel, batch: BatchEncoding) -> None:
    with torch.inference_mode():
        inputs = {k: v.to(model.device) for k, v in batch.items()}
        model(**inputs, use_cache=False, logits_to_keep=1)


def _fits_on_cuda(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, longest: list[list[int]]
) -> Callable[[int], bool]:
    """Whether a forward pass over the `size` longest prompts fits in GPU memory."""

    def fits(size: int) -> bool:
        try:
            _forward(model, _pad(tokenizer, longest[:size]))
            return True
        except torch.cuda.OutOfMemoryError:
            log.debug("batch size %d runs out of GPU memory", size)
            return False
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    return fits


def _per_prompt_on_cpu(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, by_length: list[list[int]]
) -> Callable[[int], float]:
    """Best-of-`TIMING_REPEATS` seconds per prompt of a batch of `size` prompts around the median length."""
    middle = len(by_length) // 2

    def seconds_per_prompt(size: int) -> float:
        start = max(0, min(middle - size // 2, len(by_length) - size))
        batch = _pad(tokenizer, by_length[start : start + size])
        times = []
        for _ in range(TIMING_REPEATS):
            began = time.perf_counter()
            _forward(model, batch)
            times.append(time.perf_counter() - began)
        return min(times) / size

    return seconds_per_prompt


def choose_batch_size(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, instructions: Sequence[str], n_prompts: int
) -> int:
    """The auto batch size for `model` (see the module docstring); at most `n_prompts`."""
    ids = encode(tokenizer, [render(tokenizer, text) for text in instructions])
    by_length = sorted(ids, key=len)
    cap = min(n_prompts, len(by_length))
    if model.device.type == "cuda":
        chosen = largest_fitting(sizes_to_try(CUDA_MAX, cap), _fits_on_cuda(model, tokenizer, by_length[::-1]))
        if chosen is None:
            raise ModelError(
                "not even one prompt fits in GPU memory for a forward pass",
                hint="use a smaller --dtype, more GPUs, or --device cpu",
            )
        return chosen
    _forward(model, _pad(tokenizer, by_length[:1]))  # warm-up: first-call allocations and lazy initialisation
    return fastest(sizes_to_try(CPU_MAX, cap), _per_prompt_on_cpu(model, tokenizer, by_length))
