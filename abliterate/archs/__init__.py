"""Architecture registry: one YAML file per model family, looked up by `config.model_type`.

Each file names where the residual stream is written: the embedding, the per-layer modules whose outputs are
added to the residual stream (used by hooks), and the on-disk tensors that do the writing (edited by
`abliterate apply`). Adding a family means adding a YAML file here; see docs/architectures.md.
"""

from __future__ import annotations

import fnmatch
import re
from functools import cache
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from abliterate.errors import ModelError

Component = Literal["embedding", "attention", "mlp"]


class PostNorms(BaseModel):
    """Norms applied to a sub-block's output before it is added to the residual stream (Gemma 2/3)."""

    model_config = ConfigDict(extra="forbid")
    attention: str
    mlp: str


class Architecture(BaseModel):
    """Where one model family reads and writes its residual stream."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    model_types: list[str]
    embedding: str = Field(description="embedding module; its tensor is `<embedding>.weight`")
    lm_head: str = Field(description="unembedding module; its tensor is `<lm_head>.weight`")
    layers: str = Field(description="the ModuleList of decoder layers")
    attention: str = Field(description="per-layer module whose output is added to the residual stream")
    mlp: str = Field(description="per-layer MLP or MoE block whose output is added to the residual stream")
    writers: dict[Literal["attention", "mlp"], list[str]]
    post_norms: PostNorms | None = None
    norm_offset: float = 0.0

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

        The embedding is reported with layer -1.
        """
        if tensor_name == self.embedding_tensor:
            return "embedding", -1
        match = _layer_pattern(self.layers).match(tensor_name)
        if match is None:
            return None
        layer, rest = int(match.group(1)), match.group(2)
        for component, patterns in self.writers.items():
            if any(fnmatch.fnmatchcase(rest, p) for p in patterns):
                return component, layer
        return None


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


def supported_model_types() -> list[str]:
    """Every `model_type` the registry knows, sorted."""
    return sorted(_registry())


def lookup(model_type: str) -> Architecture:
    """The architecture for a `config.model_type`; unknown families fail with the supported list."""
    try:
        return _registry()[model_type]
    except KeyError:
        raise ModelError(
            f"unsupported model family {model_type!r}",
            hint=f"supported: {', '.join(supported_model_types())}; to add one see docs/architectures.md",
        ) from None
