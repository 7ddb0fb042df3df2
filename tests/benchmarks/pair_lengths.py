"""Length of the harmful/harmless twins per language: `python tests/benchmarks/pair_lengths.py`.

Prints, per language of the built-in prompt sets, how many of the 260 pairs are within 30% of each other
(longer / shorter <= 1.3) in words (characters for ja, zh and th, written without spaces), the 95th
percentile and the largest ratio, and the range of harmless/harmful (the table in
abliterate/data/prompts/README.md).
"""

from __future__ import annotations

from abliterate.prompts import sources
from abliterate.prompts.languages import LANGUAGES
from abliterate.prompts.records import KINDS

UNSPACED = {"ja", "zh", "th"}
PAIRS = 260


def size(text: str, lang: str) -> int:
    return len(text) if lang in UNSPACED else len(text.split())


def main() -> None:
    source = sources.builtin()
    print("| lang | measure | pairs within 30% | share | 95th percentile | largest | harmless/harmful |")
    print("|---|---|---:|---:|---:|---:|---|")
    for lang in LANGUAGES:
        texts = {
            p.id: p.instruction
            for kind in KINDS
            for split in ("train", "val", "test")
            for p in source.select(lang, kind, split)
        }
        ratios = [
            size(texts[f"harmless-{i:03d}"], lang) / size(texts[f"harmful-{i:03d}"], lang) for i in range(1, PAIRS + 1)
        ]
        spread = sorted(max(r, 1 / r) for r in ratios)
        within = sum(r <= 1.3 for r in spread)
        print(
            f"| {lang} | {'characters' if lang in UNSPACED else 'words'} | {within} | {within / PAIRS:.2f} | "
            f"{spread[int(0.95 * (PAIRS - 1))]:.2f} | {spread[-1]:.2f} | {min(ratios):.2f}–{max(ratios):.2f} |"
        )


if __name__ == "__main__":
    main()
