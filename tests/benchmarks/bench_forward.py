"""Benchmark (not a test): the cost of the direction search's forward passes, and how many it makes.

On one loaded model (the cached SmolLM2 conversion, else the model organism, else a tiny random Llama):
(a) a plain forward over length-sorted batches of real prompts (`model(**batch, use_cache=False,
    logits_to_keep=1)` under inference_mode), (b) the same batches under `capture_residuals`, exactly as
`mean_activations` runs them; per batch the best of `repeats` (alternating), summed, and their ratio (target
<= 1.15). Then the
forward passes of a full `find_direction` with screening grouped and one candidate per pass (counts and
wall time).

    python tests/benchmarks/bench_forward.py                                   # 64 prompts, batch 16
    python tests/benchmarks/bench_forward.py --n-prompts 128 --batch-size 32 --no-search
    python tests/benchmarks/bench_forward.py --model ~/.cache/abliterate/organism/<folder>

Torch uses all cores unless OMP_NUM_THREADS says otherwise; run it with nothing else heavy on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import BatchEncoding

from abliterate.direction.search import LoadedModel, find_direction, load
from abliterate.model.chat import post_instruction_length
from abliterate.model.forward import first_token_index, make_batches
from abliterate.model.hooks import capture_residuals
from abliterate.prompts import sources
from abliterate.settings import Settings

CACHE = Path.home() / ".cache" / "abliterate"


def default_model() -> Path:
    """The cached SmolLM2 conversion, else a cached model organism, else a tiny random Llama (built once)."""
    for pattern in ("converted/SmolLM2-*", "organism/*/"):
        found = sorted(p for p in CACHE.glob(pattern) if (p / "config.json").is_file())
        if found:
            return found[0]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_models import build, save_tokenizer

    folder = Path(tempfile.gettempdir()) / "abliterate-bench-tiny"
    if not (folder / "config.json").is_file():
        build("llama", folder, tied=True)
        save_tokenizer(folder)
    return folder


def plain_pass(loaded: LoadedModel, batch: BatchEncoding) -> None:
    """One forward pass, last-position logits only."""
    with torch.inference_mode():
        inputs = {k: v.to(loaded.model.device) for k, v in batch.items()}
        loaded.model(**inputs, use_cache=False, logits_to_keep=1)


def capture_pass(loaded: LoadedModel, batch: BatchEncoding, n_pos: int) -> None:
    """The same pass as `mean_activations` runs it, hooks registered and means read for this batch alone
    (so the timing includes per-call costs that a real run pays once per prompt set)."""
    with capture_residuals(loaded.model, loaded.arch, n_pos) as sums, torch.inference_mode():
        sums.first_token = first_token_index(batch)
        inputs = {k: v.to(loaded.model.device) for k, v in batch.items()}
        loaded.model(**inputs, use_cache=False, logits_to_keep=1)
        sums.count += int(batch["input_ids"].shape[0])
    sums.means(), sums.sink_means()


def _seconds(run: Callable[[BatchEncoding], None], batch: BatchEncoding, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_capture(loaded: LoadedModel, n_prompts: int, batch_size: int, repeats: int) -> dict[str, Any]:
    """Seconds of the plain and the capturing passes over all batches: per batch the best of `repeats`
    (plain and capture alternating, after one warm-up each), summed. Per-batch minima make the figure robust
    to bursts of other work on shared cores."""
    texts = sources.load("builtin", default_lang="en").instructions("en", "harmful", "train", n_prompts)
    batches = [batch for _indices, batch in make_batches(loaded.tokenizer, texts, batch_size)]
    n_pos = post_instruction_length(loaded.tokenizer)
    device = loaded.model.device
    runs: dict[str, Callable[[BatchEncoding], None]] = {
        "plain": lambda batch: plain_pass(loaded, batch),
        "capture": lambda batch: capture_pass(loaded, batch, n_pos),
    }
    for run in runs.values():
        run(batches[0])  # warm-up
    best = {name: [math.inf] * len(batches) for name in runs}
    for _ in range(repeats):
        for i, batch in enumerate(batches):
            for name, run in runs.items():
                best[name][i] = min(best[name][i], _seconds(run, batch, device))
    total = {name: sum(values) for name, values in best.items()}
    return {
        "prompts": len(texts),
        "batches": len(batches),
        "tokens": sum(int(b["input_ids"].numel()) for b in batches),
        "plain_s": round(total["plain"], 3),
        "capture_s": round(total["capture"], 3),
        "ratio": round(total["capture"] / total["plain"], 3),
    }


def count_search(loaded: LoadedModel, settings: Settings) -> dict[str, Any]:
    """Forward passes (and rows, wall time) of a full find_direction, screening grouped and one by one."""
    out: dict[str, Any] = {}
    for name, grouped in (("grouped", True), ("one_by_one", False)):
        start = time.perf_counter()
        result = find_direction(settings, loaded, grouped_screening=grouped)
        report = result.report()
        out[name] = {
            "forward_passes": report.forward_passes,
            "forward_rows": report.forward_rows,
            "seconds": round(time.perf_counter() - start, 1),
            "chosen": {"layer": result.direction.layer, "pos": result.direction.pos},
        }
    return out


def measure(
    model_dir: Path, n_prompts: int, batch_size: int, *, repeats: int = 3, search: bool = True, n_val: int = 8
) -> dict[str, Any]:
    """All figures for one model: capture overhead and the search's forward-pass counts."""
    settings = Settings(
        model=str(model_dir), n_train=max(2, n_prompts), n_val=n_val, batch_size=batch_size, eval=False
    )
    loaded = load(settings)
    result: dict[str, Any] = {
        "model": str(model_dir),
        "device": str(loaded.model.device),
        "dtype": str(loaded.model.dtype),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "capture": time_capture(loaded, n_prompts, batch_size, repeats),
    }
    if search:
        result["search"] = count_search(loaded, settings)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="Model folder (default: see above).")
    parser.add_argument("--n-prompts", type=int, default=64, help="Prompts in the timed passes (and n_train).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-val", type=int, default=8, help="n_val of the counted searches.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-search", action="store_true", help="Skip the two find_direction runs.")
    args = parser.parse_args()
    model = args.model or default_model()
    figures = measure(model, args.n_prompts, args.batch_size, repeats=args.repeats, search=not args.no_search,
                      n_val=args.n_val)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
