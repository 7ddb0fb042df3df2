"""GGUF in, GGUF out: the edit written into a copy of the source `.gguf` file (`--format gguf`).

Which tensors change, and against which vector, is decided exactly as for a safetensors output:
`edit.stream.plan_edit` on the dequantized checkpoint that `model.loading.convert_gguf` made from the same file
(its Hugging Face names are mapped to GGUF names with gguf's `TensorNameMap`; per-expert matrices map to the
stacked `ffn_down_exps` tensor), and the math is `edit.projection.project_out` with `direction_for`'s vector
and the plan's per-layer weight. Everything else about the file stays: every metadata key (tokenizer, chat
template, ...) is copied, keys under `abliterate.` record the edit, and every untouched tensor is copied byte
for byte in its original quantization.

An edited tensor is dequantized, edited in float32 and quantized again, by default to Q8_0
(`--gguf-edited-type`): re-quantizing into a 4-bit type puts back a good part of the removed component
(docs/usage.md has the measured shares). `--gguf-reproject N` runs N rounds of W <- W + (P Q(W) - Q(W)),
with P the projection and Q quantize-dequantize, which pushes the quantization error's r-component back out
before the final quantization. The share of r left (|u^T Q(W')| over |u^T W| summed over the edited tensors)
is measured on the written values and reported.

Tied embeddings: as for safetensors, the original token embedding is written as an explicit `output.weight`
(its bytes unchanged), so that llama.cpp and transformers unembed with the unedited matrix.

The file is written tensor by tensor (one dequantized tensor in memory at a time) into the temporary folder
of `storage.atomic.atomic_output` (opened by `publish.write_edited`), so `--out` appears only when complete.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from abliterate import __version__, progress
from abliterate.direction.vector import DIRECTION_FILE, Direction
from abliterate.edit.projection import project_out, projected_blocks
from abliterate.edit.stream import EditPlan, direction_for, plan_edit
from abliterate.errors import CheckpointError, UsageError
from abliterate.model.archs import Component
from abliterate.model.checkpoint import Checkpoint
from abliterate.model.loading import ModelSource
from abliterate.storage.atomic import ensure_free_space

log = logging.getLogger(__name__)

TOKEN_EMBD = "token_embd.weight"
OUTPUT_HEAD = "output.weight"
META_PREFIX = "abliterate."
# --gguf-edited-type choices -> GGML type names (None: the tensor's own type)
EDITED_TYPES: dict[str, str | None] = {
    "source": None, "f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q5_1": "Q5_1", "q5_0": "Q5_0",
    "q4_1": "Q4_1", "q4_0": "Q4_0", "mxfp4": "MXFP4",
}
QUANTIZABLE = frozenset(t for t in EDITED_TYPES.values() if t is not None)  # what the gguf package can write
_EXPERT = re.compile(r"\.experts\.\d+\.")
_WRITER_LIKE = re.compile(r"^(token_embd\.weight|blk\.\d+\.(attn_output|ffn_down(_exps|_shexp)?)\.(weight|bias))$")
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class GgufOptions:
    """How edited tensors are stored: their type (a key of EDITED_TYPES) and rounds of re-projection."""

    edited_type: str = "q8_0"
    reproject: int = 0


@dataclass(frozen=True)
class Target:
    """One GGUF tensor the edit changes, with the checkpoint tensors it holds (several for stacked experts)."""

    name: str
    component: Component
    layer: int
    hf_names: tuple[str, ...]


@dataclass(frozen=True)
class EditedTensor:
    """What happened to one edited tensor: its types and the squared r-components before and after."""

    name: str
    source_type: str
    out_type: str
    before: float  # |u^T W|^2 of the source tensor (dequantized)
    after: float  # |u^T W'|^2 of the written tensor (dequantized)
    norm: float  # |W|^2 of the source tensor

    def row(self) -> dict[str, Any]:
        leak = (self.after / self.norm) ** 0.5 if self.norm else 0.0
        return {"name": self.name, "source_type": self.source_type, "type": self.out_type, "leak": float(f"{leak:.3g}")}


@dataclass
class GgufResult:
    """The written file and what the edit did to it."""

    path: Path
    plan: EditPlan
    options: GgufOptions
    edited: list[EditedTensor] = field(default_factory=list)
    types: Counter[str] = field(default_factory=Counter)  # every output tensor's type
    output_head_added: bool = False
    tied_unembedding_edited: bool = False  # tied source, and the architecture's GGUF layout has no output head

    @property
    def residual_share(self) -> float:
        """|u^T W'| / |u^T W| over all edited tensors: the share of the r-component the written file keeps."""
        before = sum(t.before for t in self.edited)
        return (sum(t.after for t in self.edited) / before) ** 0.5 if before > 0 else 0.0

    def edited_types(self) -> Counter[str]:
        return Counter(t.out_type for t in self.edited)

    def summary(self) -> str:
        edited = ", ".join(f"{n} {t}" for t, n in sorted(self.edited_types().items()))
        everything = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items()))
        rounds = f", {self.options.reproject} re-projection rounds" if self.options.reproject else ""
        tied = "; the unembedding stays tied to the edited embedding" if self.tied_unembedding_edited else ""
        return (f"GGUF `{self.path.name}`: edited tensors {edited}{rounds} (share of r left "
                f"{self.residual_share:.4f}); all tensors {everything}{tied}")

    def record(self) -> dict[str, Any]:
        """The `format` section of provenance.json."""
        return {
            "kind": "gguf",
            "file": self.path.name,
            "edited_type": self.options.edited_type,
            "reproject": self.options.reproject,
            "residual_share": float(f"{self.residual_share:.4g}"),
            "output_head_added": self.output_head_added,
            "tied_unembedding_edited": self.tied_unembedding_edited,
            "types": dict(sorted(self.types.items())),
            "edited": [t.row() for t in self.edited],
            "summary": self.summary(),
        }


