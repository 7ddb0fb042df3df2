"""Propose a registry entry for a family the registry lacks, from the loaded model itself (`arch-propose`).

Three checks on one random token batch, each a fact of the forward pass rather than of module names:

1. Residual writers: every direct child of a decoder layer is hooked; the children whose outputs, summed with
   the layer input (least squares, any coefficient: Granite scales them), reproduce the layer output are the
   modules added to the stream. A norm among them is a post-norm; the child whose output it normalizes is the
   sub-block, and its gain (w or 1 + w) gives `norm_offset`. The first sub-block called is `attention` (with
   any other reading the same input), the rest `mlp`.
2. Writer tensors: a random unit r is projected out of every parameter axis of those modules that has the
   hidden size; one at a time, a projection is undone and kept undone if the module's output stays orthogonal to
   r. What is left is the set of (parameter, axis) pairs that write into the stream.
3. On-disk names: the parameters are marked (writers by an arange along their hidden axis, all else zero) and
   saved by transformers itself, which writes the checkpoint layout (split experts, renamed modules); the
   marked tensors name the writers on disk and their hidden axis. Embedding names give the aliases.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from torch import nn

from abliterate.errors import ModelError
from abliterate.model.archs import Architecture, Component, default_hidden_axis
from abliterate.model.checkpoint import Checkpoint
from abliterate.model.loading import auto_model_class

log = logging.getLogger(__name__)

_TOL = 1e-4  # relative: float32 noise is ~1e-6, a missed writer leaves ~1e-1
_MARKS = {("attention", False): 3, ("attention", True): 4, ("mlp", False): 5, ("mlp", True): 6}
_EMBEDDING_MARK = 1


@dataclass
class Call:
    """What one child of a decoder layer received and returned in the probe forward pass."""

    order: int
    inputs: torch.Tensor | None
    output: torch.Tensor | None


@dataclass
class LayerFinding:
    """The sub-blocks of one decoder layer: modules added to the stream, and their post-norms if any."""

    attention: list[str]
    mlp: list[str]
    post_norms: tuple[str, str] | None = None
    norm_offset: float = 0.0
    coefficients: dict[str, float] = field(default_factory=dict)


def _tensor(value: Any) -> torch.Tensor | None:
    """A copy of the first tensor of a module's output (a tensor, a tuple, or a ModelOutput).

    A copy: some callers add into a module's output in place (Llama 4's MoE into its shared expert's).
    """
    found = None
    if isinstance(value, torch.Tensor):
        found = value
    elif isinstance(value, (tuple, list)):
        found = next((v for v in value if isinstance(v, torch.Tensor)), None)
    elif hasattr(value, "values"):
        found = next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
    return None if found is None else found.detach().clone()


def _as(output: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """`output` in the shape of the layer's update if it is one (a MoE may return it flattened to tokens)."""
    if output is None or output.numel() != like.numel() or output.shape[-1] != like.shape[-1]:
        return None
    return output.reshape(like.shape)


def _hidden_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)


