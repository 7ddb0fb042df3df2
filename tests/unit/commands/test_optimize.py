"""`abliterate optimize` on tiny random models: weighted hooks and weighted checkpoints agree, hooks come off,
the study resumes without repeating trials, and `--pick` writes a loadable checkpoint with its weights.

Tiny random models refuse nothing, so these tests check the mechanics, not that refusal goes down.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import torch
from helpers import assert_one_line_error, run
from tiny_models import build
from transformers import AutoModelForCausalLM

from abliterate.commands.optimize.pareto import Profile, TrialRow, pareto_front
from abliterate.commands.optimize.space import SearchSpace, TrialParams, WeightProfile, WindowKernel
from abliterate.commands.optimize.study import (
    STUDY_DB,
    STUDY_NAME,
    LayerDirections,
    default_study,
    prepare_study,
)
from abliterate.direction.vector import Direction
from abliterate.edit.formats import OutputOptions
from abliterate.edit.in_memory import edited_weights
from abliterate.errors import UsageError
from abliterate.model.ablation import AblationWeights
from abliterate.model.archs import lookup
from abliterate.model.checkpoint import Checkpoint
from abliterate.model.hooks import directional_ablation, weighted_ablation
from abliterate.publish.write_edited import write_edited

HIDDEN, LAYERS = 32, 3
FAST = [
    "--langs", "en,de", "--n-train", "8", "--n-val", "4", "--screen-prompts", "2", "--finalists", "2",
    "--batch-size", "8", "--refusal-tokens", "I", "--trial-prompts", "2", "--kl-prompts", "2",
    "--trial-max-new-tokens", "4", "--no-plots",
]  # fmt: skip


def _unit(seed: int) -> torch.Tensor:
    r = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


def _weights(seed: int) -> AblationWeights:
    w = (torch.rand(1 + 2 * LAYERS, generator=torch.Generator().manual_seed(seed)) * 1.5).tolist()
    return AblationWeights(w[0], tuple(w[1 : 1 + LAYERS]), tuple(w[1 + LAYERS :]))


def _ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))


# --- weighted hooks and the weighted streaming edit ---------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "tied"), [("llama", True), ("llama", False), ("qwen2", False), ("phi3", False), ("qwen2_moe", True)]
)
def test_weighted_hooks_equal_weighted_checkpoint(tmp_path: Path, family: str, tied: bool) -> None:
    model = build(family, tmp_path / "source", tied=tied)
    r, weights = _unit(1), _weights(3)
    write_edited(tmp_path / "out", tmp_path / "source", Direction(r, weights=weights),
                 OutputOptions(max_shard_size=40_000))
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        with weighted_ablation(model, lookup(family), r, weights):
            hooked = model(_ids()).logits
        original = model(_ids()).logits
        result = edited(_ids()).logits
    assert float((result - hooked).abs().max()) < 1e-4
    assert float((result - original).abs().max()) > 1e-3


@pytest.mark.parametrize(
    ("family", "tied", "method"),
    [("llama", True, "standard"), ("llama", False, "norm-preserving"), ("qwen2", False, "norm-preserving"),
     ("qwen2_moe", True, "norm-preserving"), ("gemma2", None, "standard"), ("gemma3_text", None, "norm-preserving"),
     ("phi3", False, "standard"), ("mixtral", None, "norm-preserving"), ("gpt_oss", None, "norm-preserving"),
     ("deepseek_v3", None, "standard"), ("llama4", None, "norm-preserving"), ("qwen3_5_moe", None, "standard"),
     ("gemma3", None, "standard"), ("gemma4_text", None, "norm-preserving"), ("olmo2", None, "standard"),
     ("granitemoehybrid", None, "norm-preserving"), ("qwen3_next", None, "standard")],
)
def test_weights_edited_in_memory_equal_the_written_checkpoint(
    tmp_path: Path, family: str, tied: bool | None, method: str
) -> None:
    """`--trial-edit weights` measures exactly what --pick writes, post-norm families and norm-preserving included;
    the loaded model is bit-identical afterwards, also after an error inside the block."""
    model = build(family, tmp_path / "source", tied=tied)
    r, weights = _unit(1), _weights(3)
    write_edited(tmp_path / "out", tmp_path / "source", Direction(r, weights=weights, method=method),
                 OutputOptions(max_shard_size=40_000))
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    arch = lookup(family)
    with torch.no_grad():
        before = model(_ids()).logits
        with edited_weights(model, arch, r, weights, norm_preserving=method == "norm-preserving"):
            in_memory = model(_ids()).logits
        assert torch.equal(model(_ids()).logits, before)
        with pytest.raises(RuntimeError), edited_weights(model, arch, r, weights):
            raise RuntimeError("trial failed")
        assert torch.equal(model(_ids()).logits, before)
        expected = written(_ids()).logits
    assert float((in_memory - expected).abs().max()) < 1e-4
    assert float((expected - before).abs().max()) > 1e-3


def _per_layer(seed: int) -> torch.Tensor:
    rows = torch.randn(LAYERS, HIDDEN, generator=torch.Generator().manual_seed(seed))
    return rows / rows.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize(("family", "method"), [("llama", "standard"), ("qwen2_moe", "norm-preserving"),
                                                ("gemma2", "standard")])
def test_per_layer_directions_in_trials_equal_the_written_checkpoint(tmp_path: Path, family: str, method: str) -> None:
    """Direction scope "per layer": layer l's writers use row l. The written checkpoint (and its direction file,
    read back by `verify`) agrees with the in-memory edit and, without post-norms or rescaling, with the hooks."""
    model = build(family, tmp_path / "source", tied=True if family == "llama" else None)
    r, rows, weights = _unit(1), _per_layer(7), _weights(3)
    direction = Direction(r, weights=weights, method=method, per_layer=rows)
    write_edited(tmp_path / "out", tmp_path / "source", direction, OutputOptions(max_shard_size=40_000))
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    loaded = Direction.load(tmp_path / "out")
    assert loaded.per_layer is not None and torch.allclose(loaded.per_layer, rows)
    arch = lookup(family)
    with torch.no_grad():
        expected = written(_ids()).logits
        with edited_weights(model, arch, r, weights, norm_preserving=method == "norm-preserving", per_layer=rows):
            in_memory = model(_ids()).logits
        with weighted_ablation(model, arch, r, weights, rows):
            hooked = model(_ids()).logits
        with weighted_ablation(model, arch, r, weights):  # one direction everywhere: a different edit
            global_only = model(_ids()).logits
    assert float((in_memory - expected).abs().max()) < 1e-4
    assert float((global_only - expected).abs().max()) > 1e-3
    if family == "llama" and method == "standard":
        assert float((hooked - expected).abs().max()) < 1e-4
    full = Direction(r, method=method, per_layer=rows)  # weight 1 everywhere: verify checks every tensor per layer
    write_edited(tmp_path / "full", tmp_path / "source", full, OutputOptions(max_shard_size=40_000))
    run("verify", tmp_path / "full", check=True)


def test_per_layer_directions_are_refused_for_gguf_and_adapters(tmp_path: Path) -> None:
    build("llama", tmp_path / "source")
    direction = Direction(_unit(1), per_layer=_per_layer(7))
    with pytest.raises(UsageError, match="per-layer"):
        write_edited(tmp_path / "out", tmp_path / "source", direction, OutputOptions(format="adapter"))
    assert not (tmp_path / "out").exists()


def test_layer_vectors_are_the_candidates_each_layer_writes_into() -> None:
    vectors = torch.stack([torch.zeros(HIDDEN), 3 * _unit(1), 0.5 * _unit(2), torch.zeros(HIDDEN)])
    dirs = LayerDirections(vectors, -1, 2, "en", "projected", "m")
    rows = dirs.layer_vectors()
    assert torch.allclose(rows[0], _unit(1)) and torch.allclose(rows[1], _unit(2))
    assert torch.allclose(rows[2], _unit(2)) and torch.allclose(rows[3], _unit(2))  # zero: the default layer's


def test_weight_one_everywhere_is_exactly_the_plain_edit(tmp_path: Path) -> None:
    model = build("llama", tmp_path / "source", tied=True)
    r = _unit(1)
    ones = AblationWeights(1.0, (1.0,) * LAYERS, (1.0,) * LAYERS)
    write_edited(tmp_path / "plain", tmp_path / "source", Direction(r), OutputOptions(max_shard_size=40_000))
    write_edited(tmp_path / "ones", tmp_path / "source", Direction(r, weights=ones),
                 OutputOptions(max_shard_size=40_000))
    shards = sorted(p.name for p in (tmp_path / "plain").glob("model-*.safetensors"))
    assert shards
    for name in shards:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "ones" / name).read_bytes()
    arch = lookup("llama")
    with torch.no_grad():
        with directional_ablation(model, arch, r):
            plain = model(_ids()).logits
        with weighted_ablation(model, arch, r, ones):
            weighted = model(_ids()).logits
    assert torch.equal(plain, weighted)


def test_post_norm_partial_edit_interpolates_to_the_full_edit(tmp_path: Path) -> None:
    build("gemma2", tmp_path / "source")
    r = _unit(1)
    full = AblationWeights(1.0, (1.0,) * LAYERS, (1.0,) * LAYERS)
    half = AblationWeights(0.5, (0.5,) * LAYERS, (0.5,) * LAYERS)
    write_edited(tmp_path / "full", tmp_path / "source", Direction(r, weights=full),
                 OutputOptions(max_shard_size=40_000))
    write_edited(tmp_path / "half", tmp_path / "source", Direction(r, weights=half),
                 OutputOptions(max_shard_size=40_000))
    name = "model.layers.1.self_attn.o_proj.weight"
    source, w_full, w_half = (Checkpoint.open(tmp_path / f).get(name) for f in ("source", "full", "half"))
    assert torch.allclose(w_half, (source + w_full) / 2, atol=1e-6)  # W - w u u^T W is linear in w


def test_hooks_are_removed_after_a_trial_even_on_error(tmp_path: Path) -> None:
    model = build("llama", tmp_path / "source")
    arch = lookup("llama")
    with torch.no_grad():
        before = model(_ids()).logits
        with weighted_ablation(model, arch, _unit(1), _weights(3)):
            assert not torch.equal(model(_ids()).logits, before)
        assert torch.equal(model(_ids()).logits, before)
        with pytest.raises(RuntimeError), weighted_ablation(model, arch, _unit(1), _weights(3)):
            raise RuntimeError("trial failed")
        assert torch.equal(model(_ids()).logits, before)


def test_zero_weights_register_no_hook(tmp_path: Path) -> None:
    model = build("llama", tmp_path / "source")
    zeros = AblationWeights(0.0, (0.0,) * LAYERS, (0.0,) * LAYERS)
    with torch.no_grad():
        before = model(_ids()).logits
        with weighted_ablation(model, lookup("llama"), _unit(1), zeros):
            assert torch.equal(model(_ids()).logits, before)


def test_direction_file_keeps_the_weights(tmp_path: Path) -> None:
    weights = _weights(5)
    path = Direction(_unit(1), layer=2, weights=weights).save(tmp_path / "d.safetensors")
    loaded = Direction.load(path)
    assert loaded.weights == weights and loaded.extra == {}
    assert Direction.load(Direction(_unit(1)).save(tmp_path / "plain.safetensors")).weights is None


# --- the search space ------------------------------------------------------------------------------------------


def test_fractional_layer_interpolates_neighbouring_directions() -> None:
    vectors = torch.stack([torch.zeros(HIDDEN), 3 * _unit(1), 0.5 * _unit(2)])
    dirs = LayerDirections(vectors, -1, 1, "en", "projected", "m")
    assert torch.allclose(dirs.at(1.0), _unit(1))
    assert torch.allclose(dirs.at(2.0), _unit(2))
    middle = dirs.at(1.5)
    assert math.isclose(float(middle.norm()), 1.0, rel_tol=1e-6)
    expected = (_unit(1) + _unit(2)) / (_unit(1) + _unit(2)).norm()  # each neighbour normalised first
    assert torch.allclose(middle, expected, atol=1e-6)


@pytest.mark.parametrize("kernel", ["window", "gaussian"])
def test_reference_trial_is_weight_one_everywhere(kernel: str) -> None:
    params = TrialParams.from_params(TrialParams.reference(7, SearchSpace(12, 1, 9, kernel)))  # type: ignore[arg-type]
    weights = params.weights(12)
    assert params.layer == 7.0 and weights.is_full()


def test_gaussian_kernel_falls_off_from_its_peak() -> None:
    peaked = WeightProfile(peak=0.8, pos=4.0, falloff=6.0)
    assert peaked.weight(4.0, 12) == 0.8
    assert peaked.weight(0.0, 12) < peaked.weight(3.0, 12) < 0.8  # falls off with distance from the peak
    assert math.isinf(WeightProfile(1.0, 0.0, 0.0).profile(12).width)


def test_window_kernel_is_linear_inside_and_exactly_zero_outside() -> None:
    window = WindowKernel(peak=1.2, pos=10.0, floor=0.25, reach=4.0)
    assert window.weight(10.0, 30) == 1.2
    assert window.weight(12.0, 30) == pytest.approx(1.2 * (1 - 0.75 * 0.5))  # halfway to the edge
    assert window.weight(14.0, 30) == pytest.approx(0.3) and window.weight(6.0, 30) == pytest.approx(0.3)
    assert window.weight(14.5, 30) == 0.0 and window.weight(0.0, 30) == 0.0
    off = WindowKernel(peak=-0.1, pos=10.0, floor=1.0, reach=30.0)  # sampled below 0: the component is left alone
    assert all(off.weight(layer, 30) == 0.0 for layer in range(30)) and off.profile(30).label() == "off"
    params = TrialParams(12.0, window, off, embed=-0.2)
    weights = params.weights(30)
    assert weights.embedding == 0.0 and set(weights.mlp) == {0.0} and weights.attention[10] == 1.2


def test_pareto_front_keeps_only_undominated_trials() -> None:
    flat = Profile(1.0, 0.0, math.inf)

    def row(number: int, refusal: float, kl: float) -> TrialRow:
        return TrialRow(number, refusal, kl, 1.0, flat, flat, 1.0, reference=number == 0)

    rows = [row(0, 0.5, 0.1), row(1, 0.4, 0.1), row(2, 0.6, 0.01), row(3, 0.7, 0.2), row(4, 0.4, 0.1)]
    assert [r.number for r in pareto_front(rows)] == [1, 4, 2]
    assert rows[1].dominates(rows[0]) and not rows[1].dominates(rows[4])
    over = TrialRow(5, 0.0, 0.001, 1.0, flat, flat, 1.0, feasible=False)  # beats all, but over-refuses
    assert [r.number for r in pareto_front([*rows, over])] == [1, 4, 2]


def test_interrupted_trials_are_failed_and_the_reference_requeued() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    space = SearchSpace(4, 1, 3, "window")
    prepare_study(study, default_layer=2, space=space)
    interrupted = study.ask()  # the enqueued reference, left running by a killed process
    assert interrupted.user_attrs.get("reference")
    prepare_study(study, default_layer=2, space=space)
    states = [t.state for t in study.trials]
    waiting = optuna.trial.TrialState.WAITING
    assert states == [optuna.trial.TrialState.FAIL, waiting, waiting]  # the per-layer twin waits, not queued twice
    assert [t.user_attrs for t in study.trials[1:]] == [{"anchor": "per layer"}, {"reference": True}]
    assert study.trials[2].params == {}


def test_default_study_folder_is_named_after_the_model() -> None:
    assert default_study("HuggingFaceTB/SmolLM2-135M-Instruct") == Path("optimize-SmolLM2-135M-Instruct")
    assert default_study("/models/llama 3/") == Path("optimize-llama-3")


# --- the command -----------------------------------------------------------------------------------------------


def _trials(study: Path) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{study / STUDY_DB}"
    return optuna.load_study(study_name=STUDY_NAME, storage=storage).get_trials()


def test_study_resumes_and_pick_writes_a_checkpoint(tiny_chat: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    first = run("optimize", tiny_chat, "--trials", "2", "--study", study, *FAST, check=True)
    assert "reference (paper default)" in first.stdout
    done = _trials(study)
    assert [t.number for t in done] == [0, 1] and done[0].user_attrs["reference"]
    assert done[0].params == TrialParams.reference(int(done[0].params["layer"]), SearchSpace(LAYERS, 1, 2, "window"))
    assert done[1].user_attrs["anchor"] == "per layer" and done[1].params["direction_scope"] == "per layer"
    assert {k: v for k, v in done[1].params.items() if k != "direction_scope"} == {
        k: v for k, v in done[0].params.items() if k != "direction_scope"}

    again = run("optimize", tiny_chat, "--trials", "3", "--study", study, *FAST, check=True)
    assert "(1 run now)" in again.stdout
    resumed = _trials(study)
    assert len(resumed) == 3 and [t.params for t in resumed[:2]] == [t.params for t in done]

    report = json.loads((study / "pareto.json").read_text())
    assert report["finished_trials"] == 3 and report["front"] and report["reference"]["number"] == 0
    assert (study / "pareto.md").read_text().count("| 0 |") == 1

    out = tmp_path / "picked"
    run("optimize", tiny_chat, "--study", study, "--pick", "2", "--out", out, check=True)
    assert len(_trials(study)) == 3  # picking runs no trial
    direction = Direction.load(out)
    expected = TrialParams.from_params(resumed[2].params).weights(LAYERS)
    assert direction.weights == expected and direction.extra["optimize_trial"] == "2"
    provenance = json.loads((out / "abliterate" / "provenance.json").read_text())
    assert provenance["direction"]["weights"] == expected.to_dict()
    # a complete record (issue 15: it had prompts, selection and settings null): the study's prompts, the
    # trial as the selection, the settings and the sampler's seed
    prompts = provenance["prompts"]
    assert prompts["source"] == "builtin" and prompts["lang"] == "en" and len(prompts["sha256"]) == 64
    assert set(prompts["counts"]) == {"harmful_train", "harmless_train", "harmful_val", "harmless_val"}
    assert all(0 < n <= 8 for n in prompts["counts"].values())
    assert provenance["selection"]["trial"]["number"] == 2 and provenance["selection"]["params"] == resumed[2].params
    assert provenance["settings"]["model"] == str(tiny_chat) and provenance["seed"] == 0
    assert json.loads((out / "abliterate" / "optimize.json").read_text())["trial"]["number"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(_ids()).logits).all()
    run("verify", out, check=True)


def test_bad_optimize_options_fail_in_one_line(tiny_chat: Path, tmp_path: Path) -> None:
    assert_one_line_error(run("optimize", tiny_chat, "--pick", "1", "--study", tmp_path / "s"), "--pick needs --out")
    no_study = run("optimize", tiny_chat, "--pick", "1", "--out", tmp_path / "o", "--study", tmp_path / "none")
    assert_one_line_error(no_study, "no study in")
    method = run("optimize", tiny_chat, "--method", "norm-preserving", "--trial-edit", "hooks", "--study",
                 tmp_path / "s")
    assert_one_line_error(method, "norm-preserving")
    missing = run("optimize", tmp_path / "no-such-model", "--trials", "1", "--study", tmp_path / "bad")
    assert_one_line_error(missing, "not found")
    assert not (tmp_path / "bad").exists()  # a bad MODEL fails before the study folder is created


def test_recipe_max_new_tokens_is_said_not_ignored(tmp_path: Path) -> None:
    """A recipe's max_new_tokens caps eval's answers, not the trials': optimize says so on stderr (a warning that
    names trial_max_new_tokens), then goes on; with the flag given, nothing is said."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tmp_path / 'no-such-model'}\nmax_new_tokens: 16\n", encoding="utf-8")
    done = run("optimize", "--recipe", recipe, "--trials", "1", "--study", tmp_path / "s")
    assert "max_new_tokens=16, which optimize does not use" in done.stderr and "trial_max_new_tokens" in done.stderr
    assert_one_line_error(done, "not found")  # it went on: MODEL is what fails
    assert not (tmp_path / "s").exists()
    flagged = run("optimize", "--recipe", recipe, "--trial-max-new-tokens", "8", "--study", tmp_path / "s")
    assert "does not use" not in flagged.stderr
    assert_one_line_error(flagged, "not found")


