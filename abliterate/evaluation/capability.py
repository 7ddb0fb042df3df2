"""Capability benchmarks through lm-evaluation-harness (lm-eval), run on a model already in memory.

Owns the `--tasks` spec, the task manager (lm-eval's own tasks plus the local folder `data/tasks/`, which
ships the offline task `abliterate_mini_mc`), the early check that every task exists and can load its data
(hub datasets fail here, in one line, before any long work), the run itself (`lm_eval.simple_evaluate` on an
`HFLM` wrapping the loaded model, chat template applied, thinking off where the template has a switch) and
the JSON-safe part of lm-eval's results.
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from abliterate.errors import DataError, UsageError
from abliterate.model.chat import template_switches

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("mmlu", "arc_challenge", "gsm8k", "truthfulqa_mc2")
LOCAL_TASK = "abliterate_mini_mc"
KEPT = ("results", "versions", "n-samples", "n-shot", "higher_is_better", "group_subtasks")
"""The parts of lm-eval's output stored in results.json."""
_NOT_METRICS = {"alias", "name", "sample_len", "samples"}
_OFFLINE_HINT = (
    "it needs its dataset from the Hugging Face hub: connect once (datasets are cached), "
    f"or use --tasks {LOCAL_TASK} (offline) or --tasks none"
)


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """`none` (or nothing) -> []; else the comma-separated task names, in order, without repeats."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [p.strip() for p in parts if p.strip()]
    if [n.lower() for n in names] in ([], ["none"]):
        return []
    if any(n.lower() == "none" for n in names):
        raise UsageError(f"--tasks {spec!r} mixes none with task names", hint="give tasks, or none alone")
    return list(dict.fromkeys(names))


def local_tasks_folder() -> Path:
    """The folder of task YAMLs shipped with abliterate (an lm-eval include path)."""
    return Path(str(resources.files("abliterate") / "data" / "tasks"))


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise UsageError(
            "the capability benchmarks need lm-eval, which is not installed",
            hint="pip install 'abliterate[eval]', or pass --tasks none",
        ) from None
    return lm_eval


def task_manager(tasks: Sequence[str]) -> Any:
    """A TaskManager that knows `tasks`: only the local folder when that suffices (it indexes in ms)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=str(local_tasks_folder()), include_defaults=False)
    if all(name in local.all_tasks for name in tasks):
        return local
    return TaskManager(include_path=str(local_tasks_folder()))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:300]


def _is_offline(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, ConnectionError | TimeoutError) or any(
        word in text for word in ("offline", "couldn't reach", "connection", "resolve", "hub")
    )


def task_error(name: str, err: BaseException) -> DataError:
    """A one-line DataError for a task that could not load or run, with the fix."""
    if _is_offline(err):
        return DataError(f"lm-eval task {name!r} cannot load its data ({_first_line(err)})", hint=_OFFLINE_HINT)
    return DataError(
        f"lm-eval task {name!r} failed: {_first_line(err)}",
        hint=f"check the task with `lm_eval run --tasks {name} --limit 1`, or leave it out of --tasks",
    )


def check_tasks(tasks: Sequence[str]) -> None:
    """Every task is known and loads its data (downloading it once); raises a one-line error otherwise."""
    if not tasks:
        return
    manager = task_manager(tasks)
    for name in tasks:
        if name not in manager.all_tasks:
            raise UsageError(
                f"unknown lm-eval task {name!r}",
                hint=f"list them with `lm_eval ls tasks`; {LOCAL_TASK} is the offline task shipped with abliterate",
            )
    for name in tasks:
        try:
            manager.load([name])
        except Exception as err:  # lm-eval and datasets raise many types; all become one line
            raise task_error(name, err) from err


def jsonable(value: Any) -> Any:
    """`value` with everything JSON cannot hold dropped (callables, objects) and NaN/inf as None."""
    if isinstance(value, dict):
        out = {str(k): jsonable(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _DROP}
    if isinstance(value, list | tuple):
        return [v for v in (jsonable(v) for v in value) if v is not _DROP]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)  # numpy and torch scalars
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            return _DROP
    return _DROP


_DROP = object()


def hflm_template_args(hflm: type, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """HFLM's `enable_thinking=False` where the chat template has that switch and this lm-eval accepts it."""
    switches = template_switches(tokenizer)
    accepted = inspect.signature(hflm).parameters
    return {k: v for k, v in switches.items() if k in accepted}


def run_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Run lm-eval `tasks` on the in-memory model (chat template applied); the JSON-safe results block."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **hflm_template_args(HFLM, tokenizer))
    try:
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), limit=limit, apply_chat_template=True, task_manager=manager,
            log_samples=False,
        )
    except Exception as err:  # a task that fails mid-run: name it (the first one, lm-eval does not say which)
        raise task_error(",".join(tasks), err) from err
    finally:
        del lm
        gc.collect()
    if output is None:
        raise DataError("lm-eval returned no results", hint="run again with -vv to see lm-eval's logs")
    block: dict[str, Any] = {"tasks": list(tasks), "limit": limit, "lm_eval_version": lm_eval.__version__}
    block.update({key: jsonable(output.get(key)) for key in KEPT if key in output})
    return block


def metrics(block: dict[str, Any] | None) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for every numeric metric in an lm-eval results block."""
    rows: list[tuple[str, str, float, float | None]] = []
    for task, values in sorted(((block or {}).get("results") or {}).items()):
        for key, value in values.items():
            if key in _NOT_METRICS or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, _, filt = key.partition(",")
            stderr = values.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            name = metric if filt in ("", "none") else f"{metric} ({filt})"
            rows.append((task, name, float(value), float(stderr) if isinstance(stderr, int | float) else None))
    return rows
