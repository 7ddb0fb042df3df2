"""The JSON records (candidates, results, report, crosslingual, provenance) and the one JSON writer.

Each record is written, its bytes compared with the format every release so far has written (json.dumps with
two-space indent, UTF-8 kept, keys in the writer's order, a final newline), read back and compared field by
field; a damaged copy of each fails in one line with a typed error that names the file and the field. No model
is loaded: the records are written out by hand here, or built by the same helpers the evaluation uses.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_one_line_error, run
from records_doc import render, stale

from abliterate.direction.records import CandidateRow, CandidatesRecord, read_candidates
from abliterate.errors import AbliterateError, DataError, VerifyError
from abliterate.evaluation.crosslingual_record import CrosslingualRecord, read_crosslingual
from abliterate.evaluation.report import REPORT_JSON, build_report, write_report
from abliterate.evaluation.report_record import ReportRecord, read_report
from abliterate.evaluation.results import (
    ResultsRecord,
    block_counts,
    language_entry,
    read_results,
    summarize,
    write_results,
)
from abliterate.publish.provenance import read_provenance, write_provenance
from abliterate.publish.provenance_record import ProvenanceRecord
from abliterate.storage import atomic
from abliterate.storage.atomic import json_text, write_atomic, write_json

TOKEN = "hf_" + "A1b2" * 9  # looks like a user access token: redacted in provenance


def legacy(data: object) -> str:
    """How the records were written before the models: json.dumps, indent 2, UTF-8 kept, a final newline."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def assert_one_line(err: AbliterateError, *needles: str) -> None:
    line = err.one_line()
    assert "\n" not in line and err.hint, line
    for needle in needles:
        assert needle in line, line


def damaged(path: Path, change: Any) -> Path:
    """A copy of the JSON file at `path` with `change(data)` applied, beside it."""
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    copy_path = path.with_name("damaged-" + path.name)
    copy_path.write_text(json.dumps(data), encoding="utf-8")
    return copy_path


# --- write_json, write_atomic -----------------------------------------------------------------------------


def test_write_json_is_the_one_format(tmp_path: Path) -> None:
    data = {"b": 1, "a": ["ü", None, 0.5]}
    path = write_json(tmp_path / "sub" / "x.json", data)  # the folder is created
    assert path.read_bytes() == '{\n  "b": 1,\n  "a": [\n    "ü",\n    null,\n    0.5\n  ]\n}\n'.encode()
    write_json(path, data, indent=None)
    assert path.read_text(encoding="utf-8") == '{"b": 1, "a": ["ü", null, 0.5]}\n'
    assert json_text(CandidateRow(pos=-1, layer=2)) == '{\n  "pos": -1,\n  "layer": 2\n}\n'  # only fields given
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]  # no temporary file left


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_atomic(tmp_path / "f.json", "old\n")

    def fail(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError):
        write_json(path, {"new": True})
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["f.json"]


def test_write_json_applies_the_text_filter(tmp_path: Path) -> None:
    path = write_json(tmp_path / "f.json", {"k": "secret"}, text_filter=lambda t: t.replace("secret", "<x>"))
    assert path.read_text() == '{\n  "k": "<x>"\n}\n'


# --- candidates.json --------------------------------------------------------------------------------------


def candidates_data() -> dict[str, Any]:
    row = {"pos": -1, "layer": 2, "screen_refusal": 1.5, "screen_kl": 0.01, "refusal": -2.25, "induce": 3.0,
           "kl": 0.125, "kept": True}
    other = {"pos": -2, "layer": 1, "screen_refusal": 4.0, "screen_kl": 0.5, "refusal": None, "induce": None,
             "kl": None, "kept": False}
    return {
        "tool_version": "1.2.3", "source_model": "/models/Ünïcode", "lang": "de", "method": "projected",
        "chosen": row, "post_instruction_tokens": 5, "sink_layers": [0], "prompts_after_filter":
        {"harmful_train": 30, "harmless_train": 32, "harmful_val": 8, "harmless_val": 8}, "batch_size": 16,
        "forward_passes": {"filter": 4, "activations": 4, "screening": 2, "finalists": 6, "total": 16},
        "forward_rows": {"filter": 64, "activations": 62, "screening": 40, "finalists": 48, "total": 214},
        "candidates": [row, other],
    }


