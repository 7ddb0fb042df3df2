"""Cross-lingual refusal directions (`abliterate crosslingual`): do languages share one refusal direction?

Owns the comparison of per-language refusal directions of one model (PolyRefuse, Wang et al. 2025): for every
language, the difference-in-means candidates from that language's prompts (the normal pipeline: prompt filter,
sink cleaning, `--method`); one site (layer, pos) for all of them (flags, a direction file, or the normal
selection on the source language); then

- the cosine-similarity matrix of the languages' directions at that site;
- per-layer cosines of each language's direction with every language's difference in means (Figure 4 style);
- a 2-D PCA per language of harmful and harmless activations at the site, with the directions as arrows;
- the transfer matrix: compliance on each target language's harmful test prompts while the source language's
  direction is ablated (inference-time hooks, greedy answers, marker judge), plus an unablated baseline row.

Everything goes to one output folder (written atomically): crosslingual.json, transfer_answers.jsonl and
PNG plots. See docs/crosslingual.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abliterate import __version__, progress
from abliterate.direction.candidates import Candidates
from abliterate.direction.search import (
    DirectionResult,
    LoadedModel,
    PromptSplits,
    check_layer_choice,
    compute_candidates,
    filter_prompts,
    find_direction,
    load,
    load_prompts,
    refusal_ids,
    resolve_batch_size,
)
from abliterate.direction.vector import Direction
from abliterate.errors import UsageError
from abliterate.evaluation.crosslingual_record import CrosslingualRecord
from abliterate.evaluation.generate import generate
from abliterate.evaluation.judge import MarkerJudge
from abliterate.model.batching import fixed_batch_size
from abliterate.model.chat import post_instruction_length
from abliterate.model.forward import make_batches
from abliterate.model.hooks import decoder_layers, directional_ablation
from abliterate.prompts import sources
from abliterate.prompts.languages import LANGUAGES, parse_languages
from abliterate.settings import CrosslingualSettings, Settings, build_section
from abliterate.storage.atomic import atomic_output, check_output, json_text, write_atomic

log = logging.getLogger(__name__)

REPORT_FILE = "crosslingual.json"
ANSWERS_FILE = "transfer_answers.jsonl"
PLOT_FILES = {
    "cosine": "cosine_matrix.png",
    "per_layer": "per_layer_cosine.png",
    "pca": "pca.png",
    "transfer": "transfer_matrix.png",
}
BASELINE = "none"
"""Row label of the transfer matrix's unablated baseline."""
ZERO_RATIO = 1e-6
"""A difference in means shorter than this share of the harmless mean's norm counts as zero (layer 0)."""
DIGITS = 4


@dataclass(frozen=True)
class CrosslingualOptions:
    """The `crosslingual` section (CrosslingualSettings) with its languages resolved; no defaults of its own."""

    langs: list[str]
    source_lang: str
    direction_file: Path | None
    transfer_prompts: int
    transfer_max_new_tokens: int
    transfer: bool
    plots: bool

    @classmethod
    def from_section(cls, langs: str, section: CrosslingualSettings) -> CrosslingualOptions:
        """The languages compared (Settings.langs, at least two) and the source language (UsageError with a hint)."""
        chosen = list(dict.fromkeys(parse_languages(langs.strip().lower())))
        if len(chosen) < 2:
            raise UsageError(
                "--langs needs at least two languages", hint=f"e.g. --langs en,de,fr, or all ({' '.join(LANGUAGES)})"
            )
        source = section.source_lang or chosen[0]
        return cls(chosen, source, section.direction, section.transfer_prompts, section.transfer_max_new_tokens,
                   section.transfer, section.plots)

    @classmethod
    def parse(cls, langs: str, **values: Any) -> CrosslingualOptions:
        """From --langs and values named as CrosslingualSettings' fields (defaults for the rest)."""
        return cls.from_section(langs, build_section(CrosslingualSettings, values))


