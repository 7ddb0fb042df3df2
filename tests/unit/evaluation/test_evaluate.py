"""Evaluation and reports on tiny random models: results schema, per-prompt records and verdicts, the generation
cache, KL against a base, lm-eval on the shipped local task, `report`, and `edit` with its evaluation."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_self_contained, one_line_error, run
from tiny_models import BYTE_VOCAB, build, save_tokenizer

from abliterate.commands.edit import run_edit
from abliterate.errors import DataError, UsageError
from abliterate.evaluation import answer_cache
from abliterate.evaluation.answer_cache import GenerationCache, model_identity
from abliterate.evaluation.capability import jsonable, parse_tasks, run_tasks
from abliterate.evaluation.evaluate import EvalModel, EvalOptions, Evaluator, kl_reference, run_eval, select_prompts
from abliterate.evaluation.generate import Generation, generate
from abliterate.evaluation.judge import MarkerJudge
from abliterate.evaluation.report import REPORT_HTML, REPORT_JSON, REPORT_MD, build_report, write_report
from abliterate.evaluation.results import SCHEMA_VERSION, read_results
from abliterate.model.loading import ModelSource, load_model
from abliterate.settings import build_settings

REFUSAL = "I'm sorry, but I can't help with that request."  # the marker judge checks English in every language


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny chat models of the same family and tokenizer (a base and a different 'edited' one)."""
    root = tmp_path_factory.mktemp("eval-models")
    found = {}
    for name, seed in (("base", 0), ("other", 1)):
        folder = root / name
        build("llama", folder, tied=True, seed=seed)
        save_tokenizer(folder)
        found[name] = folder
    return found


def loaded(folder: Path) -> EvalModel:
    model, tokenizer = load_model(ModelSource(str(folder), folder), dtype="float32", device="cpu")
    return EvalModel(model, tokenizer, str(folder), folder, model_identity(folder))


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private ABLITERATE_CACHE (generation cache) for one test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("ABLITERATE_CACHE", str(folder))
    return folder


def options(**given: Any) -> EvalOptions:
    values: dict[str, Any] = dict(langs="en,de", n_prompts=3, max_new_tokens=6, batch_size=4, tasks=(),
                                  kl_tokens=4, kl_prompts=4, dtype="float32", device="cpu")
    values.update(given)
    return EvalOptions(**values)


