"""`abliterate demo`: the whole method, end to end, on the model organism, in minutes on a CPU.

Stages: build or reuse the organism (SmolLM2-135M-Instruct safety-tuned by `abliterate.organism`) and copy
it to `DIR/organism/`; run the normal `edit` pipeline on it with English prompts into `DIR/edited/`; then
measure, on a subset of the built-in *test* prompts (a few languages, a few dozen prompts each, short greedy
answers), the refusal rate of both models on harmful and harmless prompts and the first-token KL on the
harmless prompts the organism answers. The numbers go to `DIR/edited/abliterate/demo.json` and `demo.md`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from abliterate import benchmark, progress, prompts
from abliterate.judge import MarkerJudge
from abliterate.organism import build_organism, copy_organism, load_base, read_info
from abliterate.output import check_output
from abliterate.pipeline import EditResult, run_edit
from abliterate.settings import Settings

log = logging.getLogger(__name__)

DEMO_JSON = "demo.json"
DEMO_MD = "demo.md"


@dataclass(frozen=True)
class DemoPlan:
    """What the demo measures: languages, prompts per language and kind, answer length, edit speed-ups."""

    langs: tuple[str, ...] = ("en", "de", "fr")
    n_prompts: int = 32
    max_new_tokens: int = 64
    batch_size: int = 32
    n_train: int = 64
    n_val: int = 32
    screen_prompts: int = 8
    finalists: int = 8


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
    report: Path
    layer: int
    pos: int
    harmful: dict[str, KindRates]
    harmless: dict[str, KindRates]
    kl_mean: float
    kl_prompts: int
    kl_excluded: int
    seconds: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)

    def to_json(self, plan: DemoPlan) -> dict[str, object]:
        data = asdict(self)
        for key in ("out", "organism", "edited", "report"):
            data[key] = str(data[key])
        data["subset"] = {
            "split": "test", "langs": list(plan.langs), "prompts_per_lang_and_kind": plan.n_prompts,
            "max_new_tokens": plan.max_new_tokens, "judge": "markers", "decoding": "greedy",
        }
        return data


def prepare(out: Path, overwrite: bool) -> Path:
    """Check DIR, build or reuse the organism and copy it to DIR/organism."""
    out = check_output(out, overwrite=overwrite)
    cached = build_organism()
    return copy_organism(cached, out / "organism", overwrite=overwrite)


def edit_settings(organism: Path, out: Path, overwrite: bool, plan: DemoPlan) -> Settings:
    """`edit --lang en` on the organism, with the paper's method and a smaller search for speed."""
    return Settings(
        model=str(organism), lang="en", out=out / "edited", overwrite=overwrite, eval=False,
        n_train=plan.n_train, n_val=plan.n_val, screen_prompts=plan.screen_prompts, finalists=plan.finalists,
        batch_size=plan.batch_size, dtype="float32", device="cpu",
    )


def _rates(
    models: tuple[PreTrainedModel, PreTrainedModel], tokenizer: PreTrainedTokenizerBase, instructions: list[str],
    lang: str, plan: DemoPlan,
) -> tuple[KindRates, list[benchmark.RefusalResult]]:
    judge = MarkerJudge()
    results = [
        benchmark.refusal_rate(m, tokenizer, instructions, lang, judge, plan.max_new_tokens, plan.batch_size)
        for m in models
    ]
    return KindRates(round(results[0].rate, 4), round(results[1].rate, 4), len(instructions)), results


