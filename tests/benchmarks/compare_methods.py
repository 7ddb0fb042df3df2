"""Compare the three --method variants on the model organism: refusal and KL after each edit.

    python tests/benchmarks/compare_methods.py [--layer 16 --pos -1 --prompts 32 --tokens 64]

Builds (or reuses) the organism, writes one edited checkpoint per method with the same (layer, pos) through the
normal `edit` pipeline (no evaluation), then measures on the built-in English *test* prompts: harmful and
harmless refusal (greedy, marker judge) and the first-token KL on the harmless prompts the organism answers.
Prints one JSON line per method (docs/method.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from abliterate.commands.edit import run_edit
from abliterate.commands.organism.train import build_organism, load_base
from abliterate.evaluation.generate import first_token_kl, refusal_rate
from abliterate.evaluation.judge import MarkerJudge
from abliterate.prompts import sources
from abliterate.settings import Settings

METHODS = ("standard", "projected", "norm-preserving")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=16)
    parser.add_argument("--pos", type=int, default=-1)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    organism = build_organism()
    base, tokenizer = load_base(organism)
    judge = MarkerJudge()
    source = sources.builtin()
    harmful = source.instructions("en", "harmful", "test", args.prompts)
    harmless = source.instructions("en", "harmless", "test", args.prompts)
    before = refusal_rate(base, tokenizer, harmless, "en", judge, args.tokens)
    answered = [p for p, refused in zip(harmless, before.verdicts, strict=True) if not refused]
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            start = time.perf_counter()
            out = Path(tmp) / method
            run_edit(Settings(model=str(organism), out=out, layer=args.layer, pos=args.pos, method=method,
                              eval=False, dtype="float32", device="cpu", n_train=64, batch_size=32))
            edited, _ = load_base(out)
            kl = first_token_kl(base, edited, tokenizer, answered)
            row = {
                "method": method, "layer": args.layer, "pos": args.pos,
                "harmful_refusal": refusal_rate(edited, tokenizer, harmful, "en", judge, args.tokens).rate,
                "harmless_refusal": refusal_rate(edited, tokenizer, harmless, "en", judge, args.tokens).rate,
                "kl_mean": round(float(kl.mean()), 4), "kl_median": round(float(kl.median()), 4),
                "kl_prompts": len(answered), "seconds": round(time.perf_counter() - start, 1),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
