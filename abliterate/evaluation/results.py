"""results.json, the record of one model's evaluation: its blocks, per-language rates, summary and schema.

`abliterate eval` writes it (evaluation/evaluate.py), `report` and `edit` read it back (schema 1 files are
upgraded on reading, then validated as a `ResultsRecord`); docs/evaluation.md describes the fields and
docs/records.md has the JSON Schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from abliterate.errors import DataError
from abliterate.prompts.records import KINDS
from abliterate.storage.records import Part, Record, load_json, validate_record

SCHEMA_VERSION = 2
"""2: per-answer refused/evasive/harmful/why and per-block evasions and harmful answers (1: a refusal bool)."""
READABLE_SCHEMAS = (1, 2)


def _share(count: int | None, n: int) -> float | None:
    return count / n if n and count is not None else None


def block_counts(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """n, refusals, evasions, harmful answers (None when no record was judged for harm) and their rates."""
    n = len(records)
    refusals = sum(bool(r["refused"]) for r in records)
    evasions = sum(bool(r["evasive"]) for r in records)
    judged = [r["harmful"] for r in records if r.get("harmful") is not None]
    harmful = sum(bool(h) for h in judged) if judged else None
    return {
        "n": n, "refusals": refusals, "refusal_rate": _share(refusals, n), "evasions": evasions,
        "evasion_rate": _share(evasions, n), "harmful_answers": harmful, "harmful_rate": _share(harmful, n),
    }


def language_entry(harmful: dict[str, Any], harmless: dict[str, Any]) -> dict[str, Any]:
    """One language's results: the headline rates, then the two blocks."""
    n = harmful["n"]
    answered = n - harmful["refusals"] - harmful["evasions"]
    return {
        "compliance": answered / n if n else None,
        "over_refusal": harmless["refusal_rate"],
        "evasion": harmful["evasion_rate"],
        "harmless_evasion": harmless["evasion_rate"],
        "attack_success": harmful["harmful_rate"],
        "harmful": harmful,
        "harmless": harmless,
    }


RATES = ("compliance", "over_refusal", "evasion", "harmless_evasion", "attack_success")
"""The per-language rates that the summary averages (attack_success only with a harm-judging model)."""


