"""The before/after evaluation report: report.json, report.md, a self-contained report.html and PNG plots.

Owns the comparison of two results dicts (the base model = before, the edited model = after; written by
`abliterate.evaluate`): per-language compliance and over-refusal, capability deltas (lm-eval) and the KL
damage block; the plots (matplotlib's Agg canvas, no pyplot state); report.md (the tables the model card
embeds, abliterate/card.py); report.html (one file: CSS and the PNGs inlined as base64, no external
reference). `edit` and `abliterate report` call `write_report`.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from abliterate.capability import metrics
from abliterate.languages import LANGUAGES

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOT_FILES = {"compliance": "compliance.png", "capability": "capability.png", "kl": "kl.png"}
HEAD_CHARS = 300
"""report.html shows each answer's first HEAD_CHARS characters (what the marker judge reads); report.json
holds the full texts."""
BEFORE_COLOUR = "#8c9aa8"
AFTER_COLOUR = "#d9534f"
KL_COLOURS = ("#5b8db8", "#e0a030")


# --- the comparison --------------------------------------------------------------------------------------


def _delta(before: float | None, after: float | None) -> float | None:
    return after - before if before is not None and after is not None else None


def language_rows(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per language evaluated on either side (after's order first)."""
    rows = []
    for lang in dict.fromkeys([*after["languages"], *before["languages"]]):
        b, a = before["languages"].get(lang), after["languages"].get(lang)
        rows.append({
            "lang": lang,
            "name": LANGUAGES.get(lang, lang),
            "n_harmful": (a or b)["harmful"]["n"],
            "n_harmless": (a or b)["harmless"]["n"],
            "compliance_before": b["compliance"] if b else None,
            "compliance_after": a["compliance"] if a else None,
            "over_refusal_before": b["over_refusal"] if b else None,
            "over_refusal_after": a["over_refusal"] if a else None,
        })
    return rows


