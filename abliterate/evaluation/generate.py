"""Behavioural measurements of a chat model: greedy answers, refusal rate, first-token KL, fluency.

Owns batched greedy generation through the model's chat template: continuous batching over the length-sorted
prompts where the KV cache allows it (`continuous_rows`: a finished row's slot goes to the next prompt), else
left-padded, length-sorted batches (`model.forward.make_batches`) whose finished rows leave as they end
(`greedy_rows`); the refusal
rate of those answers under a `Judge`, the per-prompt KL divergence of the first answer token between two
models, and a cheap fluency check (non-empty, not a repetitive loop). Shared by the model organism,
`abliterate demo` and the evaluation of edited models.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from abliterate import progress
from abliterate.direction.selection import collect_logits, kl_divergence
from abliterate.evaluation.judge import Judge
from abliterate.model.chat import encode, render
from abliterate.model.forward import make_batches

log = logging.getLogger(__name__)

MIN_DISTINCT_RATIO = 0.3
"""An answer whose distinct-token share is below this is a repetitive loop."""
MIN_FLUENCY_TOKENS = 8
"""Answers shorter than this many tokens are not checked for loops (short answers are fine)."""
COMPACT_SHARE = 4
"""Finished rows leave the batch once they are at least 1/COMPACT_SHARE of it: dropping them one by one makes
every step a new matrix shape, which on the CPU cost more than the rows saved (docs/performance.md)."""


@dataclass
class Generation:
    """Greedy answers: token ids (cut at the first end-of-sequence token), texts, and which ones ended."""

    ids: list[list[int]]
    texts: list[str]
    finished: list[bool]

    def split(self, sizes: Sequence[int]) -> list[Generation]:
        """Consecutive parts of the given sizes (the answers to prompt lists that were generated as one)."""
        parts, start = [], 0
        for size in sizes:
            end = start + size
            parts.append(Generation(self.ids[start:end], self.texts[start:end], self.finished[start:end]))
            start = end
        return parts


@dataclass
class RefusalResult:
    """Refusal rate of a model on some prompts, with each verdict and answer."""

    rate: float
    verdicts: list[bool]
    texts: list[str]

    @property
    def count(self) -> int:
        return sum(self.verdicts)


def token_ids(*values: object) -> list[int]:
    """The ids in `values` (each an id, a list of ids, or None), unique and sorted."""
    ids: set[int] = set()
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return sorted(ids)


def stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS and the model's generation-config EOS ids."""
    return token_ids(tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None))


def _cut(row: list[int], stops: set[int]) -> tuple[list[int], bool]:
    for i, token in enumerate(row):
        if token in stops:
            return row[:i], True
    return row, False


def can_drop_rows(cache: object) -> bool:
    """Whether every layer of a KV cache can drop batch rows (linear-attention and Mamba layers cannot)."""
    if not hasattr(cache, "batch_select_indices"):
        return False
    layers = getattr(cache, "layers", None)
    return layers is None or all(hasattr(layer, "batch_select_indices") for layer in layers)


def greedy_rows(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, stops: list[int]
) -> list[list[int]] | None:
    """Greedy continuation of a left-padded batch that drops finished rows as it goes.

    Once a quarter of the rows have ended, they leave the batch and the KV cache
    (`Cache.batch_select_indices`), where `model.generate` would keep computing them until the whole batch
    ends, which on refusal prompts (short refusals beside long answers) is much of the work. Positions follow the
    attention mask, as in `generate`, so the tokens are the same (tests compare the two on every family).
    Returns None for a model whose cache cannot drop rows (the caller then uses `generate`).
    """
    device = input_ids.device
    rows: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    alive = torch.arange(input_ids.shape[0])
    stop_tensor = torch.tensor(stops, device=device)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache, last = out.past_key_values, positions[:, -1]
    if not can_drop_rows(cache):
        return None
    ended = torch.zeros(len(alive), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tokens = out.logits[:, -1].argmax(dim=-1).to(device)
        for row, token, done in zip(alive.tolist(), tokens.tolist(), ended.tolist(), strict=True):
            if not done:
                rows[row].append(token)
        ended |= torch.isin(tokens, stop_tensor)
        n_ended = int(ended.sum())
        if step == max_new_tokens - 1 or n_ended == len(alive):
            break
        if n_ended * COMPACT_SHARE >= len(alive):
            keep = (~ended).nonzero().flatten()
            cache.batch_select_indices(keep)
            alive, tokens, attention_mask, last = alive[keep.cpu()], tokens[keep], attention_mask[keep], last[keep]
            ended = ended[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(alive), 1)], dim=1)
        last = last + 1
        out = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=last[:, None],
                    past_key_values=cache, use_cache=True)
    return rows


# --- continuous batching: a finished row's slot goes to the next prompt -------------------------------------


