"""Evaluation of a chat model: refusal per language, damage against a base model, capability; results.json.

Owns `abliterate eval` and the evaluation that `edit` runs on the base and the edited model:

- refusal benchmark: greedy answers (`evaluation.generate.generate`, through the generation cache) to the harmful and
  harmless *test* prompts of each language, each judged by a `Judge` as refusal, evasion or compliance (and
  harmful or not, with a model judge or `--harm-judge`). Compliance = share of harmful prompts answered
  (neither refused nor evaded); over-refusal = refusal rate on the harmless ones; evasion and attack success
  (harmful answers to harmful prompts) beside them. Every prompt's id, text, answer and verdict is kept, so
  that a reader can audit the judge;
- damage (with a base model): KL(base || model) of the next-token distribution on harmless prompts,
  teacher-forced on the base model's greedy answer: at the first answer token, and averaged over the first
  `kl_tokens` answer tokens;
- capability: lm-eval tasks (`evaluation.capability`);
- the results dict and its JSON file (their schema is in `evaluation.results`, documented in docs/evaluation.md).

`EditEvaluation` is the part `edit` uses: checks first, the base model before it is freed, the written
checkpoint afterwards, then the report (`evaluation.report`).

Engines (`--engine`, `abliterate.evaluation.engines`): with `hf` the refusal benchmark's answers come from the
transformers model in memory. With `vllm` they come from vLLM in a child process that reads the model folder
and needs the GPU to itself, so the order changes: `eval` answers with vLLM before it loads the transformers
model (which it then loads only for the KL or lm-eval); `edit` measures the base's KL reference and lm-eval
with the forward-pass model it already holds, and the base's and the edited model's vLLM answers after that
model has been dropped (`measure_edited`, once the edited checkpoint is written). `--quantize` applies to
every transformers model loaded here, the base's and the edited checkpoint's alike, so before and after are
measured in the same precision.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from abliterate import __version__, progress
from abliterate.direction.selection import kl_divergence
from abliterate.errors import DataError, UsageError
from abliterate.evaluation.answer_cache import GenerationCache, engine_generation_key, model_identity
from abliterate.evaluation.capability import DEFAULT_TASKS, check_tasks, parse_tasks, run_tasks
from abliterate.evaluation.engines import VLLMOptions, check_engine, folder_stop_ids
from abliterate.evaluation.engines import generate as engine_generate
from abliterate.evaluation.generate import Generation
from abliterate.evaluation.judge import Judge, check_harm_spec, make_judge
from abliterate.model.batching import fixed_batch_size
from abliterate.model.chat import encode, render, set_chat_template
from abliterate.model.loading import ModelSource, check_quantize, load_model, load_tokenizer, resolve
from abliterate.prompts import sources
from abliterate.prompts.languages import parse_languages
from abliterate.prompts.records import KINDS, Prompt, Split

if TYPE_CHECKING:
    from abliterate.settings import Settings

from abliterate.evaluation.report import write_report
from abliterate.evaluation.report_record import ReportRecord
from abliterate.evaluation.results import (
    SCHEMA_VERSION,
    ResultsRecord,
    block_counts,
    language_entry,
    summarize,
    write_results,
)

log = logging.getLogger(__name__)

KL_TOKENS = 16
"""Answer tokens over which the mean KL is taken (teacher-forced on the base model's answer)."""
KL_PROMPTS = 64
"""At most this many harmless prompts (spread over the languages) for the KL: the base model's logits for
them are held in memory (prompts x KL_TOKENS x vocabulary floats)."""
SPLIT: Split = "test"


# --- options and prompts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalOptions:
    """What an evaluation measures and how (the `settings` block of results.json)."""

    langs: str = "all"
    judge: str = "markers"
    harm_judge: str | None = None
    prompts: str = "builtin"
    n_prompts: int | None = None
    max_new_tokens: int = 128
    batch_size: int = 16
    tasks: tuple[str, ...] = DEFAULT_TASKS
    limit: int | None = None
    kl_tokens: int = KL_TOKENS
    kl_prompts: int = KL_PROMPTS
    cache: bool = True
    dtype: str = "auto"
    device: str = "auto"
    engine: str = "hf"
    quantize: str = "none"

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> EvalOptions:
        options = cls(
            langs=settings.langs,
            judge=settings.judge,
            harm_judge=settings.harm_judge,
            prompts=settings.prompts,
            n_prompts=settings.eval_prompts,
            max_new_tokens=settings.max_new_tokens,
            batch_size=fixed_batch_size(settings.batch_size),
            tasks=tuple(parse_tasks(settings.tasks)),
            limit=settings.limit,
            dtype=settings.dtype,
            device=settings.device,
            engine=settings.engine,
            quantize=settings.quantize,
        )
        return replace(options, **overrides)

    def describe(self) -> dict[str, Any]:
        return {
            "judge": self.judge,
            "harm_judge": self.harm_judge,
            "prompts": self.prompts,
            "split": SPLIT,
            "n_prompts": self.n_prompts,
            "max_new_tokens": self.max_new_tokens,
            "decoding": "greedy",
            "batch_size": self.batch_size,
            "tasks": list(self.tasks),
            "limit": self.limit,
            "kl_tokens": self.kl_tokens,
            "kl_prompts": self.kl_prompts,
            "dtype": self.dtype,
            "device": self.device,
            "engine": self.engine,
            "quantize": self.quantize,
        }


EvalPrompts = dict[str, dict[str, list[Prompt]]]
"""{lang: {"harmful": [...], "harmless": [...]}}: the test prompts of each evaluated language."""


def select_prompts(options: EvalOptions) -> EvalPrompts:
    """The test prompts per language and kind; `all` skips languages the source lacks, a list does not."""
    langs = parse_languages(options.langs)
    explicit = options.langs.strip() != "all"
    source = sources.load(options.prompts, default_lang=langs[0])
    chosen: EvalPrompts = {}
    for lang in langs:
        kinds: dict[str, list[Prompt]] = {
            kind: source.select(lang, kind, SPLIT)[: options.n_prompts] for kind in KINDS
        }
        missing = [kind for kind, found in kinds.items() if not found]
        if missing and explicit:
            raise DataError(
                f"prompt source {options.prompts!r} has no {' or '.join(missing)} test prompts for {lang!r}",
                hint=f"the evaluation uses the test split; languages it has: {', '.join(source.languages())}",
            )
        if missing:
            log.info("no %s test prompts for %s in %s: language skipped", "/".join(missing), lang, options.prompts)
            continue
        chosen[lang] = kinds
    if not chosen:
        raise DataError(
            f"prompt source {options.prompts!r} has no test prompts",
            hint="the evaluation uses split=test records of both kinds; see docs/data.md",
        )
    return chosen


def check_judge_spec(spec: str, harm: str | None = None) -> None:
    """The --judge and --harm-judge specs' forms, checked before anything slow (make_judge loads a model
    judge's weights)."""
    text = spec.strip()
    if text != "markers" and not (text.startswith("model:") and text[len("model:"):].strip()):
        make_judge(text)  # raises the judge module's own UsageError with the valid forms
    check_harm_spec(harm)


# --- loading ---------------------------------------------------------------------------------------------


@dataclass
class EvalModel:
    """A model loaded for evaluation, with what results.json says about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    folder: Path
    identity: str

    def info(self) -> dict[str, Any]:
        return {"spec": self.spec, "folder": str(self.folder), "identity": self.identity}


def load_for_eval(source: ModelSource, settings: Settings, spec: str | None = None) -> EvalModel:
    """Load a resolved model (and check its chat template) for the evaluation."""
    model, tokenizer = load_model(
        source, dtype=settings.dtype, device=settings.device, trust_remote_code=settings.trust_remote_code,
        quantize=settings.quantize,
    )
    set_chat_template(tokenizer, settings.chat_template, source.spec)
    return EvalModel(model, tokenizer, spec or source.spec, Path(source.folder), model_identity(source.folder))


@dataclass
class EngineTarget:
    """A model on disk for the vLLM engine: tokenizer, stop ids, identity, and where vLLM reads the weights."""

    tokenizer: PreTrainedTokenizerBase
    spec: str
    folder: Path  # as results.json reports it (an edited checkpoint: where it will be after the rename)
    identity: str
    weights: Path  # where vLLM reads it now (an edited checkpoint: the temporary folder)
    stops: list[int]
    trust_remote_code: bool = False

    def info(self) -> dict[str, Any]:
        return {"spec": self.spec, "folder": str(self.folder), "identity": self.identity}


def engine_target(
    source: ModelSource,
    settings: Settings,
    *,
    spec: str | None = None,
    folder: Path | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> EngineTarget:
    """A resolved model for vLLM; only its tokenizer is loaded (with the chat template checked) if not given."""
    if tokenizer is None:
        tokenizer = load_tokenizer(source, trust_remote_code=settings.trust_remote_code)
        set_chat_template(tokenizer, settings.chat_template, source.spec)
    weights = Path(source.folder)
    return EngineTarget(
        tokenizer, spec or source.spec, folder or weights, model_identity(weights), weights,
        folder_stop_ids(weights, tokenizer), settings.trust_remote_code,
    )


def resolve_model(spec: str, settings: Settings) -> ModelSource:
    return resolve(spec, revision=settings.revision, allow_pickle=settings.allow_pickle)


# --- refusal benchmark -----------------------------------------------------------------------------------


def judged_block(
    judge: Judge, chosen: Sequence[Prompt], texts: Sequence[str], lang: str
) -> dict[str, Any]:
    """Counts (`block_counts`) and the per-prompt records of one language and kind."""
    verdicts = judge.verdicts([p.instruction for p in chosen], list(texts), [lang] * len(chosen))
    records = [
        {"id": p.id, "prompt": p.instruction, "response": text, **verdict.record()}
        for p, text, verdict in zip(chosen, texts, verdicts, strict=True)
    ]
    return {**block_counts(records), "records": records}


AnswerTexts = dict[tuple[str, str], list[str]]
"""{(lang, kind): greedy answer texts, in prompt order}: the refusal benchmark's answers."""


def benchmark_jobs(selected: EvalPrompts) -> list[tuple[str, str]]:
    return [(lang, kind) for lang in selected for kind in KINDS]


def hf_answers(target: EvalModel, selected: EvalPrompts, options: EvalOptions, cache: GenerationCache) -> AnswerTexts:
    """The refusal benchmark's answers from the transformers model in memory (through the cache).

    Every (language, kind) not in the cache goes into one `generate` call, so that continuous batching keeps
    its slots full across them instead of running each list's tail with few rows (docs/performance.md).
    """
    jobs = {job: [p.instruction for p in selected[job[0]][job[1]]] for job in benchmark_jobs(selected)}
    generations = cache.generate_jobs(target.model, target.tokenizer, target.identity, jobs, options.max_new_tokens,
                                      options.batch_size, "answers")
    return {job: generations[job].texts for job in jobs}


def engine_answers(
    target: EngineTarget, selected: EvalPrompts, options: EvalOptions, cache: GenerationCache
) -> AnswerTexts:
    """The refusal benchmark's answers by vLLM from `target`'s folder: cached ones reused, the rest in one run."""
    config = VLLMOptions.from_settings(options.dtype, options.quantize, target.trust_remote_code)
    engine = {**config.describe(), "stop_ids": target.stops}
    jobs = benchmark_jobs(selected)
    texts = {job: [p.instruction for p in selected[job[0]][job[1]]] for job in jobs}
    keys = {
        job: engine_generation_key(target.identity, target.tokenizer, texts[job], options.max_new_tokens, engine)
        for job in jobs
    }
    found: dict[tuple[str, str], Generation] = {}
    for job in jobs:
        cached = cache.lookup(keys[job], len(texts[job]))
        if cached is not None:
            found[job] = cached
    missing = [job for job in jobs if job not in found]
    if missing:
        generation = engine_generate(
            target.weights, target.tokenizer, [t for job in missing for t in texts[job]], options.max_new_tokens,
            target.stops, config,
        )
        for job, part in zip(missing, generation.split([len(texts[j]) for j in missing]), strict=True):
            meta = {"model": target.identity, "prompts": len(texts[job]), "max_new_tokens": options.max_new_tokens,
                    "engine": "vllm", "what": f"answers {job[0]} {job[1]}"}
            cache.write(keys[job], part, meta)
            found[job] = part
    return {job: found[job].texts for job in jobs}


def judge_answers(judge: Judge, selected: EvalPrompts, answers: AnswerTexts) -> dict[str, Any]:
    """{lang: {compliance, over_refusal, harmful: block, harmless: block}} from the answers' verdicts."""
    languages: dict[str, Any] = {}
    for lang in selected:
        harmful = judged_block(judge, selected[lang]["harmful"], answers[lang, "harmful"], lang)
        harmless = judged_block(judge, selected[lang]["harmless"], answers[lang, "harmless"], lang)
        languages[lang] = language_entry(harmful, harmless)
    return languages


def refusal_benchmark(
    target: EvalModel, selected: EvalPrompts, judge: Judge, options: EvalOptions, cache: GenerationCache
) -> dict[str, Any]:
    """{lang: {compliance, over_refusal, harmful: block, harmless: block}} from the loaded model's answers."""
    return judge_answers(judge, selected, hf_answers(target, selected, options, cache))


# --- damage: KL against the base model -------------------------------------------------------------------


@dataclass
class KLReference:
    """The base model's teacher-forced logits on harmless prompts, to compare another model against."""

    base: dict[str, Any]
    tokens: int
    ids: list[str]
    langs: list[str]
    inputs: list[list[int]]  # rendered prompt + the base answer's first (positions - 1) tokens
    positions: list[int]  # answer positions compared (the answer's first tokens, and its end if it ended)
    logits: list[torch.Tensor] = field(repr=False)  # [positions, vocab] float32, per prompt
    vocab_size: int = 0


def kl_prompts(selected: EvalPrompts, total: int) -> list[tuple[str, Prompt]]:
    """(lang, prompt) for about `total` harmless prompts, the same number from each language."""
    per_lang = max(1, math.ceil(total / max(1, len(selected))))
    return [(lang, p) for lang in selected for p in selected[lang]["harmless"][:per_lang]]


def _teacher_forced_logits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, inputs: list[list[int]], positions: list[int],
    batch_size: int, desc: str,
) -> list[torch.Tensor]:
    """Logits at the last `positions[i]` positions of each input (the answer tokens), float32 on CPU."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    out: list[torch.Tensor | None] = [None] * len(inputs)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for chosen in progress.track(batches, desc, len(batches), "batch"):
            batch = tokenizer.pad({"input_ids": [inputs[i] for i in chosen]}, padding=True, return_tensors="pt")
            keep = max(positions[i] for i in chosen)
            result = model(**{k: v.to(model.device) for k, v in batch.items()}, use_cache=False, logits_to_keep=keep)
            logits = result.logits[:, -keep:, :].float().cpu()
            for row, i in enumerate(chosen):
                out[i] = logits[row, keep - positions[i] :].clone()
    return [t for t in out if t is not None]


def kl_reference(
    base: EvalModel, selected: EvalPrompts, options: EvalOptions, cache: GenerationCache
) -> KLReference:
    """The base model's greedy answers to the KL prompts, and its logits along them."""
    chosen = kl_prompts(selected, options.kl_prompts)
    instructions = [p.instruction for _, p in chosen]
    generation = cache.generate(
        base.model, base.tokenizer, base.identity, instructions, options.kl_tokens, options.batch_size,
        "base answers for the KL",
    )
    prompt_ids = encode(base.tokenizer, [render(base.tokenizer, text) for text in instructions])
    positions = [
        max(1, min(options.kl_tokens, len(ids) + (1 if ended else 0)))
        for ids, ended in zip(generation.ids, generation.finished, strict=True)
    ]
    inputs = [
        prompt + answer[: n - 1] for prompt, answer, n in zip(prompt_ids, generation.ids, positions, strict=True)
    ]
    logits = _teacher_forced_logits(base.model, base.tokenizer, inputs, positions, options.batch_size, "base logits")
    return KLReference(
        base=base.info(), tokens=options.kl_tokens, ids=[p.id for _, p in chosen],
        langs=[lang for lang, _ in chosen], inputs=inputs, positions=positions, logits=logits,
        vocab_size=int(logits[0].shape[-1]) if logits else 0,
    )


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def kl_block(target: EvalModel, reference: KLReference, batch_size: int) -> dict[str, Any]:
    """First-token and mean first-N-token KL(base || model), overall, per language and per prompt."""
    logits = _teacher_forced_logits(
        target.model, target.tokenizer, reference.inputs, reference.positions, batch_size, "KL against the base"
    )
    if logits and logits[0].shape[-1] != reference.vocab_size:
        raise UsageError(
            f"the base model's vocabulary ({reference.vocab_size}) differs from the model's ({logits[0].shape[-1]})",
            hint="--base must be the model this one was edited from (same tokenizer)",
        )
    records = []
    per_position: list[list[float]] = [[] for _ in range(reference.tokens)]
    for pid, lang, base_logits, model_logits in zip(
        reference.ids, reference.langs, reference.logits, logits, strict=True
    ):
        kl = kl_divergence(base_logits, model_logits).clamp_min(0.0).tolist()
        for j, value in enumerate(kl):
            per_position[j].append(value)
        records.append({"id": pid, "lang": lang, "tokens": len(kl), "first_token": kl[0],
                        "first_n_tokens": sum(kl) / len(kl)})
    languages = {
        lang: {
            "n": len(rows),
            "first_token": _mean([r["first_token"] for r in rows]),
            "first_n_tokens": _mean([r["first_n_tokens"] for r in rows]),
        }
        for lang in dict.fromkeys(reference.langs)
        if (rows := [r for r in records if r["lang"] == lang])
    }
    return {
        "base": reference.base,
        "tokens": reference.tokens,
        "n_prompts": len(records),
        "first_token": _mean([r["first_token"] for r in records]),
        "first_n_tokens": _mean([r["first_n_tokens"] for r in records]),
        "per_position": [_mean(v) for v in per_position if v],
        "languages": languages,
        "records": records,
    }


