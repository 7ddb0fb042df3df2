"""Quantized checkpoints in their real on-disk formats: FP8 with block scales and MXFP4 experts.

Tiny models are written in each format here (the quantizers below follow the formats, transformers' own
dequantization is the reference), edited, and loaded back with transformers on the CPU: the edited model equals
inference-time ablation on the dequantized source (up to the bf16 rounding of the edited modules), `verify`
passes, and every tensor outside the dequantized modules is byte-identical.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build, load

from abliterate.direction.vector import Direction
from abliterate.edit.formats import OutputOptions
from abliterate.edit.projection import project_out
from abliterate.model.archs import lookup
from abliterate.model.checkpoint import Checkpoint
from abliterate.model.hooks import directional_ablation
from abliterate.model.quantized import FP4_VALUES, dequantize_fp8, dequantize_mxfp4
from abliterate.publish.verify import verify
from abliterate.publish.write_edited import write_edited

HIDDEN = 32
FP8_BLOCK = (16, 16)  # transformers' CPU dequantization needs blocks that divide the weight (real ones: 128)
SHORT_BLOCK = (16, 24)  # the last block of a row is short: the edit's own dequantization handles it


def _direction() -> torch.Tensor:
    r = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    return r / r.norm()


def _rewrite(folder: Path, convert: dict[str, dict[str, torch.Tensor]], quantization: dict[str, object]) -> None:
    """Replace tensors in every shard (name -> new tensors) and add `quantization` to config.json."""
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        out: dict[str, torch.Tensor] = {}
        for name, value in tensors.items():
            out.update(convert.get(name, {name: value}))
        save_file(out, shard, metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for name, shard_name in index["weight_map"].items():
        for new in convert.get(name, {name: None}):
            weight_map[new] = shard_name
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))


# --- FP8 with block scales ---------------------------------------------------------------------------------------


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weight and float32 scale_inv [ceil(out/b0), ceil(in/b1)]: each block's max maps to 448."""
    rows, cols = weight.shape
    scales = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    quantized = torch.empty_like(weight)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            part = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            scales[i, j] = weight[part].abs().max().clamp(min=1e-12) / 448.0
            quantized[part] = weight[part] / scales[i, j]
    return quantized.to(torch.float8_e4m3fn), scales


def _fp8_checkpoint(folder: Path, family: str) -> None:
    build(family, folder, tied=False, dtype=torch.bfloat16)
    convert = {}
    for shard in folder.glob("*.safetensors"):
        for name, value in load_file(shard).items():
            if name.endswith("proj.weight") and value.dim() == 2 and "embed" not in name:
                weight, scale = quantize_fp8(value.float(), FP8_BLOCK)
                convert[name] = {name: weight, f"{name}_scale_inv": scale}
    quantization = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(FP8_BLOCK),
                    "modules_to_not_convert": ["lm_head"]}
    _rewrite(folder, convert, quantization)


def test_fp8_dequantization_matches_transformers() -> None:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    weight = torch.randn(40, 56)
    quantized, scale = quantize_fp8(weight, SHORT_BLOCK)
    ours = dequantize_fp8(quantized, scale, SHORT_BLOCK)
    theirs = _dequantize_fp8_weight(quantized, scale, list(SHORT_BLOCK), torch.float32)
    assert torch.equal(ours, theirs)
    assert float((ours - weight).abs().max()) < 0.07 * float(weight.abs().max())  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("family", ["qwen3", "deepseek_v3"])
