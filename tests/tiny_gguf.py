"""Tiny GGUF files written the way llama.cpp's converter writes them, from the tiny random models of tiny_models.

Names come from gguf's TensorNameMap; llama's q/k rows are permuted as llama.cpp does (transformers undoes it
on load), Gemma 2's norms are stored as 1 + w, MoE experts are stacked into one tensor per layer and kind.
The tokenizer is byte-level (gpt2 type): every byte a token, one merge, with the tiny chat template.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tiny_models import CHAT_TEMPLATE, build
from transformers import PreTrainedModel

VOCAB = 300  # 8 specials, 256 byte symbols, one merge, then filler tokens
ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "gemma2": gguf.MODEL_ARCH.GEMMA2}
FAMILY_EXTRA: dict[str, dict[str, Any]] = {
    "llama": {},
    # transformers' GGUF loader does not read expert_feed_forward_length: it takes Qwen3MoeConfig's default, 768
    "qwen3_moe": {"moe_intermediate_size": 768},
    "gemma2": {},
}
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def _tokens() -> list[str]:
    from tokenizers import pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["ab"]
    return tokens + [f"<extra_{i}>" for i in range(VOCAB - len(tokens))]


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary halves)."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _gguf_tensors(model: PreTrainedModel, family: str) -> dict[str, np.ndarray]:
    config = model.config
    names = gguf.get_tensor_name_map(ARCHES[family], config.num_hidden_layers)
    state = {name: tensor.detach().to(torch.float32).numpy() for name, tensor in model.state_dict().items()}
    stacked: dict[str, list[tuple[int, np.ndarray]]] = {}
    out: dict[str, np.ndarray] = {}
    for name, array in state.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        merged = _EXPERT.sub(".experts.", name)
        if merged.endswith(".experts.gate_up_proj"):  # transformers' fused experts [E, 2 I, H]: gate, then up
            layer = merged.split(".")[2]
            gate, up = np.split(array, 2, axis=1)
            out[f"blk.{layer}.ffn_gate_exps.weight"], out[f"blk.{layer}.ffn_up_exps.weight"] = gate, up
            continue
        target = names.get_name(merged, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise KeyError(f"no GGUF name for {name}")
        if not target.endswith((".weight", ".bias")):  # transformers' fused expert parameters have no suffix
            target += ".weight"
        if family == "llama" and ".attn_q." in target:
            array = _permute(array, config.num_attention_heads)
        elif family == "llama" and ".attn_k." in target:
            array = _permute(array, config.num_key_value_heads)
        if family == "gemma2" and name.endswith("norm.weight"):
            array = array + 1.0
        if merged != name:
            expert = int(_EXPERT.search(name).group(1))  # type: ignore[union-attr]
            stacked.setdefault(target, []).append((expert, array))
        else:
            out[target] = array
    for target, parts in stacked.items():
        out[target] = np.stack([array for _, array in sorted(parts, key=lambda p: p[0])])
    return out


def _metadata(writer: gguf.GGUFWriter, model: PreTrainedModel, family: str) -> None:
    c = model.config
    arch = gguf.MODEL_ARCH_NAMES[ARCHES[family]]
    writer.add_name(f"tiny-{family}")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if family == "qwen3_moe":
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    if family == "gemma2":
        writer.add_key_value(f"{arch}.attn_logit_softcapping", float(c.attn_logit_softcapping),
                             gguf.GGUFValueType.FLOAT32)
        writer.add_key_value(f"{arch}.final_logit_softcapping", float(c.final_logit_softcapping),
                             gguf.GGUFValueType.FLOAT32)
        writer.add_sliding_window(c.sliding_window)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_tokens())
    writer.add_token_types([gguf.TokenType.CONTROL] * 8 + [gguf.TokenType.NORMAL] * (VOCAB - 8))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)


def quantize(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """`array` in `qtype` where its rows fit the type's blocks; 1-D tensors stay float32 as llama.cpp keeps them."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.ndim == 1 or array.shape[-1] % block:
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    return gguf.quants.quantize(array, qtype), qtype


def write_tiny_gguf(
    family: str,
    folder: Path,
    *,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q8_0,
    tied: bool = True,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A tiny random model of `family` as `folder/tiny-FAMILY.gguf` (matrices in `qtype`); returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    hf_folder = folder / f"hf-{family}"
    config = {"vocab_size": VOCAB, **FAMILY_EXTRA[family], **(extra or {})}
    model = build(family, hf_folder, tied=tied, seed=seed, extra=config)
    path = folder / f"tiny-{family}.gguf"
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCHES[family]])
    _metadata(writer, model, family)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for name, array in _gguf_tensors(model, family).items():
        data, dtype = quantize(array, qtype)
        writer.add_tensor(name, data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_like(template: Path, model: PreTrainedModel, family: str, path: Path) -> Path:
    """`model`'s weights in the layout of the GGUF file `template`: its metadata (tokenizer, chat template), its
    tensor names and each tensor's type (quantized with gguf's quantizer). For a fine-tune of the template's
    model (the organism is SmolLM2 safety-tuned), this is the file llama.cpp's converter would have written."""
    reader = gguf.GGUFReader(template)
    arrays = _gguf_tensors(model, family)
    writer = gguf.GGUFWriter(path, str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key == "general.architecture" or key.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        array = arrays[tensor.name]
        data = array if tensor.tensor_type == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(
            array, tensor.tensor_type)
        writer.add_tensor(tensor.name, np.ascontiguousarray(data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
