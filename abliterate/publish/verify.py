"""`abliterate verify DIR`: re-check an edited checkpoint against its `abliterate/provenance.json`.

Two checks. Every output file listed in provenance still has its recorded hash (sha256, or xxh3_128: the
record names the algorithm, and old records have sha256). Every tensor that writes
into the residual stream (re-derived with the architecture registry, exactly as the edit planned it, and
compared with the list in provenance) is orthogonal to the direction along its hidden axis: for a matrix W
and the direction u it was edited against (r itself, or normalize(r * (1 + w)) for post-norm families),
leak = |u . W| / |W| must be below a tolerance that allows for the rounding of the stored dtype. This holds
for norm-preserving edits too (rescaling a column or row keeps it orthogonal to u), so verify does not need
to know the method. Tensors of a partial edit (an ablation weight other than 1, from `abliterate optimize`)
keep part of the component by design and are skipped.
The leak and its tolerance are in publish/leak.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from abliterate.direction.vector import Direction
from abliterate.edit.adapter import check_adapter_tensors
from abliterate.edit.stream import EditPlan, make_plan
from abliterate.errors import AbliterateError, VerifyError
from abliterate.model.archs import Architecture, Component
from abliterate.model.checkpoint import Checkpoint, read_config
from abliterate.publish.leak import leak
from abliterate.publish.provenance import read_provenance
from abliterate.publish.provenance_record import ProvenanceRecord
from abliterate.publish.verify_gguf import check_gguf_tensors
from abliterate.storage.hashing import FileHasher

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class VerifyReport:
    """What `verify` checked; only returned when everything passed."""

    folder: Path
    files: int
    tensors: int
    worst: float  # the largest leak / tolerance ratio

    def summary(self) -> str:
        return (
            f"OK: {self.files} files match provenance.json, {self.tensors} edited tensors orthogonal to the "
            f"direction (largest leak {self.worst:.2g}x its tolerance) - {self.folder}"
        )


def _norms_after(arch: Architecture, component: Component, tensor: str | None) -> list[tuple[str, bool]]:
    """(module, optional) of the norms between a writer and the stream, innermost first, read off the entry."""
    entry = None if tensor is None else arch.writer(tensor)
    own = None if entry is None or entry[0] != component else entry[2].post_norms
    if own is not None:
        return [(n, False) if isinstance(n, str) else (n.module, n.optional) for n in own]
    if arch.post_norms is None or component == "embedding":
        return []
    return [(arch.post_norms.attention if component == "attention" else arch.post_norms.mlp, False)]


def expected_direction(
    checkpoint: Checkpoint,
    arch: Architecture,
    component: Component,
    layer: int,
    r: torch.Tensor,
    tensor: str | None = None,
) -> torch.Tensor:
    """The unit vector a correct edit made this writer orthogonal to, derived here from the norm weights on disk.

    Deliberately not the edit code's own function: r itself, or for a post-norm family (gain offset + g, with g
    read from the norm that follows this writer) u = r * (offset + g) / |r * (offset + g)|, since
    norm(W x) . r = (r * (offset + g)) . W x / rms. Behind a chain of norms (Gemma 4's MoE: an inner norm per
    summand, then one on the sum), the gains multiply: u ~ r * prod(offset + g). An edit against any other
    vector fails the check.
    """
    norms = [] if component == "embedding" else _norms_after(arch, component, tensor)
    if not norms:
        return r
    mapped = r.to(torch.float64)
    for module, optional in norms:
        name = f"{arch.layers}.{layer}.{module}.weight"
        name = arch.on_disk(name, checkpoint.tensors) or name
        if name not in checkpoint.tensors:
            if optional:
                continue
            raise VerifyError(
                f"the norm {name!r} after a residual writer is missing", hint="the checkpoint is incomplete"
            )
        mapped = mapped * (arch.norm_offset + checkpoint.get(name).to(torch.float64))
    return (mapped / mapped.norm()).to(torch.float32)


def check_files(folder: Path, record: ProvenanceRecord) -> tuple[int, list[str]]:
    """(files checked, problems): every output file in provenance still has each hash recorded for it
    (xxh3_128 or sha256, whichever the edit wrote; files of several threads are hashed at once)."""
    problems = []
    files = record.output.files
    with FileHasher() as hasher:
        for name, entry in files.items():
            if (folder / name).is_file():
                for algorithm in entry.hashes:
                    hasher.submit(folder / name, algorithm)
        for name, entry in sorted(files.items()):
            path = folder / name
            if not path.is_file():
                problems.append(f"{name} is missing")
                continue
            changed = [algo for algo, value in entry.hashes.items() if hasher.digest(path, algo) != value]
            if path.stat().st_size != entry.bytes or changed:
                what = changed[0] if changed else "size"
                problems.append(f"{name} differs from provenance.json ({what} changed since the edit)")
    return len(files), problems


def _open(folder: Path) -> tuple[Checkpoint, EditPlan, Direction]:
    checkpoint = Checkpoint.open(folder)
    direction = Direction.load(folder)
    config = read_config(folder)
    return checkpoint, make_plan(checkpoint, config, direction.hidden_size), direction


def check_tensors(folder: Path, record: ProvenanceRecord) -> tuple[int, float, list[str]]:
    """(tensors checked, worst leak/tolerance, problems): every residual writer is orthogonal to u."""
    try:
        checkpoint, plan, direction = _open(folder)
    except AbliterateError as err:
        return 0, 0.0, [f"cannot read the checkpoint: {err}"]
    problems = []
    listed = {t.name for t in record.edit.tensors}
    if listed != set(plan.edits):
        missing, extra = sorted(set(plan.edits) - listed), sorted(listed - set(plan.edits))
        problems.append(f"edited tensors differ from provenance.json (unlisted: {missing[:3]}, absent: {extra[:3]})")
    worst, partial = 0.0, 0
    for name, (component, layer) in sorted(plan.edits.items()):
        r = direction.for_layer(layer).to(torch.float32)
        if direction.weights is not None and direction.weights.weight(component, layer) != 1.0:
            partial += 1  # a partial edit (weight w) keeps (1 - w) of the component: nothing to check
            continue
        tensor = checkpoint.get(name)
        try:
            u = expected_direction(checkpoint, plan.arch, component, layer, r, name)
        except VerifyError as err:
            problems.append(str(err))
            continue
        found = leak(tensor, u, plan.arch.hidden_axis(name, tensor.dim()))
        where = f"tensor {name!r} in {checkpoint.tensors[name].file.name}"
        if not found.ok:
            problems.append(
                f"{where} is not orthogonal to the direction: |u.W|/|W| = {found.value:.3g} "
                f"> tolerance {found.tolerance:.3g} ({tensor.dtype})"
            )
        elif found.tolerance > 0:
            worst = max(worst, found.value / found.tolerance)
    if partial:
        log.info("%d tensors were edited with ablation weights other than 1: their orthogonality is not checked",
                 partial)
    return len(plan.edits) - partial, worst, problems


def verify(folder: Path) -> VerifyReport:
    """Check `folder` against its provenance; a VerifyError naming the first problem if any check fails."""
    folder = Path(folder).expanduser().resolve()
    record = read_provenance(folder)
    kind = record.format_kind
    if kind == "gguf":
        n_tensors, worst, problems = check_gguf_tensors(folder, record)
    elif kind == "adapter":
        n_tensors, worst, problems = check_adapter_tensors(folder, record.to_data())
    else:
        n_tensors, worst, problems = check_tensors(folder, record)
    n_files, file_problems = check_files(folder, record)
    problems += file_problems
    for problem in problems:
        log.warning("%s", problem)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise VerifyError(
            f"verify failed: {problems[0]}{more}",
            hint="the folder changed after the edit; run the edit again or download the checkpoint again",
        )
    return VerifyReport(folder, n_files, n_tensors, worst)