def can_merge_rows(cache: object) -> bool:
    """Whether new rows can join a KV cache: every layer a plain `DynamicLayer` (keys [batch, heads, seq, dim]).

    Sliding-window, linear-attention, Mamba and quantized caches cannot; `generate` then batches as before.
    """
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)  # type: ignore[union-attr]


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with `width` zeros prepended along `dim`."""
    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@dataclass
class _Slots:
    """The rows being decoded together: their prompts, answers so far, mask, positions, KV cache and logits."""

    prompt: list[int]  # index of each row's prompt
    made: list[int]  # tokens produced per row
    ended: list[bool]
    mask: torch.Tensor  # [rows, cache length]; left padding 0
    last: torch.Tensor  # position id of each row's last token
    cache: Any
    logits: torch.Tensor  # [rows, vocab] of each row's next token

    def __len__(self) -> int:
        return len(self.prompt)

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (and its KV cache)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.prompt = [self.prompt[i] for i in rows]
        self.made = [self.made[i] for i in rows]
        self.ended = [self.ended[i] for i in rows]
        self.mask, self.last, self.logits = self.mask[index], self.last[index], self.logits[index]
        self.trim()

    def trim(self) -> None:
        """Drop the leading cache columns that every row masks (padding of rows that left): without this the
        cache of a long queue only grows, and so does every step's attention."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        if start == 0:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        self.mask = self.mask[:, start:]

    def join(self, new: _Slots) -> None:
        """Add `new`'s rows: both caches left-padded (masked) to the longer one, then stacked."""
        width = max(self.mask.shape[1], new.mask.shape[1])
        pad_old, pad_new = width - self.mask.shape[1], width - new.mask.shape[1]
        for old, added in zip(self.cache.layers, new.cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, pad_old, -2), _left_pad(added.keys, pad_new, -2)])
            old.values = torch.cat([_left_pad(old.values, pad_old, -2), _left_pad(added.values, pad_new, -2)])
        self.mask = torch.cat([_left_pad(self.mask, pad_old, 1), _left_pad(new.mask, pad_new, 1)])
        self.last = torch.cat([self.last, new.last])
        self.logits = torch.cat([self.logits, new.logits])
        self.prompt, self.made, self.ended = self.prompt + new.prompt, self.made + new.made, self.ended + new.ended


