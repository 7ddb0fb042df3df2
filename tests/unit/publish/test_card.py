"""publish/card.py directly: the model card rendered from a provenance record written out by hand.

No model is built and no edit is run: each test writes the record (or the base model's card) itself, so the
expected table rows, front matter and omissions are stated here in full rather than derived from the code.
The front matter is read back with PyYAML, the table rows by splitting the Markdown.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import yaml

from abliterate.model.loading import ModelSource
from abliterate.publish.card import (
    GENERATED_MARKER,
    is_generated,
    read_base_card,
    render_card,
    write_card,
)

SHA = "ab" * 32
ROW = re.compile(r"\| (\S.*?) \| (.*) \|")


def _record(**changes: Any) -> dict[str, Any]:
    """A provenance record of an `edit` of the hub model org/Base-7B, as build_provenance writes one."""
    record: dict[str, Any] = {
        "schema": 1,
        "tool": {"name": "abliterate", "version": "9.8.7"},
        "libraries": {"python": "3.12.1", "torch": "2.5.0", "transformers": "4.50.0"},
        "created": "2026-01-01T00:00:00+00:00",
        "source": {"model": "org/Base-7B", "kind": "hub", "revision": "c0ffee", "files": {}},
        "direction": {
            "file": "abliterate/direction.safetensors",
            "layer": 14,
            "pos": -1,
            "lang": "de",
            "method": "projected",
            "source_model": "org/Base-7B",
            "hidden_size": 32,
        },
        "prompts": {
            "source": "builtin",
            "lang": "de",
            "sha256": SHA,
            "counts": {"harmful_train": 32, "harmless_train": 30, "harmful_val": 8, "harmless_val": 6},
        },
        "selection": {"chosen": {"refusal": -3.2109, "induce": 1.5, "kl": 0.012345}, "candidates_scored": 40},
        "edit": {
            "architecture": "llama",
            "tied_embeddings": False,
            "post_norms": False,
            "norm_preserving": False,
            "components": {"embedding": 1, "attention": 3, "mlp": 3},
            "dequantized_modules": [],
        },
        "output": {"files": {}},
        "base_card": {"license": "llama3.1", "language": ["en", "de"], "tags": ["facebook", "abliterated"]},
    }
    for key, value in changes.items():
        record[key] = value
    return record


def _front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    front, _ = card[4:].split("\n---\n", 1)
    data = yaml.safe_load(front)
    assert isinstance(data, dict)
    return data


def _rows(card: str) -> dict[str, str]:
    """The `| key | value |` rows of the "What was done" table."""
    section = card.split("## What was done", 1)[1].split("\n## ", 1)[0]
    rows = [ROW.fullmatch(line) for line in section.splitlines()]
    return {row.group(1): row.group(2) for row in rows if row is not None and row.group(1) != "---"}


# --- front matter ------------------------------------------------------------------------------------------


def test_front_matter_of_a_hub_source(tmp_path: Path) -> None:
    """Base model and relation from the hub id, license/language inherited, our tags appended once."""
    data = _front_matter(render_card(tmp_path, _record()))
    assert data == {
        "base_model": "org/Base-7B",
        "base_model_relation": "finetune",
        "language": ["en", "de"],
        "library_name": "transformers",
        "license": "llama3.1",
        "pipeline_tag": "text-generation",
        "tags": ["facebook", "abliterated", "refusal-direction", "abliterate"],
    }


def test_front_matter_of_a_local_source_without_base_card(tmp_path: Path) -> None:
    """A local folder is no base_model; with no base card the language is the direction's, no license at all."""
    record = _record(source={"model": "/models/Base-7B", "kind": "local"}, base_card={})
    data = _front_matter(render_card(tmp_path, record))
    assert "base_model" not in data and "base_model_relation" not in data and "license" not in data
    assert data["language"] == ["de"]
    assert data["tags"] == ["abliterated", "refusal-direction", "abliterate"]


def test_front_matter_of_an_adapter(tmp_path: Path) -> None:
    """A LoRA adapter output is a peft library model whose relation to the base is `adapter`."""
    data = _front_matter(render_card(tmp_path, _record(format={"kind": "adapter", "summary": "LoRA adapter"})))
    assert data["library_name"] == "peft" and data["base_model_relation"] == "adapter"


# --- the "What was done" table ------------------------------------------------------------------------------