def test_candidates_round_trip(tmp_path: Path) -> None:
    data = candidates_data()
    record = CandidatesRecord.model_validate(data)
    path = record.write(tmp_path / "candidates.json")
    assert path.read_text(encoding="utf-8") == legacy(data)
    back = read_candidates(path)
    assert back == record and back.chosen.layer == 2 and back.candidates[1].refusal is None
    assert back.forward_passes["total"] == 16


def test_candidates_of_a_saved_direction_hold_only_pos_and_layer(tmp_path: Path) -> None:
    data = {**candidates_data(), "chosen": {"pos": -1, "layer": 3}, "candidates": []}
    path = CandidatesRecord.model_validate(data).write(tmp_path / "c.json")
    assert json.loads(path.read_text())["chosen"] == {"pos": -1, "layer": 3}


def test_damaged_candidates_fail_in_one_line(tmp_path: Path) -> None:
    path = CandidatesRecord.model_validate(candidates_data()).write(tmp_path / "candidates.json")
    bad = damaged(path, lambda d: d["chosen"].update(layer="seven"))
    with pytest.raises(DataError) as err:
        read_candidates(bad)
    assert_one_line(err.value, str(bad), "chosen.layer", "abliterate directions")
    (tmp_path / "cut.json").write_text(path.read_text()[:50])
    with pytest.raises(DataError) as err:
        read_candidates(tmp_path / "cut.json")
    assert_one_line(err.value, "cannot read")


# --- results.json -----------------------------------------------------------------------------------------


def _answers(kind: str, refused: list[bool]) -> list[dict[str, Any]]:
    return [{"id": f"{kind}-{i}", "prompt": f"prompt {i} ✓", "response": "Sorry." if r else "Sure: …",
             "refused": r, "evasive": False, "harmful": None, "why": "marker" if r else None}
            for i, r in enumerate(refused)]


def results_data(refused: list[bool], spec: str) -> dict[str, Any]:
    """A results dict as `Evaluator.results` makes it, from the same helpers."""
    languages = {}
    for lang in ("en", "de"):
        harmful = {**block_counts(records := _answers("harmful", refused)), "records": records}
        harmless = {**block_counts(records := _answers("harmless", [False, True])), "records": records}
        languages[lang] = language_entry(harmful, harmless)
    return {
        "schema_version": 2, "tool": {"name": "abliterate", "version": "1.2.3"}, "created": "2026-01-01T00:00:00+00:00",
        "model": {"spec": spec, "folder": f"/m/{spec}", "identity": "abc"},
        "settings": {"langs": ["en", "de"], "judge": "markers", "harm_judge": None, "prompts": "builtin",
                     "split": "test", "n_prompts": 2, "max_new_tokens": 8, "decoding": "greedy", "batch_size": 4,
                     "tasks": [], "limit": None, "kl_tokens": 4, "kl_prompts": 2, "dtype": "auto", "device": "cpu",
                     "engine": "hf", "quantize": "none"},
        "summary": summarize(languages), "languages": languages,
        "kl": {"base": {"spec": "base", "folder": "/m/base", "identity": "def"}, "tokens": 4, "n_prompts": 1,
               "first_token": 0.25, "first_n_tokens": 0.125, "per_position": [0.25, 0.0],
               "languages": {"en": {"n": 1, "first_token": 0.25, "first_n_tokens": 0.125}},
               "records": [{"id": "harmless-0", "lang": "en", "tokens": 2, "first_token": 0.25,
                            "first_n_tokens": 0.125}]},
        "lm_eval": None, "timings": {"refusal_s": 1.5, "total_s": 1.5}, "cache": {"enabled": True, "hits": 0,
                                                                                  "misses": 4},
    }