def _prefill(model: PreTrainedModel, prompts: list[list[int]], chosen: list[int], pad: int) -> _Slots:
    """Run the chosen prompts (left-padded) once: their KV cache and first-token logits."""
    device = model.device
    width = max(len(prompts[i]) for i in chosen)
    ids = torch.full((len(chosen), width), pad, dtype=torch.long)
    mask = torch.zeros((len(chosen), width), dtype=torch.long)
    for row, index in enumerate(chosen):
        ids[row, width - len(prompts[index]):] = torch.tensor(prompts[index])
        mask[row, width - len(prompts[index]):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return _Slots(list(chosen), [0] * len(chosen), [False] * len(chosen), mask, positions[:, -1],
                  out.past_key_values, out.logits[:, -1])


def continuous_rows(
    model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, stops: list[int], batch_size: int, pad: int
) -> Iterator[tuple[int, list[int]]] | None:
    """Greedy answers with continuous batching: (prompt index, answer ids) as each answer ends.

    Up to `batch_size` rows decode together; once a quarter of the slots are free (`COMPACT_SHARE`), finished rows
    leave the batch and the next prompts of the queue (in the given order) are prefilled and join it, their KV
    cache and the batch's left-padded to the same length, so no slot waits for the batch's longest answer. Returns
    None when the model's KV cache cannot take new rows (`can_merge_rows`): the caller batches as before.
    """
    queue = deque(range(len(prompts)))
    first = _prefill(model, prompts, [queue.popleft() for _ in range(min(batch_size, len(queue)))], pad)
    if not can_merge_rows(first.cache):
        return None
    return _decode(model, prompts, queue, first, max_new_tokens, set(stops), batch_size, pad)


def _decode(
    model: PreTrainedModel, prompts: list[list[int]], queue: deque[int], slots: _Slots, max_new_tokens: int,
    stops: set[int], batch_size: int, pad: int,
) -> Iterator[tuple[int, list[int]]]:
    """Emit each row's next token, retire finished rows, refill free slots from `queue`, step; until all ended."""
    answers: dict[int, list[int]] = {index: [] for index in slots.prompt}
    while True:
        tokens = slots.logits.argmax(dim=-1)
        for row, token in enumerate(tokens.tolist()):
            if not slots.ended[row]:
                answers[slots.prompt[row]].append(token)
                slots.made[row] += 1
                if token in stops or slots.made[row] >= max_new_tokens:
                    slots.ended[row] = True
                    yield slots.prompt[row], answers.pop(slots.prompt[row])
        n_ended = sum(slots.ended)
        if n_ended == len(slots) and not queue:
            return
        refill = bool(queue) and (batch_size - len(slots) + n_ended) * COMPACT_SHARE >= batch_size
        if not refill and n_ended * COMPACT_SHARE < len(slots):
            slots.logits = _step(model, slots, tokens)  # too few finished to be worth a new batch shape
            continue
        alive = [row for row, ended in enumerate(slots.ended) if not ended]
        slots.keep(alive)
        tokens = tokens[torch.tensor(alive, dtype=torch.long, device=tokens.device)]
        if alive:
            slots.logits = _step(model, slots, tokens)
        if refill:
            new = _prefill(model, prompts, [queue.popleft() for _ in range(min(batch_size - len(alive), len(queue)))],
                           pad)
            answers.update({index: [] for index in new.prompt})
            if alive:
                slots.join(new)
            else:
                slots = new


def _step(model: PreTrainedModel, slots: _Slots, tokens: torch.Tensor) -> torch.Tensor:
    """One decoding step of every row: feed each row's last token, return the next logits."""
    slots.mask = torch.cat([slots.mask, slots.mask.new_ones(len(slots), 1)], dim=1)
    slots.last = slots.last + 1
    out = model(input_ids=tokens[:, None], attention_mask=slots.mask, position_ids=slots.last[:, None],
                past_key_values=slots.cache, use_cache=True)
    slots.cache = out.past_key_values
    logits: torch.Tensor = out.logits[:, -1]
    return logits


def _generate_rows(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor], config: GenerationConfig, stops: list[int]
) -> list[list[int]]:
    rows = greedy_rows(model, inputs["input_ids"], inputs["attention_mask"], int(config.max_new_tokens), stops)
    if rows is not None:
        return rows
    generate_fn: Any = model.generate  # typed as a Tensor attribute in transformers' stubs
    out = generate_fn(**inputs, generation_config=config)
    new: list[list[int]] = out[:, inputs["input_ids"].shape[1]:].tolist()
    return new


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    desc: str | None = None,
) -> Generation:
    """Greedy answers to each instruction (one user turn through the chat template), in input order."""
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad)
    ids: list[list[int]] = [[] for _ in instructions]
    finished = [False] * len(instructions)
    with torch.inference_mode():
        if instructions and not _continuous(model, tokenizer, instructions, config, stops, batch_size, desc, ids,
                                            finished):
            batches = make_batches(tokenizer, list(instructions), batch_size)
            items = progress.track(batches, desc, len(batches), "batch") if desc else iter(batches)
            for indices, batch in items:
                inputs = {k: v.to(model.device) for k, v in batch.items()}
                for index, row in zip(indices, _generate_rows(model, inputs, config, stops), strict=True):
                    ids[index], finished[index] = _cut(row, set(stops))
    texts = [str(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return Generation(ids, texts, finished)


def _continuous(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, instructions: Sequence[str], config: GenerationConfig,
    stops: list[int], batch_size: int, desc: str | None, ids: list[list[int]], finished: list[bool],
) -> bool:
    """Fill `ids`/`finished` by continuous batching over the length-sorted prompts; False if the cache cannot."""
    encoded = encode(tokenizer, [render(tokenizer, text) for text in instructions])
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    rows = continuous_rows(model, [encoded[i] for i in order], int(config.max_new_tokens), stops, batch_size,
                           int(config.pad_token_id))
    if rows is None:
        return False
    items = progress.track(rows, desc, len(order), "answer") if desc else rows
    for position, row in items:
        ids[order[position]], finished[order[position]] = _cut(row, set(stops))
    return True


def refusal_rate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    lang: str,
    judge: Judge,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str | None = None,
) -> RefusalResult:
    """Share of greedy answers that `judge` calls refusals (all prompts in language `lang`)."""
    texts = generate(model, tokenizer, instructions, max_new_tokens, batch_size, desc).texts
    verdicts = judge.judge(list(instructions), texts, [lang] * len(texts))
    rate = sum(verdicts) / len(verdicts) if verdicts else 0.0
    return RefusalResult(rate, verdicts, texts)


def first_token_logits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, instructions: Sequence[str], batch_size: int
) -> torch.Tensor:
    """Logits of the first answer token for each instruction ([n, vocab] float32, input order)."""
    return collect_logits(model, make_batches(tokenizer, list(instructions), batch_size))


def first_token_kl(
    base_model: PreTrainedModel,
    edited_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    batch_size: int = 16,
) -> torch.Tensor:
    """Per-prompt KL(base || edited) of the first answer token (float64 [n])."""
    base = first_token_logits(base_model, tokenizer, instructions, batch_size)
    edited = first_token_logits(edited_model, tokenizer, instructions, batch_size)
    return kl_divergence(base, edited)


def distinct_ratio(ids: Sequence[int]) -> float:
    """Distinct tokens / tokens (1.0 for an empty answer): low values mean the answer loops."""
    return len(set(ids)) / len(ids) if ids else 1.0


def is_fluent(ids: Sequence[int], min_ratio: float = MIN_DISTINCT_RATIO) -> bool:
    """Not empty, and not a repetitive loop (distinct-token ratio at least `min_ratio` once long enough)."""
    if not ids:
        return False
    return len(ids) < MIN_FLUENCY_TOKENS or distinct_ratio(ids) >= min_ratio