# --- the whole evaluation --------------------------------------------------------------------------------


@dataclass
class Answers:
    """The refusal benchmark's answers with the seconds they took and the generation cache's hits and misses."""

    texts: AnswerTexts
    seconds: float
    hits: int = 0
    misses: int = 0


@dataclass
class ModelMeasures:
    """The measures that need the transformers model in memory: KL against the base, lm-eval capability."""

    kl: dict[str, Any] | None = None
    capability: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Evaluator:
    """What every evaluation of a run shares: options, prompts, judge and generation cache."""

    options: EvalOptions
    selected: EvalPrompts
    judge: Judge
    cache: GenerationCache

    @classmethod
    def prepare(cls, options: EvalOptions) -> Evaluator:
        """Check everything that can fail cheaply (engine, prompts, lm-eval tasks, judge) before any long work."""
        check_engine(options.engine, options.quantize)
        selected = select_prompts(options)
        check_judge_spec(options.judge, options.harm_judge)
        check_tasks(options.tasks)
        judge = make_judge(options.judge, harm=options.harm_judge, device=options.device, dtype=options.dtype)
        return cls(options, selected, judge, GenerationCache.default(options.cache))

    def evaluate(
        self, target: EvalModel, reference: KLReference | None = None, answers: Answers | None = None
    ) -> dict[str, Any]:
        """The results dict of `target` (schema in docs/evaluation.md); `answers` if an engine made them already."""
        if answers is None:
            answers = self.answers(target)
        return self.results(target.info(), answers, self.measure_model(target, reference))

    def answers(self, target: EvalModel | EngineTarget) -> Answers:
        """The refusal benchmark's answers: from the loaded model, or by vLLM from an `EngineTarget`'s folder."""
        start = time.perf_counter()
        hits, misses = self.cache.hits, self.cache.misses
        if isinstance(target, EngineTarget):
            texts = engine_answers(target, self.selected, self.options, self.cache)
        else:
            texts = hf_answers(target, self.selected, self.options, self.cache)
        return Answers(texts, time.perf_counter() - start, self.cache.hits - hits, self.cache.misses - misses)

    def measure_model(self, target: EvalModel, reference: KLReference | None = None) -> ModelMeasures:
        """KL against `reference` (if given) and the lm-eval tasks (if any), with their timings."""
        timings: dict[str, float] = {}
        kl = None
        if reference is not None:
            mark = time.perf_counter()
            kl = kl_block(target, reference, self.options.batch_size)
            timings["kl_s"] = round(time.perf_counter() - mark, 2)
        capability = None
        if self.options.tasks:
            mark = time.perf_counter()
            capability = run_tasks(
                target.model, target.tokenizer, self.options.tasks, limit=self.options.limit,
                batch_size=self.options.batch_size,
            )
            timings["lm_eval_s"] = round(time.perf_counter() - mark, 2)
        return ModelMeasures(kl, capability, timings)

    def results(self, info: dict[str, Any], answers: Answers, measures: ModelMeasures | None = None) -> dict[str, Any]:
        """The results dict: the answers judged, with the model's other measures (none: no KL, no lm-eval)."""
        measures = measures or ModelMeasures()
        mark = time.perf_counter()
        languages = judge_answers(self.judge, self.selected, answers.texts)
        refusal_s = answers.seconds + time.perf_counter() - mark
        timings = {"refusal_s": round(refusal_s, 2), **measures.timings}
        timings["total_s"] = round(refusal_s + sum(measures.timings.values()), 2)
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "abliterate", "version": __version__},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": info,
            "settings": {"langs": list(self.selected), **self.options.describe()},
            "summary": summarize(languages),
            "languages": languages,
            "kl": measures.kl,
            "lm_eval": measures.capability,
            "timings": timings,
            "cache": {"enabled": self.cache.folder is not None, "hits": answers.hits, "misses": answers.misses},
        }


