"""The 14 PolyRefuse languages the built-in prompt sets and judges cover."""

from __future__ import annotations

from abliterate.errors import UsageError

LANGUAGES: dict[str, str] = {
    "ar": "Arabic",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "nl": "Dutch",
    "pl": "Polish",
    "ru": "Russian",
    "th": "Thai",
    "zh": "Chinese (Simplified)",
    "yo": "Yoruba",
}


def check_language(code: str) -> str:
    """Return `code` if it is one of the 14 languages, else raise a UsageError listing them."""
    if code not in LANGUAGES:
        raise UsageError(
            f"unknown language code {code!r}",
            hint=f"use one of: {' '.join(LANGUAGES)}",
        )
    return code


def parse_languages(spec: str) -> list[str]:
    """Parse `all` or a comma-separated list of language codes."""
    if spec.strip() == "all":
        return list(LANGUAGES)
    return [check_language(c.strip()) for c in spec.split(",") if c.strip()]