def test_fp8_block_checkpoint_is_edited_and_loads(tmp_path: Path, family: str) -> None:
    source, out = tmp_path / "source", tmp_path / "out"
    _fp8_checkpoint(source, family)
    r = _direction()
    write_edited(out, source, Direction(r), OutputOptions(max_shard_size=40_000))
    original = load(source)  # transformers dequantizes FP8 on the CPU
    edited = load(out)
    config = json.loads((out / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "fp8"
    arch = lookup(family)
    before, after = Checkpoint.open(source), Checkpoint.open(out)
    # The writers' modules are bf16 now and excluded from quantization; the scale tensors of those modules are gone.
    writers = [n for n in after.tensors if arch.classify(n) and arch.classify(n)[0] != "embedding"]  # type: ignore[index]
    assert writers and all(after.tensors[n].dtype == "BF16" for n in writers)
    assert all(f"{n}_scale_inv" not in after.tensors for n in writers)
    assert r"model\.layers\.0\.self_attn\.o_proj" in quantization["modules_to_not_convert"]
    # Every other tensor, the FP8 q/k/v/gate/up projections and their scales among them, byte-identical.
    raw = Checkpoint._open(source, allow_pickle=False)
    kept = [n for n in raw.tensors if n in after.tensors and n not in before.derived and n not in writers]
    assert any(raw.tensors[n].dtype == "F8_E4M3" for n in kept)
    for name in kept:
        if arch.classify(name) is None:
            assert b"".join(raw.iter_raw(name)) == b"".join(after.iter_raw(name)), name
    # Edited values: exactly the float32 edit of the dequantized weight, rounded once to bf16.
    name = "model.layers.1.self_attn.o_proj.weight"
    expected = project_out(before.get(name), r, 0).to(torch.bfloat16).float()
    assert torch.allclose(after.get(name).float(), expected, rtol=2**-7, atol=0)  # one bf16 ulp: sum order
    assert verify(out).worst < 1.0
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        result = edited(ids.clone(), output_hidden_states=True)
        with directional_ablation(original, arch, r):
            ablated = original(ids.clone()).logits
    for hidden in result.hidden_states[:-1]:
        assert float(((hidden @ r).abs() / hidden.norm(dim=-1)).max()) < 2e-2  # bf16 rounding of the writers
    # bf16 writers (relative rounding 2^-9) against a float32 reference; a top-k router may pick another expert
    # for a token near a tie, hence a loose bound: an unedited writer fails the hidden-state check above.
    assert float((result.logits - ablated).abs().max()) < 6e-2 * float(ablated.abs().max())


def test_fp8_writer_without_dequantization_is_refused(tmp_path: Path) -> None:
    """An FP8 writer that the dequantizer does not know (here: no quantization_config) is never edited as FP8."""
    from abliterate.errors import CheckpointError

    source = tmp_path / "source"
    _fp8_checkpoint(source, "qwen3")
    config = json.loads((source / "config.json").read_text())
    del config["quantization_config"]
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantized"):
        write_edited(tmp_path / "out", source, Direction(_direction()), OutputOptions(max_shard_size=40_000))


# --- MXFP4 experts (gpt-oss) -------------------------------------------------------------------------------------


def quantize_mxfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 blocks [..., rows, groups, 16] and scales [..., rows, groups] of `values` [..., rows, groups * 32]."""
    grouped = values.unflatten(-1, (-1, 32))
    exponent = torch.ceil(torch.log2(grouped.abs().amax(-1).clamp(min=2.0**-100) / 6.0)).clamp(-127, 127)
    scaled = grouped / torch.exp2(exponent).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES)
    index = (scaled.unsqueeze(-1) - lut).abs().argmin(-1).to(torch.uint8)
    blocks = index[..., 0::2] | (index[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def _mxfp4_checkpoint(folder: Path) -> None:
    build("gpt_oss", folder, tied=False, dtype=torch.bfloat16, extra={"intermediate_size": 64})
    convert = {}
    for shard in folder.glob("*.safetensors"):
        for name, value in load_file(shard).items():
            if name.endswith(("experts.down_proj", "experts.gate_up_proj")):
                blocks, scales = quantize_mxfp4(value.float().transpose(1, 2))  # stored [experts, out, in]
                convert[name] = {f"{name}_blocks": blocks, f"{name}_scales": scales}
    quantization = {"quant_method": "mxfp4",
                    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                               "model.embed_tokens", "lm_head"]}
    _rewrite(folder, convert, quantization)


def test_mxfp4_dequantization_matches_transformers() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    values = torch.randn(3, 40, 64)  # [experts, out, in]
    blocks, scales = quantize_mxfp4(values)
    ours = dequantize_mxfp4(blocks, scales)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert ours.shape == (3, 64, 40) and torch.equal(ours, theirs)
    assert float((ours.transpose(1, 2) - values).abs().max()) < 0.35 * float(values.abs().max())  # 16 levels


def test_mxfp4_experts_are_edited_and_load(tmp_path: Path) -> None:
    source, out = tmp_path / "source", tmp_path / "out"
    _mxfp4_checkpoint(source)
    r = _direction()
    write_edited(out, source, Direction(r), OutputOptions(max_shard_size=40_000))
    original, edited = load(source), load(out)
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "mxfp4"
    assert r"model\.layers\.2\.mlp\.experts" in quantization["modules_to_not_convert"]
    # Provenance lists the modules written dequantized, and the model card says so.
    record = json.loads((out / "abliterate" / "provenance.json").read_text())
    assert sorted(record["edit"]["dequantized_modules"]) == [f"model.layers.{i}.mlp.experts" for i in range(3)]
    card = (out / "README.md").read_text()
    assert "| Quantization | the source is quantized; the 3 modules" in card and "bf16" in card
    before, after = Checkpoint.open(source), Checkpoint.open(out)
    assert after.tensors["model.layers.0.mlp.experts.down_proj"].shape == (4, 64, HIDDEN)  # [experts, in, hidden]
    assert after.tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, HIDDEN, 128)
    assert not [n for n in after.tensors if n.endswith(("_blocks", "_scales"))]
    name = "model.layers.0.mlp.experts.down_proj"
    expected = project_out(before.get(name), r, 2).to(torch.bfloat16).float()
    assert torch.allclose(after.get(name).float(), expected, rtol=2**-7, atol=0)  # one bf16 ulp: sum order
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"  # dequantized with its module, not edited
    assert torch.equal(after.get(gate_up), before.get(gate_up).to(torch.bfloat16))
    raw = Checkpoint._open(source, allow_pickle=False)
    for name in raw.tensors:
        if ".experts." not in name and lookup("gpt_oss").classify(name) is None:
            assert b"".join(raw.iter_raw(name)) == b"".join(after.iter_raw(name)), name
    assert verify(out).worst < 1.0
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        result = edited(ids.clone(), output_hidden_states=True)
        with directional_ablation(original, lookup("gpt_oss"), r):
            ablated = original(ids.clone()).logits
    for hidden in result.hidden_states[:-1]:
        assert float(((hidden @ r).abs() / hidden.norm(dim=-1)).max()) < 2e-2
    assert float((result.logits - ablated).abs().max()) < 3e-2 * float(ablated.abs().max())
