"""`arch-propose` on every tiny family: the proposed entry classifies the checkpoint as the shipped file does.

And `--arch FILE` with a proposed entry lets a family the registry lacks be edited exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run
from tiny_models import FAMILIES, build, load

from abliterate.direction.vector import Direction
from abliterate.model.archs import Architecture, load_file, lookup
from abliterate.model.checkpoint import Checkpoint
from abliterate.model.hooks import directional_ablation
from abliterate.model.propose import propose


def _as_list(value: str | list[str]) -> set[str]:
    return {value} if isinstance(value, str) else set(value)


def _effect(arch: Architecture, names: dict[str, int]) -> dict[str, tuple[str, int, int, bool]]:
    """What an entry does to a checkpoint: per residual-writing tensor, (component, layer, hidden axis, bias)."""
    result: dict[str, tuple[str, int, int, bool]] = {}
    for name, ndim in names.items():
        found = arch.writer(name)
        if found is not None:
            result[name] = (found[0], found[1], arch.hidden_axis(name, ndim), arch.is_bias(name, ndim))
    return result


def check_proposal(folder: Path, model_type: str, shipped: Architecture) -> Architecture:
    checkpoint = Checkpoint.open(folder)
    proposal = propose(load(folder), model_type, set(checkpoint.tensors))
    proposed = Architecture.model_validate(proposal.entry)
    assert proposed.embedding == shipped.embedding and proposed.layers == shipped.layers
    assert proposed.lm_head == shipped.lm_head
    assert _as_list(proposed.attention) == _as_list(shipped.attention)
    assert _as_list(proposed.mlp) == _as_list(shipped.mlp)
    assert proposed.post_norms == shipped.post_norms
    if shipped.post_norms is not None:
        assert proposed.norm_offset == shipped.norm_offset
    ndims = {name: len(info.shape) for name, info in checkpoint.tensors.items()}
    assert _effect(proposed, ndims) == _effect(shipped, ndims)
    for arch in (proposed, shipped):  # the unembedding is found on disk under the same name (or not at all)
        assert arch.on_disk(arch.lm_head_tensor, ndims) == shipped.on_disk(shipped.lm_head_tensor, ndims)
    return proposed


# Shipped entries `propose` does not reach: Gemma 4 (three writers per layer behind their own norms, and a
# chain of two norms in the MoE variant) needs per-writer norm chains, which propose does not infer.
HAND_WRITTEN = {"gemma4", "gemma4_text"}


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - HAND_WRITTEN))
def test_proposal_matches_the_shipped_entry(tmp_path: Path, family: str) -> None:
    build(family, tmp_path / "m", tied=False)
    check_proposal(tmp_path / "m", family, lookup(family))


@pytest.mark.parametrize("family", sorted(HAND_WRITTEN))
def test_proposal_refuses_what_it_cannot_infer(tmp_path: Path, family: str) -> None:
    """Rather than a wrong entry: a one-line error that says to write the entry by hand."""
    from abliterate.errors import ModelError

    build(family, tmp_path / "m", tied=False)
    with pytest.raises(ModelError) as err:
        propose(load(tmp_path / "m"), family, set(Checkpoint.open(tmp_path / "m").tensors))
    assert err.value.hint is not None and "by hand" in err.value.hint


UNREGISTERED = {  # families transformers ships and the registry lacks (tiny configs, BASE sizes)
    "starcoder2": dict(use_bias=True),  # LayerNorm, c_fc/c_proj MLP, biases everywhere
    "cohere": {},  # parallel block: attention and MLP read one norm's output, both added
}


def _build_unregistered(family: str, folder: Path) -> torch.nn.Module:
    from tiny_models import BASE
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**BASE, **UNREGISTERED[family], "tie_word_embeddings": False})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.15)
    model.save_pretrained(folder, max_shard_size="40KB")
    return model


@pytest.mark.parametrize("family", sorted(UNREGISTERED))
def test_arch_file_lets_an_unregistered_family_be_edited_exactly(tmp_path: Path, family: str) -> None:
    source = tmp_path / family
    _build_unregistered(family, source)
    r = torch.randn(32, generator=torch.Generator().manual_seed(3))
    Direction(r).save(tmp_path / "r.safetensors")
    apply: list[str | Path] = ["apply", source, "--direction", tmp_path / "r.safetensors", "--out", tmp_path / "out"]
    assert_one_line_error(run(*apply), f"unsupported model family {family!r}", "arch-propose", "--arch")

    proposed = run("arch-propose", source, check=True)
    (tmp_path / "fam.yaml").write_text(proposed.stdout, encoding="utf-8")
    arch = load_file(tmp_path / "fam.yaml")
    assert arch.model_types == [family]
    run(*apply, "--arch", tmp_path / "fam.yaml", check=True)

    model, edited = load(source), load(tmp_path / "out")
    unit = r / r.norm()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        result = edited(ids, output_hidden_states=True)
        with directional_ablation(model, arch, unit):
            ablated = model(ids).logits
        original = model(ids).logits
    for hidden in result.hidden_states[:-1]:
        assert float(((hidden @ unit).abs() / hidden.norm(dim=-1)).max()) < 1e-5
    assert float((result.logits - ablated).abs().max()) < 1e-4
    assert float((result.logits - original).abs().max()) > 1e-3
