"""Resolving MODEL: local folders, hub ids (against a local stand-in of the hub cache), and errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tiny_models import build, save_tokenizer

from abliterate.errors import ModelError
from abliterate.model.loading import load_model, resolve

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An HF hub cache holding org/tiny-chat at commit SHA, used offline (the layout huggingface_hub writes)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny-chat" / "snapshots" / SHA
    build("qwen2", snapshot)
    save_tokenizer(snapshot)
    (cache / "models--org--tiny-chat" / "refs").mkdir(parents=True)
    (cache / "models--org--tiny-chat" / "refs" / "main").write_text(SHA)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_resolves_to_snapshot_with_revision(hub_cache: Path) -> None:
    source = resolve("org/tiny-chat")
    assert source.folder.name == SHA and source.revision == SHA
    model, tokenizer = load_model(source, device="cpu")
    assert model.config.model_type == "qwen2" and tokenizer.padding_side == "left"


def test_hub_id_unreachable_is_one_clear_error(hub_cache: Path) -> None:
    with pytest.raises(ModelError, match="unreachable") as err:
        resolve("org/not-cached")
    assert "local folder" in err.value.hint


def test_local_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"config\.json"):
        resolve(str(tmp_path / "empty"))


def test_missing_path_is_not_taken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        resolve(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="not found"):
        resolve("./some/local/path")


def test_local_folder_is_used_in_place(tmp_path: Path) -> None:
    build("llama", tmp_path / "m")
    assert resolve(str(tmp_path / "m")).folder == (tmp_path / "m").resolve()
    shutil.rmtree(tmp_path / "m")