@dataclass
class Site:
    """The (layer, pos) every language's direction is read at, and how it was chosen."""

    layer: int
    pos: int
    chosen_by: str
    selection: DirectionResult | None = None  # the normal selection's result, when it ran
    file_direction: Direction | None = None


@dataclass
class LanguageData:
    """One language's candidates and the train instructions they came from."""

    lang: str
    candidates: Candidates
    splits: PromptSplits

    def direction(self, site: Site) -> torch.Tensor:
        """Unit direction at the site (float64); UsageError if the difference in means is zero there."""
        vector = self.candidates.vectors[self.candidates.n_pos + site.pos, site.layer].to(torch.float64)
        scale = float(self.candidates.harmless_mean[self.candidates.n_pos + site.pos, site.layer].norm())
        if float(vector.norm()) <= ZERO_RATIO * max(scale, 1e-30):
            raise UsageError(
                f"the {self.lang} difference in means is zero at layer {site.layer}, position {site.pos}",
                hint="layer 0 sees only the template tokens' embeddings; choose a later --layer",
            )
        return vector / vector.norm()


@dataclass
class TransferCell:
    """Compliance of one target language's harmful test prompts with one source direction ablated."""

    source: str  # BASELINE for no ablation
    target: str
    verdicts: list[bool]

    @property
    def n(self) -> int:
        return len(self.verdicts)

    @property
    def refusals(self) -> int:
        return sum(self.verdicts)

    @property
    def refusal_rate(self) -> float:
        return self.refusals / self.n if self.n else 0.0

    def row(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "n": self.n,
            "refusals": self.refusals,
            "refusal_rate": round(self.refusal_rate, DIGITS),
            "compliance": round(1.0 - self.refusal_rate, DIGITS),
        }


@dataclass
class TransferResult:
    cells: list[TransferCell]
    answers: list[dict[str, Any]]
    generations: int
    seconds: float


@dataclass
class CrosslingualResult:
    """What `run_crosslingual` wrote: the folder, the report (crosslingual.json) and the plot files."""

    out: Path
    report: CrosslingualRecord
    plots: list[str] = field(default_factory=list)


# --- the site ---------------------------------------------------------------------------------------------


def lang_settings(settings: Settings, lang: str) -> Settings:
    """The shared settings with `lang` as the prompt language."""
    return settings.model_copy(update={"lang": lang})


def read_direction_file(path: Path, loaded: LoadedModel) -> Direction:
    """A direction file whose size fits the model and whose metadata names a valid layer and position."""
    direction = Direction.load(path)
    hidden = int(loaded.model.config.hidden_size)
    if direction.hidden_size != hidden:
        raise UsageError(
            f"the direction in {path} has size {direction.hidden_size}, the model's hidden size is {hidden}",
            hint="use a direction computed for this model",
        )
    if direction.layer < 0 or direction.pos >= 0:
        raise UsageError(f"{path} does not record a layer and position", hint="pass --layer and --pos instead")
    return direction


def choose_site(settings: Settings, options: CrosslingualOptions, loaded: LoadedModel, n_pos: int) -> Site:
    """--direction FILE, else --layer and --pos, else the normal selection on the source language."""
    if options.direction_file is not None:
        if settings.layer is not None or settings.pos is not None:
            raise UsageError("--direction and --layer/--pos both give the site", hint="pass only one of them")
        direction = read_direction_file(options.direction_file, loaded)
        site = Site(direction.layer, direction.pos, f"direction file {options.direction_file}", None, direction)
        check_layer_choice(settings.model_copy(update={"layer": site.layer, "pos": site.pos}), loaded.n_layers, n_pos)
        return site
    if settings.layer is not None and settings.pos is not None:
        check_layer_choice(settings, loaded.n_layers, n_pos)
        return Site(settings.layer, settings.pos, "--layer/--pos")
    log.info("selecting the site on %s prompts (the normal selection)", options.source_lang)
    result = find_direction(lang_settings(settings, options.source_lang), loaded)
    return Site(result.direction.layer, result.direction.pos, f"selection on {options.source_lang}", result)


