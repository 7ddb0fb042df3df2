"""The rough edges of a first run: cheap checks before the network, one line offline, library warnings only at -vv."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import FAST, assert_one_line_error, run

from abliterate import cli


def test_layer_out_of_range_answers_before_the_evaluation(tiny_chat: Path, tmp_path: Path) -> None:
    """With the evaluation on (its lm-eval data would need the hub), the bad --layer is still the first answer."""
    done = run("edit", tiny_chat, "--lang", "en", "--layer", "99", "--out", tmp_path / "out")
    assert_one_line_error(done, "--layer 99 is out of range", "layers 0..2")
    assert done.stderr.strip().count("\n") == 0, done.stderr  # the error line alone
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_fails_once_in_one_line(tiny_chat: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    env = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"}}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: the hub is unreachable
    fast = [a for a in FAST if a != "--no-eval"]
    done = subprocess.run(
        [sys.executable, "-m", "abliterate", "edit", str(tiny_chat), "--layer", "1", "--pos", "-1", "--tasks", "mmlu",
         "--out", str(tmp_path / "out"), *fast],
        capture_output=True, text=True, env={**env, "HF_HOME": str(tmp_path / "hf")}, timeout=300, check=False,
    )
    assert_one_line_error(done, "mmlu", "abliterate_mini_mc", "--tasks none")
    assert "Retrying" not in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr  # the error, and the line saying we went offline
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("verbose", "shown"), [(0, False), (1, False), (2, True)])
def test_library_warnings_only_with_vv(verbose: int, shown: bool, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        for handler in handlers:
            root.removeHandler(handler)
        cli._setup_logging(verbose, quiet=False)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("`past_key_values` is deprecated", FutureWarning, stacklevel=1)
        assert ("past_key_values" in capsys.readouterr().err) is shown
    finally:
        logging.captureWarnings(False)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
