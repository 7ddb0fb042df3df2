"""Hashes of files and texts: in background threads, streamed as files are written, cached for local sources.

Provenance (publish/provenance.py) records the sha256 of the source's files and a hash of every output file.
The output's algorithm is a setting (`--output-hash`): `xxh3_128` (the default, about 20 times faster than
sha256 here; it catches any accidental change) or `sha256` (also a proof against deliberate tampering); the
record names the algorithm and `verify` checks with it. The streaming edit hashes each output shard from the
bytes as they are written (`StreamDigest`: edited blocks, the header, and the source ranges that the kernel
copies), so the output is not read back. The source's sha256 is kept in `HashCache` (by path, size, times,
inode and device), so that a second edit of the same local model does not hash it again; files of a Hugging
Face cache snapshot declare their sha256 in the blob's name (`hub_blob_sha256`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import xxhash

from abliterate.storage.atomic import write_json
from abliterate.storage.paths import cache_dir

log = logging.getLogger(__name__)

HashAlgorithm = Literal["xxh3_128", "sha256"]
HASH_ALGORITHMS: tuple[HashAlgorithm, ...] = ("xxh3_128", "sha256")
HASH_CACHE_FILE = "file-hashes.json"
_HASH_CHUNK = 16 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MAP_WINDOW = 64 << 20  # bytes of a source range mapped at once while hashing it
_CACHE_LIMIT = 4096  # entries kept in the hash cache (the most recently hashed)
_RACY_NS = 2 * 10**9  # a file modified this recently is not cached: a rewrite could keep its timestamps


class Digest(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


_NEW: dict[str, Callable[[], Digest]] = {"sha256": hashlib.sha256, "xxh3_128": xxhash.xxh3_128}


def new_digest(algorithm: str) -> Digest:
    """An empty hash object of `algorithm` (one of HASH_ALGORITHMS)."""
    return _NEW[algorithm]()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 16 MB chunks (both hashes release the GIL, so threads run in parallel)."""
    digest = new_digest(algorithm)
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with Path(path).open("rb", buffering=0) as fh:
        while count := fh.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def read_ahead(path: Path) -> None:
    """Ask the kernel to read the whole file into the page cache in the background (a hint; no-op where the
    platform has no posix_fadvise)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    return file_digest(path, "sha256")


# --- the hash cache of local files ---------------------------------------------------------------------------


def _stamp(path: Path) -> list[int]:
    """What identifies a file's version without reading it: size, mtime, ctime, inode, device."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class HashCache:
    """The sha256 of local files, kept in `cache_dir()/file-hashes.json`, keyed by resolved path.

    An entry holds only while the file's size, modification and change times, inode and device are those it
    had when it was hashed; anything else (a rewrite, a touch, a replacement) hashes the file again. Files
    modified in the last 2 s are not entered (a rewrite within the filesystem's clock tick could keep every
    timestamp). A missing, unreadable or damaged cache file is simply empty; it is written atomically.
    """

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else cache_dir() / HASH_CACHE_FILE
        self._entries = self._read()
        self._added: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            files = data["files"] if isinstance(data, dict) and data.get("version") == 1 else {}
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        return {key: entry for key, entry in files.items() if _valid_entry(entry)} if isinstance(files, dict) else {}

    def lookup(self, path: Path) -> str | None:
        """The cached sha256 of `path`, if it is there and the file has not changed since."""
        key = str(Path(path).resolve())
        with self._lock:
            entry = self._added.get(key) or self._entries.get(key)
        try:
            return entry["sha256"] if entry is not None and entry["stamp"] == _stamp(Path(key)) else None
        except OSError:
            return None

    def sha256(self, path: Path) -> tuple[str, bool]:
        """(sha256 of `path`, whether it came from the cache); a file it hashes is entered if it held still."""
        cached = self.lookup(path)
        if cached is not None:
            return cached, True
        key = Path(path).resolve()
        before, started = _stamp(key), time.time_ns()
        digest = sha256_file(key)
        if _stamp(key) == before and before[1] < started - _RACY_NS:
            with self._lock:
                self._added[str(key)] = {"sha256": digest, "stamp": before, "hashed": started}
        return digest, False

    def save(self) -> None:
        """Write the new entries (merged with the file's current ones; gone or changed files dropped)."""
        with self._lock:
            if not self._added:
                return
            entries = {**self._read(), **self._added}
            self._added = {}
        kept = sorted(entries.items(), key=lambda item: -int(item[1].get("hashed", 0)))[:_CACHE_LIMIT]
        files = {key: entry for key, entry in kept if _unchanged(key, entry)}
        try:
            write_json(self.path, {"version": 1, "files": files}, indent=None)
        except OSError as err:
            log.warning("cannot write the hash cache %s: %s", self.path, err)
        self._entries = files


def _valid_entry(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            and _SHA256_HEX.fullmatch(entry["sha256"]) is not None and isinstance(entry.get("stamp"), list)
            and len(entry["stamp"]) == 5 and all(isinstance(v, int) for v in entry["stamp"]))


def _unchanged(key: str, entry: dict[str, Any]) -> bool:
    try:
        return bool(entry["stamp"] == _stamp(Path(key)))
    except OSError:
        return False


# --- hashing as a file is written --------------------------------------------------------------------------


