"""Head to head with Heretic on the model organism: both searches, our default edit, both evaluators.

    python tests/benchmarks/vs_heretic.py --heretic /path/to/venv/bin/heretic --work /tmp/vs-heretic \
        [--trials 40] [--langs en,de,fr,zh,it] [--stages all]

Heretic is an optional benchmark dependency, never a runtime one: install it in its own virtual environment
(`python3 -m venv H && H/bin/pip install torch==2.13.0 heretic-llm==1.4.0`) and pass its `heretic` script.
One run, one machine, nothing else running:

1. `heretic`: Heretic's optimization (`--trials`, start-up trials scaled from its 60-of-200 default) on the
   multilingual organism, directions from the built-in English *train* prompts, scored on the English *test*
   prompts (its optimizer's score is its evaluator's); then every trial of its Pareto menu is saved (merged).
2. `optimize`: `abliterate optimize` with the same trial budget, directions from the same train prompts, trials
   scored on the English *val* prompts (the test prompts stay unseen); every front trial written with `--pick`.
3. `default`: `abliterate edit --lang en` with the demo's search settings (no evaluation).
4. `score`: every written model scored by Heretic's evaluator (`heretic --evaluate-model`, its markers,
   100 harmful and 100 harmless English test prompts) and by ours (`abliterate eval`: refusal, evasion and
   over-refusal per language in `--langs`, first-token and 16-token KL, the lm-eval mini task); the rest of our
   front by Heretic's evaluator only, to count the Heretic front trials one of ours matches or beats.

Stages keep their results in WORK/stages/*.json; a rerun skips finished stages (`--redo STAGE` repeats one;
a redone score stage reuses the scores of models that have not changed since the last one).
The table printed at the end is also written to WORK/table.md (docs/optimize.md quotes it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from heretic_side import HereticSetup, evaluate, optimize_and_export, write_config

from abliterate.commands.organism.train import build_organism, named_recipe
from abliterate.evaluation.answer_cache import model_identity
from abliterate.prompts import sources

STAGES = ("heretic", "optimize", "default", "score")
DEMO_SEARCH = ["--n-train", "64", "--n-val", "32", "--screen-prompts", "8", "--finalists", "8",
               "--kl-threshold", "0.25"]
COMMON = ["--dtype", "float32", "--device", "cpu", "--batch-size", "32"]


def abliterate_cli() -> Path:
    return Path(sys.executable).parent / "abliterate"


def run_timed(args: list[str], log: Path) -> dict[str, Any]:
    """Run a command, its output to `log`; wall time and peak RSS (VmHWM, polled)."""
    start = time.time()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            with contextlib.suppress(OSError):
                peak = max([peak] + [int(line.split()[1]) for line in status.read_text().splitlines()
                                     if line.startswith("VmHWM:")])
            time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} ... failed ({proc.returncode}); see {log}")
    return {"wall_s": round(time.time() - start, 1), "peak_rss_mb": round(peak / 1024)}


def english_prompts() -> dict[str, list[str]]:
    source = sources.builtin()
    return {f"{kind}_{split}": source.instructions("en", kind, split, 1000)
            for kind in ("harmful", "harmless") for split in ("train", "test")}


# --- stages -------------------------------------------------------------------------------------------------


def stage_heretic(args: argparse.Namespace, organism: Path, work: Path) -> dict[str, Any]:
    setup = heretic_setup(args, organism, work, batch_size=0)
    if (setup.work / "checkpoints").exists():
        raise SystemExit(f"{setup.work / 'checkpoints'} exists from an unfinished run: delete {setup.work} first")
    write_config(setup, english_prompts())
    result = optimize_and_export(setup, work / "models")
    log = (setup.work / "heretic-optimize.log").read_text(encoding="utf-8")
    result["batch_size"] = _after(log, "Chosen batch size:")
    result["response_prefix"] = _after(log, "Prefix found:")
    return result


def _after(text: str, marker: str) -> str | None:
    lines = [line.split(marker, 1)[1].strip() for line in text.splitlines() if marker in line]
    return lines[-1] if lines else None


def heretic_setup(args: argparse.Namespace, organism: Path, work: Path, batch_size: int) -> HereticSetup:
    startup = max(1, round(args.trials * 60 / 200))  # Heretic's default share of random start-up trials
    return HereticSetup(Path(args.heretic), work / "heretic", organism, args.trials, startup, args.max_new_tokens,
                        args.seed, batch_size)


def stage_optimize(args: argparse.Namespace, organism: Path, work: Path) -> dict[str, Any]:
    study = work / "optimize-study"
    if study.exists() and not args.keep_study:  # a redo starts a new study (an old one would only be resumed)
        shutil.rmtree(study)
    cmd = [str(abliterate_cli()), "optimize", str(organism), "--lang", "en", "--langs", "en",
           "--trials", str(args.trials), "--study", str(study), "--seed", str(args.seed),
           "--trial-prompts", str(args.trial_prompts), "--kl-prompts", str(args.trial_prompts),
           "--trial-max-new-tokens", str(args.max_new_tokens), *args.optimize_args, *DEMO_SEARCH, *COMMON]
    timing = run_timed(cmd, work / "optimize.log")
    pareto = json.loads((study / "pareto.json").read_text(encoding="utf-8"))
    front = pareto["front"]
    written = {}
    for row in front:
        out = work / "models" / f"ours-trial-{row['number']}"
        if out.exists():
            shutil.rmtree(out)
        run_timed([str(abliterate_cli()), "optimize", str(organism), "--study", str(study), "--pick",
                   str(row["number"]), "--out", str(out), "--lang", "en", "--langs", "en"],
                  work / f"pick-{row['number']}.log")
        written[row["number"]] = str(out)
    return {**timing, "command": " ".join(cmd[1:]), "front": front, "exported": written,
            "trial_seconds": trial_seconds(study)}


def trial_seconds(study: Path) -> list[float]:
    """Each finished trial's measuring time, as the study recorded it."""
    import optuna

    loaded = optuna.load_study(study_name="abliterate-optimize", storage=f"sqlite:///{study / 'study.db'}")
    return [float(t.user_attrs["seconds"]) for t in loaded.trials if "seconds" in t.user_attrs]