def test_recipe_trial_max_new_tokens_reaches_the_trials(tiny_chat: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_chat}\nmax_new_tokens: 128\ntrial_max_new_tokens: 3\ntrial_prompts: 2\n",
                      encoding="utf-8")
    given = {"--trial-max-new-tokens", "--trial-prompts"}  # from the recipe here
    fast = [arg for i, arg in enumerate(FAST) if arg not in given and (i == 0 or FAST[i - 1] not in given)]
    run("optimize", "--recipe", recipe, "--trials", "1", "--study", tmp_path / "s", *fast, check=True)
    stored = json.loads((tmp_path / "s" / "study.json").read_text())["settings"]
    assert stored["max_new_tokens"] == 3 and stored["trial_prompts"] == 2  # the trials' cap, from the recipe


def test_resuming_with_other_settings_is_refused(tiny_chat: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    run("optimize", tiny_chat, "--trials", "1", "--study", study, *FAST, check=True)
    other = [*FAST]
    other[other.index("en,de")] = "en"
    done = run("optimize", tiny_chat, "--trials", "2", "--study", study, *other)
    assert_one_line_error(done, "langs")
    assert [t.state for t in _trials(study)].count(optuna.trial.TrialState.COMPLETE) == 1


def test_informed_space_samples_only_inside_its_bounds_and_keeps_the_default_layer() -> None:
    space = SearchSpace.informed(n_layers=30, first_nonzero=1, default_layer=8, layer_max=23)
    assert (space.layer_min, space.layer_max) == (8, 23)  # 0.4 x 29 = 11.6, widened down to the default layer
    assert SearchSpace.informed(30, 1, 15, 23).layer_min == 11 and SearchSpace.informed(30, 13, 15, 23).layer_min == 13
    assert SearchSpace.from_json(space.to_json()) == space
    wide = SearchSpace.from_json({"n_layers": 30, "layer_min": 1, "layer_max": 23, "kernel": "window"})
    assert (wide.peak_min, wide.pos_min) == (-0.3, 0.0)  # a study from before the informed prior keeps its bounds
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(200):
        params = TrialParams.suggest(study.ask(), space)
        assert 8.0 <= params.layer <= 23.0
        for kernel in (params.attention, params.mlp):
            assert isinstance(kernel, WindowKernel) and 17.4 <= kernel.pos <= 29.0 and -0.15 <= kernel.peak <= 1.5
    reference = TrialParams.from_params(TrialParams.reference(9, space))
    assert reference.weights(30).is_full()  # the flat window lies inside the informed space
