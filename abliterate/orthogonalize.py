"""Weight orthogonalization: the math on one tensor, and the streaming edit of a whole checkpoint.

For a unit direction r, every matrix W that writes into the residual stream becomes W - r r^T W (its outputs
lose their r component), the embedding E becomes E - (E r) r^T, output biases b become b - (r.b) r.
Families with a norm between a sub-block and the residual stream (Gemma 2/3, gain 1 + w) are edited against
u = normalize(r * (1 + w)) instead, so that the norm's output is orthogonal to r (docs/method.md).
Directions of method `norm-preserving` are edited the same way, and then every vector a matrix writes into
the stream (a column of W, a row of E; not a bias) is rescaled back to its original norm.
A direction with per-layer ablation weights w (`abliterate optimize`) edits partially: W - w r r^T W,
E - w (E r) r^T, b - w (r.b) r, with each tensor's own layer's weight (w = 1 is exactly the edit above).

`apply_direction` reads the source shard by shard, edits one tensor at a time in float32, copies every other
tensor's bytes unchanged, and writes standard shards plus index into a temporary folder renamed at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from abliterate import progress
from abliterate.archs import Architecture, Component, default_hidden_axis, lookup
from abliterate.checkpoint import DTYPES, Checkpoint, tensor_buffer
from abliterate.direction import DIRECTION_FILE, AblationWeights, Direction
from abliterate.errors import CheckpointError, ModelError
from abliterate.loading import ModelSource
from abliterate.output import atomic_output, ensure_free_space
from abliterate.provenance import FileHasher, hub_blob_sha256, record_output
from abliterate.quantized import adjusted_quantization_config
from abliterate.shards import ShardWriter, TensorSpec, plan_shards, write_index

log = logging.getLogger(__name__)

# Files copied from the source folder besides the weights (tokenizer, chat template, configs, licenses).
_COPY_SUFFIXES = {".json", ".jinja", ".model", ".txt", ".tiktoken", ".py"}
_COPY_PREFIXES = ("LICENSE", "USE_POLICY", "NOTICE")
_WEIGHT_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}
_CHUNK_ELEMENTS = 1 << 24  # rows edited at once: 16M float32 values (64 MB) per chunk
NORM_PRESERVING = "norm-preserving"  # the direction method whose edit keeps every written vector's norm
_RESCALE_FLOOR = 1e-4  # vectors keeping less of their norm than this after projection are rounding noise


def hidden_axis(component: Component, ndim: int) -> int:
    """The axis of a stored tensor that indexes the residual stream, by the default rule.

    Embedding [vocab, hidden]: the last. Linear weights [hidden, in] and biases [hidden]: the first.
    Fused expert stacks [experts, hidden, in]: the second. A writer whose registry entry names its own axis
    (stacks stored [experts, in, hidden]) overrides it: see `Architecture.hidden_axis`.
    """
    return default_hidden_axis(component, ndim)


def project_out(
    tensor: torch.Tensor, direction: torch.Tensor, axis: int, *, rescale: bool = False, weight: float = 1.0
) -> torch.Tensor:
    """Remove `direction` (unit, float32) from `tensor` along `axis`, computing in float32.

    Returns a new tensor of the input's dtype; the input is not modified. With `rescale`, each vector along
    `axis` of a matrix is scaled back to its original norm after the projection (1-D tensors, the biases, are
    only projected). With `weight` w, only w times the component is removed. The streaming edit uses
    `projected_blocks`, which yields the same values block by block.
    """
    blocks = [block.reshape(-1) for block in projected_blocks(tensor, direction, axis, rescale=rescale, weight=weight)]
    return torch.cat(blocks).reshape(tensor.shape) if blocks else tensor.clone()


def projected_blocks(
    tensor: torch.Tensor, direction: torch.Tensor, axis: int, *, rescale: bool = False, weight: float = 1.0
) -> Iterator[torch.Tensor]:
    """`project_out(tensor, ...)` as consecutive contiguous blocks of whole rows, in storage order.

    Written to disk one after the other, the blocks are the edited tensor's bytes, so the edit never holds
    more than one float32 block (at most 64 MB) besides the source tensor (docs/performance.md).
    """
    if tensor.dim() == 1:
        edited = tensor.to(torch.float32, copy=True)
        if not torch.isfinite(edited).all():
            raise FloatingPointError("NaN or Inf in the tensor")
        yield (edited - (weight * (edited @ direction)) * direction).to(tensor.dtype)
    elif tensor.dim() == 3:  # fused expert stack: one 2-D matrix per expert
        for expert in range(tensor.shape[0]):
            yield from projected_blocks(tensor[expert], direction, axis - 1, rescale=rescale, weight=weight)
    elif axis == 1:
        yield from _project_rows(tensor, direction, rescale, weight)
    elif rescale:
        yield _project_columns_rescaled(tensor, direction, weight)
    else:
        yield from _project_columns_two_pass(tensor, direction, weight)


def _row_blocks(matrix: torch.Tensor) -> Iterator[slice]:
    """Slices of whole rows holding about `_CHUNK_ELEMENTS` values each."""
    step = max(1, _CHUNK_ELEMENTS // max(matrix.shape[1], 1))
    for start in range(0, matrix.shape[0], step):
        yield slice(start, min(start + step, matrix.shape[0]))


def _project_rows(
    source: torch.Tensor, r: torch.Tensor, rescale: bool, weight: float
) -> Iterator[torch.Tensor]:
    """Rows of `source` (an embedding [vocab, hidden]) minus w (row . r) r, block by block."""
    for rows in _row_blocks(source):
        block = source[rows].to(torch.float32, copy=True)
        coefficients = block @ r
        if not torch.isfinite(coefficients).all():  # a NaN/Inf anywhere in the block reaches these sums
            raise FloatingPointError("NaN or Inf in the tensor")
        norms = block.norm(dim=1) if rescale else None
        block.addr_(coefficients, r, alpha=-weight)
        if norms is not None:
            _restore_norms(block, norms, 1)
        yield block.to(source.dtype)


def _project_columns_two_pass(source: torch.Tensor, r: torch.Tensor, weight: float) -> Iterator[torch.Tensor]:
    """`source` [hidden, in] minus w r (r^T source), in row blocks: r^T source is summed over the blocks first."""
    coefficients = torch.zeros(source.shape[1], dtype=torch.float32)
    for rows in _row_blocks(source):
        coefficients.addmv_(source[rows].to(torch.float32).T, r[rows])
    if not torch.isfinite(coefficients).all():  # a NaN/Inf anywhere in the matrix reaches these sums
        raise FloatingPointError("NaN or Inf in the tensor")
    for rows in _row_blocks(source):
        block = source[rows].to(torch.float32, copy=True)
        block.addr_(r[rows], coefficients, alpha=-weight)
        yield block.to(source.dtype)


def _project_columns_rescaled(source: torch.Tensor, r: torch.Tensor, weight: float) -> torch.Tensor:
    """source - w r r^T source by column slices, every column then scaled back to its original norm.

    Column slices, not row blocks: a column's norm after the projection needs the whole column.
    """
    result = torch.empty_like(source)
    step = max(1, _CHUNK_ELEMENTS // max(source.shape[0], 1))
    for start in range(0, source.shape[1], step):
        part = slice(start, min(start + step, source.shape[1]))
        chunk = source[:, part].to(torch.float32, copy=True)
        coefficients = r @ chunk
        if not torch.isfinite(coefficients).all():
            raise FloatingPointError("NaN or Inf in the tensor")
        norms = chunk.norm(dim=0)
        chunk.addr_(r, coefficients, alpha=-weight)
        _restore_norms(chunk, norms, 0)
        result[:, part] = chunk
    return result


def _restore_norms(chunk: torch.Tensor, norms: torch.Tensor, axis: int) -> None:
    """Scale each vector of `chunk` along `axis` (in place) back to `norms`, its norm before the projection.

    A vector that lay (almost) entirely along the direction keeps only rounding noise; it is left as projected
    rather than blown up to full norm.
    """
    projected = chunk.norm(dim=axis)
    keep = projected > _RESCALE_FLOOR * norms
    scale = torch.where(keep, norms / torch.where(keep, projected, 1.0), 1.0)
    chunk.mul_(scale.unsqueeze(axis))


def post_norm_direction(
    direction: torch.Tensor, norm_weight: torch.Tensor | Sequence[torch.Tensor], offset: float
) -> torch.Tensor:
    """u = normalize(r * (offset + w)): orthogonal to u before an RMSNorm means orthogonal to r after it.

    For a chain of norms (one weight per norm), u = normalize(r * prod(offset + w)): each RMSNorm scales its
    input by a positive number and then by its gain, so the gains multiply.
    """
    weights = [norm_weight] if isinstance(norm_weight, torch.Tensor) else list(norm_weight)
    mapped = direction.to(torch.float32)
    for weight in weights:
        mapped = mapped * (offset + weight.to(torch.float32))
    return mapped / mapped.norm()


@dataclass(frozen=True)
class EditPlan:
    """What `apply_direction` does to a checkpoint: the tensors it edits and how it handles tied embeddings."""

    arch: Architecture
    edits: dict[str, tuple[Component, int]]
    tied: bool
    norm_preserving: bool = False  # rescale every edited weight vector to its original norm
    weights: AblationWeights | None = None  # per-layer partial ablation (None: weight 1 everywhere)
    unquantized: tuple[str, ...] = ()  # quantized modules written dequantized (bf16): kept out of quantization

    def weight(self, component: Component, layer: int) -> float:
        return 1.0 if self.weights is None else self.weights.weight(component, layer)


def read_config(folder: Path) -> dict[str, object]:
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


def is_tied(config: dict[str, object], checkpoint: Checkpoint, arch: Architecture) -> bool:
    """Whether the unembedding reuses the embedding matrix at load time."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    return arch.on_disk(arch.lm_head_tensor, checkpoint.tensors) is None


