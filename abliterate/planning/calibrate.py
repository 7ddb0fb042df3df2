"""A short calibration on this machine, which turns a plan's counts into seconds.

- Forward passes: the loaded model times one prompt and one batch of `batch_size` median-length prompts of the
  run (best of 2, after a warm-up); a pass of r rows then costs `fixed + r x per_row` (on a CPU the cost is per
  row, on a GPU mostly per pass: the two numbers say which).
- Generation: the evaluation's own greedy loop (`evaluation.generate.generate`) answers one prompt and the same
  batch with 16 tokens (after a warm-up); less their prefills, that gives a decode step's fixed and per-row
  cost. An answer batch costs a prefill plus one step per token of the length cap (an upper bound: answers
  that end early cost less).
- The streaming edit (no model needed): the real `edit.stream.write_checkpoint` with its hashes, timed on a
  Llama-shaped probe checkpoint of about 124 MB written in a temporary folder on the output's disk (removed
  after), and 256 MB written and synced there for the disk's speed. An edit then costs its output bytes at the
  probe's rate, or at the disk's speed once it writes more than the page cache takes (`edit_seconds`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BatchEncoding

from abliterate.direction.search import LoadedModel
from abliterate.direction.vector import Direction
from abliterate.edit.stream import write_checkpoint
from abliterate.evaluation.generate import generate
from abliterate.model.checkpoint import Checkpoint
from abliterate.model.forward import forward_last_logits, make_batches
from abliterate.planning.hardware import ram_available
from abliterate.storage.hashing import FileHasher, new_digest

PROBE_HIDDEN, PROBE_LAYERS, PROBE_VOCAB = 1024, 4, 8192  # the edit's probe checkpoint: about 124 MB of bf16
PROBE_HASH_BYTES = 64 * 2**20
DISK_PROBE_BYTES = 256 * 2**20  # written and synced at the output's disk
DECODE_STEPS = 16  # answer tokens of the timed generation (the evaluation's greedy loop)
STARTUP_SECONDS = 2.0  # a fresh `abliterate` process: Python, torch and transformers imports
HASH_THREADS = 4  # storage.hashing.FileHasher's pool (min(4, cores))


def best_of(func: Callable[[], object], repeats: int = 2) -> float:
    """The shortest wall time of `repeats` calls."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class ForwardTimings:
    """Seconds per forward pass (fixed + per row), per decode step of a full batch, and for loading."""

    load: float
    fixed: float
    per_row: float
    step: float  # a decode step's fixed cost
    step_row: float  # and its cost per row
    batch_size: int

    def forward(self, passes: int, rows: int) -> float:
        return passes * self.fixed + rows * self.per_row

    def generation(self, prompts: int, max_new_tokens: int, batches: int) -> float:
        """Greedy answers for `prompts` prompts in `batches` batches, every batch running to the length cap."""
        steps = max(0, max_new_tokens - 1)
        return self.forward(batches, prompts) + steps * (batches * self.step + prompts * self.step_row)

    def record(self) -> dict[str, float]:
        return {"load": self.load, "pass": self.fixed, "per row": self.per_row, "decode step": self.step,
                "decode step per row": self.step_row}


