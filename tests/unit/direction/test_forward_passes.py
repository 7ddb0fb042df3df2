"""Forward passes of the direction search on tiny models: activation capture, grouped screening, pass counts and
--batch-size auto."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_models import build, save_tokenizer

from abliterate.direction.candidates import Candidates, mean_activations
from abliterate.direction.search import (
    LoadedModel,
    PromptSplits,
    candidate_grid,
    compute_candidates,
    find_direction,
    load,
    load_prompts,
    longest_prompt,
    resolve_batch_size,
    screen_candidates,
    screening_set,
)
from abliterate.direction.selection import collect_logits, screen_groups
from abliterate.model import batching
from abliterate.model.chat import post_instruction_length
from abliterate.model.forward import first_token_index, make_batches
from abliterate.model.hooks import count_forwards, directional_ablation, grouped_directional_ablation
from abliterate.settings import Settings

TEXTS = [
    "how to make a list",
    "explain the a",
    "write",
    "give the list of how to describe and explain a help",
    "describe a",
]


def _settings(model: Path, **values: object) -> Settings:
    base: dict[str, object] = dict(
        n_train=8, n_val=4, screen_prompts=2, finalists=2, batch_size=4, refusal_tokens=["I", "Sorry"], eval=False
    )
    return Settings(model=str(model), **{**base, **values})


@pytest.fixture(scope="module")
def loaded(tiny_chat: Path) -> LoadedModel:
    return load(_settings(tiny_chat))


def test_captured_means_are_the_hidden_states_at_the_read_positions(loaded: LoadedModel) -> None:
    n_pos = post_instruction_length(loaded.tokenizer)
    harmful, sink = mean_activations(loaded.model, loaded.tokenizer, loaded.arch, TEXTS, n_pos, 2, "test")
    tails, firsts = [], []
    with torch.no_grad():
        for _indices, batch in make_batches(loaded.tokenizer, TEXTS, 2):
            states = loaded.model(**batch, output_hidden_states=True).hidden_states[:-1]  # inputs of each layer
            rows = torch.arange(batch["input_ids"].shape[0])
            tails += [torch.stack([h[row, -n_pos:] for h in states], dim=1) for row in rows]
            firsts += [torch.stack([h[row, first_token_index(batch)[row]] for h in states]) for row in rows]
    assert harmful.shape == (n_pos, loaded.n_layers, loaded.model.config.hidden_size)
    assert torch.allclose(harmful, torch.stack(tails).double().mean(0), atol=1e-5)
    assert torch.allclose(sink, torch.stack(firsts).double().mean(0), atol=1e-5)


def test_winsorized_means_clamp_each_prompts_vectors_to_their_quantile(loaded: LoadedModel) -> None:
    """--winsorize q: each read vector clamped to +-(the q-quantile of its absolute entries) before the mean
    (reference: numpy's inverted-CDF quantile); the first-token means, which the sink cleaning reads, unclamped."""
    import numpy as np

    n_pos, q = post_instruction_length(loaded.tokenizer), 0.9
    clamped, sink = mean_activations(loaded.model, loaded.tokenizer, loaded.arch, TEXTS, n_pos, 2, "test", q)
    _, plain_sink = mean_activations(loaded.model, loaded.tokenizer, loaded.arch, TEXTS, n_pos, 2, "test")
    expected = []
    with torch.no_grad():
        for _indices, batch in make_batches(loaded.tokenizer, TEXTS, 2):
            states = loaded.model(**batch, output_hidden_states=True).hidden_states[:-1]
            for row in range(batch["input_ids"].shape[0]):
                for h in states:
                    for vector in h[row, -n_pos:].numpy():
                        bound = np.quantile(np.abs(vector), q, method="inverted_cdf")
                        expected.append(np.clip(vector, -bound, bound))
    reference = torch.tensor(np.array(expected), dtype=torch.float64)
    reference = reference.reshape(len(TEXTS), loaded.n_layers, n_pos, -1).mean(0).transpose(0, 1)
    assert torch.allclose(clamped, reference, atol=1e-5)
    assert torch.allclose(sink, plain_sink)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2_moe"])
def test_grouped_ablation_equals_one_direction_at_a_time(family: str, tmp_path: Path) -> None:
    build(family, tmp_path / family)
    save_tokenizer(tmp_path / family)
    one = load(_settings(tmp_path / family))
    directions = torch.randn(3, one.model.config.hidden_size)
    [(indices, batch)] = make_batches(one.tokenizer, TEXTS, len(TEXTS))
    alone = []
    with torch.inference_mode():
        for direction in directions:
            with directional_ablation(one.model, one.arch, direction):
                alone.append(one.model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1])
        repeated = {k: v.repeat(3, 1) for k, v in batch.items()}
        with grouped_directional_ablation(one.model, one.arch, directions, len(indices)):
            grouped = one.model(**repeated, use_cache=False, logits_to_keep=1).logits[:, -1]
    assert torch.allclose(grouped, torch.cat(alone), atol=1e-4)
    with pytest.raises(ValueError, match="15 rows"), grouped_directional_ablation(one.model, one.arch, directions,
                                                                                   len(indices)):
        one.model(**batch, use_cache=False, logits_to_keep=1)
    assert not any(m._forward_hooks for m in one.model.modules())  # removed after an error too


