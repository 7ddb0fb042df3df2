"""The chosen refusal direction and its file, `direction.safetensors` (tensor `direction`, float32 [hidden]).

Metadata travels with the vector: layer, position, language, source model, method; `apply` needs the vector
and, for a partial edit found by `abliterate optimize`, the per-layer ablation weights (`weights`, JSON); the
rest is provenance. A per-layer edit (`optimize`'s direction scope "per layer") also stores `per_layer`,
float32 [n_layers, hidden]: layer l's attention and MLP outputs are edited against row l, the embedding against
`direction`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from abliterate.errors import UsageError
from abliterate.model.ablation import AblationWeights
from abliterate.storage.shards import ShardPlan, ShardWriter, TensorSpec, tensor_buffer

DIRECTION_FILE = "direction.safetensors"
WEIGHTS_KEY = "weights"


@dataclass
class Direction:
    """A unit refusal direction r and where it came from."""

    vector: torch.Tensor
    layer: int = -1
    pos: int = 0
    lang: str = ""
    source_model: str = ""
    method: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    weights: AblationWeights | None = None  # per-layer partial ablation; None: weight 1 everywhere
    per_layer: torch.Tensor | None = None  # [n_layers, hidden]: each layer's own direction; None: `vector` everywhere

    def __post_init__(self) -> None:
        vec = self.vector.detach().to(torch.float32).reshape(-1).cpu()
        norm = float(vec.norm())
        if not torch.isfinite(vec).all() or norm == 0.0:
            raise UsageError("the refusal direction is zero or not finite", hint="recompute it with `directions`")
        self.vector = vec / norm
        if self.per_layer is not None:
            rows = self.per_layer.detach().to(torch.float32).cpu()
            norms = rows.norm(dim=-1, keepdim=True)
            if rows.dim() != 2 or rows.shape[1] != vec.numel() or not torch.isfinite(rows).all() or (norms == 0).any():
                raise UsageError("the per-layer directions are not [n_layers, hidden] non-zero finite vectors",
                                 hint="create the direction again")
            self.per_layer = rows / norms

    def for_layer(self, layer: int) -> torch.Tensor:
        """The unit vector layer `layer`'s writers are edited against (-1, the embedding: `vector`)."""
        if self.per_layer is None or layer < 0:
            return self.vector
        return self.per_layer[layer]

    @property
    def hidden_size(self) -> int:
        return int(self.vector.numel())

    def metadata(self) -> dict[str, str]:
        meta = {
            "layer": str(self.layer),
            "pos": str(self.pos),
            "lang": self.lang,
            "source_model": self.source_model,
            "method": self.method,
        }
        meta.update(self.extra)
        if self.weights is not None:
            meta[WEIGHTS_KEY] = json.dumps(self.weights.to_dict(), separators=(",", ":"))
        return meta

    def save(self, path: Path) -> Path:
        """Write the direction file (byte-for-byte reproducible: metadata in a fixed order)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"direction": self.vector.contiguous()}
        if self.per_layer is not None:
            tensors["per_layer"] = self.per_layer.contiguous()
        specs = [TensorSpec(name, "F32", tuple(t.shape), t.numel() * 4) for name, t in tensors.items()]
        with ShardWriter(path.parent, ShardPlan(path.name, specs), dict(sorted(self.metadata().items()))) as writer:
            for name, tensor in tensors.items():
                writer.write(name, tensor_buffer(tensor))
        return path

    @classmethod
    def load(cls, path: Path) -> Direction:
        """Read a direction file; also accepts a folder holding `abliterate/direction.safetensors`."""
        path = Path(path)
        if path.is_dir():
            path = path / "abliterate" / DIRECTION_FILE
        if not path.is_file():
            raise UsageError(f"direction file {path} not found", hint="create one with `abliterate directions`")
        try:
            with safe_open(str(path), framework="pt") as fh:
                if "direction" not in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                    raise UsageError(
                        f"{path} has no tensor named 'direction'", hint="create it with `abliterate directions`"
                    )
                vector = fh.get_tensor("direction")
                per_layer = fh.get_tensor("per_layer") if "per_layer" in fh.keys() else None  # noqa: SIM118
                meta = dict(fh.metadata() or {})
        except (SafetensorError, OSError) as err:
            raise UsageError(f"cannot read direction file {path}: {err}", hint="create it again") from None
        if vector.dim() != 1:
            raise UsageError(
                f"the direction in {path} has shape {tuple(vector.shape)}, expected [hidden_size]",
                hint="create it with `abliterate directions`",
            )
        known = {"layer", "pos", "lang", "source_model", "method", WEIGHTS_KEY}
        return cls(
            vector=vector,
            layer=int(meta.get("layer", -1)),
            pos=int(meta.get("pos", 0)),
            lang=meta.get("lang", ""),
            source_model=meta.get("source_model", ""),
            method=meta.get("method", ""),
            extra={k: v for k, v in meta.items() if k not in known},
            weights=_weights_from(meta.get(WEIGHTS_KEY), path),
            per_layer=per_layer,
        )

    def describe(self) -> str:
        return json.dumps({"layer": self.layer, "pos": self.pos, "lang": self.lang, "method": self.method})


def _weights_from(text: str | None, path: Path) -> AblationWeights | None:
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        raise UsageError(f"{path}: the ablation weights are not JSON", hint="create the direction again") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the ablation weights are not a mapping", hint="create the direction again")
    return AblationWeights.from_dict(data)