def make_plan(
    checkpoint: Checkpoint, config: dict[str, object], hidden_size: int, *, norm_preserving: bool = False
) -> EditPlan:
    """Classify every tensor and check the writers' shapes against the config."""
    arch = lookup(str(config["model_type"]))
    edits: dict[str, tuple[Component, int]] = {}
    for name, info in checkpoint.tensors.items():
        found = arch.classify(name)
        if found is None:
            continue
        axis = arch.hidden_axis(name, len(info.shape))
        if info.shape[axis] != hidden_size:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(info.shape)}, but the config's hidden_size is {hidden_size}",
                hint="the checkpoint and config.json disagree; download the model again",
            )
        if not DTYPES[info.dtype].is_floating_point or info.dtype.startswith("F8"):
            raise CheckpointError(
                f"tensor {name!r} is stored as {info.dtype} (quantized?)",
                hint="apply the edit to the original full-precision checkpoint",
            )
        edits[name] = found
    if not any(component == "embedding" for component, _ in edits.values()):
        raise CheckpointError(
            f"the checkpoint has no embedding tensor {arch.embedding_tensor!r}",
            hint=f"is this a {arch.name} checkpoint? check config.json's model_type",
        )
    if not any(component != "embedding" for component, _ in edits.values()):
        raise CheckpointError(
            "no attention or MLP output tensors found", hint="the checkpoint does not match its model_type"
        )
    unquantized = tuple(checkpoint.unquantized)
    return EditPlan(arch, edits, is_tied(config, checkpoint, arch), norm_preserving, unquantized=unquantized)


