"""Helpers shared by the test modules: the CLI in a subprocess, its one-line errors, HTML links, a cosine.

`run` and `assert_one_line_error` (and the `FAST` flags) used to be imported from `test_cli`; the variants
that `test_evaluate`, `test_publish` and `test_big_models` define for themselves are here too, with the
same behaviour, so that each can import instead of copying:

- `run(*args, check=False, env=None, code=None, timeout=600)`: `python -m abliterate ARGS` offline (`HF_HUB_OFFLINE=1`);
  `env` adds variables, `code` runs first (e.g. to hide a module), as in `test_big_models.run`.
- `run_online(*args, env=None)`: the hub reachable and no login token, as in `test_publish.run`.
- `one_line_error(done)`: a failed run whose stderr holds exactly one `error:` line and no traceback; returns it.
- `assert_one_line_error(done, *needles)`: the same, and every needle is in that line.
- `only_error_line(done)`: stricter: exit code 2 and stderr that is nothing but the one `error:` line.
- `Links` / `assert_self_contained(page)`: every src/href of an HTML page; a page that loads nothing from outside.
- `cosine(a, b)`: signed cosine in float64, 0 for a zero vector.
"""

from __future__ import annotations

import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import torch

FAST = [
    "--n-train",
    "8",
    "--n-val",
    "4",
    "--screen-prompts",
    "2",
    "--finalists",
    "2",
    "--batch-size",
    "8",
    "--refusal-tokens",
    "I",
    "--refusal-tokens",
    "Sorry",
    "--no-eval",
]

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def run(
    *args: str | Path, check: bool = False, env: dict[str, str] | None = None, code: str | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point in a subprocess, offline, as a user would; `code` runs before main()."""
    entry = ["-m", "abliterate"] if code is None else ["-c", f"{code}; from abliterate.cli import main; main()"]
    done = subprocess.run(
        [sys.executable, *entry, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=timeout,
        check=False,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def run_online(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The console entry point with the hub reachable (HF_HUB_OFFLINE=0) and no login token in the environment."""
    full = {k: v for k, v in os.environ.items() if k not in TOKEN_VARIABLES}
    full.update({"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "abliterate", *map(str, args)],
        capture_output=True,
        text=True,
        env=full,
        timeout=600,
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exactly one `error:` line on stderr and no traceback; that line."""
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    """The run failed with one `error:` line (see `one_line_error`) that contains every needle."""
    line = one_line_error(done)
    for needle in needles:
        assert needle in line, line


def only_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """Exit code 2 and stderr that is exactly one `error:` line (no traceback, no log lines)."""
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


class Links(HTMLParser):
    """Every src/href value of a page, and its img sources."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "action") and value is not None:
                self.refs.append(value)
                if tag == "img":
                    self.images.append(value)


def assert_self_contained(page: str) -> Links:
    """The page loads nothing from outside itself (only data: URLs and in-page anchors); its links."""
    links = Links()
    links.feed(page)
    assert all(ref.startswith(("data:", "#")) for ref in links.refs), links.refs
    assert "url(" not in page and "@import" not in page
    return links


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Signed cosine of two vectors in float64; 0 when either is zero."""
    norms = float(a.double().norm()) * float(b.double().norm())
    return float(a.double() @ b.double()) / norms if norms > 0 else 0.0
