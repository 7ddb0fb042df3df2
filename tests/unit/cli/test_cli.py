"""The CLI on tiny models: `edit`, `directions` and `apply` end to end, and every bad input answered in one line."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import FAST, assert_one_line_error, run
from tiny_models import build
from transformers import AutoModelForCausalLM

from abliterate.direction.vector import Direction
from abliterate.model.archs import lookup
from abliterate.model.checkpoint import Checkpoint
from abliterate.model.hooks import directional_ablation


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


def test_edit_end_to_end_on_tiny_model(tiny_chat: Path, tmp_path: Path) -> None:
    before = snapshot(tiny_chat)
    out = tmp_path / "edited"
    done = run("edit", tiny_chat, "--out", out, *FAST, check=True)
    assert "direction: layer" in done.stdout
    assert snapshot(tiny_chat) == before  # the source is never written to
    report = json.loads((out / "abliterate" / "candidates.json").read_text())
    assert report["candidates"] and report["chosen"]["layer"] in {c["layer"] for c in report["candidates"]}
    direction = Direction.load(out / "abliterate" / "direction.safetensors")
    assert direction.layer == report["chosen"]["layer"] and direction.lang == "en"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert float((model.model.embed_tokens.weight.detach() @ direction.vector).abs().max()) < 1e-4
    assert not any(p.name.startswith(".abliterate-tmp") for p in tmp_path.iterdir())


def test_directions_then_apply_equals_edit_with_fixed_layer(tiny_chat: Path, tmp_path: Path) -> None:
    direction_file = tmp_path / "r.safetensors"
    run("directions", tiny_chat, "--out", direction_file, "--layer", "1", "--pos", "-1", *FAST[:-1], check=True)
    assert json.loads((tmp_path / "r.candidates.json").read_text())["chosen"]["layer"] == 1
    run("apply", tiny_chat, "--direction", direction_file, "--out", tmp_path / "a", check=True)
    run("edit", tiny_chat, "--out", tmp_path / "b", "--layer", "1", "--pos", "-1", *FAST, check=True)
    shards = sorted((tmp_path / "a").glob("model-*.safetensors"))
    assert shards and [p.name for p in shards] == sorted(p.name for p in (tmp_path / "b").glob("model-*.safetensors"))
    for shard in shards:
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()  # deterministic


def test_gguf_is_not_needed_for_apply_of_pickle_only_with_flag(tmp_path: Path) -> None:
    source = tmp_path / "bin-model"
    model = build("llama", source)
    for shard in source.glob("*.safetensors*"):
        shard.unlink()
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    Direction(torch.randn(32)).save(tmp_path / "r.safetensors")
    done = run("apply", source, "--direction", tmp_path / "r.safetensors", "--out", tmp_path / "out")
    assert_one_line_error(done, "pickle", "--allow-pickle")
    assert not (tmp_path / "out").exists()
    run(
        "apply",
        source,
        "--direction",
        tmp_path / "r.safetensors",
        "--out",
        tmp_path / "out",
        "--allow-pickle",
        check=True,
    )
    # Every tensor of the pickle source is in the output: untouched ones equal, residual writers orthogonal to r.
    r = Direction.load(tmp_path / "r.safetensors").vector
    edited = Checkpoint.open(tmp_path / "out")
    arch = lookup("llama")
    source_state = model.state_dict()
    assert set(edited.tensors) == set(source_state)
    writers = 0
    for name, original in source_state.items():
        if arch.classify(name) is None:
            assert torch.equal(edited.get(name), original), name
        else:
            axis = -1 if name == arch.embedding_tensor else 0
            leak = torch.tensordot(edited.get(name), r, dims=([axis], [0]))
            assert float(leak.abs().max()) < 1e-5, name
            writers += 1
    assert writers == 1 + 2 * 3  # the embedding, then o_proj and down_proj of 3 layers
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), directional_ablation(model, arch, r):
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-4)


class TestBadInput:
    def test_unknown_model_path(self, tmp_path: Path) -> None:
        done = run("edit", tmp_path / "nope", "--out", tmp_path / "out")
        assert_one_line_error(done, "not found")
        assert not (tmp_path / "out").exists()

    def test_unsupported_family(self, tmp_path: Path) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
        done = run("edit", tmp_path / "gpt2", "--out", tmp_path / "out")
        assert_one_line_error(done, "unsupported model family 'gpt2'", "llama", "qwen2")
        assert not (tmp_path / "out").exists()

    def test_unknown_lang(self, tiny_chat: Path, tmp_path: Path) -> None:
        done = run("edit", tiny_chat, "--lang", "xx", "--out", tmp_path / "out")
        assert_one_line_error(done, "unknown language code 'xx'", "de")

    def test_layer_out_of_range(self, tiny_chat: Path, tmp_path: Path) -> None:
        done = run("edit", tiny_chat, "--layer", "99", "--out", tmp_path / "out", *FAST)
        assert_one_line_error(done, "--layer 99", "0..2")
        assert not (tmp_path / "out").exists()

    def test_existing_out_without_overwrite(self, tiny_chat: Path, tmp_path: Path) -> None:
        out = tmp_path / "out"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        done = run("edit", tiny_chat, "--out", out, *FAST)
        assert_one_line_error(done, "already exists", "--overwrite")
        assert (out / "keep.txt").read_text() == "mine"

    def test_directions_overwrite_replaces_a_file(self, tiny_chat: Path, tmp_path: Path) -> None:
        out = tmp_path / "r.safetensors"
        search = [a for a in FAST if a != "--no-eval"]
        run("directions", tiny_chat, "--out", out, "--layer", "1", "--pos", "-1", *search, check=True)
        before = out.read_bytes()
        assert_one_line_error(run("directions", tiny_chat, "--out", out, *search), "already exists", "--overwrite")
        assert out.read_bytes() == before
        done = run("directions", tiny_chat, "--out", out, "--layer", "2", "--pos", "-1", "--overwrite", *search)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() != before

    def test_direction_of_wrong_size(self, tiny_chat: Path, tmp_path: Path) -> None:
        Direction(torch.randn(48)).save(tmp_path / "r.safetensors")
        done = run("apply", tiny_chat, "--direction", tmp_path / "r.safetensors", "--out", tmp_path / "out")
        assert_one_line_error(done, "48 dimensions", "hidden_size is 32")
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".abliterate-tmp")]

    def test_output_inside_source(self, tiny_chat: Path) -> None:
        done = run("edit", tiny_chat, "--out", tiny_chat / "edited", *FAST)
        assert_one_line_error(done, "inside the source")

    def test_nonsense_shard_size(self, tiny_chat: Path, tmp_path: Path) -> None:
        done = run("edit", tiny_chat, "--max-shard-size", "lots", "--out", tmp_path / "out")
        assert_one_line_error(done, "lots", "5GB")

    def test_traceback_only_with_verbose(self, tmp_path: Path) -> None:
        done = run("-v", "edit", tmp_path / "nope", "--out", tmp_path / "out")
        assert done.returncode != 0 and "Traceback" in done.stderr


def test_batch_size_auto_end_to_end(tiny_chat: Path, tmp_path: Path) -> None:
    at = FAST.index("--batch-size")
    fast = [*FAST[:at], *FAST[at + 2 : -1], "--no-filter-prompts"]  # --no-eval is not a `directions` option
    run("directions", tiny_chat, "--out", tmp_path / "r.safetensors", "--batch-size", "auto", *fast, check=True)
    report = json.loads((tmp_path / "r.candidates.json").read_text())
    assert report["batch_size"] in {1, 2, 4, 8}  # powers of two up to the 8 prompts of a train split
    passes = report["forward_passes"]
    assert passes["filter"] == 0 and passes["total"] == sum(v for k, v in passes.items() if k != "total")
    assert passes["activations"] == 2 * -(-8 // report["batch_size"])
    assert_one_line_error(run("eval", tiny_chat, "--out", tmp_path / "e.json", "--batch-size", "auto"), "auto")
    assert_one_line_error(run("directions", tiny_chat, "--out", tmp_path / "x", "--batch-size", "0"), "batch_size")
