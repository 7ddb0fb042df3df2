"""How refusals begin, per language: the shipped marker phrases and the first tokens of refusal openings.

The marker file (abliterate/data/judge/markers.json) serves two stages. The marker judge
(evaluation/judge.py) matches its phrases in answers; the direction search scores a candidate by the
probability of a refusal's first token (`refusal_token_ids`, as in Arditi et al. 2024). Both read it here, so
that the direction search does not depend on the evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from abliterate.errors import DataError, UsageError
from abliterate.prompts.languages import LANGUAGES, check_language

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def markers_file() -> Path:
    """The shipped marker file: refusal phrases, openings, exceptions and short forms per language."""
    return Path(str(resources.files("abliterate") / "data" / "judge" / "markers.json"))


@lru_cache(maxsize=4)
def load_markers(path: Path) -> dict[str, dict[str, list[str]]]:
    """{lang: {"refusal", "redirect", "openings", "exceptions", "short": [phrases]}} from a marker file (cached)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"can't read judge markers {path}: {exc}", hint="reinstall abliterate") from exc
    data: dict[str, dict[str, list[str]]] = {}
    for lang in LANGUAGES:
        entry = raw.get(lang)
        if not isinstance(entry, dict) or not isinstance(entry.get("refusal"), list):
            raise DataError(f"judge markers {path} lack language {lang!r}", hint="reinstall abliterate")
        data[lang] = {
            key: [str(p) for p in entry.get(key, [])]
            for key in ("refusal", "redirect", "openings", "exceptions", "short")
        }
    return data


def refusal_openings(lang: str) -> list[str]:
    """The phrases that refusals in `lang` typically start with ("I'm sorry", "As an AI", ...)."""
    return list(load_markers(markers_file())[check_language(lang)]["openings"])


def refusal_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    lang: str,
    *,
    phrases: Sequence[str] | None = None,
    include_english: bool = False,
) -> list[int]:
    """The distinct first token ids of the refusal openings, as a model would start its answer.

    Each phrase is encoded without special tokens and its first token taken (a leading token that
    decodes to whitespace only, as some SentencePiece tokenizers emit, is skipped). For en this gives
    the ids of "I" and "As" among others, as in Arditi et al. 2024. `phrases` replaces the built-in
    openings; `include_english` adds the English ones (models often refuse in English).
    """
    check_language(lang)
    chosen = list(phrases) if phrases is not None else refusal_openings(lang)
    if include_english and phrases is None and lang != "en":
        chosen += refusal_openings("en")
    ids: list[int] = []
    for phrase in chosen:
        encoded = list(tokenizer.encode(phrase, add_special_tokens=False))
        while len(encoded) > 1 and not _decoded(tokenizer, encoded[0]).strip():
            encoded = encoded[1:]
        if encoded and int(encoded[0]) not in ids:
            ids.append(int(encoded[0]))
    if not ids:
        raise UsageError(
            f"no refusal token ids for {lang!r}: the tokenizer encoded every opening phrase to nothing",
            hint="pass phrases=... that the tokenizer can encode",
        )
    return ids


def _decoded(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    text = tokenizer.decode([token_id])
    return text if isinstance(text, str) else "".join(text)
