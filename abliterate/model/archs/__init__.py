"""Architecture registry: one YAML file per model family, looked up by `config.model_type`.

Each file names where the residual stream is written: the embedding, the per-layer modules whose outputs are
added to the residual stream (used by hooks), and the on-disk tensors that do the writing (edited by
`abliterate apply`). Adding a family means adding a YAML file here; see docs/architectures.md.

Hybrid and multimodal families need three more things, all in the YAML: several modules per sub-block
(`attention: [self_attn, linear_attn]`: every one a layer has writes into the stream), a writer's hidden axis
where the default rule does not hold (fused expert stacks stored [experts, in, hidden]), and `aliases`, the
on-disk name prefixes that transformers renames on load (multimodal checkpoints saved by older versions).

A family the registry lacks gets an entry proposed from the loaded model (`model.propose`), which the user
passes as `--arch FILE` (`register_file`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from abliterate.errors import ModelError

Component = Literal["embedding", "attention", "mlp"]


class PostNorms(BaseModel):
    """Norms applied to a sub-block's output before it is added to the residual stream (Gemma 2/3)."""

    model_config = ConfigDict(extra="forbid")
    attention: str
    mlp: str


class PostNorm(BaseModel):
    """One norm (module relative to a layer) between a writer and the residual stream, in a writer's chain."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    module: str
    optional: bool = Field(False, description="only some variants of the family have it: used where its weight is")


class Writer(BaseModel):
    """One on-disk tensor (relative to a layer) that writes into the residual stream, with its layout."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tensor: str = Field(description="tensor name relative to one layer; `*` matches an expert index")
    hidden_axis: int | None = Field(None, description="axis indexing the residual stream (default: the rule)")
    bias: bool = Field(False, description="a bias (one vector per expert): projected, never rescaled")
    post_norms: tuple[str | PostNorm, ...] | None = Field(
        None, description="norms between this tensor's output and the stream, innermost first (default: post_norms)"
    )


def default_hidden_axis(component: Component, ndim: int) -> int:
    """The axis of a stored tensor that indexes the residual stream, unless its writer says otherwise.

    Embedding [vocab, hidden]: the last. Linear weights [hidden, in] and biases [hidden]: the first.
    Fused expert stacks [experts, hidden, in]: the second.
    """
    if component == "embedding":
        return ndim - 1
    return 1 if ndim == 3 else 0


