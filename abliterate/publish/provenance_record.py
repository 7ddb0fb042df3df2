"""The provenance record (`abliterate/provenance.json`, schema 1) as a pydantic model.

publish/provenance.py builds and writes it, `verify`, the model card and `push` read it back (`read_provenance`
validates it). The run's part (`prompts`, `selection`, `settings`, `seed`) is direction/run_record.py's
`RunRecord`, spread at the top level. `gguf_file`/`gguf_sha256` of the source, the direction's `weights` and
`format` are absent (not null) when they do not apply. docs/publish.md describes the fields; docs/records.md
has the JSON Schema.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from abliterate.direction.run_record import PromptsRecord
from abliterate.evaluation.results import ToolInfo
from abliterate.storage.records import Part, Record

SCHEMA_VERSION = 1


class FileHash(Part):
    """A file's hash and size; `from` says where the hash came from when the file was not read.

    Source files have a sha256; output files the hash `--output-hash` chose (sha256, or xxh3_128 since that
    option: records written before it have sha256 only). `verify` checks every hash a file has.
    """

    sha256: str | None = None
    xxh3_128: str | None = None
    bytes: int
    from_: str | None = Field(default=None, alias="from")

    @model_validator(mode="after")
    def _has_a_hash(self) -> FileHash:
        if self.sha256 is None and self.xxh3_128 is None:
            raise ValueError("a file entry needs sha256 or xxh3_128")
        return self

    @property
    def hashes(self) -> dict[str, str]:
        """{algorithm: hex digest} of the hashes this entry has."""
        return {name: value for name, value in (("sha256", self.sha256), ("xxh3_128", self.xxh3_128)) if value}


class SourceRecord(Part):
    """The source model: as given, how it was found, the revision asked for and used, its files' hashes."""

    model: str
    kind: str = Field(description="hub, local or gguf")
    requested_revision: str | None = None
    revision: str | None = None
    files: dict[str, FileHash] = Field(default_factory=dict)
    gguf_file: str | None = None
    gguf_sha256: str | None = None


class DirectionRecord(Part):
    """The direction written beside the weights, where it was taken and from what."""

    file: str
    layer: int
    pos: int
    lang: str
    method: str
    source_model: str
    hidden_size: int
    weights: dict[str, Any] | None = Field(default=None, description="per-layer ablation weights, if partial")


class EditedTensor(Part):
    name: str
    component: str
    layer: int


class EditRecord(Part):
    """What the edit did: the family's conventions, the components and every tensor edited."""

    architecture: str
    tied_embeddings: bool
    post_norms: bool
    norm_offset: int | float = 0.0
    norm_preserving: bool = False
    components: dict[str, int] = Field(default_factory=dict)
    tensors: list[EditedTensor] = Field(default_factory=list)
    dequantized_modules: list[str] = Field(default_factory=list)


class OutputRecord(Part):
    files: dict[str, FileHash] = Field(default_factory=dict)


class ProvenanceRecord(Record):
    """provenance.json."""

    schema_: int = Field(alias="schema")
    """1."""
    tool: ToolInfo
    """The tool and version that wrote the checkpoint."""
    libraries: dict[str, str] = Field(default_factory=dict)
    """Versions of python, torch, transformers, safetensors, huggingface_hub."""
    created: str
    """When, in UTC (ISO 8601)."""
    command: list[str] = Field(default_factory=list)
    """The command line, secrets and token-like values redacted."""
    source: SourceRecord
    """The source model and the sha256 of its weight files and config."""
    direction: DirectionRecord
    """The direction applied (its file is beside the record)."""
    prompts: PromptsRecord | None = None
    """The prompts that defined the direction (null for `apply`)."""
    selection: dict[str, Any] | None = None
    """How the direction was selected: the chosen candidate's scores, the KL threshold, ... (null for `apply`)."""
    settings: dict[str, Any] | None = None
    """Every setting of the run (null for `apply`)."""
    seed: int | None = None
    """The random seed, if one was used (optimize)."""
    edit: EditRecord
    """What the edit did, and every edited tensor."""
    output: OutputRecord = Field(default_factory=OutputRecord)
    """The hash (xxh3_128 or sha256, by `--output-hash`) and size of every output file (but this record and the
    model card)."""
    base_card: dict[str, Any] = Field(default_factory=dict)
    """Metadata inherited from the base model's card."""
    format: dict[str, Any] | None = None
    """The GGUF or adapter output (kind, file, summary, ...); absent for a safetensors checkpoint."""

    @property
    def format_kind(self) -> str | None:
        """gguf or adapter; None for a safetensors checkpoint."""
        kind = (self.format or {}).get("kind")
        return None if kind is None else str(kind)
