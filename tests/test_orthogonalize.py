"""The streaming edit on tiny random models of every family: equals inference-time ablation, leaves no r."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, POST_NORM_FAMILIES, build
from transformers import AutoModelForCausalLM

from abliterate.archs import lookup
from abliterate.checkpoint import Checkpoint
from abliterate.direction import Direction
from abliterate.hooks import directional_ablation
from abliterate.orthogonalize import apply_direction, post_norm_direction, project_out

HIDDEN = 32


def _edit(tmp_path: Path, family: str, tied: bool) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, Path]:
    source = tmp_path / "source"
    model = build(family, source, tied=tied)
    r = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    r = r / r.norm()
    out = tmp_path / "out"
    apply_direction(source, Direction(r), out, max_shard_size=40_000)
    edited = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
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


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2_moe"])
def test_untouched_tensors_are_byte_identical(tmp_path: Path, family: str) -> None:
    _model, _edited, _r, out = _edit(tmp_path, family, tied=True)
    source, result = Checkpoint.open(tmp_path / "source"), Checkpoint.open(out)
    arch = lookup(family)
    edited = {n for n in source.tensors if arch.classify(n) is not None}
    assert set(result.tensors) == set(source.tensors) | {arch.lm_head_tensor}
    for name in source.tensors:
        same = b"".join(source.iter_raw(name)) == b"".join(result.iter_raw(name))
        assert same != (name in edited), name
    # The untied unembedding is the original embedding, bit for bit.
    assert b"".join(result.iter_raw(arch.lm_head_tensor)) == b"".join(source.iter_raw(arch.embedding_tensor))
    if family == "qwen2_moe":
        experts = [n for n in edited if ".experts." in n]
        assert len(experts) == 3 * 4  # every expert's down projection in every layer


def test_bfloat16_source_is_edited_in_float32_and_cast_back(tmp_path: Path) -> None:
    build("llama", tmp_path / "source", dtype=torch.bfloat16)
    r = torch.randn(HIDDEN)
    apply_direction(tmp_path / "source", Direction(r), tmp_path / "out", max_shard_size=40_000)
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
    edited = project_out(w, r, axis=0)
    assert torch.allclose(r @ edited, torch.zeros(40), atol=1e-5)
    assert torch.allclose(project_out(edited, r, axis=0), edited, atol=1e-6)  # idempotent
    emb = torch.randn(50, 16)
    assert torch.allclose(project_out(emb, r, axis=1) @ r, torch.zeros(50), atol=1e-5)
    assert torch.equal(w, w.clone())  # input untouched
    # Post-norm: a vector orthogonal to u = r*(1+g) stays orthogonal to r after the norm's gain.
    gain = torch.randn(16) * 0.3
    u = post_norm_direction(r, gain, 1.0)
    y = project_out(torch.randn(5, 16), u, axis=1)
    assert torch.allclose((y * (1 + gain)) @ r, torch.zeros(5), atol=1e-5)