def _search_inputs(loaded: LoadedModel, settings: Settings) -> tuple[PromptSplits, Candidates]:
    splits = load_prompts(settings)
    n_pos = post_instruction_length(loaded.tokenizer)
    return splits, compute_candidates(loaded, splits, n_pos, settings)


def test_grouped_screening_scores_equal_one_by_one_with_fewer_passes(loaded: LoadedModel, tiny_chat: Path) -> None:
    settings = _settings(tiny_chat, batch_size=16, screen_prompts=3, finalists=1)
    splits, candidates = _search_inputs(loaded, settings)
    grids = {}
    passes = {}
    for grouped in (True, False):
        grids[grouped] = candidate_grid(loaded, candidates, settings)
        with count_forwards(loaded.model) as passes[grouped]:
            screen_candidates(loaded, candidates, grids[grouped], splits, [4, 5], settings, grouped=grouped)
    n = len(grids[True])
    assert passes[False].calls == 1 + n  # the unedited pass, then one per candidate
    assert 1 < passes[True].calls < passes[False].calls
    assert passes[True].rows == passes[False].rows == 6 * (1 + n)
    for a, b in zip(grids[True], grids[False], strict=True):
        assert (a.pos, a.layer) == (b.pos, b.layer)
        for value, other in ((a.screen_refusal, b.screen_refusal), (a.screen_kl, b.screen_kl)):
            assert (math.isnan(value) and math.isnan(other)) or abs(value - other) < 1e-4


def _batches(n: int, size: int) -> int:
    return math.ceil(n / size)


def test_forward_pass_counts_match_the_settings(loaded: LoadedModel, tiny_chat: Path) -> None:
    settings = _settings(tiny_chat, n_train=7, n_val=5, batch_size=3, screen_prompts=2, finalists=2)
    result = find_direction(settings, loaded)
    report = result.report()
    kept, bs = report.prompts_after_filter, 3
    n_candidates = len(result.scores)
    assert result.splits is not None and n_candidates > settings.finalists
    screen = screening_set(loaded, result.splits, settings.screen_prompts)
    per_pass = screen_groups(bs * longest_prompt(loaded.tokenizer, result.splits), screen.tokens, n_candidates)
    expected = {
        "filter": 2 * _batches(7, bs) + 2 * _batches(5, bs),
        "activations": _batches(kept["harmful_train"], bs) + _batches(kept["harmless_train"], bs),
        "screening": 1 + _batches(n_candidates, per_pass),
        "finalists": _batches(kept["harmless_val"], bs)
        + 2 * (_batches(kept["harmful_val"], bs) + 2 * _batches(kept["harmless_val"], bs)),
    }
    assert report.forward_passes == {**expected, "total": sum(expected.values())}
    rows = report.forward_rows
    assert rows["filter"] == 2 * 7 + 2 * 5
    assert rows["activations"] == kept["harmful_train"] + kept["harmless_train"]
    assert rows["screening"] == 4 * (1 + n_candidates)
    assert report.batch_size == 3
    assert not loaded.model._forward_pre_hooks  # the counters are removed


def test_count_forwards_counts_calls_and_rows(loaded: LoadedModel) -> None:
    batches = make_batches(loaded.tokenizer, TEXTS, 2)
    with count_forwards(loaded.model) as count:
        collect_logits(loaded.model, batches)
    assert (count.calls, count.rows) == (3, 5)
    collect_logits(loaded.model, batches)
    assert (count.calls, count.rows) == (3, 5)  # nothing counted after the context


def test_sizes_and_the_two_searches() -> None:
    assert batching.sizes_to_try(256, 1000) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert batching.sizes_to_try(256, 100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert batching.sizes_to_try(64, 1) == [1]
    assert batching.largest_fitting([1, 2, 4, 8, 16], lambda size: size <= 5) == 4
    assert batching.largest_fitting([1, 2, 4], lambda size: False) is None
    # CPU-like curve: per-prompt time falls, flattens after 8; growing stops at the first size without a 5% gain
    curve = {1: 10.0, 2: 6.0, 4: 4.0, 8: 3.5, 16: 3.45, 32: 1.0}
    assert batching.fastest(list(curve), curve.__getitem__) == 8



def test_screening_groups_fill_the_token_budget_evenly() -> None:
    assert screen_groups(token_budget=1000, screen_tokens=100, n_candidates=25) == 9  # 3 passes of 9, 9, 7
    assert screen_groups(token_budget=50, screen_tokens=100, n_candidates=5) == 1  # never less than one
    assert screen_groups(token_budget=10**6, screen_tokens=10, n_candidates=4) == 4  # never more than all


def test_auto_batch_size_resolves_to_a_tried_size(loaded: LoadedModel, tiny_chat: Path) -> None:
    settings = resolve_batch_size(_settings(tiny_chat, batch_size="auto", n_train=6, n_val=3), loaded)
    assert isinstance(settings.batch_size, int)
    assert settings.batch_size in batching.sizes_to_try(batching.CPU_MAX, 6)
    assert resolve_batch_size(settings, loaded) is settings  # a number stays as it is
    with pytest.raises(Exception, match="not resolved"):
        batching.fixed_batch_size("auto")