def stage_default(args: argparse.Namespace, organism: Path, work: Path) -> dict[str, Any]:
    out = work / "models" / "ours-default-edit"
    cmd = [str(abliterate_cli()), "edit", str(organism), "--lang", "en", "--out", str(out), "--no-eval",
           "--overwrite", *DEMO_SEARCH, *COMMON]
    return {**run_timed(cmd, work / "default.log"), "command": " ".join(cmd[1:]), "exported": str(out)}


def candidates(results: dict[str, dict[str, Any]], limit: int) -> dict[str, Path]:
    """The models to score: the default edit, and from each front the `limit` trials with fewest refusals."""
    models = {"ours: default edit": Path(results["default"]["exported"])}
    heretic = sorted(results["heretic"]["front"], key=lambda r: (r["refusals"], r["kl"]))[:limit]
    for row in heretic:
        models[f"heretic: trial {row['trial']}"] = Path(results["heretic"]["exported"][str(row["trial"])])
    ours = sorted(results["optimize"]["front"], key=lambda r: (r["refusal"], r["kl"]))[:limit]
    for row in ours:
        models[f"ours: trial {row['number']}"] = Path(results["optimize"]["exported"][str(row["number"])])
    return models


def stage_score(args: argparse.Namespace, organism: Path, work: Path, results: dict[str, Any]) -> dict[str, Any]:
    setup = heretic_setup(args, organism, work, batch_size=int(results["heretic"].get("batch_size") or 32))
    prefix = results["heretic"].get("response_prefix")
    write_config(setup, english_prompts())
    if prefix is None:  # Heretic found no common prefix: tell it so, instead of re-checking in every evaluation
        with (setup.work / "config.toml").open("r+", encoding="utf-8") as fh:
            text = fh.read()
            fh.seek(0)
            fh.write('response_prefix = ""\n' + text)
    scored: dict[str, Any] = {}
    earlier = earlier_scores(work / "stages" / "score.json")
    for name, model in candidates(results, args.score_per_front).items():
        slug = name.replace(": ", "-").replace(" ", "-")
        if "ours" in earlier.get(str(model), {}):  # the same model, unchanged since an earlier score stage
            scored[name] = earlier[str(model)]
            continue
        entry: dict[str, Any] = {"model": str(model), "identity": model_identity(model)}
        entry["heretic"] = evaluate(setup, model, work / f"heretic-eval-{slug}.log")
        out = work / f"ours-eval-{slug}.json"
        entry["ours_timing"] = run_timed(
            [str(abliterate_cli()), "eval", str(model), "--base", str(organism), "--langs", args.langs,
             "--eval-prompts", str(args.eval_prompts), "--max-new-tokens", str(args.max_new_tokens),
             "--tasks", "abliterate_mini_mc", "--limit", "8", "--out", str(out), *COMMON],
            work / f"ours-eval-{slug}.log")
        entry["ours"] = summary_of(json.loads(out.read_text(encoding="utf-8")))
        scored[name] = entry
    for number, model in results["optimize"]["exported"].items():  # the rest of our front: Heretic's evaluator only
        name = f"ours: trial {number}"
        if name not in scored:
            slug = name.replace(": ", "-").replace(" ", "-")
            log = work / f"heretic-eval-{slug}.log"
            scored[name] = earlier.get(model) or {"model": model, "identity": model_identity(Path(model)),
                                                  "heretic": evaluate(setup, Path(model), log)}
    return scored