def text_config(model: nn.Module) -> Any:
    config: Any = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def probe_ids(model: nn.Module, rows: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    """Random token ids that avoid every special id the configs name (image tokens would need pixels)."""
    vocab = int(text_config(model).vocab_size)
    special: set[int] = set()
    configs: tuple[Any, Any] = (model.config, text_config(model))
    for config in configs:
        for key, value in config.to_dict().items():
            if isinstance(value, int) and ("token_id" in key or "token_index" in key):
                special.add(value)
    allowed = torch.tensor([i for i in range(min(vocab, 4096)) if i not in special])
    pick = torch.randint(0, len(allowed), (rows, length), generator=torch.Generator().manual_seed(seed))
    return allowed[pick]


def _forward(model: nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)


def module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    return next((name for name, module in model.named_modules() if module is target), None)


def find_layers(model: nn.Module, ids: torch.Tensor) -> str:
    """The ModuleList of decoder layers: num_hidden_layers long, and run by a text-only forward pass."""
    n_layers = int(text_config(model).num_hidden_layers)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    called: list[str] = []
    handles = [m[0].register_forward_pre_hook(lambda *_a, n=n: called.append(n)) for n, m in lists]
    try:
        _forward(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    if not called:
        raise ModelError(f"no list of {n_layers} layers runs in a forward pass", hint="write the entry by hand")
    return called[0]


def trace_layer(model: nn.Module, layers: str, index: int, ids: torch.Tensor) -> tuple[dict[str, Call], torch.Tensor]:
    """Every direct child's input and output, and the layer's output minus its input, in one forward pass."""
    layer = model.get_submodule(f"{layers}.{index}")
    calls: dict[str, Call] = {}
    edges: dict[str, torch.Tensor] = {}

    def child_hook(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            calls[name] = Call(len(calls), _hidden_input(args, kwargs), _tensor(output))

        return hook

    def layer_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        edges["in"], edges["out"] = _hidden_input(args, kwargs), _tensor(output)  # type: ignore[assignment]

    handles = [c.register_forward_hook(child_hook(n), with_kwargs=True) for n, c in layer.named_children()]
    handles.append(layer.register_forward_hook(layer_hook, with_kwargs=True))
    try:
        _forward(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return calls, (edges["out"] - edges["in"]).double()


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return False
    return bool((a.double() - b.double()).norm() <= 1e-5 * (b.double().norm() + 1e-12))


def added_children(calls: dict[str, Call], delta: torch.Tensor) -> dict[str, float]:
    """The children whose outputs, each times a coefficient, sum to the layer's update; in call order."""
    names: list[str] = []
    for name, call in sorted(calls.items(), key=lambda item: item[1].order):
        call.output = _as(call.output, delta)
        if call.output is None:
            continue
        if any(_close(call.output, calls[kept].output) for kept in names):  # dropout, identity: keep the producer
            continue
        names.append(name)
    if not names:
        return {}
    a = torch.stack([calls[n].output.double().flatten() for n in names], dim=1)  # type: ignore[union-attr]
    coef = torch.linalg.lstsq(a, delta.flatten().unsqueeze(1)).solution.squeeze(1)
    chosen = [n for n, c in zip(names, coef.tolist(), strict=True) if abs(c) > 1e-3]
    if not chosen:
        return {}
    a = torch.stack([calls[n].output.double().flatten() for n in chosen], dim=1)  # type: ignore[union-attr]
    coef = torch.linalg.lstsq(a, delta.flatten().unsqueeze(1)).solution.squeeze(1)
    if float((a @ coef - delta.flatten()).norm() / delta.norm()) > _TOL:
        return {}
    return dict(zip(chosen, coef.tolist(), strict=True))


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def norm_offset(norm: nn.Module, call: Call) -> float | None:
    """0 or 1: the gain (offset + w) that turns the RMS-normalized input into the norm's output, else None."""
    weight = getattr(norm, "weight", None)
    if call.inputs is None or call.output is None or not isinstance(weight, torch.Tensor):
        return None
    x = call.inputs.double()
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    for offset in (0.0, 1.0):
        if _close(normed * (offset + weight.double()), call.output):
            return offset
    return None


def _producer(calls: dict[str, Call], norm: str) -> str | None:
    """The child whose output the post-norm `norm` normalizes."""
    return next((n for n, c in calls.items() if n != norm and _close(c.output, calls[norm].inputs)), None)


def classify_layer(layer: nn.Module, calls: dict[str, Call], delta: torch.Tensor, index: int) -> LayerFinding:
    """Split the added children into attention and MLP sub-blocks, through post-norms where there are."""
    added = added_children(calls, delta)
    if len(added) < 2:
        raise ModelError(
            f"layer {index}: no two children of the decoder layer add up to its update",
            hint="the layer may nest its sub-blocks; write the entry by hand (docs/architectures.md)",
        )
    order = list(added)
    first = calls[order[0]]
    attention = [n for n in order if n == order[0] or _close(calls[n].inputs, first.inputs)]
    if len(attention) == len(order):  # parallel block (attention and MLP read one input): the first is attention
        attention = order[:1]
    mlp = [n for n in order if n not in attention]
    norms = [n for n in order if _is_norm(layer.get_submodule(n))]
    if not norms:
        return LayerFinding(attention, mlp, coefficients=added)
    if len(attention) != 1 or len(mlp) != 1 or len(norms) != 2:
        raise ModelError(f"layer {index}: post-norms {norms} around several modules", hint="write the entry by hand")
    inner = [_producer(calls, attention[0]), _producer(calls, mlp[0])]
    offsets = {norm_offset(layer.get_submodule(n), calls[n]) for n in norms}
    offset = offsets.pop() if len(offsets) == 1 else None
    if inner[0] is None or inner[1] is None or offset is None:
        raise ModelError(f"layer {index}: post-norms {norms} of an unknown form", hint="write the entry by hand")
    return LayerFinding([inner[0]], [inner[1]], (attention[0], mlp[0]), offset, coefficients=added)


def _project(param: torch.Tensor, axes: set[int], r: torch.Tensor) -> torch.Tensor:
    for axis in axes:
        moved = param.movedim(axis, -1)
        param = (moved - (moved @ r).unsqueeze(-1) * r).movedim(-1, axis)
    return param


@dataclass(frozen=True)
class Candidate:
    """One axis of one parameter of a residual-writing module (full in-memory names)."""

    module: str
    param: str
    axis: int
    component: str


def _orthogonal(output: torch.Tensor, r: torch.Tensor) -> bool:
    out = output.double()
    return bool((out @ r.double()).abs().max() <= _TOL * out.norm(dim=-1).max())


def writer_params(model: nn.Module, modules: dict[str, str], hidden: int, ids: torch.Tensor) -> set[Candidate]:
    """The (parameter, axis) pairs that must lose r for each module's output to be orthogonal to r."""
    r = torch.randn(hidden, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    r = (r / r.norm()).float().to(next(model.parameters()).device)
    params = dict(model.named_parameters())
    active = {
        Candidate(m, f"{m}.{p}", axis, component)
        for m, component in modules.items()
        for p, value in model.get_submodule(m).named_parameters()
        for axis, size in enumerate(value.shape)
        if size == hidden and value.is_floating_point()
    }
    originals = {c.param: params[c.param].detach().clone() for c in active}
    outputs: dict[str, torch.Tensor | None] = {}
    handles = [
        model.get_submodule(m).register_forward_hook(lambda _m, _i, o, m=m: outputs.__setitem__(m, _tensor(o)))
        for m in modules
    ]

    def set_param(name: str) -> None:
        axes = {c.axis for c in active if c.param == name}
        with torch.no_grad():
            params[name].copy_(_project(originals[name], axes, r))

    def all_orthogonal() -> bool:
        _forward(model, ids)
        return all(_orthogonal(o, r) for o in outputs.values() if o is not None)

    try:
        for name in originals:
            set_param(name)
        for candidate in sorted(active, key=lambda c: (c.param, c.axis)):
            active.discard(candidate)
            set_param(candidate.param)
            if not all_orthogonal():
                active.add(candidate)
                set_param(candidate.param)
        if not all_orthogonal():
            raise ModelError("a residual-writing module's output is not linear in its parameters",
                             hint="write the entry by hand (docs/architectures.md)")
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, value in originals.items():
                params[name].copy_(value)
    return active


def _unit(hidden: int) -> int:
    return 1 << max(hidden - 1, 1).bit_length()


def mark(model: nn.Module, writers: set[Candidate], embedding: str, hidden: int) -> None:
    """Zero every parameter, then fill the embedding and each writer with mark * unit + arange along hidden."""
    unit = _unit(hidden)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for value in model.parameters():
            value.zero_()
        fills = [(f"{embedding}.weight", -1, _EMBEDDING_MARK)]
        fills += [(c.param, c.axis, _MARKS[(c.component, c.param.endswith("bias"))]) for c in writers]
        for name, axis, tag in fills:
            value = params[name]
            shape = [1] * value.ndim
            shape[axis] = hidden
            ramp = torch.arange(hidden, dtype=value.dtype, device=value.device).reshape(shape)
            value.copy_((tag * unit + ramp).expand_as(value))


def read_marks(tensor: torch.Tensor, hidden: int) -> tuple[int, int] | None:
    """(mark, hidden axis) of a saved tensor; None if unmarked; raises on a tensor only partly marked."""
    if not tensor.is_floating_point() or not bool(tensor.any()):
        return None
    unit = _unit(hidden)
    values = tensor.double()
    for axis, size in enumerate(values.shape):
        if size != hidden:
            continue
        shape = [1] * values.ndim
        shape[axis] = hidden
        ramp = torch.arange(hidden, dtype=torch.float64).reshape(shape)
        tags = (values - ramp) / unit
        tag = float(tags.flatten()[0])
        if bool((tags == tag).all()) and tag == int(tag):
            return int(tag), axis
    raise ModelError("a stored tensor mixes residual writers and other weights (a fused projection)",
                     hint="write the entry by hand, with a writer per part")


def _real_name(saved: str, names: set[str]) -> str:
    """`saved` in the real checkpoint: itself, else the one name sharing its longest dotted tail."""
    if saved in names:
        return saved
    parts = saved.split(".")
    for start in range(len(parts)):
        tail = ".".join(parts[start:])
        found = [n for n in names if n.endswith("." + tail)]
        if len(found) == 1:
            return found[0]
    return saved


def alias(disk: str, memory: str) -> tuple[str, str] | None:
    """The prefix rename (on disk -> in memory) that turns `disk` into `memory`, if they differ."""
    if disk == memory:
        return None
    d, m = disk.split("."), memory.split(".")
    common = 0
    while common < min(len(d), len(m) - 1) and d[-1 - common] == m[-1 - common]:  # keep a memory prefix
        common += 1
    return ".".join(d[: len(d) - common]) + ".", ".".join(m[: len(m) - common]) + "."


def on_disk_writers(
    model: nn.Module, writers: set[Candidate], embedding: str, hidden: int, real: set[str]
) -> tuple[dict[str, tuple[int, int, int]], str | None]:
    """Saved (transformers' own layout) marked writers: real name -> (mark, hidden axis, ndim); embedding name."""
    mark(model, writers, embedding, hidden)
    found: dict[str, tuple[int, int, int]] = {}
    embedding_disk = None
    with tempfile.TemporaryDirectory(prefix="abliterate-propose-") as folder:
        model.save_pretrained(folder)  # type: ignore[operator]
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(path), "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    marked = read_marks(handle.get_tensor(name), hidden)
                    if marked is None:
                        continue
                    disk = _real_name(name, real)
                    if marked[0] == _EMBEDDING_MARK:
                        embedding_disk = disk
                    else:
                        found[disk] = (marked[0], marked[1], handle.get_slice(name).get_shape().__len__())
    return found, embedding_disk


def embedding_only(model: nn.Module, embedding: str, layers: str, ids: torch.Tensor) -> bool:
    """Whether the first layer's input is the token embedding's output times a scalar (no position embedding)."""
    seen: dict[str, torch.Tensor | None] = {}
    handles = [
        model.get_submodule(embedding).register_forward_hook(lambda _m, _i, o: seen.__setitem__("emb", _tensor(o))),
        model.get_submodule(f"{layers}.0").register_forward_pre_hook(
            lambda _m, a, k: seen.__setitem__("in", _hidden_input(a, k)), with_kwargs=True
        ),
    ]
    try:
        _forward(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    emb, first = seen.get("emb"), seen.get("in")
    if emb is None or first is None or emb.shape != first.shape:
        return False
    e, x = emb.double().flatten(), first.double().flatten()
    scale = (x @ e) / (e @ e)
    return bool((x - scale * e).norm() <= _TOL * x.norm())


def _one_or_list(names: list[str]) -> str | list[str]:
    return names[0] if len(names) == 1 else names


def _writer_entry(relative: str, mark_: int, axis: int, ndim: int) -> tuple[str, str | dict[str, Any]]:
    component: Component = "attention" if mark_ in (3, 4) else "mlp"
    bias = mark_ in (4, 6)
    if axis == default_hidden_axis(component, ndim) and not (bias and ndim > 1):
        return component, relative
    entry: dict[str, Any] = {"tensor": relative, "hidden_axis": axis - ndim if axis == ndim - 1 else axis}
    if bias:
        entry["bias"] = True
    return component, entry


def _layer_relative(name: str, layers: str) -> str | None:
    match = re.match(rf"^{re.escape(layers)}\.\d+\.(.+)$", name)
    return None if match is None else re.sub(r"\.\d+\.", ".*.", "." + match.group(1) + ".")[1:-1]


@dataclass
class Proposal:
    """A proposed registry entry and what the checks saw that a reader should know."""

    entry: dict[str, Any]
    notes: list[str]

    def to_yaml(self, source: str) -> str:
        head = [f"# Proposed by `abliterate arch-propose {source}` from hooks on the loaded model: check it, then",
                "# pass it with --arch FILE (docs/architectures.md)."] + [f"# {note}" for note in self.notes]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.entry, sort_keys=False, width=120)


def _merge(found: dict[str, list[str]], names: list[str], key: str) -> None:
    for name in names:
        if name not in found[key]:
            found[key].append(name)


@dataclass
class _Survey:
    """What tracing every decoder layer found: writer modules, post-norms, norm offsets and writer parameters."""

    found: dict[str, list[str]] = field(default_factory=lambda: {"attention": [], "mlp": []})
    post_norms: set[tuple[str, str]] = field(default_factory=set)
    offsets: set[float] = field(default_factory=set)
    writers_at: dict[str, str] = field(default_factory=dict)


def _survey_layers(model: nn.Module, layers: str, ids: torch.Tensor, notes: list[str]) -> _Survey:
    """Trace each decoder layer and classify what writes into the residual stream."""
    survey = _Survey()
    decoder_layers: Any = model.get_submodule(layers)
    for index, layer in enumerate(decoder_layers):
        calls, delta = trace_layer(model, layers, index, ids)
        finding = classify_layer(layer, calls, delta, index)
        _merge(survey.found, finding.attention, "attention")
        _merge(survey.found, finding.mlp, "mlp")
        if finding.post_norms is not None:
            survey.post_norms.add(finding.post_norms)
            survey.offsets.add(finding.norm_offset)
        scaled = {n: round(c, 4) for n, c in finding.coefficients.items() if abs(c - 1) > 1e-3}
        if scaled:
            notes.append(f"layer {index} adds {scaled} (scaled residual add: editing the writers stays exact)")
        for name in finding.attention:
            survey.writers_at[f"{layers}.{index}.{name}"] = "attention"
        for name in finding.mlp:
            survey.writers_at[f"{layers}.{index}.{name}"] = "mlp"
    if len(survey.post_norms) > 1 or len(survey.offsets) > 1:
        raise ModelError("layers disagree on their post-norms", hint="write the entry by hand")
    return survey


def _disk_aliases(
    embedding_disk: str | None, embedding: str, lm_head: str, tensor_names: set[str]
) -> dict[str, str]:
    """Prefixes that map the checkpoint's tensor names onto the loaded model's module names."""
    aliases: dict[str, str] = {}
    if embedding_disk is not None and (embedding_alias := alias(embedding_disk, f"{embedding}.weight")) is not None:
        aliases[embedding_alias[0]] = embedding_alias[1]
    lm_disk = _real_name(f"{lm_head}.weight", tensor_names)
    if lm_disk in tensor_names and (lm_alias := alias(lm_disk, f"{lm_head}.weight")) is not None:
        aliases[lm_alias[0]] = lm_alias[1]
    return aliases


def _entry_writers(
    real: dict[str, tuple[int, int, int]], aliases: dict[str, str], layers: str, notes: list[str]
) -> dict[str, list[str | dict[str, Any]]]:
    """The `writers` of the entry: each on-disk writer, renamed to the model's names and made layer-relative."""
    entry_writers: dict[str, list[str | dict[str, Any]]] = {"attention": [], "mlp": []}
    for disk, (tag, axis, ndim) in sorted(real.items()):
        canonical = next((memory + disk[len(prefix):] for prefix, memory in aliases.items()
                          if disk.startswith(prefix)), disk)
        relative = _layer_relative(canonical, layers)
        if relative is None:
            notes.append(f"{disk} writes to the stream outside the decoder layers: not listed")
            continue
        component, value = _writer_entry(relative, tag, axis, ndim)
        if value not in entry_writers[component]:
            entry_writers[component].append(value)
    return entry_writers


def propose(model: nn.Module, model_type: str, tensor_names: set[str]) -> Proposal:
    """Propose the registry entry of `model` (loaded in float32), whose checkpoint holds `tensor_names`.

    The model's parameters are overwritten (marked) at the end: load it again to use it.
    """
    ids = probe_ids(model)
    hidden = int(text_config(model).hidden_size)
    embedding = module_name(model, model.get_input_embeddings())  # type: ignore[operator]
    lm_head = module_name(model, model.get_output_embeddings())  # type: ignore[operator]
    if embedding is None or lm_head is None:
        raise ModelError("the model names no input/output embeddings", hint="write the entry by hand")
    layers = find_layers(model, ids)
    notes: list[str] = []
    if not embedding_only(model, embedding, layers, ids):
        notes.append("WARNING: something besides the token embedding writes the first layer's input (a position "
                     "embedding?): the registry cannot edit it, so an edit will not equal the ablation")
        log.warning("%s: the first layer's input is not the token embedding alone", model_type)
    survey = _survey_layers(model, layers, ids, notes)
    writers = writer_params(model, survey.writers_at, hidden, ids)
    real, embedding_disk = on_disk_writers(model, writers, embedding, hidden, tensor_names)
    aliases = _disk_aliases(embedding_disk, embedding, lm_head, tensor_names)
    entry: dict[str, Any] = {
        "name": model_type, "model_types": [model_type], "embedding": embedding, "lm_head": lm_head,
        "layers": layers, "attention": _one_or_list(survey.found["attention"]),
        "mlp": _one_or_list(survey.found["mlp"]), "writers": _entry_writers(real, aliases, layers, notes),
    }
    if survey.post_norms:
        attention_norm, mlp_norm = survey.post_norms.pop()
        entry["post_norms"] = {"attention": attention_norm, "mlp": mlp_norm}
        entry["norm_offset"] = survey.offsets.pop()
    if aliases:
        entry["aliases"] = aliases
    Architecture.model_validate(entry)
    return Proposal(entry, notes)


def propose_for(folder: Path, model_type: str, *, trust_remote_code: bool = False) -> Proposal:
    """Load the model in `folder` in float32 on the CPU and propose its entry."""
    model = auto_model_class(folder).from_pretrained(folder, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    log.info("proposing a registry entry for %s (%s) from hooks on the loaded model", folder, model_type)
    return propose(model, model_type, set(Checkpoint.open(folder).tensors))
