"""Choosing one candidate direction, as in Arditi et al. 2024 (Appendix C), from first-token logits only.

For every candidate outside the last `prune_fraction` of layers, on validation prompts:
- refusal score under directional ablation (harmful prompts): mean log-odds of the refusal tokens at the
  first answer position — lower means refusal is gone;
- induce score under activation addition at the candidate's layer (harmless prompts): positive means adding
  the direction makes the model refuse, i.e. it really is a refusal direction;
- KL divergence of the first answer token under ablation (harmless prompts) — small means little damage.
Candidates with induce > 0 and KL < threshold are kept; the lowest refusal score wins.

To keep this cheap, every candidate is first screened on a few validation prompts (ablation only), and only
the most promising finalists get the full three scores (docs/performance.md). Screening packs several
candidates into one forward pass: the screening batch is repeated once per candidate along the batch axis and
each copy is ablated with its own direction (`grouped_directional_ablation`). A pass holds at most as many
tokens (rows x padded length) as one batch of `batch_size` of the run's longest prompts, so it needs no more
memory than the passes that compute the mean activations (`screen_groups`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from transformers import BatchEncoding, PreTrainedModel

from abliterate.direction.candidates import Candidates
from abliterate.model.archs import Architecture
from abliterate.model.forward import forward_last_logits, run_batches
from abliterate.model.hooks import activation_addition, directional_ablation, grouped_directional_ablation

log = logging.getLogger(__name__)

Batches = list[tuple[list[int], BatchEncoding]]


def refusal_score(logits: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """Per-prompt log-odds that the answer starts with a refusal token: log p - log(1 - p)."""
    probs = torch.softmax(logits.double(), dim=-1)
    p = probs[:, refusal_ids].sum(dim=-1).clamp(1e-12, 1 - 1e-12)
    return torch.log(p) - torch.log1p(-p)


def kl_divergence(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-prompt KL(base || edited) of the next-token distribution."""
    base = torch.log_softmax(base_logits.double(), dim=-1)
    other = torch.log_softmax(logits.double(), dim=-1)
    return (base.exp() * (base - other)).sum(dim=-1)


def collect_logits(model: PreTrainedModel, batches: Batches, desc: str | None = None) -> torch.Tensor:
    """Last-position logits for every prompt, in the prompts' original order."""
    total = sum(len(indices) for indices, _ in batches)
    out: torch.Tensor | None = None
    for indices, _batch, logits in run_batches(model, batches, desc):
        if out is None:
            out = torch.empty(total, logits.shape[-1], dtype=torch.float32)
        out[indices] = logits.cpu()
    assert out is not None
    return out


@dataclass
class CandidateScore:
    """One row of candidates.json: screening scores for all, full scores for finalists."""

    pos: int
    layer: int
    screen_refusal: float = float("nan")
    screen_kl: float = float("nan")
    refusal: float | None = None
    induce: float | None = None
    kl: float | None = None
    kept: bool = False

    def row(self) -> dict[str, float | int | bool | None]:
        """JSON-ready: unscreened values (NaN) become null."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


@dataclass
class ValidationSet:
    """Pre-batched validation prompts and the unedited model's logits on the harmless ones."""

    harmful: Batches
    harmless: Batches
    harmless_base_logits: torch.Tensor


@dataclass
class ScreeningSet:
    """A few harmful and harmless validation prompts in one batch, for the cheap first pass."""

    indices: list[int]  # each batch row's prompt (harmful first, then harmless)
    batch: BatchEncoding
    n_harmful: int
    base_logits: torch.Tensor  # unedited logits of all prompts, in prompt order

    @property
    def rows(self) -> int:
        return len(self.indices)

    @property
    def tokens(self) -> int:
        """Rows times padded length: the size of one copy of the batch."""
        return int(self.batch["input_ids"].numel())


