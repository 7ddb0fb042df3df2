"""Benchmark (not a test): every stage of abliterate against its physical limit, measured in one run.

Prints one table, each figure as a ratio to its limit (docs/performance.md):
- streaming edit: `abliterate apply` throughput / `cp` throughput of the same synthetic checkpoint, warm and
  cold page cache, a first edit (the source's sha256 computed) and a second (found in the hash cache), and the
  apply process's peak RSS (bench_apply.py; `--big` adds a 7.7 GB checkpoint);
- activation capture: wall time under `capture_residuals` / plain forward of the same batches (bench_forward.py);
- direction search: forward passes of a full `find_direction` (bench_forward.py);
- benchmark generation, on SmolLM2 and the model organism (whichever are cached; `--model` for one): answer
  tokens per second of `generate` (continuous batching over length-sorted prompts), harmful and harmless prompts
  in one call (as the evaluation does) and, for comparison, one call per kind / raw decoding throughput of
  `model.generate` on a full batch of one prompt forced to `max_new_tokens` (no padding, no early stop: what
  the hardware decodes).

    python tests/benchmarks/performance.py                     # SmolLM2 (or the organism) + a 2.4 GB checkpoint
    python tests/benchmarks/performance.py --big --json out.json
    python tests/benchmarks/performance.py --skip-apply --model ~/.cache/abliterate/organism/<folder>

Run it with nothing else heavy on the machine: every stage uses all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_apply
import bench_forward

from abliterate.evaluation.generate import generate
from abliterate.model.chat import encode, render
from abliterate.model.loading import ModelSource, load_model
from abliterate.prompts import sources


def planned_apply_seconds(source: Path, out: Path) -> float:
    """What `abliterate apply SOURCE --plan` estimates for the edit (calibrated on this machine, nothing written)."""
    from abliterate.planning.plan import Request, plan_run
    from abliterate.settings import build_settings

    settings = build_settings(None, {"model": str(source), "out": out})
    with tempfile.TemporaryDirectory() as empty:  # a hash cache without the source: a first edit's plan
        os.environ["ABLITERATE_CACHE"] = empty
        seconds = plan_run(Request("apply", settings, out=out)).seconds
    assert seconds is not None, "the apply plan always times the edit"
    return seconds


def measure_generation(
    model_dir: Path, n_prompts: int, max_new_tokens: int, batch_size: int, one_queue: bool = True
) -> dict[str, Any]:
    """Useful answer tokens/s of the benchmark's generation against the raw decoding throughput.

    `one_queue`: harmful and harmless prompts in one `generate` call, as the evaluation makes them now (every
    language and kind in one continuous-batching queue); else one call per kind (the evaluation before).
    """
    model, tokenizer = load_model(ModelSource(str(model_dir), model_dir), dtype="auto", device="auto")
    builtin = sources.load("builtin")
    kinds = {  # refusals are short, answers long
        "harmful": builtin.instructions("en", "harmful", "test", n_prompts // 2),
        "harmless": builtin.instructions("en", "harmless", "test", n_prompts - n_prompts // 2),
    }
    texts = [text for group in kinds.values() for text in group]
    generate(model, tokenizer, texts[:2], 4, 2)  # warm-up
    calls = [texts] if one_queue else list(kinds.values())
    start = time.perf_counter()
    results = [generate(model, tokenizer, group, max_new_tokens, batch_size) for group in calls]
    ours = time.perf_counter() - start
    ended = [(ids, done) for result in results for ids, done in zip(result.ids, result.finished, strict=True)]
    useful = sum(len(ids) + int(done) for ids, done in ended)
    raw_rate = raw_decoding_rate(model, tokenizer, texts, max_new_tokens, batch_size)
    return {
        "model": str(model_dir),
        "one_queue": one_queue,
        "prompts": len(texts),
        "answer_tokens": useful,
        "seconds": ours,
        "tokens_per_s": useful / ours,
        "raw_tokens_per_s": raw_rate,
        "ratio": useful / ours / raw_rate,
        "finished": sum(done for _ids, done in ended),
    }


def raw_decoding_rate(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int, batch_size: int) -> float:
    """Tokens/s of `model.generate` on a full batch of the median prompt forced to `max_new_tokens`."""
    lengths = sorted(encode(tokenizer, [render(tokenizer, t) for t in texts]), key=len)
    median = lengths[len(lengths) // 2]
    batch = tokenizer.pad({"input_ids": [median] * batch_size}, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(
            **batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        raw = time.perf_counter() - start
    return batch_size * max_new_tokens / raw


def generation_models(given: Path | None) -> list[Path]:
    """--model, else the cached SmolLM2 conversion and model organism (whichever exist)."""
    if given is not None:
        return [given.expanduser()]
    found = [sorted(p for p in bench_forward.CACHE.glob(pattern) if (p / "config.json").is_file())
             for pattern in ("converted/SmolLM2-*", "organism/*/")]
    return [paths[0] for paths in found if paths] or [bench_forward.default_model()]


def generation_rows(models: list[Path], args: argparse.Namespace, figures: dict[str, Any]) -> list[tuple[str, ...]]:
    """Generation on each model, one call per kind and one queue, each a row of the table."""
    rows = []
    for model_dir in models:
        for one_queue in (False, True):
            gen = measure_generation(model_dir, args.n_prompts, args.max_new_tokens, args.batch_size, one_queue)
            figures.setdefault("generation", []).append(gen)
            how = "one queue" if one_queue else "a call per kind"
            rows.append((
                f"benchmark generation, {model_dir.name[:24]} ({gen['prompts']} prompts, {how})",
                f"{gen['tokens_per_s']:.0f} answer tok/s ({gen['finished']} ended early)",
                f"raw decoding {gen['raw_tokens_per_s']:.0f} tok/s",
                f"{gen['ratio']:.2f} (>= 0.95)",
            ))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: cached SmolLM2/organism)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/abl-bench"), help="where synthetic checkpoints go")
    parser.add_argument("--big", action="store_true", help="also measure a 7.7 GB checkpoint (20 x 4096)")
    parser.add_argument("--skip-apply", action="store_true", help="skip the streaming-edit stage")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    model_dir = (args.model or bench_forward.default_model()).expanduser()
    rows: list[tuple[str, str, str, str]] = []
    figures: dict[str, Any] = {"model": str(model_dir), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if not args.skip_apply:
        sizes = [(24, 2048)] + ([(20, 4096)] if args.big else [])
        for layers, hidden in sizes:
            source = args.work / f"source-{layers}x{hidden}"
            total, largest = bench_apply.build_checkpoint(source, layers, hidden, 32000)
            planned = planned_apply_seconds(source, args.work / "planned-out")
            for cold in (False, True):
                f = bench_apply.measure(source, args.work, cold=cold)
                key = f"apply_{total / 1e9:.1f}GB_{'cold' if cold else 'warm'}"
                figures[key] = {**f, "bytes": total, "largest_tensor": largest}
                rows.append((
                    f"apply {total / 1e9:.1f} GB ({'cold cache, synced' if cold else 'warm cache'}; "
                    "first / second edit)",
                    f"{f['apply_s']:.1f} / {f['again_s']:.1f} s, peak RSS {f['apply_rss'] / 1e9:.2f} / "
                    f"{f['again_rss'] / 1e9:.2f} GB",
                    f"cp {f['copy_s']:.1f} s",
                    f"{f['ratio']:.2f} / {f['again_ratio']:.2f} (>= 0.80)",
                ))
                if cold:  # the plan's estimate is of a first edit on a cold cache, output synced
                    figures[key]["planned_s"] = planned
                    rows.append((
                        f"apply --plan, {total / 1e9:.1f} GB (estimate of the first edit, cold)",
                        f"{planned:.1f} s estimated", f"measured {f['apply_s']:.1f} s",
                        f"{planned / f['apply_s']:.2f} (0.75 .. 1.25)",
                    ))
    forward = bench_forward.measure(model_dir, args.n_prompts, args.batch_size)
    figures["forward"] = forward
    capture = forward["capture"]
    rows.append((
        f"activation capture ({args.n_prompts} prompts, batch {args.batch_size})",
        f"{capture['capture_s']:.2f} s",
        f"plain forward {capture['plain_s']:.2f} s",
        f"{capture['ratio']:.2f} (<= 1.15)",
    ))
    search = forward.get("search")
    if search:
        rows.append((
            "direction search forward passes",
            f"{search['grouped']['forward_passes']['total']} passes",
            f"one candidate per pass: {search['one_by_one']['forward_passes']['total']}",
            f"{search['grouped']['forward_passes']['total'] / search['one_by_one']['forward_passes']['total']:.2f}",
        ))
    rows.extend(generation_rows(generation_models(args.model), args, figures))
    print(f"model: {model_dir} on {figures['device']}, torch threads {torch.get_num_threads()}")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in [("stage", "measured", "limit", "ratio"), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