def test_table_rows_of_an_edit(tmp_path: Path) -> None:
    """Every row of the table, written out in full from the record above (scores at 3 significant digits)."""
    assert _rows(render_card(tmp_path, _record())) == {
        "Base model": "[org/Base-7B](https://huggingface.co/org/Base-7B) at revision `c0ffee`",
        "Direction": "language `de`, layer 14, position -1, projected method",
        "Selection": "refusal score -3.21, induce score 1.5, first-token KL 0.0123 (40 candidates)",
        "Prompts": f"`builtin` (de): 32+30 train, 8+6 val; sha256 `{SHA}`",
        "Edited tensors": "1 embedding, 3 attention outputs, 3 MLP outputs (llama family)",
        "Tool": "abliterate 9.8.7 (torch 2.5.0, transformers 4.50.0)",
    }


def test_table_of_an_apply_says_there_was_no_search(tmp_path: Path) -> None:
    """`apply` records no prompts or selection: both rows say a saved direction was applied."""
    rows = _rows(render_card(tmp_path, _record(prompts=None, selection=None)))
    assert rows["Selection"] == "none here: a saved direction was applied (`abliterate apply`)"
    assert rows["Prompts"] == "none (a saved direction was applied)"


def test_table_leaves_out_what_did_not_happen(tmp_path: Path) -> None:
    """No Format or Quantization row, no zero counts, no python version, no edit flags that were off."""
    record = _record()
    record["edit"]["components"] = {"embedding": 0, "attention": 3, "mlp": 0}
    rows = _rows(render_card(tmp_path, record))
    assert set(rows) == {"Base model", "Direction", "Selection", "Prompts", "Edited tensors", "Tool"}
    assert rows["Edited tensors"] == "3 attention outputs (llama family)"
    assert "python" not in rows["Tool"] and "3.12.1" not in rows["Tool"]


def test_table_of_a_local_gguf_source_with_every_edit_flag(tmp_path: Path) -> None:
    """A dequantized GGUF source, tied embeddings, post-norms, norm-preserving, per-layer weights, quantization."""
    record = _record(
        source={"model": "/models/base-q8/", "kind": "local", "gguf_file": "/models/base.Q8_0.gguf"},
        format={"kind": "gguf", "summary": "GGUF Q8_0"},
    )
    record["edit"].update(tied_embeddings=True, post_norms=True, norm_preserving=True, dequantized_modules=["a", "b"])
    record["direction"]["weights"] = {"max_weight": 1.0}
    rows = _rows(render_card(tmp_path, record))
    assert rows["Base model"] == "local model `base-q8` (dequantized from `/models/base.Q8_0.gguf`)"
    assert rows["Format"] == "GGUF Q8_0"
    assert rows["Quantization"].startswith("the source is quantized; the 2 modules that write to the residual")
    edited = rows["Edited tensors"]
    for part in ("; tied embeddings untied", "; post-norm family", "; norm-preserving", "; partial edit"):
        assert part in edited, part


# --- title, evaluation, responsible use -----------------------------------------------------------------------


def test_title_is_the_repo_name_or_the_source_name_abliterated(tmp_path: Path) -> None:
    """`# NAME`: the last part of the repo id when pushing, else the source folder's name + `-abliterated`."""
    assert "\n# Pushed-Name\n" in render_card(tmp_path, _record(), repo_id="me/Pushed-Name")
    assert "\n# Base-7B-abliterated\n" in render_card(tmp_path, _record())


def test_responsible_use_names_the_license_only_when_there_is_one(tmp_path: Path) -> None:
    """The note cites the base license when the base card has one, and no license clause otherwise."""
    assert "complying with them (license: `llama3.1`), and" in render_card(tmp_path, _record())
    bare = render_card(tmp_path, _record(base_card={}))
    assert "complying with them, and with applicable law." in bare and "license:" not in bare


def test_without_a_report_the_card_says_evaluation_was_not_run(tmp_path: Path) -> None:
    """No abliterate/report.md and no plots: the Evaluation section says so and shows no Plots heading."""
    card = render_card(tmp_path, _record())
    assert "## Evaluation\n\nEvaluation was not run for this checkpoint" in card and "### Plots" not in card


