"""The marker judge on the blind set: `python tests/benchmarks/judge_blind_report.py [tune|test|test2] [--misses]`.

Prints, per language, accuracy, refusal recall and the share of compliant answers judged refusals (false
refusals), then the totals, and with --misses every answer judged wrongly (the table in docs/judges.md). The set
and how it was written: tests/data/judge_blind/README.md. The part defaults to `test`; `test2` is the fresh
untouched part, to be judged once, after the rules are final, and never tuned on.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from abliterate.evaluation.judge import MarkerJudge

FOLDER = Path(__file__).resolve().parents[1] / "data" / "judge_blind"


@dataclass
class Tally:
    """Counts for one language (or all): answers, correct, refusals, refusals caught, compliant judged refusals."""

    n: int = 0
    correct: int = 0
    refusals: int = 0
    caught: int = 0
    false_refusals: int = 0
    misses: list[dict[str, str]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def recall(self) -> float:
        return self.caught / self.refusals if self.refusals else 0.0

    @property
    def false_refusal_rate(self) -> float:
        compliant = self.n - self.refusals
        return self.false_refusals / compliant if compliant else 0.0


PARTS = ("tune", "test", "test2")
"""The parts of the set: `tune/` and `test/` (both tuned on now), `test2/` (fresh, untouched)."""


def load(part: str) -> list[dict[str, str]]:
    """The records of one part (tune, test or test2), all languages, in file order."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}: one of {', '.join(PARTS)}")
    rows: list[dict[str, str]] = []
    for path in sorted((FOLDER / part).glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def score(rows: list[dict[str, str]], judge: MarkerJudge | None = None) -> dict[str, Tally]:
    """{lang: Tally} and "all": the marker judge's verdicts (refusal or not) against the labels."""
    judge = judge or MarkerJudge()
    tallies: dict[str, Tally] = {}
    for row in rows:
        said = judge.verdict(row["answer"], row["lang"], row["prompt"]).refused
        wanted = row["label"] == "refusal"
        for key in (row["lang"], "all"):
            t = tallies.setdefault(key, Tally())
            t.n += 1
            t.correct += said == wanted
            t.refusals += wanted
            t.caught += said and wanted
            t.false_refusals += said and not wanted
            if said != wanted and key == "all":
                t.misses.append(row)
    return tallies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=PARTS, nargs="?", default="test")
    parser.add_argument("--misses", action="store_true", help="list the answers judged wrongly")
    args = parser.parse_args()
    tallies = score(load(args.part))
    print("| lang | answers | accuracy | refusal recall | compliant judged refusals |")
    print("|---|---:|---:|---:|---:|")
    for lang, t in sorted(tallies.items(), key=lambda item: (item[0] == "all", item[0])):
        print(
            f"| {lang} | {t.n} | {t.accuracy:.3f} | {t.caught}/{t.refusals} = {t.recall:.3f} | "
            f"{t.false_refusals}/{t.n - t.refusals} = {t.false_refusal_rate:.3f} |"
        )
    if args.misses:
        for row in tallies["all"].misses:
            text = " ".join(row["answer"].split())
            print(f"- {row['id']} ({row['label']}, {row['style']}): {text[:300]}")


if __name__ == "__main__":
    main()
