"""What `abliterate optimize` searches: a direction layer and per-component ablation-weight kernels over depth.

Two kernels (docs/optimize.md, "What is searched"):
- `window` (the default): per component a peak weight at a layer, falling linearly to `floor` x peak at
  `reach` layers away and exactly 0 beyond; the peak itself can be exactly 0 (its sampled value is clipped at
  0 from a range reaching below it), so the search can leave attention, MLP or the embedding alone. The
  embedding has its own weight, clipped the same way. Heretic's kernel has the same linear window.
The window kernel also searches the direction's *scope* (Heretic's `direction_scope`): `global`, the direction at
the (fractional) `layer` for every writer, or `per layer`, each layer's writers against the direction that layer
writes into (`LayerDirections.layer_vectors`; the embedding keeps the global one).
- `gaussian` (studies made before the window existed): w_l = peak * exp(-((l - pos) / width)^2 / 2), searched
  as falloff = n_layers / width (0: flat); the embedding takes the attention profile's weight at layer 0.

Every trial's parameters are plain floats, so Optuna's multivariate TPE can model them jointly (no conditional
parameters). The paper's default edit (weight 1 everywhere) is a point of both spaces: `TrialParams.reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from abliterate.commands.optimize.pareto import Profile, Window
from abliterate.model.ablation import AblationWeights

if TYPE_CHECKING:
    import optuna

Kernel = Literal["window", "gaussian"]
KERNELS: tuple[Kernel, ...] = ("window", "gaussian")
PEAK_MAX = 1.5
PEAK_MIN = -0.3  # window kernel: sampled peaks below 0 mean "off" (weight exactly 0), 1/6 of the prior
EMBED_MIN = -0.5  # the embedding's weight likewise: 1/4 of its prior is "leave the embedding alone"
# The informed prior of new window studies (`SearchSpace.informed`), after Heretic's ranges ("based on experiments
# with various models"): direction from 40% of the depth on, kernel peaks in the last 40% of the layers, an "off"
# share of 1/11 for attention and MLP. Studies made before it keep the wide bounds above (stored in study.json).
INFORMED_PEAK_MIN = -0.15
INFORMED_LAYER_FROM = 0.4
INFORMED_POS_FROM = 0.6
FALLOFF_MAX = 12.0
COMPONENTS = ("attn", "mlp")
SCOPES = ("global", "per layer")  # window kernel: one direction for every layer, or each layer its own


@dataclass(frozen=True)
class SearchSpace:
    """Bounds of one study: the model's depth, the layers a direction may come from, the kernel."""

    n_layers: int
    layer_min: int  # the first layer with a non-zero candidate (layer 0's input is the embedding alone)
    layer_max: int
    kernel: Kernel = "gaussian"
    peak_min: float = PEAK_MIN  # window kernel: the low end of a peak's range (below 0: off)
    pos_min: float = 0.0  # window kernel: the first layer a peak may sit at

    @classmethod
    def informed(cls, n_layers: int, first_nonzero: int, default_layer: int, layer_max: int) -> SearchSpace:
        """A new window study's space: Heretic's ranges, widened to keep the default selection's layer inside."""
        layer_min = max(first_nonzero, min(default_layer, math.floor(INFORMED_LAYER_FROM * (n_layers - 1))))
        return cls(n_layers, layer_min, layer_max, "window", INFORMED_PEAK_MIN,
                   round(INFORMED_POS_FROM * (n_layers - 1), 3))

    def to_json(self) -> dict[str, Any]:
        bounds = {"peak_min": self.peak_min, "embed_min": EMBED_MIN, "pos_min": self.pos_min} \
            if self.kernel == "window" else {"falloff_max": FALLOFF_MAX}
        return {"n_layers": self.n_layers, "layer_min": self.layer_min, "layer_max": self.layer_max,
                "kernel": self.kernel, "peak_max": PEAK_MAX, **bounds}

    @classmethod
    def from_json(cls, space: dict[str, Any]) -> SearchSpace:
        """A stored space; studies from before the window kernel have no `kernel` key and are Gaussian, those
        from before the informed prior have no `pos_min` and keep the wide bounds."""
        return cls(int(space["n_layers"]), int(space["layer_min"]), int(space["layer_max"]),
                   space.get("kernel", "gaussian"), float(space.get("peak_min", PEAK_MIN)),
                   float(space.get("pos_min", 0.0)))


class WeightKernel(Protocol):
    """One component's ablation weight as a function of depth."""

    def weight(self, layer: float, n_layers: int) -> float: ...

    def profile(self, n_layers: int) -> Profile | Window: ...