def measure(organism: Path, edited: Path, plan: DemoPlan) -> dict[str, object]:
    """Refusal before/after per language and kind, first-token KL on the harmless prompts the organism answers."""
    base, tokenizer = load_base(organism)
    after, _ = load_base(edited)
    source = prompts.builtin()
    harmful: dict[str, KindRates] = {}
    harmless: dict[str, KindRates] = {}
    answered: list[str] = []
    excluded = 0
    samples: list[dict[str, str]] = []
    for lang in progress.track(plan.langs, "measuring refusal", len(plan.langs), "lang"):
        bad = source.instructions(lang, "harmful", "test", plan.n_prompts)
        harmful[lang], results = _rates((base, after), tokenizer, bad, lang, plan)
        samples.append({"lang": lang, "prompt": bad[0], "before": results[0].texts[0], "after": results[1].texts[0]})
        good = source.instructions(lang, "harmless", "test", plan.n_prompts)
        harmless[lang], results = _rates((base, after), tokenizer, good, lang, plan)
        answered += [p for p, refused in zip(good, results[0].verdicts, strict=True) if not refused]
        excluded += sum(results[0].verdicts)
    kl = benchmark.first_token_kl(base, after, tokenizer, answered, plan.batch_size) if answered else None
    return {
        "harmful": harmful, "harmless": harmless, "samples": samples,
        "kl_mean": round(float(kl.mean()), 5) if kl is not None else float("nan"),
        "kl_prompts": len(answered), "kl_excluded": excluded,
    }


def markdown(result: DemoResult, plan: DemoPlan, organism_info: dict[str, object]) -> str:
    """The short human report, demo.md."""
    lines = [
        "# abliterate demo",
        "",
        f"Model organism: SmolLM2-135M-Instruct safety-tuned by `abliterate organism` "
        f"(recipe {organism_info.get('recipe_hash', '?')}), copied to `{result.organism}`.",
        f"Edited checkpoint: `{result.edited}` (direction from English prompts: layer {result.layer}, "
        f"position {result.pos}).",
        "",
        f"**This is a subset evaluation**: {plan.n_prompts} built-in *test* prompts per language and kind, "
        f"languages {', '.join(plan.langs)}, greedy answers of at most {plan.max_new_tokens} new tokens, "
        "marker judge. The full evaluation is `abliterate eval`.",
        "",
        "| language | harmful refusal before | after | harmless refusal before | after |",
        "|---|---|---|---|---|",
    ]
    for lang in plan.langs:
        h, g = result.harmful[lang], result.harmless[lang]
        lines.append(f"| {lang} | {h.before:.2f} | {h.after:.2f} | {g.before:.2f} | {g.after:.2f} |")
    lines += [
        "",
        f"Mean first-token KL(organism || edited) on the {result.kl_prompts} harmless prompts the organism "
        f"answers: {result.kl_mean:.4f} ({result.kl_excluded} it wrongly refuses are left out).",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()),
        "",
    ]
    for s in result.samples:
        lines += [f"Example ({s['lang']}): {s['prompt']}", f"- before: {s['before']!r}", f"- after: {s['after']!r}", ""]
    return "\n".join(lines)


def write_report(result: DemoResult, plan: DemoPlan) -> None:
    folder = result.report.parent
    folder.mkdir(parents=True, exist_ok=True)
    result.report.write_text(json.dumps(result.to_json(plan), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    text = markdown(result, plan, read_info(result.organism))
    (folder / DEMO_MD).write_text(text, encoding="utf-8")


def run_demo(out: Path, overwrite: bool = False, plan: DemoPlan | None = None) -> DemoResult:
    """Organism -> `edit --lang en` -> before/after measurements on a subset -> DIR/edited/abliterate/demo.*"""
    plan = plan or DemoPlan()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    organism = prepare(Path(out), overwrite)
    seconds["organism"] = round(time.perf_counter() - start, 1)
    out = organism.parent
    mark = time.perf_counter()
    edit: EditResult = run_edit(edit_settings(organism, out, overwrite, plan))
    seconds["edit"] = round(time.perf_counter() - mark, 1)
    mark = time.perf_counter()
    numbers = measure(organism, edit.out, plan)
    seconds["measure"] = round(time.perf_counter() - mark, 1)
    seconds["total"] = round(time.perf_counter() - start, 1)
    direction = edit.direction.direction
    result = DemoResult(
        out=out, organism=organism, edited=edit.out, report=edit.out / "abliterate" / DEMO_JSON,
        layer=direction.layer, pos=direction.pos, seconds=seconds, **numbers,  # type: ignore[arg-type]
    )
    write_report(result, plan)
    log.info("demo finished in %.0f s", seconds["total"])
    return result
