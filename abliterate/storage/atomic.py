"""Safe output folders and files: checked before work starts, written in a temporary sibling, renamed when complete.

A folder at `--out` therefore either does not exist or is finished; the source model is never written to.
Single files go the same way (`write_atomic`), and every JSON file the package writes goes through `write_json`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from abliterate.errors import OutputError

log = logging.getLogger(__name__)

TMP_PREFIX = ".abliterate-tmp-"
OWNER_FILE = ".owner-pid"  # inside a temporary folder: the process writing it


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out: Path, *, overwrite: bool, sources: Sequence[Path] = (), file: bool = False) -> Path:
    """Validate an output folder (or, with `file`, an output file) before any work is done; return its path."""
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
    if out.exists() and out.is_dir() == file:
        kind = "a folder" if file else "not a folder"
        raise OutputError(f"{out} exists and is {kind}", hint="choose another --out")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {parent}", hint="choose an --out location you can write to")
    return out


def ensure_free_space(folder: Path, needed: int) -> None:
    """Fail before writing if the filesystem holding `folder` has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(
            f"not enough disk space in {folder}: the output needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are free",
            hint="free some space or choose an --out on another disk",
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> None:
    """Remove temporary folders for `out` left by runs that were killed (their owner process is gone)."""
    for tmp in out.parent.glob(f"{TMP_PREFIX}{out.name}-*"):
        try:
            pid = int((tmp / OWNER_FILE).read_text())
        except (OSError, ValueError):
            pid = -1
        if pid <= 0 or not _alive(pid):
            log.info("removing %s, left by an interrupted run", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_output(out: Path, *, overwrite: bool, sources: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out`, on any error it is removed."""
    out = check_output(out, overwrite=overwrite, sources=sources)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-", dir=out.parent))
        (tmp / OWNER_FILE).write_text(str(os.getpid()))
    except OSError as err:
        raise OutputError(
            f"cannot write in {out.parent}: {err.strerror}", hint="choose an --out location you can write to"
        ) from None
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise OutputError(
                f"the disk holding {out.parent} is full", hint="free some space or choose an --out on another disk"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / OWNER_FILE).unlink()
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


# --- single files ----------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write `data` to `path` through a temporary sibling and a rename: readers see the old file or the new one.

    The parent folder is created; on any error the temporary file is removed and the error raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


JsonFilter = Callable[[str], str]


def json_text(data: BaseModel | object, *, indent: int | None = 2) -> str:
    """The one JSON format: UTF-8 text (not escaped), `indent` spaces (None: one line), a final newline.

    A pydantic model is dumped with the fields it was given (`exclude_unset`), in its field order, so a record
    read from a file and written again keeps its keys.
    """
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json", exclude_unset=True, by_alias=True)
    return json.dumps(data, indent=indent, ensure_ascii=False) + "\n"


def write_json(
    path: Path, data: BaseModel | object, *, indent: int | None = 2, text_filter: JsonFilter | None = None
) -> Path:
    """Write a record (a pydantic model) or plain data as JSON (`json_text`), atomically (`write_atomic`).

    `text_filter` rewrites the text before it is written (provenance redacts tokens with it).
    """
    text = json_text(data, indent=indent)
    return write_atomic(path, text_filter(text) if text_filter is not None else text)
