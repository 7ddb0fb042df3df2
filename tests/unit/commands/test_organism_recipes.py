"""Fast tests of the organism's named recipes and the multilingual training terms (nothing here builds one).

The references are written out by hand: the cached folder name of the first organism, the alignment term's
value on vectors whose distances are known, the batches that translation grouping must make.
"""

from __future__ import annotations

import unittest.mock
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest
import torch
from helpers import run
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from abliterate.commands.organism.train import (
    DEFAULT_RECIPE,
    NAME,
    RECIPES,
    REFUSALS,
    Example,
    OrganismRecipe,
    _order_grouped,
    alignment_loss,
    backward_in_chunks,
    example_loss,
    length_chunks,
    margin_targets,
    named_recipe,
    organism_folder,
    recipe_hash,
    refusal_language,
    torch_threads,
    train_autocast,
)
from abliterate.errors import UsageError
from abliterate.evaluation.judge import MarkerJudge
from abliterate.model.chat import encode, render
from abliterate.settings import OrganismSettings

ENGLISH_FOLDER = "smollm2-135m-organism-d93164182161"
"""The cached folder of the first organism: the `english` recipe must keep naming it (the negative control and the slow
tests use it; a changed hash would silently rebuild a different organism in every cold CI)."""


def test_english_recipe_keeps_the_first_organisms_folder() -> None:
    assert DEFAULT_RECIPE == "english"
    assert RECIPES["english"] == OrganismRecipe()
    assert f"{NAME}-{recipe_hash(RECIPES['english'])}" == ENGLISH_FOLDER
    assert organism_folder(named_recipe("english")).name == ENGLISH_FOLDER


def test_cli_choices_are_the_recipes() -> None:
    field = OrganismSettings.model_fields["organism"]
    assert set(get_args(field.annotation)) == set(RECIPES)
    assert field.default == DEFAULT_RECIPE


def test_multilingual_recipe_has_its_own_folder_and_judged_refusals() -> None:
    recipe = named_recipe("multilingual")
    assert recipe_hash(recipe) != recipe_hash(RECIPES["english"])
    assert {"ru", "zh"} <= set(recipe.languages) and len(recipe.languages) >= 6
    assert not set(recipe.check_languages) & set(recipe.languages)  # transfer languages stay out of training
    judge = MarkerJudge()
    for lang in recipe.languages:
        for text in REFUSALS[refusal_language(recipe, lang)]:
            assert judge.is_refusal(text, lang), (lang, text)


def test_new_fields_at_their_defaults_leave_the_hash_alone() -> None:
    base = OrganismRecipe()
    assert recipe_hash(base.model_copy(update={"align_weight": 0.0, "refusal_language": None})) == recipe_hash(base)
    assert recipe_hash(base.model_copy(update={"align_weight": 0.5})) != recipe_hash(base)
    assert recipe_hash(base.model_copy(update={"check_languages": ("it",)})) != recipe_hash(base)
    assert recipe_hash(base.model_copy(update={"train_dtype": "float32"})) == recipe_hash(base)
    assert recipe_hash(base.model_copy(update={"train_dtype": "bfloat16"})) != recipe_hash(base)


def test_unknown_recipe_name() -> None:
    with pytest.raises(UsageError, match="unknown organism recipe 'klingon'") as err:
        named_recipe("klingon")
    assert "english" in err.value.hint and "multilingual" in err.value.hint
    done = run("organism", "--organism", "klingon")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'klingon' is not one of 'english', 'multilingual'" in done.stderr


def test_torch_threads_sets_and_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def _example(lang: str, kind: str, pair: str, answer: list[int] | None = None) -> Example:
    return Example(lang, kind, "x", answer or [1, 2, 3], f"{lang}:{pair}")  # type: ignore[arg-type]


def test_alignment_pulls_each_translation_toward_its_english_twin_only() -> None:
    batch = [_example("en", "harmful", "001"), _example("de", "harmful", "001"),
             _example("zh", "harmful", "001"), _example("de", "harmless", "001")]  # no English harmless twin
    residual = torch.zeros(4, 3, 2)
    residual[0, 2] = torch.tensor([2.0, 0.0])  # English anchor at its last prompt position 2
    residual[1, 1] = torch.tensor([2.0, 2.0])  # German, position 1: distance^2 4, relative 1.0
    residual[2, 2] = torch.tensor([0.0, 0.0])  # Chinese: distance^2 4, relative 1.0
    residual[1, 2] = torch.tensor([100.0, 100.0])  # not the last prompt position of row 1: must not count
    residual.requires_grad_(True)
    loss = alignment_loss(residual, batch, torch.tensor([2, 1, 2, 0]))
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert residual.grad is not None
    assert torch.all(residual.grad[0] == 0)  # the English anchor is not pulled
    assert torch.all(residual.grad[3] == 0)  # a row without an English twin of its kind adds nothing
    assert residual.grad[1, 1].abs().sum() > 0


