"""The direction search against independent references: hand-computed means, constructed scores, closed forms,
a hand-built residual stream, and a tiny model with a planted refusal direction that the whole search must find.

Every expected value here is written out by hand or computed by a formula of its own, never by the code under
test, so that a sign flip, a swapped filter or a dropped cleaning step fails a test (tests/mutations.py plants
such bugs on a copy and checks that they do).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from tiny_models import build, build_planted

from abliterate.direction.candidates import make_candidates, remove_subspace, sink_basis
from abliterate.direction.search import find_direction, load
from abliterate.direction.selection import (
    CandidateScore,
    choose,
    eligible_layers,
    finalists,
    kl_divergence,
    refusal_score,
)
from abliterate.model.archs import lookup
from abliterate.model.hooks import activation_addition
from abliterate.settings import Settings

HIDDEN = 8

# --- candidates: difference in means, sink removal, projection off the harmless mean ------------------------


def _means() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """harmful, harmless [2 pos, 3 layers, 8] and a quiet sink [3, 8] whose difference d is known by hand."""
    gen = torch.Generator().manual_seed(0)
    harmless = torch.randn(2, 3, HIDDEN, generator=gen, dtype=torch.float64)
    d = torch.zeros(2, 3, HIDDEN, dtype=torch.float64)
    d[..., 0], d[..., 3] = 2.0, -1.0  # harmful = harmless + d: the candidate must point along +d
    sink = 0.5 * torch.ones(3, HIDDEN, dtype=torch.float64)  # no larger than an ordinary token: not massive
    return harmless + d, harmless, sink


def test_standard_candidates_are_harmful_minus_harmless() -> None:
    harmful, harmless, sink = _means()
    found = make_candidates(harmful, harmless, sink, "standard")
    expected = torch.tensor([2.0, 0, 0, -1.0, 0, 0, 0, 0])
    for p in range(2):
        for layer in range(3):
            assert torch.allclose(found.vectors[p, layer], expected, atol=1e-6), (p, layer)
    assert found.sink_layers == []
    assert found.vector(-1, 2) is not None and torch.allclose(found.vector(-2, 0), expected, atol=1e-6)


@pytest.mark.parametrize("method", ["projected", "norm-preserving"])
def test_projected_candidates_are_orthogonal_to_the_harmless_mean(method: str) -> None:
    harmful, harmless, sink = _means()
    found = make_candidates(harmful, harmless, sink, method)  # type: ignore[arg-type]
    d = torch.tensor([2.0, 0, 0, -1.0, 0, 0, 0, 0], dtype=torch.float64)
    for p in range(2):
        for layer in range(3):
            vec, mean = found.vectors[p, layer].double(), harmless[p, layer]
            assert abs(float(vec @ mean)) < 1e-5  # nothing left along the harmless mean
            removed = d - vec  # what was taken away lies along the harmless mean only
            cosine = float(removed @ mean) / (float(removed.norm()) * float(mean.norm()))
            assert abs(abs(cosine) - 1.0) < 1e-5, (p, layer)
            assert float(vec @ d) > 0  # still the harmful side


def test_massive_first_token_is_removed_from_that_layer_only() -> None:
    harmful, harmless, sink = _means()
    sink[1] = torch.tensor([0.0, 0, 0, 100.0, 0, 0, 1.0, 0], dtype=torch.float64)  # massive, mostly on axis 3
    found = make_candidates(harmful, harmless, sink, "standard")
    assert found.sink_layers == [1]
    for p in range(2):
        cleaned = found.vectors[p, 1]
        assert abs(float(cleaned[3])) < 1e-6  # the sink's big axis is gone from layer 1's candidates
        assert abs(float(cleaned.double() @ sink[1])) < 1e-4  # and so is the sink vector itself
        assert float(cleaned[0]) == pytest.approx(2.0)  # the rest of d is kept
        assert float(found.vectors[p, 0][3]) == pytest.approx(-1.0)  # other layers untouched
        assert float(found.vectors[p, 2][3]) == pytest.approx(-1.0)


def test_sink_basis_spans_the_sink_and_its_big_axes() -> None:
    quiet = torch.tensor([1.0, -1.0, 0.5, 0, 0, 0, 0, 0], dtype=torch.float64)
    assert sink_basis(quiet, token_norm=1.0) is None  # 1.5 < 8 x the token norm: not massive
    sink = torch.tensor([0.0, 50.0, 0, 0, 20.0, 0, 1.0, 0], dtype=torch.float64)  # 50 and 20 are big, 1 is not
    basis = sink_basis(sink, token_norm=1.0)
    assert basis is not None
    assert torch.allclose(basis @ basis.T, torch.eye(basis.shape[0], dtype=torch.float64), atol=1e-10)
    for axis in (1, 4):
        e = torch.zeros(HIDDEN, dtype=torch.float64)
        e[axis] = 1.0
        assert float(remove_subspace(e, basis).norm()) < 1e-10, axis  # big axes are in the subspace
    assert float(remove_subspace(sink, basis).norm()) < 1e-9
    e2 = torch.zeros(HIDDEN, dtype=torch.float64)
    e2[2] = 1.0
    assert torch.allclose(remove_subspace(e2, basis), e2)  # an unrelated axis is untouched


# --- scores: closed forms -----------------------------------------------------------------------------------


def test_refusal_score_is_the_log_odds_of_the_refusal_tokens() -> None:
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    scores = refusal_score(probs.log(), [0, 2])
    assert float(scores[0]) == pytest.approx(math.log(0.4 / 0.6))  # p(refusal) = 0.1 + 0.3
    assert float(scores[1]) == pytest.approx(math.log(0.8 / 0.2))  # p(refusal) = 0.7 + 0.1: positive
    shifted = refusal_score(probs.log() + 5.0, [0, 2])  # logits are defined up to a constant
    assert torch.allclose(shifted, scores)


def test_kl_divergence_is_base_to_edited() -> None:
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(p || q) = 0.5108...
    kl_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(q || p) = 0.3681...
    assert float(kl_divergence(p.log(), q.log())[0]) == pytest.approx(kl_pq)
    assert float(kl_divergence(q.log(), p.log())[0]) == pytest.approx(kl_qp)
    assert float(kl_divergence(p.log(), p.log() + 3.0)[0]) == pytest.approx(0.0, abs=1e-12)


# --- selection on constructed scores --------------------------------------------------------------------------


def _scored(layer: int, refusal: float, induce: float, kl: float) -> CandidateScore:
    return CandidateScore(pos=-1, layer=layer, refusal=refusal, induce=induce, kl=kl)


def test_choose_takes_the_lowest_refusal_among_kept() -> None:
    scores = [
        _scored(0, refusal=-5.0, induce=-1.0, kl=0.01),  # lowest refusal, but adding it does not induce refusal
        _scored(1, refusal=-3.0, induce=2.0, kl=0.01),  # the winner
        _scored(2, refusal=-1.0, induce=3.0, kl=0.01),  # kept, higher refusal
        _scored(3, refusal=-9.0, induce=5.0, kl=0.50),  # damages the model (KL)
        _scored(4, refusal=-8.0, induce=0.0, kl=0.01),  # induce exactly 0 is not > 0
        _scored(5, refusal=-7.0, induce=1.0, kl=0.10),  # KL exactly at the threshold is not below it
        CandidateScore(pos=-1, layer=6),  # screened out: never fully scored, never chosen
    ]
    best = choose(scores, kl_threshold=0.1)
    assert best.layer == 1
    assert [s.kept for s in scores] == [False, True, True, False, False, False, False]


def test_choose_falls_back_to_kl_safe_then_to_lowest_kl(caplog: pytest.LogCaptureFixture) -> None:
    no_induce = [_scored(0, -2.0, -1.0, 0.05), _scored(1, -4.0, -0.5, 0.02), _scored(2, -9.0, 1.0, 0.3)]
    with caplog.at_level(logging.WARNING):
        assert choose(no_induce, kl_threshold=0.1).layer == 1  # lowest refusal among KL < 0.1
    assert "KL-safe" in caplog.text and not any(s.kept for s in no_induce)
    caplog.clear()
    all_damaging = [_scored(0, -2.0, 1.0, 0.9), _scored(1, -4.0, 1.0, 0.5), _scored(2, -9.0, 1.0, 0.7)]
    with caplog.at_level(logging.WARNING):
        assert choose(all_damaging, kl_threshold=0.1).layer == 1  # lowest KL
    assert "lowest-KL" in caplog.text


def test_finalists_rank_plausible_kl_by_refusal_then_the_rest_by_kl() -> None:
    def screened(layer: int, refusal: float, kl: float) -> CandidateScore:
        return CandidateScore(pos=-1, layer=layer, screen_refusal=refusal, screen_kl=kl)

    scores = [
        screened(0, 1.0, 0.05),
        screened(1, -2.0, 0.15),  # plausible: KL below 2 x 0.1
        screened(2, -9.0, 0.20),  # KL exactly 2 x threshold: not plausible
        screened(3, -1.0, 0.01),
        screened(4, -8.0, 0.90),
        screened(5, 0.5, 0.30),
    ]
    chosen = finalists(scores, count=5, kl_threshold=0.1)
    assert [s.layer for s in chosen] == [1, 3, 0, 2, 5]
    assert [s.layer for s in finalists(scores, count=2, kl_threshold=0.1)] == [1, 3]


@pytest.mark.parametrize(
    ("n_layers", "prune", "expected"), [(10, 0.2, 8), (6, 0.2, 4), (3, 0.2, 2), (2, 0.6, 1), (1, 0.5, 1)]
)
def test_eligible_layers_prune_the_last_fraction(n_layers: int, prune: float, expected: int) -> None:
    assert eligible_layers(n_layers, prune) == list(range(expected))


# --- activation addition against a hand-built residual --------------------------------------------------------


def test_activation_addition_adds_the_vector_at_the_layer_input(tmp_path: Path) -> None:
    model = build("llama", tmp_path / "m", tied=False, extra={"mlp_bias": True})
    arch = lookup("llama")
    vector = torch.randn(32, generator=torch.Generator().manual_seed(5))
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(6))
    # Reference for layer 0: the same vector added to every token's embedding.
    reference = build("llama", tmp_path / "r0", tied=False, extra={"mlp_bias": True})
    # Reference for layer 2: the residual entering layer 2 is layer 1's output, whose last write is its MLP's.
    reference2 = build("llama", tmp_path / "r2", tied=False, extra={"mlp_bias": True})
    with torch.no_grad():
        reference.model.embed_tokens.weight += vector
        reference2.model.layers[1].mlp.down_proj.bias += vector
        with activation_addition(model, arch, 0, vector):
            added0 = model(ids).logits
        with activation_addition(model, arch, 2, vector):
            added2 = model(ids).logits
        plain = model(ids).logits  # the hook is gone once the context closes
        assert torch.allclose(added0, reference(ids).logits, atol=1e-5)
        assert torch.allclose(added2, reference2(ids).logits, atol=1e-5)
        again = build("llama", tmp_path / "again", tied=False, extra={"mlp_bias": True})
        assert torch.allclose(plain, again(ids).logits)
        assert float((added2 - plain).abs().max()) > 1e-2


# --- the whole search on a tiny model with a planted refusal direction -----------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, int, Path]:
    folder = tmp_path_factory.mktemp("planted")
    model_dir, d, layer, prompts = build_planted(folder)
    return model_dir, d, layer, prompts


def _search(planted: tuple[Path, torch.Tensor, int, Path], **values: object) -> tuple[object, dict[str, object]]:
    model_dir, _d, _layer, prompts = planted
    settings = Settings(
        model=str(model_dir), prompts=str(prompts), n_train=24, n_val=12, screen_prompts=4, finalists=4,
        batch_size=8, refusal_tokens=["Sorry"], eval=False, **values,  # type: ignore[arg-type]
    )
    result = find_direction(settings, load(settings))
    return result, result.report().to_data()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Signed cosine; 0 for a zero vector (layer 0: the template tokens have equal embeddings in both sets)."""
    norms = float(a.double().norm()) * float(b.double().norm())
    return float(a.double() @ b.double()) / norms if norms > 0 else 0.0


