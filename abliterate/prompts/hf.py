"""Prompt sets from `hf:ORG/NAME?option=value&...`: a dataset read with `datasets` (or `hf:` + a local folder)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

from abliterate.errors import DataError
from abliterate.prompts.records import (
    KINDS,
    SPLITS,
    Kind,
    Prompt,
    PromptSet,
    Split,
    clean_label,
    data_language,
    parse_options,
    parse_record,
)

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
    kind = HF_KIND_VALUES.get(clean_label(value))
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
    fixed_kind = clean_label(opts.get("kind")) or None
    if fixed_kind is not None and fixed_kind not in KINDS:
        raise DataError(f"{source}: kind must be harmful or harmless, got {opts['kind']!r}",
                        hint="write kind=harmful or kind=harmless")
    if fixed_kind is not None and opts.get("kind_column"):
        raise DataError(f"{source}: give kind= or kind_column=, not both", hint="drop one of them")
    as_split = clean_label(opts.get("as_split")) or None
    if as_split is not None and as_split not in SPLITS:
        raise DataError(f"{source}: as_split must be train, val or test, got {opts['as_split']!r}",
                        hint="write as_split=train, as_split=val or as_split=test")
    lang = data_language(clean_label(opts.get("lang")) or default_lang, source)
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
            prompts.append(parse_record(raw, at, lang, cast(Split, split)))
    if not prompts:
        raise DataError(f"dataset {name!r} has no rows", hint="check split= and config=")
    return PromptSet(source, tuple(prompts))


