"""sha256 of files and texts, in background threads, and the hashes a Hugging Face cache already declares.

Provenance (publish/provenance.py) records the sha256 of the source's and the output's files; the streaming edit
submits files to a `FileHasher` as soon as they are complete, so that hashing overlaps the edit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

_HASH_CHUNK = 16 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MB chunks (hashlib releases the GIL, so threads run in parallel)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class FileHasher:
    """sha256 of files in background threads, each file hashed once, started as soon as the file is complete.

    The streaming edit submits the source's weight files when it starts (the hashing threads then read
    ahead of the editor, warming the page cache) and every output shard when it is closed, so that hashing
    overlaps the edit instead of following it. Use as a context manager; unfinished work is cancelled on exit.
    """

    def __init__(self, workers: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1), thread_name_prefix="sha256")
        self._jobs: dict[Path, Future[str]] = {}

    def submit(self, path: Path) -> None:
        """Start hashing `path` (no-op if it was already submitted). The file must not change afterwards."""
        key = Path(path).resolve()
        if key not in self._jobs:
            self._jobs[key] = self._pool.submit(sha256_file, key)

    def digest(self, path: Path) -> str:
        """The file's hex sha256 (waits for a submitted job, or hashes it now)."""
        self.submit(path)
        return self._jobs[Path(path).resolve()].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> FileHasher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def hash_files(folder: Path, names: Sequence[str], hasher: FileHasher) -> dict[str, dict[str, Any]]:
    """{relative name: {"sha256", "bytes"}} for files under `folder`, by `hasher`'s threads.

    Files it already hashed (or is hashing) are not read again.
    """
    paths = [Path(folder) / name for name in names]
    for path in paths:
        hasher.submit(path)
    digests = [hasher.digest(path) for path in paths]
    return {
        name: {"sha256": digest, "bytes": path.stat().st_size}
        for name, path, digest in zip(names, paths, digests, strict=True)
    }


def text_sha256(texts: dict[str, list[str]]) -> str:
    """sha256 of a canonical JSON encoding of named lists of instructions (UTF-8, sorted keys)."""
    canonical = json.dumps(texts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 a Hugging Face cache snapshot file declares, if it is one: `snapshots/REV/NAME` links to
    `blobs/SHA256` for LFS files (weights), so the source's weights need not be read again to be identified."""
    path = Path(path)
    if not path.is_symlink():
        return None
    blob = path.resolve()
    if blob.parent.name == "blobs" and _SHA256_HEX.fullmatch(blob.name):
        return blob.name
    return None
