"""Generation engines for the refusal benchmark: transformers (`--engine hf`, the default) or vLLM (`vllm`).

`hf` answers with the forward-pass model already in memory (`evaluation.generate.generate`). `vllm` answers from a model
FOLDER on disk, in a child process (`python -m abliterate.evaluation.engines REQUEST RESPONSE`), so that

- vLLM (the `vllm` extra) is imported only there, never by the rest of abliterate;
- all of its GPU memory (weights, KV cache, CUDA graphs) goes back to the driver when the child exits: an
  in-process vLLM engine is hard to free, and the evaluation loads transformers models again afterwards (for
  the KL and lm-eval);
- the parent can check first that it holds no forward-pass model on the GPU any more (`release_gpu_memory`).

Both engines see identical inputs: prompts are rendered and tokenized here with `model.chat.render`/`model.chat.encode`
(the same calls as the transformers path) and handed to vLLM as prompt token ids. Decoding is greedy
(temperature 0), at most `max_new_tokens` tokens, stopping at the same end-of-sequence ids as the
transformers path; the answers come back as an `evaluation.generate.Generation` (ids cut at the first stop id, texts
decoded by the same tokenizer with special tokens skipped, finished flags), so results.json and the report
look the same whichever engine made them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from abliterate.errors import ModelError, UsageError
from abliterate.evaluation.generate import Generation, token_ids
from abliterate.model.chat import encode, render
from abliterate.model.loading import DTYPES, module_installed, resolve_dtype
from abliterate.storage.atomic import write_json

log = logging.getLogger(__name__)

ENGINES = ("hf", "vllm")
VLLM_HINT = "pip install 'abliterate[vllm]' on a machine with a CUDA GPU"
MEMORY_SHARE = 0.9
"""Share of the GPU memory that is free when vLLM starts which it may take (weights, activations, KV cache)."""
LOG_TAIL = 40
"""Lines of the child's output logged when it fails."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


def check_engine(engine: str, quantize: str = "none") -> None:
    """Fail before any model is loaded if `--engine` cannot run here (vLLM missing, no CUDA GPU, 8-bit)."""
    if engine == "hf":
        return
    if engine != "vllm":
        raise UsageError(f"unknown engine {engine!r}", hint=f"use one of: {', '.join(ENGINES)}")
    if not module_installed("vllm"):
        raise UsageError("--engine vllm needs vLLM, which is not installed", hint=VLLM_HINT)
    if not cuda_available():
        raise UsageError("--engine vllm needs a CUDA GPU, and none is visible", hint="use --engine hf")
    if quantize == "8bit":
        raise UsageError(
            "--engine vllm cannot quantize to 8 bits when loading (vLLM quantizes bitsandbytes in flight to 4 bits)",
            hint="use --quantize 4bit or none with --engine vllm, or --engine hf",
        )


@dataclass(frozen=True)
class VLLMOptions:
    """How the vLLM engine loads a model: dtype name, vLLM's quantization method (or None), remote code."""

    dtype: str
    quantization: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def from_settings(cls, dtype: str, quantize: str, trust_remote_code: bool = False) -> VLLMOptions:
        """--dtype as on a GPU (auto: bfloat16); --quantize 4bit: vLLM's in-flight bitsandbytes (NF4)."""
        names = {value: name for name, value in DTYPES.items()}
        return cls(names[resolve_dtype(dtype, "cuda")], "bitsandbytes" if quantize == "4bit" else None,
                   trust_remote_code)

    def describe(self) -> dict[str, Any]:
        """What changes vLLM's answers, for the generation cache key."""
        return {"engine": "vllm", "version": _vllm_version(), "dtype": self.dtype, "quantization": self.quantization}


def _vllm_version() -> str | None:
    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


def folder_stop_ids(folder: Path, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids `evaluation.generate.stop_ids` would use, from files: the tokenizer's EOS and the configured EOS ids.

    The configured ids come from generation_config.json, else config.json (as transformers fills a model's
    generation config).
    """
    configured = None
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            configured = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            if configured is not None:
                break
    return token_ids(tokenizer.eos_token_id, configured)


def cut_answer(token_ids: Sequence[int], stops: Sequence[int], finish_reason: str | None) -> tuple[list[int], bool]:
    """Ids up to the first stop id, and whether the answer ended (a stop id, or vLLM's finish reason `stop`)."""
    stop_set = set(stops)
    for i, token in enumerate(token_ids):
        if token in stop_set:
            return list(token_ids[:i]), True
    return list(token_ids), finish_reason == "stop"


def release_gpu_memory() -> int:
    """Collect freed models and empty torch's CUDA cache; the bytes this process still holds on its GPUs."""
    gc.collect()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.empty_cache()
    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))