def earlier_scores(path: Path) -> dict[str, dict[str, Any]]:
    """{model folder: entry} of an earlier score stage, for the folders that have not changed since: the same
    model identity (config and weight files' names, sizes, times), or for entries without one, a folder last
    modified before that stage's file was written."""
    if not path.is_file():
        return {}
    written = path.stat().st_mtime
    kept = {}
    for entry in json.loads(path.read_text(encoding="utf-8")).values():
        folder = Path(entry["model"])
        if not folder.is_dir():
            continue
        same = entry.get("identity") == model_identity(folder) if "identity" in entry else \
            max(p.stat().st_mtime for p in [folder, *folder.iterdir()]) < written
        if same:
            kept[entry["model"]] = entry
    return kept


def dominance(results: dict[str, Any]) -> str:
    """Our front on Heretic's evaluator, and how many of Heretic's front trials one of ours matches or beats."""
    ours = sorted(((e["heretic"]["refusals"], e["heretic"]["kl"], name) for name, e in results["score"].items()
                   if name.startswith("ours: trial")))
    heretic = results["heretic"]["front"]
    covered = [r for r in heretic if any(o[0] <= r["refusals"] and o[1] <= r["kl"] for o in ours)]
    missed = ", ".join(f"{r['refusals']} @ {r['kl']:.3f} (t{r['trial']})" for r in heretic if r not in covered)
    return "\n".join([
        "Our front on Heretic's evaluator (refusals/100 @ KL): "
        + ", ".join(f"{n} @ {kl:.3f} ({name.split(': ')[1]})" for n, kl, name in ours),
        f"Heretic front trials matched or beaten by one of ours (refusals <= and KL <=): {len(covered)} of "
        f"{len(heretic)}" + (f"; not: {missed}" if missed else ""),
    ])


def summary_of(record: dict[str, Any]) -> dict[str, Any]:
    """What the table shows of one results.json: refused/evasive/over-refused per language, KL, lm-eval."""
    langs = {}
    for lang, entry in record["languages"].items():
        harmful = entry["harmful"]
        langs[lang] = {"refused": harmful["refusal_rate"], "evasive": harmful["evasion_rate"],
                       "over_refusal": entry["over_refusal"]}
    kl = record.get("kl") or {}
    lm = (record.get("lm_eval") or {}).get("results", {}).get("abliterate_mini_mc", {})
    return {"languages": langs, "kl_first": kl.get("first_token"), "kl_16": kl.get("first_n_tokens"),
            "lm_eval_acc": lm.get("acc,none")}


