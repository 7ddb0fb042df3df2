"""Byte-identical outputs across a code change: `abliterate apply` with a fixed direction, old commit vs this tree.

    python tests/benchmarks/same_bytes.py [--against COMMIT] [--new COMMIT] [--families llama,qwen2] [--keep DIR]

For the tiny random model of every family in tests/tiny_models.py (float32, and bfloat16 for a few), for
SmolLM2-135M-Instruct (the converted GGUF in the cache, if present) and for its GGUF file with
`--format gguf`, the same direction file is applied by the code at COMMIT (a detached git worktree) and by the
working tree, each in its own process. Every output file must be byte-identical, except the two that record
when and by what command they were made (abliterate/provenance.json and the card README.md, compared with
the creation time and command removed). Prints one line per model and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import tiny_models  # noqa: E402

from abliterate.direction.vector import Direction  # noqa: E402
from abliterate.storage.paths import cache_dir  # noqa: E402

BF16 = ("llama", "gemma2", "qwen3_moe")  # also built in bfloat16: the rounding path of the edit
VOLATILE = ("abliterate/provenance.json", "README.md")


def worktree(commit: str, where: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(where), commit], cwd=ROOT, check=True,
                   capture_output=True)
    return where


def apply(code: Path, model: Path, direction: Path, out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "abliterate", "-q", "apply", str(model), "--direction", str(direction),
               "--out", str(out), *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=code)
    if result.returncode != 0:
        raise SystemExit(f"apply failed with {code}: {result.stderr[-2000:]}")


def _stable(path: Path) -> str:
    """A provenance record or card without what differs between two runs: times, commands, paths, versions."""
    text = path.read_text(encoding="utf-8")
    if path.name == "provenance.json":
        record = json.loads(text)
        for key in ("created", "command"):
            record.pop(key, None)
        record.get("output", {}).get("files", {}).pop("README.md", None)
        return json.dumps(record, sort_keys=True)
    return "\n".join(line for line in text.splitlines() if "created" not in line.lower())


def differences(old: Path, new: Path) -> list[str]:
    names = sorted({p.relative_to(old).as_posix() for p in old.rglob("*") if p.is_file()}
                   | {p.relative_to(new).as_posix() for p in new.rglob("*") if p.is_file()})
    found = []
    for name in names:
        a, b = old / name, new / name
        if not (a.is_file() and b.is_file()):
            found.append(f"{name}: only in {'new' if b.is_file() else 'old'}")
        elif name in VOLATILE or name.endswith("provenance.json"):
            if _stable(a) != _stable(b):
                found.append(f"{name}: differs beyond time and command")
        elif not filecmp.cmp(a, b, shallow=False):
            found.append(f"{name}: bytes differ")
    return found


def models(root: Path, families: list[str]) -> list[tuple[str, Path, tuple[str, ...]]]:
    built: list[tuple[str, Path, tuple[str, ...]]] = []
    for family in families:
        for dtype in (torch.float32, torch.bfloat16) if family in BF16 else (torch.float32,):
            folder = root / f"{family}-{str(dtype).removeprefix('torch.')}"
            tiny_models.build(family, folder, dtype=dtype)
            tiny_models.save_tokenizer(folder)
            built.append((folder.name, folder, ()))
    converted = sorted((cache_dir() / "converted").glob("SmolLM2-135M-Instruct.Q4_1-*"))
    if converted:
        built.append(("SmolLM2-135M-Instruct", converted[0], ()))
    ggufs = sorted((cache_dir() / "smollm2").rglob("*.gguf"))
    if ggufs:
        built.append(("SmolLM2-135M-Instruct.gguf --format gguf", ggufs[0], ("--format", "gguf")))
    return built


def hidden_size(folder: Path) -> int:
    if folder.is_file():
        return 576  # SmolLM2-135M
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config") or config
    return int(text["hidden_size"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", default="69ac14d~1", help="the commit to compare with (default: before the "
                        "issue-15 refactor)")
    parser.add_argument("--new", help="a commit to compare instead of the working tree")
    parser.add_argument("--families", default=",".join(tiny_models.FAMILIES))
    parser.add_argument("--keep", type=Path, help="keep the outputs here")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="same-bytes-"))
    root.mkdir(parents=True, exist_ok=True)
    old_code = worktree(args.against, root / "old-code")
    new_code = worktree(args.new, root / "new-code") if args.new else ROOT
    failed = 0
    try:
        for name, model, extra in models(root / "models", args.families.split(",")):
            torch.manual_seed(0)
            direction = root / "directions" / f"{name.split()[0]}.safetensors"
            direction.parent.mkdir(parents=True, exist_ok=True)
            Direction(torch.randn(hidden_size(model)), layer=1, pos=-1, lang="en").save(direction)
            outs = root / "out" / name.split()[0]
            apply(old_code, model, direction, outs / "old", *extra)
            apply(new_code, model, direction, outs / "new", *extra)
            found = differences(outs / "old", outs / "new")
            failed += bool(found)
            files = sum(1 for p in (outs / "new").rglob("*") if p.is_file())
            print(f"{name:45s} {'DIFFERENT: ' + '; '.join(found) if found else f'identical ({files} files)'}")
    finally:
        for code in {old_code, new_code} - {ROOT}:
            subprocess.run(["git", "worktree", "remove", "--force", str(code)], cwd=ROOT, capture_output=True)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{failed} model(s) differ" if failed else "every output is byte-identical")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
