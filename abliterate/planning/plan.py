"""The plan of a run of `edit`, `eval`, `optimize` or `apply`, and its pre-flight check.

`plan_run` is `--plan`: the model's headers and tokenizer, the hardware found, the counts of every stage
(planning/counts.py), peak memory and disk (planning/needs.py), then a short calibration (planning/calibrate.py:
the model loaded once and timed; the streaming edit timed on synthetic bytes) turns the counts into seconds.
Nothing is written. `preflight` is the same estimate without the calibration (no model load): it raises
`ResourceError` when memory or disk will not do, at the start of every run unless `--no-preflight`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from abliterate.direction.passes import grid
from abliterate.direction.search import load, load_prompts, resolve_batch_size
from abliterate.edit.stream import make_plan
from abliterate.errors import AbliterateError
from abliterate.model.batching import CPU_MAX, fixed_batch_size
from abliterate.model.chat import post_instruction_length
from abliterate.planning import hardware as probing
from abliterate.planning.calibrate import (
    EditBytes,
    EditTimings,
    ForwardTimings,
    calibrate_edit,
    calibrate_forward,
    edit_seconds,
)
from abliterate.planning.counts import KL, Work, eval_work, evaluation_texts, optimize_work, search_work, trial_texts
from abliterate.planning.hardware import Hardware
from abliterate.planning.memory import config_int
from abliterate.planning.needs import Batch, Subject, check_disk, check_memory, disk_plans, memory_plan, release
from abliterate.planning.records import RunPlan, StagePlan
from abliterate.settings import OptimizeSettings, Settings
from abliterate.storage.hashing import HashCache, hub_blob_sha256

log = logging.getLogger(__name__)

Command = Literal["edit", "eval", "optimize", "apply"]


@dataclass
class Request:
    """One command's run to plan: the settings, and what the command adds (eval's --base, optimize's section)."""

    command: Command
    settings: Settings
    base: str | None = None  # eval --base
    section: OptimizeSettings | None = None  # optimize
    trials: int = 0  # optimize: trials still to run
    out: Path | None = None  # the edited checkpoint's folder, if the run writes one
    notes: list[str] = field(default_factory=list)

    @property
    def forwards(self) -> bool:
        return self.command != "apply"

    @property
    def writes_edit(self) -> bool:
        return self.out is not None


def _bs(settings: Settings) -> int:
    """The batch size for memory before --batch-size auto is measured: the largest the CPU tries."""
    return CPU_MAX if settings.batch_size == "auto" else fixed_batch_size(settings.batch_size)


def texts(request: Request) -> tuple[list[str], list[str]]:
    """The direction prompts and the evaluation (or trial) prompts the run forwards."""
    s = request.settings
    direction = [t for group in vars(load_prompts(s)).values() for t in group] if request.command != "eval" else []
    if request.command == "optimize" and request.section is not None:
        return direction, trial_texts(s, request.section)
    if request.command == "eval" or (request.command == "edit" and s.eval):
        return direction, evaluation_texts(s)
    return direction, []


def batches(request: Request, subject: Subject) -> list[Batch]:
    """The largest batch of each stage that forwards prompts (none for `apply`)."""
    if not request.forwards:
        return []
    s, bs = request.settings, _bs(request.settings)
    direction, other = texts(request)
    shapes = [Batch("direction search", bs, subject.longest(direction))] if direction else []
    if other and request.section is not None:
        shapes.append(Batch("optimize trials", bs, subject.longest(other), request.section.trial_max_new_tokens))
    elif other:
        shapes.append(Batch("evaluation answers", bs, subject.longest(other), s.max_new_tokens))
    return shapes


def candidates(request: Request, subject: Subject) -> int | None:
    """Rows of the candidates.json an `edit` writes (None: the run writes none)."""
    if request.command != "edit":
        return None
    layers, positions = grid(request.settings, subject.shape.layers, post_instruction_length(subject.tokenizer))
    return len(layers) * len(positions)


def preflight(request: Request, hardware: Hardware | None = None) -> None:
    """Refuse to start when memory or disk will not do (ResourceError with the fix); loads no weights.

    Any other problem (no such model, a bad prompt source, ...) is left to the run, which reports it in its own
    order, before or after its other checks.
    """
    hardware = hardware or probing.probe()
    try:
        subject = Subject.open(request.settings)
        disk = disk_plans(request.settings, subject, request.out, candidates(request, subject))
        shapes = batches(request, subject)
    except (AbliterateError, OSError, ValueError) as err:  # the run reports these itself (tokenizers raise both)
        log.debug("pre-flight skipped: %s", err)
        return
    check_disk(disk)
    check_memory(request.settings, subject, hardware, shapes, request.writes_edit)
    log.debug("pre-flight: memory and disk will do (--plan shows the estimate)")


