"""`--format gguf`: GGUF in, GGUF out, on tiny GGUFs of three families written here and on SmolLM2's Q4_1 file.

References are independent of the writer: the expected edited tensors are computed here from the dequantized
source (W - u u^T W, u from the GGUF's own norms for Gemma 2), the expected quantized values with gguf's
quantizer, the untouched tensors compared byte for byte with the source file, and the logits against the
safetensors edit of the same source loaded by transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from helpers import FAST, assert_one_line_error, run
from tiny_gguf import write_tiny_gguf
from transformers import AutoModelForCausalLM

from abliterate.direction.vector import Direction
from abliterate.edit.formats import OutputOptions
from abliterate.edit.gguf import GgufOptions
from abliterate.errors import VerifyError
from abliterate.model.loading import resolve
from abliterate.publish.provenance import read_provenance, write_provenance
from abliterate.publish.verify import verify
from abliterate.publish.write_edited import write_edited
from abliterate.storage.hashing import sha256_file

FAMILIES = ["llama", "qwen3_moe", "gemma2"]
# transformers saves a GGUF-loaded MoE with its fused expert names (`mlp.experts.down_proj`, [experts, hidden,
# in]), which the architecture registry does not list yet: the safetensors edit misses the experts, the GGUF
# writer refuses (its residual writers found by GGUF name are not all in the plan).
FUSED_EXPERTS_GAP = pytest.mark.xfail(
    strict=True, reason="registry lacks the fused mlp.experts.down_proj of GGUF-converted MoE checkpoints"
)
CHECKED = [pytest.param(f, marks=FUSED_EXPERTS_GAP) if f == "qwen3_moe" else f for f in FAMILIES]
NO_OUTPUT_HEAD = {"gemma2"}  # llama.cpp's Gemma 2 layout has no output.weight: the unembedding stays tied
WRITERS = ("token_embd.weight", ".attn_output.", ".ffn_down.", ".ffn_down_exps.")
POST_NORM = {".attn_output.": "post_attention_norm", ".ffn_down.": "post_ffw_norm"}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Converted GGUF copies go to a private cache (subprocesses inherit it)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("ABLITERATE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf-sources")
    return {family: write_tiny_gguf(family, folder / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def direction_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = torch.randn(32, generator=torch.Generator().manual_seed(1))
    return Direction(r / r.norm(), layer=1, pos=-1, lang="en").save(tmp_path_factory.mktemp("r") / "r.safetensors")


def edit(source: Path, direction_file: Path, out: Path, fmt: str = "gguf", **gguf_options: Any) -> Path:
    options = OutputOptions(fmt, gguf=GgufOptions(**gguf_options))
    write_edited(out, resolve(str(source)), Direction.load(direction_file), options, overwrite=True)
    return out


def tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def raw(tensor: Any) -> bytes:
    return np.asarray(tensor.data).view(np.uint8).tobytes()


def values(tensor: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))


def expected_edit(name: str, source: dict[str, Any], r: torch.Tensor) -> torch.Tensor:
    """W - u u^T W along the hidden axis, from the dequantized source tensor (the test's own math)."""
    w = values(source[name]).double()
    u = r.double()
    for kind, norm in POST_NORM.items():
        if kind in name and f"{name.split('.')[0]}.{name.split('.')[1]}.{norm}.weight" in source:
            g = values(source[f"{name.split('.')[0]}.{name.split('.')[1]}.{norm}.weight"]).double()  # stored 1 + w
            u = r.double() * g
            u = u / u.norm()
    if name == "token_embd.weight":
        return (w - torch.outer(w @ u, u)).float()
    axis = w.dim() - 2 if w.dim() > 1 else 0
    along = torch.tensordot(w, u, dims=([axis], [0]))
    return (w - u.reshape([-1] + [1] * (w.dim() - 1 - axis)) * along.unsqueeze(axis)).float()


def logits(folder: Path, gguf_file: str | None = None, *, tie: bool = False) -> torch.Tensor:
    """Logits on fixed random ids; `tie` unembeds with the (edited) embedding, as a tied GGUF does."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    if tie:
        model.lm_head.weight = model.get_input_embeddings().weight
    ids = torch.randint(8, 290, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", CHECKED)
def test_gguf_round_trip(family: str, sources: dict[str, Path], direction_file: Path, tmp_path: Path) -> None:
    source_file = sources[family]
    out = edit(source_file, direction_file, tmp_path / "out", edited_type="f32")
    written = out / f"tiny-{family}-abliterated.gguf"
    source, result = tensors(source_file), tensors(written)
    r = Direction.load(direction_file).vector
    # every metadata key copied with its value, plus the edit's keys
    source_fields, fields = gguf.GGUFReader(source_file).fields, gguf.GGUFReader(written).fields
    for key, field in source_fields.items():
        if not key.startswith("GGUF."):
            assert fields[key].contents() == field.contents(), key
    assert fields["abliterate.edited_type"].contents() == "f32" and fields["abliterate.direction.layer"].contents() == 1
    # untouched tensors byte for byte, edited ones equal to the test's own edit, the original embedding as output
    edited = 0
    for name, tensor in source.items():
        if any(w in name for w in WRITERS):
            assert result[name].tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.allclose(values(result[name]), expected_edit(name, source, r), atol=1e-5), name
            edited += 1
        else:
            assert result[name].tensor_type == tensor.tensor_type and raw(result[name]) == raw(tensor), name
    assert edited == 1 + 2 * 3
    tied = family in NO_OUTPUT_HEAD
    if not tied:
        assert raw(result["output.weight"]) == raw(source["token_embd.weight"])
    assert set(result) == set(source) | ({"output.weight"} if not tied else set())
    assert read_provenance(out).to_data()["format"]["tied_unembedding_edited"] is tied
    # transformers loads it, untied, and it computes what the safetensors edit of the same source computes
    float_edit = edit(source_file, direction_file, tmp_path / "float", fmt="safetensors")
    assert torch.allclose(logits(out, written.name), logits(float_edit, tie=tied), atol=1e-4)
    assert "OK" in verify(out).summary()


@pytest.mark.parametrize("family", CHECKED)
def test_requantized_edit_is_the_float_edit_quantized(
    family: str, sources: dict[str, Path], direction_file: Path, tmp_path: Path
) -> None:
    """Q8_0 (the default): each edited tensor is gguf's Q8_0 of the float edit; logits follow that quantization."""
    source_file = sources[family]
    out = edit(source_file, direction_file, tmp_path / "out")
    written = next(out.glob("*.gguf"))
    source, result = tensors(source_file), tensors(written)
    r = Direction.load(direction_file).vector
    reference = tmp_path / "reference"
    float_edit = edit(source_file, direction_file, tmp_path / "float", fmt="safetensors")
    shutil.copytree(float_edit, reference)
    writers = [name for name in source if any(w in name for w in WRITERS)]
    for name in writers:
        assert result[name].tensor_type == gguf.GGMLQuantizationType.Q8_0
        exact = expected_edit(name, source, r).numpy()
        q8 = gguf.quants.quantize(exact, gguf.GGMLQuantizationType.Q8_0).reshape(-1)
        differ = np.frombuffer(raw(result[name]), dtype=np.uint8) != q8
        assert differ.mean() <= 0.001, (name, differ.mean())  # a few roundings flip with the float32 sum order
    record = read_provenance(out).to_data()["format"]
    assert sorted(t["name"] for t in record["edited"]) == sorted(writers)
    assert record["edited_type"] == "q8_0" and 0 < record["residual_share"] < 0.05
    ours, floats = logits(out, written.name), logits(float_edit, tie=family in NO_OUTPUT_HEAD)
    error = float((ours - floats).abs().max())
    assert error < 0.25 * float(floats.abs().max()), error  # Q8_0 of the edited tensors only (measured in docs)


def test_reprojection_lowers_the_residual_share(tmp_path: Path) -> None:
    """Re-projecting the Q4_1 error: each round flips the roundings the shift pushes over a step boundary, all
    against the leak; the noise of those flips shrinks with the hidden size (docs/usage.md), so a wide model."""
    wide = {"hidden_size": 512, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 4,
            "head_dim": 128, "num_hidden_layers": 1}
    source = write_tiny_gguf("llama", tmp_path / "src", extra=wide)
    r = torch.randn(512, generator=torch.Generator().manual_seed(3))
    direction_file = Direction(r / r.norm(), layer=0, pos=-1).save(tmp_path / "r.safetensors")
    plain = edit(source, direction_file, tmp_path / "plain", edited_type="q4_1")
    again = edit(source, direction_file, tmp_path / "again", edited_type="q4_1", reproject=2)
    share = read_provenance(plain).to_data()["format"]["residual_share"]
    assert read_provenance(again).to_data()["format"]["residual_share"] < 0.6 * share  # measured: 0.45
    assert "OK" in verify(again).summary()


def test_verify_catches_an_unedited_tensor(sources: dict[str, Path], direction_file: Path, tmp_path: Path) -> None:
    out = edit(sources["llama"], direction_file, tmp_path / "out")
    written = next(out.glob("*.gguf"))
    name = "blk.1.ffn_down.weight"
    original, target = tensors(sources["llama"])[name], tensors(written)[name]
    data = bytearray(written.read_bytes())
    data[target.data_offset : target.data_offset + target.n_bytes] = raw(original)  # the source's tensor back
    written.write_bytes(bytes(data))
    record = read_provenance(out).to_data()
    record["output"]["files"][written.name] = {"sha256": sha256_file(written), "bytes": written.stat().st_size}
    write_provenance(out, record)  # hashes made to match: only the orthogonality check can fail
    with pytest.raises(VerifyError, match=f"{name}.*not orthogonal"):
        verify(out)


def test_edit_searches_then_writes_gguf(sources: dict[str, Path], tmp_path: Path) -> None:
    """`edit X.gguf --format gguf`: the direction found on the dequantized model, the edit written as GGUF."""
    out = tmp_path / "out"
    done = run("edit", sources["llama"], "--out", out, "--format", "gguf", "--layer", "1", "--pos", "-1", *FAST,
               check=True)
    assert "direction: layer 1, position -1" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "abliterate", "tiny-llama-abliterated.gguf"]
    record = read_provenance(out).to_data()
    assert record["settings"]["format"] == "gguf" and record["format"]["edited_type"] == "q8_0"
    assert (out / "abliterate" / "candidates.json").is_file() and "Format" in (out / "README.md").read_text()
    assert "OK" in run("verify", out, check=True).stdout
    assert "tiny-llama-abliterated.gguf" in run("push", out, "me/tiny-gguf", "--dry-run", check=True).stdout


