"""The direction search's forward passes from its sizes alone: what `find_direction` will run, before it runs.

`find_direction` counts the model's calls per stage at run time (`model.hooks.count_forwards`, candidates.json
`forward_passes`/`forward_rows`); `expected_passes` derives the same numbers from a `SearchShape` (prompts per
split, batch size, candidate grid, screening group size, finalists). The search checks its counts against it
after every run (a mismatch is logged), and `planning` uses it for `--plan`, so the two cannot drift apart.
The candidate grid and the screening group size come from here too (`grid`, `screen_per_pass`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from abliterate.direction.selection import eligible_layers, screen_groups
from abliterate.model.hooks import ForwardCount
from abliterate.settings import Settings


@dataclass(frozen=True)
class SplitSizes:
    """Prompts per split: harmful/harmless x train/val."""

    harmful_train: int
    harmless_train: int
    harmful_val: int
    harmless_val: int

    def total(self) -> int:
        return self.harmful_train + self.harmless_train + self.harmful_val + self.harmless_val


@dataclass(frozen=True)
class SearchShape:
    """What fixes the search's forward passes.

    `before` is what the prompt source gives, `after` what the refusal filter keeps (the same when it is off or
    before the run, where `after` = `before` is the upper bound).
    """

    before: SplitSizes
    after: SplitSizes
    batch_size: int
    filter_prompts: bool
    candidates: int  # (pos, layer) pairs in the grid
    screen_per_pass: int  # candidates per grouped screening pass
    screen_prompts: int  # --screen-prompts: harmful and harmless val prompts of the screening batch
    finalists: int  # --finalists


def grid(settings: Settings, n_layers: int, n_pos: int) -> tuple[list[int], list[int]]:
    """Layers and positions of the candidate grid; --layer/--pos restrict it."""
    layers = [settings.layer] if settings.layer is not None else eligible_layers(n_layers, settings.prune_layers)
    positions = [settings.pos] if settings.pos is not None else list(range(-n_pos, 0))
    return layers, positions


def screen_per_pass(batch_size: int, longest: int, screen_tokens: int, n_candidates: int) -> int:
    """Candidates per screening pass: copies of the screening batch within one batch of the longest prompts."""
    return screen_groups(batch_size * longest, screen_tokens, n_candidates)


def batches(n: int, batch_size: int) -> int:
    """Forward passes that carry `n` prompts at `batch_size` per pass."""
    return math.ceil(n / batch_size) if n else 0


def screened(shape: SearchShape) -> bool:
    """Whether the grid is screened first (it is when it has more candidates than finalists)."""
    return shape.candidates > shape.finalists


def _filter(shape: SearchShape) -> ForwardCount:
    if not shape.filter_prompts:
        return ForwardCount()
    sizes = vars(shape.before).values()
    return ForwardCount(sum(batches(n, shape.batch_size) for n in sizes), shape.before.total())


def _activations(shape: SearchShape) -> ForwardCount:
    train = (shape.after.harmful_train, shape.after.harmless_train)
    return ForwardCount(sum(batches(n, shape.batch_size) for n in train), sum(train))


def _screening(shape: SearchShape) -> ForwardCount:
    if not screened(shape):
        return ForwardCount()
    rows = min(shape.screen_prompts, shape.after.harmful_val) + min(shape.screen_prompts, shape.after.harmless_val)
    passes = batches(shape.candidates, shape.screen_per_pass)
    return ForwardCount(1 + passes, rows * (1 + shape.candidates))  # the unedited batch, then the grouped passes


def _finalists(shape: SearchShape) -> ForwardCount:
    scored = min(shape.candidates, shape.finalists) if screened(shape) else shape.candidates
    harmful, harmless = shape.after.harmful_val, shape.after.harmless_val
    bs = shape.batch_size
    # unedited harmless logits once; per finalist: ablated harmful, ablated harmless, added harmless
    calls = batches(harmless, bs) + scored * (batches(harmful, bs) + 2 * batches(harmless, bs))
    return ForwardCount(calls, harmless + scored * (harmful + 2 * harmless))


def expected_passes(shape: SearchShape) -> dict[str, ForwardCount]:
    """Forward passes and rows per stage (filter, activations, screening, finalists) of a search of this shape."""
    return {
        "filter": _filter(shape),
        "activations": _activations(shape),
        "screening": _screening(shape),
        "finalists": _finalists(shape),
    }