def edit_bytes(subject: Subject, output: int, output_hash: str) -> EditBytes:
    """What the streaming edit of `subject` rewrites, copies and hashes."""
    plan = make_plan(subject.checkpoint, subject.config, config_int(subject.config, "hidden_size"))
    edited = sum(subject.checkpoint.tensors[name].nbytes for name in plan.edits)
    cache = HashCache()
    unhashed = [path for path in subject.checkpoint.files()
                if hub_blob_sha256(path) is None and cache.lookup(path) is None]
    source_hashed = sum(path.stat().st_size for path in unhashed)
    return EditBytes(edited, max(0, output - edited), source_hashed, output, output_hash)


@dataclass
class Calibration:
    """The measured timings a plan's seconds come from (None: not measured)."""

    forward: ForwardTimings | None = None
    edit_timer: EditTimings | None = None

    def record(self) -> dict[str, float]:
        return {**(self.forward.record() if self.forward else {}),
                **(self.edit_timer.record() if self.edit_timer else {})}


def calibrate(request: Request, hardware: Hardware) -> tuple[Request, Calibration]:
    """Load the model once and time it (forward, decode), and time the streaming edit if the run writes one.

    --batch-size auto is measured here as the run will measure it; the returned request carries the number.
    """
    result = Calibration()
    if request.out is not None:
        where = probing.existing(Path(request.out).expanduser().resolve().parent)
        result.edit_timer = calibrate_edit(hardware.cores, where, request.settings.output_hash)
    if not request.forwards:
        return request, result
    start = time.perf_counter()
    loaded = load(request.settings)
    seconds = time.perf_counter() - start
    direction, other = texts(request)
    settings = resolve_batch_size(request.settings, loaded, other)
    bs = fixed_batch_size(settings.batch_size)
    result.forward = calibrate_forward(loaded, direction + other, bs, seconds)
    del loaded
    release()
    return replace(request, settings=settings), result


def _load(name: str, calibration: Calibration) -> StagePlan:
    return StagePlan(stage=f"load {name}", seconds=calibration.forward.load if calibration.forward else None)


def _timed(work: list[Work], calibration: Calibration) -> list[StagePlan]:
    return [w.plan(calibration.forward) for w in work]


def _write(request: Request, subject: Subject, output: int, calibration: Calibration) -> StagePlan:
    work = edit_bytes(subject, output, request.settings.output_hash)
    seconds = edit_seconds(calibration.edit_timer, work) if calibration.edit_timer else None
    note = f"{work.edited / 1e9:.2f} GB edited, {work.copied / 1e9:.2f} GB copied, " \
           f"{work.source_hashed / 1e9:.2f} GB of source to sha256"
    if calibration.edit_timer and work.output > calibration.edit_timer.dirty_limit:
        note += "; paced by the disk"
    return StagePlan(stage="write edited checkpoint", seconds=seconds, note=note)


def stages(request: Request, subject: Subject, output: int, calibration: Calibration) -> list[StagePlan]:
    """Every stage of the run in order, counted and (where calibrated) timed."""
    s, command = request.settings, request.command
    if command == "apply":
        return [_write(request, subject, output, calibration)]
    if command == "eval":
        base = [_load("base", calibration), *_timed(eval_work(s, "base", answers=False, kl="reference"),
                                                   calibration)] if request.base else []
        kl: KL | None = "compare" if request.base else None
        return [*base, _load("model", calibration), *_timed(eval_work(s, "model", kl=kl), calibration)]
    out = [_load("model", calibration), *_timed(search_work(s, subject.tokenizer, subject.shape.layers), calibration)]
    if command == "optimize" and request.section is not None:
        out += _timed(optimize_work(s, request.section, request.trials), calibration)
    if command == "edit" and s.eval:
        out += _timed(eval_work(s, "base", kl="reference"), calibration)
    if request.writes_edit:
        out.append(_write(request, subject, output, calibration))
    if command == "edit" and s.eval:
        out += [_load("edited", calibration), *_timed(eval_work(s, "edited", kl="compare"), calibration)]
    return out


def plan_run(request: Request, hardware: Hardware | None = None, *, measure: bool = True) -> RunPlan:
    """`--plan`: what the run will do and need, timed by a short calibration (`measure`) on this machine."""
    hardware = hardware or probing.probe()
    subject = Subject.open(request.settings)
    memory = memory_plan(request.settings, subject, hardware, batches(request, subject), request.writes_edit)
    disk = disk_plans(request.settings, subject, request.out, candidates(request, subject))
    request, calibration = calibrate(request, hardware) if measure else (request, Calibration())
    if request.settings.batch_size == "auto" and not measure:
        request = replace(request, settings=request.settings.model_copy(update={"batch_size": 16}))
    output = disk[0].bytes if disk else 0
    planned = stages(request, subject, output, calibration)
    notes = request.notes + [f"{p.stage}: {p.note}" for p in planned if p.seconds is None and "not timed" in p.note]
    return RunPlan(command=request.command, model=request.settings.model, model_info=subject.info(),
                   hardware=hardware.describe(), batch_size=_batch(request), stages=planned, memory=memory,
                   disk=disk, calibration=calibration.record(), notes=notes)


def _batch(request: Request) -> int | None:
    value = request.settings.batch_size
    return None if value == "auto" or not request.forwards else int(value)
