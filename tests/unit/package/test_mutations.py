"""The mutation list (tests/mutations.py) still matches the code: every planted bug's snippet occurs exactly once.

The mutations themselves run on a copy with `python tests/mutations.py` (minutes; docs/testing.md); this fast
check keeps the list from going stale as the code changes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mutations import MUTATIONS, ROOT, Mutation


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_mutation_applies_exactly_once(mutation: Mutation) -> None:
    text = (ROOT / mutation.path).read_text(encoding="utf-8")
    assert text.count(mutation.old) == 1, f"update tests/mutations.py: {mutation.name!r} no longer fits {mutation.path}"
    assert mutation.new != mutation.old
    for stage in mutation.tests:
        for test in (arg for arg in stage.split() if not arg.startswith("-")):
            assert (ROOT / test.split("::")[0]).is_file(), test


def test_mutation_names_are_unique() -> None:
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    assert Path(__file__).parents[2] == ROOT / "tests"