def direction_for(
    plan: EditPlan, checkpoint: Checkpoint, component: Component, layer: int, r: torch.Tensor, name: str | None = None
) -> torch.Tensor:
    """The vector the writer `name` (of `component` in `layer`) is edited against: r, or through its post-norms.

    Without `name`, the component's post-norm. An optional norm of a chain (a variant's) is skipped where the
    checkpoint lacks it; any other missing norm is an error.
    """
    norm_names = plan.arch.post_norm_tensors(layer, component, name)
    if not norm_names:
        return r
    weights = []
    for norm_name, optional in norm_names:
        found = plan.arch.on_disk(norm_name, checkpoint.tensors)
        if found is None and not optional:
            raise CheckpointError(f"post-norm tensor {norm_name!r} is missing", hint="the checkpoint is incomplete")
        if found is not None:
            weights.append(checkpoint.get(found))
    return post_norm_direction(r, weights, plan.arch.norm_offset)


def edited_blocks(plan: EditPlan, checkpoint: Checkpoint, name: str, r: torch.Tensor) -> Iterator[torch.Tensor]:
    """One residual-writing tensor, orthogonalized (stored dtype), as consecutive blocks of its bytes.

    The source tensor is read through a memory map (no copy); only a float32 block at a time is allocated.
    """
    component, layer = plan.edits[name]
    direction = direction_for(plan, checkpoint, component, layer, r, name)
    tensor = checkpoint.view(name)
    try:
        axis = plan.arch.hidden_axis(name, tensor.dim())
        weight = plan.weight(component, layer)
        rescale = plan.norm_preserving and not plan.arch.is_bias(name, tensor.dim())
        yield from projected_blocks(tensor, direction, axis, rescale=rescale, weight=weight)
    except FloatingPointError:
        raise CheckpointError(
            f"tensor {name!r} holds NaN or Inf values", hint="the source checkpoint is damaged; download it again"
        ) from None


