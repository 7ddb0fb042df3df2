"""What a direction was made from, as provenance records it: the prompts, the selection and the settings.

`edit` and `optimize --pick` describe their run with a `RunRecord`; `apply` has none (a saved direction, no
prompts). The record is plain data, so that publish/provenance.py needs neither the search's classes nor the
settings model to write it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from abliterate.storage.hashing import text_sha256

HASHED = "the instructions used (after the refusal-score filter), canonical JSON by split"


class PromptsRecord(BaseModel):
    """The prompts behind a direction: their source and language, counts per split and a hash of their texts."""

    model_config = ConfigDict(extra="forbid")

    source: str
    lang: str
    counts: dict[str, int] | None = None
    sha256: str | None = None
    hashed: str = HASHED

    @classmethod
    def of(cls, source: str, lang: str, texts: dict[str, list[str]]) -> PromptsRecord:
        """The record of the instructions used, by split (counts and sha256 stay null when none are known)."""
        if not texts:
            return cls(source=source, lang=lang)
        return cls(source=source, lang=lang, counts={k: len(v) for k, v in texts.items()}, sha256=text_sha256(texts))


class RunRecord(BaseModel):
    """The run that made a direction: prompts, how it was selected, every setting, and the seed if one was used."""

    model_config = ConfigDict(extra="forbid")

    prompts: PromptsRecord | None = None
    selection: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None
    seed: int | None = None

    @property
    def requested_revision(self) -> str | None:
        """The source revision the user asked for (--revision), if the run had settings."""
        value = (self.settings or {}).get("revision")
        return None if value is None else str(value)
