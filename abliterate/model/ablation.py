"""How strongly to ablate the direction at each residual write: `AblationWeights` (1 everywhere = the plain edit).

`abliterate optimize` searches these weights; the weight edit (edit/stream.py), the inference-time hooks
(model/hooks.py) and the direction file (direction/vector.py) carry them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from abliterate.errors import UsageError


@dataclass(frozen=True)
class AblationWeights:
    """Per-layer ablation weights w: each residual write x becomes x - w (x . r) r (w = 1: full ablation).

    In the weights: W <- W - w r r^T W for a layer's attention or MLP output matrices, E <- E - w (E r) r^T.
    """

    embedding: float
    attention: tuple[float, ...]
    mlp: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.attention) != len(self.mlp):
            raise UsageError("ablation weights need one attention and one MLP weight per layer", hint="fix the file")

    @property
    def n_layers(self) -> int:
        return len(self.attention)

    def weight(self, component: str, layer: int) -> float:
        """The weight of `component` ("embedding", "attention" or "mlp") at `layer`."""
        if component == "embedding":
            return self.embedding
        if not 0 <= layer < self.n_layers:
            raise UsageError(
                f"the ablation weights cover {self.n_layers} layers, not layer {layer}",
                hint="use weights made for this model",
            )
        return self.attention[layer] if component == "attention" else self.mlp[layer]

    def is_full(self) -> bool:
        """Whether every weight is 1 (the plain edit)."""
        return all(w == 1.0 for w in (self.embedding, *self.attention, *self.mlp))

    def to_dict(self) -> dict[str, Any]:
        return {"embedding": self.embedding, "attention": list(self.attention), "mlp": list(self.mlp)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AblationWeights:
        try:
            return cls(
                float(data["embedding"]),
                tuple(float(w) for w in data["attention"]),
                tuple(float(w) for w in data["mlp"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"malformed ablation weights: {err}", hint="create the direction again") from None
