"""Skips that cannot hide in CI: a test that needs something missing skips locally, and fails where CI=true.

CI installs everything the tests need (the dev extra, chromium, root rights for a tmpfs), so a skip there means
the environment broke, not that the test does not apply; it must show up red rather than as a quiet "s".
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test here; in CI, fail it with the same reason."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: CI must be able to run this test)", pytrace=False)
    pytest.skip(reason)


def module(name: str, hint: str = "pip install -e '.[dev]'") -> ModuleType:
    """`pytest.importorskip` that fails in CI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        skip_or_fail(f"{name} is not installed ({hint})")
