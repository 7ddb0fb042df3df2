"""`--format adapter`: the edit as a rank-1 PEFT LoRA adapter on the unedited model.

Every edit of a matrix is a rank-1 update: W - w u u^T W = W + B A with B = -w u (a column) and A = u^T W
(a row), for the unit vector u the edit uses (r, or normalize(r * (1 + g)) for post-norm families) and the
per-layer weight w. The embedding too: E - w (E u) u^T is PEFT's embedding LoRA with lora_embedding_A = (E u)^T
and lora_embedding_B = -w u (PEFT adds (B A)^T to the looked-up rows). So the adapter holds two vectors per
edited matrix (hidden + in values) instead of the matrix: megabytes instead of gigabytes. r = 1, lora_alpha = 1
(scaling 1), no dropout. The plan (which tensors, which u, which w) is `edit.stream.plan_edit`'s, the same as
for safetensors and GGUF outputs.

Tied embeddings need nothing special: PEFT's embedding LoRA changes the looked-up rows, not the shared weight,
so the unembedding stays the original matrix, as in the safetensors edit (which unties).

What a LoRA cannot express, refused with one line before anything is written: output biases (b - w (u.b) u is
not a low-rank weight update; PEFT's lora_bias exists, but serving stacks such as vLLM do not load it),
norm-preserving edits (rescaling every column after the projection is a full-rank change), and mixture-of-experts
writers (transformers keeps experts as fused 3-D parameters, which plain LoRA modules cannot target).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from abliterate.direction.vector import DIRECTION_FILE, Direction
from abliterate.edit.stream import EditPlan, direction_for, plan_edit
from abliterate.errors import CheckpointError, UsageError
from abliterate.model.archs import Component
from abliterate.model.checkpoint import Checkpoint
from abliterate.model.loading import ModelSource

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix for the wrapped model's modules
_ROWS = 1 << 14  # rows per block when summing u^T W or E u


@dataclass(frozen=True)
class Factors:
    """One edited matrix as B A: `a` is the row (u^T W, or (E u)^T for the embedding), `b` the column -w u."""

    module: str
    component: Component
    a: torch.Tensor
    b: torch.Tensor


@dataclass
class AdapterResult:
    """The written adapter: the plan, its modules and its size."""

    plan: EditPlan
    modules: list[str]
    nbytes: int
    embedding: bool = True  # the embedding's LoRA is included

    def summary(self) -> str:
        without = "" if self.embedding else ", without the embedding"
        return (f"LoRA adapter (rank 1, {len(self.modules)} modules{without}, {self.nbytes / 1e6:.2f} MB): "
                f"{ADAPTER_WEIGHTS}")

    def record(self) -> dict[str, Any]:
        """The `format` section of provenance.json."""
        return {"kind": "adapter", "rank": 1, "lora_alpha": 1, "modules": self.modules, "bytes": self.nbytes,
                "embedding": self.embedding, "summary": self.summary()}


def check_expressible(plan: EditPlan, checkpoint: Checkpoint) -> None:
    """A one-line UsageError for edits a rank-1 LoRA cannot carry (see the module docstring)."""
    hint = "use --format safetensors (or gguf) for this edit"
    if plan.norm_preserving:
        raise UsageError("--format adapter cannot express a norm-preserving edit (a full-rank change)", hint=hint)
    for name in sorted(plan.edits):
        ndim = len(checkpoint.tensors[name].shape)
        if plan.arch.is_bias(name, ndim):
            raise UsageError(f"--format adapter cannot express the edit of the output bias {name}", hint=hint)
        if ndim != 2 or ".experts." in name:
            raise UsageError(f"--format adapter does not support mixture-of-experts writers such as {name}", hint=hint)
        component, _layer = plan.edits[name]
        if component != "embedding" and plan.arch.hidden_axis(name, ndim) != 0:
            raise UsageError(f"--format adapter needs [hidden, in] output matrices; {name} is stored transposed",
                             hint=hint)


def module_name(plan: EditPlan, tensor_name: str) -> str:
    """The in-memory module (transformers' naming, which PEFT matches) that owns an on-disk `.weight` tensor."""
    return plan.arch.canonical(tensor_name).removesuffix(".weight")


def _u_dot(matrix: torch.Tensor, u: torch.Tensor, axis: int) -> torch.Tensor:
    """u^T W (axis 0) or W u (axis 1) of a memory-mapped matrix, in float32 by blocks of rows."""
    parts = []
    total = torch.zeros(matrix.shape[1], dtype=torch.float32) if axis == 0 else None
    for start in range(0, matrix.shape[0], _ROWS):
        block = matrix[start : start + _ROWS].to(torch.float32)
        if total is not None:
            total.addmv_(block.T, u[start : start + _ROWS])
        else:
            parts.append(block @ u)
    return total if total is not None else torch.cat(parts)


def factors(plan: EditPlan, checkpoint: Checkpoint, name: str, r: torch.Tensor) -> Factors:
    """B and A of one edited matrix (float32)."""
    component, layer = plan.edits[name]
    u = direction_for(plan, checkpoint, component, layer, r, name).to(torch.float32)
    weight = plan.weight(component, layer)
    matrix = checkpoint.view(name)
    axis = plan.arch.hidden_axis(name, matrix.dim())
    a = _u_dot(matrix, u, 0 if axis == 0 else 1)
    if not torch.isfinite(a).all():
        raise CheckpointError(f"tensor {name!r} holds NaN or Inf values", hint="the source checkpoint is damaged")
    column = (-weight * u).unsqueeze(1).contiguous()
    return Factors(module_name(plan, name), component, a.unsqueeze(0).contiguous(), column)


def adapter_tensors(all_factors: list[Factors]) -> dict[str, torch.Tensor]:
    """PEFT's state-dict keys: lora_A/lora_B for linear layers, lora_embedding_A/B for the embedding."""
    tensors: dict[str, torch.Tensor] = {}
    for f in all_factors:
        if f.component == "embedding":
            tensors[f"{PREFIX}{f.module}.lora_embedding_A"] = f.a
            tensors[f"{PREFIX}{f.module}.lora_embedding_B"] = f.b
        else:
            tensors[f"{PREFIX}{f.module}.lora_A.weight"] = f.a
            tensors[f"{PREFIX}{f.module}.lora_B.weight"] = f.b
    return tensors


def write_config(out: Path, base: str, modules: list[str]) -> None:
    """adapter_config.json through PEFT's own LoraConfig (r 1, alpha 1, the exact modules)."""
    from peft import LoraConfig

    config = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, bias="none", target_modules=modules,
                        task_type="CAUSAL_LM", base_model_name_or_path=base, inference_mode=True)
    config.save_pretrained(str(out))


