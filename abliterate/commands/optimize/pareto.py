"""The Pareto front of an `abliterate optimize` study, as JSON, a markdown table and a plot.

Both objectives are minimised: the mean refusal rate over the chosen languages and the mean first-token KL
divergence on harmless prompts. A trial is on the front when no other trial is at least as good on both and
better on one. The reference trial (the paper's default edit: the selected layer's direction, weight 1
everywhere) is reported beside the front, with the front trials that dominate it. Nothing here knows Optuna:
`commands/optimize/study.py` turns finished trials into `TrialRow`s.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from abliterate.storage.atomic import write_json

log = logging.getLogger(__name__)

PARETO_JSON = "pareto.json"
PARETO_MD = "pareto.md"
PARETO_PNG = "pareto.png"


@dataclass(frozen=True)
class Profile:
    """One component's weights over depth: w_l = peak * exp(-((l - pos) / width)^2 / 2)."""

    peak: float
    pos: float
    width: float  # in layers; math.inf: the same weight at every layer

    def label(self) -> str:
        width = "flat" if math.isinf(self.width) else f"w{self.width:.1f}"
        return f"{self.peak:.2f} @ {self.pos:.1f} {width}"


@dataclass(frozen=True)
class Window:
    """One component's weights over depth, window kernel: peak at pos, linear to floor x peak at reach, then 0."""

    peak: float
    pos: float
    floor: float  # the weight at the window's edge, as a fraction of the peak
    reach: float  # in layers

    def label(self) -> str:
        if self.peak == 0.0:
            return "off"
        return f"{self.peak:.2f} @ {self.pos:.1f} ±{self.reach:.1f} edge {self.floor * self.peak:.2f}"


@dataclass(frozen=True)
class TrialRow:
    """One finished trial: its objectives, per-language values and the edit it tried."""

    number: int
    refusal: float
    kl: float
    layer: float
    attention: Profile | Window
    mlp: Profile | Window
    embedding: float
    reference: bool = False
    refusal_by_lang: dict[str, float] = field(default_factory=dict)
    kl_by_lang: dict[str, float] = field(default_factory=dict)
    over_refusal_by_lang: dict[str, float] | None = None  # measured under --over-refusal-max
    feasible: bool = True  # within --over-refusal-max (always, without it)
    per_layer: bool = False  # direction scope "per layer": `layer` is then the embedding's direction only

    def dominates(self, other: TrialRow) -> bool:
        """At least as good on both objectives and better on one."""
        no_worse = self.refusal <= other.refusal and self.kl <= other.kl
        return no_worse and (self.refusal < other.refusal or self.kl < other.kl)

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        for profile in ("attention", "mlp"):
            if math.isinf(row[profile].get("width", 0.0)):
                row[profile]["width"] = None  # JSON has no infinity: null means flat
        return row


def pareto_front(rows: list[TrialRow]) -> list[TrialRow]:
    """The non-dominated feasible rows (those within --over-refusal-max), sorted by refusal rate, then KL."""
    rows = [row for row in rows if row.feasible]
    front = [row for row in rows if not any(other.dominates(row) for other in rows)]
    return sorted(front, key=lambda r: (r.refusal, r.kl, r.number))


def reference_row(rows: list[TrialRow]) -> TrialRow | None:
    return next((row for row in rows if row.reference), None)


