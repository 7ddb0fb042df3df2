"""Prompt sets: the `Prompt` record, the `--prompts` sources and a short human summary of a set.

A prompt set is a list of `Prompt` records (id, kind, split, lang, category, instruction). This module owns
the record type and reads every `--prompts` source into it:

- `builtin`: the shipped 14-language sets in `abliterate/data/prompts/{lang}.jsonl` with fixed splits
  (train 128, val 32, test 100 per kind);
- a local `.jsonl`/`.json`/`.csv`/`.txt` file or a folder of them;
- `hf:ORG/NAME?option=value&...`: a dataset read with the `datasets` library (or `hf:` + a local folder);
- `polyrefuse[?lang=...]`: the PolyRefuse files, downloaded and verified by `abliterate/polyrefuse.py`.

It also owns `describe()`, the text behind `abliterate prompts`. Schemas, options and examples: docs/data.md.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import parse_qsl

from abliterate.errors import DataError, UsageError
from abliterate.languages import LANGUAGES, check_language, parse_languages

log = logging.getLogger(__name__)

Kind = Literal["harmful", "harmless"]
Split = Literal["train", "val", "test"]
KINDS: tuple[Kind, ...] = ("harmful", "harmless")
SPLITS: tuple[Split, ...] = ("train", "val", "test")
SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
SOURCE_HINT = "use builtin, polyrefuse, hf:ORG/NAME or the path of a prompt file or folder; see docs/data.md"


@dataclass(frozen=True)
class Prompt:
    """One instruction with its labels."""

    id: str
    kind: Kind
    split: Split
    lang: str
    instruction: str
    category: str = ""


@dataclass(frozen=True)
class PromptSet:
    """Prompts of one source, filterable by language, kind and split."""

    source: str
    prompts: tuple[Prompt, ...]

    def select(self, lang: str, kind: Kind, split: Split) -> list[Prompt]:
        return [p for p in self.prompts if p.lang == lang and p.kind == kind and p.split == split]

    def languages(self) -> list[str]:
        return sorted({p.lang for p in self.prompts})

    def instructions(self, lang: str, kind: Kind, split: Split, limit: int | None = None) -> list[str]:
        """Instructions for one (lang, kind, split); fails if there are none."""
        chosen = self.select(lang, kind, split)
        if not chosen:
            raise DataError(
                f"prompt source {self.source!r} has no {kind} prompts for language {lang!r}, split {split!r}",
                hint=f"languages it has: {', '.join(self.languages()) or 'none'}",
            )
        return [p.instruction for p in chosen[:limit]]


# --- records -------------------------------------------------------------------------------------------


def _label(value: object) -> str:
    """A kind/split/lang label as written by a person or a spreadsheet: trimmed, lower case."""
    return "" if value is None else str(value).strip().lower()


def _language(code: str, where: str) -> str:
    """`check_language` for codes inside prompt data: a DataError that says where the code was."""
    try:
        return check_language(code)
    except UsageError as err:
        raise DataError(f"{where}: {err}", hint=err.hint) from None


def language_list(spec: str, where: str) -> list[str]:
    """Parse `all` or a comma-separated list of language codes in a prompt source; DataError if unknown."""
    try:
        langs = parse_languages(spec.lower())
    except UsageError as err:
        raise DataError(f"{where}: {err}", hint=err.hint) from None
    if not langs:
        raise DataError(f"{where}: no language given", hint=f"use all or some of: {' '.join(LANGUAGES)}")
    return langs


def _record(raw: Mapping[str, object], where: str, default_lang: str, default_split: Split | None) -> Prompt:
    instruction = raw.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: missing or empty 'instruction'",
                        hint="every record needs an instruction text")
    kind = _label(raw.get("kind"))
    if kind not in KINDS:
        raise DataError(f"{where}: 'kind' must be harmful or harmless, got {raw.get('kind')!r}",
                        hint="set kind to harmful or harmless")
    split = _label(raw.get("split")) or default_split
    if split not in SPLITS:
        raise DataError(f"{where}: 'split' must be train, val or test, got {raw.get('split')!r}",
                        hint="set split to train, val or test")
    lang = _language(_label(raw.get("lang")) or default_lang, where)
    given_id = raw.get("id")
    category = raw.get("category")
    return Prompt(
        id=str(given_id).strip() if given_id is not None and str(given_id).strip() else where,
        kind=cast(Kind, kind),
        split=cast(Split, split),
        lang=lang,
        instruction=instruction.strip(),
        category="" if category is None else str(category).strip(),
    )


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
                prompts.append(_record(_json_object(line, where), where, lang, None))
    return PromptSet("builtin", tuple(prompts))


# --- local files ---------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: spreadsheet programs often start UTF-8 CSV files with a byte-order mark.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})",
                        hint="save the file as UTF-8") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}", hint="check the path") from None


def _json_value(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = f"column {err.colno}" if "\n" not in text else f"line {err.lineno}, column {err.colno}"
        raise DataError(f"{where}: invalid JSON ({err.msg} at {at})",
                        hint="fix the file; see docs/data.md") from None


def _json_object(text: str, where: str) -> dict[str, object]:
    value = _json_value(text, where)
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object", hint="see docs/data.md for the schema")
    return value


def _txt_labels(path: Path) -> tuple[Kind, Split | None]:
    """Kind (and optionally split) of a .txt file come from its name: harmful_train.txt, harmless-val.txt."""
    words = re.split(r"[^a-z]+", path.stem.lower())
    kind = next((k for k in KINDS if k in words), None)
    if kind is None:
        raise DataError(f"{path.name}: cannot tell whether its prompts are harmful or harmless",
                        hint="name the file harmful*.txt or harmless*.txt, e.g. harmful_train.txt")
    return kind, next((s for s in SPLITS if s in words), None)


def _rows_from_file(path: Path) -> Iterable[tuple[str, Mapping[str, object]]]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"unsupported prompt file type {path.name}", hint="use .jsonl, .json, .csv or .txt")
    text = _read_text(path)
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield f"{path.name}:{n}", _json_object(line, f"{path.name}:{n}")
    elif suffix == ".json":
        if not text.strip():
            return
        data = _json_value(text, path.name)
        if not isinstance(data, list):
            raise DataError(f"{path.name}: expected a JSON list of records",
                            hint="see docs/data.md for the schema")
        for n, item in enumerate(data):
            if not isinstance(item, dict):
                raise DataError(f"{path.name}[{n}]: expected an object",
                                hint="see docs/data.md for the schema")
            yield f"{path.name}[{n}]", item
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            if reader.fieldnames is None:
                return
            if "instruction" not in reader.fieldnames:
                columns = ", ".join(reader.fieldnames)
                raise DataError(f"{path.name}: no 'instruction' column (columns: {columns})",
                                hint="the header row needs instruction and kind columns; see docs/data.md")
            for row in reader:
                yield f"{path.name}:{reader.line_num}", row
        except csv.Error as err:
            raise DataError(f"{path.name}:{reader.line_num}: malformed CSV ({err})",
                            hint="fix the file") from None
    else:
        kind, split = _txt_labels(path)
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield f"{path.name}:{n}", {"instruction": line, "kind": kind, "split": split}


def from_path(path: Path, default_lang: str = "en") -> PromptSet:
    """Read a local prompt file, or every prompt file in a folder (records without a split are train)."""
    path = Path(path).expanduser()
    default_lang = _language(default_lang, "default language")
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
        if not files:
            raise DataError(f"no prompt files in folder {path}",
                            hint="add .jsonl, .json, .csv or .txt files; see docs/data.md")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"prompt file {path} not found", hint="check the path")
    prompts: list[Prompt] = []
    for file in files:
        found = [_record(raw, where, default_lang, "train") for where, raw in _rows_from_file(file)]
        if not found:
            raise DataError(f"{file} is empty (no prompts)",
                            hint="add records; see docs/data.md for the schema")
        prompts.extend(found)
    return PromptSet(str(path), tuple(prompts))


# --- source strings ------------------------------------------------------------------------------------


def parse_options(source: str, allowed: Iterable[str]) -> tuple[str, dict[str, str]]:
    """Split `NAME?key=value&key=value` into NAME and its options; unknown or repeated keys fail."""
    name, _, query = source.partition("?")
    allowed = sorted(allowed)
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise DataError(f"cannot read the options in {source!r}",
                        hint="write them as NAME?key=value&key=value") from None
    options: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            raise DataError(f"unknown option {key!r} in prompt source {source!r}",
                            hint=f"options: {', '.join(allowed)}")
        if key in options:
            raise DataError(f"option {key!r} given twice in {source!r}", hint="give each option once")
        options[key] = value.strip()
    return name.strip(), options


# --- hf: datasets --------------------------------------------------------------------------------------

HF_OPTIONS = (
    "config", "revision", "split", "as_split", "column", "kind", "kind_column", "lang", "lang_column",
    "category_column", "id_column",
)
# Tried in this order when `column=` is not given.
HF_TEXT_COLUMNS = ("instruction", "prompt", "goal", "question", "text")
# Values of a `kind_column`, after str(value).strip().lower().
HF_KIND_VALUES: dict[str, Kind] = {
    "harmful": "harmful", "unsafe": "harmful", "1": "harmful", "true": "harmful",
    "harmless": "harmless", "safe": "harmless", "benign": "harmless", "0": "harmless", "false": "harmless",
}
# Dataset split names that map to an abliterate split without `as_split=`.
HF_SPLIT_NAMES: dict[str, Split] = {
    "train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test",
}
_HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]


def _load_hf_dataset(
    name: str, config: str | None, splits: list[str], revision: str | None
) -> dict[str, Any]:
    """{split name: datasets.Dataset} for a Hub dataset or a local folder: the boundary to `datasets`."""
    try:
        import datasets
    except ImportError:
        raise DataError("the hf: prompt source needs the 'datasets' package",
                        hint="pip install datasets") from None
    local = Path(name).expanduser()
    if not local.exists() and not _HF_NAME.match(name):
        raise DataError(f"hf:{name} is neither a local folder nor a dataset name like ORG/NAME",
                        hint="write hf:ORG/NAME?kind=harmful, or the path of a local dataset folder")
    path = str(local) if local.exists() else name
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        if splits:
            return {s: datasets.load_dataset(path, config, split=s, revision=revision) for s in splits}
        return dict(datasets.load_dataset(path, config, revision=revision))
    except FileNotFoundError as err:  # includes datasets' DatasetNotFoundError
        raise DataError(f"dataset {name!r} not found ({_first_line(err)})",
                        hint="check the name; for a gated or private dataset log in with `hf auth login`"
                        ) from err
    except (ConnectionError, TimeoutError) as err:
        raise DataError(f"cannot reach the Hugging Face Hub to load {name!r} ({_first_line(err)})",
                        hint="check the network; a dataset loaded before works offline with HF_HUB_OFFLINE=1"
                        ) from err
    except Exception as err:  # unknown split/config, malformed files: whatever `datasets` raises, one line
        raise DataError(f"cannot load dataset {name!r}: {_first_line(err)}",
                        hint="check config= and split= in the source; see docs/data.md") from err
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()


def _hf_column(wanted: str | None, option: str, columns: list[str], where: str) -> str | None:
    if wanted is None:
        return None
    if wanted not in columns:
        raise DataError(f"{where}: no column {wanted!r} for {option}= (columns: {', '.join(columns)})",
                        hint=f"set {option}= to one of the columns")
    return wanted


def _hf_kind(value: object, feature: Any, column: str, where: str) -> Kind:
    if isinstance(value, int) and not isinstance(value, bool) and hasattr(feature, "int2str"):
        value = feature.int2str(value)  # a ClassLabel: use its names, not the 0/1 convention
    kind = HF_KIND_VALUES.get(_label(value))
    if kind is None:
        raise DataError(f"{where}: cannot read a kind from {column}={value!r}",
                        hint="kind_column values must be harmful/harmless, unsafe/safe, 1/0 or true/false; "
                             "or give kind=harmful|harmless")
    return kind


def from_hf(source: str, default_lang: str = "en") -> PromptSet:
    """Read `hf:NAME?options` (NAME: a Hub dataset id or a local folder) into a PromptSet."""
    name, opts = parse_options(source.removeprefix("hf:"), HF_OPTIONS)
    if not name:
        raise DataError(f"{source!r} names no dataset", hint="write hf:ORG/NAME?kind=harmful&column=prompt")
    fixed_kind = _label(opts.get("kind")) or None
    if fixed_kind is not None and fixed_kind not in KINDS:
        raise DataError(f"{source}: kind must be harmful or harmless, got {opts['kind']!r}",
                        hint="write kind=harmful or kind=harmless")
    if fixed_kind is not None and opts.get("kind_column"):
        raise DataError(f"{source}: give kind= or kind_column=, not both", hint="drop one of them")
    as_split = _label(opts.get("as_split")) or None
    if as_split is not None and as_split not in SPLITS:
        raise DataError(f"{source}: as_split must be train, val or test, got {opts['as_split']!r}",
                        hint="write as_split=train, as_split=val or as_split=test")
    lang = _language(_label(opts.get("lang")) or default_lang, source)
    splits = [s.strip() for s in opts.get("split", "").split(",") if s.strip()]
    tables = _load_hf_dataset(name, opts.get("config") or None, splits, opts.get("revision") or None)

    prompts: list[Prompt] = []
    for split_name, table in tables.items():
        where = f"hf:{name}[{split_name}]"
        columns = list(table.column_names)
        column = _hf_column(opts.get("column"), "column", columns, where) or next(
            (c for c in HF_TEXT_COLUMNS if c in columns), None)
        if column is None:
            raise DataError(f"{where}: no instruction column (columns: {', '.join(columns)})",
                            hint="name the text column with column=")
        kind_column = _hf_column(opts.get("kind_column"), "kind_column", columns, where) or (
            "kind" if fixed_kind is None and "kind" in columns else None)
        if fixed_kind is None and kind_column is None:
            raise DataError(f"{where}: the prompts' kind is not given",
                            hint="add kind=harmful|harmless, or kind_column=COLUMN")
        lang_column = _hf_column(opts.get("lang_column"), "lang_column", columns, where)
        category_column = _hf_column(opts.get("category_column"), "category_column", columns, where) or (
            "category" if "category" in columns else None)
        id_column = _hf_column(opts.get("id_column"), "id_column", columns, where)
        split = as_split or HF_SPLIT_NAMES.get(split_name.lower())
        if split is None:
            raise DataError(f"{where}: dataset split {split_name!r} is not train, validation or test",
                            hint="add as_split=train|val|test (and split= to read only some dataset splits)")
        wanted = [c for c in (column, kind_column, lang_column, category_column, id_column) if c is not None]
        rows = table.select_columns(list(dict.fromkeys(wanted))).to_list()
        for n, row in enumerate(rows):
            at = f"{where}[{n}]"
            raw = {
                "instruction": row[column],
                "kind": fixed_kind if kind_column is None else _hf_kind(
                    row[kind_column], table.features[kind_column], kind_column, at),
                "split": split,
                "lang": row[lang_column] if lang_column else lang,
                "category": row[category_column] if category_column else None,
                "id": row[id_column] if id_column else f"{split_name}-{n}",
            }
            prompts.append(_record(raw, at, lang, cast(Split, split)))
    if not prompts:
        raise DataError(f"dataset {name!r} has no rows", hint="check split= and config=")
    return PromptSet(source, tuple(prompts))


# --- dispatch and summary ------------------------------------------------------------------------------


def load(source: str, default_lang: str = "en") -> PromptSet:
    """Resolve a `--prompts` value: builtin, polyrefuse[?options], hf:NAME[?options], or a file/folder."""
    source = source.strip()
    if source == "builtin":
        return builtin()
    if source.startswith("hf:"):
        return from_hf(source, default_lang)
    if source == "polyrefuse" or source.startswith("polyrefuse?"):
        from abliterate.polyrefuse import load as load_polyrefuse

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
