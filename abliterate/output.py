"""Safe output folders: checked before work starts, written in a temporary sibling, renamed when complete.

A folder at `--out` therefore either does not exist or is finished; the source model is never written to.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from abliterate.errors import OutputError

log = logging.getLogger(__name__)

TMP_PREFIX = ".abliterate-tmp-"


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out: Path, *, overwrite: bool, sources: Sequence[Path] = ()) -> Path:
    """Validate an output folder before any work is done; return its absolute path."""
    out = Path(out).expanduser().resolve()
    for source in sources:
        source = Path(source).expanduser().resolve()
        if out == source:
            raise OutputError(f"--out {out} is the source model itself", hint="choose a new folder for the output")
        if _within(out, source):
            raise OutputError(f"--out {out} is inside the source model folder", hint="choose a folder outside it")
        if _within(source, out):
            raise OutputError(f"the source model is inside --out {out}", hint="choose a folder that does not hold it")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder", hint="choose another --out")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {parent}", hint="choose an --out location you can write to")
    return out


@contextmanager
def atomic_output(out: Path, *, overwrite: bool, sources: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out`, on any error it is removed."""
    out = check_output(out, overwrite=overwrite, sources=sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, out)


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{out.name}-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("replaced %s", out)
    else:
        os.replace(tmp, out)
