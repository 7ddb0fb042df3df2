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
    # dense, with per-layer inputs (a third writer, per_layer_projection, behind post_per_layer_input_norm)
    "gemma4_text": dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=128, global_head_dim=8),
    "phi3": {},
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "smollm3": {},
    "olmo2": {},
    "olmo3": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=4),
    "glm4_moe": dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_group=1,
        topk_group=1, attention_bias=True,
    ),
    "deepseek_v3": dict(  # MLA: q and kv through rank-16 projections; layer 0 dense, then 4 experts + shared
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_group=1,
        topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4,
        num_key_value_heads=4,  # MLA has one key/value head per query head (padded batches fail otherwise)
    ),
    "qwen3_next": dict(  # gated DeltaNet, full attention, DeltaNet
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
    ),
    "granitemoehybrid": dict(  # Mamba-2, attention, Mamba-2; residual multiplier 0.5
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=24, shared_intermediate_size=16,
        layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
        mamba_n_groups=1, mamba_expand=2, residual_multiplier=0.5, embedding_multiplier=2.0,
    ),
    "gpt_oss": dict(  # expert width 24 != hidden 32, so that a wrong hidden axis of the fused stack shows
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=24, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}

_HYBRID = dict(
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
)
_SMALL_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                     patch_size=4)
# Multimodal families: (class saved, language-model config overrides, vision config, top-level config). The text
# part gets BASE and the overrides; the checkpoint is written by the multimodal class, in the layout transformers
# gives it (which for gemma3, mistral3 and llama4 is the hub's older language_model.model.* layout).
MULTIMODAL: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "qwen3_5": (
        "Qwen3_5ForConditionalGeneration", _HYBRID,
        dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
             temporal_patch_size=1, spatial_merge_size=1),
        {},
    ),
    "qwen3_5_moe": (
        "Qwen3_5MoeForConditionalGeneration",
        dict(_HYBRID, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
             shared_expert_intermediate_size=16),
        dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
             temporal_patch_size=1, spatial_merge_size=1),
        {},
    ),
    "llama4": (  # layer 0 dense, layer 1 MoE (shared expert + fused experts), layer 2 dense
        "Llama4ForConditionalGeneration",
        dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=16, intermediate_size_mlp=64,
             interleave_moe_layer_step=2, no_rope_layers=[1, 1, 0], attention_chunk_size=8),
        dict(_SMALL_VISION, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16),
        {},
    ),
    "gemma3": ("Gemma3ForConditionalGeneration", {}, _SMALL_VISION, dict(mm_tokens_per_image=4)),
    "gemma4": (  # MoE (dense MLP and fused experts, each behind its own norm, then a norm on their sum), no PLE
        "Gemma4ForConditionalGeneration",
        dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
             hidden_size_per_layer_input=0, global_head_dim=8),
        dict(_SMALL_VISION, head_dim=8, global_head_dim=8),
        {},
    ),
    "mistral3": ("Mistral3ForConditionalGeneration", {}, dict(_SMALL_VISION, head_dim=8), dict(spatial_merge_size=1)),
}
FAMILIES.update({family: {} for family in MULTIMODAL})

POST_NORM_FAMILIES = {"gemma2", "gemma3_text", "olmo2", "olmo3", "gemma3", "gemma4_text", "gemma4"}


def _multimodal(model_type: str, kwargs: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    import transformers

    cls, text, vision, top = MULTIMODAL[model_type]
    tied = {k: v for k, v in kwargs.items() if k == "tie_word_embeddings"}
    config = AutoConfig.for_model(
        model_type, text_config={**kwargs, **text}, vision_config=vision, **top, **tied
    )
    model: PreTrainedModel = getattr(transformers, cls)._from_config(config, dtype=dtype)
    return model.eval()


def load(folder: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A saved tiny model loaded the way the tool loads it for forward passes (`model.loading.auto_model_class`)."""
    from abliterate.model.loading import auto_model_class

    model: PreTrainedModel = auto_model_class(folder).from_pretrained(folder, dtype=dtype)
    return model.eval()


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
    if model_type in MULTIMODAL:
        model = _multimodal(model_type, kwargs, dtype)
    else:
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


PLANTED_LAYERS = 6
PLANTED_WRITER = 2  # the attention block of this layer writes the refusal direction: layer 3's input carries it
HARMFUL_WORDS = [f"w{i}" for i in range(0, 20)]
HARMLESS_WORDS = [f"w{i}" for i in range(20, 40)]
SHARED_WORDS = ["how", "to", "write", "explain", "make", "the", "a", "give"]


def _planted_prompts(folder: Path, seed: int) -> Path:
    """Word-soup prompts: harmful ones hold 2-4 words of HARMFUL_WORDS, harmless ones the same count of others."""
    import json
    import random

    rng = random.Random(seed)
    rows = []
    for kind, words in (("harmful", HARMFUL_WORDS), ("harmless", HARMLESS_WORDS)):
        for split, count in (("train", 24), ("val", 12), ("test", 4)):
            for i in range(count):
                text = rng.sample(SHARED_WORDS, rng.randint(2, 4)) + rng.sample(words, rng.randint(2, 4))
                rng.shuffle(text)
                rows.append({"id": f"{kind}-{split}-{i}", "instruction": " ".join(text), "kind": kind, "split": split})
    path = folder / "planted_prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def build_planted(folder: Path, seed: int = 0) -> tuple[Path, torch.Tensor, int, Path]:
    """A tiny llama whose refusal is mediated by one planted direction d, written at one known layer.

    - Token embeddings are random and orthogonal to two unit vectors f and d; the harmful words add 4 f.
    - Layer PLANTED_WRITER's attention has zero queries and keys (uniform causal attention); its value/output
      projections map f to 3 d. So from the input of layer PLANTED_WRITER + 1 on, every position of a harmful
      prompt carries d; before it, no position does.
    - The unembedding row of "Sorry" is 4 d: d in the last residual makes the model start with "Sorry".
    - Everything else keeps the small default initialisation (std 0.02), so that it barely moves the stream.
    Returns (model folder, d, the first layer whose input carries d, prompt file).
    """
    torch.manual_seed(seed)
    model_dir = folder / "planted-model"
    config = AutoConfig.for_model(
        "llama", **{**BASE, "num_hidden_layers": PLANTED_LAYERS, "tie_word_embeddings": False}
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    save_tokenizer(model_dir)
    hidden = BASE["hidden_size"]
    q, _ = torch.linalg.qr(torch.randn(hidden, 2))
    f, d = q[:, 0].contiguous(), q[:, 1].contiguous()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        emb = torch.randn(BASE["vocab_size"], hidden)
        emb -= torch.outer(emb @ f, f) + torch.outer(emb @ d, d)
        for word in HARMFUL_WORDS:
            emb[tokenizer.convert_tokens_to_ids(word)] += 4.0 * f
        model.model.embed_tokens.weight.copy_(emb)
        attention = model.model.layers[PLANTED_WRITER].self_attn
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
            proj.weight.zero_()
        attention.v_proj.weight[0] = f  # kv head 0, dim 0 reads the f component of the normalized input
        attention.o_proj.weight[:, 0] = 3.0 * d  # query head 0, dim 0 writes it along d
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("Sorry")] = 4.0 * d
    model.save_pretrained(model_dir, max_shard_size="40KB")
    return model_dir, d, PLANTED_WRITER + 1, _planted_prompts(folder, seed)
