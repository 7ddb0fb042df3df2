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
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from abliterate import progress
from abliterate.archs import Architecture, Component, lookup
from abliterate.checkpoint import DTYPES, Checkpoint, tensor_buffer
from abliterate.direction import DIRECTION_FILE, AblationWeights, Direction
from abliterate.errors import CheckpointError, ModelError
from abliterate.loading import ModelSource
from abliterate.output import atomic_output, ensure_free_space
from abliterate.provenance import record_output
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
    """The axis of a stored tensor that indexes the residual stream.

    Embedding [vocab, hidden]: the last. Linear weights [hidden, in] and biases [hidden]: the first.
    Fused expert stacks [experts, hidden, in]: the second.
    """
    if component == "embedding":
        return ndim - 1
    return 1 if ndim == 3 else 0


def project_out(
    tensor: torch.Tensor, direction: torch.Tensor, axis: int, *, rescale: bool = False, weight: float = 1.0
) -> torch.Tensor:
    """Remove `direction` (unit, float32) from `tensor` along `axis`, computing in float32 by chunks.

    Returns a new tensor of the input's dtype; the input is not modified. Chunks are independent slices
    (rows of an embedding, column blocks of a weight), so float32 memory stays at one chunk. With `rescale`,
    each vector along `axis` of a matrix is scaled back to its original norm after the projection (1-D
    tensors, the biases, are only projected). With `weight` w, only w times the component is removed.
    """
    result = torch.empty_like(tensor)
    if tensor.dim() == 1:
        edited = tensor.to(torch.float32, copy=True)
        if not torch.isfinite(edited).all():
            raise FloatingPointError("NaN or Inf in the tensor")
        result.copy_(edited - (weight * (edited @ direction)) * direction)
    elif tensor.dim() == 3:  # fused expert stack: one 2-D matrix per expert
        for expert in range(tensor.shape[0]):
            result[expert] = project_out(tensor[expert], direction, axis - 1, rescale=rescale, weight=weight)
    else:
        _project_matrix(tensor, result, direction, axis, rescale, weight)
    return result


def _project_matrix(
    source: torch.Tensor, result: torch.Tensor, r: torch.Tensor, axis: int, rescale: bool, weight: float = 1.0
) -> None:
    """result <- source - w r r^T source (axis 0) or source - w (source r) r^T (axis 1), by slices (w: weight).

    With `rescale`, every vector along `axis` (a column for axis 0, a row for axis 1) then regains its norm.
    """
    other = source.shape[1 - axis]
    step = max(1, _CHUNK_ELEMENTS // max(source.shape[axis], 1))
    for start in range(0, other, step):
        part = slice(start, min(start + step, other))
        index = (slice(None), part) if axis == 0 else (part, slice(None))
        chunk = source[index].to(torch.float32, copy=True)
        coefficients = r @ chunk if axis == 0 else chunk @ r
        if not torch.isfinite(coefficients).all():  # a NaN/Inf anywhere in the chunk reaches these sums
            raise FloatingPointError("NaN or Inf in the tensor")
        norms = chunk.norm(dim=axis) if rescale else None
        if axis == 0:
            chunk.addr_(r, coefficients, alpha=-weight)
        else:
            chunk.addr_(coefficients, r, alpha=-weight)
        if norms is not None:
            _restore_norms(chunk, norms, axis)
        result[index] = chunk


def _restore_norms(chunk: torch.Tensor, norms: torch.Tensor, axis: int) -> None:
    """Scale each vector of `chunk` along `axis` (in place) back to `norms`, its norm before the projection.

    A vector that lay (almost) entirely along the direction keeps only rounding noise; it is left as projected
    rather than blown up to full norm.
    """
    projected = chunk.norm(dim=axis)
    keep = projected > _RESCALE_FLOOR * norms
    scale = torch.where(keep, norms / torch.where(keep, projected, 1.0), 1.0)
    chunk.mul_(scale.unsqueeze(axis))


def post_norm_direction(direction: torch.Tensor, norm_weight: torch.Tensor, offset: float) -> torch.Tensor:
    """u = normalize(r * (offset + w)): orthogonal to u before an RMSNorm means orthogonal to r after it."""
    mapped = direction * (offset + norm_weight.to(torch.float32))
    return mapped / mapped.norm()


@dataclass(frozen=True)
class EditPlan:
    """What `apply_direction` does to a checkpoint: the tensors it edits and how it handles tied embeddings."""

    arch: Architecture
    edits: dict[str, tuple[Component, int]]
    tied: bool
    norm_preserving: bool = False  # rescale every edited weight vector to its original norm
    weights: AblationWeights | None = None  # per-layer partial ablation (None: weight 1 everywhere)

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
    return arch.lm_head_tensor not in checkpoint.tensors


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
        component, _layer = found
        axis = hidden_axis(component, len(info.shape))
        if info.shape[axis] != hidden_size:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(info.shape)}, but the config's hidden_size is {hidden_size}",
                hint="the checkpoint and config.json disagree; download the model again",
            )
        if not DTYPES[info.dtype].is_floating_point:
            raise CheckpointError(
                f"tensor {name!r} is stored as {info.dtype} (quantized?)",
                hint="apply the edit to the original full-precision checkpoint",
            )
        edits[name] = found
    if arch.embedding_tensor not in edits:
        raise CheckpointError(
            f"the checkpoint has no embedding tensor {arch.embedding_tensor!r}",
            hint=f"is this a {arch.name} checkpoint? check config.json's model_type",
        )
    if not any(component != "embedding" for component, _ in edits.values()):
        raise CheckpointError(
            "no attention or MLP output tensors found", hint="the checkpoint does not match its model_type"
        )
    return EditPlan(arch, edits, is_tied(config, checkpoint, arch), norm_preserving)


