"""Benchmark (not a test): every stage of abliterate against its physical limit, measured in one run.

Prints one table, each figure as a ratio to its limit (docs/performance.md):
- streaming edit: `abliterate apply` throughput / `cp` throughput of the same synthetic checkpoint, warm and
  cold page cache, and the apply process's peak RSS (bench_apply.py; `--big` adds a 7.7 GB checkpoint);
- activation capture: wall time under `capture_residuals` / plain forward of the same batches (bench_forward.py);
- direction search: forward passes of a full `find_direction` (bench_forward.py);
- benchmark generation: answer tokens per second of `generate` (batched, length-sorted, stopping when
  every row has ended; harmful and harmless prompts generated separately, as the evaluation does) / raw decoding
  throughput of `model.generate` on a full batch of one prompt forced to
  `max_new_tokens` (no padding, no early stop: what the hardware decodes).

    python tests/benchmarks/performance.py                     # SmolLM2 (or the organism) + a 2.4 GB checkpoint
    python tests/benchmarks/performance.py --big --json out.json
    python tests/benchmarks/performance.py --skip-apply --model ~/.cache/abliterate/organism/<folder>

Run it with nothing else heavy on the machine: every stage uses all cores.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def measure_generation(model_dir: Path, n_prompts: int, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Useful answer tokens/s of the benchmark's generation against the raw decoding throughput."""
    model, tokenizer = load_model(ModelSource(str(model_dir), model_dir), dtype="auto", device="auto")
    builtin = sources.load("builtin")
    kinds = {  # generated one kind at a time, as the evaluation does (refusals are short, answers long)
        "harmful": builtin.instructions("en", "harmful", "test", n_prompts // 2),
        "harmless": builtin.instructions("en", "harmless", "test", n_prompts - n_prompts // 2),
    }
    texts = [text for group in kinds.values() for text in group]
    generate(model, tokenizer, texts[:2], 4, 2)  # warm-up
    start = time.perf_counter()
    results = [generate(model, tokenizer, group, max_new_tokens, batch_size) for group in kinds.values()]
    ours = time.perf_counter() - start
    ended = [(ids, done) for result in results for ids, done in zip(result.ids, result.finished, strict=True)]
    useful = sum(len(ids) + int(done) for ids, done in ended)
    lengths = sorted(encode(tokenizer, [render(tokenizer, t) for t in texts]), key=len)
    median = lengths[len(lengths) // 2]
    batch = tokenizer.pad({"input_ids": [median] * batch_size}, return_tensors="pt").to(model.device)
    pad = tokenizer.pad_token_id
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(  # type: ignore[operator]
            **batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        raw = time.perf_counter() - start
    raw_rate = batch_size * max_new_tokens / raw
    return {
        "prompts": len(texts),
        "answer_tokens": useful,
        "seconds": ours,
        "tokens_per_s": useful / ours,
        "raw_tokens_per_s": raw_rate,
        "ratio": useful / ours / raw_rate,
        "finished": sum(done for _ids, done in ended),
    }


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
            for cold in (False, True):
                f = bench_apply.measure(source, args.work, cold=cold)
                key = f"apply_{total / 1e9:.1f}GB_{'cold' if cold else 'warm'}"
                figures[key] = {**f, "bytes": total, "largest_tensor": largest}
                rows.append((
                    f"apply {total / 1e9:.1f} GB ({'cold cache, synced' if cold else 'warm cache'})",
                    f"{f['apply_s']:.1f} s, peak RSS {f['apply_rss'] / 1e9:.2f} GB",
                    f"cp {f['copy_s']:.1f} s",
                    f"{f['ratio']:.2f} (>= 0.80)",
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
    gen = measure_generation(model_dir, args.n_prompts, args.max_new_tokens, args.batch_size)
    figures["generation"] = gen
    rows.append((
        f"benchmark generation ({gen['prompts']} prompts, {args.max_new_tokens} tokens max)",
        f"{gen['tokens_per_s']:.0f} answer tok/s ({gen['finished']} ended early)",
        f"raw decoding {gen['raw_tokens_per_s']:.0f} tok/s",
        f"{gen['ratio']:.2f} (1.00 = no waste)",
    ))
    print(f"model: {model_dir} on {figures['device']}, torch threads {torch.get_num_threads()}")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in [("stage", "measured", "limit", "ratio"), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
