"""crosslingual.json: per-language refusal directions at one site, their cosines, PCA and transfer matrix.

`abliterate crosslingual` (commands/crosslingual.py) writes it; the evaluation report reads its matrices back
(`read_crosslingual`), which is why the record lives here, below the command. `selection`,
`direction_file_cosine` and `transfer` are absent (not null) when the run had none. docs/crosslingual.md
describes the fields; docs/records.md has the JSON Schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from abliterate.direction.records import CandidateRow
from abliterate.errors import DataError
from abliterate.storage.records import Part, Record, load_json, validate_record

CROSSLINGUAL_FILE = "crosslingual.json"


class TrainCounts(Part):
    harmful_train: int
    harmless_train: int


class CosineMatrix(Part):
    """Cosine similarity of every pair of language directions (rows and columns in `languages` order)."""

    languages: list[str]
    matrix: list[list[float | None]]


class PerLayerCosine(Part):
    """Per source language and target language: cosine of the source direction with the target's difference
    in means at every layer."""

    pos: int
    layers: list[int]
    curves: dict[str, dict[str, list[float | None]]]


class LanguagePCA(Part):
    """One language's activations projected on their first two principal components, and every direction."""

    explained_variance_ratio: list[float]
    harmful: list[list[float]]
    harmless: list[list[float]]
    harmless_centroid: list[float]
    harmful_centroid: list[float]
    arrows: dict[str, list[float]]
    own: str


class TransferCellRecord(Part):
    """Compliance of one target language with one source direction ablated (source `base`: none)."""

    source: str
    target: str
    n: int
    refusals: int
    refusal_rate: float
    compliance: float


class TransferVerdict(Part):
    """Whether the transfer matrix shows one refusal shared by the languages, in one plain sentence.

    Only targets whose baseline refusal is at least `min_baseline` count; a cell removed its refusal when at
    most `max_left` is left. `own_*` are the diagonal cells (a language's own direction), `other_*` the
    off-diagonal ones (another language's direction): the cross-lingual transfer.
    """

    verdict: Literal["shared", "partly shared", "not shared", "not removed", "no refusal to remove"]
    summary: str
    min_baseline: float
    max_left: float
    baseline_refusal: float | None
    own_cells: int
    own_removed: int
    own_left: float | None
    other_cells: int
    other_removed: int
    other_left: float | None


class TransferMatrix(Part):
    """The transfer matrix as rows (direction ablated) x columns (target language) tables, and the cells."""

    rows: list[str]
    columns: list[str]
    compliance: list[list[float]]
    refusal_rate: list[list[float]]
    n: list[list[int]]
    cells: list[TransferCellRecord]
    judge: str
    n_prompts: int
    max_new_tokens: int
    generations: int
    seconds: float
    verdict: TransferVerdict | None = None
    """Shared, partly shared or not (absent in files written before it existed)."""


class CrosslingualRecord(Record):
    """crosslingual.json."""

    tool_version: str
    """The abliterate version that wrote the file."""
    model: str
    """The model, as given."""
    method: str
    """The edit method of the directions."""
    languages: list[str]
    """The languages compared, in order."""
    source_lang: str
    """The language whose search chose the site."""
    layer: int
    """The site's layer, the same for every language."""
    pos: int
    """The site's post-instruction position."""
    chosen_by: str
    """How the site was chosen (a search on source_lang, --layer/--pos, or --direction)."""
    prompts: dict[str, TrainCounts]
    """Train instructions per language and kind."""
    sink_layers: dict[str, list[int]]
    """Per language, the layers with a massive first-token activation."""
    cosine: CosineMatrix
    """Cosine similarity of the language directions."""
    per_layer_cosine: PerLayerCosine
    """Each direction against every language's difference in means, layer by layer."""
    pca: dict[str, LanguagePCA]
    """Per language, the activations on their first two principal components."""
    selection: CandidateRow | None = None
    """The chosen candidate's scores (absent when no search ran)."""
    direction_file_cosine: dict[str, float] | None = None
    """Cosine of --direction's vector with each language's direction (absent without --direction)."""
    transfer: TransferMatrix | None = None
    """The transfer matrix (absent with --no-transfer)."""
    seconds: dict[str, float] = Field(default_factory=dict)
    """Seconds per stage."""
    plots: list[str] = Field(default_factory=list)
    """The PNG files written beside it."""


def read_crosslingual(path: Path) -> CrosslingualRecord:
    """The crosslingual.json at `path`; DataError (one line, with a hint) when missing, damaged or of another shape."""
    hint = "write it again with `abliterate crosslingual`"
    data = load_json(path, error=DataError, missing_hint=hint, damaged_hint=hint)
    return validate_record(CrosslingualRecord, data, path, error=DataError, what="crosslingual file", hint=hint)
