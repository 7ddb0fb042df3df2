"""Reading a checkpoint folder on disk without loading it: which files, which tensors, where their bytes are.

A `Checkpoint` indexes every tensor of a model folder (sharded or single-file safetensors, or — only when the
user allows it — pickle `.bin` files) from the file headers alone, validates the index against the files, and
hands out one tensor at a time. Nothing here holds more than one tensor in memory.

A quantized checkpoint (FP8 block scales, MXFP4) is indexed with the quantized modules that write to the
residual stream replaced by *derived* bfloat16 tensors, computed when read (`model.quantized`).
"""

from __future__ import annotations

import json
import logging
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from abliterate.errors import CheckpointError, ModelError
from abliterate.model.quantized import dequantize_writers, read_folder_config
from abliterate.storage.shards import SAFETENSORS_INDEX, tensor_buffer
from abliterate.storage.tensors import DTYPE_CODES, DTYPES, TensorInfo

log = logging.getLogger(__name__)

PICKLE_INDEX = "pytorch_model.bin.index.json"


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors file's header: tensor infos with absolute offsets, and the `__metadata__` dict."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read safetensors file {path}: {err}",
            hint="the file is corrupt or truncated; download it again",
        ) from None
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if base + end > size:
            raise CheckpointError(
                f"safetensors file {path} is truncated: tensor {name!r} ends at byte {base + end}, the file has {size}",
                hint="download the shard again",
            )
        infos[name] = TensorInfo(name, path, entry["dtype"], tuple(entry["shape"]), base + begin, base + end)
    return infos, metadata


def _safe_member(folder: Path, filename: str, index_path: Path) -> Path:
    """Resolve a file named by an index, refusing names that escape the model folder or cannot be file names."""
    if not isinstance(filename, str) or not filename or "\x00" in filename:
        raise CheckpointError(
            f"{index_path.name} names the shard {filename!r}, which is not a valid file name",
            hint="the index file is corrupt; download it again",
        )
    # Checked on the name, not the resolved path: a hub cache snapshot links every file to ../../blobs/.
    candidate = folder / filename
    if Path(filename).is_absolute() or ".." in Path(filename).parts:
        raise CheckpointError(
            f"{index_path.name} names {filename!r}, which is outside the model folder",
            hint="the index file is malformed or malicious; use the checkpoint's original index",
        )
    if not candidate.is_file():
        raise CheckpointError(
            f"{index_path.name} names the shard {filename!r}, which is missing from {folder}",
            hint="download the complete checkpoint",
        )
    return candidate


def _files_from_index(folder: Path, index_path: Path) -> tuple[list[Path], dict[str, Path]]:
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"cannot read {index_path}: {err!r}", hint="the index file is corrupt; download it again"
        ) from None
    by_name = {name: _safe_member(folder, fname, index_path) for name, fname in weight_map.items()}
    files = sorted(set(by_name.values()))
    return files, by_name


