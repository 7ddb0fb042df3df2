"""`abliterate verify` of a GGUF output: the edited tensors, re-derived from GGUF names, orthogonal to r.

The residual writers of a GGUF file are found by their GGUF names alone (`token_embd`, `attn_output`,
`ffn_down`, `ffn_down_exps`, `ffn_down_shexp`; weights and biases), not by the edit's own mapping, and must
equal the list in provenance. Each is dequantized and its leak |u . W| / |W| along the hidden axis checked,
against r, or for post-norm families u = normalize(r * g) with g the GGUF norm after the writer (GGUF files of
Gemma 2/3 store that gain as 1 + w already, llama.cpp's convention). The direction file must equal the
direction stored in the GGUF's `abliterate.direction` key.

Tolerance. Float types (F32, F16, BF16) use `publish.leak.leak`'s rounding bound. A block-quantized tensor holds
W + e, where each element's error e_i is at most half a quantization step s_i of its block (Q8_0: amax/127;
Q4_0: amax/8; Q5_0: amax/16; Q4_1: range/15; Q5_1: range/31; MXFP4: amax/3, its widest gap), and is
modelled as uniform: var e_i = s_i^2 / 12. Then E |u . e|^2 summed over the slices is sum_i u_i^2 s_i^2 / 12,
and the leak must stay within 5 standard deviations of that (x sqrt 2 after re-projection rounds, whose final
error is the difference of two rounds' errors). Measured on SmolLM2 (hidden 576): correct Q8_0 edits reach
0.2x (a random direction) to 0.64x (the organism's refusal direction) of that tolerance, and an unedited Q8_0
matrix exceeds it about 30-fold; for 4-bit types an unedited matrix is only a few times over, so a 4-bit check
says little (docs/publish.md).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from abliterate.direction.vector import Direction
from abliterate.edit.gguf import META_PREFIX, dequantized, open_reader
from abliterate.edit.projection import hidden_axis
from abliterate.errors import AbliterateError
from abliterate.model.archs import Component
from abliterate.publish.leak import leak
from abliterate.publish.provenance_record import ProvenanceRecord

_WRITER = re.compile(
    r"^(?:token_embd\.weight|blk\.(\d+)\.(attn_output|ffn_down|ffn_down_exps|ffn_down_shexp)\.(?:weight|bias))$"
)
_POST_NORM = {"attention": "post_attention_norm", "mlp": "post_ffw_norm"}
_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# per block of 32: ("amax" or "range", k): one quantization step is amax / k or (max - min) / k
_STEPS = {"Q8_0": ("amax", 127.0), "Q4_0": ("amax", 8.0), "Q5_0": ("amax", 16.0), "Q4_1": ("range", 15.0),
          "Q5_1": ("range", 31.0), "MXFP4": ("amax", 3.0)}
_SIGMAS = 5.0
_BLOCK = 32


def writer_kind(name: str) -> tuple[Component, int] | None:
    """(component, layer) of a GGUF residual writer by its name; None for every other tensor."""
    match = _WRITER.match(name)
    if match is None:
        return None
    if match.group(1) is None:
        return "embedding", -1
    return ("attention" if match.group(2) == "attn_output" else "mlp"), int(match.group(1))


def quantization_variance(values: torch.Tensor, type_name: str) -> torch.Tensor:
    """Per element, the variance of a uniform error over one quantization step of its block."""
    kind, k = _STEPS[type_name]
    blocks = values.reshape(-1, _BLOCK).to(torch.float64)
    spread = blocks.abs().amax(dim=1) if kind == "amax" else blocks.amax(dim=1) - blocks.amin(dim=1)
    step = spread / k
    return (step.pow(2) / 12).unsqueeze(1).expand_as(blocks).reshape(values.shape)


def quantized_leak(
    values: torch.Tensor, u: torch.Tensor, axis: int, type_name: str, reprojected: bool
) -> tuple[float, float]:
    """(|u . W| / |W|, tolerance) of a block-quantized tensor (see the module docstring)."""
    u64 = u.to(torch.float64)
    w = values.to(torch.float64)
    norm = float(w.pow(2).sum())
    if norm == 0.0:
        return 0.0, 0.0
    dot = float(torch.tensordot(w, u64, dims=([axis], [0])).pow(2).sum())
    expected = float(torch.tensordot(quantization_variance(values, type_name), u64.pow(2), dims=([axis], [0])).sum())
    factor = math.sqrt(2.0) if reprojected else 1.0
    return math.sqrt(dot / norm), _SIGMAS * factor * math.sqrt(expected / norm)


def _direction(reader: Any, direction: Direction) -> list[str]:
    stored = reader.fields.get(f"{META_PREFIX}direction")
    if stored is None:
        return [f"the GGUF file has no {META_PREFIX}direction key"]
    vector = torch.tensor(np.asarray(stored.contents(), dtype=np.float32))
    if vector.shape != direction.vector.shape or not torch.allclose(vector, direction.vector.to(torch.float32)):
        return ["the direction in the GGUF file differs from abliterate/direction.safetensors"]
    return []


def _expected(
    tensors: dict[str, Any], component: Component, layer: int, r: torch.Tensor, post_norms: bool
) -> torch.Tensor:
    if not post_norms or component == "embedding":
        return r
    name = f"blk.{layer}.{_POST_NORM[component]}.weight"
    if name not in tensors:
        raise AbliterateError(f"the norm {name!r} after a residual writer is missing")
    mapped = r.to(torch.float64) * dequantized(tensors[name]).to(torch.float64)
    return (mapped / mapped.norm()).to(torch.float32)


def check_gguf_tensors(folder: Path, record: ProvenanceRecord) -> tuple[int, float, list[str]]:
    """(tensors checked, worst leak/tolerance, problems) of a GGUF output folder."""
    fmt = record.format or {}
    try:
        reader = open_reader(Path(folder) / fmt["file"])
        direction = Direction.load(Path(folder))
    except AbliterateError as err:
        return 0, 0.0, [f"cannot read the output: {err}"]
    problems = _direction(reader, direction)
    tensors = {t.name: t for t in reader.tensors}
    writers = {name: kind for name in tensors if (kind := writer_kind(name)) is not None}
    listed = {entry["name"] for entry in fmt.get("edited", [])}
    if listed != set(writers):
        problems.append(f"edited tensors differ from provenance.json (unlisted: {sorted(set(writers) - listed)[:3]}, "
                        f"absent: {sorted(listed - set(writers))[:3]})")
    r, worst, checked = direction.vector.to(torch.float32), 0.0, 0
    post_norms = record.edit.post_norms
    for name, (component, layer) in sorted(writers.items()):
        if direction.weights is not None and direction.weights.weight(component, layer) != 1.0:
            continue  # a partial edit keeps part of the component by design
        tensor = tensors[name]
        try:
            u = _expected(tensors, component, layer, r, post_norms)
        except AbliterateError as err:
            problems.append(str(err))
            continue
        values = dequantized(tensor)
        axis = hidden_axis(component, values.dim())
        type_name = tensor.tensor_type.name
        if type_name in _FLOATS:
            found = leak(values.to(_FLOATS[type_name]), u, axis)
            value, tolerance = found.value, found.tolerance
        elif type_name in _STEPS and values.shape[-1] % _BLOCK == 0:
            value, tolerance = quantized_leak(values, u, axis, type_name, bool(fmt.get("reproject")))
        else:
            problems.append(f"tensor {name!r} is {type_name}, which verify cannot bound")
            continue
        checked += 1
        if not math.isfinite(value) or value > tolerance:
            problems.append(f"tensor {name!r} ({type_name}) is not orthogonal to the direction: |u.W|/|W| = "
                            f"{value:.3g} > tolerance {tolerance:.3g}")
        elif tolerance > 0:
            worst = max(worst, value / tolerance)
    return checked, worst, problems
