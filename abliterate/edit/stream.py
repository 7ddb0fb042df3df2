"""The streaming edit of a whole checkpoint: which tensors change (`EditPlan`) and `write_checkpoint`.

The math on one tensor is in edit/projection.py.
`write_checkpoint` reads the source shard by shard, edits one tensor at a time in float32, copies every other
tensor's bytes unchanged, and writes standard shards plus index into the (temporary) output folder;
publish/write_edited.py wraps it with the atomic rename, provenance and the model card.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from abliterate import progress
from abliterate.direction.vector import DIRECTION_FILE, Direction
from abliterate.edit.projection import NORM_PRESERVING, post_norm_direction, projected_blocks
from abliterate.errors import CheckpointError
from abliterate.model.ablation import AblationWeights
from abliterate.model.archs import Architecture, Component, lookup
from abliterate.model.checkpoint import Checkpoint
from abliterate.model.quantized import adjusted_quantization_config
from abliterate.storage.atomic import ensure_free_space, write_json
from abliterate.storage.hashing import FileHasher, hub_blob_sha256
from abliterate.storage.shards import ShardWriter, TensorSpec, plan_shards, tensor_buffer, write_index
from abliterate.storage.tensors import DTYPES

log = logging.getLogger(__name__)

# Files copied from the source folder besides the weights (tokenizer, chat template, configs, licenses).
_COPY_SUFFIXES = {".json", ".jinja", ".model", ".txt", ".tiktoken", ".py"}
_COPY_PREFIXES = ("LICENSE", "USE_POLICY", "NOTICE")
_WEIGHT_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


@dataclass(frozen=True)
class EditPlan:
    """What the edit does to a checkpoint: the tensors it edits and how it handles tied embeddings."""

    arch: Architecture
    edits: dict[str, tuple[Component, int]]
    tied: bool
    norm_preserving: bool = False  # rescale every edited weight vector to its original norm
    weights: AblationWeights | None = None  # per-layer partial ablation (None: weight 1 everywhere)
    unquantized: tuple[str, ...] = ()  # quantized modules written dequantized (bf16): kept out of quantization

    def weight(self, component: Component, layer: int) -> float:
        return 1.0 if self.weights is None else self.weights.weight(component, layer)


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
    writer: ShardWriter, spec: TensorSpec, plan: EditPlan, checkpoint: Checkpoint, direction: Direction
) -> None:
    if spec.name in plan.edits:
        r = direction.for_layer(plan.edits[spec.name][1]).to(torch.float32)
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
    write_json(out / "config.json", config)


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
    n_layers = 1 + max(layer for _component, layer in plan.edits.values())
    if direction.per_layer is not None and direction.per_layer.shape[0] != n_layers:
        raise CheckpointError(
            f"the direction has per-layer vectors for {direction.per_layer.shape[0]} layers, the checkpoint has "
            f"{n_layers}", hint="use a direction made for this model",
        )
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

    With `hasher`, the source's weight files are hashed (sha256, or taken from the hash cache) in the background
    from the start, and every output shard is hashed from its bytes as they are written (for the provenance
    record), overlapping the edit.
    """
    plan = plan_edit(checkpoint, config, direction)
    if plan.tied:
        log.info(
            "tied embeddings: writing the original embedding as %s and setting tie_word_embeddings=false, "
            "so that the edited model equals inference-time ablation",
            plan.arch.lm_head_tensor,
        )
    shards = plan_shards(output_specs(plan, checkpoint), max_shard_size)
    ensure_free_space(out, sum(shard.nbytes for shard in shards))
    if hasher is not None:  # the source's weights, for provenance (hub cache blobs are named by their hash)
        for path in checkpoint.files():
            if hub_blob_sha256(path) is None:
                hasher.submit_source(path)
    total = sum(len(s.tensors) for s in shards)
    tensors = progress.track(((s, t) for s in shards for t in s.tensors), "orthogonalizing", total, "tensor")
    writer: ShardWriter | None = None
    try:
        for shard, spec in tensors:
            if writer is None or writer.path.name != shard.filename:
                if writer is not None:
                    _finish(writer, hasher)
                writer = ShardWriter(out, shard, checkpoint.metadata or {"format": "pt"},
                                     None if hasher is None else hasher.stream())
            _write_tensor(writer, spec, plan, checkpoint, direction)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
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
    if hasher is not None and writer.digest is not None:  # hashed as written: the shard is not read back
        hasher.adopt(writer.path, writer.digest)
