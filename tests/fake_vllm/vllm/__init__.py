"""A stand-in for vLLM's offline API (`LLM`, `SamplingParams`) for tests on machines without vLLM or a GPU.

It accepts only the arguments abliterate passes (as vLLM documents them), answers greedily with transformers on
the CPU, one prompt at a time from its prompt token ids, and, like vLLM, keeps a stop token at the end of
`token_ids` with finish_reason "stop" ("length" when max_tokens ran out). Every `LLM(...)` appends its arguments
as a JSON line to the file named by FAKE_VLLM_LOG, if set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM


class SamplingParams:
    def __init__(self, *, temperature: float = 1.0, max_tokens: int = 16, stop_token_ids: list[int] | None = None):
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.stop_token_ids = list(stop_token_ids or [])


@dataclass
class CompletionOutput:
    token_ids: list[int]
    finish_reason: str


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    def __init__(
        self,
        model: str,
        *,
        dtype: str,
        quantization: str | None,
        trust_remote_code: bool,
        gpu_memory_utilization: float,
        max_model_len: int,
        seed: int,
    ) -> None:
        record = {"model": model, "dtype": dtype, "quantization": quantization, "trust_remote_code": trust_remote_code,
                  "gpu_memory_utilization": gpu_memory_utilization, "max_model_len": max_model_len, "seed": seed}
        if os.environ.get("FAKE_VLLM_LOG"):
            with open(os.environ["FAKE_VLLM_LOG"], "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"event": "vllm", **record}) + "\n")
        self.max_model_len = max_model_len
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def generate(self, prompts: list[dict[str, Any]], sampling_params: SamplingParams, *, use_tqdm: bool = True
                 ) -> list[RequestOutput]:
        assert sampling_params.temperature == 0.0, "abliterate asks for greedy decoding"
        return [RequestOutput([self._greedy(list(p["prompt_token_ids"]), sampling_params)]) for p in prompts]

    def _greedy(self, ids: list[int], params: SamplingParams) -> CompletionOutput:
        assert len(ids) + params.max_tokens <= self.max_model_len
        answer: list[int] = []
        with torch.inference_mode():
            for _ in range(params.max_tokens):
                logits = self.model(torch.tensor([ids + answer])).logits[0, -1]
                answer.append(int(logits.argmax()))
                if answer[-1] in params.stop_token_ids:
                    return CompletionOutput(answer, "stop")
        return CompletionOutput(answer, "length")
