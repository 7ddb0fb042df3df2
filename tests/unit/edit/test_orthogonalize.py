"""The streaming edit on tiny random models of every family: equals inference-time ablation, leaves no r."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, POST_NORM_FAMILIES, build, load

from abliterate.direction.vector import Direction
from abliterate.edit.formats import OutputOptions
from abliterate.edit.projection import post_norm_direction, project_out
from abliterate.edit.stream import direction_for, make_plan
from abliterate.model.archs import lookup
from abliterate.model.checkpoint import Checkpoint, read_config
from abliterate.model.hooks import directional_ablation
from abliterate.publish.provenance import read_provenance
from abliterate.publish.verify import verify
from abliterate.publish.write_edited import write_edited

HIDDEN = 32


def _edit(tmp_path: Path, family: str, tied: bool) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, Path]:
    source = tmp_path / "source"
    build(family, source, tied=tied)
    model = load(source)  # as the tool loads it (a multimodal family may load as its language model alone)
    r = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    r = r / r.norm()
    out = tmp_path / "out"
    write_edited(out, source, Direction(r), OutputOptions(max_shard_size=40_000))
    edited = load(out)
    return model, edited, r, out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_edit_matches_ablation_and_removes_direction(tmp_path: Path, family: str, tied: bool) -> None:
    model, edited, r, out = _edit(tmp_path, family, tied)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        result = edited(ids, output_hidden_states=True)
        with directional_ablation(model, lookup(model.config.model_type), r):
            ablated = model(ids).logits
        original = model(ids).logits
    # Every residual state the edited model produces is free of r.
    for hidden in result.hidden_states[:-1]:  # the last one has been through the final norm
        assert float(((hidden @ r).abs() / hidden.norm(dim=-1)).max()) < 1e-5
    if family not in POST_NORM_FAMILIES:
        assert float((result.logits - ablated).abs().max()) < 1e-4
    assert float((result.logits - original).abs().max()) > 1e-3  # the edit did something

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert "quantization_config" not in config
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    assert (out / "abliterate" / "direction.safetensors").is_file()


# Expected count of edited tensors per family (embedding + writers of 3 layers), counted from the modeling code.
EDITED_COUNTS = {
    "llama": 7, "gemma2": 7, "qwen2_moe": 1 + 3 * (1 + 4 + 1),
    "gpt_oss": 1 + 3 * (2 + 2),  # o_proj weight and bias; fused experts and their biases
    "granitemoehybrid": 1 + 3 * (1 + 2),  # mamba or attention out_proj; fused experts and shared MLP
    "llama4": 1 + 3 + 1 + (1 + 1) + 1,  # o_proj x3; dense, MoE (shared + fused experts), dense
    "deepseek_v3": 1 + 3 + 1 + 2 * (4 + 1),  # o_proj x3; dense layer 0, then 4 experts + shared
    "gemma3": 7, "mistral3": 7, "qwen3_5_moe": 1 + 3 * (1 + 4 + 1),
    "gemma4_text": 1 + 3 * 3,  # o_proj, down_proj, per_layer_projection
    "gemma4": 1 + 3 * 3,  # o_proj, the dense MLP's down_proj, the fused experts' down_proj
}


@pytest.mark.parametrize("family", sorted(EDITED_COUNTS))
def test_untouched_tensors_are_byte_identical(tmp_path: Path, family: str) -> None:
    _model, _edited, _r, out = _edit(tmp_path, family, tied=True)
    source, result = Checkpoint.open(tmp_path / "source"), Checkpoint.open(out)
    arch = lookup(family)
    edited = {n for n in source.tensors if arch.classify(n) is not None}
    assert len(edited) == EDITED_COUNTS[family]
    assert set(result.tensors) == set(source.tensors) | {arch.lm_head_tensor}
    for name in source.tensors:
        same = b"".join(source.iter_raw(name)) == b"".join(result.iter_raw(name))
        assert same != (name in edited), name
    # The untied unembedding is the original embedding, bit for bit.
    embedding = arch.on_disk(arch.embedding_tensor, source.tensors)
    assert embedding is not None
    assert b"".join(result.iter_raw(arch.lm_head_tensor)) == b"".join(source.iter_raw(embedding))
    towers = ("vision_", "model.visual.", "multi_modal_projector.", "model.vision_tower.", "model.embed_vision.")
    vision = [n for n in source.tensors if n.startswith(towers)]
    # copied byte for byte (checked above)
    assert bool(vision) == (family in {"gemma3", "mistral3", "llama4", "qwen3_5_moe", "gemma4"})


def test_bfloat16_source_is_edited_in_float32_and_cast_back(tmp_path: Path) -> None:
    build("llama", tmp_path / "source", dtype=torch.bfloat16)
    r = torch.randn(HIDDEN)
    write_edited(tmp_path / "out", tmp_path / "source", Direction(r), OutputOptions(max_shard_size=40_000))
    result = Checkpoint.open(tmp_path / "out")
    weight = result.get("model.layers.0.self_attn.o_proj.weight")
    assert weight.dtype == torch.bfloat16
    unit = r / r.norm()
    leak = (unit @ weight.float()).abs().max() / weight.float().abs().max()
    assert float(leak) < 1e-2  # bf16 rounding only


def test_projection_math() -> None:
    torch.manual_seed(0)
    r = torch.randn(16)
    r /= r.norm()
    w = torch.randn(16, 40)
    original = w.clone()
    edited = project_out(w, r, axis=0)
    assert torch.equal(w, original)  # the input is not modified
    assert torch.allclose(r @ edited, torch.zeros(40), atol=1e-5)
    assert torch.allclose(project_out(edited, r, axis=0), edited, atol=1e-6)  # idempotent
    emb = torch.randn(50, 16)
    emb_original = emb.clone()
    assert torch.allclose(project_out(emb, r, axis=1) @ r, torch.zeros(50), atol=1e-5)
    assert torch.equal(emb, emb_original)
    # Against the formula written out: W - r (r^T W) and E - (E r) r^T.
    assert torch.allclose(edited, w - torch.outer(r, r @ w), atol=1e-6)
    assert torch.allclose(project_out(emb, r, axis=1), emb - torch.outer(emb @ r, r), atol=1e-6)
    # Post-norm: a vector orthogonal to u = r*(1+g) stays orthogonal to r after the norm's gain.
    gain = torch.randn(16) * 0.3
    u = post_norm_direction(r, gain, 1.0)
    y = project_out(torch.randn(5, 16), u, axis=1)
    assert torch.allclose((y * (1 + gain)) @ r, torch.zeros(5), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rescale", [False, True])
def test_blocks_match_the_formula(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, rescale: bool) -> None:
    """Block by block (here 4-7 blocks per matrix), the edit is W - w r r^T W and E - w (E r) r^T exactly."""
    import abliterate.edit.projection as projection

    monkeypatch.setattr(projection, "_CHUNK_ELEMENTS", 100)
    torch.manual_seed(0)
    r = torch.randn(16)
    r /= r.norm()
    w, emb, weight = torch.randn(16, 40).to(dtype), torch.randn(70, 16).to(dtype), 0.7
    blocks = list(projection.projected_blocks(w, r, 0, weight=weight, rescale=rescale))
    assert rescale or len(blocks) > 3
    assert all(b.dtype == dtype and b.is_contiguous() and b.shape[1] == 40 for b in blocks)
    reference = w.float() - weight * torch.outer(r, r @ w.float())
    if rescale:
        reference *= w.float().norm(dim=0) / reference.norm(dim=0)
    tol = {"atol": 1e-6} if dtype == torch.float32 else {"atol": 1e-6, "rtol": 2**-7}  # one bf16 ulp: sum order
    assert torch.allclose(torch.cat(blocks).float(), reference.to(dtype).float(), **tol)
    rows = list(projection.projected_blocks(emb, r, 1, weight=weight))
    assert len(rows) > 3
    reference = emb.float() - weight * torch.outer(emb.float() @ r, r)
    assert torch.allclose(torch.cat(rows).float(), reference.to(dtype).float(), **tol)
    bad = w.clone()
    bad[9, 3] = float("nan")  # in the middle of a block that is not the first
    with pytest.raises(FloatingPointError):
        list(projection.projected_blocks(bad, r, 0))


# --- norm-preserving edit ----------------------------------------------------------------------------------


def test_norm_preserving_projection_math() -> None:
    torch.manual_seed(0)
    r = torch.randn(16)
    r /= r.norm()
    w = torch.randn(16, 40)
    w[:, 0] = 3.0 * r  # a column entirely along r: nothing left to rescale, stays (almost) zero
    edited = project_out(w, r, axis=0, rescale=True)
    assert float((r @ edited).abs().max()) < 1e-5
    assert torch.allclose(edited[:, 1:].norm(dim=0), w[:, 1:].norm(dim=0), rtol=1e-5)
    assert float(edited[:, 0].norm()) < 1e-5
    # Each column is the projected column, rescaled: same direction as the plain edit.
    plain = project_out(w, r, axis=0)
    cosine = (edited * plain).sum(0)[1:] / (edited.norm(dim=0) * plain.norm(dim=0))[1:]
    assert torch.allclose(cosine, torch.ones(39), atol=1e-5)
    emb = torch.randn(50, 16)
    rows = project_out(emb, r, axis=1, rescale=True)
    assert float((rows @ r).abs().max()) < 1e-5
    assert torch.allclose(rows.norm(dim=1), emb.norm(dim=1), rtol=1e-5)
    bias = torch.randn(16)  # biases are only projected
    assert torch.equal(project_out(bias, r, axis=0, rescale=True), project_out(bias, r, axis=0))
    stack = torch.randn(3, 16, 8)  # fused experts: every expert's columns
    edited_stack = project_out(stack, r, axis=1, rescale=True)
    assert torch.allclose(edited_stack.norm(dim=1), stack.norm(dim=1), rtol=1e-5)
    assert float(torch.einsum("h,ehi->ei", r, edited_stack).abs().max()) < 1e-5


def test_norm_preserving_direction_is_the_projected_one() -> None:
    """Its candidates are the raw difference minus its component along the harmless mean (formula written here)."""
    from abliterate.direction.candidates import make_candidates

    torch.manual_seed(0)
    harmful, harmless = torch.randn(2, 3, HIDDEN, dtype=torch.float64), torch.randn(2, 3, HIDDEN, dtype=torch.float64)
    sink = torch.randn(3, HIDDEN, dtype=torch.float64)  # about as large as a token: not a massive activation
    preserving = make_candidates(harmful, harmless, sink, "norm-preserving")
    assert preserving.method == "norm-preserving" and preserving.sink_layers == []
    raw = harmful - harmless
    unit = harmless / harmless.norm(dim=-1, keepdim=True)
    expected = raw - (raw * unit).sum(-1, keepdim=True) * unit
    assert torch.allclose(preserving.vectors.double(), expected, atol=1e-6)
    standard = make_candidates(harmful, harmless, sink, "standard")
    assert torch.allclose(standard.vectors.double(), raw, atol=1e-6)


def _edit_norm_preserving(tmp_path: Path, family: str, tied: bool, extra: dict[str, object] | None = None) -> Path:
    source, out = tmp_path / "source", tmp_path / "out"
    build(family, source, tied=tied, extra=extra)
    r = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    plan = write_edited(out, source, Direction(r, method="norm-preserving"), OutputOptions(max_shard_size=40_000)).plan
    assert plan.norm_preserving
    return out


def _check_norm_preserving(source_dir: Path, out: Path) -> None:
    """Every edited tensor: orthogonal to its u; matrices keep per-vector norms; biases are projected only."""
    source, result = Checkpoint.open(source_dir), Checkpoint.open(out)
    direction = Direction.load(out)
    plan = make_plan(source, read_config(source_dir), HIDDEN, norm_preserving=True)
    for name, (component, layer) in plan.edits.items():
        before, after = source.get(name), result.get(name)
        u = direction_for(plan, source, component, layer, direction.vector, name)
        axis = plan.arch.hidden_axis(name, before.dim())
        coefficient = torch.tensordot(after, u, dims=([axis], [0]))
        assert float(coefficient.abs().max()) < 1e-5 * float(after.abs().max()), name
        if plan.arch.is_bias(name, before.dim()):
            assert torch.allclose(after, project_out(before, u, axis), atol=1e-7), name
        else:
            assert torch.allclose(after.norm(dim=axis), before.norm(dim=axis), rtol=1e-5, atol=0), name
            assert not torch.allclose(after, project_out(before, u, axis), atol=1e-4), name  # rescaled
    for name in source.tensors:
        if name not in plan.edits:
            assert b"".join(source.iter_raw(name)) == b"".join(result.iter_raw(name)), name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_norm_preserving_edit(tmp_path: Path, family: str, tied: bool) -> None:
    out = _edit_norm_preserving(tmp_path, family, tied)
    _check_norm_preserving(tmp_path / "source", out)
    arch, result = lookup(family), Checkpoint.open(out)
    if tied:  # untied exactly as in the plain edit: the original embedding is the unembedding
        source = Checkpoint.open(tmp_path / "source")
        embedding = b"".join(source.iter_raw(arch.on_disk(arch.embedding_tensor, source.tensors) or ""))
        assert b"".join(result.iter_raw(arch.lm_head_tensor)) == embedding
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    record = read_provenance(out)
    assert record.edit.norm_preserving is True and record.direction.method == "norm-preserving"
    assert verify(out).worst < 1.0
    # No residual state of the edited model carries r (post-norm families: through u, as in the plain edit).
    edited = load(out)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden_states = edited(ids, output_hidden_states=True).hidden_states[:-1]
    r = Direction.load(out).vector
    for hidden in hidden_states:
        assert float(((hidden @ r).abs() / hidden.norm(dim=-1)).max()) < 1e-5


def test_norm_preserving_output_biases_are_projected_not_rescaled(tmp_path: Path) -> None:
    out = _edit_norm_preserving(tmp_path, "llama", False, extra={"attention_bias": True, "mlp_bias": True})
    biases = [n for n in Checkpoint.open(out).tensors if n.endswith(("o_proj.bias", "down_proj.bias"))]
    assert len(biases) == 6
    _check_norm_preserving(tmp_path / "source", out)


def test_norm_preserving_bfloat16_passes_verify(tmp_path: Path) -> None:
    source, out = tmp_path / "source", tmp_path / "out"
    build("gemma2", source, dtype=torch.bfloat16)
    write_edited(out, source, Direction(torch.randn(HIDDEN), method="norm-preserving"),
                 OutputOptions(max_shard_size=40_000))
    assert verify(out).worst < 1.0
    before, after = Checkpoint.open(source), Checkpoint.open(out)
    name = "model.layers.1.mlp.down_proj.weight"
    ratio = after.get(name).float().norm(dim=0) / before.get(name).float().norm(dim=0)
    assert float((ratio - 1).abs().max()) < 1e-2  # bf16 rounding only


# --- verify against an edit made with the wrong vector --------------------------------------------------------


def _swapped(plan, checkpoint, component, layer, r, name=None):  # type: ignore[no-untyped-def]
    other = {"attention": "mlp", "mlp": "attention"}.get(component, component)
    return _true_direction_for(plan, checkpoint, other, layer, r, name)


def _ignored(plan, checkpoint, component, layer, r, name=None):  # type: ignore[no-untyped-def]
    return r


def _outer_only(plan, checkpoint, component, layer, r, name=None):  # type: ignore[no-untyped-def]
    """A chain of norms read as its outermost norm alone (Gemma 4's MoE inner norms forgotten)."""
    norms = plan.arch.post_norm_tensors(layer, component, name)
    if not norms:
        return r
    return post_norm_direction(r, checkpoint.get(norms[-1][0]), plan.arch.norm_offset)


_true_direction_for = direction_for


@pytest.mark.parametrize("bug", [_swapped, _ignored], ids=["post-norms-swapped", "post-norms-ignored"])
@pytest.mark.parametrize("family", sorted(POST_NORM_FAMILIES))
def test_verify_fails_an_edit_against_the_wrong_vector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str, bug: object
) -> None:
    """verify derives u from the norm weights itself, so a bug in the edit's own mapping cannot pass it."""
    import abliterate.edit.stream as ortho
    from abliterate.errors import VerifyError

    build(family, tmp_path / "source")
    r = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    write_edited(tmp_path / "good", tmp_path / "source", Direction(r), OutputOptions(max_shard_size=40_000))
    assert verify(tmp_path / "good").worst < 1.0
    monkeypatch.setattr(ortho, "direction_for", bug)
    write_edited(tmp_path / "bad", tmp_path / "source", Direction(r), OutputOptions(max_shard_size=40_000))
    with pytest.raises(VerifyError, match="not orthogonal"):
        verify(tmp_path / "bad")


