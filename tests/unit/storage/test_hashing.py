"""storage/hashing.py directly: file digests, digests of files as they are written, and the hash cache.

References do not share the code under test: every digest is checked against `hashlib.sha256` or
`xxhash.xxh3_128` of the bytes actually on disk (read here with `Path.read_bytes`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
import xxhash

import abliterate.storage.hashing as hashing
from abliterate.storage.hashing import FileHasher, HashCache, StreamDigest, file_digest
from abliterate.storage.shards import ShardPlan, ShardWriter, TensorSpec, tensor_buffer

REFERENCE = {"sha256": lambda data: hashlib.sha256(data).hexdigest(),
             "xxh3_128": lambda data: xxhash.xxh3_128(data).hexdigest()}
HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


def _old_file(path: Path, data: bytes) -> Path:
    """A file written an hour ago, as a downloaded model's files are (recent ones are never cached)."""
    path.write_bytes(data)
    os.utime(path, ns=(HOUR_AGO_NS, HOUR_AGO_NS))
    return path


@pytest.mark.parametrize("algorithm", ["sha256", "xxh3_128"])
def test_file_digest_matches_the_reference(tmp_path: Path, algorithm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashing, "_HASH_CHUNK", 1000)  # several chunks and a short last one
    data = os.urandom(4321)
    assert file_digest(_old_file(tmp_path / "f", data), algorithm) == REFERENCE[algorithm](data)


