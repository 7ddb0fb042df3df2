"""Benchmark (not a test): `abliterate apply` against a plain file copy of the same checkpoint, and peak RSS.

Builds a synthetic Llama-shaped checkpoint (random bf16 weights) once, then times `cp` of its shards and
`abliterate apply` on it (a first edit, and a second one that finds the source's sha256 in the hash cache of a
fresh ABLITERATE_CACHE), each in a fresh process, twice: warm (source in the page cache, nothing synced) and
cold (source evicted from the page cache with posix_fadvise, the output synced to disk before the clock
stops). Prints the throughput ratio and the apply process's own peak RSS next to the largest tensor's size.

    python tests/benchmarks/bench_apply.py                          # 2.4 GB: 24 layers, hidden 2048
    python tests/benchmarks/bench_apply.py --layers 20 --hidden 4096  # 7.7 GB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file


def build_checkpoint(folder: Path, layers: int, hidden: int, vocab: int) -> tuple[int, int]:
    """Write random bf16 shards (one per 4 layers) plus config.json; return (total bytes, largest tensor bytes)."""
    if (folder / "config.json").is_file():
        sizes = [p.stat().st_size for p in folder.glob("*.safetensors")]
        return sum(sizes), vocab * hidden * 2
    folder.mkdir(parents=True, exist_ok=True)
    inter, kv = int(hidden * 2.75), hidden // 4
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    names = list(shapes)
    groups = [names[i : i + 40] for i in range(0, len(names), 40)]
    weight_map = {}
    for n, group in enumerate(groups, 1):
        fname = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {k: (torch.randn(shapes[k]) * 0.02).to(torch.bfloat16) for k in group},
            str(folder / fname),
            metadata={"format": "pt"},
        )
        weight_map |= {k: fname for k in group}
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": kv // 128,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return total, vocab * hidden * 2


def evict(paths: list[Path]) -> None:
    """Drop files from the page cache (clean pages only: call `sync` first), so that the next read hits the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(cmd: list[str], *, sync: bool) -> tuple[float, int, float, float]:
    """Wall time of `cmd` (plus `sync` of everything it wrote, if asked), its own peak RSS (bytes), CPU seconds
    (user + kernel), and the kernel's share of them.

    The command runs under GNU time, which reports the peak of the command alone: a child forked straight
    from this (large) Python process would count this process's pages in its own peak RSS.
    """
    report = Path(tempfile.mkstemp(suffix=".time")[1])
    start = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-o", str(report), "-f", "%M %U %S", *cmd], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed: {done.stderr}")
    if sync:
        os.sync()
    elapsed = time.perf_counter() - start
    peak_kib, user, system = report.read_text().split()[-3:]
    report.unlink()
    return elapsed, int(peak_kib) * 1024, float(user) + float(system), float(system)


def measure(source: Path, work: Path, *, cold: bool, extra: Sequence[str] = ()) -> dict[str, float]:
    """Time `cp` of the shards and `abliterate apply` twice (a first edit, whose source sha256 is computed,
    then a second, which finds it in the hash cache), all warm (page cache) or all cold (evicted, synced)."""
    direction = work / "r.safetensors"
    hidden = int(json.loads((source / "config.json").read_text())["hidden_size"])
    save_file({"direction": torch.randn(hidden)}, str(direction))
    shards = sorted(source.glob("*.safetensors"))
    copy_dir, out, cache = work / "copy", work / "out", work / "hash-cache"
    apply = [sys.executable, "-m", "abliterate", "-q", "apply", str(source), "--direction", str(direction),
             "--out", str(out), *extra]
    shutil.rmtree(cache, ignore_errors=True)  # the first apply hashes the source, the second finds it cached
    os.environ["ABLITERATE_CACHE"] = str(cache)
    figures: dict[str, float] = {}
    for label, cmd, target in [("copy", ["cp", *map(str, shards), str(copy_dir)], copy_dir),
                               ("apply", apply, out), ("again", apply, out)]:
        shutil.rmtree(target, ignore_errors=True)
        if label == "copy":
            copy_dir.mkdir(parents=True)
        os.sync()
        if cold:
            evict(shards)
        else:
            subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)  # warm the cache
        figures[f"{label}_s"], figures[f"{label}_rss"], figures[f"{label}_cpu"], figures[f"{label}_sys"] = run(
            cmd, sync=cold)
        shutil.rmtree(target, ignore_errors=True)
    figures["ratio"] = figures["copy_s"] / figures["apply_s"]  # throughput of apply relative to the copy
    figures["again_ratio"] = figures["copy_s"] / figures["again_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/abl-bench"))
    parser.add_argument("--apply-option", action="append", default=[], dest="extra", metavar="ARG",
                        help="an extra argument of `abliterate apply` (repeatable), e.g. --apply-option=--output-hash"
                        " --apply-option=sha256")
    args = parser.parse_args()
    source = args.work / f"source-{args.layers}x{args.hidden}"
    total, largest = build_checkpoint(source, args.layers, args.hidden, args.vocab)
    n_shards = len(list(source.glob("*.safetensors")))
    print(f"checkpoint: {total / 1e9:.2f} GB in {n_shards} shards, largest tensor {largest / 1e6:.0f} MB")
    for cold in (False, True):
        f = measure(source, args.work, cold=cold, extra=args.extra)
        mode = "cold (source evicted from the page cache, output synced)" if cold else "warm (source in page cache)"
        print(f"{mode}:")
        print(f"  copy (cp): {f['copy_s']:6.1f} s  ({total / f['copy_s'] / 1e6:.0f} MB/s), CPU {f['copy_cpu']:.1f} s "
              f"(kernel {f['copy_sys']:.1f} s)")
        for key, label in [("apply", "apply, first edit (source hashed)"), ("again", "apply, again (hash cache)")]:
            print(f"  {label}: {f[f'{key}_s']:6.1f} s  ({total / f[f'{key}_s'] / 1e6:.0f} MB/s), peak RSS "
                  f"{f[f'{key}_rss'] / 1e6:.0f} MB, CPU {f[f'{key}_cpu']:.1f} s (kernel {f[f'{key}_sys']:.1f} s)")
            print(f"    apply throughput / copy throughput: {f[f'{key}_ratio' if key == 'again' else 'ratio']:.2f}"
                  " (target >= 0.80)")


if __name__ == "__main__":
    main()
