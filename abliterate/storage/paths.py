"""Where abliterate keeps downloads, converted models and the model organism (light: no torch import)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$ABLITERATE_CACHE`, else `~/.cache/abliterate`."""
    return Path(os.environ.get("ABLITERATE_CACHE", Path.home() / ".cache" / "abliterate")).expanduser()
