"""Memory and disk a run needs, from config.json and the checkpoint's headers alone (no weight is loaded).

- Weights: every stored tensor's element count converted to the run's dtype (`--dtype`, auto: float32 on the
  CPU, bfloat16 on a GPU); with `--quantize`, the decoder's matrices at 1 byte (8bit) or about 0.56 byte (4bit:
  NF4 plus its block scales) per parameter. A tied model's unembedding is the embedding (no second copy).
- The largest batch: hidden states and MLP activations of one layer for rows x tokens, the attention scores of
  one layer, and the last position's logits; a generation batch adds its KV cache over prompt + answer tokens.
- Fixed costs: the Python/torch/transformers process itself (CPU), allocator slack on a GPU.
- The streaming edit: the process, the largest tensor (memory-mapped) and one 64 MB float32 block
  (docs/performance.md); the output's bytes exactly as `edit.stream` will lay them out in shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from abliterate.edit.stream import make_plan, output_specs
from abliterate.model.checkpoint import Checkpoint
from abliterate.storage.shards import plan_shards
from abliterate.storage.tensors import DTYPES

PROCESS_BYTES = 600 * 2**20  # Python, torch and transformers, resident (0.5-0.6 GB measured, docs/performance.md)
EDIT_BLOCK_BYTES = 64 * 2**20  # the streaming edit's float32 block
GPU_SLACK = 1.10  # the CUDA caching allocator's fragmentation on top of live tensors
NF4_BYTES = 0.5 + 4 / 64 / 8 + 4 / 256  # 4-bit values, double-quantized absmax per 64, scales per 256
INT8_BYTES = 1.0


def config_int(config: dict[str, object], *names: str, default: int = 0) -> int:
    """The first of `names` in config.json or its text_config."""
    text = config.get("text_config")
    for scope in (config, text if isinstance(text, dict) else {}):
        for name in names:
            value = scope.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return default


@dataclass(frozen=True)
class ModelShape:
    """The config's sizes that memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config: dict[str, object]) -> ModelShape:
        hidden = config_int(config, "hidden_size", "d_model", "n_embd")
        heads = config_int(config, "num_attention_heads", "n_head", default=1)
        return cls(
            layers=config_int(config, "num_hidden_layers", "n_layer", default=1),
            hidden=hidden,
            intermediate=config_int(config, "moe_intermediate_size", "intermediate_size", "ffn_dim",
                                     default=4 * hidden),
            heads=heads,
            kv_heads=config_int(config, "num_key_value_heads", default=heads),
            head_dim=config_int(config, "head_dim", default=hidden // max(1, heads)),
            vocab=config_int(config, "vocab_size"),
        )


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _is_quantized_matrix(shape: tuple[int, ...], vocab: int) -> bool:
    """bitsandbytes quantizes the decoder's linear layers: 2-D (or stacked) matrices other than (un)embeddings."""
    return len(shape) >= 2 and vocab not in shape[-2:]


def weight_bytes(checkpoint: Checkpoint, shape: ModelShape, dtype: torch.dtype, quantize: str) -> int:
    """The loaded model's weights: stored tensors converted to `dtype`, decoder matrices quantized if asked."""
    size = itemsize(dtype)
    per_quantized = {"4bit": NF4_BYTES, "8bit": INT8_BYTES}.get(quantize)
    total = 0.0
    for info in checkpoint.tensors.values():
        numel = 1
        for dim in info.shape:
            numel *= dim
        if not DTYPES[info.dtype].is_floating_point:
            total += info.nbytes
        elif per_quantized is not None and _is_quantized_matrix(info.shape, shape.vocab):
            total += numel * per_quantized
        else:
            total += numel * size
    return int(total)


def forward_bytes(shape: ModelShape, rows: int, tokens: int, size: int) -> int:
    """Peak transient memory of one forward pass of `rows` x `tokens` (one layer's work, last-position logits)."""
    positions = rows * tokens
    states = positions * (4 * shape.hidden + 3 * shape.intermediate) * size
    scores = rows * shape.heads * tokens * tokens * size
    logits = rows * shape.vocab * 4
    return states + scores + logits


def kv_cache_bytes(shape: ModelShape, rows: int, tokens: int, size: int) -> int:
    """Keys and values of every layer for `rows` sequences of `tokens`."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * rows * tokens * size


def generation_bytes(shape: ModelShape, rows: int, prompt: int, new_tokens: int, size: int) -> int:
    """A generation batch: its prefill pass, the KV cache over prompt + answer, a step's full-vocabulary logits."""
    return forward_bytes(shape, rows, prompt, size) + kv_cache_bytes(shape, rows, prompt + new_tokens, size) \
        + 2 * rows * shape.vocab * 4


def edit_peak(checkpoint: Checkpoint) -> int:
    """CPU memory of the streaming edit: the process, the largest tensor's pages and one float32 block."""
    largest = max((info.nbytes for info in checkpoint.tensors.values()), default=0)
    return PROCESS_BYTES + largest + EDIT_BLOCK_BYTES


def side_bytes(folder: Path, config: dict[str, object]) -> int:
    """Files the output gets besides the weights: tokenizer, configs, templates (what `copy_side_files` copies)."""
    weights = {".safetensors", ".bin", ".gguf", ".pt", ".pth"}
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix not in weights) \
        + len(json.dumps(config))


def output_bytes(checkpoint: Checkpoint, config: dict[str, object], max_shard_size: int) -> int:
    """Bytes of the safetensors shards the edit will write (laid out as `edit.stream.write_checkpoint` does)."""
    hidden = config_int(config, "hidden_size")
    plan = make_plan(checkpoint, config, hidden)
    return sum(shard.nbytes for shard in plan_shards(output_specs(plan, checkpoint), max_shard_size))


def edited_bytes(checkpoint: Checkpoint, config: dict[str, object]) -> int:
    """Bytes of the tensors the edit rewrites (the rest is copied as it is)."""
    plan = make_plan(checkpoint, config, config_int(config, "hidden_size"))
    return sum(checkpoint.tensors[name].nbytes for name in plan.edits)
