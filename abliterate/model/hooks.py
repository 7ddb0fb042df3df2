"""Forward hooks on a live model, each in a context manager that always removes them.

- `capture_residuals`: sums of the residual stream at the input of every layer, at the last `n_pos`
  positions (the post-instruction template tokens) and at each sequence's first token (the attention sink).
- `directional_ablation`: projects r out of every write into the residual stream (embedding, attention and
  MLP outputs; for post-norm families, the post-norm outputs), the inference-time twin of the weight edit.
- `weighted_ablation`: the same with a weight per write, x - w (x . r) r (the twin of a weighted edit).
- `grouped_directional_ablation`: the same math with one direction per group of batch rows, so that one
  forward pass screens several candidates (the batch holds the same prompts once per candidate).
- `activation_addition`: adds a vector to the residual stream at the input of one layer.
- `count_forwards`: counts the top-level model's forward calls and rows (the cost of a stage).

Hooks compute on the model's device and never wait for the host: captured sums move to the CPU once, when the
caller reads the means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from abliterate.model.ablation import AblationWeights
from abliterate.model.archs import Architecture


def decoder_layers(model: nn.Module, arch: Architecture) -> list[nn.Module]:
    return list(model.get_submodule(arch.layers))  # type: ignore[call-overload]


def _present(layer: nn.Module, names: list[str]) -> list[nn.Module]:
    """The modules of `layer` among `names` (a hybrid layer has some of them; absent or None ones are skipped)."""
    found = []
    for name in names:
        try:
            module = layer.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.Module):
            found.append(module)
    return found


def layer_writers(model: nn.Module, arch: Architecture) -> list[tuple[list[nn.Module], list[nn.Module]]]:
    """Per decoder layer: (attention writers, MLP writers), the modules whose outputs are added to the stream.

    Usually one of each; a hybrid layer has the one of its kind (attention or linear attention / Mamba), and a
    family whose MLP output is a sum of modules (a MoE block plus a shared MLP) lists them all: ablating each
    summand is ablating the sum. Every layer must have at least one of each.
    """
    result = []
    for index, layer in enumerate(decoder_layers(model, arch)):
        attention, mlp = _present(layer, arch.modules("attention")), _present(layer, arch.modules("mlp"))
        if not attention or not mlp:
            raise ValueError(f"layer {index} has no module among {arch.modules('attention')} / {arch.modules('mlp')}")
        result.append((attention, mlp))
    return result


def residual_writers(model: nn.Module, arch: Architecture) -> list[nn.Module]:
    """The modules whose outputs are added to the residual stream, embedding first."""
    writers = [model.get_submodule(arch.embedding)]
    for attention, mlp in layer_writers(model, arch):
        writers += [*attention, *mlp]
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
    """Running float64 sums filled by `capture_residuals`; divide by `count` for means.

    One sum per layer, [n_pos + 1, hidden]: the last `n_pos` positions, then each row's first token. The sums
    stay on the device of their layer (no host sync per layer and batch); `means` and `sink_means` move them to
    the CPU once.
    """

    n_pos: int
    sums: list[torch.Tensor] = field(default_factory=list)  # per layer [n_pos + 1, hidden]
    count: int = 0
    first_token: torch.Tensor | None = None  # per batch: index of each row's first real token

    def means(self) -> torch.Tensor:
        """[n_pos, n_layers, hidden] float64 means, on the CPU."""
        return torch.stack([s[: self.n_pos].cpu() for s in self.sums], dim=1) / self.count

    def sink_means(self) -> torch.Tensor:
        """[n_layers, hidden] float64 means of the first-token activations, on the CPU."""
        return torch.stack([s[self.n_pos].cpu() for s in self.sums]) / self.count

    def add(self, index: int, batch_sum: torch.Tensor) -> None:
        """Add one batch's sum at layer `index` (layers arrive in order on the first batch)."""
        if len(self.sums) <= index:
            self.sums.append(batch_sum)
        else:
            self.sums[index] += batch_sum


