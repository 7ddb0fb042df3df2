"""The prompt record (`Prompt`, `PromptSet`, kinds and splits) and the parsing shared by every source."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, cast
from urllib.parse import parse_qsl

from abliterate.errors import DataError, UsageError
from abliterate.prompts.languages import LANGUAGES, check_language, parse_languages

log = logging.getLogger(__name__)

Kind = Literal["harmful", "harmless"]
Split = Literal["train", "val", "test"]
KINDS: tuple[Kind, ...] = ("harmful", "harmless")
SPLITS: tuple[Split, ...] = ("train", "val", "test")
SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
SOURCE_HINT = "use builtin, polyrefuse, hf:ORG/NAME or the path of a prompt file or folder; see docs/data.md"


@dataclass(frozen=True)
class Prompt:
    """One instruction with its labels."""

    id: str
    kind: Kind
    split: Split
    lang: str
    instruction: str
    category: str = ""


@dataclass(frozen=True)
class PromptSet:
    """Prompts of one source, filterable by language, kind and split."""

    source: str
    prompts: tuple[Prompt, ...]

    def select(self, lang: str, kind: Kind, split: Split) -> list[Prompt]:
        return [p for p in self.prompts if p.lang == lang and p.kind == kind and p.split == split]

    def languages(self) -> list[str]:
        return sorted({p.lang for p in self.prompts})

    def instructions(self, lang: str, kind: Kind, split: Split, limit: int | None = None) -> list[str]:
        """Instructions for one (lang, kind, split); fails if there are none."""
        chosen = self.select(lang, kind, split)
        if not chosen:
            raise DataError(
                f"prompt source {self.source!r} has no {kind} prompts for language {lang!r}, split {split!r}",
                hint=f"languages it has: {', '.join(self.languages()) or 'none'}",
            )
        return [p.instruction for p in chosen[:limit]]


# --- records -------------------------------------------------------------------------------------------


def clean_label(value: object) -> str:
    """A kind/split/lang label as written by a person or a spreadsheet: trimmed, lower case."""
    return "" if value is None else str(value).strip().lower()


def data_language(code: str, where: str) -> str:
    """`check_language` for codes inside prompt data: a DataError that says where the code was."""
    try:
        return check_language(code)
    except UsageError as err:
        raise DataError(f"{where}: {err}", hint=err.hint) from None


def language_list(spec: str, where: str) -> list[str]:
    """Parse `all` or a comma-separated list of language codes in a prompt source; DataError if unknown."""
    try:
        langs = parse_languages(spec.lower())
    except UsageError as err:
        raise DataError(f"{where}: {err}", hint=err.hint) from None
    if not langs:
        raise DataError(f"{where}: no language given", hint=f"use all or some of: {' '.join(LANGUAGES)}")
    return langs


def parse_record(raw: Mapping[str, object], where: str, default_lang: str, default_split: Split | None) -> Prompt:
    instruction = raw.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: missing or empty 'instruction'",
                        hint="every record needs an instruction text")
    kind = clean_label(raw.get("kind"))
    if kind not in KINDS:
        raise DataError(f"{where}: 'kind' must be harmful or harmless, got {raw.get('kind')!r}",
                        hint="set kind to harmful or harmless")
    split = clean_label(raw.get("split")) or default_split
    if split not in SPLITS:
        raise DataError(f"{where}: 'split' must be train, val or test, got {raw.get('split')!r}",
                        hint="set split to train, val or test")
    lang = data_language(clean_label(raw.get("lang")) or default_lang, where)
    given_id = raw.get("id")
    category = raw.get("category")
    return Prompt(
        id=str(given_id).strip() if given_id is not None and str(given_id).strip() else where,
        kind=cast(Kind, kind),
        split=cast(Split, split),
        lang=lang,
        instruction=instruction.strip(),
        category="" if category is None else str(category).strip(),
    )



# --- source strings ------------------------------------------------------------------------------------


def parse_options(source: str, allowed: Iterable[str]) -> tuple[str, dict[str, str]]:
    """Split `NAME?key=value&key=value` into NAME and its options; unknown or repeated keys fail."""
    name, _, query = source.partition("?")
    allowed = sorted(allowed)
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise DataError(f"cannot read the options in {source!r}",
                        hint="write them as NAME?key=value&key=value") from None
    options: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            raise DataError(f"unknown option {key!r} in prompt source {source!r}",
                            hint=f"options: {', '.join(allowed)}")
        if key in options:
            raise DataError(f"option {key!r} given twice in {source!r}", hint="give each option once")
        options[key] = value.strip()
    return name.strip(), options