def embedding_name(plan: EditPlan) -> str:
    """The embedding's on-disk name (the registry's, or its alias in an older multimodal layout)."""
    return next(name for name, (component, _) in plan.edits.items() if component == "embedding")


def output_specs(plan: EditPlan, checkpoint: Checkpoint) -> list[TensorSpec]:
    """Every output tensor in source order; tied models gain `lm_head.weight` after the embedding."""
    specs: list[TensorSpec] = []
    for name in checkpoint.names():
        if plan.tied and name == plan.arch.lm_head_tensor:
            continue  # replaced by the original embedding below
        info = checkpoint.tensors[name]
        specs.append(TensorSpec(name, info.dtype, info.shape, info.nbytes))
        if plan.tied and plan.edits.get(name, ("", 0))[0] == "embedding":
            specs.append(TensorSpec(plan.arch.lm_head_tensor, info.dtype, info.shape, info.nbytes))
    return specs


def _write_tensor(
    writer: ShardWriter, spec: TensorSpec, plan: EditPlan, checkpoint: Checkpoint, r: torch.Tensor
) -> None:
    if spec.name in plan.edits:
        for block in edited_blocks(plan, checkpoint, spec.name, r):
            writer.write(spec.name, tensor_buffer(block.to(DTYPES[spec.dtype])))  # derived: float32 -> bf16
        return
    if spec.name in checkpoint.derived:  # dequantized with its module, not a writer itself
        writer.write(spec.name, tensor_buffer(checkpoint.get(spec.name).to(DTYPES[spec.dtype])))
        return
    source = embedding_name(plan) if plan.tied and spec.name == plan.arch.lm_head_tensor else spec.name
    info = checkpoint.tensors[source]
    if checkpoint.is_pickle:
        writer.write(spec.name, tensor_buffer(checkpoint.get(source)))
    else:
        writer.copy_from(spec.name, info.file, info.start, info.nbytes)


def write_config(source: Path, out: Path, config: dict[str, object], plan: EditPlan) -> None:
    """config.json for the output: untied if the source was tied, and never claiming quantization that its
    tensors do not have (a quantized source keeps its quantization_config, with the modules written dequantized
    added to `modules_to_not_convert`)."""
    config = dict(config)
    if plan.tied:
        config["tie_word_embeddings"] = False
        text_config = config.get("text_config")
        if isinstance(text_config, dict):
            text_config["tie_word_embeddings"] = False
    quantization = config.pop("quantization_config", None)
    if plan.unquantized and isinstance(quantization, dict):
        config["quantization_config"] = adjusted_quantization_config(quantization, list(plan.unquantized))
        log.info(
            "quantization_config kept; %d dequantized modules added to its modules_to_not_convert",
            len(plan.unquantized),
        )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def copy_side_files(source: Path, out: Path) -> list[str]:
    """Copy tokenizer, chat template, generation config and license files (not weights, not the model card)."""
    copied = []
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name in _WEIGHT_FILES or path.name == "config.json":
            continue
        if path.suffix in _COPY_SUFFIXES or path.name.startswith(_COPY_PREFIXES):
            shutil.copy2(path, out / path.name)
            copied.append(path.name)
    return copied


def _checked_weights(weights: AblationWeights, plan: EditPlan) -> AblationWeights:
    """Per-layer weights must cover exactly the checkpoint's layers."""
    n_layers = 1 + max(layer for _component, layer in plan.edits.values())
    if weights.n_layers != n_layers:
        raise CheckpointError(
            f"the direction's ablation weights cover {weights.n_layers} layers, the checkpoint has {n_layers}",
            hint="use a direction made for this model",
        )
    log.info("partial edit with per-layer ablation weights (embedding %.3g)", weights.embedding)
    return weights


