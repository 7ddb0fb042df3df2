"""report.json (schema_version 2): the before/after comparison, then both results records in full.

evaluation/report.py builds and writes it (`edit --eval` and `abliterate report`); the CLI prints its summary
from the typed fields. docs/evaluation.md describes the fields; docs/records.md has the JSON Schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from abliterate.errors import DataError
from abliterate.evaluation.results import EvalSettings, KLSummary, ModelInfo, ResultsRecord
from abliterate.storage.records import Part, Record, load_json, validate_record

REPORT_JSON = "report.json"
SCHEMA_VERSION = 2
"""2: direction, side_by_side, crosslingual, evasion and attack success beside compliance (issue 17)."""


class DirectionInfo(Part):
    """The direction's language, method and site, from candidates.json (null when it was not found)."""

    lang: str | None = None
    method: str | None = None
    layer: int | None = None
    pos: int | None = None


class ReportSummary(Part):
    """The headline numbers: mean rates over languages before and after, and the KL of the edited model."""

    compliance_before: float | None = None
    compliance_after: float | None = None
    over_refusal_before: float | None = None
    over_refusal_after: float | None = None
    evasion_before: float | None = None
    evasion_after: float | None = None
    attack_success_before: float | None = None
    attack_success_after: float | None = None
    kl_first_token: float | None = None
    kl_first_n_tokens: float | None = None


class LanguageRow(Part):
    """One language before and after, and whether its refusals are bypassed (bypassed / partly / not / –)."""

    lang: str
    name: str
    n_harmful: int
    n_harmless: int
    compliance_before: float | None = None
    compliance_after: float | None = None
    over_refusal_before: float | None = None
    over_refusal_after: float | None = None
    evasion_before: float | None = None
    evasion_after: float | None = None
    attack_success_before: float | None = None
    attack_success_after: float | None = None
    bypass: str


class BriefAnswer(Part):
    """One side of a side-by-side pair: the answer and its verdict."""

    response: str | None = None
    refused: bool | None = None
    evasive: bool | None = None
    harmful: bool | None = None
    why: str | None = None


class SidePair(Part):
    """The same harmful prompt answered before and after."""

    id: str
    prompt: str
    before: BriefAnswer
    after: BriefAnswer


class TransferExcerpt(Part):
    rows: list[str] | None = None
    columns: list[str] | None = None
    compliance: list[list[float]] | None = None


class CrosslingualInfo(Part):
    """The matrices of a crosslingual.json found beside the report."""

    file: str
    source_lang: str | None = None
    layer: int | None = None
    pos: int | None = None
    cosine: dict[str, Any] | None = None
    transfer: TransferExcerpt | None = None


class CapabilityRow(Part):
    """One lm-eval (task, metric) before and after, with the change (null: measured on one side only)."""

    task: str
    metric: str
    before: float | None = None
    after: float | None = None
    before_stderr: float | None = None
    after_stderr: float | None = None
    delta: float | None = None


class ReportRecord(Record):
    """report.json."""

    schema_version: int
    """2: direction, side_by_side, crosslingual, evasion and attack success beside compliance."""
    before_model: ModelInfo
    """The base model."""
    after_model: ModelInfo
    """The edited model."""
    settings: EvalSettings | None = None
    """How both were evaluated (the after side's settings)."""
    direction: DirectionInfo | None = None
    """The direction, from candidates.json (null when none was found)."""
    summary: ReportSummary
    """The headline numbers."""
    languages: list[LanguageRow]
    """One row per language, before and after."""
    side_by_side: dict[str, list[SidePair]] = Field(default_factory=dict)
    """Per language, the same harmful prompts answered before and after."""
    crosslingual: CrosslingualInfo | None = None
    """The matrices of a crosslingual.json beside the report (null when none)."""
    capability: list[CapabilityRow] = Field(default_factory=list)
    """lm-eval metrics before and after."""
    kl: KLSummary | None = None
    """The edited model's KL against the base, without the per-prompt records."""
    before: ResultsRecord
    """The base model's results, in full."""
    after: ResultsRecord
    """The edited model's results, in full."""


def read_report(path: Path) -> ReportRecord:
    """The report.json at `path`; DataError (one line, with a hint) when missing, damaged or of another shape."""
    hint = "write it again with `abliterate report BEFORE AFTER --out DIR`"
    data = load_json(path, error=DataError, missing_hint=hint, damaged_hint=hint)
    return validate_record(ReportRecord, data, path, error=DataError, what="report file", hint=hint)