# --- per-language candidates and activations ----------------------------------------------------------------


def train_splits(settings: Settings, loaded: LoadedModel) -> PromptSplits:
    """The language's prompts, filtered by the model's refusal score exactly as `direction.search` does."""
    splits = load_prompts(settings)
    if settings.filter_prompts:
        splits = filter_prompts(loaded, splits, refusal_ids(settings, loaded.tokenizer),
                                fixed_batch_size(settings.batch_size))
    return splits


def language_data(settings: Settings, loaded: LoadedModel, site: Site, lang: str, n_pos: int) -> LanguageData:
    """Candidates of one language (reusing the selection's, for the source language)."""
    chosen = site.selection
    if chosen is not None and chosen.direction.lang == lang and chosen.splits is not None:
        return LanguageData(lang, chosen.candidates, chosen.splits)
    each = lang_settings(settings, lang)
    splits = train_splits(each, loaded)
    log.info("%s: %d harmful, %d harmless train prompts", lang, len(splits.harmful_train), len(splits.harmless_train))
    return LanguageData(lang, compute_candidates(loaded, splits, n_pos, each), splits)


class _Captured(Exception):
    """Raised by the capture hook to skip the layers after the one read."""


def activations_at(loaded: LoadedModel, texts: list[str], layer: int, pos: int, batch_size: int) -> torch.Tensor:
    """Residual activations at the input of `layer`, position `pos`, one row per text ([n, hidden] float64)."""
    out: torch.Tensor | None = None
    current: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        current.append(hidden[:, pos, :].detach().to(torch.float64).cpu())
        raise _Captured

    handle = decoder_layers(loaded.model, loaded.arch)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for indices, batch in make_batches(loaded.tokenizer, texts, batch_size):
                current.clear()
                with suppress(_Captured):
                    loaded.model(**{k: v.to(loaded.model.device) for k, v in batch.items()}, use_cache=False)
                if out is None:
                    out = torch.empty(len(texts), current[0].shape[-1], dtype=torch.float64)
                out[indices] = current[0]
    finally:
        handle.remove()
    assert out is not None
    return out


# --- the numbers ------------------------------------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor, zero: float = 0.0) -> float | None:
    """Cosine similarity; None when either vector's norm is at most `zero`."""
    na, nb = float(a.norm()), float(b.norm())
    if na <= zero or nb <= zero:
        return None
    return float((a.double() @ b.double()) / (na * nb))


def cosine_matrix(directions: dict[str, torch.Tensor]) -> list[list[float]]:
    """Cosine similarities of the (unit) directions, in the dict's order."""
    langs = list(directions)
    return [[round(float(directions[a] @ directions[b]), DIGITS) for b in langs] for a in langs]


def per_layer_cosines(
    data: dict[str, LanguageData], directions: dict[str, torch.Tensor], pos: int
) -> dict[str, dict[str, list[float | None]]]:
    """curves[s][t][l]: cosine of s's direction with t's difference in means at layer l, position `pos`."""
    curves: dict[str, dict[str, list[float | None]]] = {}
    for s, unit in directions.items():
        curves[s] = {}
        for t, other in data.items():
            c = other.candidates
            row: list[float | None] = []
            for layer in range(c.n_layers):
                scale = float(c.harmless_mean[c.n_pos + pos, layer].norm())
                value = cosine(unit, c.vectors[c.n_pos + pos, layer].double(), ZERO_RATIO * scale)
                row.append(None if value is None else round(value, DIGITS))
            curves[s][t] = row
    return curves


def pca_2d(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """PCA to two components: (mean [d], components [2, d], coordinates [n, 2], explained variance ratios)."""
    mean = points.mean(dim=0)
    centred = points - mean
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:2]
    if components.shape[0] < 2:  # a single point: pad with a zero axis
        components = torch.cat([components, torch.zeros_like(mean).unsqueeze(0)])
    variance = singular**2
    total = float(variance.sum()) or 1.0
    ratios = [round(float(v) / total, DIGITS) for v in variance[:2]]
    return mean, components, centred @ components.T, ratios


