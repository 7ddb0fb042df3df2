"""What a run will compute, counted from the settings before it runs: forward passes, rows and generations.

- The direction search: `direction.passes.expected_passes`, the numbers the search records in candidates.json
  (`forward_passes`, `forward_rows`), from the tokenizer and the prompts alone. The refusal filter can only drop
  prompts, so the counts after it are upper bounds (exact when no prompt is dropped, or with --no-filter-prompts).
- The evaluation: prompts x languages x kinds per evaluated model, answered up to --max-new-tokens; the KL's
  base answers (16 tokens) and teacher-forced passes; lm-eval tasks (counted, not timed).
- optimize: the search (unless its study exists), the unedited logits, then per trial its greedy answers and
  KL pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from abliterate.direction.passes import batches, expected_passes
from abliterate.direction.search import load_prompts, search_shape
from abliterate.evaluation.capability import parse_tasks
from abliterate.evaluation.evaluate import KL_PROMPTS, KL_TOKENS, EvalOptions, kl_prompts, select_prompts
from abliterate.model.batching import fixed_batch_size
from abliterate.planning.calibrate import ForwardTimings
from abliterate.planning.records import StagePlan
from abliterate.prompts import sources
from abliterate.prompts.languages import parse_languages
from abliterate.settings import OptimizeSettings, Settings


@dataclass(frozen=True)
class Work:
    """One stage's work before it is timed: forward passes and rows, or greedy answers up to a length cap."""

    stage: str
    passes: int = 0
    rows: int = 0
    answers: int = 0
    cap: int = 0
    answer_batches: int = 0  # generation batches: each call of the greedy loop batches its own prompts
    note: str = ""
    timed: bool = True  # lm-eval is counted, not timed

    def plan(self, timings: ForwardTimings | None) -> StagePlan:
        seconds = None
        if timings is not None and self.timed:
            seconds = timings.forward(self.passes, self.rows) + timings.generation(
                self.answers, self.cap, self.answer_batches)
        return StagePlan(stage=self.stage, passes=self.passes, rows=self.rows, generations=self.answers,
                         new_tokens=self.answers * self.cap, seconds=seconds, note=self.note)


def search_work(settings: Settings, tokenizer: PreTrainedTokenizerBase, n_layers: int) -> list[Work]:
    """The direction search's stages, as `find_direction` will count them (all prompts passing the filter)."""
    splits = load_prompts(settings)
    shape = search_shape(settings, tokenizer, n_layers, splits, splits)
    bound = "at most: the refusal filter may drop prompts" if settings.filter_prompts else ""
    notes = {"filter": "", "screening": f"{shape.candidates} candidates, {shape.screen_per_pass} per pass"}
    return [Work(f"search: {stage}", count.calls, count.rows, note=notes.get(stage, bound))
            for stage, count in expected_passes(shape).items()]


def evaluation_texts(settings: Settings) -> list[str]:
    """The instructions the evaluation answers (every language and kind)."""
    options = EvalOptions(langs=settings.langs, prompts=settings.prompts, n_prompts=settings.eval_prompts)
    return [p.instruction for kinds in select_prompts(options).values() for group in kinds.values() for p in group]


def evaluation_prompts(settings: Settings) -> tuple[list[int], int]:
    """Test prompts answered per language and kind (all in one greedy-loop queue), and the KL's prompts."""
    options = EvalOptions(langs=settings.langs, prompts=settings.prompts, n_prompts=settings.eval_prompts)
    selected = select_prompts(options)
    calls = [len(group) for kinds in selected.values() for group in kinds.values()]
    return calls, len(kl_prompts(selected, KL_PROMPTS))


def trial_texts(settings: Settings, section: OptimizeSettings) -> list[str]:
    """The val instructions optimize's trials forward (harmful answered, harmless for the KL)."""
    source = sources.load(settings.prompts, default_lang=settings.lang)
    langs = parse_languages(settings.langs)
    return [t for lang in langs for t in source.instructions(lang, "harmful", "val", section.trial_prompts)
            + source.instructions(lang, "harmless", "val", section.kl_prompts)]


KL = Literal["reference", "compare"]


def eval_work(settings: Settings, name: str, *, answers: bool = True, kl: KL | None = None) -> list[Work]:
    """One model's evaluation: the KL reference (base answers and logits) or its comparison, answers, lm-eval."""
    calls, n_kl = evaluation_prompts(settings)
    bs = fixed_batch_size(settings.batch_size)
    work = []
    if kl == "reference":
        work.append(Work(f"eval {name}: KL answers", answers=n_kl, cap=KL_TOKENS, answer_batches=batches(n_kl, bs)))
        work.append(Work(f"eval {name}: KL logits", batches(n_kl, bs), n_kl))
    if answers:
        work.append(Work(f"eval {name}: answers", answers=sum(calls), cap=settings.max_new_tokens,
                         answer_batches=batches(sum(calls), bs),  # one queue: GenerationCache.generate_jobs
                         note="at most: answers that end early cost less"))
    if kl == "compare":
        work.append(Work(f"eval {name}: KL logits", batches(n_kl, bs), n_kl))
    tasks = parse_tasks(settings.tasks)
    if tasks and answers:
        limit = f", {settings.limit} examples each" if settings.limit else ", all examples"
        work.append(Work(f"lm-eval {name}", note=f"{len(tasks)} tasks{limit}; not timed", timed=False))
    return work


def trial_sizes(settings: Settings, section: OptimizeSettings) -> tuple[int, int]:
    """Harmful prompts answered and harmless prompts forwarded per trial, over every language."""
    source = sources.load(settings.prompts, default_lang=settings.lang)
    langs = parse_languages(settings.langs)
    harmful = sum(len(source.instructions(lang, "harmful", "val", section.trial_prompts)) for lang in langs)
    harmless = sum(len(source.instructions(lang, "harmless", "val", section.kl_prompts)) for lang in langs)
    return harmful, harmless


def optimize_work(settings: Settings, section: OptimizeSettings, trials: int) -> list[Work]:
    """The unedited logits and `trials` trials (each: greedy answers, a KL pass, over-refusal answers if asked)."""
    harmful, harmless = trial_sizes(settings, section)
    bs = fixed_batch_size(settings.batch_size)
    over = section.over_refusal_max is not None
    cap = section.trial_max_new_tokens
    return [
        Work("optimize: unedited logits", batches(harmless, bs), harmless),
        Work(f"optimize: {trials} trials", trials * batches(harmless, bs), trials * harmless,
             answers=trials * (harmful + (harmless if over else 0)), cap=cap,
             answer_batches=trials * (batches(harmful, bs) + (batches(harmless, bs) if over else 0)),
             note="at most: answers that end early cost less"),
    ]