def screen_groups(token_budget: int, screen_tokens: int, n_candidates: int) -> int:
    """Candidates per screening pass: copies of the screening batch that fit in `token_budget` tokens (>= 1).

    The candidates are then spread evenly over the passes this needs, so that no pass is larger than necessary.
    """
    most = max(1, min(n_candidates, token_budget // max(1, screen_tokens)))
    passes = math.ceil(n_candidates / most)
    return math.ceil(n_candidates / passes) if n_candidates else 1


def repeat_batch(batch: BatchEncoding, times: int) -> BatchEncoding:
    """The batch's rows `times` times over, copy after copy."""
    return BatchEncoding({key: value.repeat(times, *([1] * (value.dim() - 1))) for key, value in batch.items()})


def screening_logits(
    model: PreTrainedModel, arch: Architecture, directions: torch.Tensor, screen: ScreeningSet
) -> torch.Tensor:
    """Last-position logits [k, prompts, vocab] of the screening prompts with directions[k] ablated, one pass."""
    groups = int(directions.shape[0])
    with grouped_directional_ablation(model, arch, directions, screen.rows), torch.inference_mode():
        logits = forward_last_logits(model, repeat_batch(screen.batch, groups)).cpu()
    out = torch.empty(groups, screen.rows, logits.shape[-1], dtype=torch.float32)
    out[:, screen.indices] = logits.view(groups, screen.rows, -1)
    return out


def screen_group(
    model: PreTrainedModel,
    arch: Architecture,
    candidates: Candidates,
    scores: list[CandidateScore],
    screen: ScreeningSet,
    refusal_ids: list[int],
) -> None:
    """Fill `screen_refusal` and `screen_kl` of every score in `scores` from one grouped ablated pass."""
    directions = torch.stack([candidates.vector(s.pos, s.layer) for s in scores])
    n = screen.n_harmful
    for score, logits in zip(scores, screening_logits(model, arch, directions, screen), strict=True):
        score.screen_refusal = float(refusal_score(logits[:n], refusal_ids).mean())
        score.screen_kl = float(kl_divergence(screen.base_logits[n:], logits[n:]).mean())


def finalists(scores: list[CandidateScore], count: int, kl_threshold: float) -> list[CandidateScore]:
    """The `count` screened candidates with the lowest refusal score among those with a plausible KL."""
    plausible = sorted((s for s in scores if s.screen_kl < 2 * kl_threshold), key=lambda s: s.screen_refusal)
    rest = sorted((s for s in scores if s.screen_kl >= 2 * kl_threshold), key=lambda s: s.screen_kl)
    return (plausible + rest)[:count]


def score_candidate(
    model: PreTrainedModel,
    arch: Architecture,
    candidates: Candidates,
    score: CandidateScore,
    val: ValidationSet,
    refusal_ids: list[int],
) -> None:
    """Fill the ablation refusal score, addition induce score and ablation KL of one candidate."""
    vector = candidates.vector(score.pos, score.layer)
    with directional_ablation(model, arch, vector):
        score.refusal = float(refusal_score(collect_logits(model, val.harmful), refusal_ids).mean())
        score.kl = float(kl_divergence(val.harmless_base_logits, collect_logits(model, val.harmless)).mean())
    with activation_addition(model, arch, score.layer, vector):
        score.induce = float(refusal_score(collect_logits(model, val.harmless), refusal_ids).mean())


def eligible_layers(n_layers: int, prune_fraction: float) -> list[int]:
    """Layers outside the last `prune_fraction` (the paper prunes the last 20%)."""
    return list(range(max(1, int(n_layers * (1.0 - prune_fraction)))))


def _full(s: CandidateScore) -> tuple[float, float, float]:
    assert s.refusal is not None and s.induce is not None and s.kl is not None
    return s.refusal, s.induce, s.kl


def choose(scores: list[CandidateScore], kl_threshold: float) -> CandidateScore:
    """Among fully scored candidates, mark the kept ones and return the winner (fallbacks are logged)."""
    scored = [s for s in scores if s.refusal is not None]
    for s in scored:
        _refusal, induce, kl = _full(s)
        s.kept = induce > 0 and kl < kl_threshold
    kept = [s for s in scored if s.kept]
    if kept:
        return min(kept, key=lambda s: _full(s)[0])
    low_kl = [s for s in scored if _full(s)[2] < kl_threshold]
    if low_kl:
        log.warning("no candidate has induce > 0 and KL < %.2f; choosing among KL-safe ones only", kl_threshold)
        return min(low_kl, key=lambda s: _full(s)[0])
    log.warning("no candidate has KL < %.2f; choosing the lowest-KL candidate", kl_threshold)
    return min(scored, key=lambda s: _full(s)[2])