class GenerateCounter:
    """Counts the generation batches a model runs: forward calls that start a KV cache (prefills)."""

    def __init__(self, model: Any) -> None:
        self.calls = 0
        inner = model.forward

        def counted(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("use_cache") and kwargs.get("past_key_values") is None:
                self.calls += 1
            return inner(*args, **kwargs)

        model.forward = counted


# --- results ---------------------------------------------------------------------------------------------


def test_results_schema_and_per_prompt_records(folders: dict[str, Path], cache_env: Path) -> None:
    evaluator = Evaluator.prepare(options())
    results = evaluator.evaluate(loaded(folders["other"]))
    json.loads(json.dumps(results))  # plain JSON
    assert results["schema_version"] == SCHEMA_VERSION
    assert {"tool", "created", "model", "settings", "summary", "languages", "kl", "lm_eval", "timings",
            "cache"} <= set(results)
    assert results["model"]["identity"] == model_identity(folders["other"])
    assert results["settings"]["langs"] == ["en", "de"] and results["settings"]["max_new_tokens"] == 6
    assert results["kl"] is None and results["lm_eval"] is None
    for lang, block in results["languages"].items():
        for kind in ("harmful", "harmless"):
            part = block[kind]
            assert part["n"] == len(part["records"]) == 3
            keys = {"id", "prompt", "response", "refused", "evasive", "harmful", "why"}
            assert [set(r) for r in part["records"]] == [keys] * 3
            assert part["refusals"] == sum(r["refused"] for r in part["records"])
            assert part["evasions"] == sum(r["evasive"] for r in part["records"])
            assert part["refusal_rate"] == part["refusals"] / 3
        assert block["compliance"] == 1 - block["harmful"]["refusal_rate"] - block["harmful"]["evasion_rate"]
        assert block["over_refusal"] == block["harmless"]["refusal_rate"]
        wanted = [p.instruction for p in select_prompts(options())[lang]["harmful"]]
        assert [r["prompt"] for r in block["harmful"]["records"]] == wanted
    assert results["summary"]["harmful_prompts"] == 6
    assert results["timings"]["total_s"] >= results["timings"]["refusal_s"] >= 0


def test_verdicts_agree_with_rejudging_the_stored_answers(
    folders: dict[str, Path], cache_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers are matched to their prompts and verdicts to their answers, for refusals and compliances."""

    def fake_generate(model: Any, tokenizer: Any, instructions: list[str], *args: Any, **kwargs: Any) -> Any:
        answer = "Sure. Here is a full answer, with every detail you need, to: {}"  # not a bare echo (an evasion)
        texts = [REFUSAL if i % 2 == 0 else answer.format(t) for i, t in enumerate(instructions)]
        return Generation([[5] for _ in texts], texts, [True] * len(texts))

    monkeypatch.setattr(answer_cache, "generate", fake_generate)
    results = Evaluator.prepare(options(n_prompts=4)).evaluate(loaded(folders["base"]))
    judge = MarkerJudge()
    verdicts = []
    for lang, block in results["languages"].items():
        for kind in ("harmful", "harmless"):
            for i, record in enumerate(block[kind]["records"]):
                verdict = judge.verdict(record["response"], lang, record["prompt"])
                assert (record["refused"], record["evasive"]) == (verdict.refused, verdict.evasive)
                if i % 2:
                    assert record["response"].endswith(record["prompt"])  # the answer is the prompt's own
                verdicts.append(record["refused"])
        assert block["compliance"] == 0.5 and block["over_refusal"] == 0.5
    assert True in verdicts and False in verdicts


def test_language_selection(tmp_path: Path) -> None:
    source = tmp_path / "prompts.jsonl"
    rows = [{"instruction": f"{kind} {i}", "kind": kind, "split": "test", "lang": "en"}
            for kind in ("harmful", "harmless") for i in range(2)]
    source.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert list(select_prompts(options(langs="all", prompts=str(source)))) == ["en"]  # `all`: what it has
    with pytest.raises(DataError, match="'de'"):
        select_prompts(options(langs="en,de", prompts=str(source)))  # a named language must be there
    assert len(select_prompts(options(langs="all", n_prompts=None))) == 14
    assert parse_tasks("none") == [] and parse_tasks(" mmlu, gsm8k,mmlu ") == ["mmlu", "gsm8k"]
    with pytest.raises(UsageError):
        parse_tasks("none,mmlu")


# --- the generation cache --------------------------------------------------------------------------------


def test_second_run_reuses_cached_generations(folders: dict[str, Path], cache_env: Path) -> None:
    target = loaded(folders["base"])
    counter = GenerateCounter(target.model)
    first = Evaluator.prepare(options()).evaluate(target)
    assert counter.calls > 0 and first["cache"] == {"enabled": True, "hits": 0, "misses": 4}
    assert list((cache_env / "generations").glob("*.json"))

    counter.calls = 0
    second = Evaluator.prepare(options()).evaluate(target)
    assert counter.calls == 0, "a re-run with the same model, prompts and settings must not generate"
    assert second["cache"]["hits"] == 4 and second["languages"] == first["languages"]

    Evaluator.prepare(options(max_new_tokens=5)).evaluate(target)  # other settings: generated again
    assert counter.calls > 0
    counter.calls = 0
    Evaluator.prepare(options(cache=False)).evaluate(target)  # --no-cache
    assert counter.calls > 0


def test_model_identity_follows_the_weights(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    build("llama", folder)
    save_tokenizer(folder)
    before = model_identity(folder)
    assert model_identity(folder) == before
    (folder / "tokenizer.json").touch()  # not a weight file
    assert model_identity(folder) == before
    shard = next(folder.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000_000))
    assert model_identity(folder) != before
    moved = tmp_path / "renamed"
    after = model_identity(folder)
    folder.rename(moved)  # the rename that finishes an edit keeps the identity
    assert model_identity(moved) == after


def test_unreadable_cache_entry_is_regenerated(folders: dict[str, Path], cache_env: Path) -> None:
    target = loaded(folders["base"])
    cache = GenerationCache.default()
    first = cache.generate(target.model, target.tokenizer, target.identity, ["hello there"], 4, 2)
    for path in (cache_env / "generations").glob("*.json"):
        path.write_text("{broken", encoding="utf-8")
    again = cache.generate(target.model, target.tokenizer, target.identity, ["hello there"], 4, 2)
    assert again.texts == first.texts and cache.misses == 2


def test_prompt_lists_answered_in_one_queue_equal_each_list_alone(folders: dict[str, Path], cache_env: Path) -> None:
    """`generate_jobs` answers the uncached lists in one call (one prefill of the whole queue) and caches each
    list under the key a call for that list alone has: the same answers, and a later single call hits."""
    target = loaded(folders["base"])
    lists = {"a": ["hello there", "how are you today, friend?"], "b": ["x", "tell me a story", "why?"]}
    alone = {job: generate(target.model, target.tokenizer, texts, 7, 8) for job, texts in lists.items()}
    cache = GenerationCache.default()
    counter = GenerateCounter(target.model)
    together = cache.generate_jobs(target.model, target.tokenizer, target.identity, lists, 7, 8)
    assert counter.calls == 1, "both lists fit one batch of 8: one queue, one prefill"
    assert together == alone
    counter.calls = 0
    again = cache.generate(target.model, target.tokenizer, target.identity, lists["b"], 7, 8)
    assert counter.calls == 0 and again == alone["b"] and cache.hits == 1


# --- KL --------------------------------------------------------------------------------------------------


def test_kl_against_the_base(folders: dict[str, Path], cache_env: Path) -> None:
    base, other = loaded(folders["base"]), loaded(folders["other"])
    evaluator = Evaluator.prepare(options())
    reference = kl_reference(base, evaluator.selected, evaluator.options, evaluator.cache)
    same = evaluator.evaluate(base, reference)["kl"]
    assert same["n_prompts"] == 4 and set(same["languages"]) == {"en", "de"}
    assert abs(same["first_token"]) < 1e-6 and abs(same["first_n_tokens"]) < 1e-6

    kl = evaluator.evaluate(other, reference)["kl"]
    assert kl["first_token"] > 1e-4 and kl["first_n_tokens"] > 1e-4
    assert kl["base"]["identity"] == base.identity and kl["tokens"] == 4
    assert all(1 <= r["tokens"] <= 4 for r in kl["records"]) and len(kl["per_position"]) <= 4
    # Reference: each prompt alone (no batch, no padding) through both models, KL(base || edited) by its formula.
    prompts = [p.instruction for lang in ("en", "de") for p in evaluator.selected[lang]["harmless"][:2]]
    assert kl["first_token"] == pytest.approx(_first_token_kl_by_hand(base, other, prompts), rel=1e-4, abs=1e-7)


def _first_token_kl_by_hand(base: EvalModel, other: EvalModel, prompts: list[str]) -> float:
    total = 0.0
    for prompt in prompts:
        text = base.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([base.tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            p = torch.softmax(base.model(ids).logits[0, -1].double(), dim=-1)
            q = torch.softmax(other.model(ids).logits[0, -1].double(), dim=-1)
        total += float((p * (p.log() - q.log())).sum())
    return total / len(prompts)


# --- lm-eval ---------------------------------------------------------------------------------------------


def test_lm_eval_on_the_local_task(tmp_path: Path) -> None:
    """lm-eval's accuracy equals the one computed here from the model's own log-likelihoods of each choice."""
    folder = tmp_path / "byte-model"
    build("llama", folder, tied=True, extra={"vocab_size": BYTE_VOCAB})
    save_tokenizer(folder, byte_level=True)  # one token per byte: every choice gets its own log-likelihood
    target = loaded(folder)
    block = run_tasks(target.model, target.tokenizer, ["abliterate_mini_mc"], limit=8, batch_size=4)
    json.loads(json.dumps(block))
    result = block["results"]["abliterate_mini_mc"]
    acc, acc_norm = _mini_mc_accuracy_by_hand(target, limit=8)
    assert result["acc,none"] == pytest.approx(acc) and result["acc_norm,none"] == pytest.approx(acc_norm)
    assert (acc, acc_norm) == (0.375, 0.25)  # this seed's model; a sanity anchor for the reference itself
    assert block["n-samples"]["abliterate_mini_mc"] == {"original": 16, "effective": 8}
    assert block["versions"]["abliterate_mini_mc"] == 1.0 and block["limit"] == 8


def _mini_mc_accuracy_by_hand(target: EvalModel, limit: int) -> tuple[float, float]:
    """acc and acc_norm of the first `limit` questions: the chat-rendered question, each choice's summed log-prob
    after it (the template's trailing space moves to the choice, as lm-eval does), argmax; acc_norm divides the
    log-likelihood by the choice's length in characters."""
    path = Path(__file__).parents[3] / "abliterate" / "data" / "tasks" / "abliterate_mini_mc.jsonl"
    docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()][:limit]
    tok, hits, norm_hits = target.tokenizer, 0, 0
    for doc in docs:
        prompt = f"Question: {doc['question']}\nAnswer:"
        messages = [{"role": "user", "content": prompt}]
        context = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        stem = context.rstrip()
        start = len(tok(stem, add_special_tokens=False)["input_ids"])
        scores = []
        for choice in doc["choices"]:
            ids = tok(stem + context[len(stem) :] + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(target.model(torch.tensor([ids])).logits[0].double(), dim=-1)
            scores.append(sum(float(logp[i - 1, ids[i]]) for i in range(start, len(ids))))
        best = max(range(len(scores)), key=lambda i: scores[i])
        best_norm = max(range(len(scores)), key=lambda i: scores[i] / len(doc["choices"][i]))
        hits += best == doc["answer"]
        norm_hits += best_norm == doc["answer"]
    return hits / len(docs), norm_hits / len(docs)


def test_jsonable_drops_what_json_cannot_hold() -> None:
    value = {"a": 1.5, "nan": float("nan"), "f": len, "nested": [torch.tensor(2.0), object(), "x"], "b": True}
    assert jsonable(value) == {"a": 1.5, "nan": None, "nested": [2.0, "x"], "b": True}


def test_offline_hub_task_fails_in_one_line(folders: dict[str, Path], tmp_path: Path) -> None:
    done = run("eval", folders["base"], "--tasks", "arc_challenge", "--langs", "en", "--out", tmp_path / "r.json",
               env={"HF_DATASETS_OFFLINE": "1"})
    line = one_line_error(done)
    assert "'arc_challenge'" in line and "--tasks abliterate_mini_mc" in line and "--tasks none" in line
    assert not (tmp_path / "r.json").exists()


# --- the CLI: eval, report, edit -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results_files(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`abliterate eval` of the base and of the other model (KL against the base), with the local task."""
    tmp = tmp_path_factory.mktemp("results")
    env = {"ABLITERATE_CACHE": str(tmp / "cache")}
    common = {"langs": "en,de", "eval_prompts": 3, "max_new_tokens": 6, "tasks": "abliterate_mini_mc", "limit": 4,
              "batch_size": 4}
    before, after = tmp / "before.json", tmp / "after.json"
    with pytest.MonkeyPatch.context() as patch:  # the API for the base (a subprocess costs seconds of imports)
        patch.setenv("ABLITERATE_CACHE", env["ABLITERATE_CACHE"])
        run_eval(build_settings(None, {"model": str(folders["base"]), "out": before, **common}), kl_tokens=4)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    done = run("eval", folders["other"], "--base", folders["base"], *flags, "--kl-tokens", "4", "--out", after, env=env)
    assert done.returncode == 0, done.stderr
    assert "en: compliance" in done.stdout and f"results -> {after}" in done.stdout
    assert "KL vs base (6 harmless prompts)" in done.stdout
    return before, after


def test_eval_command_writes_results(results_files: tuple[Path, Path]) -> None:
    before, after = (read_results(p) for p in results_files)
    assert before.kl is None and after.kl is not None and after.kl.n_prompts == 6
    assert after.model.spec.endswith("other") and after.kl.base.spec.endswith("base")
    for results in (before, after):
        assert results.lm_eval is not None and results.lm_eval["results"]["abliterate_mini_mc"]["sample_len"] == 4
        assert set(results.languages) == {"en", "de"}


def test_report_command_builds_md_html_and_plots(results_files: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = run("report", *results_files, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "compliance" in done.stdout and str(out / REPORT_HTML) in done.stdout
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["capability.png", "compliance.png", "kl.png"]
    assert all((out / p).read_bytes().startswith(b"\x89PNG") for p in pngs)
    markdown = (out / REPORT_MD).read_text(encoding="utf-8")
    assert "| en (English) | 3/3 |" in markdown and "| de (German) | 3/3 |" in markdown
    assert "| abliterate_mini_mc | acc |" in markdown and "averaged over the first 4 answer tokens" in markdown
    assert all(f"]({p})" in markdown for p in pngs)
    report = json.loads((out / REPORT_JSON).read_text(encoding="utf-8"))
    assert report == json.loads(json.dumps(build_report(*(read_results(p) for p in results_files))))
    page = (out / REPORT_HTML).read_text(encoding="utf-8")
    links = assert_self_contained(page)
    assert len(links.images) == 3 and all(i.startswith("data:image/png;base64,") for i in links.images)


def test_report_rejects_other_json(tmp_path: Path, edited: Path) -> None:
    bogus = tmp_path / "x.json"
    bogus.write_text('{"hello": 1}', encoding="utf-8")
    for path in (bogus, edited / "abliterate" / REPORT_JSON):  # a report is not a results file either
        with pytest.raises(DataError, match="not an abliterate results file"):
            read_results(path)


def test_report_without_capability_or_kl(tmp_path: Path) -> None:
    def results(compliance: float) -> dict[str, Any]:
        block = {"n": 2, "refusals": 1, "refusal_rate": 0.5, "records": [
            {"id": "a", "prompt": "p <b>", "response": "r </td>", "refusal": True},
            {"id": "b", "prompt": "q", "response": "s", "refusal": False}]}
        return {"schema_version": 1, "model": {"spec": "m"}, "settings": {}, "summary": {"compliance": compliance},
                "languages": {"en": {"compliance": compliance, "over_refusal": 0.5, "harmful": block,
                                     "harmless": block}}, "kl": None, "lm_eval": None}

    report = write_report(tmp_path, results(0.1), results(0.9))
    assert report.capability == [] and report.kl is None
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["compliance.png"]
    page = (tmp_path / REPORT_HTML).read_text(encoding="utf-8")
    assert "p &lt;b&gt;" in page and "<b>" not in page  # answers are escaped
    assert_self_contained(page)


@pytest.fixture(scope="module")
def edited(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("edit-eval")
    out = tmp / "edited"
    done = run(
        "edit", folders["base"], "--out", out, "--n-train", "8", "--n-val", "4", "--screen-prompts", "2",
        "--finalists", "2", "--batch-size", "8", "--refusal-tokens", "I", "--refusal-tokens", "Sorry",
        "--langs", "en,de", "--eval-prompts", "3", "--max-new-tokens", "6", "--tasks", "abliterate_mini_mc",
        "--limit", "4", env={"ABLITERATE_CACHE": str(tmp / "cache")},
    )
    assert done.returncode == 0, done.stderr
    assert "compliance" in done.stdout and f"report: {out / 'abliterate' / REPORT_HTML}" in done.stdout
    yield out


def test_edit_evaluates_and_writes_the_report(edited: Path) -> None:
    folder = edited / "abliterate"
    for name in (REPORT_JSON, REPORT_MD, REPORT_HTML, "compliance.png", "capability.png", "kl.png"):
        assert (folder / name).is_file(), name
    report = json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))
    assert [r["lang"] for r in report["languages"]] == ["en", "de"]
    assert report["after_model"]["folder"] == str(edited.resolve())  # measured in the temporary folder
    assert report["kl"]["base"]["folder"] == report["before_model"]["folder"]
    assert report["after"]["lm_eval"] and report["before"]["lm_eval"]
    assert report["capability"] and all(r["delta"] is not None for r in report["capability"])
    assert_self_contained((folder / REPORT_HTML).read_text(encoding="utf-8"))


def test_edit_report_is_in_the_card_and_the_provenance(edited: Path) -> None:
    card = (edited / "README.md").read_text(encoding="utf-8")
    assert "Refusal per language" in card and "| en (English) | 3/3 |" in card
    assert "](abliterate/compliance.png)" in card and "Evaluation was not run" not in card
    provenance = json.loads((edited / "abliterate" / "provenance.json").read_text(encoding="utf-8"))
    hashed = provenance["output"]["files"]
    assert {"abliterate/report.json", "abliterate/report.md", "abliterate/report.html", "abliterate/kl.png"} <= set(
        hashed
    )
    assert provenance["settings"]["langs"] == "en,de" and provenance["settings"]["eval_prompts"] == 3
    done = run("verify", edited)
    assert done.returncode == 0, done.stderr


def test_no_eval_writes_no_report(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "plain"
    settings = build_settings(None, {
        "model": str(folders["base"]), "out": out, "n_train": 8, "n_val": 4, "layer": 1, "pos": -1,
        "refusal_tokens": ["I"], "eval": False, "tasks": "arc_challenge",  # never loaded without evaluation
    })
    result = run_edit(settings)
    assert result.report is None and not (out / "abliterate" / REPORT_MD).exists()
    assert "Evaluation was not run" in (out / "README.md").read_text(encoding="utf-8")


def test_bad_eval_options_fail_before_any_work() -> None:
    with pytest.raises(UsageError, match="--langs names no language"):
        build_settings(None, {"model": "m", "langs": ","})
    with pytest.raises(UsageError, match="'xx'"):
        build_settings(None, {"model": "m", "langs": "en,xx"})
    with pytest.raises(UsageError, match="unknown judge"):
        Evaluator.prepare(options(judge="gpt", tasks=("abliterate_mini_mc",)))
    with pytest.raises(UsageError, match="unknown lm-eval task 'nope'"):
        Evaluator.prepare(options(tasks=("abliterate_mini_mc", "nope")))