def test_results_round_trip(tmp_path: Path) -> None:
    data = results_data([True, False], "edited")
    record = write_results(tmp_path / "results.json", data)
    assert (tmp_path / "results.json").read_text(encoding="utf-8") == legacy(data)
    back = read_results(tmp_path / "results.json")
    assert back == record and back.to_data() == data
    assert back.languages["de"].harmful.refusals == 1 and back.summary.compliance == 0.5
    assert back.kl is not None and back.kl.records[0].first_token == 0.25


@pytest.mark.parametrize(("change", "field"), [
    (lambda d: d["languages"]["en"]["harmful"].update(n="two"), "languages.en.harmful.n"),
    (lambda d: d["languages"]["de"]["harmless"]["records"][0].pop("refused"), "records.0.refused"),
    (lambda d: d.update(kl={"tokens": 4}), "kl.base"),
])
def test_damaged_results_fail_in_one_line(tmp_path: Path, change: Any, field: str) -> None:
    write_results(tmp_path / "results.json", results_data([True, False], "m"))
    bad = damaged(tmp_path / "results.json", change)
    with pytest.raises(DataError) as err:
        read_results(bad)
    assert_one_line(err.value, str(bad), "is not a valid abliterate results file", field, "abliterate eval")


# --- report.json ------------------------------------------------------------------------------------------


def test_report_round_trip(tmp_path: Path) -> None:
    before, after = results_data([True, True], "base"), results_data([False, True], "edited")
    record = write_report(tmp_path, before, after)
    text = (tmp_path / REPORT_JSON).read_text(encoding="utf-8")
    assert text == legacy(build_report(before, after))  # no candidates.json or crosslingual.json here
    back = read_report(tmp_path / REPORT_JSON)
    assert back == record and back.to_data() == json.loads(text)
    assert back.summary.compliance_before == 0.0 and back.summary.compliance_after == 0.5
    assert [row.bypass for row in back.languages] == ["partly", "partly"]
    assert back.after.model.spec == "edited" and back.kl is not None and back.kl.n_prompts == 1
    assert not hasattr(back.kl, "records") or "records" not in back.kl.model_fields_set


def test_report_reads_results_records_and_dicts_alike(tmp_path: Path) -> None:
    before, after = results_data([True, True], "base"), results_data([False, True], "edited")
    from_dicts = build_report(before, after)
    from_records = build_report(ResultsRecord.model_validate(before), ResultsRecord.model_validate(after))
    assert from_dicts == from_records


def test_damaged_report_fails_in_one_line(tmp_path: Path) -> None:
    write_report(tmp_path, results_data([True], "b"), results_data([False], "a"))
    bad = damaged(tmp_path / REPORT_JSON, lambda d: d["summary"].update(compliance_after="high"))
    with pytest.raises(DataError) as err:
        read_report(bad)
    assert_one_line(err.value, str(bad), "summary.compliance_after")


# --- crosslingual.json ------------------------------------------------------------------------------------


