"""`abliterate edit` on the one real chat model reachable offline: SmolLM2-135M-Instruct from its GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate.commands.organism.assets import smollm2_gguf
from abliterate.direction.vector import Direction
from abliterate.model.archs import lookup
from abliterate.model.hooks import directional_ablation
from abliterate.model.loading import resolve

pytestmark = pytest.mark.slow


def test_edit_gguf_end_to_end(tmp_path: Path) -> None:
    gguf = smollm2_gguf()
    out = tmp_path / "smollm2-edited"
    done = run(
        "edit",
        gguf,
        "--out",
        out,
        "--n-train",
        "32",
        "--n-val",
        "8",
        "--screen-prompts",
        "4",
        "--finalists",
        "3",
        "--batch-size",
        "16",
        "--no-eval",
        check=True,
    )
    assert "direction: layer" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # dequantized: nothing may claim GGUF quantization
    assert config["tie_word_embeddings"] is False  # SmolLM2 ties; the edit unties
    direction = Direction.load(out)
    assert direction.hidden_size == 576 and 0 <= direction.layer < 24  # last 20% of 30 layers pruned
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # copied with the tokenizer
    emb = model.get_input_embeddings().weight.detach()
    assert float((emb @ direction.vector).abs().max()) < 1e-4
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    # The edited checkpoint behaves as the base model with r ablated at inference time (independent hooks).
    base = AutoModelForCausalLM.from_pretrained(resolve(str(gguf)).folder, dtype=torch.float32).eval()
    with torch.no_grad():
        edited_logits = model(**ids).logits
        with directional_ablation(base, lookup("llama"), direction.vector):
            ablated_logits = base(**ids).logits
            ablated_answer = base.generate(**ids, max_new_tokens=8, do_sample=False)
        generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert float((edited_logits - ablated_logits).abs().max()) < 1e-3  # float32 sums in another order
    assert torch.equal(generated, ablated_answer) and generated.shape[1] > ids["input_ids"].shape[1]
