"""--plan and the pre-flight check on tiny models: the planned counts are the counts a run records, the disk
estimate is the bytes an edit writes, a machine too small is refused in one line, and --plan writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import FAST, one_line_error, run

from abliterate.direction.passes import expected_passes
from abliterate.direction.search import (
    LoadedModel,
    find_direction,
    forward_pass_report,
    load,
    load_prompts,
    search_shape,
    sizes,
)
from abliterate.direction.vector import Direction
from abliterate.planning.counts import search_work
from abliterate.planning.hardware import Hardware
from abliterate.planning.needs import Subject, check_memory, disk_plans, memory_plan
from abliterate.planning.plan import Request, batches, plan_run
from abliterate.planning.records import RunPlan
from abliterate.publish.write_edited import write_edited
from abliterate.settings import Settings

ROOMY = Hardware(cores=2, ram_available=64 * 10**9)


def _settings(model: Path, **values: object) -> Settings:
    base: dict[str, object] = dict(
        n_train=8, n_val=4, screen_prompts=2, finalists=2, batch_size=3, refusal_tokens=["I", "Sorry"], eval=False,
    )
    return Settings(model=str(model), **{**base, **values})


@pytest.fixture(scope="module")
def loaded(tiny_chat: Path) -> LoadedModel:
    return load(_settings(tiny_chat))


def _planned(work_rows: list[tuple[str, int, int]]) -> dict[str, dict[str, int]]:
    stages = {stage.removeprefix("search: "): (passes, rows) for stage, passes, rows in work_rows}
    return {"forward_passes": {**{k: v[0] for k, v in stages.items()}, "total": sum(v[0] for v in stages.values())},
            "forward_rows": {**{k: v[1] for k, v in stages.items()}, "total": sum(v[1] for v in stages.values())}}


@pytest.mark.parametrize("values", [
    {"filter_prompts": False},
    {"filter_prompts": False, "batch_size": 64},  # grouped screening: several candidates per pass
    {"filter_prompts": False, "finalists": 500},  # no screening: every candidate is a finalist
    {"filter_prompts": False, "layer": 1},
])
def test_the_plan_counts_what_the_search_records(
    loaded: LoadedModel, tiny_chat: Path, values: dict[str, object]
) -> None:
    """Before the run (tokenizer and prompts only) the plan's passes and rows per stage equal candidates.json's."""
    settings = _settings(tiny_chat, **values)
    work = search_work(settings, loaded.tokenizer, loaded.n_layers)
    recorded = find_direction(settings, loaded).report()
    assert _planned([(w.stage, w.passes, w.rows) for w in work]) == {
        "forward_passes": recorded.forward_passes, "forward_rows": recorded.forward_rows}


def test_with_the_filter_the_counts_follow_from_the_prompts_it_kept(loaded: LoadedModel, tiny_chat: Path) -> None:
    """The refusal filter drops prompts at run time; from the sizes it kept, the shared count is exact again."""
    settings = _settings(tiny_chat)
    result = find_direction(settings, loaded)
    assert result.splits is not None
    shape = search_shape(settings, loaded.tokenizer, loaded.n_layers, load_prompts(settings), result.splits)
    assert sizes(result.splits).total() == sum(result.filtered.values())
    assert forward_pass_report(expected_passes(shape)) == forward_pass_report(result.forward_passes)


def test_the_disk_estimate_is_the_bytes_an_edit_writes(tiny_chat: Path, tmp_path: Path) -> None:
    settings = _settings(tiny_chat, out=tmp_path / "out")
    subject = Subject.open(settings)
    [estimate] = disk_plans(settings, subject, settings.out)
    hidden = int(subject.config["hidden_size"])  # type: ignore[call-overload]
    Direction(torch.randn(hidden), layer=1, pos=-1).save(tmp_path / "r.safetensors")
    write_edited(tmp_path / "out", tiny_chat, Direction.load(tmp_path / "r.safetensors"))
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert abs(estimate.bytes - written) <= 0.05 * written, (estimate.bytes, written)


def test_weights_follow_the_dtype_and_quantization(tiny_chat: Path) -> None:
    settings = _settings(tiny_chat, dtype="float32", device="cpu")
    subject = Subject.open(settings)
    request = Request("edit", settings)
    shapes = batches(request, subject)
    full = memory_plan(settings, subject, ROOMY, shapes, edit=False)
    half = memory_plan(settings.model_copy(update={"dtype": "bfloat16"}), subject, ROOMY, shapes, edit=False)
    four = memory_plan(settings.model_copy(update={"quantize": "4bit"}), subject, ROOMY, shapes, edit=False)
    params = sum(info.nbytes // 4 for info in subject.checkpoint.tensors.values())  # the tiny model is float32
    assert full.weights == 4 * params and half.weights == 2 * params
    assert four.weights < half.weights


def test_a_gpu_that_is_too_small_suggests_4bit_or_the_cpu(tiny_chat: Path) -> None:
    from abliterate.errors import ResourceError

    settings = _settings(tiny_chat, device="cuda")
    subject = Subject.open(settings)
    shapes = batches(Request("edit", settings), subject)
    need = memory_plan(settings, subject, Hardware(2, 10**12, (10**12,)), shapes, edit=False).gpu_peak
    small = Hardware(2, 10**12, (need // 2,))
    with pytest.raises(ResourceError) as caught:
        check_memory(settings, subject, small, shapes, edit=False)
    assert "GPU memory" in str(caught.value)
    assert "--quantize 4bit" in caught.value.hint or "--device cpu" in caught.value.hint, caught.value.hint


def test_the_plan_of_an_edit_counts_and_times_every_stage(tiny_chat: Path, tmp_path: Path) -> None:
    settings = _settings(tiny_chat, eval=True, eval_prompts=2, langs="en", tasks="none", max_new_tokens=4)
    plan = plan_run(Request("edit", settings, out=tmp_path / "out"), ROOMY)
    stages = [s.stage for s in plan.stages]
    assert stages[:5] == ["load model", "search: filter", "search: activations", "search: screening",
                          "search: finalists"]
    assert "write edited checkpoint" in stages and "eval edited: answers" in stages
    answers = next(s for s in plan.stages if s.stage == "eval edited: answers")
    assert answers.generations == 4 and answers.new_tokens == 16  # 2 harmful + 2 harmless, 4 tokens each
    assert plan.seconds is not None and plan.seconds > 0
    assert RunPlan.model_validate_json(plan.model_dump_json()) == plan
    assert not (tmp_path / "out").exists()


def _cli_with(code: str) -> str:
    """Code run before the CLI's main(): `h` is the hardware probe's module, `n` the one that checks disk."""
    return f"import abliterate.planning.hardware as h, abliterate.planning.needs as n; {code}"


def test_plan_prints_and_writes_nothing(tiny_chat: Path, tmp_path: Path) -> None:
    before = sorted(tiny_chat.rglob("*"))
    done = run("edit", tiny_chat, "--out", tmp_path / "out", *FAST, "--plan", check=True)
    assert "plan: abliterate edit" in done.stdout and "search: screening" in done.stdout
    assert "disk: edited checkpoint" in done.stdout and "CPU peak" in done.stdout
    assert list(tmp_path.iterdir()) == [] and sorted(tiny_chat.rglob("*")) == before


@pytest.mark.parametrize(("patch", "needles"), [
    ("h.probe = lambda: h.Hardware(2, 10**6)", ["CPU memory", "--no-preflight"]),
    ("n.disk_free = lambda path: 1000", ["free ", "GB at", "--no-preflight"]),
])
def test_a_machine_too_small_is_refused_in_one_line(tiny_chat: Path, tmp_path: Path, patch: str,
                                                   needles: list[str]) -> None:
    code = _cli_with(patch)
    done = run("edit", tiny_chat, "--out", tmp_path / "out", *FAST, code=code)
    line = one_line_error(done)
    assert done.returncode == 2
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "out").exists()


def test_no_preflight_runs_anyway(tiny_chat: Path, tmp_path: Path) -> None:
    direction = tmp_path / "r.safetensors"
    hidden = int(Subject.open(_settings(tiny_chat)).config["hidden_size"])  # type: ignore[call-overload]
    Direction(torch.randn(hidden), layer=1, pos=-1).save(direction)
    code = _cli_with("n.disk_free = lambda path: 1000")
    refused = run("apply", tiny_chat, "--direction", direction, "--out", tmp_path / "a", code=code)
    assert "--no-preflight" in one_line_error(refused)
    done = run("apply", tiny_chat, "--direction", direction, "--out", tmp_path / "b", "--no-preflight", code=code)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b" / "config.json").is_file()
