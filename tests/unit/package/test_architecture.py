"""The building's rules (docs/architecture.md): the layer contract and no import cycles, checked by import-linter
on the real package and shown to fail on a copy with a planted cycle; and the size of functions."""

from __future__ import annotations

import ast
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import needs
import pytest

ROOT = Path(__file__).resolve().parents[3]
MAX_LINES = 60  # no function longer than this (docstring included, decorators not)
P90_LINES = 25  # and nine in ten at most this long


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    needs.module("importlinter")
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    env = {"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run([exe, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_layers_hold_and_there_are_no_cycles() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert result.stdout.count("KEPT") == 2, result.stdout[-2000:]


@pytest.mark.parametrize(
    ("module", "planted", "broken"),
    [
        # storage importing a stage above it breaks the layers (and, through cli, makes a cycle)
        ("storage/paths.py", "from abliterate.direction import vector  # noqa\n", "layered"),
        # two modules of one package importing each other: a cycle inside edit/
        ("edit/projection.py", "from abliterate.edit import stream  # noqa\n", "no import cycles"),
    ],
)
def test_a_planted_violation_fails(tmp_path: Path, module: str, planted: str, broken: str) -> None:
    shutil.copytree(ROOT / "abliterate", tmp_path / "abliterate", ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "abliterate" / module
    text = target.read_text(encoding="utf-8")
    cut = text.index("\nfrom abliterate") + 1 if "\nfrom abliterate" in text else text.index("\n\n\n") + 1
    target.write_text(text[:cut] + planted + text[cut:], encoding="utf-8")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    line = next(line for line in result.stdout.splitlines() if "BROKEN" in line or line.startswith(broken))
    assert broken in result.stdout and "BROKEN" in result.stdout, line


def _function_lengths() -> dict[str, int]:
    lengths = {}
    for path in sorted((ROOT / "abliterate").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                lengths[where] = (node.end_lineno or node.lineno) - node.lineno + 1
    return lengths


def test_functions_are_short() -> None:
    lengths = _function_lengths()
    too_long = {k: v for k, v in lengths.items() if v > MAX_LINES}
    assert not too_long, too_long
    p90 = statistics.quantiles(lengths.values(), n=10)[-1]
    assert p90 <= P90_LINES, f"p90 {p90} lines over {len(lengths)} functions"