@dataclass(frozen=True)
class WeightProfile:
    """The Gaussian kernel, in its searched form: falloff = n_layers / width, so that 0 is a flat profile."""

    peak: float
    pos: float
    falloff: float

    def weight(self, layer: float, n_layers: int) -> float:
        z = (layer - self.pos) * self.falloff / n_layers
        return self.peak * math.exp(-0.5 * z * z)

    def profile(self, n_layers: int) -> Profile:
        return Profile(self.peak, self.pos, n_layers / self.falloff if self.falloff > 0 else math.inf)


@dataclass(frozen=True)
class WindowKernel:
    """The window kernel: `peak` at `pos`, linear down to floor x peak at `reach` layers, 0 beyond.

    `peak` is the sampled value; below 0 it means off (every weight exactly 0).
    """

    peak: float
    pos: float
    floor: float
    reach: float

    @property
    def top(self) -> float:
        return max(self.peak, 0.0)

    def weight(self, layer: float, n_layers: int) -> float:
        distance = abs(layer - self.pos)
        if self.top == 0.0 or distance > self.reach:
            return 0.0
        return self.top * (1.0 - (1.0 - self.floor) * distance / self.reach)

    def profile(self, n_layers: int) -> Window:
        return Window(self.top, self.pos, self.floor, self.reach)


@dataclass(frozen=True)
class TrialParams:
    """One point of the search space."""

    layer: float
    attention: WeightKernel
    mlp: WeightKernel
    embed: float | None = None  # the window kernel's sampled embedding weight (None: Gaussian's rule)
    per_layer: bool = False  # direction scope: each layer's writers against that layer's own direction

    @classmethod
    def suggest(cls, trial: optuna.Trial, space: SearchSpace) -> TrialParams:
        layer = trial.suggest_float("layer", float(space.layer_min), float(space.layer_max))
        if space.kernel == "gaussian":
            return cls.from_params({"layer": layer, **{
                f"{c}_{key}": trial.suggest_float(f"{c}_{key}", low, high) for c in COMPONENTS
                for key, low, high in (("peak", 0.0, PEAK_MAX), ("pos", 0.0, space.n_layers - 1.0),
                                       ("falloff", 0.0, FALLOFF_MAX))}})
        top = float(space.n_layers)
        params: dict[str, Any] = {"layer": layer,
                                  "direction_scope": trial.suggest_categorical("direction_scope", SCOPES)}
        for c in COMPONENTS:
            for key, low, high in (("peak", space.peak_min, PEAK_MAX), ("pos", space.pos_min, top - 1.0),
                                   ("floor", 0.0, 1.0), ("reach", 1.0, top)):
                params[f"{c}_{key}"] = trial.suggest_float(f"{c}_{key}", low, high)
        params["embed"] = trial.suggest_float("embed", EMBED_MIN, PEAK_MAX)
        return cls.from_params(params)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrialParams:
        """Parameters as Optuna stores them; the kernel follows from their names."""
        if "embed" not in params:
            def gaussian(name: str) -> WeightProfile:
                return WeightProfile(*(float(params[f"{name}_{key}"]) for key in ("peak", "pos", "falloff")))

            return cls(float(params["layer"]), gaussian("attn"), gaussian("mlp"))

        def window(name: str) -> WindowKernel:
            return WindowKernel(*(float(params[f"{name}_{key}"]) for key in ("peak", "pos", "floor", "reach")))

        return cls(float(params["layer"]), window("attn"), window("mlp"), float(params["embed"]),
                   params.get("direction_scope") == "per layer")

    @classmethod
    def reference(cls, layer: int, space: SearchSpace, scope: str = "global") -> dict[str, Any]:
        """The paper's default edit as trial parameters: `layer`'s direction, weight 1 everywhere (window kernel:
        a flat window, floor 1, reaching every layer from the last; `scope` "per layer": each layer's own
        direction instead, at weight 1 everywhere)."""
        if space.kernel == "gaussian":
            flat = {"peak": 1.0, "pos": 0.0, "falloff": 0.0}
            return {"layer": float(layer), **{f"{c}_{k}": v for c in COMPONENTS for k, v in flat.items()}}
        window = {"peak": 1.0, "pos": float(space.n_layers - 1), "floor": 1.0, "reach": float(space.n_layers)}
        return {"layer": float(layer), "direction_scope": scope,
                **{f"{c}_{k}": v for c in COMPONENTS for k, v in window.items()}, "embed": 1.0}

    def embedding_weight(self, n_layers: int) -> float:
        if self.embed is None:  # Gaussian: the embedding writes before layer 0's attention
            return self.attention.weight(0, n_layers)
        return max(self.embed, 0.0)

    def weights(self, n_layers: int) -> AblationWeights:
        """Per-layer weights of the embedding, attention outputs and MLP outputs."""
        return AblationWeights(
            self.embedding_weight(n_layers),
            tuple(self.attention.weight(layer, n_layers) for layer in range(n_layers)),
            tuple(self.mlp.weight(layer, n_layers) for layer in range(n_layers)),
        )
