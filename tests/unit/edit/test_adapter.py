"""`--format adapter`: the edit as a rank-1 PEFT LoRA, on tiny models of every family.

The reference is the safetensors edit of the same model and direction: the unedited model plus the adapter,
loaded by PEFT itself, must compute its logits (1e-4). Edits a LoRA cannot carry are one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run
from tiny_models import FAMILIES, build, save_tokenizer
from transformers import AutoModelForCausalLM

from abliterate.direction.vector import Direction
from abliterate.edit.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from abliterate.edit.formats import OutputOptions
from abliterate.errors import UsageError
from abliterate.model.archs import lookup
from abliterate.model.checkpoint import Checkpoint, read_config
from abliterate.model.loading import auto_model_class, resolve
from abliterate.publish.verify import verify
from abliterate.publish.write_edited import write_edited


def direction(method: str = "projected", seed: int = 0) -> Direction:
    r = torch.randn(32, generator=torch.Generator().manual_seed(seed))
    return Direction(r / r.norm(), layer=1, pos=-1, lang="en", method=method)


def ids() -> torch.Tensor:
    return torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))


def edit(model: Path, out: Path, fmt: str, d: Direction) -> Path:
    write_edited(out, resolve(str(model)), d, OutputOptions(fmt))
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_base_plus_adapter_is_the_edited_checkpoint(family: str, tmp_path: Path) -> None:
    from peft import PeftModel

    base = tmp_path / "base"
    build(family, base, tied=family in {"llama", "gemma2"})
    d = direction()
    tensors = Checkpoint.open(base).tensors
    arch = lookup(str(read_config(base)["model_type"]))
    writers = {n: len(info.shape) for n, info in tensors.items() if arch.classify(n) is not None}
    stacked = any("expert" in n or ndim == 3 for n, ndim in writers.items())
    refusal = ("output bias|mixture-of-experts" if any(n.endswith("bias") for n in writers)
               else "mixture-of-experts" if stacked else None)
    if refusal is not None:
        with pytest.raises(UsageError, match=refusal):
            edit(base, tmp_path / "adapter", "adapter", d)
        assert not (tmp_path / "adapter").exists()
        return
    adapter = edit(base, tmp_path / "adapter", "adapter", d)
    edited = edit(base, tmp_path / "edited", "safetensors", d)
    expected = sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md", "abliterate"])
    assert sorted(p.name for p in adapter.iterdir()) == expected
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert config["r"] == 1 and config["lora_alpha"] == 1 and config["peft_type"] == "LORA"
    auto = auto_model_class(base)
    model = PeftModel.from_pretrained(auto.from_pretrained(base, dtype=torch.float32), adapter).eval()
    reference = auto.from_pretrained(edited, dtype=torch.float32).eval()
    with torch.no_grad():
        ours, expected = model(ids()).logits, reference(ids()).logits
    assert float((ours - expected).abs().max()) < 1e-4
    with torch.no_grad(), model.disable_adapter():
        assert float((model(ids()).logits - expected).abs().max()) > 1e-2  # the adapter is what makes the difference
    assert "OK" in verify(adapter).summary()


def test_partial_weights_are_rank_one_too(tmp_path: Path) -> None:
    from peft import PeftModel

    from abliterate.model.ablation import AblationWeights

    base = tmp_path / "base"
    build("qwen2", base)
    weights = AblationWeights(0.5, (1.0, 0.25, 0.0), (0.0, 0.75, 1.0))
    d = Direction(direction().vector, layer=1, pos=-1, weights=weights)
    adapter, edited = edit(base, tmp_path / "a", "adapter", d), edit(base, tmp_path / "e", "safetensors", d)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(edited).eval()(ids()).logits
        assert float((model(ids()).logits - expected).abs().max()) < 1e-4


class TestNotExpressible:
    def test_norm_preserving(self, tmp_path: Path) -> None:
        build("llama", tmp_path / "base")
        with pytest.raises(UsageError, match="norm-preserving"):
            edit(tmp_path / "base", tmp_path / "a", "adapter", direction("norm-preserving"))
        assert not (tmp_path / "a").exists()

    def test_output_bias(self, tmp_path: Path) -> None:
        build("llama", tmp_path / "base", extra={"attention_bias": True})
        with pytest.raises(UsageError, match=r"output bias .*o_proj\.bias"):
            edit(tmp_path / "base", tmp_path / "a", "adapter", direction())


def test_cli_apply_adapter_verify_and_push_dry_run(tiny_chat: Path, tmp_path: Path) -> None:
    direction().save(tmp_path / "r.safetensors")
    out = tmp_path / "adapter"
    done = run("apply", tiny_chat, "--direction", tmp_path / "r.safetensors", "--out", out, "--format", "adapter",
               check=True)
    assert "LoRA adapter (rank 1, 7 modules" in done.stdout
    assert "OK" in run("verify", out, check=True).stdout
    listing = run("push", out, "me/tiny-adapter", "--dry-run", check=True).stdout
    assert ADAPTER_WEIGHTS in listing and ADAPTER_CONFIG in listing
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "LoRA adapter" in card
    d = tmp_path / "r2.safetensors"
    direction("norm-preserving").save(d)
    bad = run("apply", tiny_chat, "--direction", d, "--out", tmp_path / "bad", "--format", "adapter")
    assert_one_line_error(bad, "norm-preserving", "--format safetensors")


def test_adapter_of_a_chat_model_keeps_no_tokenizer(tmp_path: Path) -> None:
    """vLLM and PEFT take the tokenizer from the base model: the adapter folder carries only the adapter."""
    base = tmp_path / "base"
    build("llama", base)
    save_tokenizer(base)
    adapter = edit(base, tmp_path / "a", "adapter", direction())
    assert not list(adapter.glob("tokenizer*"))


def test_without_the_embedding_is_the_edit_with_embedding_weight_zero(tmp_path: Path) -> None:
    """--no-adapter-embedding (servers that reject embed_tokens LoRAs) = the partial edit leaving E alone."""
    from peft import PeftModel

    from abliterate.edit.adapter import write_adapter
    from abliterate.model.ablation import AblationWeights

    base = tmp_path / "base"
    build("llama", base, tied=True)
    d = direction()
    (tmp_path / "a").mkdir()
    source = resolve(str(base))
    write_adapter(source, Checkpoint.open(base), read_config(base), d, tmp_path / "a", embedding=False)
    partial = Direction(d.vector, layer=1, pos=-1, weights=AblationWeights(0.0, (1.0,) * 3, (1.0,) * 3))
    edited = edit(base, tmp_path / "e", "safetensors", partial)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "a").eval()
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(edited).eval()(ids()).logits
        assert float((model(ids()).logits - expected).abs().max()) < 1e-4


def test_verify_catches_a_b_that_is_not_the_direction(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from abliterate.errors import VerifyError
    from abliterate.publish.provenance import read_provenance, write_provenance
    from abliterate.storage.hashing import sha256_file

    build("qwen2", tmp_path / "base")
    adapter = edit(tmp_path / "base", tmp_path / "a", "adapter", direction())
    weights = adapter / ADAPTER_WEIGHTS
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    tensors[key] = torch.randn_like(tensors[key])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    record = read_provenance(adapter).to_data()
    record["output"]["files"][ADAPTER_WEIGHTS] = {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}
    write_provenance(adapter, record)  # hashes made to match: only the tensor check can fail
    with pytest.raises(VerifyError, match=r"down_proj\.lora_B\.weight is not a multiple of the direction"):
        verify(adapter)
