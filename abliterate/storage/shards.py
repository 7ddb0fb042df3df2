"""Writing safetensors shards as a stream: the header is known before any data, so tensors go to disk one by one.

`plan_shards` splits a list of tensor specs into shards under a size limit with the standard names
(`model-0000i-of-0000N.safetensors`), `ShardWriter` writes one shard tensor by tensor, and `write_index`
writes `model.safetensors.index.json`. The files are read back by the `safetensors` library like any other.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import torch

from abliterate.errors import CheckpointError, UsageError
from abliterate.storage.atomic import write_json
from abliterate.storage.hashing import StreamDigest

SAFETENSORS_INDEX = "model.safetensors.index.json"

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """Parse a size like `5GB`, `500MB`, `2GiB` or a plain byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if match is None or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"cannot read the size {text!r}", hint="write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class TensorSpec:
    """What the header needs to know about a tensor before its bytes are written."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class ShardPlan:
    """One output file and the tensors it will hold, in order."""

    filename: str
    tensors: list[TensorSpec] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(specs: Iterable[TensorSpec], max_shard_size: int) -> list[ShardPlan]:
    """Greedily pack tensors (in the given order) into shards of at most `max_shard_size` bytes.

    A tensor larger than the limit gets a shard of its own, as transformers does.
    """
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    total = len(groups)
    return [ShardPlan(f"model-{i + 1:05d}-of-{total:05d}.safetensors", group) for i, group in enumerate(groups)]


def _header(plan: ShardPlan, metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in plan.tensors:
        entries[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Write one planned shard: call `write(name, chunk)` for each tensor's bytes, in plan order.

    With `digest`, every byte written is also fed to it in file order (the header and written chunks as they
    are, copied ranges from their source file), so the shard's hash needs no read of the shard.
    """

    def __init__(self, folder: Path, plan: ShardPlan, metadata: dict[str, str], digest: StreamDigest | None = None):
        self.path = folder / plan.filename
        self.digest = digest
        self._plan = plan
        self._index = 0
        self._written = 0
        self._fh = self.path.open("wb")
        header = _header(plan, metadata)
        self._fh.write(header)
        if digest is not None:
            digest.update(header)

    def _expect(self, name: str) -> TensorSpec:
        spec = self._plan.tensors[self._index]
        if spec.name != name:
            raise CheckpointError(f"internal error: expected tensor {spec.name!r}, got {name!r}")
        return spec

    def write(self, name: str, data: bytes | memoryview) -> None:
        """Append bytes of tensor `name`; a tensor may arrive in several chunks."""
        self._expect(name)
        self._fh.write(data)
        if self.digest is not None:
            self.digest.update(data)
        self._advance(name, len(data))

    def copy_from(self, name: str, source: Path, start: int, nbytes: int) -> None:
        """Append tensor `name` by copying `nbytes` from `source` at `start`, in the kernel where possible."""
        self._expect(name)
        self._fh.flush()
        if self.digest is not None:
            self.digest.update_from(source, start, nbytes)
        with source.open("rb") as src:
            offset, left = start, nbytes
            while left:
                try:
                    done = os.copy_file_range(src.fileno(), self._fh.fileno(), left, offset)
                except OSError:  # another filesystem or an old kernel: plain reads
                    src.seek(offset)
                    done = len(data := src.read(min(left, 64 << 20)))
                    self._fh.write(data)
                    self._fh.flush()
                if done == 0:
                    raise CheckpointError(f"{source} ended early while copying {name!r}", hint="re-download it")
                offset += done
                left -= done
        self._advance(name, nbytes)

    def _advance(self, name: str, count: int) -> None:
        spec = self._plan.tensors[self._index]
        self._written += count
        if self._written > spec.nbytes:
            raise CheckpointError(f"internal error: tensor {name!r} got more bytes than its header says")
        if self._written == spec.nbytes:
            self._index += 1
            self._written = 0

    def close(self) -> None:
        """Flush to disk; fails if some tensor was not written completely."""
        if self._index != len(self._plan.tensors):
            self.abort()
            raise CheckpointError(f"internal error: {self.path.name} was closed before all its tensors were written")
        self._fh.flush()
        self._fh.close()

    def abort(self) -> None:
        """Close the file unfinished (after an error); the digest's thread ends too."""
        self._fh.close()
        if self.digest is not None:
            self.digest.finish()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_index(folder: Path, plans: list[ShardPlan]) -> Path:
    """Write `model.safetensors.index.json` naming the shard of every tensor."""
    weight_map = {spec.name: plan.filename for plan in plans for spec in plan.tensors}
    index = {"metadata": {"total_size": sum(p.nbytes for p in plans)}, "weight_map": weight_map}
    path = folder / SAFETENSORS_INDEX
    return write_json(path, index)


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """A zero-copy view of a CPU tensor's little-endian bytes, as safetensors stores them."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")  # type: ignore[arg-type]
