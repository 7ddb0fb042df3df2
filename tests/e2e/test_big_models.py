"""Big-model options on tiny random models: `--quantize` (bitsandbytes, on the CPU here) and `--engine vllm`.

vLLM cannot run here (no CUDA GPU), so its error paths are tested through the real CLI, and its plumbing
(prompt token ids, greedy settings, stop ids, cache, the order of models in GPU memory) against a stand-in
with vLLM's offline API in tests/fake_vllm that answers with transformers on the CPU.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import needs
import pytest
import torch
from safetensors import safe_open
from tiny_models import build, save_tokenizer
from transformers import AutoModelForCausalLM

from abliterate.commands import edit
from abliterate.direction import search
from abliterate.direction.vector import Direction
from abliterate.errors import UsageError
from abliterate.evaluation import engines, evaluate
from abliterate.evaluation.answer_cache import generation_key, model_identity
from abliterate.evaluation.engines import check_engine, cut_answer, folder_stop_ids
from abliterate.evaluation.evaluate import run_eval
from abliterate.evaluation.generate import stop_ids
from abliterate.model.loading import ModelSource, load_model
from abliterate.settings import build_settings

FAKE_VLLM = Path(__file__).parents[1] / "fake_vllm"
WIDE = dict(hidden_size=64, intermediate_size=128, head_dim=16)  # bitsandbytes' CPU 4-bit kernels need 64 | inputs
SEARCH = ["--n-train", "8", "--n-val", "4", "--batch-size", "8", "--refusal-tokens", "I", "--refusal-tokens", "Sorry",
          "--layer", "1", "--pos", "-1", "--no-filter-prompts"]  # one candidate, the same prompts for every run
EVAL = {"langs": "en,de", "eval_prompts": 3, "max_new_tokens": 6, "tasks": "none", "batch_size": 4,
        "dtype": "float32"}


def run(
    *args: str | Path, env: dict[str, str] | None = None, code: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The console entry point in a subprocess, offline; `code` runs first (e.g. to hide a module)."""
    entry = ["-m", "abliterate"] if code is None else ["-c", f"{code}; from abliterate.cli import main; main()"]
    return subprocess.run(
        [sys.executable, *entry, *map(str, args)], capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def only_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """Exit code 2 and stderr that is exactly one `error:` line (no traceback, no log lines)."""
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def wide_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama chat model whose linear layers bitsandbytes can quantize to 4 bits on the CPU (bf16 on disk)."""
    folder = tmp_path_factory.mktemp("wide") / "llama-wide"
    build("llama", folder, tied=True, extra=WIDE, dtype=torch.bfloat16)
    save_tokenizer(folder)
    return folder


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))


# --- --quantize ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_precision_direction(wide_chat: Path, tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    out = tmp_path_factory.mktemp("directions") / "none.safetensors"
    done = run("directions", wide_chat, "--out", out, *SEARCH)
    assert done.returncode == 0, done.stderr
    return Direction.load(out).vector


@pytest.mark.parametrize(("quantize", "at_least"), [("8bit", 0.98), ("4bit", 0.95)])
def test_quantized_direction_is_close_to_the_float32_one(
    quantize: str, at_least: float, wide_chat: Path, full_precision_direction: torch.Tensor, tmp_path: Path
) -> None:
    needs.module("bitsandbytes")
    out = tmp_path / f"{quantize}.safetensors"
    done = run("directions", wide_chat, "--out", out, *SEARCH, "--quantize", quantize)
    assert done.returncode == 0, done.stderr
    assert f"with {quantize} bitsandbytes quantization" in done.stderr
    assert cosine(Direction.load(out).vector, full_precision_direction) > at_least


def test_quantized_edit_streams_the_original_shards(wide_chat: Path, tmp_path: Path) -> None:
    needs.module("bitsandbytes")
    out = tmp_path / "edited"
    done = run("edit", wide_chat, "--out", out, *SEARCH, "--quantize", "8bit", "--no-eval")
    assert done.returncode == 0, done.stderr
    shards = sorted(out.glob("model-*.safetensors"))
    assert shards
    for shard in shards:
        with safe_open(shard, "pt") as fh:
            assert {fh.get_slice(name).get_dtype() for name in fh.keys()} == {"BF16"}  # noqa: SIM118
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    # the same direction applied with no forward pass at all gives the same bytes: the edit read the source shards
    again = tmp_path / "applied"
    done = run("apply", wide_chat, "--direction", out, "--out", again)
    assert done.returncode == 0, done.stderr
    for shard in shards:
        assert shard.read_bytes() == (again / shard.name).read_bytes()


def test_edited_checkpoint_is_evaluated_in_the_base_quantization(
    wide_chat: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs.module("bitsandbytes")
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    loads: list[tuple[str, str]] = []

    def spy(source: ModelSource, **kwargs: Any) -> Any:
        model, tokenizer = load_model(source, **kwargs)
        loads.append((kwargs["quantize"], type(model.model.layers[0].mlp.down_proj).__name__))
        return model, tokenizer

    monkeypatch.setattr(search, "load_model", spy)
    monkeypatch.setattr(evaluate, "load_model", spy)
    settings = build_settings(None, {
        "model": str(wide_chat), "out": tmp_path / "edited", "n_train": 8, "n_val": 4, "layer": 1, "pos": -1,
        "refusal_tokens": ["I"], "filter_prompts": False, "quantize": "8bit", **EVAL,
    })
    result = edit.run_edit(settings)
    assert loads == [("8bit", "Linear8bitLt")] * 2  # the base for the search, the edited checkpoint for the eval
    assert result.report is not None
    report = json.loads((result.out / "abliterate" / "report.json").read_text())
    assert report["before"]["settings"]["quantize"] == report["after"]["settings"]["quantize"] == "8bit"


def test_quantization_is_part_of_the_generation_cache_key(wide_chat: Path) -> None:
    needs.module("bitsandbytes")
    source = ModelSource(str(wide_chat), wide_chat)
    keys = set()
    for quantize in ("none", "8bit"):
        model, tokenizer = load_model(source, dtype="float32", device="cpu", quantize=quantize)
        keys.add(generation_key(model_identity(wide_chat), model, tokenizer, ["hello"], 4, 2))
    assert len(keys) == 2


HIDE_BITSANDBYTES = "import sys; sys.modules['bitsandbytes'] = None"


@pytest.mark.parametrize("command", ["directions", "edit", "eval"])
def test_quantize_without_bitsandbytes_is_one_line(command: str, tiny_chat: Path, tmp_path: Path) -> None:
    out = tmp_path / ("out.json" if command == "eval" else "out")
    done = run(command, tiny_chat, "--out", out, "--quantize", "4bit", code=HIDE_BITSANDBYTES)
    line = only_error_line(done)
    assert "--quantize 4bit needs bitsandbytes" in line and "pip install 'abliterate[quantize]'" in line
    assert not out.exists() and not list(tmp_path.iterdir())


# --- --engine vllm: errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["edit", "eval"])
def test_engine_vllm_without_vllm_is_one_line(command: str, tiny_chat: Path, tmp_path: Path) -> None:
    out = tmp_path / ("out.json" if command == "eval" else "out")
    done = run(command, tiny_chat, "--out", out, "--engine", "vllm")
    line = only_error_line(done)
    assert "--engine vllm needs vLLM" in line and "pip install 'abliterate[vllm]'" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("command", ["edit", "eval"])
def test_engine_vllm_without_a_gpu_is_one_line(command: str, tiny_chat: Path, tmp_path: Path) -> None:
    out = tmp_path / ("out.json" if command == "eval" else "out")
    done = run(command, tiny_chat, "--out", out, "--engine", "vllm", env={"PYTHONPATH": str(FAKE_VLLM)})
    line = only_error_line(done)
    assert "--engine vllm needs a CUDA GPU" in line and "use --engine hf" in line
    assert not list(tmp_path.iterdir())


def test_engine_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    check_engine("hf", "8bit")
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    check_engine("vllm", "4bit")
    with pytest.raises(UsageError, match="8 bits"):
        check_engine("vllm", "8bit")


def test_answers_are_cut_like_the_transformers_path() -> None:
    assert cut_answer([5, 6, 2, 7], [2], "stop") == ([5, 6], True)
    assert cut_answer([5, 6], [2], "stop") == ([5, 6], True)  # a stop token vLLM left out of token_ids
    assert cut_answer([5, 6], [2], "length") == ([5, 6], False)


def test_stop_ids_from_files_match_the_loaded_model(tiny_chat: Path) -> None:
    model, tokenizer = load_model(ModelSource(str(tiny_chat), tiny_chat), dtype="float32", device="cpu")
    assert folder_stop_ids(tiny_chat, tokenizer) == stop_ids(model, tokenizer)


# --- --engine vllm: the plumbing, against the stand-in ---------------------------------------------------


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """vLLM's API importable here and in the child process, a CUDA GPU pretended; returns the event log."""
    events = tmp_path / "events.jsonl"
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    monkeypatch.setenv("PYTHONPATH", str(FAKE_VLLM))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(events))
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    return events


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def log_loads(monkeypatch: pytest.MonkeyPatch, events: Path) -> None:
    """Log every transformers model the evaluation loads into the same event log as the stand-in's LLM(...)."""
    inner: Callable[..., Any] = evaluate.load_for_eval

    def logged(source: ModelSource, *args: Any, **kwargs: Any) -> Any:
        with events.open("a") as fh:
            fh.write(json.dumps({"event": "load", "model": str(source.folder)}) + "\n")
        return inner(source, *args, **kwargs)

    monkeypatch.setattr(evaluate, "load_for_eval", logged)


