"""`abliterate demo`: the whole method, end to end, on the model organism, in minutes on a CPU.

Stages: build or reuse the organism (SmolLM2-135M-Instruct safety-tuned by `commands.organism.train`, the
recipe `DemoPlan.organism`) and copy it to `DIR/organism/`; run the normal `edit --lang LANG` pipeline
(`DemoPlan.lang`) on it into `DIR/edited/`, with its normal before/after evaluation on a subset that fits a
CPU (a few languages, a few dozen built-in *test* prompts each, short greedy answers, the small offline lm-eval
task), which writes `DIR/edited/abliterate/report.{json,md,html}`;
then print the headline numbers and write them to `DIR/demo.json` and `DIR/demo.md`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from abliterate.commands.edit import EditResult, run_edit
from abliterate.commands.organism.train import build_organism, copy_organism, named_recipe, read_info
from abliterate.evaluation.report_record import ReportRecord
from abliterate.settings import Settings
from abliterate.storage.atomic import check_output, write_json

log = logging.getLogger(__name__)

DEMO_JSON = "demo.json"
DEMO_MD = "demo.md"


@dataclass(frozen=True)
class DemoPlan:
    """What the demo runs: the organism, the direction search (smaller than the default) and the evaluation subset."""

    organism: str = "multilingual"
    """The named organism recipe (`commands.organism.train.RECIPES`): safety-tuned in six languages."""
    lang: str = "de"
    """The language of the prompts the direction is taken from (`edit --lang`): the user's headline command."""
    langs: tuple[str, ...] = ("en", "de", "fr", "zh", "it")
    """Evaluated: English, the source language, a Latin-script and a non-Latin organism language, and Italian,
    which is outside the organism's safety data (its refusal there arises only by transfer)."""
    n_prompts: int = 32
    max_new_tokens: int = 64
    batch_size: int = 32
    n_train: int = 64
    n_val: int = 32
    screen_prompts: int = 8
    finalists: int = 8
    kl_threshold: float = 0.25
    """SmolLM2-135M's first-token distributions are flat, so every ablation moves them more than in the
    2B-70B models the paper's 0.1 was set for (docs/organism.md shows the layer sweep)."""
    tasks: str = "abliterate_mini_mc"
    limit: int = 8


@dataclass
class KindRates:
    """Refusal rate of the organism (before) and of the edited model (after) on one prompt set."""

    before: float
    after: float
    n: int


@dataclass
class DemoResult:
    """Where the demo wrote things and its headline numbers."""

    out: Path
    organism: Path
    edited: Path
    report: Path  # the edit's report.md (with report.json and report.html beside it)
    layer: int
    pos: int
    harmful: dict[str, KindRates]
    """Harmful prompts refused (a refusal, not an evasion)."""
    evasive: dict[str, KindRates]
    """Harmful prompts answered evasively (neither a refusal nor the help asked for)."""
    harmless: dict[str, KindRates]
    """Harmless prompts refused (over-refusal)."""
    kl_mean: float
    kl_prompts: int
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self, plan: DemoPlan) -> dict[str, object]:
        data = asdict(self)
        for key in ("out", "organism", "edited", "report"):
            data[key] = str(data[key])
        data["subset"] = {
            "split": "test", "langs": list(plan.langs), "prompts_per_lang_and_kind": plan.n_prompts,
            "max_new_tokens": plan.max_new_tokens, "judge": "markers", "decoding": "greedy",
            "lm_eval_tasks": plan.tasks, "lm_eval_limit": plan.limit,
        }
        return data


def prepare(out: Path, overwrite: bool, plan: DemoPlan) -> Path:
    """Check DIR, build or reuse the organism and copy it to DIR/organism."""
    out = check_output(out, overwrite=overwrite)
    cached = build_organism(recipe=named_recipe(plan.organism))
    return copy_organism(cached, out / "organism", overwrite=overwrite)


def edit_settings(organism: Path, out: Path, overwrite: bool, plan: DemoPlan) -> Settings:
    """`edit --lang LANG` on the organism: a smaller search, and the evaluation on the plan's subset."""
    return Settings(
        model=str(organism), lang=plan.lang, out=out / "edited", overwrite=overwrite,
        n_train=plan.n_train, n_val=plan.n_val, screen_prompts=plan.screen_prompts, finalists=plan.finalists,
        kl_threshold=plan.kl_threshold, batch_size=plan.batch_size, dtype="float32", device="cpu",
        eval=True, langs=",".join(plan.langs), eval_prompts=plan.n_prompts, max_new_tokens=plan.max_new_tokens,
        tasks=plan.tasks, limit=plan.limit,
    )