def pca_language(
    lang: str,
    harmful: torch.Tensor,
    harmless: torch.Tensor,
    directions: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """One language's PCA: points, centroids and every direction projected onto its plane.

    Axes are oriented so that the language's own harmful - harmless difference points to +x (and +y where it has
    a component). Arrows start at the harmless centroid; each is a unit direction scaled to the length of the
    language's own difference in means, projected onto the plane (a short arrow: mostly out of the plane).
    """
    mean, components, coords, ratios = pca_2d(torch.cat([harmful, harmless]))
    diff = harmful.mean(dim=0) - harmless.mean(dim=0)
    signs = torch.where(components @ diff < 0, -1.0, 1.0).to(components.dtype)
    components, coords = components * signs.unsqueeze(1), coords * signs
    n = harmful.shape[0]
    scale = float(diff.norm())
    origin = (harmless.mean(dim=0) - mean) @ components.T

    def pairs(t: torch.Tensor) -> list[list[float]]:
        return [[round(float(x), DIGITS) for x in row] for row in t]

    return {
        "explained_variance_ratio": ratios,
        "harmful": pairs(coords[:n]),
        "harmless": pairs(coords[n:]),
        "harmless_centroid": pairs(origin.unsqueeze(0))[0],
        "harmful_centroid": pairs(((harmful.mean(dim=0) - mean) @ components.T).unsqueeze(0))[0],
        "arrows": {t: pairs((scale * (components @ unit)).unsqueeze(0))[0] for t, unit in directions.items()},
        "own": lang,
    }


def language_pca(
    loaded: LoadedModel, data: LanguageData, site: Site, directions: dict[str, torch.Tensor], batch_size: int
) -> dict[str, Any]:
    """Activations of the language's train prompts at the site, and their PCA."""
    harmful = activations_at(loaded, data.splits.harmful_train, site.layer, site.pos, batch_size)
    harmless = activations_at(loaded, data.splits.harmless_train, site.layer, site.pos, batch_size)
    return pca_language(data.lang, harmful, harmless, directions)


# --- the transfer matrix -----------------------------------------------------------------------------------


def harmful_test_prompts(settings: Settings, langs: list[str], n: int) -> dict[str, list[str]]:
    """Up to `n` harmful test instructions per language."""
    source = sources.load(settings.prompts, default_lang=langs[0])
    return {lang: source.instructions(lang, "harmful", "test", n) for lang in langs}


def transfer_matrix(
    loaded: LoadedModel,
    directions: dict[str, torch.Tensor],
    targets: dict[str, list[str]],
    options: CrosslingualOptions,
    batch_size: int,
) -> TransferResult:
    """Greedy answers to every target's prompts, once per source direction ablated and once unablated."""
    judge = MarkerJudge()
    flat = [(t, text) for t, texts in targets.items() for text in texts]
    instructions = [text for _, text in flat]
    langs = [t for t, _ in flat]
    rows = [BASELINE, *directions]
    total = len(rows) * len(flat)
    log.info(
        "transfer matrix: %d rows (baseline + %d sources) x %d prompts = %d greedy generations of up to %d tokens",
        len(rows), len(directions), len(flat), total, options.transfer_max_new_tokens,
    )
    start = time.perf_counter()
    cells: list[TransferCell] = []
    answers: list[dict[str, Any]] = []
    for source in progress.track(rows, "transfer matrix", len(rows), "row"):
        context: AbstractContextManager[None] = (
            nullcontext() if source == BASELINE else directional_ablation(loaded.model, loaded.arch, directions[source])
        )
        with context:
            gen = generate(
                loaded.model, loaded.tokenizer, instructions, options.transfer_max_new_tokens, batch_size,
                f"answers, {source} ablated" if source != BASELINE else "answers, baseline",
            )
        verdicts = judge.judge(instructions, gen.texts, langs)
        for target in targets:
            cells.append(TransferCell(source, target, [v for v, t in zip(verdicts, langs, strict=True) if t == target]))
        answers += [
            {"source": source, "target": t, "prompt": p, "answer": a, "refusal": v}
            for t, p, a, v in zip(langs, instructions, gen.texts, verdicts, strict=True)
        ]
        log.info("%s ablated: refusal rate %.2f over all targets", source, sum(verdicts) / max(1, len(verdicts)))
    seconds = time.perf_counter() - start
    log.info("transfer matrix: %d generations in %.0f s", total, seconds)
    return TransferResult(cells, answers, total, seconds)


MIN_BASELINE_REFUSAL = 0.25
"""A target language counts in the verdict only if the unedited model refuses at least this share of it."""
MAX_LEFT_REFUSAL = 0.25
"""A cell removed the refusal when at most this share of the target's harmful prompts is still refused."""
SHARED_SHARE = 0.8
"""Share of the counted off-diagonal cells that must have removed the refusal for "shared" ..."""
PARTLY_SHARE = 0.3
"""... and for "partly shared" (below it: "not shared")."""


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), DIGITS) if values else None