# --- the table ------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, Any], langs: list[str]) -> str:
    lines = ["| model | Heretic: refusals/100 | Heretic: KL | " + " | ".join(f"{x} refused (evasive)" for x in langs)
             + " | over-refusal (mean) | KL first | KL 16 | lm-eval acc |",
             "|---" * (7 + len(langs)) + "|"]
    for name, entry in results["score"].items():
        if "ours" not in entry:  # front trials scored by Heretic's evaluator only (in `dominance`)
            continue
        ours, h = entry["ours"], entry["heretic"]
        cells = [f"{fmt(ours['languages'][x]['refused'])} ({fmt(ours['languages'][x]['evasive'])})" for x in langs]
        over = [ours["languages"][x]["over_refusal"] for x in langs]
        lines.append(f"| {name} | {h['refusals']}/{h['n']} | {h['kl']:.3f} | " + " | ".join(cells)
                     + f" | {fmt(sum(over) / len(over))} | {fmt(ours['kl_first'], 3)} | {fmt(ours['kl_16'], 3)} | "
                     + f"{fmt(ours['lm_eval_acc'], 3)} |")
    return "\n".join(lines)


def fronts(results: dict[str, Any]) -> str:
    h, o = results["heretic"], results["optimize"]
    heretic = ", ".join(f"{r['refusals']}/{r['n']} @ {r['kl']:.3f} (t{r['trial']})"
                        for r in sorted(h["front"], key=lambda r: r["refusals"]))
    ours = ", ".join(f"{r['refusal']:.3f} @ {r['kl']:.3f} (t{r['number']})"
                     for r in sorted(o["front"], key=lambda r: r["refusal"]))
    trials = results["heretic"]["trials"]
    n_h = sum(1 for t in trials if t["state"] == "COMPLETE")
    o_sec = o.get("trial_seconds") or []
    return "\n".join([
        f"Heretic front (its evaluator, English test prompts, in sample): {heretic}",
        f"  {n_h} trials in {h['trials_s']} s ({h['trials_s'] / max(n_h, 1):.1f} s/trial); whole run "
        f"{h['wall_s']} s; peak RSS {h['peak_rss_mb']} MB",
        f"Our front (refusal rate on English val prompts, first-token KL): {ours}",
        f"  {len(o_sec)} trials, {sum(o_sec) / max(len(o_sec), 1):.1f} s/trial; whole run {o['wall_s']} s; "
        f"peak RSS {o['peak_rss_mb']} MB",
        f"Default edit: {results['default']['wall_s']} s; peak RSS {results['default']['peak_rss_mb']} MB",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heretic", required=True, help="the heretic script of Heretic's virtual environment")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--trial-prompts", type=int, default=32, help="our trials' prompts (val has 32)")
    parser.add_argument("--langs", default="en,de,fr,zh,it")
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--score-per-front", type=int, default=3)
    parser.add_argument("--optimize-args", nargs=argparse.REMAINDER, default=[],
                        help="extra options for abliterate optimize (last on the line)")
    parser.add_argument("--keep-study", action="store_true",
                        help="resume WORK/optimize-study instead of starting it again (e.g. one copied from a run "
                        "of the same command made alone; the trials' times are the study's own)")
    parser.add_argument("--stages", default=",".join(STAGES), help="the stages to run now (comma-separated)")
    parser.add_argument("--redo", action="append", default=[], choices=STAGES)
    args = parser.parse_args()
    work: Path = args.work.resolve()
    (work / "stages").mkdir(parents=True, exist_ok=True)
    organism = build_organism(recipe=named_recipe("multilingual"))
    results: dict[str, Any] = {}
    wanted = args.stages.split(",")
    for stage in STAGES:
        path = work / "stages" / f"{stage}.json"
        if path.exists() and stage not in args.redo:
            results[stage] = json.loads(path.read_text(encoding="utf-8"))
            continue
        if stage not in wanted:
            print(f"stage {stage} not run yet: rerun with --stages including it")
            return
        start = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] stage {stage} ...", flush=True)
        if stage == "heretic":
            result = stage_heretic(args, organism, work)
        elif stage == "optimize":
            result = stage_optimize(args, organism, work)
        elif stage == "default":
            result = stage_default(args, organism, work)
        else:
            result = stage_score(args, organism, work, results)
        path.write_text(json.dumps(result, indent=1), encoding="utf-8")
        results[stage] = json.loads(path.read_text(encoding="utf-8"))
        print(f"[{time.strftime('%H:%M:%S')}] stage {stage} done in {time.time() - start:.0f} s", flush=True)
    text = fronts(results) + "\n" + dominance(results) + "\n\n" + table(results, args.langs.split(","))
    (work / "table.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