def output_name(gguf_file: Path) -> str:
    """`<name>-abliterated.gguf` for the source file `<name>.gguf`."""
    return f"{Path(gguf_file).stem}-abliterated.gguf"


def open_reader(path: Path) -> Any:
    """A GGUFReader over `path` (memory-mapped, read-only); unreadable files are one CheckpointError."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read GGUF file {path}: {err}",
                              hint="check that it is a complete GGUF file") from None
    if reader.byte_order != "I":
        raise CheckpointError(f"{path} is a big-endian GGUF", hint="use a little-endian GGUF file")
    return reader


def check_options(source: Path | None, options: GgufOptions) -> None:
    """Before any work: a .gguf source, and edited tensors the gguf package can write (header read only)."""
    if source is None:
        raise UsageError(
            "--format gguf needs a .gguf MODEL",
            hint="pass the .gguf file as MODEL, or use --format safetensors (convert with llama.cpp afterwards)",
        )
    if options.edited_type not in EDITED_TYPES:
        raise UsageError(f"unknown --gguf-edited-type {options.edited_type!r}",
                         hint=f"use one of {', '.join(EDITED_TYPES)}")
    if options.edited_type != "source":
        return
    reader = open_reader(source)
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if _WRITER_LIKE.match(tensor.name) and len(tensor.shape) > 1 and kind not in QUANTIZABLE:
            raise UsageError(
                f"--gguf-edited-type source: {tensor.name} is {kind}, which the gguf package cannot write",
                hint="use --gguf-edited-type q8_0 (or another of " + ", ".join(sorted(QUANTIZABLE)) + ")",
            )


# --- which tensors -------------------------------------------------------------------------------------


def _arch(reader: Any) -> tuple[str, Any]:
    import gguf

    name = str(reader.fields["general.architecture"].contents())
    by_name = {value: key for key, value in gguf.MODEL_ARCH_NAMES.items()}
    if name not in by_name:
        raise CheckpointError(f"GGUF architecture {name!r} is unknown to the gguf package", hint="update gguf")
    return name, by_name[name]


def gguf_targets(plan: EditPlan, reader: Any) -> dict[str, Target]:
    """GGUF name -> the edit of that tensor, from the plan's checkpoint names through gguf's TensorNameMap."""
    import gguf

    arch_name, arch = _arch(reader)
    block_count = reader.fields.get(f"{arch_name}.block_count")
    names = gguf.get_tensor_name_map(arch, int(block_count.contents()) if block_count is not None else 512)
    found: dict[str, list[tuple[str, Component, int]]] = {}
    for hf_name, (component, layer) in sorted(plan.edits.items()):
        target = names.get_name(_EXPERT.sub(".experts.", hf_name), try_suffixes=(".weight", ".bias"))
        if target is None:
            raise CheckpointError(f"no GGUF name for {hf_name!r} ({arch_name})",
                                  hint="this family's GGUF layout is not supported")
        found.setdefault(target, []).append((hf_name, component, layer))
    present = {tensor.name for tensor in reader.tensors}
    targets: dict[str, Target] = {}
    for target, entries in found.items():
        if target not in present:
            raise CheckpointError(f"the GGUF file has no tensor {target!r} (for {entries[0][0]})",
                                  hint="the GGUF file and its converted checkpoint disagree")
        _, component, layer = entries[0]
        targets[target] = Target(target, component, layer, tuple(name for name, _, _ in entries))
    missed = sorted(name for name in present if _WRITER_LIKE.match(name) and name not in targets)
    if missed:  # e.g. a checkpoint naming its experts in a way the registry does not list
        raise CheckpointError(
            f"GGUF tensor {missed[0]} writes to the residual stream, but the edit planned on the converted "
            f"checkpoint does not cover it ({len(missed)} such tensors)",
            hint=f"the registry entry of {arch_name} misses this checkpoint's names; see docs/architectures.md",
        )
    return targets


def _check_shape(tensor: Any, target: Target, checkpoint: Checkpoint) -> tuple[int, ...]:
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    expected = checkpoint.tensors[target.hf_names[0]].shape
    if len(target.hf_names) > 1:
        expected = (len(target.hf_names), *expected)
    if shape != tuple(expected):
        raise CheckpointError(
            f"GGUF tensor {target.name!r} has shape {list(shape)}, its checkpoint tensors {list(expected)}",
            hint="the GGUF file and its converted checkpoint disagree; delete the converted copy in the cache",
        )
    return shape


# --- the math on one tensor ----------------------------------------------------------------------------


def dequantized(tensor: Any) -> torch.Tensor:
    """A GGUF tensor as a writable float32 torch tensor of its element shape."""
    from gguf.quants import dequantize

    array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    return torch.from_numpy(array.copy() if not array.flags.writeable else array)


def quantized(values: torch.Tensor, type_name: str) -> np.ndarray:
    """`values` (float32) in GGML type `type_name`, as the raw bytes of the file."""
    import gguf

    data = gguf.quants.quantize(values.numpy(), gguf.GGMLQuantizationType[type_name])
    return np.ascontiguousarray(data).view(np.uint8).reshape(-1)


def roundtrip(values: torch.Tensor, type_name: str) -> torch.Tensor:
    """Q(values): quantized to `type_name` and dequantized again."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    data = gguf.quants.quantize(values.numpy(), qtype)
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(values.shape))


