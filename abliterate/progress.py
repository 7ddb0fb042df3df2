"""Progress bars: library loops call `track`, and bars appear only when the CLI has switched them on."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
_enabled: ContextVar[bool] = ContextVar("abliterate_progress", default=False)


def enable(on: bool = True) -> None:
    """Show progress bars for loops in this context (the CLI calls this)."""
    _enabled.set(on)


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate over `items`, with a progress bar (with ETA) on stderr when enabled."""
    if not _enabled.get():
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False)
