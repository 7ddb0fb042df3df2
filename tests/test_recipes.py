"""Every recipe in recipes/ loads into the settings model and names a supported family."""

from __future__ import annotations

from pathlib import Path

import pytest

from abliterate.settings import build_settings, load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_is_valid(recipe: Path) -> None:
    settings = build_settings(recipe, {})
    assert settings.model
    assert load_recipe(recipe)  # a mapping of settings


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