def collect_garbage() -> None:
    """Collect freed models (the caller has dropped its references), so that the next model fits."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_eval(settings: Settings, base: str | None = None, **overrides: Any) -> ResultsRecord:
    """`abliterate eval`: the results record of MODEL (KL against `base` when given), written to settings.out."""
    if settings.out is None:
        raise UsageError("no results file given", hint="pass --out results.json")
    check_quantize(settings.quantize)
    evaluator = Evaluator.prepare(EvalOptions.from_settings(settings, **overrides))  # checks --engine too
    source = resolve_model(settings.model, settings)
    base_source = resolve_model(base, settings) if base is not None else None
    reference = None
    if base_source is not None:
        loaded = load_for_eval(base_source, settings)
        reference = kl_reference(loaded, evaluator.selected, evaluator.options, evaluator.cache)
        del loaded
        collect_garbage()
    answers = None
    if evaluator.options.engine == "vllm":  # before the model is loaded here: vLLM needs the GPU to itself
        on_disk = engine_target(source, settings)
        answers = evaluator.answers(on_disk)
        if reference is None and not evaluator.options.tasks:  # nothing else needs the model in memory
            return write_results(Path(settings.out), evaluator.results(on_disk.info(), answers))
    return write_results(Path(settings.out), evaluator.evaluate(load_for_eval(source, settings), reference, answers))


# --- inside `edit` ---------------------------------------------------------------------------------------


@dataclass
class EditEvaluation:
    """Before/after evaluation inside `edit`: prepared first, base measured, edited checkpoint measured."""

    evaluator: Evaluator
    settings: Settings
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    reference: KLReference | None = None
    base: EngineTarget | None = None  # --engine vllm: the base, answered once the forward-pass model is freed
    base_measures: ModelMeasures | None = None

    @classmethod
    def prepare(cls, settings: Settings) -> EditEvaluation:
        return cls(Evaluator.prepare(EvalOptions.from_settings(settings)), settings)

    def measure_base(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: ModelSource) -> None:
        """Evaluate the base model (already loaded) and keep its KL reference."""
        base = EvalModel(model, tokenizer, source.spec, Path(source.folder), model_identity(source.folder))
        log.info("evaluating the base model")
        self.reference = kl_reference(base, self.evaluator.selected, self.evaluator.options, self.evaluator.cache)
        if self.evaluator.options.engine == "hf":
            self.before = self.evaluator.evaluate(base)
            return
        # vLLM needs the GPU that this model holds: its answers wait for measure_edited (the caller drops it first)
        self.base_measures = self.evaluator.measure_model(base)
        self.base = engine_target(source, self.settings, tokenizer=tokenizer)

    def measure_edited(self, folder: Path, spec: str) -> ReportRecord:
        """Load the written checkpoint in `folder`, evaluate it against the base, write the report beside it."""
        log.info("evaluating the edited model")
        final = Path(spec).expanduser().resolve()  # where it will be after the rename
        answers = None
        if self.base is not None:  # --engine vllm: both models' answers now, before a model is loaded again
            self.before = self.evaluator.results(self.base.info(), self.evaluator.answers(self.base),
                                                 self.base_measures)
            self.base = None
            written = engine_target(ModelSource(spec, Path(folder)), self.settings, spec=spec, folder=final)
            answers = self.evaluator.answers(written)
        edited = load_for_eval(ModelSource(spec, Path(folder)), self.settings, spec=spec)
        edited.folder = final
        self.after = self.evaluator.evaluate(edited, self.reference, answers)
        del edited
        self.reference = None
        collect_garbage()
        assert self.before is not None
        return write_report(Path(folder) / "abliterate", self.before, self.after)