class _Positions:
    """Per batch and device: (rows [B, 1], positions [B, n_pos + 1]) that pick the read tokens of every row."""

    def __init__(self, sums: ResidualSums):
        self.sums = sums
        self._batch: tuple[torch.Tensor | None, int, int] | None = None  # (first_token, rows, length)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _same_batch(self, rows: int, length: int) -> bool:
        if self._batch is None:
            return False
        first, seen_rows, seen_length = self._batch
        return first is self.sums.first_token and (seen_rows, seen_length) == (rows, length)

    def on(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, length = hidden.shape[0], hidden.shape[1]
        if not self._same_batch(rows, length):  # a new batch: indices built once, then copied once per device
            self._batch, self._cache = (self.sums.first_token, rows, length), {}
        if hidden.device not in self._cache:
            first = self.sums.first_token
            first = torch.zeros(rows, dtype=torch.long) if first is None else first.to(torch.long).cpu()
            tail = torch.arange(length - self.sums.n_pos, length).expand(rows, -1)
            positions = torch.cat([tail, first.unsqueeze(1)], dim=1)
            self._cache[hidden.device] = (
                torch.arange(rows).unsqueeze(1).to(hidden.device),
                positions.to(hidden.device),
            )
        return self._cache[hidden.device]


def winsorized(vectors: torch.Tensor, quantile: float) -> torch.Tensor:
    """Each vector (last axis) with its entries clamped to +-(the `quantile` of its absolute entries).

    Tames "massive activations" (a few huge coordinates that dominate a mean); quantile 1 returns the input.
    """
    if quantile >= 1.0:
        return vectors
    k = max(1, math.ceil(quantile * vectors.shape[-1]))
    bound = vectors.abs().float().kthvalue(k, dim=-1, keepdim=True).values.to(vectors.dtype)
    return torch.maximum(torch.minimum(vectors, bound), -bound)


@contextmanager
def capture_residuals(
    model: nn.Module, arch: Architecture, n_pos: int, winsorize: float = 1.0
) -> Iterator[ResidualSums]:
    """Accumulate the residual stream at every layer's input; the caller sets `first_token` per batch.

    Each hook is one gather of the read tokens, one float64 sum over the batch and one in-place add, all on the
    layer's device (about 1% of a forward pass on the CPU; on a GPU, no host synchronisation per layer).
    With `winsorize` < 1 each read vector (not the first token's, which the sink cleaning inspects) is
    `winsorized` before it is summed.
    """
    layers = decoder_layers(model, arch)
    sums = ResidualSums(n_pos)
    positions = _Positions(sums)

    def make_hook(index: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = _hidden_from_inputs(args, kwargs).detach()
            rows, columns = positions.on(hidden)
            read = hidden[rows, columns]
            if winsorize < 1.0:
                read = torch.cat([winsorized(read[:, :n_pos], winsorize), read[:, n_pos:]], dim=1)
            sums.add(index, read.sum(dim=0, dtype=torch.float64))

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


def _output_hook(edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[nn.Module, Any, Any], Any]:
    """A forward hook that replaces a module's hidden-state output (alone, or first of a tuple) by `edit` of it."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    return hook


def ablate(hidden: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """hidden - (hidden . r) r along the last axis."""
    return hidden - (hidden @ unit).unsqueeze(-1) * unit


@contextmanager
def directional_ablation(model: nn.Module, arch: Architecture, direction: torch.Tensor) -> Iterator[None]:
    """Project the unit direction out of every residual-stream write while the context is open."""
    unit = _OnDevice(direction / direction.norm())

    hook = _output_hook(lambda hidden: ablate(hidden, unit.like(hidden)))
    handles = [module.register_forward_hook(hook) for module in residual_writers(model, arch)]
    with _hooked(handles):
        yield


def ablate_groups(hidden: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """`ablate` with units[k] applied to the k-th of k equal groups of leading rows of `hidden`."""
    groups = units.shape[0]
    flat = hidden.reshape(groups, -1, hidden.shape[-1])  # row-major: each group's rows (and positions) together
    coefficients = torch.einsum("gnh,gh->gn", flat, units)
    return (flat - coefficients.unsqueeze(-1) * units.unsqueeze(1)).reshape(hidden.shape)


@contextmanager
def grouped_directional_ablation(
    model: nn.Module, arch: Architecture, directions: torch.Tensor, rows_per_group: int
) -> Iterator[None]:
    """Like `directional_ablation`, with directions[k] projected out of batch rows k*rows .. (k+1)*rows - 1.

    Every forward pass inside the context must have exactly len(directions) * rows_per_group rows.
    """
    units = _OnDevice(directions / directions.norm(dim=-1, keepdim=True))
    expected = directions.shape[0] * rows_per_group

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() >= 3 and hidden.shape[0] != expected:
            raise ValueError(f"grouped ablation expects {expected} rows per pass, got {hidden.shape[0]}")
        return ablate_groups(hidden, units.like(hidden))

    hook = _output_hook(edit)
    handles = [module.register_forward_hook(hook) for module in residual_writers(model, arch)]
    with _hooked(handles):
        yield


def weighted_writers(
    model: nn.Module, arch: Architecture, weights: AblationWeights
) -> list[tuple[nn.Module, float, int]]:
    """Each residual writer (as in `residual_writers`) with its ablation weight and layer (-1: the embedding)."""
    layers = layer_writers(model, arch)
    if weights.n_layers != len(layers):
        raise ValueError(f"{weights.n_layers} layers of ablation weights for a model of {len(layers)} layers")
    writers = [(model.get_submodule(arch.embedding), weights.embedding, -1)]
    for layer, ((attention, mlp), w_attention, w_mlp) in enumerate(
        zip(layers, weights.attention, weights.mlp, strict=True)
    ):
        writers += [(module, w_attention, layer) for module in attention] + [(module, w_mlp, layer) for module in mlp]
    return writers


@contextmanager
def weighted_ablation(
    model: nn.Module, arch: Architecture, direction: torch.Tensor, weights: AblationWeights,
    per_layer: torch.Tensor | None = None,
) -> Iterator[None]:
    """Subtract w times the unit direction's component from each residual write (no hook where w = 0).

    With `per_layer` ([n_layers, hidden]), layer l's writers use its row l; the embedding uses `direction`.
    """

    def make_hook(weight: float, vector: torch.Tensor) -> Any:
        unit = _OnDevice(vector / vector.norm())

        def edit(hidden: torch.Tensor) -> torch.Tensor:
            r = unit.like(hidden)
            return hidden - weight * (hidden @ r).unsqueeze(-1) * r

        return _output_hook(edit)

    def vector(layer: int) -> torch.Tensor:
        return direction if per_layer is None or layer < 0 else per_layer[layer]

    handles = [
        module.register_forward_hook(make_hook(weight, vector(layer)))
        for module, weight, layer in weighted_writers(model, arch, weights)
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


@dataclass
class ForwardCount:
    """Forward calls of a model and the batch rows they carried."""

    calls: int = 0
    rows: int = 0

    def __add__(self, other: ForwardCount) -> ForwardCount:
        return ForwardCount(self.calls + other.calls, self.rows + other.rows)


def _rows_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return 0


@contextmanager
def count_forwards(model: nn.Module) -> Iterator[ForwardCount]:
    """Count the calls of `model` itself (not of its submodules) and their rows while the context is open."""
    count = ForwardCount()

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        count.calls += 1
        count.rows += _rows_of(args, kwargs)

    with _hooked([model.register_forward_pre_hook(hook, with_kwargs=True)]):
        yield count