def test_vllm_answers_equal_the_transformers_answers(tiny_chat: Path, tmp_path: Path, fake_vllm: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    log_loads(monkeypatch, fake_vllm)
    hf = run_eval(build_settings(None, {"model": str(tiny_chat), "out": tmp_path / "hf.json", **EVAL}))
    fake_vllm.unlink()
    settings = build_settings(None, {"model": str(tiny_chat), "out": tmp_path / "vllm.json", "engine": "vllm", **EVAL})
    first = run_eval(settings)
    assert first.languages == hf.languages and first.settings.engine == "vllm"
    assert first.model == hf.model and first.to_data()["cache"] == {"enabled": True, "hits": 0, "misses": 4}
    (llm,) = read_events(fake_vllm)  # one vLLM run for all prompts, and no transformers model (no KL, no lm-eval)
    assert llm["model"] == str(tiny_chat.resolve()) and llm["dtype"] == "float32" and llm["quantization"] is None
    assert llm["gpu_memory_utilization"] == engines.MEMORY_SHARE and llm["seed"] == 0
    again = run_eval(settings)
    assert again.to_data()["cache"]["hits"] == 4 and again.languages == first.languages
    assert len(read_events(fake_vllm)) == 1  # answered from the cache: vLLM did not start


def test_edit_with_vllm_frees_the_forward_pass_model_first(tiny_chat: Path, tmp_path: Path, fake_vllm: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    log_loads(monkeypatch, fake_vllm)
    held: list[weakref.ref[Any]] = []
    inner_load = edit.load
    inner_child = engines.run_child

    def load(settings: Any) -> Any:
        loaded = inner_load(settings)
        held.append(weakref.ref(loaded.model))
        return loaded

    def child(request: dict[str, Any]) -> dict[str, Any]:
        gc.collect()
        assert held and held[0]() is None, "the forward-pass model is still alive while vLLM starts"
        return inner_child(request)

    monkeypatch.setattr(edit, "load", load)
    monkeypatch.setattr(engines, "run_child", child)
    out = tmp_path / "edited"
    settings = build_settings(None, {
        "model": str(tiny_chat), "out": out, "n_train": 8, "n_val": 4, "layer": 1, "pos": -1,
        "refusal_tokens": ["I"], "engine": "vllm", **EVAL,
    })
    result = edit.run_edit(settings)
    events = read_events(fake_vllm)
    assert [e["event"] for e in events] == ["vllm", "vllm", "load"]
    assert events[0]["model"] == str(tiny_chat.resolve())
    assert Path(events[1]["model"]).name.startswith(".abliterate-tmp") and events[2]["model"] == events[1]["model"]
    assert result.report is not None
    report = json.loads((out / "abliterate" / "report.json").read_text())
    assert report["after_model"]["folder"] == str(out.resolve())
    assert report["before"]["settings"]["engine"] == "vllm" and report["kl"]["n_prompts"] > 0
    assert {r["lang"] for r in report["languages"]} == {"en", "de"}
