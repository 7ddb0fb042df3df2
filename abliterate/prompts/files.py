"""Prompt sets from local files: `.jsonl`, `.json`, `.csv`, `.txt` or a folder of them (schemas: docs/data.md)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from abliterate.errors import DataError
from abliterate.prompts.records import (
    KINDS,
    SPLITS,
    SUFFIXES,
    Kind,
    Prompt,
    PromptSet,
    Split,
    data_language,
    parse_record,
)

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


def json_object(text: str, where: str) -> dict[str, object]:
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
                yield f"{path.name}:{n}", json_object(line, f"{path.name}:{n}")
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
    default_lang = data_language(default_lang, "default language")
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
        found = [parse_record(raw, where, default_lang, "train") for where, raw in _rows_from_file(file)]
        if not found:
            raise DataError(f"{file} is empty (no prompts)",
                            hint="add records; see docs/data.md for the schema")
        prompts.extend(found)
    return PromptSet(str(path), tuple(prompts))


