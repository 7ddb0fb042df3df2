"""The checkpoint edit applied to a loaded model's own weights for the length of a block, then undone.

`edited_weights` runs the same per-tensor arithmetic as the streaming edit (edit/projection.py: the direction,
through post-norms where the family has them, partial weights, the norm-preserving rescale) on the
parameters of a model already in memory, so that `abliterate optimize` trials measure exactly what
`--pick` would write, for every method. Each edited parameter's original values are kept (on the parameter's
device) and copied back when the block ends, also on an error or Ctrl-C; a tied unembedding is untied for
the block (the written checkpoint unties it too) and tied again after.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from abliterate.edit.projection import post_norm_direction, project_out
from abliterate.errors import UsageError
from abliterate.model.ablation import AblationWeights
from abliterate.model.archs import Architecture, Component

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriterParameter:
    """A loaded parameter that writes into the residual stream, and how the checkpoint edit treats it."""

    name: str
    param: nn.Parameter
    component: Component
    layer: int
    axis: int  # the axis indexing the residual stream
    bias: bool


def _fused_experts(name: str, param: nn.Parameter, hidden: int) -> WriterParameter | None:
    """transformers fuses per-expert checkpoint tensors (experts.N.down_proj.weight, each [hidden, in]; Mixtral's
    block_sparse_moe.experts.N.w2, Granite's output_linear) into one [experts, hidden, in] parameter named
    experts.down_proj when it loads them: the MLP writer of its layer, stacked."""
    match = re.fullmatch(r"(?:.*\.)?layers\.(\d+)\..*experts\.down_proj", name)
    if match is None or param.dim() != 3 or hidden not in param.shape[1:]:
        return None
    axis = 1 if param.shape[1] == hidden else 2
    return WriterParameter(name, param, "mlp", int(match.group(1)), axis, False)


def writer_parameters(model: nn.Module, arch: Architecture) -> list[WriterParameter]:
    """Every parameter that writes into the residual stream, as the checkpoint edit classifies it."""
    found: list[WriterParameter] = []
    hidden = int(model.get_input_embeddings().weight.shape[-1])  # type: ignore[operator]
    for name, param in model.named_parameters():
        writer = arch.writer(name)
        if writer is not None:
            found.append(WriterParameter(name, param, writer[0], writer[1], arch.hidden_axis(name, param.dim()),
                                         arch.is_bias(name, param.dim())))
        elif (fused := _fused_experts(name, param, hidden)) is not None:
            found.append(fused)
    if not any(w.component != "embedding" for w in found):
        raise UsageError(f"no residual-writing weights of a {arch.name} model found in memory",
                         hint="use --trial-edit hooks")
    return found


def _direction_for(model: nn.Module, arch: Architecture, writer: WriterParameter, r: torch.Tensor) -> torch.Tensor:
    """r, or r mapped through the writer's post-norms (the same rule as the checkpoint edit)."""
    if writer.component == "embedding":
        return r
    norms = []
    for norm_name, optional in arch.post_norm_tensors(writer.layer, writer.component, writer.name):
        try:
            norms.append(model.get_parameter(norm_name).detach())
        except AttributeError:
            if not optional:
                raise UsageError(f"post-norm {norm_name!r} is missing from the model",
                                 hint="use --trial-edit hooks") from None
    return post_norm_direction(r, norms, arch.norm_offset) if norms else r


@contextmanager
def _untied(model: nn.Module) -> Iterator[None]:
    """If the unembedding shares the embedding's matrix, give it its own copy for the block."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()  # type: ignore[operator]
    if head is None or embed is None or head.weight is not embed.weight:
        yield
        return
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    try:
        yield
    finally:
        head.weight = embed.weight


@contextmanager
def edited_weights(
    model: nn.Module, arch: Architecture, direction: torch.Tensor, weights: AblationWeights | None = None,
    *, norm_preserving: bool = False, per_layer: torch.Tensor | None = None,
) -> Iterator[None]:
    """Edit the model's residual-writing weights as the checkpoint edit would; restore them when the block ends.

    With `per_layer` ([n_layers, hidden]), layer l's writers are edited against its row l, the embedding against
    `direction` (as `Direction.for_layer`).
    """

    def unit(layer: int) -> torch.Tensor:
        vector = direction if per_layer is None or layer < 0 else per_layer[layer]
        return (vector / vector.norm()).to(torch.float32)

    writers = writer_parameters(model, arch)
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    edits_embedding = weights is None or weights.embedding != 0.0
    with torch.no_grad(), (_untied(model) if edits_embedding else _nothing()):
        try:
            for writer in writers:
                w = 1.0 if weights is None else weights.weight(writer.component, writer.layer)
                if w == 0.0:
                    continue
                param = writer.param
                if not param.dtype.is_floating_point:
                    raise UsageError(f"{writer.name} is quantized ({param.dtype})",
                                     hint="use --trial-edit hooks, or load the model without --quantize")
                r = _direction_for(model, arch, writer, unit(writer.layer)).to(param.device)
                rescale = norm_preserving and not writer.bias
                edited = project_out(param.data, r, writer.axis, rescale=rescale, weight=w)
                saved.append((param, param.data.clone()))
                param.data.copy_(edited)
            yield
        finally:
            for param, original in saved:
                param.data.copy_(original)


@contextmanager
def _nothing() -> Iterator[None]:
    yield