def plan_edit(checkpoint: Checkpoint, config: dict[str, object], direction: Direction) -> EditPlan:
    """The edit of `direction` on `checkpoint`: sizes checked, method and per-layer weights applied.

    Shared by every output format (safetensors here, GGUF and LoRA adapters in their own modules).
    """
    hidden_size = int(config.get("hidden_size") or direction.hidden_size)  # type: ignore[call-overload]
    if direction.hidden_size != hidden_size:
        raise CheckpointError(
            f"the direction has {direction.hidden_size} dimensions, the model's hidden_size is {hidden_size}",
            hint="use a direction computed on this model (or one of the same family and size)",
        )
    plan = make_plan(checkpoint, config, hidden_size, norm_preserving=direction.method == NORM_PRESERVING)
    if plan.norm_preserving:
        log.info("norm-preserving edit: every edited weight vector is rescaled to its original norm")
    if direction.weights is not None:
        plan = replace(plan, weights=_checked_weights(direction.weights, plan))
    return plan


def write_checkpoint(
    checkpoint: Checkpoint,
    config: dict[str, object],
    direction: Direction,
    out: Path,
    max_shard_size: int,
    hasher: FileHasher | None = None,
) -> EditPlan:
    """Write the orthogonalized checkpoint into an existing (temporary) folder `out`.

    With `hasher`, the source's weight files are hashed in the background from the start and every output
    shard as soon as it is closed (for the provenance record), overlapping the edit.
    """
    plan = plan_edit(checkpoint, config, direction)
    if plan.tied:
        log.info(
            "tied embeddings: writing the original embedding as %s and setting tie_word_embeddings=false, "
            "so that the edited model equals inference-time ablation",
            plan.arch.lm_head_tensor,
        )
    r = direction.vector.to(torch.float32)
    shards = plan_shards(output_specs(plan, checkpoint), max_shard_size)
    ensure_free_space(out, sum(shard.nbytes for shard in shards))
    if hasher is not None:  # the source's weights, for provenance (hub cache blobs are named by their hash)
        for path in checkpoint.files():
            if hub_blob_sha256(path) is None:
                hasher.submit(path)
    total = sum(len(s.tensors) for s in shards)
    tensors = progress.track(((s, t) for s in shards for t in s.tensors), "orthogonalizing", total, "tensor")
    writer: ShardWriter | None = None
    for shard, spec in tensors:
        if writer is None or writer.path.name != shard.filename:
            if writer is not None:
                _finish(writer, hasher)
            writer = ShardWriter(out, shard, checkpoint.metadata or {"format": "pt"})
        _write_tensor(writer, spec, plan, checkpoint, r)
    if writer is not None:
        _finish(writer, hasher)
    write_index(out, shards)
    write_config(checkpoint.folder, out, config, plan)
    copy_side_files(checkpoint.folder, out)
    direction.save(out / "abliterate" / DIRECTION_FILE)
    log.info(
        "edited %d tensors, copied %d unchanged, %d shard(s)", len(plan.edits), total - len(plan.edits), len(shards)
    )
    return plan


def _finish(writer: ShardWriter, hasher: FileHasher | None) -> None:
    writer.close()
    if hasher is not None:
        hasher.submit(writer.path)


def apply_direction(
    source: Path,
    direction: Direction,
    out: Path,
    *,
    max_shard_size: int,
    overwrite: bool = False,
    allow_pickle: bool = False,
    model: ModelSource | None = None,
) -> EditPlan:
    """Stream-edit the checkpoint in `source` into `out` (created atomically), with provenance and model card.

    `model` is how the user named the source (for provenance); by default, the folder itself.
    """
    config = read_config(source)
    checkpoint = Checkpoint.open(source, allow_pickle=allow_pickle)
    with atomic_output(out, overwrite=overwrite, sources=[source]) as tmp, FileHasher() as hasher:
        plan = write_checkpoint(checkpoint, config, direction, tmp, max_shard_size, hasher)
        record_output(tmp, model or ModelSource(str(source), Path(source)), checkpoint, plan, direction, hasher=hasher)
        return plan
