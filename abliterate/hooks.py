"""Forward hooks on a live model, each in a context manager that always removes them.

- `capture_residuals`: sums of the residual stream at the input of every layer, at the last `n_pos`
  positions (the post-instruction template tokens) and at each sequence's first token (the attention sink).
- `directional_ablation`: projects r out of every write into the residual stream (embedding, attention and
  MLP outputs; for post-norm families, the post-norm outputs), the inference-time twin of the weight edit.
- `weighted_ablation`: the same with a weight per write, x - w (x . r) r (the twin of a weighted edit).
- `activation_addition`: adds a vector to the residual stream at the input of one layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from abliterate.archs import Architecture
from abliterate.direction import AblationWeights


def decoder_layers(model: nn.Module, arch: Architecture) -> list[nn.Module]:
    return list(model.get_submodule(arch.layers))  # type: ignore[call-overload]


def residual_writers(model: nn.Module, arch: Architecture) -> list[nn.Module]:
    """The modules whose outputs are added to the residual stream, embedding first."""
    attention, mlp = arch.attention, arch.mlp
    if arch.post_norms is not None:
        attention, mlp = arch.post_norms.attention, arch.post_norms.mlp
    writers = [model.get_submodule(arch.embedding)]
    for layer in decoder_layers(model, arch):
        writers += [layer.get_submodule(attention), layer.get_submodule(mlp)]
    return writers


def _hidden_from_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    hidden = args[0] if args else kwargs["hidden_states"]
    assert isinstance(hidden, torch.Tensor)
    return hidden


def _replace_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextmanager
def _hooked(handles: list[RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ResidualSums:
    """Running float64 sums filled by `capture_residuals`; divide by `count` for means."""

    n_pos: int
    sums: list[torch.Tensor] = field(default_factory=list)  # per layer [n_pos, hidden]
    sink_sums: list[torch.Tensor] = field(default_factory=list)  # per layer [hidden]
    count: int = 0
    first_token: torch.Tensor | None = None  # per batch: index of each row's first real token

    def means(self) -> torch.Tensor:
        """[n_pos, n_layers, hidden] float64 means."""
        return torch.stack(self.sums, dim=1) / self.count

    def sink_means(self) -> torch.Tensor:
        """[n_layers, hidden] float64 means of the first-token activations."""
        return torch.stack(self.sink_sums) / self.count


@contextmanager
def capture_residuals(model: nn.Module, arch: Architecture, n_pos: int) -> Iterator[ResidualSums]:
    """Accumulate the residual stream at every layer's input; the caller sets `first_token` per batch."""
    layers = decoder_layers(model, arch)
    sums = ResidualSums(n_pos)

    def make_hook(index: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = _hidden_from_inputs(args, kwargs).detach()
            tail = hidden[:, -n_pos:, :].to(torch.float64).sum(dim=0).cpu()
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            first = sums.first_token if sums.first_token is not None else torch.zeros_like(rows)
            sink = hidden[rows, first.to(hidden.device)].to(torch.float64).sum(dim=0).cpu()
            if len(sums.sums) <= index:
                sums.sums.append(tail)
                sums.sink_sums.append(sink)
            else:
                sums.sums[index] += tail
                sums.sink_sums[index] += sink

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with _hooked(handles):
        yield sums


class _OnDevice:
    """A vector cached per device and dtype, for models spread over several GPUs."""

    def __init__(self, vector: torch.Tensor):
        self.vector = vector
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.device, tensor.dtype)
        if key not in self._cache:
            self._cache[key] = self.vector.to(device=tensor.device, dtype=tensor.dtype)
        return self._cache[key]


def ablate(hidden: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """hidden - (hidden . r) r along the last axis."""
    return hidden - (hidden @ unit).unsqueeze(-1) * unit


@contextmanager
def directional_ablation(model: nn.Module, arch: Architecture, direction: torch.Tensor) -> Iterator[None]:
    """Project the unit direction out of every residual-stream write while the context is open."""
    unit = _OnDevice(direction / direction.norm())

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (ablate(output[0], unit.like(output[0])), *output[1:])
        return ablate(output, unit.like(output))

    handles = [module.register_forward_hook(hook) for module in residual_writers(model, arch)]
    with _hooked(handles):
        yield


def weighted_writers(
    model: nn.Module, arch: Architecture, weights: AblationWeights
) -> list[tuple[nn.Module, float]]:
    """Each residual writer (as in `residual_writers`) with its ablation weight."""
    writers = residual_writers(model, arch)
    n_layers = (len(writers) - 1) // 2
    if weights.n_layers != n_layers:
        raise ValueError(f"{weights.n_layers} layers of ablation weights for a model of {n_layers} layers")
    per_layer = [w for pair in zip(weights.attention, weights.mlp, strict=True) for w in pair]
    return list(zip(writers, [weights.embedding, *per_layer], strict=True))


@contextmanager
def weighted_ablation(
    model: nn.Module, arch: Architecture, direction: torch.Tensor, weights: AblationWeights
) -> Iterator[None]:
    """Subtract w times the unit direction's component from each residual write (no hook where w = 0)."""
    unit = _OnDevice(direction / direction.norm())

    def make_hook(weight: float) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            r = unit.like(hidden)
            edited = hidden - weight * (hidden @ r).unsqueeze(-1) * r
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook

    handles = [
        module.register_forward_hook(make_hook(weight))
        for module, weight in weighted_writers(model, arch, weights)
        if weight != 0.0
    ]
    with _hooked(handles):
        yield


@contextmanager
def activation_addition(model: nn.Module, arch: Architecture, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """Add `vector` to the residual stream at the input of `layer`, at every position."""
    added = _OnDevice(vector)

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = _hidden_from_inputs(args, kwargs)
        return _replace_hidden(args, kwargs, hidden + added.like(hidden))

    handle = decoder_layers(model, arch)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    with _hooked([handle]):
        yield