class StreamDigest:
    """The digest of a file computed from its bytes as they are written, in one background thread.

    `update` takes bytes that are written to the file (edited blocks, the header); `update_from` takes a range
    of another file whose bytes are copied into it by the kernel, and hashes them from that file (read in the
    thread, so the written output is never read back). Chunks are hashed in order; at most two are waiting,
    so that memory stays bounded when the hash is slower than the writer. `finish` returns the hex digest's
    future.
    """

    def __init__(self, algorithm: str):
        self.algorithm = algorithm
        self._digest = new_digest(algorithm)
        self._queue: queue.Queue[bytes | memoryview | tuple[Path, int, int] | None] = queue.Queue(maxsize=2)
        self._result: Future[str] = Future()
        self._thread = threading.Thread(target=self._run, name=f"{algorithm}-stream", daemon=True)
        self._thread.start()

    def update(self, data: bytes | memoryview) -> None:
        """Hash `data` next (it must not change until it is hashed: pass bytes nobody writes to)."""
        if len(data):
            self._put(data)

    def update_from(self, path: Path, start: int, nbytes: int) -> None:
        """Hash `nbytes` of `path` from `start` next (the bytes being copied into the file)."""
        if nbytes:
            self._put((Path(path), start, nbytes))

    def finish(self) -> Future[str]:
        """No more data: the future hex digest."""
        self._put(None)
        return self._result

    def _put(self, item: bytes | memoryview | tuple[Path, int, int] | None) -> None:
        while True:  # a finished (failed) worker takes nothing more: do not block forever
            if self._result.done():
                return
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                if isinstance(item, tuple):
                    _hash_range(self._digest, *item)
                else:
                    self._digest.update(item)
            self._result.set_result(self._digest.hexdigest())
        except BaseException as err:  # handed to whoever waits for the digest
            self._result.set_exception(err)


def _hash_range(digest: Digest, path: Path, start: int, nbytes: int) -> None:
    """Feed `nbytes` of `path` at `start` to `digest` through a memory map (no copy), 64 MB at a time.

    Each window is unmapped once hashed, so the process's resident memory does not grow with the file.
    """
    window = _MAP_WINDOW
    with path.open("rb") as fh:
        end = start + nbytes
        offset = start - start % mmap.ALLOCATIONGRANULARITY
        while offset < end:
            length = min(window, end - offset)
            with mmap.mmap(fh.fileno(), length, access=mmap.ACCESS_READ, offset=offset) as mapped:
                if hasattr(mapped, "madvise"):
                    mapped.madvise(mmap.MADV_SEQUENTIAL)
                view = memoryview(mapped)
                try:
                    digest.update(view[max(0, start - offset):])
                finally:
                    view.release()
            offset += length


# --- files in background threads ---------------------------------------------------------------------------


class FileHasher:
    """Hashes of files in background threads, each file hashed once, started as soon as the file is complete.

    `algorithm` is the hash of the output files; the source's files are always sha256 (`submit_source`),
    through `cache` when given. The streaming edit submits the source's weight files when it starts (the
    threads then read ahead of the editor, warming the page cache) and hands over the `StreamDigest` of every
    output shard (`adopt`), so that hashing overlaps the edit. Use as a context manager; unfinished work is
    cancelled on exit and the cache's new entries are saved.
    """

    def __init__(
        self, workers: int | None = None, *, algorithm: str = "xxh3_128", cache: HashCache | None = None
    ):
        self.algorithm = algorithm
        self._cache = cache
        self._pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1), thread_name_prefix="hash")
        self._jobs: dict[tuple[Path, str], Future[str]] = {}
        self._from_cache: set[Path] = set()

    def submit(self, path: Path, algorithm: str | None = None) -> None:
        """Start hashing `path` (no-op if it was already submitted). The file must not change afterwards."""
        key = (Path(path).resolve(), algorithm or self.algorithm)
        if key not in self._jobs:
            self._jobs[key] = self._pool.submit(file_digest, *key)

    def submit_source(self, path: Path) -> None:
        """Start the sha256 of a source file, taken from the hash cache where it holds."""
        key = (Path(path).resolve(), "sha256")
        if key not in self._jobs:
            self._jobs[key] = self._pool.submit(self._source_sha256, key[0])

    def _source_sha256(self, path: Path) -> str:
        if self._cache is None:
            return sha256_file(path)
        digest, cached = self._cache.sha256(path)
        if cached:
            self._from_cache.add(path)
            read_ahead(path)  # what hashing it did on a cold page cache: the editor finds it read
        return digest

    def stream(self) -> StreamDigest:
        """A digest of the output algorithm to feed as a file is written (then `adopt` it)."""
        return StreamDigest(self.algorithm)

    def adopt(self, path: Path, stream: StreamDigest) -> None:
        """`path` was written exactly as `stream` was fed: its digest is the stream's (the file is not read)."""
        self._jobs[(Path(path).resolve(), stream.algorithm)] = stream.finish()

    def digest(self, path: Path, algorithm: str | None = None) -> str:
        """The file's hex digest (waits for a submitted job, or hashes it now)."""
        self.submit(path, algorithm)
        return self._jobs[(Path(path).resolve(), algorithm or self.algorithm)].result()

    def source_digest(self, path: Path) -> tuple[str, bool]:
        """(sha256 of a source file, whether it came from the hash cache)."""
        self.submit_source(path)
        digest = self._jobs[(Path(path).resolve(), "sha256")].result()
        return digest, Path(path).resolve() in self._from_cache

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._cache is not None:
            self._cache.save()

    def __enter__(self) -> FileHasher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def hash_files(
    folder: Path, names: Sequence[str], hasher: FileHasher, algorithm: str | None = None
) -> dict[str, dict[str, Any]]:
    """{relative name: {ALGORITHM: hex digest, "bytes": size}} for files under `folder`, by `hasher`'s threads.

    `algorithm` defaults to the hasher's (the output's). Files it already hashed (or is hashing) are not read
    again.
    """
    algorithm = algorithm or hasher.algorithm
    paths = [Path(folder) / name for name in names]
    for path in paths:
        hasher.submit(path, algorithm)
    digests = [hasher.digest(path, algorithm) for path in paths]
    return {
        name: {algorithm: digest, "bytes": path.stat().st_size}
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
