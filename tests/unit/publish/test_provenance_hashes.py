"""provenance.json's hashes: output files hashed as written (xxh3_128 or sha256), the source's sha256 taken
from the hash cache on a second edit, and `verify` with either algorithm and with old (sha256-only) records.

References are independent of the code under test: `hashlib.sha256` and `xxhash.xxh3_128` of the bytes on disk.
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
from helpers import run
from tiny_models import build, save_tokenizer

import abliterate.storage.hashing as hashing
from abliterate.direction.vector import Direction
from abliterate.edit.formats import OutputOptions
from abliterate.errors import VerifyError
from abliterate.publish.provenance import provenance_path, read_provenance
from abliterate.publish.verify import verify
from abliterate.publish.write_edited import write_edited

REFERENCE = {"sha256": lambda data: hashlib.sha256(data).hexdigest(),
             "xxh3_128": lambda data: xxhash.xxh3_128(data).hexdigest()}


def _direction(path: Path) -> Direction:
    Direction(torch.randn(32, generator=torch.Generator().manual_seed(5)), layer=1, pos=-1, lang="en").save(path)
    return Direction.load(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bf16 llama in several shards whose files were last written an hour ago (as a downloaded model's)."""
    folder = tmp_path_factory.mktemp("src") / "llama"
    build("llama", folder, dtype=torch.bfloat16)
    save_tokenizer(folder)
    old = time.time_ns() - 3600 * 10**9
    for path in folder.iterdir():
        os.utime(path, ns=(old, old))
    return folder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every file that hashing reads from then on (sha256 of a source file, or any file digest)."""
    read: list[Path] = []
    real_sha, real_digest = hashing.sha256_file, hashing.file_digest
    monkeypatch.setattr(hashing, "sha256_file", lambda p: read.append(Path(p).resolve()) or real_sha(p))
    monkeypatch.setattr(hashing, "file_digest",
                        lambda p, a="sha256": read.append(Path(p).resolve()) or real_digest(p, a))
    return read


def test_a_second_edit_takes_the_source_sha256_from_the_hash_cache(
    source: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    direction = _direction(tmp_path / "r.safetensors")
    write_edited(tmp_path / "first", source, direction, OutputOptions(max_shard_size=40_000))
    first = read_provenance(tmp_path / "first").source.files
    assert all(entry.from_ is None for entry in first.values())
    assert (cache / hashing.HASH_CACHE_FILE).is_file()
    read = _hashed(monkeypatch)
    write_edited(tmp_path / "second", source, direction, OutputOptions(max_shard_size=40_000))
    second = read_provenance(tmp_path / "second").source.files
    assert set(second) == set(first) and len(second) > 2
    for name, entry in second.items():
        assert entry.from_ == "hash cache" and entry.sha256 == REFERENCE["sha256"]((source / name).read_bytes())
    assert not [p for p in read if p.parent == source.resolve()]  # no source file was read to hash it
    # A touched shard is hashed again; the others still come from the cache.
    touched = sorted(source.glob("*.safetensors"))[0]
    os.utime(touched)
    try:
        write_edited(tmp_path / "third", source, direction, OutputOptions(max_shard_size=40_000))
    finally:
        old = time.time_ns() - 3600 * 10**9
        os.utime(touched, ns=(old, old))
    third = read_provenance(tmp_path / "third").source.files
    assert third[touched.name].from_ is None and touched.resolve() in read
    assert all(entry.from_ == "hash cache" for name, entry in third.items() if name != touched.name)


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_output_hashes_are_those_of_the_written_files_without_reading_the_shards(
    source: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    read = _hashed(monkeypatch)
    out = tmp_path / "out"
    write_edited(out, source, _direction(tmp_path / "r.safetensors"),
                 OutputOptions(max_shard_size=20_000, output_hash=algorithm))  # type: ignore[arg-type]
    files = read_provenance(out).to_data()["output"]["files"]
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(shards) <= set(files)
    other = "sha256" if algorithm == "xxh3_128" else "xxh3_128"
    for name, entry in files.items():
        data = (out / name).read_bytes()
        assert entry[algorithm] == REFERENCE[algorithm](data) and entry["bytes"] == len(data) and other not in entry
    written = {p.name for p in read if p.name.startswith("model-") and p.parent.name.startswith(".abliterate-tmp")}
    assert not written, f"output shards read back to hash them: {written}"
    verify(out)


def test_verify_checks_the_recorded_algorithm_and_reads_old_sha256_records(
    source: Path, cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    write_edited(out, source, _direction(tmp_path / "r.safetensors"), OutputOptions(max_shard_size=40_000))
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10  # a flipped bit in the last tensor's data: only a hash can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=rf"{shard.name} differs .*xxh3_128"):
        verify(out)
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    # The record as versions before --output-hash wrote it: sha256 only.
    path = provenance_path(out)
    record = json.loads(path.read_text())
    for name, entry in record["output"]["files"].items():
        del entry["xxh3_128"]
        entry["sha256"] = REFERENCE["sha256"]((out / name).read_bytes())
    path.write_text(json.dumps(record))
    verify(out)
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=rf"{shard.name} differs .*sha256"):
        verify(out)


def test_apply_cli_output_hash_option(source: Path, tmp_path: Path) -> None:
    _direction(tmp_path / "r.safetensors")
    done = run("apply", source, "--direction", tmp_path / "r.safetensors", "--out", tmp_path / "out",
               "--output-hash", "sha256", env={"ABLITERATE_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    files = read_provenance(tmp_path / "out").to_data()["output"]["files"]
    assert all(set(entry) == {"sha256", "bytes"} for entry in files.values())
    assert run("apply", source, "--direction", tmp_path / "r.safetensors", "--out", tmp_path / "o2",
               "--output-hash", "md5").returncode != 0
