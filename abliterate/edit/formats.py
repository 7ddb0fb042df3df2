"""The output formats of an edit (`--format`): a safetensors checkpoint, a GGUF file, or a LoRA adapter.

`edit`, `apply` and `optimize --pick` plan the same edit (`edit.stream.plan_edit`): `write_edit` hands it to
one of three writers: `edit.stream.write_checkpoint` (safetensors shards), `edit.gguf.write_gguf` (a copy of a
`.gguf` source with its residual writers re-quantized) and `edit.adapter.write_adapter` (a rank-1 PEFT LoRA).
Each writes into the temporary folder of `storage.atomic.atomic_output` that `publish.write_edited` opens;
provenance and the model card follow there, with the format's own record under `format`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.direction.vector import Direction
from abliterate.edit.adapter import write_adapter
from abliterate.edit.gguf import GgufOptions, check_options, write_gguf
from abliterate.edit.stream import EditPlan, write_checkpoint
from abliterate.errors import UsageError
from abliterate.model.checkpoint import Checkpoint
from abliterate.model.loading import ModelSource
from abliterate.storage.hashing import FileHasher, HashAlgorithm

if TYPE_CHECKING:
    from abliterate.settings import Settings

FORMATS = ("safetensors", "gguf", "adapter")


@dataclass(frozen=True)
class OutputOptions:
    """What to write: the format and its options."""

    format: str = "safetensors"
    max_shard_size: int = 5 * 10**9
    gguf: GgufOptions = field(default_factory=GgufOptions)
    adapter_embedding: bool = True
    output_hash: HashAlgorithm = "xxh3_128"  # provenance's hash of every output file

    @classmethod
    def from_settings(cls, settings: Settings) -> OutputOptions:
        return cls(settings.format, settings.max_shard_bytes,
                   GgufOptions(settings.gguf_edited_type, settings.gguf_reproject), settings.adapter_embedding,
                   settings.output_hash)


@dataclass(frozen=True)
class Written:
    """What a writer did: the plan, the provenance `format` record (None for safetensors), a summary line."""

    plan: EditPlan
    record: dict[str, Any] | None = None
    summary: str = ""


def gguf_path(spec: str) -> Path | None:
    """The file, if MODEL names a local .gguf file (no conversion, no network)."""
    path = Path(spec).expanduser()
    return path.resolve() if path.is_file() and path.suffix == ".gguf" else None


def check_format(settings: Settings, *, evaluate: bool = False) -> None:
    """Cheap checks of --format and its options, before anything loads or downloads."""
    if settings.format != "adapter" and not settings.adapter_embedding:
        raise UsageError("--no-adapter-embedding applies only with --format adapter", hint="drop it")
    if settings.format == "safetensors":
        if settings.gguf_edited_type != "q8_0" or settings.gguf_reproject:
            raise UsageError("--gguf-edited-type and --gguf-reproject apply only with --format gguf",
                             hint="add --format gguf, or drop them")
        return
    if evaluate:
        raise UsageError(
            f"edit evaluates safetensors outputs only, not --format {settings.format}",
            hint="pass --no-eval, then evaluate the output with `abliterate eval` (docs/usage.md)",
        )
    if settings.format == "gguf":
        check_options(gguf_path(settings.model), GgufOptions(settings.gguf_edited_type, settings.gguf_reproject))
    elif settings.gguf_edited_type != "q8_0" or settings.gguf_reproject:
        raise UsageError("--gguf-edited-type and --gguf-reproject apply only with --format gguf",
                         hint="add --format gguf, or drop them")


def write_edit(
    options: OutputOptions,
    source: ModelSource,
    checkpoint: Checkpoint,
    config: dict[str, object],
    direction: Direction,
    out: Path,
    hasher: FileHasher | None = None,
) -> Written:
    """Write the edit in `options.format` into the existing (temporary) folder `out`."""
    if direction.per_layer is not None and options.format != "safetensors":
        raise UsageError(f"a per-layer direction cannot be written as --format {options.format} yet",
                         hint="write it with --format safetensors (then convert, e.g. with llama.cpp)")
    if options.format == "gguf":
        result = write_gguf(source, checkpoint, config, direction, out, options.gguf)
        return Written(result.plan, result.record(), result.summary())
    if options.format == "adapter":
        adapter = write_adapter(source, checkpoint, config, direction, out, embedding=options.adapter_embedding)
        return Written(adapter.plan, adapter.record(), adapter.summary())
    return Written(write_checkpoint(checkpoint, config, direction, out, options.max_shard_size, hasher))


def sources_of(source: ModelSource) -> list[Path]:
    """Paths --out must stay clear of: the model folder and, for a GGUF source, the file."""
    return [source.folder, *([source.gguf_file] if source.gguf_file is not None else [])]
