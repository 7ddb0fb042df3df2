"""`directions`/`edit` run for every one of the 14 languages, with that language's prompts and refusal tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import BYTE_VOCAB, build, save_tokenizer

from abliterate.commands.edit import run_directions
from abliterate.direction.search import load, load_prompts, refusal_ids
from abliterate.prompts.languages import LANGUAGES
from abliterate.prompts.sources import builtin
from abliterate.settings import Settings

FAST = dict(n_train=4, n_val=2, screen_prompts=2, finalists=2, batch_size=8, layer=1)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lang") / "tiny"
    build("llama", folder, extra=dict(vocab_size=BYTE_VOCAB))
    save_tokenizer(folder, byte_level=True)  # every script tokenized, byte by byte
    return folder


@pytest.mark.parametrize("lang", sorted(LANGUAGES))
def test_directions_for_every_language(tiny_chat: Path, tmp_path: Path, lang: str) -> None:
    settings = Settings(model=str(tiny_chat), lang=lang, out=tmp_path / "r.safetensors", **FAST)
    splits = load_prompts(settings)
    assert splits.harmful_train == builtin().instructions(lang, "harmful", "train", 4)
    result = run_directions(settings)
    assert result.direction.lang == lang and result.direction.layer == 1
    assert (tmp_path / "r.safetensors").is_file()


def test_refusal_tokens_follow_the_language(tiny_chat: Path) -> None:
    loaded = load(Settings(model=str(tiny_chat)))
    english = refusal_ids(Settings(model=str(tiny_chat), lang="en"), loaded.tokenizer)
    assert loaded.tokenizer.convert_tokens_to_ids("I") in english
    thai = refusal_ids(Settings(model=str(tiny_chat), lang="th"), loaded.tokenizer)
    assert set(thai).isdisjoint(english)  # Thai openings start with Thai bytes
    override = refusal_ids(Settings(model=str(tiny_chat), refusal_tokens=["Sorry"]), loaded.tokenizer)
    assert override == [loaded.tokenizer.convert_tokens_to_ids("S")]
