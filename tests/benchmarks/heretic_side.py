"""Heretic's side of tests/benchmarks/vs_heretic.py: its optimization, its exports, its evaluator.

Heretic (heretic-llm on PyPI) is never imported here: it runs as its own program from its own virtual
environment (it pins optuna 4.x; abliterate uses 5.x), driven through its documented interfaces:
- `config.toml` in its working directory (local prompt files, trial count, seed, `export_strategy = "merge"`);
- its menus, answered on stdin: with `COLAB_GPU` set, Heretic reads numbered choices with `input()` instead
  of drawing terminal menus (its notebook mode), so a pipe can pick each Pareto trial and save it;
- `heretic --evaluate-model DIR` to score any checkpoint against the base with its own evaluator;
- its study checkpoint (an Optuna journal file), read with Heretic's own Python for the trials' numbers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MENU_TRIAL = re.compile(r"\[(\d+)\] \[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([0-9.]+)")
MENU_EXIT = re.compile(r"\[(\d+)\] Exit program")
PROMPT = "Enter number: "

DUMP_TRIALS = """
import json, sys
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
storage = JournalStorage(JournalFileBackend(sys.argv[1]))
study = storage.get_all_studies()[0]
trials = storage.get_all_trials(study._study_id)
rows = [{"index": t.user_attrs.get("index"), "state": t.state.name, "params": t.params,
         "refusals": t.user_attrs.get("refusals"), "kl": t.user_attrs.get("kl_divergence"),
         "n_bad_prompts": t.user_attrs.get("n_bad_prompts"), "base_refusals": t.user_attrs.get("base_refusals"),
         "start": t.datetime_start.timestamp() if t.datetime_start else None,
         "end": t.datetime_complete.timestamp() if t.datetime_complete else None} for t in trials]
print(json.dumps(rows))
"""


@dataclass
class HereticSetup:
    """Where Heretic lives and what it is told."""

    executable: Path  # the `heretic` script inside its virtual environment
    work: Path  # its working directory: config.toml, prompt files, checkpoints/
    model: Path
    trials: int
    startup_trials: int
    max_new_tokens: int
    seed: int
    batch_size: int

    @property
    def python(self) -> Path:
        return self.executable.parent / "python"


def write_prompt_file(path: Path, prompts: list[str]) -> None:
    """One prompt per line (Heretic's plain-text prompt source); prompts never contain newlines here."""
    if any("\n" in p for p in prompts):
        raise ValueError(f"a prompt for {path.name} contains a newline")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p.strip() + "\n" for p in prompts), encoding="utf-8")


def write_config(setup: HereticSetup, prompts: dict[str, list[str]]) -> None:
    """config.toml: the model, the four prompt files, the budget; everything else Heretic's defaults."""
    files = {}
    for name, texts in prompts.items():
        write_prompt_file(setup.work / "prompts" / f"{name}.txt", texts)
        files[name] = json.dumps(str((setup.work / "prompts" / f"{name}.txt").resolve()))
    lines = [
        f"model = {json.dumps(str(setup.model))}",
        'dtypes = ["float32"]',
        f"batch_size = {setup.batch_size}",
        f"max_response_length = {setup.max_new_tokens}",
        f"n_trials = {setup.trials}",
        f"n_startup_trials = {setup.startup_trials}",
        f"seed = {setup.seed}",
        'export_strategy = "merge"',
        "",
    ]
    for key, name in (("good_prompts", "harmless_train"), ("bad_prompts", "harmful_train"),
                      ("good_evaluation_prompts", "harmless_test"), ("bad_evaluation_prompts", "harmful_test")):
        lines += [f"[{key}]", f"dataset = {files[name]}", ""]
    (setup.work / "config.toml").write_text("\n".join(lines), encoding="utf-8")


def _env() -> dict[str, str]:
    return {**os.environ, "COLAB_GPU": "1", "NO_COLOR": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1",
            "TERM": "dumb", "PYTHONUNBUFFERED": "1"}


@dataclass
class Transcript:
    """Heretic's output as it arrives."""

    text: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def feed(self, chunk: str) -> None:
        with self.lock:
            self.text += chunk

    def since(self, offset: int) -> str:
        with self.lock:
            return self.text[offset:]


