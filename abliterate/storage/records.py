"""The base of every JSON record the package writes, and how a record file is read back and validated.

A record is a pydantic model (candidates.json in direction/records.py, results.json in evaluation/results.py,
report.json in evaluation/report_record.py, crosslingual.json in evaluation/crosslingual_record.py,
provenance.json in publish/provenance_record.py); its nested objects are `Part`s. It is written with
`storage.atomic.write_json`, which dumps the fields it was given in the model's field order, so that a record
read and written again keeps its bytes.
Read back, a file that is not JSON or does not fit the model fails in one line: a typed error with a hint.
docs/records.md holds the JSON Schema of each (tests/records_doc.py writes it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from abliterate.errors import AbliterateError
from abliterate.storage.atomic import write_json


class Part(BaseModel):
    """A part of a record (a nested object): keys this version does not know are kept too."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)


class Record(BaseModel):
    """A JSON record: keys this version does not know are kept (files of other versions still read)."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    def write(self, path: Path) -> Path:
        """Write the record to `path` as JSON, atomically."""
        return write_json(path, self)

    def to_data(self) -> dict[str, Any]:
        """The record as plain JSON data (the fields it was given, in field order), as `write` writes it."""
        return self.model_dump(mode="json", exclude_unset=True, by_alias=True)


R = TypeVar("R", bound=BaseModel)


def problem(err: ValidationError) -> str:
    """The first problem of a validation error in one line: `where: what` (and how many more there are)."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "the top level"
    more = err.error_count() - 1
    return f"{where}: {first['msg'].lower()}" + (f" (and {more} more)" if more else "")


def validate_record(
    model: type[R], data: object, path: Path, *, error: type[AbliterateError], what: str, hint: str
) -> R:
    """`data` read from `path` as a `model`; `error` naming the first problem when it does not fit."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise error(f"{path} is not a valid {what}: {problem(err)}", hint=hint) from None


def load_json(path: Path, *, error: type[AbliterateError], missing_hint: str, damaged_hint: str) -> object:
    """The JSON data of the file at `path`; `error` when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} not found", hint=missing_hint) from None
    except (OSError, ValueError) as err:
        raise error(f"cannot read {path}: {err}", hint=damaged_hint) from None