@dataclass
class ParetoReport:
    """What `write_report` wrote."""

    rows: list[TrialRow]
    front: list[TrialRow]
    reference: TrialRow | None
    files: list[Path]

    @property
    def dominating(self) -> list[TrialRow]:
        """Front trials that dominate the reference (empty if there is no reference)."""
        ref = self.reference
        return [row for row in self.front if ref is not None and row.dominates(ref)]

    def summary(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The content of pareto.json."""
        ref = self.reference
        return {
            **meta,
            "objectives": ["mean refusal rate (minimised)", "mean first-token KL on harmless prompts (minimised)"],
            "finished_trials": len(self.rows),
            "reference": ref.to_json() if ref is not None else None,
            "reference_dominated_by": [row.number for row in self.dominating],
            "front": [row.to_json() for row in self.front],
        }


_HEADER = ["trial", "refusal", "KL", "dir. layer", "attention w", "MLP w", "embed w", "note"]


def _note(row: TrialRow, reference: TrialRow | None) -> str:
    if not row.feasible:
        return "over-refusal above --over-refusal-max"
    if row.reference:
        return "reference (paper default)"
    if reference is not None and row.dominates(reference):
        return "dominates the reference"
    return ""


def _cells(row: TrialRow, reference: TrialRow | None) -> list[str]:
    return [
        str(row.number),
        f"{row.refusal:.3f}",
        f"{row.kl:.4f}",
        f"{row.layer:.2f}" + (" (per layer)" if row.per_layer else ""),
        row.attention.label(),
        row.mlp.label(),
        f"{row.embedding:.2f}",
        _note(row, reference),
    ]


def table_lines(front: list[TrialRow], reference: TrialRow | None) -> list[str]:
    """A markdown table of the front, plus the reference as a last row when it is not on the front."""
    rows = list(front)
    if reference is not None and reference not in rows:
        rows.append(reference)
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "|".join(" --- " for _ in _HEADER) + "|"]
    lines += ["| " + " | ".join(_cells(row, reference)) + " |" for row in rows]
    return lines


def verdict_line(report: ParetoReport) -> str:
    """One sentence: does the search dominate the paper's default edit?"""
    ref = report.reference
    if ref is None:
        return "the reference trial (paper default) has not finished yet"
    if report.dominating:
        numbers = ", ".join(str(row.number) for row in report.dominating)
        which = f"trials {numbers} dominate" if len(report.dominating) > 1 else f"trial {numbers} dominates"
        return f"{which} the reference (trial {ref.number}): no worse on both objectives, better on one"
    if ref in report.front:
        return f"the reference (trial {ref.number}) is on the front: no trial beats it on both objectives"
    return f"the reference (trial {ref.number}) is dominated only by trials off the front"


def _markdown(report: ParetoReport, meta: dict[str, Any]) -> str:
    langs = ", ".join(meta.get("langs", []))
    lines = [
        f"# Pareto front: {meta.get('model', '')}",
        "",
        f"{len(report.rows)} finished trials; objectives (both minimised): mean refusal rate over {langs} "
        "(marker judge, greedy answers to harmful val prompts) and mean first-token KL on harmless val prompts.",
        "Weights per component: peak @ position (layer), then the window's reach and edge weight (window kernel) "
        "or the Gaussian width in layers or flat; off: weight 0 everywhere. See docs/optimize.md.",
        "",
        *table_lines(report.front, report.reference),
        "",
        verdict_line(report) + ".",
        "",
    ]
    return "\n".join(lines)


def _plot(path: Path, report: ParetoReport) -> bool:
    """Scatter of every trial, the front as a step line, the reference as a star. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install 'abliterate[plots]')", path.name)
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.scatter([r.kl for r in report.rows], [r.refusal for r in report.rows], s=14, c="0.7", label="trials")
    front = sorted(report.front, key=lambda r: r.kl)
    ax.step([r.kl for r in front], [r.refusal for r in front], where="post", c="tab:blue", lw=1.2)
    ax.scatter([r.kl for r in front], [r.refusal for r in front], s=24, c="tab:blue", label="Pareto front", zorder=3)
    for row in front:
        ax.annotate(str(row.number), (row.kl, row.refusal), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if report.reference is not None:
        ref = report.reference
        ax.scatter([ref.kl], [ref.refusal], marker="*", s=160, c="tab:red", label="reference (default)", zorder=4)
    positive = [r.kl for r in report.rows if r.kl > 0]
    ax.set_xscale("symlog", linthresh=min(max(min(positive, default=1e-3), 1e-6), 1e-2))  # log above, 0 shown
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("mean first-token KL on harmless prompts")
    ax.set_ylabel("mean refusal rate on harmful prompts")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_report(rows: list[TrialRow]) -> ParetoReport:
    return ParetoReport(rows, pareto_front(rows), reference_row(rows), [])


def write_report(folder: Path, rows: list[TrialRow], meta: dict[str, Any], *, plots: bool = True) -> ParetoReport:
    """Write pareto.json, pareto.md and (with `plots`) pareto.png into `folder`."""
    report = build_report(rows)
    json_path, md_path = folder / PARETO_JSON, folder / PARETO_MD
    write_json(json_path, report.summary(meta))
    md_path.write_text(_markdown(report, meta), encoding="utf-8")
    report.files = [json_path, md_path]
    if plots and report.rows and _plot(folder / PARETO_PNG, report):
        report.files.append(folder / PARETO_PNG)
    return report