class Checkpoint:
    """Every tensor of a model folder, indexed from file headers. Open with `Checkpoint.open(folder)`."""

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo], metadata: dict[str, str], pickle: bool):
        self.folder = folder
        self.tensors = tensors
        self.metadata = metadata
        self.is_pickle = pickle
        self.derived: dict[str, Callable[[], torch.Tensor]] = {}  # name -> float32 values (dequantized)
        self.unquantized: list[str] = []  # modules whose quantized tensors were replaced by derived ones

    @classmethod
    def open(cls, folder: Path, *, allow_pickle: bool = False) -> Checkpoint:
        """Index a model folder. Pickle `.bin` checkpoints need `allow_pickle` (they can run code on load).

        The residual writers of an FP8 or MXFP4 checkpoint are indexed dequantized (see the module docstring).
        """
        checkpoint = cls._open(Path(folder), allow_pickle=allow_pickle)
        dequantized = dequantize_writers(checkpoint, read_folder_config(Path(folder)))
        if dequantized is not None:
            checkpoint.unquantized = dequantized.modules
        return checkpoint

    @classmethod
    def _open(cls, folder: Path, *, allow_pickle: bool) -> Checkpoint:
        index = folder / SAFETENSORS_INDEX
        if index.is_file():
            files, by_name = _files_from_index(folder, index)
            return cls._from_safetensors(folder, files, expected=by_name)
        single = folder / "model.safetensors"
        if single.is_file():
            return cls._from_safetensors(folder, [single], expected=None)
        others = sorted(folder.glob("*.safetensors"))
        if others:
            return cls._from_safetensors(folder, others, expected=None)
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if bins:
            if not allow_pickle:
                raise CheckpointError(
                    f"{folder} holds only pickle weights ({bins[0].name}), which can run arbitrary code when loaded",
                    hint="pass --allow-pickle if you trust the source, or convert it to safetensors first",
                )
            log.warning("loading pickle weights from %s (weights_only=True)", folder)
            return cls._from_pickle(folder, bins)
        raise CheckpointError(
            f"no model weights (*.safetensors) found in {folder}",
            hint="point at a folder with safetensors shards, a .gguf file, or a Hugging Face model id",
        )

    @classmethod
    def _from_safetensors(cls, folder: Path, files: list[Path], expected: dict[str, Path] | None) -> Checkpoint:
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        for path in files:
            infos, meta = read_safetensors_header(path)
            metadata.update(meta)
            for name, info in infos.items():
                if name in tensors:
                    raise CheckpointError(
                        f"tensor {name!r} appears in both {tensors[name].file.name} and {path.name}",
                        hint="the checkpoint is inconsistent; download it again",
                    )
                tensors[name] = info
        if expected is not None:
            for name, path in expected.items():
                found = tensors.get(name)
                if found is None or found.file != path:
                    raise CheckpointError(
                        f"the index says tensor {name!r} is in {path.name}, but that shard does not hold it",
                        hint="the index and the shards disagree; download the checkpoint again",
                    )
        return cls(folder, tensors, metadata, pickle=False)

    @classmethod
    def _from_pickle(cls, folder: Path, files: list[Path]) -> Checkpoint:
        tensors: dict[str, TensorInfo] = {}
        for path in files:
            state = _load_pickle(path)
            for name, value in state.items():
                dtype = DTYPE_CODES[value.dtype]
                tensors[name] = TensorInfo(name, path, dtype, tuple(value.shape), 0, value.nbytes)
            del state
        return cls(folder, tensors, {"format": "pt"}, pickle=True)

    def names(self) -> list[str]:
        """Tensor names in storage order (file, then offset), so that output follows input."""
        return sorted(self.tensors, key=lambda n: (self.tensors[n].file, self.tensors[n].start))

    def files(self) -> list[Path]:
        """The weight files, in storage order."""
        return sorted({info.file for info in self.tensors.values()})

    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (CPU); a derived (dequantized) tensor comes in float32."""
        if name in self.derived:
            return self.derived[name]()
        info = self.tensors[name]
        if self.is_pickle:
            return _load_pickle(info.file)[name]
        with safe_open(str(info.file), framework="pt") as fh:
            tensor: torch.Tensor = fh.get_tensor(name)
            return tensor

    def view(self, name: str) -> torch.Tensor:
        """A read-only tensor over the stored bytes, memory-mapped (no copy); do not modify it."""
        info = self.tensors[name]
        if self.is_pickle or info.nbytes == 0 or name in self.derived:
            return self.get(name)
        raw = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(info.nbytes,))
        with warnings.catch_warnings():  # torch warns that the array is read-only: the edit never writes to it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(raw)
        return flat.view(DTYPES[info.dtype]).reshape(info.shape)

    def iter_raw(self, name: str, chunk: int = 64 << 20) -> Iterator[bytes]:
        """Yield a tensor's stored bytes unchanged, in chunks (safetensors sources only)."""
        info = self.tensors[name]
        if self.is_pickle or name in self.derived:
            yield bytes(tensor_buffer(self.get(name).to(DTYPES[info.dtype])))
            return
        with info.file.open("rb") as fh:
            fh.seek(info.start)
            left = info.nbytes
            while left:
                data = fh.read(min(chunk, left))
                if not data:
                    raise CheckpointError(f"{info.file} ended early while reading {name!r}", hint="re-download it")
                left -= len(data)
                yield data


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for corrupt pickles
        raise CheckpointError(f"cannot load {path}: {err}", hint="the file is corrupt; download it again") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict", hint="use a transformers checkpoint")
    return state


def read_config(folder: Path) -> dict[str, object]:
    """A model folder's config.json; a ModelError with a hint if it is missing, unreadable or not a model's."""
    path = folder / "config.json"
    try:
        config: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} is missing", hint="point at a complete transformers model folder") from None
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {path}: {err}", hint="the config is corrupt; download it again") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f"{path} has no model_type", hint="point at a transformers model folder")
    return config