def _verdict_name(own: list[float], other: list[float]) -> str:
    """The verdict from the refusal left in the counted diagonal (`own`) and off-diagonal (`other`) cells."""
    if not own:
        return "no refusal to remove"
    if not any(v <= MAX_LEFT_REFUSAL for v in own):
        return "not removed"
    share = sum(v <= MAX_LEFT_REFUSAL for v in other) / len(other) if other else 0.0
    return "shared" if share >= SHARED_SHARE else "partly shared" if share >= PARTLY_SHARE else "not shared"


def _verdict_summary(name: str, baseline: float | None, own: list[float], other: list[float]) -> str:
    """One plain sentence for the verdict."""
    if name == "no refusal to remove":
        return (f"no refusal to remove: no language is refused {MIN_BASELINE_REFUSAL:.2f} or more of the time "
                "before the ablation, so the matrix says nothing about transfer")
    own_text = (f"a language's own direction leaves {_mean(own):.2f} of its refusal (from {baseline:.2f}; "
                f"{sum(v <= MAX_LEFT_REFUSAL for v in own)} of {len(own)} languages at most {MAX_LEFT_REFUSAL:.2f})")
    if name == "not removed":
        return f"refusal NOT removed: {own_text}; no direction at this site mediates refusal"
    other_text = (f"another language's leaves {_mean(other):.2f} ({sum(v <= MAX_LEFT_REFUSAL for v in other)} of "
                  f"{len(other)} cross-language cells at most {MAX_LEFT_REFUSAL:.2f})")
    head = "refusal is NOT shared" if name == "not shared" else f"refusal is {name}"
    return f"{head} across languages: {own_text}, {other_text}"


def transfer_verdict(refusal: dict[tuple[str, str], float], langs: list[str]) -> dict[str, Any]:
    """Shared, partly shared or not, from the refusal rate of every (source, target) cell (BASELINE: none).

    Targets refused less than MIN_BASELINE_REFUSAL unedited are left out; a cell removed the refusal when at
    most MAX_LEFT_REFUSAL is left. "not removed" when no language's own direction removes its refusal.
    """
    counted = [t for t in langs if refusal[(BASELINE, t)] >= MIN_BASELINE_REFUSAL]
    own = [refusal[(t, t)] for t in counted if (t, t) in refusal]
    other = [refusal[(s, t)] for t in counted for s in langs if s != t and (s, t) in refusal]
    baseline = _mean([refusal[(BASELINE, t)] for t in counted])
    name = _verdict_name(own, other)
    return {
        "verdict": name, "summary": _verdict_summary(name, baseline, own, other),
        "min_baseline": MIN_BASELINE_REFUSAL, "max_left": MAX_LEFT_REFUSAL, "baseline_refusal": baseline,
        "own_cells": len(own), "own_removed": sum(v <= MAX_LEFT_REFUSAL for v in own), "own_left": _mean(own),
        "other_cells": len(other), "other_removed": sum(v <= MAX_LEFT_REFUSAL for v in other),
        "other_left": _mean(other),
    }