def direction_for(
    plan: EditPlan, checkpoint: Checkpoint, component: Component, layer: int, r: torch.Tensor
) -> torch.Tensor:
    norm_name = plan.arch.post_norm_tensor(layer, component)
    if norm_name is None:
        return r
    if norm_name not in checkpoint.tensors:
        raise CheckpointError(f"post-norm tensor {norm_name!r} is missing", hint="the checkpoint is incomplete")
    return post_norm_direction(r, checkpoint.get(norm_name), plan.arch.norm_offset)


def edit_tensor(plan: EditPlan, checkpoint: Checkpoint, name: str, r: torch.Tensor) -> torch.Tensor:
    """Load one residual-writing tensor and return it orthogonalized (stored dtype)."""
    component, layer = plan.edits[name]
    tensor = checkpoint.get(name)
    direction = direction_for(plan, checkpoint, component, layer, r)
    try:
        axis = hidden_axis(component, tensor.dim())
        weight = plan.weight(component, layer)
        return project_out(tensor, direction, axis, rescale=plan.norm_preserving, weight=weight)
    except FloatingPointError:
        raise CheckpointError(
            f"tensor {name!r} holds NaN or Inf values", hint="the source checkpoint is damaged; download it again"
        ) from None


def output_specs(plan: EditPlan, checkpoint: Checkpoint) -> list[TensorSpec]:
    """Every output tensor in source order; tied models gain `lm_head.weight` after the embedding."""
    specs: list[TensorSpec] = []
    for name in checkpoint.names():
        if plan.tied and name == plan.arch.lm_head_tensor:
            continue  # replaced by the original embedding below
        info = checkpoint.tensors[name]
        specs.append(TensorSpec(name, info.dtype, info.shape, info.nbytes))
        if plan.tied and name == plan.arch.embedding_tensor:
            specs.append(TensorSpec(plan.arch.lm_head_tensor, info.dtype, info.shape, info.nbytes))
    return specs


def _write_tensor(
    writer: ShardWriter, spec: TensorSpec, plan: EditPlan, checkpoint: Checkpoint, r: torch.Tensor
) -> None:
    if spec.name in plan.edits:
        writer.write(spec.name, tensor_buffer(edit_tensor(plan, checkpoint, spec.name, r)))
        return
    source = plan.arch.embedding_tensor if plan.tied and spec.name == plan.arch.lm_head_tensor else spec.name
    info = checkpoint.tensors[source]
    if checkpoint.is_pickle:
        writer.write(spec.name, tensor_buffer(checkpoint.get(source)))
    else:
        writer.copy_from(spec.name, info.file, info.start, info.nbytes)


def write_config(source: Path, out: Path, config: dict[str, object], plan: EditPlan) -> None:
    """config.json for the output: untied if the source was tied, and never claiming quantization."""
    config = dict(config)
    if plan.tied:
        config["tie_word_embeddings"] = False
        text_config = config.get("text_config")
        if isinstance(text_config, dict):
            text_config["tie_word_embeddings"] = False
    config.pop("quantization_config", None)
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


def write_checkpoint(
    checkpoint: Checkpoint, config: dict[str, object], direction: Direction, out: Path, max_shard_size: int
) -> EditPlan:
    """Write the orthogonalized checkpoint into an existing (temporary) folder `out`."""
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
    if plan.tied:
        log.info(
            "tied embeddings: writing the original embedding as %s and setting tie_word_embeddings=false, "
            "so that the edited model equals inference-time ablation",
            plan.arch.lm_head_tensor,
        )
    r = direction.vector.to(torch.float32)
    shards = plan_shards(output_specs(plan, checkpoint), max_shard_size)
    ensure_free_space(out, sum(shard.nbytes for shard in shards))
    total = sum(len(s.tensors) for s in shards)
    tensors = progress.track(((s, t) for s in shards for t in s.tensors), "orthogonalizing", total, "tensor")
    writer: ShardWriter | None = None
    for shard, spec in tensors:
        if writer is None or writer.path.name != shard.filename:
            if writer is not None:
                writer.close()
            writer = ShardWriter(out, shard, checkpoint.metadata or {"format": "pt"})
        _write_tensor(writer, spec, plan, checkpoint, r)
    if writer is not None:
        writer.close()
    write_index(out, shards)
    write_config(checkpoint.folder, out, config, plan)
    copy_side_files(checkpoint.folder, out)
    direction.save(out / "abliterate" / DIRECTION_FILE)
    log.info(
        "edited %d tensors, copied %d unchanged, %d shard(s)", len(plan.edits), total - len(plan.edits), len(shards)
    )
    return plan


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
    with atomic_output(out, overwrite=overwrite, sources=[source]) as tmp:
        plan = write_checkpoint(checkpoint, config, direction, tmp, max_shard_size)
        record_output(tmp, model or ModelSource(str(source), Path(source)), checkpoint, plan, direction)
        return plan
