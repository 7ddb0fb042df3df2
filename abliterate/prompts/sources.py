"""`--prompts` sources: resolve a source string to a prompt set, and a short human summary of a set.

A prompt set is a list of `Prompt` records (prompts/records.py). `load` reads every source:

- `builtin`: the shipped 14-language sets in `abliterate/data/prompts/{lang}.jsonl` with fixed splits
  (train 128, val 32, test 100 per kind);
- a local `.jsonl`/`.json`/`.csv`/`.txt` file or a folder of them;
- `hf:ORG/NAME?option=value&...`: a dataset read with the `datasets` library (or `hf:` + a local folder);
- `polyrefuse[?lang=...]`: the PolyRefuse files, downloaded and verified by `abliterate/prompts/polyrefuse.py`.

It also owns `describe()`, the text behind `abliterate prompts`. Schemas, options and examples: docs/data.md.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from abliterate.errors import DataError
from abliterate.prompts.files import from_path, json_object
from abliterate.prompts.hf import from_hf
from abliterate.prompts.languages import LANGUAGES
from abliterate.prompts.polyrefuse import load as load_polyrefuse
from abliterate.prompts.records import KINDS, SOURCE_HINT, SPLITS, Prompt, PromptSet, parse_record

# --- builtin -------------------------------------------------------------------------------------------


@cache
def builtin() -> PromptSet:
    """The shipped 14-language sets."""
    folder = resources.files("abliterate") / "data" / "prompts"
    prompts: list[Prompt] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".jsonl"):
            lang = entry.name.removesuffix(".jsonl")
            for n, line in enumerate(entry.read_text(encoding="utf-8").splitlines(), 1):
                where = f"{entry.name}:{n}"
                prompts.append(parse_record(json_object(line, where), where, lang, None))
    return PromptSet("builtin", tuple(prompts))


# --- dispatch and summary ------------------------------------------------------------------------------


def load(source: str, default_lang: str = "en") -> PromptSet:
    """Resolve a `--prompts` value: builtin, polyrefuse[?options], hf:NAME[?options], or a file/folder."""
    source = source.strip()
    if source == "builtin":
        return builtin()
    if source.startswith("hf:"):
        return from_hf(source, default_lang)
    if source == "polyrefuse" or source.startswith("polyrefuse?"):
        return load_polyrefuse(source, default_lang)
    path = Path(source).expanduser()
    if path.exists():
        return from_path(path, default_lang)
    raise DataError(f"prompt source {source!r} not found", hint=SOURCE_HINT)


def _shorten(text: str, width: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def describe(prompt_set: PromptSet, lang: str, n_samples: int = 3) -> str:
    """Counts per kind x split for one language, then up to `n_samples` sample lines per kind."""
    chosen = [p for p in prompt_set.prompts if p.lang == lang]
    if not chosen:
        raise DataError(f"prompt source {prompt_set.source!r} has no prompts in language {lang!r}",
                        hint=f"languages it has: {', '.join(prompt_set.languages()) or 'none'}")
    lines = [f"{prompt_set.source}: {len(chosen)} prompts in {LANGUAGES.get(lang, lang)} ({lang})", ""]
    lines.append(f"{'':<10}" + "".join(f"{s:>7}" for s in (*SPLITS, "total")))
    for kind in KINDS:
        counts = [sum(1 for p in chosen if p.kind == kind and p.split == s) for s in SPLITS]
        lines.append(f"{kind:<10}" + "".join(f"{c:>7}" for c in (*counts, sum(counts))))
    for kind in KINDS:
        pool = [p for p in chosen if p.kind == kind]
        count = min(max(n_samples, 0), len(pool))
        if not count:
            continue
        lines += ["", f"{kind} examples:"]
        for i in range(count):  # spread over the set, so that the samples come from several splits
            p = pool[i * len(pool) // count]
            labels = ", ".join(x for x in (p.split, p.category) if x)
            lines.append(f"  {p.id} [{labels}] {_shorten(p.instruction)}")
    return "\n".join(lines)