def median_window(texts: list[str], size: int) -> list[str]:
    """`size` texts around the median length (as `--batch-size auto` times them)."""
    ordered = sorted(texts, key=len)
    start = max(0, min(len(ordered) - size, len(ordered) // 2 - size // 2))
    return ordered[start : start + size]


def _generation_seconds(loaded: LoadedModel, texts: list[str]) -> tuple[float, int]:
    """Seconds of the evaluation's own greedy loop answering `texts` in one batch, and its steps."""
    start = time.perf_counter()
    answers = generate(loaded.model, loaded.tokenizer, texts, DECODE_STEPS, len(texts))
    return time.perf_counter() - start, max((len(ids) for ids in answers.ids), default=1)


def decode_step(loaded: LoadedModel, window: list[str], fixed: float, per_row: float) -> tuple[float, float]:
    """Seconds per greedy decode step, fixed and per row, from one prompt and the full window (prefills off).

    A first short call warms the loop up (its first call in a process is several times slower).
    """
    generate(loaded.model, loaded.tokenizer, window, 2, len(window))
    steps = {}
    for rows in (1, len(window)):
        seconds, count = _generation_seconds(loaded, window[:rows])
        steps[rows] = max(0.0, seconds - fixed - rows * per_row) / max(1, count - 1)
    row = max(0.0, (steps[len(window)] - steps[1]) / (len(window) - 1)) if len(window) > 1 else 0.0
    return max(0.0, steps[1] - row), row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate_forward(loaded: LoadedModel, texts: list[str], batch_size: int, load_seconds: float) -> ForwardTimings:
    """Time one prompt, one full batch and a few decode steps of the loaded model on the run's prompts."""
    window = median_window(texts, batch_size)
    [(_, one)] = make_batches(loaded.tokenizer, window[len(window) // 2 :][:1], 1)
    [(_, full)] = make_batches(loaded.tokenizer, window, len(window))

    def run(batch: BatchEncoding) -> Callable[[], object]:
        def forward() -> None:
            with torch.inference_mode():
                forward_last_logits(loaded.model, batch)
            _sync(loaded.model.device)
        return forward

    best_of(run(one), 1)  # warm-up
    t_one, t_full = best_of(run(one), 3), best_of(run(full), 3)
    rows = len(window)
    per_row = max(0.0, (t_full - t_one) / (rows - 1)) if rows > 1 else 0.0
    fixed = max(0.0, t_one - per_row)
    step, step_row = decode_step(loaded, window, fixed, per_row)
    return ForwardTimings(load_seconds, fixed, per_row, step, step_row, batch_size)


@dataclass(frozen=True)
class EditTimings:
    """The streaming edit on this machine: seconds per output byte, sha256's share of it, and the disk."""

    per_byte: float  # the whole edit of the probe checkpoint (edit, copies, writes, hashes) per output byte
    sha256: float  # seconds per byte of the source's sha256 (part of per_byte; saved when the hash is cached)
    disk_write: float  # seconds per byte written and synced to the output's disk
    dirty_limit: int  # bytes of written data the page cache takes before writes wait for the disk
    cores: int

    def record(self) -> dict[str, float]:
        gb = 1e9
        return {"edit per GB": self.per_byte * gb, "sha256 per GB": self.sha256 * gb,
                "disk write per GB": self.disk_write * gb}


def _probe_config() -> dict[str, object]:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": PROBE_HIDDEN,
            "intermediate_size": int(PROBE_HIDDEN * 2.75), "num_hidden_layers": PROBE_LAYERS,
            "num_attention_heads": PROBE_HIDDEN // 128, "num_key_value_heads": PROBE_HIDDEN // 512,
            "vocab_size": PROBE_VOCAB, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}


def write_probe(folder: Path) -> dict[str, object]:
    """A Llama-shaped bf16 checkpoint of about 124 MB (random weights) in `folder`; its config."""
    folder.mkdir(parents=True)
    hidden, inter, kv = PROBE_HIDDEN, int(PROBE_HIDDEN * 2.75), PROBE_HIDDEN // 4
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (PROBE_VOCAB, hidden),
                                          "lm_head.weight": (PROBE_VOCAB, hidden), "model.norm.weight": (hidden,)}
    for i in range(PROBE_LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    save_file({k: (torch.randn(v) * 0.02).to(torch.bfloat16) for k, v in shapes.items()},
              str(folder / "model.safetensors"))
    config = _probe_config()
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return config


@contextmanager
def quiet(name: str) -> Iterator[None]:
    """The logger `name` says only warnings while the block runs (the probe's edit is not the user's)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _timed_edit(folder: Path, output_hash: str) -> tuple[float, int]:
    """Seconds of the streaming edit of the probe in `folder` (hashes included), and the bytes it wrote."""
    config = write_probe(folder / "source")
    out = folder / "out"
    out.mkdir()
    checkpoint = Checkpoint.open(folder / "source")
    direction = Direction(torch.nn.functional.normalize(torch.randn(PROBE_HIDDEN), dim=0), layer=0, pos=-1)
    start = time.perf_counter()
    with quiet("abliterate.edit.stream"), FileHasher(algorithm=output_hash) as hasher:
        write_checkpoint(checkpoint, config, direction, out, 5 * 10**9, hasher)
        for path in checkpoint.files():
            hasher.source_digest(path)
        for path in out.glob("*.safetensors"):
            hasher.digest(path)
    return time.perf_counter() - start, sum(p.stat().st_size for p in out.glob("*.safetensors"))


def _disk_write_seconds(folder: Path) -> float:
    """Seconds per byte of writing and syncing DISK_PROBE_BYTES in `folder` (the output disk's own speed)."""
    block = os.urandom(16 * 2**20)
    path = folder / "disk-probe"
    start = time.perf_counter()
    with path.open("wb") as fh:
        for _ in range(DISK_PROBE_BYTES // len(block)):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    return (time.perf_counter() - start) / DISK_PROBE_BYTES


def dirty_limit() -> int:
    """Bytes the kernel lets a writer dirty before it waits for the disk (midway between the two vm ratios)."""
    try:
        ratios = [int(Path(f"/proc/sys/vm/{name}").read_text()) for name in ("dirty_background_ratio", "dirty_ratio")]
    except (OSError, ValueError):
        ratios = [10, 20]
    return int(ram_available() * sum(ratios) / 2 / 100)


def calibrate_edit(cores: int, where: Path, output_hash: str) -> EditTimings:
    """Time the real streaming edit (with its hashes) of a ~124 MB probe checkpoint, and the disk, at `where`.

    Everything is written in a temporary folder under `where` (the output's disk) and removed.
    """
    with tempfile.TemporaryDirectory(prefix=".abliterate-plan-", dir=where) as tmp:
        seconds, written = _timed_edit(Path(tmp), output_hash)
        disk = _disk_write_seconds(Path(tmp))
    raw = bytes(PROBE_HASH_BYTES)
    sha = best_of(lambda: new_digest("sha256").update(raw)) / len(raw)
    return EditTimings(seconds / written, sha, disk, dirty_limit(), cores)


@dataclass(frozen=True)
class EditBytes:
    """What a streaming edit reads, rewrites, copies and hashes."""

    edited: int
    copied: int
    source_hashed: int  # source files whose sha256 is neither cached nor in a hub blob's name
    output: int
    output_hash: str


def edit_seconds(timings: EditTimings, work: EditBytes) -> float:
    """Wall seconds of a streaming edit: the probe's rate per output byte (less the source hashes a cache
    saves), or the disk's write speed once the output is more than the page cache takes."""
    saved = max(0, work.output - work.source_hashed) * timings.sha256 / max(1, min(timings.cores, HASH_THREADS))
    compute = max(0.0, work.output * timings.per_byte - saved)
    disk = work.output * timings.disk_write if work.output > timings.dirty_limit else 0.0
    return STARTUP_SECONDS + max(compute, disk)