def transfer_report(result: TransferResult, langs: list[str], options: CrosslingualOptions) -> dict[str, Any]:
    """The transfer matrix as rows x targets tables, plus the cells."""
    rows = [BASELINE, *langs]
    by_key = {(c.source, c.target): c for c in result.cells}

    def table(value: str) -> list[list[Any]]:
        return [[by_key[(r, t)].row()[value] for t in langs] for r in rows]

    return {
        "rows": rows,
        "columns": langs,
        "compliance": table("compliance"),
        "refusal_rate": table("refusal_rate"),
        "n": table("n"),
        "cells": [c.row() for c in result.cells],
        "judge": "markers",
        "n_prompts": options.transfer_prompts,
        "max_new_tokens": options.transfer_max_new_tokens,
        "generations": result.generations,
        "seconds": round(result.seconds, 1),
        "verdict": transfer_verdict({(c.source, c.target): c.refusal_rate for c in result.cells}, langs),
    }


# --- plots -------------------------------------------------------------------------------------------------


def _figure(rows: int, cols: int, width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _heatmap(
    ax: Any, values: list[list[float]], rows: list[str], cols: list[str], span: tuple[float, float], cmap: str
) -> Any:
    """Values drawn and written in their cells (white text on the colour map's dark ends)."""
    vmin, vmax = span
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap=cmap)
    dark_ends = (0.2, 0.8) if cmap == "RdBu_r" else (0.35, 2.0)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    size = "small" if len(cols) <= 8 else "xx-small"
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            shade = (value - vmin) / (vmax - vmin)
            colour = "white" if shade < dark_ends[0] or shade > dark_ends[1] else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=size, color=colour)
    return image


def plot_cosine(report: dict[str, Any], path: Path) -> None:
    langs = report["languages"]
    side = max(4.5, 0.55 * len(langs) + 2.5)
    fig, axes = _figure(1, 1, side + 1, side)
    ax = axes[0, 0]
    image = _heatmap(ax, report["cosine"]["matrix"], langs, langs, (-1.0, 1.0), "RdBu_r")
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine similarity")
    ax.set_title(f"Refusal directions, layer {report['layer']}, position {report['pos']}")
    fig.savefig(path, format="png")


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def _hide_unused(axes: Any, used: int) -> None:
    for ax in axes.flat[used:]:
        ax.set_visible(False)


