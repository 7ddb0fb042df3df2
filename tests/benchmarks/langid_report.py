"""Language-identification report for prompt sets (a script, not a test).

For every language of a prompt source (default: the built-in sets) it prints how many lines the `lingua`
detector (lingua-language-detector, all of its 75 languages, models preloaded) assigns to that language,
and what the other lines were taken for.
tests/unit/prompts/test_data.py uses the same functions for its threshold check.

    python tests/benchmarks/langid_report.py                   # built-in sets, markdown table
    python tests/benchmarks/langid_report.py --misses          # also list every disagreeing line
    python tests/benchmarks/langid_report.py --only-14         # detector restricted to the 14 languages
    python tests/benchmarks/langid_report.py --prompts SOURCE  # any --prompts source, e.g. a folder

Detecting among all 75 languages is the honest setting: a line must beat close relatives that are not among
the 14 (Afrikaans for Dutch, Catalan for Spanish, Persian and Urdu for Arabic), not only the other 13.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from lingua import IsoCode639_1, Language, LanguageDetector, LanguageDetectorBuilder

from abliterate.prompts.languages import LANGUAGES
from abliterate.prompts.records import Prompt
from abliterate.prompts.sources import load


def lingua_language(code: str) -> Language:
    return Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper()))


def build_detector(only_14: bool = False) -> LanguageDetector:
    """lingua over all its languages (or only the 14), with every language model loaded up front."""
    if only_14:
        builder = LanguageDetectorBuilder.from_languages(*(lingua_language(c) for c in LANGUAGES))
    else:
        builder = LanguageDetectorBuilder.from_all_languages()
    return builder.with_preloaded_language_models().build()


@dataclass
class Agreement:
    """How many lines of one language lingua assigns to that language, and where the others went."""

    lang: str
    total: int = 0
    agree: int = 0
    detected_as: Counter[str] = field(default_factory=Counter)  # other ISO 639-1 code (or "none") -> lines
    misses: list[tuple[str, str, str]] = field(default_factory=list)  # (id, detected as, instruction)

    @property
    def rate(self) -> float:
        return self.agree / self.total if self.total else 0.0


def agreement(detector: LanguageDetector, prompts: Sequence[Prompt], lang: str) -> Agreement:
    """Detect every prompt's instruction and compare with `lang`."""
    result = Agreement(lang, total=len(prompts))
    detected = detector.detect_languages_in_parallel_of([p.instruction for p in prompts])
    for prompt, language in zip(prompts, detected, strict=True):
        code = language.iso_code_639_1.name.lower() if language is not None else "none"
        if code == lang:
            result.agree += 1
        else:
            result.detected_as[code] += 1
            result.misses.append((prompt.id, code, prompt.instruction))
    return result


def table(rows: Sequence[Agreement]) -> str:
    """A markdown table: one row per language."""
    lines = [
        "| lang | language | lines | detected as lang | agreement | detected otherwise |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        other = ", ".join(f"{code} {n}" for code, n in row.detected_as.most_common()) or "-"
        name = LANGUAGES.get(row.lang, row.lang)
        lines.append(f"| {row.lang} | {name} | {row.total} | {row.agree} | {row.rate:.4f} | {other} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="builtin", help="prompt source (default: builtin)")
    parser.add_argument("--only-14", action="store_true", help="detect among the 14 languages only")
    parser.add_argument("--misses", action="store_true", help="list the lines detected as another language")
    args = parser.parse_args(argv)

    source = load(args.prompts)
    started = time.perf_counter()
    detector = build_detector(args.only_14)
    built = time.perf_counter() - started
    rows = [agreement(detector, [p for p in source.prompts if p.lang == lang], lang) for lang in LANGUAGES
            if any(p.lang == lang for p in source.prompts)]
    print(table(rows))
    languages = "the 14 PolyRefuse languages" if args.only_14 else "all 75 lingua languages"
    print(f"\nsource: {args.prompts}; detector: lingua, {languages}, preloaded models "
          f"(built in {built:.1f} s, detection {time.perf_counter() - started - built:.1f} s)")
    missing = [lang for lang in LANGUAGES if lang not in {r.lang for r in rows}]
    if missing:
        print(f"no prompts for: {' '.join(missing)}")
    if args.misses:
        for row in rows:
            for prompt_id, code, text in row.misses:
                print(f"{row.lang} {prompt_id} -> {code}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