def test_search_recovers_the_planted_direction_at_the_planted_layer(
    planted: tuple[Path, torch.Tensor, int, Path],
) -> None:
    _model_dir, d, layer, _prompts = planted
    result, report = _search(planted)
    chosen = result.direction  # type: ignore[attr-defined]
    assert chosen.layer == layer, report["chosen"]
    assert _cosine(chosen.vector, d) > 0.9  # signed: the direction points to refusal, not away from it
    chosen_row = report["chosen"]
    assert chosen_row["kept"] and chosen_row["induce"] > 0 and chosen_row["refusal"] < 0  # type: ignore[index]
    candidates = result.candidates  # type: ignore[attr-defined]
    for p in candidates.positions():
        for earlier in range(layer):  # before the planted layer the residual carries no d
            assert abs(_cosine(candidates.vector(p, earlier), d)) < 0.5, (p, earlier)
    # Filtering kept the harmful prompts the planted model refuses and the harmless ones it answers: all of them.
    assert report["prompts_after_filter"] == {  # type: ignore[comparison-overlap]
        "harmful_train": 24, "harmless_train": 24, "harmful_val": 12, "harmless_val": 12
    }


def test_planted_model_refuses_harmful_prompts_only(planted: tuple[Path, torch.Tensor, int, Path]) -> None:
    """The fixture itself: without an edit the planted model starts harmful answers with "Sorry", and not others."""
    from abliterate.direction.selection import collect_logits
    from abliterate.model.forward import make_batches

    model_dir, _d, _layer, prompts = planted
    settings = Settings(model=str(model_dir), prompts=str(prompts), eval=False)
    loaded = load(settings)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    sorry = loaded.tokenizer.convert_tokens_to_ids("Sorry")
    for kind, refuses in (("harmful", True), ("harmless", False)):
        texts = [r["instruction"] for r in rows if r["kind"] == kind][:16]
        logits = collect_logits(loaded.model, make_batches(loaded.tokenizer, texts, 8))
        assert bool((logits.argmax(dim=-1) == sorry).all()) == refuses, kind
        assert bool((logits.argmax(dim=-1) != sorry).all()) == (not refuses), kind
