"""Greedy generation that drops finished rows gives exactly `model.generate`'s tokens, on every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, build
from transformers import GenerationConfig

from abliterate.evaluation.generate import _generate_rows, continuous_rows, greedy_rows

PROMPT_LENGTHS = [5, 9, 12, 7, 10, 3]
NEW_TOKENS = 16


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of different lengths, left-padded with 0."""
    generator = torch.Generator().manual_seed(0)
    width = max(PROMPT_LENGTHS)
    ids = torch.zeros(len(PROMPT_LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        ids[row, width - length :] = torch.randint(8, vocab, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def _until_stop(row: list[int], stops: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stops:
            return row[: i + 1]
    return row


CACHE_KEEPS_ROWS = {"granitemoehybrid", "qwen3_5", "qwen3_5_moe", "qwen3_next"}  # linear-attention / Mamba layers


def _check_generate_fallback(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Without row dropping, the answers are `model.generate`'s own (cut at the stop tokens)."""
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[5], pad_token_id=0)
    reference = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    rows = _generate_rows(model, {"input_ids": ids, "attention_mask": mask}, config, [5])
    assert [_until_stop(row, {5}) for row in rows] == [
        _until_stop(row, {5}) for row in reference[:, ids.shape[1] :].tolist()
    ]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_leave_the_batch_and_tokens_match_generate(family: str, tmp_path: Path) -> None:
    model = build(family, tmp_path / family, tied=False).eval()
    ids, mask = _batch(model.config.get_text_config().vocab_size)  # multimodal configs nest it
    with torch.inference_mode():
        free = greedy_rows(model, ids, mask, NEW_TOKENS, [-1])  # no stop: every row runs to the end
        if free is None:  # a hybrid cache (linear attention, Mamba) cannot drop rows: `generate` does the work
            assert family in CACHE_KEEPS_ROWS, family
            _check_generate_fallback(model, ids, mask)
            return
        assert family not in CACHE_KEEPS_ROWS and all(len(row) == NEW_TOKENS for row in free)
        # Stop tokens that end rows 0, 1 and 2 at different steps, so rows leave while others go on.
        stops = sorted({free[0][2], free[1][7], free[2][12]})
        ours = greedy_rows(model, ids, mask, NEW_TOKENS, stops)
        config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stops, pad_token_id=0)
        reference = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert ours is not None
    expected = [_until_stop(row, set(stops)) for row in reference[:, ids.shape[1] :].tolist()]
    assert [_until_stop(row, set(stops)) for row in ours] == expected
    assert len({len(row) for row in ours}) > 1, "some rows must have ended before others"
    assert all(len(row) == NEW_TOKENS or row[-1] in stops for row in ours)


MERGE_CANNOT = CACHE_KEEPS_ROWS | {  # sliding-window or hybrid caches
    "mistral", "gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4", "mistral3", "olmo3", "gpt_oss", "llama4",
    "qwen3_5", "qwen3_5_moe",
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_continuous_batching_gives_each_prompt_its_own_generate_tokens(family: str, tmp_path: Path) -> None:
    """Slots of finished answers are refilled from the queue (4 slots, 9 prompts, answers ending at different
    steps); every answer equals `model.generate` on its prompt alone, unpadded."""
    model = build(family, tmp_path / family, tied=False).eval()
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(8, vocab, (length,), generator=generator).tolist() for length in [3, 4, 4, 6, 7, 9, 9,
                                                                                               11, 12]]
    with torch.inference_mode():
        alone = [model.generate(input_ids=torch.tensor([p]), generation_config=GenerationConfig(
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[-1], pad_token_id=0))[0, len(p):].tolist()
            for p in prompts]
        stops = sorted({alone[0][2], alone[3][6], alone[5][10]})  # answers end early, late, and at the cap
        rows = continuous_rows(model, prompts, NEW_TOKENS, stops, 4, 0)
        if rows is None:
            assert family in MERGE_CANNOT, family
            return
        assert family not in MERGE_CANNOT, family
        answers = dict(rows)
        every_first = sorted({row[0] for row in alone[:4]})  # the whole first batch ends on its first token
        all_at_once = dict(continuous_rows(model, prompts, NEW_TOKENS, every_first, 4, 0) or [])
    assert sorted(answers) == list(range(len(prompts)))
    expected = [_until_stop(row, set(stops)) for row in alone]
    assert [answers[i] for i in range(len(prompts))] == expected
    assert len({len(row) for row in expected}) > 2, "answers must end at different steps"
    assert [all_at_once[i] for i in range(len(prompts))] == [_until_stop(row, set(every_first)) for row in alone]


def test_a_long_queue_keeps_the_kv_cache_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Columns that every remaining row masks (the padding of rows that left) are dropped: the cache never
    grows past the longest prompt plus the answer cap, however long the queue (untrimmed it grew with it)."""
    from abliterate.evaluation import generate as module

    model = build("llama", tmp_path / "llama", tied=False).eval()
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(8, vocab, (3 + i % 5,), generator=generator).tolist() for i in range(40)]
    widths: list[int] = []
    step = module._step

    def recorded(model: torch.nn.Module, slots: module._Slots, tokens: torch.Tensor) -> torch.Tensor:
        widths.append(int(slots.mask.shape[1]))
        return step(model, slots, tokens)

    monkeypatch.setattr(module, "_step", recorded)
    with torch.inference_mode():
        first = [continuous_rows(model, [p], 12, [-1], 1, 0) for p in prompts[:1]]
        stop = next(iter(first[0] or []))[1][3]  # a token that ends some answers early
        answers = dict(continuous_rows(model, prompts, 12, [stop], 4, 0) or [])
    assert sorted(answers) == list(range(len(prompts))) and len(widths) > 40
    assert max(widths) <= max(len(p) for p in prompts) + 12