class Driver:
    """Heretic as a child process whose menus are answered through its stdin."""

    def __init__(self, setup: HereticSetup, args: list[str], log: Path):
        self.log = log.open("w", encoding="utf-8")
        self.proc = subprocess.Popen([str(setup.executable), *args], cwd=setup.work, env=_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=0)
        self.transcript = Transcript()
        self.offset = 0
        self.peak_rss_kb = 0
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._watch_memory, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read(1):
            self.transcript.feed(chunk)
            self.log.write(chunk)
            if chunk == "\n":
                self.log.flush()

    def _watch_memory(self) -> None:
        status = Path(f"/proc/{self.proc.pid}/status")
        while self.proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.5)

    def wait_for(self, pattern: str, timeout: float = 7200.0) -> str:
        """Everything printed since the last answer, once `pattern` has appeared (or the process ended)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.transcript.since(self.offset)
            if pattern in text:
                self.offset += len(text)
                return text
            if self.proc.poll() is not None:
                time.sleep(0.5)
                raise RuntimeError(f"heretic exited ({self.proc.returncode}) before {pattern!r}; see {self.log.name}")
            time.sleep(0.2)
        raise TimeoutError(f"heretic did not print {pattern!r} in {timeout} s")

    def answer(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        code = self.proc.wait()
        time.sleep(0.3)
        self.log.close()
        return code


def dump_trials(setup: HereticSetup) -> list[dict[str, Any]]:
    """Every trial of the study Heretic left in checkpoints/, read with Heretic's own optuna."""
    journal = next((setup.work / "checkpoints").glob("*.jsonl"))
    out = subprocess.run([str(setup.python), "-c", DUMP_TRIALS, str(journal)], check=True, capture_output=True,
                         text=True)
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def optimize_and_export(setup: HereticSetup, export_root: Path) -> dict[str, Any]:
    """Run Heretic's optimization, then save every trial of its Pareto menu (merged) under `export_root`."""
    start = time.time()
    driver = Driver(setup, [], setup.work / "heretic-optimize.log")
    menu = driver.wait_for(PROMPT)
    while "Which trial do you want to use?" not in menu:  # e.g. "How would you like to proceed?" on a rerun
        raise RuntimeError(f"unexpected Heretic menu before the trials; see {driver.log.name}")
    optimized = time.time()
    front = [(int(n), int(t), int(r), int(total), float(kl)) for n, t, r, total, kl in MENU_TRIAL.findall(menu)]
    exit_choice = MENU_EXIT.findall(menu)[-1]
    exported: dict[int, str] = {}
    for number, trial, _refusals, _total, _kl in front:
        folder = (export_root / f"heretic-trial-{trial}").resolve()
        driver.answer(str(number))
        driver.wait_for(PROMPT)  # what to do with the model
        driver.answer("1")  # save to a local folder
        driver.wait_for("Path to the folder")
        driver.answer(str(folder))
        driver.wait_for(PROMPT)  # back at the action menu once saved
        exported[trial] = str(folder)
        driver.answer("5")  # return to the trial selection menu
        driver.wait_for(PROMPT)
    driver.answer(exit_choice)
    code = driver.finish()
    trials = dump_trials(setup)
    return {
        "returncode": code, "started": start, "wall_s": round(optimized - start, 1),
        **trial_timing(trials, start), "peak_rss_mb": round(driver.peak_rss_kb / 1024),
        "front": [{"trial": t, "refusals": r, "n": total, "kl": kl} for _n, t, r, total, kl in front],
        "exported": exported, "trials": trials,
    }


def trial_timing(trials: list[dict[str, Any]], started: float) -> dict[str, float]:
    """Setup (start to the first trial) and trial time (first trial's start to the last one's end), from the
    study's own timestamps."""
    starts = [t["start"] for t in trials if t.get("start")]
    ends = [t["end"] for t in trials if t.get("end")]
    return {"setup_s": round(min(starts) - started, 1), "trials_s": round(max(ends) - min(starts), 1)}


HERETIC_SCORE = re.compile(r"KL divergence: ([0-9.]+).*?Refusals: (\d+)/(\d+)", re.S)
HERETIC_BASE = re.compile(r"Initial refusals: (\d+)/(\d+)")


def evaluate(setup: HereticSetup, model: Path, log: Path) -> dict[str, Any]:
    """`heretic --evaluate-model MODEL`: Heretic's refusals and first-token KL of `model` against the base."""
    start = time.time()
    # --model too: with a bare value last on the line, Heretic takes that value for the model
    driver = Driver(setup, ["--evaluate-model", str(model.resolve()), "--model", str(setup.model)], log)
    code = driver.finish()
    text = driver.transcript.text
    found = HERETIC_SCORE.findall(text.split("Evaluating...")[-1])
    if code != 0 or not found:
        raise RuntimeError(f"heretic --evaluate-model {model} failed ({code}); see {log}")
    kl, refusals, total = found[-1]
    base = HERETIC_BASE.findall(text)
    return {"refusals": int(refusals), "n": int(total), "kl": float(kl),
            "base_refusals": int(base[-1][0]) if base else None, "seconds": round(time.time() - start, 1)}