def generate(
    folder: Path,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    max_new_tokens: int,
    stops: Sequence[int],
    options: VLLMOptions,
) -> Generation:
    """Greedy answers by vLLM from the model in `folder`, in input order, in `evaluation.generate.generate`'s format.

    The caller must have dropped its own forward-pass model: what this process still holds on the GPU is
    logged, and vLLM (in a child process) takes MEMORY_SHARE of what is free when it starts.
    """
    prompt_ids = encode(tokenizer, [render(tokenizer, text) for text in instructions])
    held = release_gpu_memory()
    if held > 2**30:
        log.warning("this process still holds %.1f GiB of GPU memory while vLLM starts", held / 2**30)
    request = {
        "folder": str(folder),
        "prompts": prompt_ids,
        "max_new_tokens": max_new_tokens,
        "stop_ids": list(stops),
        "max_model_len": max((len(ids) for ids in prompt_ids), default=1) + max_new_tokens,
        **asdict(options),
    }
    log.info("generating %d answers with vLLM from %s", len(prompt_ids), folder)
    response = run_child(request)
    ids, finished = [], []
    for answer_ids, reason in zip(response["token_ids"], response["finish_reasons"], strict=True):
        answer, ended = cut_answer(answer_ids, stops, reason)
        ids.append(answer)
        finished.append(ended)
    texts = [str(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return Generation(ids, texts, finished)


def _child_env() -> dict[str, str]:
    """This environment, with abliterate importable in the child even from a source checkout."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run_child(request: dict[str, Any]) -> dict[str, Any]:
    """Run the vLLM worker in a child process on `request`; its response (a ModelError if it failed)."""
    with tempfile.TemporaryDirectory(prefix="abliterate-vllm-") as tmp:
        request_file, response_file, log_file = (Path(tmp) / n for n in ("request.json", "response.json", "log"))
        write_json(request_file, request, indent=None)
        command = [sys.executable, "-m", "abliterate.evaluation.engines", str(request_file), str(response_file)]
        with log_file.open("w", encoding="utf-8") as output:
            done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=_child_env(), check=False)
        lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        for line in lines:
            log.debug("vllm: %s", line)
        if done.returncode != 0 or not response_file.is_file():
            for line in lines[-LOG_TAIL:]:
                log.error("vllm: %s", line)
            last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
            raise ModelError(
                f"vLLM failed on {request['folder']} (exit code {done.returncode}): {last}",
                hint="its log is above; or use --engine hf",
            )
        response: dict[str, Any] = json.loads(response_file.read_text(encoding="utf-8"))
    return response


# --- the child process: the only code that imports vLLM --------------------------------------------------


def _memory_share() -> float:
    """MEMORY_SHARE of the GPU memory free now, as the share of the whole GPU that vLLM's argument means."""
    if not torch.cuda.is_available():
        return MEMORY_SHARE
    free, total = torch.cuda.mem_get_info()
    return round(MEMORY_SHARE * free / total, 4)


def vllm_answers(request: dict[str, Any]) -> dict[str, Any]:
    """Load the model with vLLM and answer every prompt greedily (run in the child process)."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=request["folder"],
        dtype=request["dtype"],
        quantization=request["quantization"],
        trust_remote_code=request["trust_remote_code"],
        gpu_memory_utilization=_memory_share(),
        max_model_len=request["max_model_len"],
        seed=0,
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=request["max_new_tokens"], stop_token_ids=request["stop_ids"]
    )
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return {
        "token_ids": [list(out.outputs[0].token_ids) for out in outputs],
        "finish_reasons": [out.outputs[0].finish_reason for out in outputs],
    }


def main(argv: Sequence[str]) -> int:
    """`python -m abliterate.evaluation.engines REQUEST RESPONSE`: answer a request file, write the response file."""
    if len(argv) != 2:
        log.error("usage: python -m abliterate.evaluation.engines REQUEST.json RESPONSE.json")
        return 2
    request = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    response = vllm_answers(request)
    write_json(Path(argv[1]), response, indent=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
