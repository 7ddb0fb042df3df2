"""`abliterate chat`: driven through stdin like a user, answers checked against transformers' own greedy decode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate.commands.repl import side_by_side

TOKENS = 6


def chat(*args: str | Path, stdin: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "abliterate", "-q", "chat", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=env, timeout=300, check=False)


def reference(folder: Path, turns: list[str]) -> list[str]:
    """Greedy answers of transformers' generate to each turn, the conversation carried along."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages: list[dict[str, str]] = []
    answers = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


def test_chat_streams_greedy_answers_with_history(tiny_chat: Path) -> None:
    done = chat(tiny_chat, "--max-new-tokens", TOKENS, stdin="how to write\ngive a list\n/reset\ngive a list\n/quit\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    first, second = reference(tiny_chat, ["how to write", "give a list"])
    (fresh,) = reference(tiny_chat, ["give a list"])
    assert [line.strip() for line in lines] == [first, second, "(new conversation)", fresh]
    assert second != fresh  # the second turn saw the first: history matters, and /reset drops it


def test_compare_prints_both_answers_side_by_side(tiny_chat: Path, tmp_path: Path) -> None:
    done = chat(tiny_chat, "--compare", tiny_chat, "--max-new-tokens", TOKENS, stdin="how to write\n")
    assert done.returncode == 0, done.stderr
    (answer,) = reference(tiny_chat, ["how to write"])
    rows = [[cell.strip() for cell in row.split("|", 1)] for row in done.stdout.splitlines()]
    assert rows[0] == [str(tiny_chat), str(tiny_chat)]
    left, right = [row[0] for row in rows[2:]], [row[1] for row in rows[2:]]
    assert " ".join(" ".join(left).split()) == answer == " ".join(" ".join(right).split())
    assert done.stderr.count(answer) == 2  # both streamed while generating


def test_side_by_side_wraps_into_columns() -> None:
    rows = side_by_side(("a", "one two three four five six"), ("b", "x"), width=43)
    assert rows[0] == "a                    | b"
    assert all(len(row) <= 43 for row in rows)
    assert " ".join(r.split("|")[0].strip() for r in rows[2:]) == "one two three four five six"


def test_chat_without_model_is_one_line() -> None:
    done = chat(stdin="")
    assert done.returncode != 0 and "no model given" in done.stderr and "Traceback" not in done.stderr
