"""Quantized checkpoints: the residual writers of FP8 block-scaled and MXFP4 checkpoints, dequantized for the edit.

Two on-disk formats that released checkpoints use, read the way transformers' own integrations read them:

- FP8 with block scales (`quant_method: fp8`; DeepSeek-V3/R1, Qwen3 FP8 releases; transformers'
  `integrations/finegrained_fp8.py`): `X.weight` float8_e4m3fn [out, in] and `X.weight_scale_inv` float32
  [ceil(out/b0), ceil(in/b1)] with `weight_block_size` [b0, b1] (128 x 128): W = weight * scale of its block.
- MXFP4 (`quant_method: mxfp4`; gpt-oss; `integrations/mxfp4.py`): `P_blocks` uint8 [experts, rows, groups, 16],
  two FP4 (e2m1) values a byte, low nibble first, and `P_scales` uint8 [experts, rows, groups], a power of two
  2^(s - 127) per group of 32 values; transformers dequantizes to [experts, rows, groups * 32] and transposes the
  last two axes, which gives the layout of the bf16 checkpoints ([experts, in, out]).

The edit needs the residual writers in full precision. Every module that owns a quantized residual writer is
dequantized as a whole (transformers quantizes per module: a fused expert module is either all quantized or not,
so the non-writing projections of that module are dequantized too, unedited); its tensors appear in the
checkpoint as bfloat16 tensors of their in-memory name and layout, the scale tensors disappear, and the module is
added to the config's `modules_to_not_convert`, so that transformers loads the result. Every other tensor, the
quantized ones included, is copied byte for byte. Re-quantizing an edited tensor would add back part of the
direction it removed (FP4's 16 levels cannot hold a small projection), so this is not offered.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from abliterate.errors import CheckpointError, ModelError
from abliterate.model.archs import Architecture, lookup
from abliterate.storage.tensors import DTYPES, TensorInfo

if TYPE_CHECKING:  # a checkpoint is handed in; model/checkpoint.py imports this module to dequantize on opening
    from abliterate.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)

FP8_SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
OUTPUT_DTYPE = "BF16"
_EXPERT_INDEX = re.compile(r"^(.*\.experts)\.\d+\.")


@dataclass
class Dequantized:
    """What `dequantize_writers` changed: derived tensors (name -> how to compute them) and modules unquantized."""

    method: str
    derived: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)  # in-memory module names, for modules_to_not_convert
    dropped: list[str] = field(default_factory=list)  # scale / block tensors replaced by derived ones


def quantization_method(config: dict[str, Any]) -> str | None:
    """The config's `quantization_config.quant_method`, or None for an unquantized checkpoint."""
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return None
    return str(quantization.get("quant_method", "unknown"))


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 W = weight * scale_inv of its [block[0], block[1]] block (the last block of an axis may be short)."""
    rows, cols = weight.shape[-2:]
    scale = scale_inv.to(torch.float32)
    scale = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight.to(torch.float32) * scale


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of MXFP4 `blocks` [..., rows, groups, 16] and `scales` [..., rows, groups], laid out as
    transformers holds them: [..., groups * 32, rows] (the last two axes transposed, as its integration does)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    low, high = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., rows, groups, 32], low nibble first
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return values.flatten(-2).transpose(-1, -2).contiguous()


def _owner(name: str) -> str:
    """The module transformers quantizes as a unit: `...experts` for per-expert tensors, else the parent."""
    match = _EXPERT_INDEX.match(name)
    if match is not None:
        return match.group(1)
    return name.rsplit(".", 1)[0]


def _fp8_units(checkpoint: Checkpoint, arch: Architecture) -> set[str]:
    return {
        _owner(name)
        for name, info in checkpoint.tensors.items()
        if info.dtype.startswith("F8") and name + FP8_SCALE_SUFFIX in checkpoint.tensors and arch.classify(name)
    }


def _mxfp4_units(checkpoint: Checkpoint, arch: Architecture) -> set[str]:
    return {
        _owner(name)
        for name in checkpoint.tensors
        if name.endswith(MXFP4_BLOCKS) and arch.classify(name.removesuffix(MXFP4_BLOCKS))
    }


def _in_unit(name: str, units: set[str]) -> bool:
    return any(name.startswith(unit + ".") for unit in units)


def _stored(info: TensorInfo) -> torch.Tensor:
    """A tensor as stored on disk (not through `Checkpoint.get`, which returns the derived one)."""
    with safe_open(str(info.file), framework="pt") as fh:
        tensor: torch.Tensor = fh.get_tensor(info.name)
        return tensor


def _derive(checkpoint: Checkpoint, name: str, shape: tuple[int, ...], at: TensorInfo,
            compute: Callable[[], torch.Tensor], result: Dequantized) -> None:
    """Index derived tensor `name` (bf16, `shape`) where `at` is stored, so that the output keeps the order."""
    nbytes = math.prod(shape) * DTYPES[OUTPUT_DTYPE].itemsize
    checkpoint.tensors[name] = TensorInfo(name, at.file, OUTPUT_DTYPE, shape, at.start, at.start + nbytes)
    result.derived[name] = compute


def _dequantize_fp8_units(checkpoint: Checkpoint, units: set[str], block: tuple[int, int], result: Dequantized) -> None:
    for name in [n for n in checkpoint.names() if _in_unit(n, units) and n + FP8_SCALE_SUFFIX in checkpoint.tensors]:
        weight, scale = checkpoint.tensors[name], checkpoint.tensors.pop(name + FP8_SCALE_SUFFIX)
        expected = tuple(math.ceil(size / b) for size, b in zip(weight.shape[-2:], block, strict=True))
        if scale.shape[-2:] != expected:
            raise CheckpointError(
                f"{scale.name!r} has shape {list(scale.shape)}; blocks of {list(block)} over {list(weight.shape)} "
                f"need {list(expected)}",
                hint="the checkpoint's weight_block_size does not match its scales",
            )

        def compute(w: TensorInfo = weight, s: TensorInfo = scale) -> torch.Tensor:
            return dequantize_fp8(_stored(w), _stored(s), block)

        _derive(checkpoint, name, weight.shape, weight, compute, result)
        result.dropped.append(scale.name)


def _dequantize_mxfp4_units(checkpoint: Checkpoint, units: set[str], result: Dequantized) -> None:
    for blocks_name in [n for n in checkpoint.names() if _in_unit(n, units) and n.endswith(MXFP4_BLOCKS)]:
        name = blocks_name.removesuffix(MXFP4_BLOCKS)
        if name + MXFP4_SCALES not in checkpoint.tensors:
            raise CheckpointError(f"{blocks_name!r} has no {MXFP4_SCALES} tensor", hint="the checkpoint is incomplete")
        blocks, scales = checkpoint.tensors.pop(blocks_name), checkpoint.tensors.pop(name + MXFP4_SCALES)
        *prefix, rows, groups, _ = blocks.shape

        def compute(b: TensorInfo = blocks, s: TensorInfo = scales) -> torch.Tensor:
            return dequantize_mxfp4(_stored(b), _stored(s))

        _derive(checkpoint, name, (*prefix, groups * 32, rows), blocks, compute, result)
        result.dropped += [blocks.name, scales.name]


def dequantize_writers(checkpoint: Checkpoint, config: dict[str, Any]) -> Dequantized | None:
    """Replace, in `checkpoint`'s index, the quantized tensors of every module that writes to the residual stream
    by derived bfloat16 tensors (read with `checkpoint.get`); None for an unquantized checkpoint."""
    method = quantization_method(config)
    if method is None or checkpoint.is_pickle:
        return None
    try:
        arch = lookup(str(config.get("model_type")))
    except ModelError:
        return None
    quantization = config["quantization_config"]
    result = Dequantized(method)
    if method == "fp8":
        block = tuple(quantization.get("weight_block_size") or (128, 128))
        units = _fp8_units(checkpoint, arch)
        _dequantize_fp8_units(checkpoint, units, (int(block[0]), int(block[1])), result)
    elif method == "mxfp4":
        units = _mxfp4_units(checkpoint, arch)
        _dequantize_mxfp4_units(checkpoint, units, result)
    else:
        return None  # other methods: make_plan rejects quantized writers with a hint
    if not result.derived:
        return None
    result.modules = sorted({arch.canonical(unit) for unit in units})
    checkpoint.derived.update(result.derived)
    log.info(
        "%s checkpoint: %d modules that write to the residual stream are dequantized (%d tensors) and written in "
        "bfloat16, added to quantization_config.modules_to_not_convert; every other tensor is copied as stored",
        method, len(result.modules), len(result.derived),
    )
    return result


def adjusted_quantization_config(quantization: dict[str, Any], modules: list[str]) -> dict[str, Any]:
    """The source's quantization_config with `modules` (in-memory names, matched exactly) left unquantized."""
    quantization = dict(quantization)
    kept = list(quantization.get("modules_to_not_convert") or [])
    quantization["modules_to_not_convert"] = kept + [re.escape(m) for m in modules if re.escape(m) not in kept]
    return quantization


def read_folder_config(folder: Path) -> dict[str, Any]:
    """config.json of `folder` (empty if unreadable: the caller reports that itself)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
