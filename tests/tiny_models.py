"""Tiny random models, one per architecture family, saved in several shards (shared by the tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

BASE: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    max_position_embeddings=256,
)

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {},
    "gemma3_text": {},
    "phi3": {},
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}

POST_NORM_FAMILIES = {"gemma2", "gemma3_text"}


def build(
    model_type: str,
    folder: Path,
    *,
    tied: bool | None = None,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Build a random model of `model_type`, save it in 2+ safetensors shards to `folder`, return it."""
    torch.manual_seed(seed)
    kwargs = {**BASE, **FAMILIES[model_type], **(extra or {})}
    if tied is not None:
        kwargs["tie_word_embeddings"] = tied
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # random init is tiny (std 0.02); widen it so that every component matters
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
            else:
                param.normal_(0.0, 0.15)
    model.save_pretrained(folder, max_shard_size="40KB")
    return model


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


BYTE_VOCAB = 300  # model vocab_size needed by save_tokenizer(byte_level=True)


def save_tokenizer(folder: Path, vocab_size: int = 128, byte_level: bool = False) -> None:
    """A tokenizer built offline, with a chat template, saved next to a tiny model.

    Word-level by default (English words, the rest unknown); `byte_level` gives one token per UTF-8 byte,
    so that every script (Thai, Chinese, ...) is tokenized faithfully (needs a model vocab of BYTE_VOCAB).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]
    if byte_level:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        byte_vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
        tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[], unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        _save_fast(tok, specials, folder)
        return
    words = [
        "I",
        "As",
        "Sorry",
        "cannot",
        "help",
        "the",
        "a",
        "to",
        "of",
        "and",
        "how",
        "write",
        "explain",
        "make",
        "give",
        "list",
        "describe",
    ]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    filler = 0
    while len(vocab) < vocab_size:
        vocab[f"w{filler}"] = len(vocab)
        filler += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    _save_fast(tok, specials, folder)


def _save_fast(tok: object, specials: list[str], folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=specials[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