def capability_rows(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """(task, metric) rows with before, after and the change; a metric measured on one side only keeps None."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for side, results in (("before", before), ("after", after)):
        for task, metric, value, stderr in metrics(results.get("lm_eval")):
            row = found.setdefault((task, metric), {"task": task, "metric": metric, "before": None, "after": None,
                                                    "before_stderr": None, "after_stderr": None})
            row[side], row[f"{side}_stderr"] = value, stderr
    rows = list(found.values())
    for row in rows:
        row["delta"] = _delta(row["before"], row["after"])
    return rows


def _kl_summary(after: dict[str, Any]) -> dict[str, Any] | None:
    kl = after.get("kl")
    if not kl:
        return None
    return {k: v for k, v in kl.items() if k != "records"}


def build_report(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """report.json: the comparison, then both results in full (with every prompt's answer and verdict)."""
    b, a = before["summary"], after["summary"]
    return {
        "schema_version": SCHEMA_VERSION,
        "before_model": before["model"],
        "after_model": after["model"],
        "settings": after.get("settings"),
        "summary": {
            "compliance_before": b.get("compliance"),
            "compliance_after": a.get("compliance"),
            "over_refusal_before": b.get("over_refusal"),
            "over_refusal_after": a.get("over_refusal"),
            "kl_first_token": (after.get("kl") or {}).get("first_token"),
            "kl_first_n_tokens": (after.get("kl") or {}).get("first_n_tokens"),
        },
        "languages": language_rows(before, after),
        "capability": capability_rows(before, after),
        "kl": _kl_summary(after),
        "before": before,
        "after": after,
    }


# --- formatting ------------------------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def _kl(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _with_err(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}"


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def model_name(info: dict[str, Any]) -> str:
    """A hub id as given; a local folder by its name only (the report goes into model cards)."""
    spec = str(info.get("spec", "?"))
    return Path(spec.rstrip("/")).name if is_path(spec) else spec


def is_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or Path(spec).expanduser().exists() or spec.count("/") != 1


def setup_text(report: dict[str, Any]) -> str:
    """One paragraph: the two models and how they were evaluated."""
    s = report.get("settings") or {}
    n = s.get("n_prompts")
    count = f"{n} harmful and {n} harmless" if n else "all harmful and harmless"
    return (
        f"Before: `{model_name(report['before_model'])}`; after: `{model_name(report['after_model'])}`. "
        f"Greedy answers of at most {s.get('max_new_tokens', '?')} new tokens to {count} `{s.get('split', 'test')}` "
        f"prompts per language (source `{s.get('prompts', '?')}`), judged by `{s.get('judge', '?')}`. "
        "Compliance is the share of harmful prompts answered rather than refused; over-refusal is the share of "
        "harmless prompts refused."
    )


def language_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Header and rows (strings) of the per-language table, with a mean row."""
    table = [["language", "n (harmful/harmless)", "compliance before", "compliance after",
              "over-refusal before", "over-refusal after"]]
    keys = ("compliance_before", "compliance_after", "over_refusal_before", "over_refusal_after")
    for row in rows:
        table.append([f"{row['lang']} ({row['name']})", f"{row['n_harmful']}/{row['n_harmless']}",
                      *(_rate(row[k]) for k in keys)])
    if len(rows) > 1:
        table.append(["mean", "", *(_rate(_mean([r[k] for r in rows])) for k in keys)])
    return table


def capability_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    table = [["task", "metric", "before", "after", "change"]]
    for row in rows:
        table.append([row["task"], row["metric"], _with_err(row["before"], row["before_stderr"]),
                      _with_err(row["after"], row["after_stderr"]), _signed(row["delta"])])
    return table


def kl_text(kl: dict[str, Any] | None) -> str:
    if not kl:
        return "Not measured (no base model to compare with)."
    return (
        f"KL(base ‖ edited) of the next-token distribution on {kl['n_prompts']} harmless prompts, teacher-forced "
        f"on the base model's greedy answers: **{_kl(kl['first_token'])}** at the first answer token, "
        f"**{_kl(kl['first_n_tokens'])}** averaged over the first {kl['tokens']} answer tokens."
    )


def capability_note(report: dict[str, Any]) -> str:
    block = (report.get("after") or {}).get("lm_eval") or (report.get("before") or {}).get("lm_eval")
    if not block:
        return "Not measured (`--tasks none`)."
    limit = f", at most {block['limit']} examples per task" if block.get("limit") else ""
    return f"lm-eval {block.get('lm_eval_version', '?')}, chat template applied{limit}; ± is lm-eval's stderr."


def markdown_table(table: list[list[str]]) -> str:
    header, *rows = table
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any], plots: dict[str, Path]) -> str:
    """report.md: the tables the model card embeds; plots referenced by file name (same folder)."""
    parts = [
        "# Evaluation report",
        setup_text(report),
        "## Refusal per language",
        markdown_table(language_table(report["languages"])),
        "## Damage",
        kl_text(report.get("kl")),
        "## Capability",
    ]
    if report["capability"]:
        parts.append(markdown_table(capability_table(report["capability"])))
    parts.append(capability_note(report))
    if plots:
        parts.append("## Plots")
        parts.append("\n\n".join(f"![{name}]({path.name})" for name, path in plots.items()))
    parts.append(
        f"Every prompt's answer and the judge's verdict are in `{REPORT_JSON}` (`before`/`after` → `languages`)."
    )
    return "\n\n".join(parts) + "\n"


# --- plots -----------------------------------------------------------------------------------------------


def _figure(rows: int, width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    return fig, axes


def _bars(
    ax: Any,
    labels: list[str],
    series: list[tuple[str, list[float | None], str]],
    title: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
    fmt: str = "%.2f",
) -> None:
    """Grouped bars, one group per label and one bar per (name, values, colour); None draws no bar."""
    xs = range(len(labels))
    width = 0.8 / len(series)
    for i, (name, values, colour) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        heights = [float("nan") if v is None else v for v in values]
        bars = ax.bar([x + offset for x in xs], heights, width, label=name, color=colour)
        ax.bar_label(bars, fmt=fmt, fontsize="x-small", padding=1)
    ax.set_xticks(list(xs), labels)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")


def _before_after(before: list[float | None], after: list[float | None]) -> list[tuple[str, list[float | None], str]]:
    return [("before", before, BEFORE_COLOUR), ("after", after, AFTER_COLOUR)]


def plot_compliance(report: dict[str, Any], path: Path) -> None:
    rows = report["languages"]
    labels = [r["lang"] for r in rows]
    fig, (top, bottom) = _figure(2, max(7.5, 0.7 * len(rows) + 3), 6.5)
    _bars(top, labels, _before_after([r["compliance_before"] for r in rows], [r["compliance_after"] for r in rows]),
          "Compliance with harmful prompts (higher = refusal removed)", "share answered", (0, 1.1))
    _bars(bottom, labels,
          _before_after([r["over_refusal_before"] for r in rows], [r["over_refusal_after"] for r in rows]),
          "Over-refusal of harmless prompts (lower is better)", "share refused", (0, 1.1))
    fig.savefig(path, format="png")


def plot_capability(report: dict[str, Any], path: Path) -> None:
    rows = report["capability"]
    labels = [f"{r['task']}\n{r['metric']}" for r in rows]
    fig, (ax,) = _figure(1, max(7.5, 1.4 * len(rows) + 3), 4.0)
    top = max([v for r in rows for v in (r["before"], r["after"]) if v is not None] or [1.0])
    _bars(ax, labels, _before_after([r["before"] for r in rows], [r["after"] for r in rows]),
          "Capability (lm-eval); change after - before above each pair", "score", (0, top * 1.25), "%.3f")
    for x, row in enumerate(rows):
        if row["delta"] is not None:
            ax.annotate(_signed(row["delta"]), (x, top * 1.12), ha="center", fontsize="small", weight="bold")
    fig.savefig(path, format="png")


def plot_kl(report: dict[str, Any], path: Path) -> None:
    kl = report["kl"]
    langs = list(kl["languages"])
    fig, (left, right) = _figure(2, max(7.5, 0.7 * len(langs) + 3), 6.5)
    series = [
        ("first answer token", [kl["languages"][g]["first_token"] for g in langs], KL_COLOURS[0]),
        (f"mean of first {kl['tokens']}", [kl["languages"][g]["first_n_tokens"] for g in langs], KL_COLOURS[1]),
    ]
    _bars(left, langs, series, "KL(base ‖ edited) on harmless prompts", "nats", fmt="%.3g")
    per_position = [v for v in kl["per_position"] if v is not None]
    right.plot(range(1, len(per_position) + 1), per_position, marker="o", color=KL_COLOURS[1])
    right.set_title("Mean KL by answer position (teacher-forced)")
    right.xaxis.get_major_locator().set_params(integer=True)
    left.set_ylim(0, max([v for _, values, _ in series for v in values if v is not None] or [1.0]) * 1.15)
    right.set_xlabel("answer token")
    right.set_ylabel("nats")
    right.grid(alpha=0.3)
    fig.savefig(path, format="png")


def write_plots(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    """The PNGs that apply to this report ({} when matplotlib is missing: the report then has no plots)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: the report has no plots (pip install 'abliterate[plots]')")
        return {}
    makers: dict[str, Callable[[dict[str, Any], Path], None]] = {"compliance": plot_compliance}
    if report["capability"]:
        makers["capability"] = plot_capability
    if report.get("kl") and report["kl"].get("languages"):
        makers["kl"] = plot_kl
    written = {}
    for name, make in makers.items():
        path = folder / PLOT_FILES[name]
        make(report, path)
        written[name] = path
    return written


# --- HTML ------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; display: block; margin: 1em 0; }
details { margin: 0.5em 0; }
td.text { text-align: left; white-space: pre-wrap; font-size: 0.85em; max-width: 28em; }
.refusal { color: #2a7a2a; } .compliance { color: #b52b27; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _html_table(table: list[list[str]]) -> str:
    header, *rows = table
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline_markdown(text: str) -> str:
    """Escape, then render `code` and **bold** (the only markup the report's sentences use)."""
    out = html.escape(text)
    for mark, tag in (("`", "code"), ("**", "strong")):
        pieces = out.split(mark)
        out = "".join(p if i % 2 == 0 else f"<{tag}>{p}</{tag}>" for i, p in enumerate(pieces))
    return out


def _verdict(refusal: bool | None) -> str:
    if refusal is None:
        return "<td>–</td>"
    word, cls = ("refusal", "refusal") if refusal else ("answered", "compliance")
    return f'<td class="{cls}">{word}</td>'


def _head(text: str | None) -> str:
    if text is None:
        return "–"
    return text[:HEAD_CHARS] + (" […]" if len(text) > HEAD_CHARS else "")


def _block(report: dict[str, Any], side: str, lang: str, kind: str) -> dict[str, Any]:
    """One side's results block for a language and kind ({} when that side did not evaluate it)."""
    languages = (report.get(side) or {}).get("languages") or {}
    block: dict[str, Any] = (languages.get(lang) or {}).get(kind) or {}
    return block


def _answers_section(report: dict[str, Any]) -> str:
    """Per language and kind: each prompt with both answers (their heads) and verdicts, collapsed."""
    parts = []
    for row in report["languages"]:
        lang = row["lang"]
        for kind in ("harmful", "harmless"):
            records = {side: {r["id"]: r for r in _block(report, side, lang, kind).get("records", [])}
                       for side in ("before", "after")}
            ids = list(dict.fromkeys([*records["before"], *records["after"]]))
            lines = []
            for pid in ids:
                b, a = records["before"].get(pid), records["after"].get(pid)
                prompt = (a or b or {}).get("prompt", "")
                lines.append(
                    f"<tr><td>{html.escape(str(pid))}</td><td class='text'>{html.escape(prompt)}</td>"
                    f"<td class='text'>{html.escape(_head((b or {}).get('response')))}</td>"
                    f"{_verdict((b or {}).get('refusal'))}"
                    f"<td class='text'>{html.escape(_head((a or {}).get('response')))}</td>"
                    f"{_verdict((a or {}).get('refusal'))}</tr>"
                )
            parts.append(
                f"<details><summary>{html.escape(lang)} {kind}: {len(ids)} prompts</summary><table><thead><tr>"
                "<th>id</th><th>prompt</th><th>answer before</th><th>verdict</th><th>answer after</th>"
                f"<th>verdict</th></tr></thead><tbody>{''.join(lines)}</tbody></table></details>"
            )
    return "".join(parts)


def _png_data(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(report: dict[str, Any], plots: dict[str, Path]) -> str:
    """report.html: one self-contained page (inline CSS, plots as data: URIs, no external reference)."""
    images = "".join(
        f'<img alt="{html.escape(name)}" src="{_png_data(path)}">' for name, path in plots.items()
    )
    capability = _html_table(capability_table(report["capability"])) if report["capability"] else ""
    body = (
        "<h1>Evaluation report</h1>"
        f"<p>{_inline_markdown(setup_text(report))}</p>"
        "<h2>Refusal per language</h2>"
        f"{_html_table(language_table(report['languages']))}"
        "<h2>Damage</h2>"
        f"<p>{_inline_markdown(kl_text(report.get('kl')))}</p>"
        f"<h2>Capability</h2>{capability}<p>{_inline_markdown(capability_note(report))}</p>"
        + (f"<h2>Plots</h2>{images}" if images else "")
        + "<h2>Answers</h2>"
        f"<p>The first {HEAD_CHARS} characters of each answer (what the marker judge reads); full texts in "
        f"<code>{REPORT_JSON}</code>.</p>"
        f"{_answers_section(report)}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>abliterate evaluation report</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


# --- files -----------------------------------------------------------------------------------------------


def write_report(folder: Path, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Write report.json, report.md, report.html and the plots into `folder`; return the report."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = build_report(before, after)
    plots = write_plots(report, folder)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / REPORT_MD).write_text(render_markdown(report, plots), encoding="utf-8")
    (folder / REPORT_HTML).write_text(render_html(report, plots), encoding="utf-8")
    log.info("wrote the evaluation report to %s", folder / REPORT_HTML)
    return report