def crosslingual_data(transfer: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "tool_version": "1.2.3", "model": "org/m", "method": "projected", "languages": ["en", "de"],
        "source_lang": "en", "layer": 2, "pos": -1, "chosen_by": "selection on en",
        "prompts": {lang: {"harmful_train": 4, "harmless_train": 4} for lang in ("en", "de")},
        "sink_layers": {"en": [], "de": [0]},
        "cosine": {"languages": ["en", "de"], "matrix": [[1.0, 0.5], [0.5, 1.0]]},
        "per_layer_cosine": {"pos": -1, "layers": [0, 1, 2],
                             "curves": {"en": {"en": [0.1, 0.5, 1.0], "de": [0.0, 0.25, 0.5]}}},
        "pca": {"en": {"explained_variance_ratio": [0.5, 0.25], "harmful": [[1.0, 0.0]], "harmless": [[-1.0, 0.0]],
                       "harmless_centroid": [-1.0, 0.0], "harmful_centroid": [1.0, 0.0],
                       "arrows": {"en": [2.0, 0.0]}, "own": "en"}},
        "selection": {"pos": -1, "layer": 2, "screen_refusal": 1.0, "screen_kl": 0.1, "refusal": -1.0,
                      "induce": 2.0, "kl": 0.05, "kept": True},
    }
    if transfer:
        data["transfer"] = {
            "rows": ["none", "en", "de"], "columns": ["en", "de"], "compliance": [[0.0, 0.5], [1.0, 0.5], [0.5, 1.0]],
            "refusal_rate": [[1.0, 0.5], [0.0, 0.5], [0.5, 0.0]], "n": [[2, 2]] * 3,
            "cells": [{"source": "en", "target": "de", "n": 2, "refusals": 1, "refusal_rate": 0.5,
                       "compliance": 0.5}],
            "judge": "markers", "n_prompts": 2, "max_new_tokens": 4, "generations": 12, "seconds": 0.5,
        }
    data["seconds"] = {"load": 0.5, "site": 1.0}
    data["plots"] = ["cosine.png"]
    return data


@pytest.mark.parametrize("transfer", [True, False])
def test_crosslingual_round_trip(tmp_path: Path, transfer: bool) -> None:
    data = crosslingual_data(transfer)
    record = CrosslingualRecord.model_validate(data)
    path = record.write(tmp_path / "crosslingual.json")
    assert path.read_text(encoding="utf-8") == legacy(data)  # without a transfer matrix: no "transfer" key at all
    back = read_crosslingual(path)
    assert back == record and (back.transfer is not None) is transfer
    assert back.cosine.matrix[0][1] == 0.5 and back.selection is not None and back.selection.layer == 2


def test_damaged_crosslingual_fails_in_one_line(tmp_path: Path) -> None:
    path = CrosslingualRecord.model_validate(crosslingual_data(True)).write(tmp_path / "crosslingual.json")
    bad = damaged(path, lambda d: d["transfer"]["cells"][0].pop("compliance"))
    with pytest.raises(DataError) as err:
        read_crosslingual(bad)
    assert_one_line(err.value, str(bad), "transfer.cells.0.compliance", "abliterate crosslingual")


# --- provenance.json --------------------------------------------------------------------------------------


def provenance_data() -> dict[str, Any]:
    sha = "ab" * 32
    return {
        "schema": 1, "tool": {"name": "abliterate", "version": "1.2.3"},
        "libraries": {"python": "3.12.1", "torch": "2.5.0"}, "created": "2026-01-01T00:00:00+00:00",
        "command": ["abliterate", "edit", "m", "--out", "o"],
        "source": {"model": "org/m", "kind": "hub", "requested_revision": None, "revision": "c0ffee",
                   "files": {"model.safetensors": {"sha256": sha, "bytes": 10, "from": "hub cache blob name"},
                             "config.json": {"sha256": sha, "bytes": 2}}},
        "direction": {"file": "abliterate/direction.safetensors", "layer": 1, "pos": -1, "lang": "en",
                      "method": "projected", "source_model": "org/m", "hidden_size": 32},
        "prompts": {"source": "builtin", "lang": "en", "counts": {"harmful_train": 8}, "sha256": sha,
                    "hashed": "the instructions used (after the refusal-score filter), canonical JSON by split"},
        "selection": {"chosen": {"pos": -1, "layer": 1}, "kl_threshold": 0.1}, "settings": {"n_train": 8},
        "seed": None,
        "edit": {"architecture": "llama", "tied_embeddings": False, "post_norms": False, "norm_offset": 0.0,
                 "norm_preserving": False, "components": {"attention": 1},
                 "tensors": [{"name": "model.layers.0.self_attn.o_proj.weight", "component": "attention",
                              "layer": 0}], "dequantized_modules": []},
        "output": {"files": {"model.safetensors": {"sha256": sha, "bytes": 10}}},
        "base_card": {"license": "mit"},
    }


