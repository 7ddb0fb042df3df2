"""Benchmark (not a test): `abliterate apply` against a plain file copy of the same checkpoint, and peak RSS.

Builds a synthetic Llama-shaped checkpoint (random bf16 weights, default ~2.5 GB) once, then times
`cp -r` of its shards and `abliterate apply` on it, each in a fresh process, and prints the ratio and the
apply process's peak resident memory next to the largest tensor's size.

    python tests/benchmarks/bench_apply.py [--layers 24] [--hidden 2048] [--work /tmp/abl-bench]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
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


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/abl-bench"))
    args = parser.parse_args()
    source = args.work / "source"
    total, largest = build_checkpoint(source, args.layers, args.hidden, args.vocab)
    direction = args.work / "r.safetensors"
    save_file({"direction": torch.randn(args.hidden)}, str(direction))
    copy_dir, out = args.work / "copy", args.work / "out"
    shutil.rmtree(copy_dir, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    copy_dir.mkdir(parents=True)
    shards = sorted(str(p) for p in source.glob("*.safetensors"))
    timed(["cp", *shards, str(copy_dir)])  # warm the page cache so both runs read from it
    shutil.rmtree(copy_dir)
    copy_dir.mkdir()
    t_copy = timed(["cp", *shards, str(copy_dir)])
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t_apply = timed(
        [
            sys.executable,
            "-m",
            "abliterate",
            "-q",
            "apply",
            str(source),
            "--direction",
            str(direction),
            "--out",
            str(out),
        ]
    )
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"checkpoint: {total / 1e9:.2f} GB in {len(shards)} shards, largest tensor {largest / 1e6:.0f} MB")
    print(f"copy (cp):  {t_copy:6.1f} s  ({total / t_copy / 1e6:.0f} MB/s)")
    print(f"apply:      {t_apply:6.1f} s  ({total / t_apply / 1e6:.0f} MB/s)")
    print(f"apply / copy time ratio: {t_apply / t_copy:.2f}  (throughput ratio {t_copy / t_apply:.2f})")
    print(f"apply peak RSS: {peak_kib / 1024:.0f} MB" + ("" if peak_kib > before else " (max over child processes)"))
    shutil.rmtree(copy_dir, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
