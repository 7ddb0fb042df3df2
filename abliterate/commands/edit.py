"""`abliterate edit` and `abliterate directions`: the direction search, then the written edit and its evaluation.

`run_directions` saves the direction that `direction.search.find_direction` chose; `run_edit` also writes the
edited model through the one write path (publish/write_edited.py) and evaluates it before provenance is
recorded. Everything here logs and raises typed errors; the CLI prints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from abliterate.direction.search import (
    CANDIDATES_FILE,
    DirectionResult,
    check_layer_choice,
    config_layers,
    find_direction,
    load,
    resolve_batch_size,
)
from abliterate.direction.vector import DIRECTION_FILE
from abliterate.edit.formats import OutputOptions, check_format, sources_of
from abliterate.errors import UsageError
from abliterate.evaluation.engines import check_engine
from abliterate.evaluation.evaluate import EditEvaluation, EvalOptions, select_prompts
from abliterate.evaluation.report_record import ReportRecord
from abliterate.model.chat import post_instruction_length
from abliterate.model.checkpoint import read_config
from abliterate.model.loading import check_quantize, resolve
from abliterate.model.offline import offline_unless_reachable
from abliterate.publish.write_edited import write_edited
from abliterate.settings import Settings
from abliterate.storage.atomic import check_output

log = logging.getLogger(__name__)



def run_directions(settings: Settings) -> DirectionResult:
    """`abliterate directions`: compute and save the direction and every candidate's scores."""
    out = _directions_path(settings)
    check_output(out, overwrite=settings.overwrite, file=True)
    result = find_direction(settings, load(settings))
    out.parent.mkdir(parents=True, exist_ok=True)
    result.direction.save(out)
    result.report().write(out.with_name(out.stem + ".candidates.json"))
    return result


def _directions_path(settings: Settings) -> Path:
    if settings.out is None:
        raise UsageError("no output file given", hint="pass --out FILE.safetensors")
    out = Path(settings.out)
    return out / DIRECTION_FILE if out.is_dir() or out.suffix != ".safetensors" else out


@dataclass
class EditResult:
    out: Path
    direction: DirectionResult
    edited_tensors: int
    report: ReportRecord | None = None  # the before/after evaluation (abliterate/report.json), if run


def evaluation_texts(settings: Settings) -> list[str]:
    """The instructions the evaluation inside `edit` will answer (for --batch-size auto)."""
    options = EvalOptions(langs=settings.langs, prompts=settings.prompts, n_prompts=settings.eval_prompts)
    return [p.instruction for kinds in select_prompts(options).values() for group in kinds.values() for p in group]


def run_edit(settings: Settings) -> EditResult:
    """`abliterate edit`: direction, then the streaming edit of the source checkpoint into --out."""
    if settings.out is None:
        raise UsageError("no output folder given", hint="pass --out DIR")
    check_quantize(settings.quantize)
    check_format(settings, evaluate=settings.eval)
    if settings.eval:
        check_engine(settings.engine, settings.quantize)  # vLLM and a GPU, before any model is loaded
    source = resolve(settings.model, revision=settings.revision, allow_pickle=settings.allow_pickle)  # a bad MODEL
    check_output(settings.out, overwrite=settings.overwrite, sources=sources_of(source))
    check_layer_choice(settings, config_layers(read_config(source.folder)), None)  # before loading the model
    loaded = load(settings)
    check_layer_choice(settings, loaded.n_layers, post_instruction_length(loaded.tokenizer))
    settings = resolve_batch_size(settings, loaded, evaluation_texts(settings) if settings.eval else ())
    assert settings.out is not None  # checked above; resolving the batch size keeps it
    if settings.eval:
        offline_unless_reachable()  # one quick check, not a minute of retries per dataset
    evaluation = EditEvaluation.prepare(settings) if settings.eval else None  # fails fast (tasks, prompts, judge)
    result = find_direction(settings, loaded)
    if evaluation is not None:
        evaluation.measure_base(loaded.model, loaded.tokenizer, loaded.source)
    source = loaded.source
    del loaded  # free the forward-pass model before streaming the checkpoint
    reports: list[ReportRecord] = []

    def candidates_and_evaluation(tmp: Path) -> None:
        """candidates.json, then the evaluation of the written checkpoint (before provenance hashes the report)."""
        result.report().write(tmp / "abliterate" / CANDIDATES_FILE)
        if evaluation is not None:
            reports.append(evaluation.measure_edited(tmp, str(settings.out)))

    written = write_edited(settings.out, source, result.direction, OutputOptions.from_settings(settings),
                           run=result.run_record(settings), extra=candidates_and_evaluation,
                           overwrite=settings.overwrite, allow_pickle=settings.allow_pickle)
    return EditResult(Path(settings.out).resolve(), result, len(written.plan.edits), reports[0] if reports else None)