def test_provenance_round_trip(tmp_path: Path) -> None:
    data = provenance_data()
    path = write_provenance(tmp_path, ProvenanceRecord.model_validate(data))
    assert path == tmp_path / "abliterate" / "provenance.json"
    assert path.read_text(encoding="utf-8") == legacy(data)
    back = read_provenance(tmp_path)
    assert back.to_data() == data and back.source.files["model.safetensors"].from_ == "hub cache blob name"
    assert back.edit.tensors[0].component == "attention" and back.format_kind is None


def test_provenance_is_redacted_and_keeps_format_absent_or_present(tmp_path: Path) -> None:
    data = provenance_data()
    data["command"] = ["abliterate", "edit", f"--message={TOKEN}"]
    write_provenance(tmp_path / "a", data)  # a dict is validated first
    text = (tmp_path / "a" / "abliterate" / "provenance.json").read_text()
    assert TOKEN not in text and "<redacted>" in text and '"format"' not in text
    gguf = {**copy.deepcopy(data), "format": {"kind": "gguf", "file": "m.gguf", "summary": "GGUF Q8_0"}}
    write_provenance(tmp_path / "b", gguf)
    assert read_provenance(tmp_path / "b").format_kind == "gguf"


@pytest.mark.parametrize(("change", "needle"), [
    (lambda d: d["edit"]["tensors"][0].update(layer="zero"), "edit.tensors.0.layer"),
    (lambda d: d["output"]["files"]["model.safetensors"].pop("sha256"),
     "output.files.model.safetensors: value error, a file entry needs sha256 or xxh3_128"),
    (lambda d: d.update(schema=7), "not a provenance record of schema 1"),
])
def test_damaged_provenance_fails_in_one_line(tmp_path: Path, change: Any, needle: str) -> None:
    data = provenance_data()
    change(data)
    (tmp_path / "abliterate").mkdir()
    (tmp_path / "abliterate" / "provenance.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(VerifyError) as err:
        read_provenance(tmp_path)
    assert_one_line(err.value, needle)


# --- the CLI ----------------------------------------------------------------------------------------------


def test_cli_names_the_damaged_record_in_one_line(tmp_path: Path) -> None:
    """`report` with a damaged results file and `verify` with a damaged provenance: one error line each."""
    write_results(tmp_path / "before.json", results_data([True], "b"))
    bad = damaged(tmp_path / "before.json", lambda d: d["summary"].update(harmful_prompts=[]))
    done = run("report", bad, tmp_path / "before.json", "--out", tmp_path / "report")
    assert_one_line_error(done, str(bad), "summary.harmful_prompts", "abliterate eval")
    assert not (tmp_path / "report").exists()
    data = provenance_data()
    data["source"]["files"] = "none"
    (tmp_path / "model" / "abliterate").mkdir(parents=True)
    (tmp_path / "model" / "abliterate" / "provenance.json").write_text(json.dumps(data), encoding="utf-8")
    assert_one_line_error(run("verify", tmp_path / "model"), "provenance.json", "source.files")


# --- docs/records.md --------------------------------------------------------------------------------------


def test_records_doc_is_current() -> None:
    """docs/records.md and docs/schemas/ come from the models: regenerate with `python tests/records_doc.py`."""
    assert not stale(), f"out of date: {stale()}; run `python tests/records_doc.py`"
    page = next(text for path, text in render().items() if path.name == "records.md")
    for name in ("candidates.json", "results.json", "report.json", "crosslingual.json", "provenance.json"):
        assert f"## {name}" in page
    assert isinstance(ReportRecord.model_json_schema()["properties"]["before"], dict)
