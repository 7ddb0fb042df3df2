"""Every recipe in recipes/ loads into the settings model, names a supported family and documents itself;
flags given with --recipe override it (checked end to end on a tiny local model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from abliterate.direction.selection import eligible_layers
from abliterate.direction.vector import Direction
from abliterate.model.archs import lookup
from abliterate.settings import build_settings, load_recipe

RECIPES = sorted((Path(__file__).parents[3] / "recipes").glob("*.yaml"))

# Offline stand-in for each recipe model's config.json: (model_type, num_hidden_layers). A new recipe must add
# its model here, which is what checks that its family is supported without contacting the hub.
KNOWN_MODELS = {
    "meta-llama/Meta-Llama-3-8B-Instruct": ("llama", 32),
    "meta-llama/Llama-3.1-8B-Instruct": ("llama", 32),
    "google/gemma-2b-it": ("gemma", 18),
    "google/gemma-2-9b-it": ("gemma2", 42),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", 28),
    "Qwen/Qwen2.5-0.5B-Instruct": ("qwen2", 24),
    "google/gemma-3-12b-it": ("gemma3", 48),
    "Qwen/Qwen3-8B": ("qwen3", 36),
    "openai/gpt-oss-20b": ("gpt_oss", 24),
    "mistralai/Mistral-Small-3.2-24B-Instruct-2506": ("mistral3", 40),
}
EXPECTED = {
    "llama-3-8b-instruct": (12, -5, "en"),
    "gemma-2b-it": (10, -2, "en"),
    "qwen2.5-7b-instruct-de": (15, -1, "de"),
    "llama-3.1-8b-instruct": (None, None, "en"),
    "gemma-2-9b-it": (None, None, "en"),
    "qwen2.5-0.5b-instruct": (None, None, "en"),
    "gemma-3-12b-it": (None, None, "en"),
    "qwen3-8b": (None, None, "en"),
    "gpt-oss-20b": (None, None, "en"),
    "mistral-small-3.2-24b-instruct": (None, None, "en"),
}


def test_every_expected_recipe_exists() -> None:
    assert {r.stem for r in RECIPES} == set(EXPECTED)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_is_valid(recipe: Path) -> None:
    settings = build_settings(recipe, {})
    assert settings.model
    assert load_recipe(recipe)  # a mapping of settings
    assert (settings.layer, settings.pos, settings.lang) == EXPECTED[recipe.stem]
    assert settings.model in KNOWN_MODELS, f"add {settings.model} to KNOWN_MODELS (model_type, layers)"
    model_type, n_layers = KNOWN_MODELS[settings.model]
    lookup(model_type)  # raises ModelError for an unsupported family
    if settings.layer is not None:
        assert settings.layer in eligible_layers(n_layers, settings.prune_layers)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_documents_source_and_evaluation(recipe: Path) -> None:
    text = recipe.read_text(encoding="utf-8")
    comment = " ".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))
    assert text.startswith("# ") and "Source:" in comment and "Recommended evaluation" in comment
    raw = yaml.safe_load(text)
    assert {"langs", "tasks", "max_new_tokens"} <= set(raw), "recipes carry their recommended evaluation settings"
    if raw.get("layer") is None:
        assert "left unset" in comment and "searches" in comment  # says why there is no layer


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_serves_optimize_and_crosslingual_with_their_own_cap(
    recipe: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The recipes' max_new_tokens is the evaluation's: optimize and crosslingual use their own answer cap and
    say so (a warning), and take the cap from a flag or the recipe."""
    from abliterate.settings import CrosslingualSettings, OptimizeSettings, build_command_settings

    for section, cap in ((OptimizeSettings, "trial_max_new_tokens"), (CrosslingualSettings, "transfer_max_new_tokens")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="abliterate.settings"):
            _, values = build_command_settings(recipe, {}, section)
        assert f"which {section.command} does not use" in caplog.text
        assert getattr(values, cap) == section.model_fields[cap].default
        settings, values = build_command_settings(recipe, {cap: 16}, section)
        assert getattr(values, cap) == 16 and settings == build_settings(recipe, {})


def test_flags_override_recipe() -> None:
    settings = build_settings(RECIPES[0], {"lang": "fr", "layer": 3, "pos": None})
    assert settings.lang == "fr" and settings.layer == 3


def test_bad_recipe_value(tmp_path: Path) -> None:
    from abliterate.errors import UsageError

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nbatch_size: -1\n")
    with pytest.raises(UsageError, match="batch_size"):
        build_settings(bad, {})
    bad.write_text("model: x\nlanguage: de\n")
    with pytest.raises(UsageError, match="language"):
        build_settings(bad, {})
    bad.write_text("model: x\nmethod: orthogonal\n")
    with pytest.raises(UsageError, match="method"):
        build_settings(bad, {})


def test_cli_flags_override_recipe(tmp_path: Path) -> None:
    """`abliterate edit --recipe R --layer 1 --method standard`: the flags win, the rest comes from R."""
    from helpers import run
    from tiny_models import build, save_tokenizer

    model = tmp_path / "tiny-llama"
    build("llama", model, tied=True)
    save_tokenizer(model)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"# a tiny local model\nmodel: {model}\nlayer: 2\npos: -1\nmethod: norm-preserving\nn_train: 8\nn_val: 4\n"
        "batch_size: 8\nrefusal_tokens: [I, Sorry]\neval: false\nmax_shard_size: 40KB\n",
        encoding="utf-8",
    )
    out = tmp_path / "edited"
    done = run("edit", "--recipe", recipe, "--layer", "1", "--method", "standard", "--out", out, check=True)
    assert "direction: layer 1, position -1 (en, standard)" in done.stdout
    direction = Direction.load(out)
    assert (direction.layer, direction.pos, direction.method) == (1, -1, "standard")
    settings = json.loads((out / "abliterate" / "provenance.json").read_text())["settings"]
    assert settings["n_train"] == 8 and settings["max_shard_size"] == "40KB"  # from the recipe
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    # The recipe's own method when no flag overrides it: a norm-preserving edit that `verify` accepts.
    out2 = tmp_path / "edited-np"
    done = run("edit", "--recipe", recipe, "--out", out2, check=True)
    assert "direction: layer 2, position -1 (en, norm-preserving)" in done.stdout
    assert json.loads((out2 / "abliterate" / "provenance.json").read_text())["edit"]["norm_preserving"] is True
    assert "OK:" in run("verify", out2, check=True).stdout
