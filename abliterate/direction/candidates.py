"""Candidate refusal directions: difference of mean residual activations, harmful minus harmless.

`mean_activations` runs prompts through the model in length-sorted batches and averages (float64) the
residual stream at the input of every layer at each post-instruction position, plus the first (sink) token.
`make_candidates` forms r[pos, layer] = mean_harmful - mean_harmless and cleans it:
- sink-aware: where the first token carries a massive activation (norm far above the other tokens'), the
  candidate is made orthogonal to that activation's subspace, which otherwise dominates raw directions on
  small models and wrecks the model when ablated;
- `projected` method: the component along the harmless mean is removed, so that ablation leaves the
  harmless activations' mean untouched (`standard` is the paper's raw difference). `norm-preserving` uses
  the projected direction; it differs only in the weight edit (edit/projection.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from abliterate import progress
from abliterate.model.archs import Architecture
from abliterate.model.forward import first_token_index, make_batches
from abliterate.model.hooks import capture_residuals

log = logging.getLogger(__name__)

Method = Literal["standard", "projected", "norm-preserving"]
PROJECTED_METHODS = frozenset({"projected", "norm-preserving"})  # remove the harmless-mean component
SINK_RATIO = 8.0  # a first-token activation this many times the median token norm counts as massive
SINK_AXIS_SHARE = 0.2  # coordinates holding at least this share of the sink's largest entry join its subspace


def mean_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    arch: Architecture,
    instructions: list[str],
    n_pos: int,
    batch_size: int,
    desc: str,
    winsorize: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean residual activations: ([n_pos, n_layers, hidden], sink [n_layers, hidden]), float64.

    `winsorize` < 1 clamps each prompt's vectors first (`model.hooks.winsorized`).
    """
    batches = make_batches(tokenizer, instructions, batch_size)
    with capture_residuals(model, arch, n_pos, winsorize) as sums:
        items = progress.track(batches, desc, len(batches), "batch")
        with torch.inference_mode():
            for _indices, batch in items:
                sums.first_token = first_token_index(batch)
                inputs = {k: v.to(model.device) for k, v in batch.items()}
                model(**inputs, use_cache=False, logits_to_keep=1)
                sums.count += len(_indices)
    return sums.means(), sums.sink_means()


@dataclass
class Candidates:
    """Candidate directions r[pos, layer] (float32, not normalized) and the statistics they came from."""

    vectors: torch.Tensor  # [n_pos, n_layers, hidden]
    raw: torch.Tensor  # harmful mean - harmless mean, float64
    harmless_mean: torch.Tensor  # [n_pos, n_layers, hidden] float64
    sink_layers: list[int]  # layers where a massive first-token activation was projected out
    method: Method

    @property
    def n_pos(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.vectors.shape[1])

    def positions(self) -> list[int]:
        """Token positions counted from the end: -n_pos .. -1."""
        return list(range(-self.n_pos, 0))

    def vector(self, pos: int, layer: int) -> torch.Tensor:
        """The candidate at position `pos` (negative) and `layer`."""
        return self.vectors[self.n_pos + pos, layer]


def sink_basis(sink: torch.Tensor, token_norm: float) -> torch.Tensor | None:
    """Orthonormal basis [k, hidden] of a massive first-token activation, or None if it is not massive."""
    norm = float(sink.norm())
    if norm < SINK_RATIO * token_norm:
        return None
    biggest = sink.abs().max()
    axes = torch.nonzero(sink.abs() >= SINK_AXIS_SHARE * biggest).flatten()
    columns = [sink / norm] + [torch.nn.functional.one_hot(a, sink.numel()).to(sink.dtype) for a in axes]
    q, _ = torch.linalg.qr(torch.stack(columns, dim=1))
    return q.T


def remove_subspace(vector: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return vector - basis.T @ (basis @ vector)


def make_candidates(
    harmful_mean: torch.Tensor, harmless_mean: torch.Tensor, sink_mean: torch.Tensor, method: Method
) -> Candidates:
    """Difference-in-means candidates, sink-cleaned, optionally projected off the harmless mean."""
    raw = harmful_mean - harmless_mean
    vectors = raw.clone()
    n_pos, n_layers, _ = raw.shape
    sink_layers = []
    for layer in range(n_layers):
        token_norm = float(harmless_mean[:, layer].norm(dim=-1).median())
        basis = sink_basis(sink_mean[layer], token_norm)
        if basis is not None:
            sink_layers.append(layer)
        for p in range(n_pos):
            vec = vectors[p, layer]
            if basis is not None:
                vec = remove_subspace(vec, basis)
            if method in PROJECTED_METHODS:
                unit = harmless_mean[p, layer] / harmless_mean[p, layer].norm()
                vec = vec - (vec @ unit) * unit
            vectors[p, layer] = vec
    if sink_layers:
        log.info("massive first-token activation at layers %s: candidates made orthogonal to it", sink_layers)
    return Candidates(vectors.float(), raw, harmless_mean, sink_layers, method)