def plot_per_layer(report: dict[str, Any], path: Path) -> None:
    curves = report["per_layer_cosine"]["curves"]
    langs = report["languages"]
    rows, cols = _grid(len(langs))
    fig, axes = _figure(rows, cols, 4.0 * cols + 1.5, 3.0 * rows + 0.5)
    colours = [f"C{i % 10}" for i in range(len(langs))]
    low = min([v for s in curves.values() for c in s.values() for v in c if v is not None] or [0.0])
    for ax, source in zip(axes.flat, langs, strict=False):
        for colour, target in zip(colours, langs, strict=True):
            values = [math.nan if v is None else v for v in curves[source][target]]
            style = "-" if target != source else "--"
            ax.plot(range(len(values)), values, style, color=colour, label=target, linewidth=1.2, marker=".")
        ax.axvline(report["layer"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{source} direction (layer {report['layer']}) vs others", fontsize="medium")
        ax.set_ylim(min(-0.1, low - 0.05), 1.05)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine")
        ax.grid(alpha=0.3)
    _hide_unused(axes, len(langs))
    axes.flat[0].legend(fontsize="x-small", ncols=2, title="difference in means of", title_fontsize="x-small")
    fig.suptitle(f"Cosine of each language's direction with every language's difference in means (pos {report['pos']})")
    fig.savefig(path, format="png")


def plot_pca(report: dict[str, Any], path: Path) -> None:
    langs = report["languages"]
    rows, cols = _grid(len(langs))
    fig, axes = _figure(rows, cols, 3.8 * cols, 3.6 * rows + 0.5)
    for ax, lang in zip(axes.flat, langs, strict=False):
        p = report["pca"][lang]
        harmful, harmless = p["harmful"], p["harmless"]
        for points, colour, label in ((harmless, "tab:blue", "harmless"), (harmful, "tab:red", "harmful")):
            ax.scatter([x for x, _ in points], [y for _, y in points], s=10, alpha=0.6, color=colour, label=label)
        x0, y0 = p["harmless_centroid"]
        for i, (other, (dx, dy)) in enumerate(p["arrows"].items()):
            own = other == lang
            ax.annotate(
                "", xy=(x0 + dx, y0 + dy), xytext=(x0, y0),
                arrowprops={"arrowstyle": "-|>", "color": "black" if own else f"C{(i + 2) % 10}",
                            "lw": 2.0 if own else 1.0},
            )
            ax.text(x0 + dx, y0 + dy, other, fontsize="x-small", weight="bold" if own else "normal")
        ev = p["explained_variance_ratio"]
        ax.set_title(f"{lang}: {len(harmful)} harmful, {len(harmless)} harmless", fontsize="medium")
        ax.set_xlabel(f"PC1 ({ev[0]:.0%})")
        ax.set_ylabel(f"PC2 ({ev[1]:.0%})" if len(ev) > 1 else "PC2")
        ax.grid(alpha=0.3)
    _hide_unused(axes, len(langs))
    axes.flat[0].legend(fontsize="x-small", loc="best")
    fig.suptitle(f"PCA of activations at layer {report['layer']}, position {report['pos']}; arrows: directions")
    fig.savefig(path, format="png")


def plot_transfer(report: dict[str, Any], path: Path) -> None:
    transfer = report["transfer"]
    cols, rows = transfer["columns"], transfer["rows"]
    labels = ["none (baseline)" if r == BASELINE else f"{r} ablated" for r in rows]
    fig, axes = _figure(1, 1, max(5.0, 0.6 * len(cols) + 3.5), max(4.0, 0.5 * len(rows) + 2))
    ax = axes[0, 0]
    image = _heatmap(ax, transfer["compliance"], labels, cols, (0.0, 1.0), "viridis")
    fig.colorbar(image, ax=ax, shrink=0.8, label="compliance (1 - refusal rate)")
    ax.set_xlabel("target language (harmful test prompts)")
    sizes = {n for row in transfer["n"] for n in row}
    per_cell = f"n={sizes.pop()} per cell" if len(sizes) == 1 else "n per cell in crosslingual.json"
    ax.set_title(f"Compliance with harmful prompts ({per_cell})")
    fig.savefig(path, format="png")


def write_plots(report: dict[str, Any], folder: Path) -> list[str]:
    """The PNGs (file names); none when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'abliterate[plots]')")
        return []
    makers = {"cosine": plot_cosine, "per_layer": plot_per_layer, "pca": plot_pca}
    if report.get("transfer"):
        makers["transfer"] = plot_transfer
    for name, make in makers.items():
        make(report, folder / PLOT_FILES[name])
    return [PLOT_FILES[name] for name in makers]


# --- the command -------------------------------------------------------------------------------------------


def _timed(seconds: dict[str, float], name: str, start: float) -> float:
    now = time.perf_counter()
    seconds[name] = round(now - start, 1)
    return now


def build_report(
    settings: Settings,
    options: CrosslingualOptions,
    site: Site,
    data: dict[str, LanguageData],
    directions: dict[str, torch.Tensor],
    pca: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """crosslingual.json without the transfer matrix."""
    report: dict[str, Any] = {
        "tool_version": __version__,
        "model": settings.model,
        "method": settings.method,
        "languages": options.langs,
        "source_lang": options.source_lang,
        "layer": site.layer,
        "pos": site.pos,
        "chosen_by": site.chosen_by,
        "prompts": {
            lang: {"harmful_train": len(d.splits.harmful_train), "harmless_train": len(d.splits.harmless_train)}
            for lang, d in data.items()
        },
        "sink_layers": {lang: d.candidates.sink_layers for lang, d in data.items()},
        "cosine": {"languages": options.langs, "matrix": cosine_matrix(directions)},
        "per_layer_cosine": {
            "pos": site.pos,
            "layers": list(range(next(iter(data.values())).candidates.n_layers)),
            "curves": per_layer_cosines(data, directions, site.pos),
        },
        "pca": pca,
    }
    if site.selection is not None and site.selection.chosen is not None:
        report["selection"] = site.selection.chosen.row()
    if site.file_direction is not None:
        vector = site.file_direction.vector.double()
        report["direction_file_cosine"] = {lang: round(float(vector @ u), DIGITS) for lang, u in directions.items()}
    return report


def _write(
    out: Path, overwrite: bool, report: dict[str, Any], answers: list[dict[str, Any]], plots: bool
) -> CrosslingualRecord:
    """crosslingual.json (the record, validated), the transfer answers (JSON lines) and the plots, atomically."""
    with atomic_output(out, overwrite=overwrite) as tmp:
        report["plots"] = write_plots(report, tmp) if plots else []
        record = CrosslingualRecord.model_validate(report)
        record.write(tmp / REPORT_FILE)
        if answers:
            write_atomic(tmp / ANSWERS_FILE, "".join(json_text(a, indent=None) for a in answers))
    return record


def _each(langs: list[str], desc: str) -> Iterator[str]:
    return progress.track(langs, desc, len(langs), "lang")


def run_crosslingual(settings: Settings, options: CrosslingualOptions) -> CrosslingualResult:
    """Load once; per-language candidates; site; cosines, PCA, transfer matrix; write --out."""
    if settings.out is None:
        raise UsageError("no output folder given", hint="pass --out DIR")
    out = check_output(settings.out, overwrite=settings.overwrite)
    if options.direction_file is not None and not Path(options.direction_file).exists():
        raise UsageError(f"direction file {options.direction_file} not found", hint="create one with `directions`")
    # fails now, not after an hour, if a language is missing; the texts also size --batch-size auto
    texts = [text for lang in dict.fromkeys([options.source_lang, *options.langs])
             for group in vars(load_prompts(lang_settings(settings, lang))).values() for text in group]
    targets = harmful_test_prompts(settings, options.langs, options.transfer_prompts) if options.transfer else {}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load(settings)
    n_pos = post_instruction_length(loaded.tokenizer)
    check_layer_choice(settings, loaded.n_layers, n_pos)
    settings = resolve_batch_size(settings, loaded, [*texts, *(text for ts in targets.values() for text in ts)])
    batch_size = fixed_batch_size(settings.batch_size)
    start = _timed(seconds, "load", start)
    site = choose_site(settings, options, loaded, n_pos)
    start = _timed(seconds, "site", start)
    log.info("site: layer %d, position %d (%s)", site.layer, site.pos, site.chosen_by)
    data = {lang: language_data(settings, loaded, site, lang, n_pos) for lang in _each(options.langs, "languages")}
    directions = {lang: d.direction(site) for lang, d in data.items()}
    start = _timed(seconds, "candidates", start)
    pca = {lang: language_pca(loaded, data[lang], site, directions, batch_size)
           for lang in _each(options.langs, "PCA activations")}
    start = _timed(seconds, "pca", start)
    report = build_report(settings, options, site, data, directions, pca)
    answers: list[dict[str, Any]] = []
    if options.transfer:
        transfer = transfer_matrix(loaded, directions, targets, options, batch_size)
        report["transfer"] = transfer_report(transfer, options.langs, options)
        answers = transfer.answers
        start = _timed(seconds, "transfer", start)
    report["seconds"] = seconds
    record = _write(out, settings.overwrite, report, answers, options.plots)
    return CrosslingualResult(out, record, record.plots)
