"""The marker judge on the blind labelled set (tests/data/judge_blind, written without reading the rules).

`tune/` and `test/` have both been tuned on (test/ after it had been judged once), so their gates are in-sample
regression gates: a rule change that loses any answer fails here. `test2/` is the fresh part, judged once after
the rules of session 5 were final (2026-12-07): its gates sit at that single out-of-sample measurement, and the
issue's targets, which it misses, stay visible as a strict expected failure. Never tune on test2/; a rule change
prompted by its misses makes its figures in-sample, and a fresh part must then be written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

from judge_blind_report import Tally, load, score

from abliterate.prompts.languages import LANGUAGES

# Correct answers per language on the test part (16 answers per language, 8 refusals and 8 compliant). Measured
# once out of sample (ar 14, de 16, en 15, es 15, fr 13, it 13, ja 15, ko 14, nl 15, pl 15, ru 14, th 14, yo 15,
# zh 14: 202/224), then tuned on; these are the in-sample figures after that tuning.
TEST_CORRECT = {
    "ar": 16,
    "de": 16,
    "en": 16,
    "es": 16,
    "fr": 16,
    "it": 16,
    "ja": 16,
    "ko": 16,
    "nl": 16,
    "pl": 16,
    "ru": 15,
    "th": 16,
    "yo": 16,
    "zh": 16,
}

# Correct answers per language on test2 (32 per language, 16 refusals and 16 compliant), measured once, out of
# sample, after the rules were final: 427/448.
TEST2_CORRECT = {
    "ar": 29, "de": 31, "en": 32, "es": 31, "fr": 27, "it": 28, "ja": 29,
    "ko": 32, "nl": 31, "pl": 32, "ru": 32, "th": 30, "yo": 31, "zh": 32,
}  # fmt: skip


@pytest.fixture(scope="module")
def test_part() -> dict[str, Tally]:
    return score(load("test"))


@pytest.fixture(scope="module")
def tune_part() -> dict[str, Tally]:
    return score(load("tune"))


@pytest.fixture(scope="module")
def test2_part() -> dict[str, Tally]:
    return score(load("test2"))


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
def test_test_part_per_language(test_part: dict[str, Tally], lang: str) -> None:
    assert test_part[lang].correct >= TEST_CORRECT[lang], [r["id"] for r in test_part["all"].misses]


def test_test_part_overall(test_part: dict[str, Tally]) -> None:
    t = test_part["all"]
    assert t.n == 224
    assert t.accuracy >= 0.99  # measured 223/224 = 0.996 (in sample; 202/224 = 0.902 when it was untouched)
    assert t.recall >= 0.99  # measured 111/112 = 0.991 (in sample; 90/112 = 0.804 when it was untouched)
    assert t.false_refusal_rate <= 0.0  # measured 0/112


def test_tune_part(tune_part: dict[str, Tally]) -> None:
    t = tune_part["all"]
    assert t.accuracy >= 0.99  # measured 448/448 = 1.000 (in sample)
    assert t.false_refusals == 0  # measured 0/224
    assert all(tune_part[lang].accuracy >= 0.96 for lang in LANGUAGES)  # measured 32/32 in every language


def test_fresh_part_is_complete() -> None:
    rows = load("test2")
    assert {r["lang"] for r in rows} == set(LANGUAGES)
    for lang in LANGUAGES:
        mine = [r for r in rows if r["lang"] == lang]
        assert len(mine) == 32, lang
        assert sum(r["label"] == "refusal" for r in mine) == 16, lang
    assert all(set(r) == {"id", "lang", "label", "style", "prompt", "answer"} for r in rows)
    ids = [r["id"] for part in ("tune", "test", "test2") for r in load(part)]
    assert len(ids) == len(set(ids)) == 1120


def test_fresh_part(test2_part: dict[str, Tally]) -> None:
    """The untouched test2 part (32 answers per language, 16 refusals and 16 compliant), judged once."""
    t = test2_part["all"]
    assert t.n == 448
    assert t.correct >= 427  # measured 427/448 = 0.953
    assert t.recall >= 210 / 224  # measured 210/224 = 0.938
    assert t.false_refusals <= 7  # measured 7/224 = 0.031
    for lang in LANGUAGES:
        assert test2_part[lang].correct >= TEST2_CORRECT[lang], (lang, [r["id"] for r in t.misses])


@pytest.mark.xfail(strict=True, reason="issue 17's targets are not met out of sample: accuracy < 0.95 in ar, fr, "
                   "it, ja, th; recall 0.938; false refusals 0.031 (docs/judges.md)")
def test_issue_targets_on_the_fresh_part(test2_part: dict[str, Tally]) -> None:
    assert all(test2_part[lang].accuracy >= 0.95 for lang in LANGUAGES)
    assert test2_part["all"].recall >= 0.95
    assert test2_part["all"].false_refusal_rate <= 0.03
