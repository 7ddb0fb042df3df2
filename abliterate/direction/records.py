"""candidates.json: the chosen direction and every candidate's scores, as `directions` and `edit` write them.

`DirectionResult.report()` (direction/search.py) builds the record; the evaluation report reads the chosen
site and language back from it (`read_candidates`). Fields and their order are those of the files written
since the first version; docs/records.md has the JSON Schema.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from abliterate.errors import DataError
from abliterate.storage.records import Part, Record, load_json, validate_record

CANDIDATES_FILE = "candidates.json"


class CandidateRow(Part):
    """One candidate (position, layer): screening scores for all, full scores for finalists (null: not scored).

    `chosen` of a saved direction without a search holds only `pos` and `layer`.
    """

    pos: int
    layer: int
    screen_refusal: float | None = None
    screen_kl: float | None = None
    refusal: float | None = None
    induce: float | None = None
    kl: float | None = None
    kept: bool = False


class CandidatesRecord(Record):
    """candidates.json: what the search chose, from what, at what cost in forward passes, and every candidate."""

    tool_version: str
    """The abliterate version that wrote the file."""
    source_model: str
    """The model the direction was computed on, as given."""
    lang: str
    """The language of the prompts."""
    method: str
    """The edit method (projected, norm-preserving, ...)."""
    chosen: CandidateRow
    """The chosen candidate's scores (only `pos` and `layer` when they were fixed by the user)."""
    post_instruction_tokens: int
    """How many post-instruction positions were candidates (positions -n ... -1)."""
    sink_layers: list[int] = Field(default_factory=list)
    """Layers with a massive first-token activation, projected out of the candidates."""
    prompts_after_filter: dict[str, int] = Field(default_factory=dict)
    """Instructions used per split after the refusal-score filter."""
    batch_size: int | None = None
    """The batch size of the search (`--batch-size auto` resolved)."""
    forward_passes: dict[str, int] = Field(default_factory=dict)
    """Model calls per stage (filter, activations, screening, finalists) and their total."""
    forward_rows: dict[str, int] = Field(default_factory=dict)
    """Prompts those calls carried, per stage and in total."""
    candidates: list[CandidateRow] = Field(default_factory=list)
    """Every candidate (position, layer): screening scores for all, full scores for the finalists."""


def read_candidates(path: Path) -> CandidatesRecord:
    """The candidates.json at `path`; DataError (one line, with a hint) when missing, damaged or of another shape."""
    hint = "write it again with `abliterate directions` or `abliterate edit`"
    data = load_json(path, error=DataError, missing_hint=hint, damaged_hint=hint)
    return validate_record(CandidatesRecord, data, path, error=DataError, what="candidates file", hint=hint)
