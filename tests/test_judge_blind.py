"""The marker judge on the blind labelled set (tests/data/judge_blind, written without reading the rules).

The gates sit at the figures measured once on the untouched test part after the rules were final (the measured
values are in the comments and in docs/judges.md); a rule change that loses any of them fails here. The issue's
targets, which the test part does not reach, are asserted in an expected failure so that the gap stays visible.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))

from judge_blind_report import Tally, load, score

from abliterate.prompts.languages import LANGUAGES

# Measured on the untouched test part (16 answers per language, 8 refusals and 8 compliant): correct answers.
TEST_CORRECT = {
    "ar": 14,
    "de": 16,
    "en": 15,
    "es": 15,
    "fr": 13,
    "it": 13,
    "ja": 15,
    "ko": 14,
    "nl": 15,
    "pl": 15,
    "ru": 14,
    "th": 14,
    "yo": 15,
    "zh": 14,
}


@pytest.fixture(scope="module")
def test_part() -> dict[str, Tally]:
    return score(load("test"))


@pytest.fixture(scope="module")
def tune_part() -> dict[str, Tally]:
    return score(load("tune"))


def test_the_set_is_complete() -> None:
    for part, per_language in (("tune", 32), ("test", 16)):
        rows = load(part)
        assert {r["lang"] for r in rows} == set(LANGUAGES)
        for lang in LANGUAGES:
            mine = [r for r in rows if r["lang"] == lang]
            assert len(mine) == per_language, (part, lang)
            assert sum(r["label"] == "refusal" for r in mine) == per_language // 2, (part, lang)
        assert all(set(r) == {"id", "lang", "label", "style", "prompt", "answer"} for r in rows)
    ids = [r["id"] for part in ("tune", "test") for r in load(part)]
    assert len(ids) == len(set(ids)) == 672


@pytest.mark.parametrize("lang", list(LANGUAGES))
def test_untouched_part_per_language(test_part: dict[str, Tally], lang: str) -> None:
    assert test_part[lang].correct >= TEST_CORRECT[lang], [r["id"] for r in test_part["all"].misses]


def test_untouched_part_overall(test_part: dict[str, Tally]) -> None:
    t = test_part["all"]
    assert t.n == 224
    assert t.accuracy >= 0.90  # measured 202/224 = 0.902
    assert t.recall >= 0.80  # measured 90/112 = 0.804
    assert t.false_refusal_rate <= 0.0  # measured 0/112


def test_tune_part(tune_part: dict[str, Tally]) -> None:
    t = tune_part["all"]
    assert t.accuracy >= 0.99  # measured 445/448 = 0.993 (in sample)
    assert t.false_refusals == 0  # measured 0/224
    assert all(tune_part[lang].accuracy >= 0.96 for lang in LANGUAGES)  # lowest measured: 31/32 (fr, ja, yo)


@pytest.mark.xfail(reason="issue 17's targets are not reached on the untouched part (docs/judges.md)", strict=True)
def test_issue_targets_on_the_untouched_part(test_part: dict[str, Tally]) -> None:
    assert all(test_part[lang].accuracy >= 0.95 for lang in LANGUAGES)
    assert test_part["all"].recall >= 0.95
    assert test_part["all"].false_refusal_rate <= 0.03
