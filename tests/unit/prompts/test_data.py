"""Data checks of the built-in prompt sets `abliterate/data/prompts/{lang}.jsonl`, all 14 languages.

Shape (counts per kind and split, schema, no empty or duplicate lines), alignment with `en.jsonl` (same ids,
kinds, splits and categories in the same order), and language identification with lingua: every file must
be detected as its own language at least at the per-language threshold below.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import needs
import pytest

import abliterate
from abliterate.prompts import sources
from abliterate.prompts.languages import LANGUAGES
from abliterate.prompts.records import KINDS, Prompt

PROMPTS_DIR = Path(abliterate.__file__).parent / "data" / "prompts"
KEYS = ["id", "kind", "split", "category", "instruction"]
PER_KIND = {"train": 128, "val": 32, "test": 100}
HARMFUL_CATEGORIES = ("cybercrime", "weapons", "drugs", "fraud", "violence", "harassment", "misinformation",
                      "privacy", "self_harm", "hate", "theft")

# Minimum share of a file's 520 lines that lingua (all 75 of its languages, preloaded models) detects as the
# file's language: 0.99 allows at most 5 lines. Measured (tests/benchmarks/langid_report.py, table in
# docs/data.md): 12 languages at 1.000; en 0.998 (one short line taken for German), es 0.998 (one for
# Catalan), nl 0.996 (two for Afrikaans), the close relatives that detecting among all languages brings in.
# Yoruba needed no lower bar: the lines carry full tone marks and subdots, and lingua still finds 519 of 520
# after they are stripped; machine translations without them score far lower (0.89 on PolyRefuse's Yoruba
# JailbreakBench file), which is what this check is there to catch.
LANGID_THRESHOLD: dict[str, float] = dict.fromkeys(LANGUAGES, 0.99)


@cache
def _lines(lang: str) -> tuple[str, ...]:
    path = PROMPTS_DIR / f"{lang}.jsonl"
    if not path.is_file():
        pytest.fail(f"{path.name} is missing: the built-in sets must cover all 14 languages")
    return tuple(path.read_text(encoding="utf-8").split("\n"))


@cache
def _rows(lang: str) -> tuple[dict[str, Any], ...]:
    lines = _lines(lang)
    assert lines[-1] == "", f"{lang}.jsonl must end with a newline"
    return tuple(json.loads(line) for line in lines[:-1])


def test_exactly_the_14_languages() -> None:
    assert sorted(p.stem for p in PROMPTS_DIR.glob("*.jsonl")) == sorted(LANGUAGES)


def test_builtin_loads_every_language() -> None:
    sources.builtin.cache_clear()  # files may have been added since another test loaded the set
    assert sources.builtin().languages() == sorted(LANGUAGES)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_schema_and_no_empty_or_duplicate_lines(lang: str) -> None:
    lines = _lines(lang)[:-1]
    assert all(line.strip() for line in lines), f"{lang}.jsonl has empty lines"
    rows = _rows(lang)
    for row in rows:
        assert list(row) == KEYS, f"{lang} {row.get('id')}: keys {list(row)}"
        text = row["instruction"]
        assert isinstance(text, str) and text.strip() == text and text, f"{lang} {row['id']}: {text!r}"
        assert "\n" not in text and "\r" not in text, f"{lang} {row['id']}: not a single line"
    duplicates = [t for t, n in Counter(r["instruction"] for r in rows).items() if n > 1]
    assert not duplicates, f"{lang}: duplicate instructions {duplicates[:3]}"
    assert len({r["id"] for r in rows}) == len(rows), f"{lang}: duplicate ids"


@pytest.mark.parametrize("lang", LANGUAGES)
def test_counts_per_kind_and_split(lang: str) -> None:
    counts = Counter((r["kind"], r["split"]) for r in _rows(lang))
    assert counts == {(kind, split): n for kind in KINDS for split, n in PER_KIND.items()}


def test_english_ids_splits_and_categories() -> None:
    for row in _rows("en"):
        match = re.fullmatch(r"(harmful|harmless)-(\d{3})", row["id"])
        assert match and match[1] == row["kind"], row["id"]
        number = int(match[2])
        assert row["split"] == ("train" if number <= 128 else "val" if number <= 160 else "test"), row["id"]
        if row["kind"] == "harmful":
            assert row["category"] == HARMFUL_CATEGORIES[(number - 1) % len(HARMFUL_CATEGORIES)], row["id"]
        else:
            assert re.fullmatch(r"[a-z_]+", row["category"]), row["id"]


@pytest.mark.parametrize("lang", [lang for lang in LANGUAGES if lang != "en"])
def test_aligned_with_english(lang: str) -> None:
    def labels(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
        return [(r["id"], r["kind"], r["split"], r["category"]) for r in rows]

    assert labels(_rows(lang)) == labels(_rows("en"))
    untranslated = [r["id"] for r, e in zip(_rows(lang), _rows("en"), strict=True)
                    if r["instruction"] == e["instruction"]]
    assert not untranslated, f"{lang}: lines identical to English: {untranslated[:5]}"


@pytest.fixture(scope="module")
def langid() -> Callable[[str], Any]:
    """Agreement of one language's lines with lingua; the detector is built once per test module."""
    needs.module("lingua")
    from benchmarks.langid_report import agreement, build_detector

    detector = build_detector()

    def check(lang: str) -> Any:
        lines = [Prompt(r["id"], r["kind"], r["split"], lang, r["instruction"]) for r in _rows(lang)]
        return agreement(detector, lines, lang)

    return check


@pytest.mark.parametrize("lang", LANGUAGES)
def test_lines_are_detected_as_their_language(lang: str, langid: Callable[[str], Any]) -> None:
    result = langid(lang)
    misses = "; ".join(f"{i} -> {code}: {text}" for i, code, text in result.misses[:8])
    assert result.rate >= LANGID_THRESHOLD[lang], (
        f"{lang}: lingua agrees on {result.agree}/{result.total} lines ({result.rate:.4f} < "
        f"{LANGID_THRESHOLD[lang]}); {misses}")
    if lang != "en":  # an untranslated line would be detected as English
        assert result.detected_as["en"] == 0, f"{lang}: lines detected as English: {misses}"