def test_report_is_embedded_with_demoted_headings_and_rewritten_links(tmp_path: Path) -> None:
    """Report headings go two levels down; links to files in abliterate/ are rewritten, others and code kept."""
    folder = tmp_path / "abliterate"
    folder.mkdir()
    (folder / "refusal.png").write_bytes(b"\x89PNG")
    (folder / "kl.png").write_bytes(b"\x89PNG")
    (folder / "report.md").write_text(
        "# Report\n\n## Refusal\n\n![refusal](refusal.png) [gone](missing.md) [web](https://x.org/a.png)\n\n"
        "```\n# not a heading ![r](refusal.png)\n```\n",
        encoding="utf-8",
    )
    card = render_card(tmp_path, _record())
    assert "\n### Report\n" in card and "\n#### Refusal\n" in card
    assert "![refusal](abliterate/refusal.png)" in card and "[gone](missing.md)" in card
    assert "[web](https://x.org/a.png)" in card and "# not a heading ![r](refusal.png)" in card
    assert card.split("### Plots\n\n", 1)[1].startswith("![kl](abliterate/kl.png)\n")  # only the unshown plot
    assert "Evaluation was not run" not in card


# --- is_generated, write_card ---------------------------------------------------------------------------------


def test_write_card_writes_the_rendered_text_that_is_generated(tmp_path: Path) -> None:
    """write_card puts render_card's text in README.md; it carries the marker right after the front matter."""
    record = _record()
    path = write_card(tmp_path, record, "me/x")
    assert path == tmp_path / "README.md"
    text = path.read_text(encoding="utf-8")
    assert text == render_card(tmp_path, record, "me/x")
    assert f"\n---\n{GENERATED_MARKER}\n\n# x\n" in text and is_generated(path)


def test_is_generated_protects_a_card_the_user_wrote(tmp_path: Path) -> None:
    """A missing card may be written; one without the marker (or with the marker line deleted) may not."""
    path = tmp_path / "README.md"
    assert is_generated(path)
    path.write_text("---\nlicense: mit\n---\n# mine\n", encoding="utf-8")
    assert not is_generated(path)
    write_card(tmp_path, _record())
    path.write_text(path.read_text(encoding="utf-8").replace(GENERATED_MARKER, ""), encoding="utf-8")
    assert not is_generated(path)


def test_render_card_does_not_change_the_record(tmp_path: Path) -> None:
    """Rendering reads the record only: the provenance that is written next to the card stays as it was."""
    record = _record()
    before = copy.deepcopy(record)
    render_card(tmp_path, record)
    assert record == before


# --- read_base_card ------------------------------------------------------------------------------------------


BASE_CARD = """---
license: apache-2.0
language:
- en
- fr
tags:
- chat
datasets:
- some/data
pipeline_tag: ''
---
# Base
"""


def test_base_card_from_the_source_folder_keeps_only_inherited_fields(tmp_path: Path) -> None:
    """License, language and tags are inherited; datasets is not an inherited field; empty values are dropped."""
    (tmp_path / "README.md").write_text(BASE_CARD, encoding="utf-8")
    base = read_base_card(ModelSource("org/Base-7B", tmp_path))
    assert base == {"license": "apache-2.0", "language": ["en", "fr"], "tags": ["chat"]}


def test_base_card_of_a_hub_model_is_fetched_at_its_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No README.md in the folder and a hub id: the hub's README.md at the source revision is read."""
    fetched = tmp_path / "fetched.md"
    fetched.write_text(BASE_CARD, encoding="utf-8")
    calls: list[tuple[str, str, str | None]] = []

    def download(repo_id: str, filename: str, revision: str | None = None) -> str:
        calls.append((repo_id, filename, revision))
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    folder = tmp_path / "snapshot"
    folder.mkdir()
    assert read_base_card(ModelSource("org/Base-7B", folder, revision="c0ffee"))["license"] == "apache-2.0"
    assert calls == [("org/Base-7B", "README.md", "c0ffee")]


def test_base_card_fails_soft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline hub, a GGUF source (never fetched) or a local folder without a card: no metadata, no error."""

    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert read_base_card(ModelSource("org/Base-7B", tmp_path)) == {}
    gguf = ModelSource("org/Base-7B", tmp_path, gguf_file=tmp_path / "m.gguf")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", pytest.fail)
    assert read_base_card(gguf) == {}
    assert read_base_card(ModelSource(str(tmp_path), tmp_path)) == {}