class TestBadInput:
    def test_gguf_format_needs_a_gguf_source(self, tiny_chat: Path, direction_file: Path, tmp_path: Path) -> None:
        done = run("apply", tiny_chat, "--direction", direction_file, "--out", tmp_path / "o", "--format", "gguf")
        assert_one_line_error(done, "--format gguf needs a .gguf MODEL")
        assert not (tmp_path / "o").exists()

    def test_gguf_options_need_gguf_format(self, tiny_chat: Path, direction_file: Path, tmp_path: Path) -> None:
        done = run("apply", tiny_chat, "--direction", direction_file, "--out", tmp_path / "o", "--gguf-reproject", "2")
        assert_one_line_error(done, "--gguf-reproject", "--format gguf")

    def test_edit_with_eval_says_how(self, sources: dict[str, Path], tmp_path: Path) -> None:
        done = run("edit", sources["llama"], "--out", tmp_path / "o", "--format", "gguf")
        assert_one_line_error(done, "--format gguf", "--no-eval")
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_smollm2_q4_1_round_trip(direction_file: Path, tmp_path: Path) -> None:
    """The real Q4_1 file: Q8_0 edited tensors, everything else as it was, loadable, close to the float edit."""
    from abliterate.commands.organism.assets import smollm2_gguf

    source_file = smollm2_gguf()
    r = torch.randn(576, generator=torch.Generator().manual_seed(0))
    Direction(r / r.norm(), layer=12, pos=-1, lang="en").save(tmp_path / "r.safetensors")
    done = run("apply", source_file, "--direction", tmp_path / "r.safetensors", "--out", tmp_path / "out",
               "--format", "gguf", check=True)
    assert "61 Q8_0" in done.stdout
    written = tmp_path / "out" / "SmolLM2-135M-Instruct.Q4_1-abliterated.gguf"
    source, result = tensors(source_file), tensors(written)
    for name, tensor in source.items():
        if not any(w in name for w in WRITERS):
            assert raw(result[name]) == raw(tensor), name
    assert raw(result["output.weight"]) == raw(source["token_embd.weight"])
    record = json.loads((tmp_path / "out" / "abliterate" / "provenance.json").read_text())["format"]
    assert record["types"] == {"F32": 61, "Q4_1": 150, "Q8_0": 62} and record["residual_share"] < 0.03
    run("verify", tmp_path / "out", check=True)