class Architecture(BaseModel):
    """Where one model family reads and writes its residual stream."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    model_types: list[str]
    embedding: str = Field(description="embedding module; its tensor is `<embedding>.weight`")
    lm_head: str = Field(description="unembedding module; its tensor is `<lm_head>.weight`")
    layers: str = Field(description="the ModuleList of decoder layers")
    attention: str | list[str] = Field(
        description="per-layer module(s) whose output is added to the residual stream (every one a layer has)"
    )
    mlp: str | list[str] = Field(
        description="per-layer MLP or MoE module(s) whose output is added to the residual stream"
    )
    writers: dict[Literal["attention", "mlp"], list[str | Writer]]
    post_norms: PostNorms | None = None
    norm_offset: float = 0.0
    aliases: dict[str, str] = Field(
        default_factory=dict, description="on-disk name prefix -> in-memory prefix, as transformers renames on load"
    )

    @property
    def attention_modules(self) -> list[str]:
        return [self.attention] if isinstance(self.attention, str) else list(self.attention)

    @property
    def mlp_modules(self) -> list[str]:
        return [self.mlp] if isinstance(self.mlp, str) else list(self.mlp)

    def modules(self, component: Literal["attention", "mlp"]) -> list[str]:
        """The per-layer modules whose outputs `component` adds to the stream (post-norms where there are).

        With post-norms: the outermost norm of every writer's chain (e.g. Gemma 4's MLP, MoE and per-layer
        input all end in a norm whose output is added), each once.
        """
        chains = [self.norm_chain(spec, component) for spec in self.writer_entries(component)]
        outer = [chain[-1].module for chain in chains if chain]
        if outer:
            return list(dict.fromkeys(outer))
        return self.attention_modules if component == "attention" else self.mlp_modules

    def writer_entries(self, component: Literal["attention", "mlp"]) -> list[Writer]:
        """The writer entries of `component`, plain tensor names read as `Writer`s."""
        return [Writer(tensor=e) if isinstance(e, str) else e for e in self.writers.get(component, [])]

    def norm_chain(self, spec: Writer, component: Component | None = None) -> list[PostNorm]:
        """The norms between a writer's output and the stream, innermost first: its own, else the component's."""
        if spec.post_norms is not None:
            return [PostNorm(module=n) if isinstance(n, str) else n for n in spec.post_norms]
        found = component or self._component_of(spec)
        if self.post_norms is None or found is None or found == "embedding":
            return []
        return [PostNorm(module=getattr(self.post_norms, found))]

    def _component_of(self, spec: Writer) -> Literal["attention", "mlp"] | None:
        for component in ("attention", "mlp"):
            if spec in self.writer_entries(component):
                return component
        return None

    def post_norm_tensors(self, layer: int, component: Component, tensor: str | None = None) -> list[tuple[str, bool]]:
        """(norm weight name, optional) per norm between a writer and the stream, innermost first (in-memory names).

        `tensor` (on-disk name of the writer) picks its own chain; without it, or for a tensor that is not one
        of `component`'s writers, the component's post-norm (if any).
        """
        if component == "embedding":
            return []
        spec = Writer(tensor="")
        found = None if tensor is None else self.writer(tensor)
        if found is not None and found[0] == component:
            spec = found[2]
        return [(f"{self.layers}.{layer}.{n.module}.weight", n.optional) for n in self.norm_chain(spec, component)]

    def canonical(self, tensor_name: str) -> str:
        """An on-disk tensor name in the in-memory naming (the first matching alias prefix replaced)."""
        for disk, memory in self.aliases.items():
            if tensor_name.startswith(disk):
                return memory + tensor_name[len(disk) :]
        return tensor_name

    def on_disk(self, canonical: str, names: Collection[str]) -> str | None:
        """The name `canonical` (in-memory naming) has among `names`, directly or through an alias; else None."""
        if canonical in names:
            return canonical
        for disk, memory in self.aliases.items():
            if canonical.startswith(memory) and disk + canonical[len(memory) :] in names:
                return disk + canonical[len(memory) :]
        return None

    @property
    def embedding_tensor(self) -> str:
        return f"{self.embedding}.weight"

    @property
    def lm_head_tensor(self) -> str:
        return f"{self.lm_head}.weight"

    def post_norm_tensor(self, layer: int, component: Component) -> str | None:
        """On-disk name of the norm weight between `component`'s output and the residual stream, if any."""
        if self.post_norms is None or component == "embedding":
            return None
        return f"{self.layers}.{layer}.{getattr(self.post_norms, component)}.weight"

    def classify(self, tensor_name: str) -> tuple[Component, int] | None:
        """Return (component, layer) if `tensor_name` writes into the residual stream, else None.

        The embedding is reported with layer -1. On-disk names are read through `aliases`.
        """
        found = self.writer(tensor_name)
        return None if found is None else (found[0], found[1])

    def writer(self, tensor_name: str) -> tuple[Component, int, Writer] | None:
        """(component, layer, writer entry) of a residual-writing tensor, else None."""
        name = self.canonical(tensor_name)
        if name == self.embedding_tensor:
            return "embedding", -1, Writer(tensor=name)
        match = _layer_pattern(self.layers).match(name)
        if match is None:
            return None
        layer, rest = int(match.group(1)), match.group(2)
        for component, entries in self.writers.items():
            for entry in entries:
                spec = Writer(tensor=entry) if isinstance(entry, str) else entry
                if fnmatch.fnmatchcase(rest, spec.tensor):
                    return component, layer, spec
        return None

    def hidden_axis(self, tensor_name: str, ndim: int) -> int:
        """The axis of a residual-writing tensor that indexes the stream: its writer's, else the default rule."""
        found = self.writer(tensor_name)
        if found is None:
            raise KeyError(tensor_name)
        component, _layer, spec = found
        if spec.hidden_axis is not None:
            return spec.hidden_axis % ndim
        return default_hidden_axis(component, ndim)

    def is_bias(self, tensor_name: str, ndim: int) -> bool:
        """Whether a residual-writing tensor is a bias (1-D, or one bias per expert): never rescaled."""
        found = self.writer(tensor_name)
        return ndim == 1 or (found is not None and found[2].bias)


@cache
def _layer_pattern(layers: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(layers)}\.(\d+)\.(.+)$")


@cache
def _registry() -> dict[str, Architecture]:
    table: dict[str, Architecture] = {}
    for entry in resources.files(__package__).iterdir():
        if entry.name.endswith(".yaml"):
            arch = Architecture.model_validate(yaml.safe_load(entry.read_text(encoding="utf-8")))
            for model_type in arch.model_types:
                table[model_type] = arch
    return table


_USER: dict[str, Architecture] = {}


def load_file(path: Path) -> Architecture:
    """Read and check a user's entry (`--arch FILE`, e.g. one written by `abliterate arch-propose`)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        return Architecture.model_validate(data)
    except OSError as err:
        raise ModelError(f"cannot read --arch file {path}: {err.strerror}", hint="check the path") from None
    except (yaml.YAMLError, ValidationError) as err:
        first = str(err).splitlines()[:3]
        raise ModelError(
            f"--arch file {path} is not a registry entry: {' '.join(line.strip() for line in first)}",
            hint="fix the file; see docs/architectures.md for its fields",
        ) from None


def register_file(path: Path) -> Architecture:
    """Use a user's entry for its `model_types`, ahead of the shipped files (for this process)."""
    arch = load_file(path)
    for model_type in arch.model_types:
        _USER[model_type] = arch
    return arch


def supported_model_types() -> list[str]:
    """Every `model_type` the registry knows (shipped files and registered user files), sorted."""
    return sorted({*_registry(), *_USER})


def lookup(model_type: str) -> Architecture:
    """The architecture for a `config.model_type`; unknown families fail with the way to propose one."""
    if model_type in _USER:
        return _USER[model_type]
    try:
        return _registry()[model_type]
    except KeyError:
        raise ModelError(
            f"unsupported model family {model_type!r}",
            hint="propose an entry with `abliterate arch-propose MODEL > fam.yaml`, check it, then pass "
            f"--arch fam.yaml (docs/architectures.md); supported: {', '.join(supported_model_types())}",
        ) from None