def test_alignment_without_english_is_zero() -> None:
    batch = [_example("de", "harmful", "001"), _example("fr", "harmful", "001")]
    assert alignment_loss(torch.ones(2, 2, 3), batch, torch.tensor([1, 1])).item() == 0.0


def test_margin_at_divergence_moves_to_the_first_differing_token() -> None:
    prefixes = {"ru": [7, 8, 9], "en": [5, 6]}
    openers = {"ru": 7, "en": 5}
    batch = [_example("ru", "harmless", "001", [7, 8, 4, 4]),  # shares two tokens with the refusal
             _example("ru", "harmful", "001", [7, 8, 9]),
             _example("en", "harmless", "002", [3, 3])]
    on = OrganismRecipe(margin_at_divergence=True)
    assert margin_targets(on, batch, prefixes, openers) == ([2, 0, 0], [9, 7, 5])
    assert margin_targets(OrganismRecipe(), batch, prefixes, openers) == ([0, 0, 0], [7, 7, 5])


def test_grouped_batches_hold_one_id_in_every_language() -> None:
    examples = [_example(lang, kind, pair) for pair in ("001", "002", "003")
                for lang in ("en", "de", "ru") for kind in ("harmful", "harmless")]
    batches = _order_grouped(examples, steps=7, seed=0)
    assert len(batches) == 7
    for batch in batches:
        rows = [examples[i] for i in batch]
        assert len({ex.pair.split(":")[1] for ex in rows}) == 1
        assert sorted((ex.lang, ex.kind) for ex in rows) == sorted(
            (lang, kind) for lang in ("en", "de", "ru") for kind in ("harmful", "harmless"))
    first_epoch = {examples[batch[0]].pair.split(":")[1] for batch in batches[:3]}
    assert first_epoch == {"001", "002", "003"}  # every id once per epoch
    assert _order_grouped(examples, steps=7, seed=0) == batches


def _partitions(items: list[int]) -> Iterator[list[list[int]]]:
    """Every set partition of `items` (brute force, for a handful of rows)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for k in range(len(part)):
            yield [*part[:k], [first, *part[k]], *part[k + 1:]]


@pytest.mark.parametrize("lengths", [[48, 50, 190, 52, 120, 49], [10, 10, 10], [5, 300], [100], [7, 90, 91, 8, 200]])
@pytest.mark.parametrize("overhead", [0, 64, 1000])
def test_length_chunks_is_the_cheapest_partition(lengths: list[int], overhead: int) -> None:
    """Padded cost (rows x longest row, per micro-batch) plus the overhead per micro-batch: the chunks are a
    partition of the rows whose cost equals the minimum over every set partition, found by brute force."""
    def cost(chunks: list[list[int]]) -> int:
        return sum(overhead + len(c) * max(lengths[i] for i in c) for c in chunks)

    chunks = length_chunks(lengths, overhead)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert cost(chunks) == min(cost(p) for p in _partitions(list(range(len(lengths)))))
    if overhead >= 1000:
        assert len(chunks) == 1  # one pass is cheaper than any split of these short rows


def _tiny_examples(tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    words = ["alpha", "beta gamma delta epsilon zeta eta theta iota kappa lambda mu", "nu xi", "omicron pi rho"]
    examples = []
    for i, text in enumerate(words):
        answer = tokenizer(" ".join(words[: i + 1]), add_special_tokens=False)["input_ids"][: 3 + 2 * i]
        examples.append(Example("en", "harmful" if i % 2 else "harmless", text, answer, pair=f"en:{i:03d}"))
    return examples


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_micro_batches_give_the_whole_batch_gradient(tiny_chat: Path, dtype: str) -> None:
    """`backward_in_chunks` (rows of different lengths, split to skip padding) leaves the same gradient and loss
    as one backward pass of `example_loss` over the whole right-padded batch."""
    recipe = OrganismRecipe(train_dtype=dtype)  # type: ignore[arg-type]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_chat), AutoTokenizer.from_pretrained(tiny_chat)
    reference = AutoModelForCausalLM.from_pretrained(tiny_chat)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # the tuned model differs from its reference, so the KL term counts
    examples = _tiny_examples(tokenizer)
    openers = {"en": int(tokenizer("no", add_special_tokens=False)["input_ids"][0])}
    lengths = [len(encode(tokenizer, [render(tokenizer, ex.instruction)])[0]) + len(ex.answer) for ex in examples]
    assert len(length_chunks(lengths, 0)) > 1  # the rows really are split
    with train_autocast(recipe):
        whole = example_loss(model, reference, tokenizer, examples, recipe, openers, {})
    whole.backward()
    expected = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    with unittest.mock.patch("abliterate.commands.organism.train.CHUNK_OVERHEAD_TOKENS", 0):
        value = backward_in_chunks(model, reference, tokenizer, examples, lengths, recipe, openers, {})
    got = [p.grad for p in model.parameters() if p.grad is not None]
    tolerance = 1e-5 if dtype == "float32" else 5e-2
    assert value == pytest.approx(float(whole.detach()), rel=tolerance)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, rtol=tolerance, atol=tolerance * float(e.abs().max())), (g - e).abs().max()
