"""Progress bars: library loops call `track`, and bars appear only when the CLI has switched them on.

Without bars (stderr is not a terminal: CI, nohup, a log file), a stage that has been running for more than
`QUIET_SECONDS` logs one line at each tenth of its work instead, so that long stages (organism training, the
base model's answers) show progress in logs too, and short ones stay silent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
_enabled: ContextVar[bool] = ContextVar("abliterate_progress", default=False)
QUIET_SECONDS = 5.0
log = logging.getLogger(__name__)


def enable(on: bool = True) -> None:
    """Show progress bars for loops in this context (the CLI calls this)."""
    _enabled.set(on)


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate over `items`, with a progress bar (with ETA) on stderr when enabled."""
    if not _enabled.get():
        yield from _tenths(items, desc, total, unit) if total else items
        return
    yield from tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False)


def _tenths(items: Iterable[T], desc: str, total: int, unit: str) -> Iterator[T]:
    """`items`, logging "desc: done/total unit (p%), s" when a new tenth is reached (one line per item at most),
    once QUIET_SECONDS have passed."""
    start = time.monotonic()
    reached = 0
    for done, item in enumerate(items, 1):
        yield item
        tenth = done * 10 // total
        if tenth > reached:
            reached = tenth
            elapsed = time.monotonic() - start
            if elapsed >= QUIET_SECONDS:
                log.info("%s: %d/%d %s (%d%%), %.0f s", desc, done, total, unit, done * 100 // total, elapsed)