@pytest.mark.parametrize("algorithm", ["sha256", "xxh3_128"])
def test_stream_digest_of_written_bytes_and_copied_ranges(
    tmp_path: Path, algorithm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks fed as they are and ranges of another file (unaligned, over several map windows) hash in order."""
    monkeypatch.setattr(hashing, "_MAP_WINDOW", 8192)
    source = (tmp_path / "source").resolve()
    source.write_bytes(os.urandom(50_000))
    raw = source.read_bytes()
    stream = StreamDigest(algorithm)
    stream.update(b"header")
    stream.update_from(source, 5, 30_001)  # starts inside the first page, ends inside the fourth window
    stream.update(memoryview(b"between"))
    stream.update_from(source, 12_288, 4096)  # exactly one aligned page
    stream.update_from(source, 49_999, 1)
    stream.update(b"")
    expected = b"header" + raw[5:30_006] + b"between" + raw[12_288:16_384] + raw[49_999:]
    assert stream.finish().result(timeout=30) == REFERENCE[algorithm](expected)


@pytest.mark.parametrize("algorithm", ["sha256", "xxh3_128"])
def test_shard_writer_digest_equals_the_hash_of_the_written_file(tmp_path: Path, algorithm: str) -> None:
    """A shard written from chunks and kernel copies: its stream digest is the digest of the file on disk."""
    a = torch.randn(64, 33).to(torch.bfloat16)
    b = torch.randn(1000)
    payload = bytes(tensor_buffer(b))
    source = tmp_path / "source.bin"
    source.write_bytes(b"junk" * 3 + payload + b"tail")
    plan = ShardPlan("model-00001-of-00001.safetensors", [
        TensorSpec("a", "BF16", (64, 33), a.numel() * 2), TensorSpec("b", "F32", (1000,), len(payload))])
    stream = StreamDigest(algorithm)
    with ShardWriter(tmp_path, plan, {"format": "pt"}, stream) as writer:
        buffer = tensor_buffer(a)
        writer.write("a", buffer[:1000])
        writer.write("a", buffer[1000:])
        writer.copy_from("b", source, 12, len(payload))
    written = (tmp_path / plan.filename).read_bytes()
    assert stream.finish().result(timeout=30) == REFERENCE[algorithm](written)


def test_an_aborted_shard_ends_its_digest_thread(tmp_path: Path) -> None:
    plan = ShardPlan("x.safetensors", [TensorSpec("a", "F32", (4,), 16)])
    stream = StreamDigest("sha256")
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, plan, {}, stream):
        raise RuntimeError("stop")
    stream._thread.join(timeout=10)
    assert not stream._thread.is_alive()


# --- the hash cache ----------------------------------------------------------------------------------------


def test_hash_cache_skips_an_unchanged_file_in_a_new_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _old_file(tmp_path / "w.safetensors", os.urandom(3000))
    cache_file = tmp_path / "cache" / "file-hashes.json"
    digest, cached = HashCache(cache_file).sha256(path)
    assert (digest, cached) == (REFERENCE["sha256"](path.read_bytes()), False)
    first = HashCache(cache_file)
    first.sha256(path)
    first.save()
    assert json.loads(cache_file.read_text())["files"][str(path.resolve())]["sha256"] == digest
    read: list[Path] = []
    monkeypatch.setattr(hashing, "sha256_file", lambda p: read.append(p) or "0" * 64)
    assert HashCache(cache_file).sha256(tmp_path / "." / "w.safetensors") == (digest, True)  # any spelling
    assert read == []


@pytest.mark.parametrize("change", ["touch", "same size and mtime, rewritten", "replaced by a copy", "grown"])
def test_hash_cache_entry_is_invalidated_when_the_file_changes(tmp_path: Path, change: str) -> None:
    path = _old_file(tmp_path / "w.safetensors", b"a" * 3000)
    cache_file = tmp_path / "hashes.json"
    cache = HashCache(cache_file)
    cache.sha256(path)
    cache.save()
    if change == "touch":
        os.utime(path)
    elif change == "same size and mtime, rewritten":  # only the change time (and the bytes) tell
        with path.open("r+b") as fh:
            fh.write(b"b")
        os.utime(path, ns=(HOUR_AGO_NS, HOUR_AGO_NS))
    elif change == "replaced by a copy":  # a new inode with the old bytes and times
        copy = tmp_path / "copy"
        copy.write_bytes(path.read_bytes())
        os.utime(copy, ns=(HOUR_AGO_NS, HOUR_AGO_NS))
        os.replace(copy, path)
    else:
        with path.open("ab") as fh:
            fh.write(b"more")
        os.utime(path, ns=(HOUR_AGO_NS, HOUR_AGO_NS))
    digest, cached = HashCache(cache_file).sha256(path)
    assert not cached and digest == REFERENCE["sha256"](path.read_bytes())


def test_hash_cache_does_not_enter_a_file_modified_just_now(tmp_path: Path) -> None:
    path = tmp_path / "fresh"
    path.write_bytes(b"x" * 100)
    cache = HashCache(tmp_path / "hashes.json")
    cache.sha256(path)
    cache.save()
    assert HashCache(tmp_path / "hashes.json").sha256(path)[1] is False


@pytest.mark.parametrize("damage", ["not json", "[1, 2]", '{"version": 1, "files": {"x": 3}}', "missing"])
def test_a_damaged_or_missing_hash_cache_is_rehashed_and_rewritten(tmp_path: Path, damage: str) -> None:
    path = _old_file(tmp_path / "w", os.urandom(100))
    cache_file = tmp_path / "sub" / "hashes.json"
    if damage != "missing":
        cache_file.parent.mkdir()
        cache_file.write_text(damage)
    cache = HashCache(cache_file)
    assert cache.sha256(path) == (REFERENCE["sha256"](path.read_bytes()), False)
    cache.save()
    assert HashCache(cache_file).sha256(path) == (REFERENCE["sha256"](path.read_bytes()), True)


def test_a_cache_entry_with_a_wrong_digest_shape_is_ignored(tmp_path: Path) -> None:
    path = _old_file(tmp_path / "w", os.urandom(100))
    cache_file = tmp_path / "hashes.json"
    cache = HashCache(cache_file)
    cache.sha256(path)
    cache.save()
    data = json.loads(cache_file.read_text())
    data["files"][str(path.resolve())]["sha256"] = "not a digest"
    cache_file.write_text(json.dumps(data))
    assert HashCache(cache_file).sha256(path) == (REFERENCE["sha256"](path.read_bytes()), False)


def test_file_hasher_takes_source_hashes_from_the_cache_and_saves_new_ones(tmp_path: Path) -> None:
    paths = [_old_file(tmp_path / f"w{i}", os.urandom(500 + i)) for i in range(3)]
    cache_file = tmp_path / "hashes.json"
    with FileHasher(cache=HashCache(cache_file)) as hasher:
        first = [hasher.source_digest(p) for p in paths]
    with FileHasher(cache=HashCache(cache_file)) as hasher:
        second = [hasher.source_digest(p) for p in paths]
        xxh = hasher.digest(paths[0])  # the output algorithm: never from the cache
    assert [d for d, _ in first] == [d for d, _ in second] == [REFERENCE["sha256"](p.read_bytes()) for p in paths]
    assert [c for _, c in first] == [False] * 3 and [c for _, c in second] == [True] * 3
    assert xxh == REFERENCE["xxh3_128"](paths[0].read_bytes())