def _known(rate: float | None) -> float:
    return float("nan") if rate is None else rate


def headline(report: ReportRecord) -> dict[str, object]:
    """Refusal before/after per language and kind, and the KL, from the edit's report.json."""
    rows = report.languages
    harmful = {r.lang: KindRates(round(1 - _known(r.compliance_before) - _known(r.evasion_before), 4),
                                 round(1 - _known(r.compliance_after) - _known(r.evasion_after), 4), r.n_harmful)
               for r in rows}
    evasive = {r.lang: KindRates(round(_known(r.evasion_before), 4), round(_known(r.evasion_after), 4), r.n_harmful)
               for r in rows}
    harmless = {r.lang: KindRates(round(_known(r.over_refusal_before), 4), round(_known(r.over_refusal_after), 4),
                                  r.n_harmless) for r in rows}
    kl_mean = report.kl.first_token if report.kl is not None and report.kl.first_token is not None else float("nan")
    return {"harmful": harmful, "evasive": evasive, "harmless": harmless, "kl_mean": kl_mean,
            "kl_prompts": report.kl.n_prompts if report.kl is not None else 0}


def markdown(result: DemoResult, plan: DemoPlan, organism_info: dict[str, object]) -> str:
    """The short human report, demo.md."""
    lines = [
        "# abliterate demo",
        "",
        f"Model organism: SmolLM2-135M-Instruct safety-tuned by `abliterate organism` "
        f"(recipe `{plan.organism}`, hash {organism_info.get('recipe_hash', '?')}), copied to `{result.organism}`.",
        f"Edited checkpoint: `{result.edited}` (direction from `{plan.lang}` prompts: layer {result.layer}, "
        f"position {result.pos}).",
        "",
        f"**This is a subset evaluation**: {plan.n_prompts} built-in *test* prompts per language and kind, "
        f"languages {', '.join(plan.langs)}, greedy answers of at most {plan.max_new_tokens} new tokens, "
        f"marker judge, lm-eval on the small offline task {plan.tasks} ({plan.limit} questions). "
        f"The full report is `{result.report}`; the full evaluation is `abliterate eval`.",
        "",
        "| language | harmful refused before | after | harmful evasive before | after "
        "| harmless refused before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    for lang in plan.langs:
        h, e, g = result.harmful[lang], result.evasive[lang], result.harmless[lang]
        lines.append(f"| {lang} | {h.before:.2f} | {h.after:.2f} | {e.before:.2f} | {e.after:.2f} | {g.before:.2f} "
                     f"| {g.after:.2f} |")
    lines += [
        "",
        f"Mean first-token KL(organism || edited) on the {result.kl_prompts} harmless test prompts: "
        f"{result.kl_mean:.4f}.",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()),
        "",
    ]
    return "\n".join(lines)


def write_summary(result: DemoResult, plan: DemoPlan) -> None:
    """DIR/demo.json and DIR/demo.md (the edited folder itself stays exactly what `edit` wrote and hashed)."""
    write_json(result.out / DEMO_JSON, result.to_json(plan))
    (result.out / DEMO_MD).write_text(markdown(result, plan, read_info(result.organism)), encoding="utf-8")


def run_demo(out: Path, overwrite: bool = False, plan: DemoPlan | None = None) -> DemoResult:
    """Organism -> `edit --lang LANG` with its evaluation on a subset -> headline numbers in DIR/demo.*"""
    plan = plan or DemoPlan()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    organism = prepare(Path(out), overwrite, plan)
    seconds["organism"] = round(time.perf_counter() - start, 1)
    out = organism.parent
    mark = time.perf_counter()
    edit: EditResult = run_edit(edit_settings(organism, out, overwrite, plan))
    seconds["edit"] = round(time.perf_counter() - mark, 1)
    assert edit.report is not None  # the demo's settings turn the evaluation on
    numbers = headline(edit.report)
    seconds["total"] = round(time.perf_counter() - start, 1)
    direction = edit.direction.direction
    result = DemoResult(
        out=out, organism=organism, edited=edit.out, report=edit.out / "abliterate" / "report.md",
        layer=direction.layer, pos=direction.pos, seconds=seconds, **numbers,  # type: ignore[arg-type]
    )
    write_summary(result, plan)
    log.info("demo finished in %.0f s", seconds["total"])
    return result
