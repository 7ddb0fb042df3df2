"""results.json, the record of one model's evaluation: its blocks, per-language rates, summary and schema.

`abliterate eval` writes it (evaluation/evaluate.py), `report` and `edit` read it back (schema 1 files are
upgraded on reading); docs/evaluation.md describes the fields.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from abliterate.errors import DataError
from abliterate.prompts.records import KINDS

SCHEMA_VERSION = 2
"""2: per-answer refused/evasive/harmful/why and per-block evasions and harmful answers (1: a refusal bool)."""
READABLE_SCHEMAS = (1, 2)


def _share(count: int | None, n: int) -> float | None:
    return count / n if n and count is not None else None


def block_counts(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """n, refusals, evasions, harmful answers (None when no record was judged for harm) and their rates."""
    n = len(records)
    refusals = sum(bool(r["refused"]) for r in records)
    evasions = sum(bool(r["evasive"]) for r in records)
    judged = [r["harmful"] for r in records if r.get("harmful") is not None]
    harmful = sum(bool(h) for h in judged) if judged else None
    return {
        "n": n, "refusals": refusals, "refusal_rate": _share(refusals, n), "evasions": evasions,
        "evasion_rate": _share(evasions, n), "harmful_answers": harmful, "harmful_rate": _share(harmful, n),
    }


def language_entry(harmful: dict[str, Any], harmless: dict[str, Any]) -> dict[str, Any]:
    """One language's results: the headline rates, then the two blocks."""
    n = harmful["n"]
    answered = n - harmful["refusals"] - harmful["evasions"]
    return {
        "compliance": answered / n if n else None,
        "over_refusal": harmless["refusal_rate"],
        "evasion": harmful["evasion_rate"],
        "harmless_evasion": harmless["evasion_rate"],
        "attack_success": harmful["harmful_rate"],
        "harmful": harmful,
        "harmless": harmless,
    }


RATES = ("compliance", "over_refusal", "evasion", "harmless_evasion", "attack_success")
"""The per-language rates that the summary averages (attack_success only with a harm-judging model)."""


def _mean_of(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def summarize(languages: dict[str, Any]) -> dict[str, Any]:
    """Means over languages (each language weighs the same); a rate no language has is None."""
    return {
        "languages": len(languages),
        **{rate: _mean_of([v.get(rate) for v in languages.values()]) for rate in RATES},
        "harmful_prompts": sum(v["harmful"]["n"] for v in languages.values()),
        "harmless_prompts": sum(v["harmless"]["n"] for v in languages.values()),
    }


def upgrade_results(data: dict[str, Any]) -> dict[str, Any]:
    """A schema 1 results dict in schema 2 form (records: refusal -> refused, not evasive, harm unknown)."""
    if data.get("schema_version") != 1:
        return data
    languages = {}
    for lang, entry in data["languages"].items():
        blocks = {}
        for kind in KINDS:
            records = [
                {**{k: v for k, v in r.items() if k != "refusal"}, "refused": bool(r.get("refusal")),
                 "evasive": False, "harmful": None, "why": None}
                for r in entry[kind]["records"]
            ]
            blocks[kind] = {**block_counts(records), "records": records}
        languages[lang] = language_entry(blocks["harmful"], blocks["harmless"])
    return {**data, "schema_version": SCHEMA_VERSION, "languages": languages, "summary": {
        **data.get("summary", {}), **summarize(languages)}}


def write_results(path: Path, results: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_results(path: Path) -> dict[str, Any]:
    """A results.json written by `abliterate eval` (schema_version 2, or 1 upgraded); DataError otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"results file {path} not found", hint="write one with `abliterate eval --out`") from None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read results file {path}: {err}", hint="point at a results.json") from None
    if (
        not isinstance(data, dict)
        or data.get("schema_version") not in READABLE_SCHEMAS
        or not isinstance(data.get("languages"), dict)
        or not {"model", "summary"} <= set(data)
    ):
        raise DataError(
            f"{path} is not an abliterate results file of schema_version {SCHEMA_VERSION}",
            hint="write it with `abliterate eval --out results.json`",
        )
    return upgrade_results(data)