def _mean_of(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def summarize(languages: dict[str, Any]) -> dict[str, Any]:
    """Means over languages (each language weighs the same); a rate no language has is None."""
    return {
        "languages": len(languages),
        **{rate: _mean_of([v.get(rate) for v in languages.values()]) for rate in RATES},
        "harmful_prompts": sum(v["harmful"]["n"] for v in languages.values()),
        "harmless_prompts": sum(v["harmless"]["n"] for v in languages.values()),
    }


def upgrade_results(data: dict[str, Any]) -> dict[str, Any]:
    """A schema 1 results dict in schema 2 form (records: refusal -> refused, not evasive, harm unknown)."""
    if data.get("schema_version") != 1:
        return data
    languages = {}
    for lang, entry in data["languages"].items():
        blocks = {}
        for kind in KINDS:
            records = [
                {**{k: v for k, v in r.items() if k != "refusal"}, "refused": bool(r.get("refusal")),
                 "evasive": False, "harmful": None, "why": None}
                for r in entry[kind]["records"]
            ]
            blocks[kind] = {**block_counts(records), "records": records}
        languages[lang] = language_entry(blocks["harmful"], blocks["harmless"])
    return {**data, "schema_version": SCHEMA_VERSION, "languages": languages, "summary": {
        **data.get("summary", {}), **summarize(languages)}}


# --- the record ------------------------------------------------------------------------------------------


class ModelInfo(Part):
    """The model evaluated: as given, the folder it was read from, and its identity (a hash of its files)."""

    spec: str
    folder: str | None = None
    identity: str | None = None


class AnswerRecord(Part):
    """One prompt, the greedy answer and the judge's verdict."""

    id: str
    prompt: str
    response: str
    refused: bool
    evasive: bool
    harmful: bool | None = None
    why: str | None = None
    categories: list[str] | None = None


class Block(Part):
    """One language and kind (harmful or harmless): counts, rates (null: nothing to count) and every answer."""

    n: int
    refusals: int
    refusal_rate: float | None = None
    evasions: int = 0
    evasion_rate: float | None = None
    harmful_answers: int | None = None
    harmful_rate: float | None = None
    records: list[AnswerRecord] = Field(default_factory=list)


class LanguageResult(Part):
    """One language: the headline rates, then its harmful and harmless blocks."""

    compliance: float | None = None
    over_refusal: float | None = None
    evasion: float | None = None
    harmless_evasion: float | None = None
    attack_success: float | None = None
    harmful: Block
    harmless: Block


class Summary(Part):
    """Means of the rates over languages (each language weighs the same) and the prompt counts."""

    languages: int | None = None
    compliance: float | None = None
    over_refusal: float | None = None
    evasion: float | None = None
    harmless_evasion: float | None = None
    attack_success: float | None = None
    harmful_prompts: int | None = None
    harmless_prompts: int | None = None


class EvalSettings(Part):
    """How the evaluation ran (EvalOptions.describe, with the languages evaluated)."""

    langs: list[str] | None = None
    judge: str | None = None
    harm_judge: str | None = None
    prompts: str | None = None
    split: str | None = None
    n_prompts: int | None = None
    max_new_tokens: int | None = None
    decoding: str | None = None
    batch_size: int | None = None
    tasks: list[str] | None = None
    limit: int | None = None
    kl_tokens: int | None = None
    kl_prompts: int | None = None
    dtype: str | None = None
    device: str | None = None
    engine: str | None = None
    quantize: str | None = None


class KLLanguage(Part):
    n: int
    first_token: float | None = None
    first_n_tokens: float | None = None


class KLPrompt(Part):
    id: str
    lang: str
    tokens: int
    first_token: float
    first_n_tokens: float


class KLSummary(Part):
    """First-token and mean first-N-token KL(base || model): overall, per answer position and per language."""

    base: ModelInfo
    tokens: int
    n_prompts: int
    first_token: float | None = None
    first_n_tokens: float | None = None
    per_position: list[float | None] = Field(default_factory=list)
    languages: dict[str, KLLanguage] = Field(default_factory=dict)


class KLBlock(KLSummary):
    """The KL summary and every prompt's KL."""

    records: list[KLPrompt] = Field(default_factory=list)


class ToolInfo(Part):
    name: str
    version: str


class CacheInfo(Part):
    enabled: bool
    hits: int
    misses: int


class ResultsRecord(Record):
    """results.json (schema_version 2): one model's evaluation, every prompt's answer and verdict included."""

    schema_version: int
    """2 (files of schema 1 are upgraded when read)."""
    tool: ToolInfo | None = None
    """The tool and version that wrote the file."""
    created: str | None = None
    """When, in UTC (ISO 8601)."""
    model: ModelInfo
    """The model evaluated."""
    settings: EvalSettings = Field(default_factory=EvalSettings)
    """How it was evaluated."""
    summary: Summary
    """Means over languages."""
    languages: dict[str, LanguageResult]
    """Per language: the rates, and every harmful and harmless prompt's answer and verdict."""
    kl: KLBlock | None = None
    """KL(base || model) on harmless prompts (null without `--base`)."""
    lm_eval: dict[str, Any] | None = None
    """lm-eval's results, configs, versions and n-shot of the capability tasks (null without tasks)."""
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds per part (refusal_s, kl_s, lm_eval_s, total_s)."""
    cache: CacheInfo | None = None
    """The answer cache: whether it was on, its hits and misses."""


_WRITE_HINT = "write it with `abliterate eval --out results.json`"


def write_results(path: Path, results: ResultsRecord | dict[str, Any]) -> ResultsRecord:
    """Write results.json (atomically); a dict is validated as a `ResultsRecord` first. Returns the record."""
    record = results if isinstance(results, ResultsRecord) else ResultsRecord.model_validate(results)
    record.write(Path(path))
    return record


def _not_results(path: Path) -> DataError:
    return DataError(f"{path} is not an abliterate results file of schema_version {SCHEMA_VERSION}", hint=_WRITE_HINT)


def read_results(path: Path) -> ResultsRecord:
    """A results.json written by `abliterate eval` (schema_version 2, or 1 upgraded); DataError otherwise."""
    data = load_json(path, error=DataError, missing_hint="write one with `abliterate eval --out`",
                     damaged_hint="point at a results.json")
    if (
        not isinstance(data, dict)
        or data.get("schema_version") not in READABLE_SCHEMAS
        or not isinstance(data.get("languages"), dict)
        or not {"model", "summary"} <= set(data)
    ):
        raise _not_results(path)
    try:
        data = upgrade_results(data)
    except (KeyError, TypeError, AttributeError):
        raise _not_results(path) from None
    return validate_record(ResultsRecord, data, path, error=DataError,
                           what=f"abliterate results file of schema_version {SCHEMA_VERSION}", hint=_WRITE_HINT)
