"""Tests for the verdicts in results (refused / evasive / harmful per answer, evasion and attack success per
language) and the report's story: summary card, side-by-side answers, heatmap, cross-lingual matrix."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from abliterate.direction.records import CandidateRow, CandidatesRecord
from abliterate.evaluation.crosslingual_record import CrosslingualRecord
from abliterate.evaluation.evaluate import EvalOptions, judge_answers, select_prompts
from abliterate.evaluation.judge import HarmPairedJudge, MarkerJudge, ModelJudge, Verdict
from abliterate.evaluation.report import (
    HEAD_CHARS,
    REPORT_HTML,
    REPORT_JSON,
    REPORT_MD,
    SIDE_BY_SIDE,
    bypass,
    write_report,
)
from abliterate.evaluation.results import read_results, summarize, upgrade_results
from abliterate.prompts.records import KINDS

REFUSALS = {
    "en": "I'm sorry, but I can't help with that.",
    "de": "Es tut mir leid, aber dabei kann ich nicht helfen.",
    "fr": "Désolé, mais je ne peux pas vous aider avec cela.",
    "es": "Lo siento, pero no puedo ayudarte con eso.",
    "it": "Mi dispiace, ma non posso aiutarti con questo.",
    "nl": "Sorry, maar daar kan ik niet mee helpen.",
}
ANSWERS = {  # "#1" marks what the stand-in harm judge calls harmful
    "en": "Sure, here is how it works: #1 you gather the materials and then you follow the plan",
    "de": "Gerne, so funktioniert das: #1 Sie sammeln die Materialien und dann folgen Sie dem Plan",
    "fr": "Bien sûr, voici comment cela marche : #1 vous rassemblez le matériel et ensuite vous suivez le plan",
    "es": "Claro, así es como funciona: #1 reúnes los materiales y luego sigues el plan que tienes",
    "it": "Certo, ecco come funziona: #1 raccogli il materiale e poi segui il piano che hai preparato",
    "nl": "Natuurlijk, zo werkt het: #1 je verzamelt de materialen en daarna volg je het plan",
}
LANGS = list(REFUSALS)


class KeywordHarm:
    """A stand-in harm judge: an answer is harmful when it contains "#1" (what a classifier would flag)."""

    name = "model:keyword-harm"

    def judge(self, prompts: Sequence[str], responses: Sequence[str], langs: Sequence[str]) -> list[bool]:
        return [False] * len(responses)

    def verdicts(self, prompts: Sequence[str], responses: Sequence[str], langs: Sequence[str]) -> list[Verdict]:
        return [Verdict("compliance", "#1" in r) for r in responses]


def _answer(lang: str, prompt: str, i: int, edited: bool) -> str:
    """Before: every harmful prompt refused. After: answered (harmful), one evasion (empty), one refusal."""
    if not edited or i == 3:
        return REFUSALS[lang]
    if i == 2:
        return ""
    return f"{ANSWERS[lang]} {i}."


def _results(edited: bool, harm: bool, langs: list[str] = LANGS) -> dict[str, Any]:
    selected = select_prompts(EvalOptions(langs=",".join(langs), n_prompts=8))
    answers = {}
    for lang in selected:
        for kind in KINDS:
            chosen = selected[lang][kind]
            answers[lang, kind] = [
                _answer(lang, p.instruction, i, edited) if kind == "harmful" else ANSWERS[lang].replace("#1", "")
                for i, p in enumerate(chosen)
            ]
    judge: Any = HarmPairedJudge(MarkerJudge(), KeywordHarm()) if harm else MarkerJudge()  # type: ignore[arg-type]
    languages = judge_answers(judge, selected, answers)
    return {
        "schema_version": 2,
        "model": {"spec": "org/base" if not edited else "/tmp/edited"},
        "settings": {"judge": judge.name, "n_prompts": 8},
        "summary": summarize(languages),
        "languages": languages,
        "kl": None,
        "lm_eval": None,
    }


def test_records_carry_refused_evasive_harmful_and_rejudge_the_same() -> None:
    results = _results(edited=True, harm=True)
    marker = MarkerJudge()
    for lang, entry in results["languages"].items():
        block = entry["harmful"]
        for record in block["records"]:
            verdict = marker.verdict(record["response"], lang, record["prompt"])  # re-judged from the stored text
            assert (record["refused"], record["evasive"]) == (verdict.refused, verdict.evasive)
            assert record["harmful"] == ("#1" in record["response"])
        n = block["n"]
        assert (block["refusals"], block["evasions"], block["harmful_answers"]) == (1, 1, n - 2)
        assert entry["compliance"] == pytest.approx((n - 2) / n)  # the evasion is not compliance
        assert entry["evasion"] == pytest.approx(1 / n)
        assert entry["attack_success"] == pytest.approx((n - 2) / n)
    assert results["summary"]["attack_success"] == pytest.approx(6 / 8)


def test_without_a_harm_judge_harm_is_unknown() -> None:
    results = _results(edited=True, harm=False)
    entry = results["languages"]["en"]
    assert entry["attack_success"] is None and entry["harmful"]["harmful_answers"] is None
    assert all(r["harmful"] is None for r in entry["harmful"]["records"])
    assert results["summary"]["attack_success"] is None


def test_schema_1_results_are_upgraded(tmp_path: Path) -> None:
    record = {"id": "harmful-161", "prompt": "p", "response": "I can't help.", "refusal": True}
    other = {"id": "harmful-162", "prompt": "q", "response": "Sure.", "refusal": False}
    block = {"n": 2, "refusals": 1, "refusal_rate": 0.5, "records": [record, other]}
    old = {
        "schema_version": 1,
        "model": {"spec": "m"},
        "summary": {"compliance": 0.5},
        "languages": {"en": {"compliance": 0.5, "over_refusal": 0.5, "harmful": block, "harmless": block}},
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old), encoding="utf-8")
    record = read_results(path)
    new = record.to_data()
    assert record.schema_version == 2 and new == upgrade_results(old)
    assert record.languages["en"].harmful.records[0].refused is True
    first = new["languages"]["en"]["harmful"]["records"][0]
    assert first == {
        "id": "harmful-161",
        "prompt": "p",
        "response": "I can't help.",
        "refused": True,
        "evasive": False,
        "harmful": None,
        "why": None,
    }
    assert new["languages"]["en"]["compliance"] == 0.5 and new["summary"]["evasion"] == 0.0


@pytest.mark.parametrize(
    ("before", "after", "word"),
    [
        (0.1, 0.8, "bypassed"),
        (0.1, 0.79, "partly"),
        (0.1, 0.29, "not"),
        (0.0, 0.2, "partly"),
        (0.4, 0.5, "partly"),
        (0.0, 0.19, "not"),
        (None, None, "–"),
    ],
)
def test_bypass_words(before: float | None, after: float | None, word: str) -> None:
    assert bypass(before, after) == word


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("story") / "abliterate"
    folder.mkdir()
    CandidatesRecord(
        tool_version="0", source_model="m", lang="de", method="projected", chosen=CandidateRow(pos=-2, layer=7),
        post_instruction_tokens=2,
    ).write(folder / "candidates.json")
    compliance = [[0.03, 0.1], [0.97, 0.55], [0.4, 0.92]]
    CrosslingualRecord.model_validate({
        "tool_version": "0", "model": "m", "method": "projected", "languages": ["en", "de"], "source_lang": "en",
        "layer": 7, "pos": -2, "chosen_by": "selection on en", "prompts": {}, "sink_layers": {},
        "cosine": {"languages": ["en", "de"], "matrix": [[1.0, 0.61], [0.61, 1.0]]},
        "per_layer_cosine": {"pos": -2, "layers": [], "curves": {}}, "pca": {},
        "transfer": {
            "rows": ["none", "en", "de"], "columns": ["en", "de"], "compliance": compliance,
            "refusal_rate": [[round(1 - c, 2) for c in row] for row in compliance], "n": [[8, 8]] * 3, "cells": [],
            "judge": "markers", "n_prompts": 8, "max_new_tokens": 8, "generations": 48, "seconds": 1.0,
        },
    }).write(folder.parent / "crosslingual.json")
    write_report(folder, _results(edited=False, harm=True), _results(edited=True, harm=True))
    return folder


def test_report_json_tells_the_story(story: Path) -> None:
    report = json.loads((story / REPORT_JSON).read_text(encoding="utf-8"))
    assert report["direction"] == {"lang": "de", "method": "projected", "layer": 7, "pos": -2}
    assert [row["bypass"] for row in report["languages"]] == ["partly"] * len(LANGS)  # 6/8 answered after
    s = report["summary"]
    assert (s["compliance_before"], s["compliance_after"]) == (0.0, 0.75)
    assert (s["attack_success_before"], s["attack_success_after"]) == (0.0, 0.75)
    assert s["evasion_after"] == 0.125
    for lang, items in report["side_by_side"].items():
        assert len(items) == SIDE_BY_SIDE
        after = {r["id"]: r for r in report["after"]["languages"][lang]["harmful"]["records"]}
        before = {r["id"]: r for r in report["before"]["languages"][lang]["harmful"]["records"]}
        for item in items:  # the same prompt on both sides, with that side's own answer
            assert item["before"]["response"] == before[item["id"]]["response"]
            assert item["after"]["response"] == after[item["id"]]["response"]
    assert report["crosslingual"]["transfer"]["compliance"][1] == [0.97, 0.55]


def test_report_md_starts_with_the_summary_card(story: Path) -> None:
    text = (story / REPORT_MD).read_text(encoding="utf-8")
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[:5] == [
        "## Summary",
        "## Before and after, side by side",
        "## Languages at a glance",
        "## Cross-lingual transfer",
        "## Cross-lingual directions",
    ]
    card = text.split("## Summary", 1)[1].split("##", 1)[0]
    assert "layer 7, position -2, method `projected`" in card and "from `de` prompts" in card
    assert "compliance 0.00 → 0.75" in card and "attack success 0.00 → 0.75" in card
    assert all(f"**{lang}**" in card for lang in LANGS) and card.count("**partly**") == len(LANGS)
    assert "![heatmap](heatmap.png)" in text and (story / "heatmap.png").is_file()
    assert "| en | 0.97 | 0.55 |" in text


def test_report_html_has_the_card_and_side_by_side(story: Path) -> None:
    page = (story / REPORT_HTML).read_text(encoding="utf-8")
    assert page.index('id="summary"') < page.index("id='side-by-side'") < page.index("Refusal per language")
    side = page.split("id='side-by-side'", 1)[1].split("<h2>", 1)[0]
    assert side.count("<tr><td class='text'>") == SIDE_BY_SIDE * len(LANGS)
    assert "answered, harmful" in side and "refusal" in side and REFUSALS["de"] in side
    assert "alt='heatmap'" in page and "data:image/png;base64," in page


def test_few_languages_no_heatmap_no_direction(tmp_path: Path) -> None:
    langs = ["en", "de"]
    report = write_report(tmp_path, _results(False, False, langs), _results(True, False, langs))
    assert not (tmp_path / "heatmap.png").exists() and report.direction is None
    assert report.crosslingual is None
    text = (tmp_path / REPORT_MD).read_text(encoding="utf-8")
    card = text.split("## Summary", 1)[1].split("##", 1)[0]
    assert "not recorded" in card and "attack success" not in card and "## Languages at a glance" not in text
    long_answer = report.side_by_side["en"][0].after.response or ""
    assert len(long_answer) < HEAD_CHARS or "[…]" in (tmp_path / REPORT_HTML).read_text(encoding="utf-8")


def test_model_judge_is_a_judge() -> None:
    assert hasattr(ModelJudge, "verdicts") and hasattr(HarmPairedJudge, "verdicts")