def out_type(tensor: Any, options: GgufOptions, shape: tuple[int, ...]) -> str:
    """The type an edited tensor is written in; float32 for biases and rows the type's blocks do not fit."""
    import gguf

    source_type = tensor.tensor_type.name
    wanted = EDITED_TYPES[options.edited_type] or source_type
    if wanted not in QUANTIZABLE:
        raise UsageError(f"--gguf-edited-type source: {tensor.name} is {source_type}, which the gguf package "
                         "cannot write", hint="use --gguf-edited-type q8_0")
    if len(shape) == 1:
        return "F32"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wanted]][0]
    if shape[-1] % block:
        log.info("%s: rows of %d values do not fit %s blocks of %d; written as F32", tensor.name, shape[-1], wanted,
                 block)
        return "F32"
    return wanted


def _stats(values: torch.Tensor, u: torch.Tensor, axis: int) -> tuple[float, float]:
    """(|u^T W|^2 along `axis`, |W|^2), without a copy of the tensor (the products are small)."""
    along = torch.tensordot(values, u, dims=([axis], [0])).to(torch.float64).pow(2).sum()
    return float(along), float(torch.linalg.vector_norm(values).to(torch.float64) ** 2)


def _rows(values: torch.Tensor) -> Iterator[torch.Tensor]:
    """Blocks of whole rows (last axis) of `values`, about 16M values each."""
    flat = values.reshape(-1, values.shape[-1]) if values.dim() > 1 else values.reshape(1, -1)
    step = max(1, (1 << 24) // max(flat.shape[1], 1))
    for start in range(0, flat.shape[0], step):
        yield flat[start : start + step]


def _written(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The values a GGUF reader gets back from `data` (the raw bytes of a tensor of `shape` in `type_name`)."""
    import gguf

    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    values = gguf.quants.dequantize(data.reshape(rows, -1), gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(shape))


def edit_tensor(
    tensor: Any, target: Target, plan: EditPlan, checkpoint: Checkpoint, r: torch.Tensor, type_name: str, rounds: int
) -> tuple[np.ndarray, EditedTensor]:
    """One GGUF tensor edited in float32 (edit/projection.py's math) and quantized to `type_name`: (bytes, stats).

    Memory: the dequantized source (float32) and the output bytes; the edit comes in blocks of rows from
    `projected_blocks` and is quantized block by block (GGUF types quantize each row on its own). Re-projection
    rounds need the whole edited tensor once more.
    """
    source = dequantized(tensor)
    shape = tuple(source.shape)
    stacked = int(len(target.hf_names) > 1)  # per-expert checkpoint matrices stacked into one GGUF tensor
    hf_name, hf_ndim = target.hf_names[0], source.dim() - stacked
    axis = plan.arch.hidden_axis(hf_name, hf_ndim) + stacked
    rescale = plan.norm_preserving and not plan.arch.is_bias(hf_name, hf_ndim)
    u = direction_for(plan, checkpoint, target.component, target.layer, r, hf_name)
    weight = plan.weight(target.component, target.layer)
    before, norm = _stats(source, u, axis)
    try:
        if rounds and weight == 1.0 and type_name != "F32":
            edited = project_out(source, u, axis, rescale=rescale)
            for _ in range(rounds):  # push the quantization error's u-component back out, then quantize again
                current = roundtrip(edited, type_name)
                edited += project_out(current, u, axis) - current
            blocks: Iterator[torch.Tensor] = _rows(edited)
        else:
            blocks = projected_blocks(source, u, axis, rescale=rescale, weight=weight)
        data = np.concatenate([quantized(block, type_name) for block in blocks])
    except FloatingPointError:
        raise CheckpointError(f"tensor {tensor.name!r} holds NaN or Inf values",
                              hint="the source GGUF is damaged; download it again") from None
    del source
    after, _ = _stats(_written(data, type_name, shape), u, axis)
    return data, EditedTensor(tensor.name, tensor.tensor_type.name, type_name, before, after, norm)


# --- the file ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One output tensor: its name, where its bytes come from, and (when edited) how."""

    name: str
    tensor: Any
    target: Target | None = None
    type_name: str = ""


def _metadata(writer: Any, reader: Any, direction: Direction, source: Path, options: GgufOptions, n: int) -> None:
    from gguf import GGUFValueType

    for key, fld in reader.fields.items():
        if key == "general.architecture" or key.startswith(("GGUF.", META_PREFIX)):
            continue
        sub_type = fld.types[-1] if fld.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, fld.contents(), fld.types[0], sub_type=sub_type)
    writer.add_string(f"{META_PREFIX}version", __version__)
    writer.add_string(f"{META_PREFIX}source_file", source.name)
    writer.add_string(f"{META_PREFIX}method", direction.method)
    for key, value in (("layer", direction.layer), ("pos", direction.pos)):
        if value is not None:
            writer.add_int32(f"{META_PREFIX}direction.{key}", int(value))
    if direction.lang:
        writer.add_string(f"{META_PREFIX}direction.lang", direction.lang)
    writer.add_key_value(f"{META_PREFIX}direction", [float(x) for x in direction.vector.to(torch.float32)],
                         GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    writer.add_bool(f"{META_PREFIX}partial", direction.weights is not None)
    writer.add_string(f"{META_PREFIX}edited_type", options.edited_type)
    writer.add_uint32(f"{META_PREFIX}edited_tensors", n)
    writer.add_uint32(f"{META_PREFIX}reproject", options.reproject)


def _nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return int(np.prod(shape)) // block * size


def has_output_head(reader: Any) -> bool:
    """Whether llama.cpp's layout of this architecture has an `output.weight` (Gemma and Gemma 2 have none)."""
    import gguf

    return gguf.MODEL_TENSOR.OUTPUT in gguf.MODEL_TENSORS[_arch(reader)[1]]


def _layout(reader: Any, targets: dict[str, Target], plan: EditPlan, checkpoint: Checkpoint,
            options: GgufOptions) -> list[_Entry]:
    entries: list[_Entry] = []
    names = {tensor.name for tensor in reader.tensors}
    if plan.tied and OUTPUT_HEAD not in names and not has_output_head(reader):
        log.warning(
            "tied embeddings, and the GGUF layout of %s has no %s: the unembedding stays tied to the edited "
            "embedding (the output differs from the safetensors edit, which unties; docs/usage.md)",
            _arch(reader)[0], OUTPUT_HEAD,
        )
        names.add(OUTPUT_HEAD)  # nothing to add
    for tensor in reader.tensors:
        target = targets.get(tensor.name)
        if target is None:
            entries.append(_Entry(tensor.name, tensor))
            continue
        shape = _check_shape(tensor, target, checkpoint)
        entries.append(_Entry(tensor.name, tensor, target, out_type(tensor, options, shape)))
        if tensor.name == TOKEN_EMBD and plan.tied and OUTPUT_HEAD not in names:
            entries.append(_Entry(OUTPUT_HEAD, tensor))  # the original embedding, as the unembedding
    return entries


def _tensor_info(writer: Any, entry: _Entry) -> None:
    tensor = entry.tensor
    if entry.target is None:
        writer.add_tensor_info(entry.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
        return
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    writer.add_tensor_info(entry.name, shape, np.dtype(np.float32), _nbytes(entry.type_name, shape),
                           gguf.GGMLQuantizationType[entry.type_name])


def _entry_bytes(entry: _Entry) -> int:
    """The bytes an output tensor takes (an edited one in its new type)."""
    if entry.target is None:
        return int(entry.tensor.n_bytes)
    return _nbytes(entry.type_name, tuple(int(d) for d in reversed(entry.tensor.shape.tolist())))


def _pad(fout: IO[bytes], alignment: int) -> None:
    fout.write(b"\0" * (-fout.tell() % alignment))


def _copy(fout: IO[bytes], tensor: Any) -> None:
    flat = tensor.data.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _COPY_CHUNK):
        fout.write(memoryview(flat[start : start + _COPY_CHUNK]))


def _tracked(entries: list[_Entry]) -> Iterator[_Entry]:
    yield from progress.track(entries, "writing GGUF", len(entries), "tensor")


def write_gguf(
    source: ModelSource,
    checkpoint: Checkpoint,
    config: dict[str, object],
    direction: Direction,
    out: Path,
    options: GgufOptions,
) -> GgufResult:
    """Write `out/<name>-abliterated.gguf` (and the direction file) into the existing temporary folder `out`."""
    check_options(source.gguf_file, options)
    assert source.gguf_file is not None
    import gguf

    reader = open_reader(source.gguf_file)
    plan = plan_edit(checkpoint, config, direction)
    targets = gguf_targets(plan, reader)
    entries = _layout(reader, targets, plan, checkpoint, options)
    path = out / output_name(source.gguf_file)
    result = GgufResult(path, plan, options, output_head_added=any(e.name == OUTPUT_HEAD and e.tensor.name == TOKEN_EMBD
                                                                    for e in entries))
    names = {tensor.name for tensor in reader.tensors}
    result.tied_unembedding_edited = plan.tied and OUTPUT_HEAD not in names and not result.output_head_added
    if result.output_head_added:
        log.info("tied embeddings: writing the original %s as an explicit %s", TOKEN_EMBD, OUTPUT_HEAD)
    writer = gguf.GGUFWriter(path, _arch(reader)[0], endianess=reader.endianess)
    writer.data_alignment = reader.alignment
    _metadata(writer, reader, direction, source.gguf_file, options, len(targets))
    for entry in entries:
        _tensor_info(writer, entry)
    ensure_free_space(out, sum(_entry_bytes(entry) for entry in entries))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    fout = writer.fout[0]
    r = direction.vector.to(torch.float32)
    try:
        for entry in _tracked(entries):
            _pad(fout, writer.data_alignment)
            if entry.target is None:
                _copy(fout, entry.tensor)
                result.types[entry.tensor.tensor_type.name] += 1
                continue
            data, stats = edit_tensor(entry.tensor, entry.target, plan, checkpoint, r, entry.type_name,
                                      options.reproject)
            fout.write(data.data)
            result.edited.append(stats)
            result.types[entry.type_name] += 1
        _pad(fout, writer.data_alignment)
    finally:
        writer.close()
    direction.save(out / "abliterate" / DIRECTION_FILE)
    log.info("edited %d GGUF tensors (%s), copied %d unchanged; share of r left %.4f",
             len(result.edited), ", ".join(f"{n} {t}" for t, n in sorted(result.edited_types().items())),
             len(entries) - len(result.edited), result.residual_share)
    return result