def write_adapter(
    source: ModelSource, checkpoint: Checkpoint, config: dict[str, object], direction: Direction, out: Path,
    *, embedding: bool = True,
) -> AdapterResult:
    """Write adapter_config.json, adapter_model.safetensors and the direction file into the folder `out`.

    Without `embedding`, the embedding's LoRA is left out (the embedding stays unedited).
    """
    plan = plan_edit(checkpoint, config, direction)
    check_expressible(plan, checkpoint)
    r = direction.vector.to(torch.float32)
    names = [n for n in sorted(plan.edits) if embedding or plan.edits[n][0] != "embedding"]
    if not embedding:
        log.warning("--no-adapter-embedding: the embedding is not edited; the adapter is a partial edit")
    all_factors = [factors(plan, checkpoint, name, r) for name in names]
    modules = [f.module for f in all_factors]
    save_file(adapter_tensors(all_factors), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_WEIGHTS).chmod(0o644)  # safetensors creates it private; the rest of the folder is 0644
    write_config(out, source.spec, modules)
    direction.save(out / "abliterate" / DIRECTION_FILE)
    result = AdapterResult(plan, modules, (out / ADAPTER_WEIGHTS).stat().st_size, embedding)
    log.info("%s", result.summary())
    return result


def check_adapter_tensors(folder: Path, record: dict[str, Any]) -> tuple[int, float, list[str]]:
    """`verify` of an adapter: every lora_B is -w u with u = r (post-norm writers, whose u needs the base model's
    norms, are counted but not checked), and the modules equal provenance's list."""
    problems: list[str] = []
    try:
        tensors = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
        direction = Direction.load(Path(folder))
    except Exception as err:  # any unreadable file is one problem line
        return 0, 0.0, [f"cannot read the adapter: {err}"]
    b_keys = sorted(k for k in tensors if k.endswith(("lora_B.weight", "lora_embedding_B")))
    modules = [k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in b_keys]
    if sorted(modules) != sorted(record.get("format", {}).get("modules", [])):
        problems.append("the adapter's modules differ from provenance.json")
    r = direction.vector.to(torch.float64)
    post_norms = bool(record.get("edit", {}).get("post_norms"))
    checked = 0
    for key in b_keys:
        if post_norms and "embed" not in key:
            continue
        b = tensors[key].to(torch.float64).reshape(-1)
        off = (b - (b @ r) * r).norm() / max(float(b.norm()), 1e-30)
        if off > 1e-5:
            problems.append(f"{key} is not a multiple of the direction (off by {float(off):.2g})")
        checked += 1
    return checked, 0.0, problems