def test_gemma4_chain_of_norms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma 4 MoE: each summand is edited through its inner norm and the outer one (u ~ r * g_outer * g_inner).

    Read as the outer norm alone, the edit leaves r in the stream and fails verify.
    """
    import abliterate.edit.stream as ortho
    from abliterate.errors import VerifyError

    build("gemma4", tmp_path / "source")
    source, r = Checkpoint.open(tmp_path / "source"), torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    plan = make_plan(source, read_config(tmp_path / "source"), HIDDEN)
    layer = "model.language_model.layers.1."
    gain = {n: source.get(f"{layer}post_feedforward_layernorm{n}.weight") for n in ("", "_1", "_2")}
    for writer, inner in (("mlp.down_proj.weight", "_1"), ("experts.down_proj", "_2")):
        expected = r * gain[""] * gain[inner]
        u = direction_for(plan, source, "mlp", 1, r, layer + writer)
        assert torch.allclose(u, expected / expected.norm(), atol=1e-6), writer
    monkeypatch.setattr(ortho, "direction_for", _outer_only)
    write_edited(tmp_path / "bad", tmp_path / "source", Direction(r), OutputOptions(max_shard_size=40_000))
    with pytest.raises(VerifyError, match="not orthogonal"):
        verify(tmp_path / "bad")
    edited = load(tmp_path / "bad")
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = edited(ids, output_hidden_states=True).hidden_states[2]
    assert float(((hidden @ (r / r.norm())).abs() / hidden.norm(dim=-1)).max()) > 1e-3
