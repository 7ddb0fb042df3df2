"""The one write path of an edited model: `edit`, `apply` and `optimize --pick` all end here.

`write_edited` opens the source checkpoint, writes the edit in the chosen format into the temporary folder of
`storage.atomic.atomic_output`, lets the caller add its own files (`edit` adds candidates.json and its
evaluation report, `optimize --pick` its optimize.json), then records provenance.json and the model card,
hashing the output's files as they are written (the source's sha256 comes from the hash cache where it
holds); the folder appears at `out` only when all of it is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from abliterate.direction.run_record import RunRecord
from abliterate.direction.vector import Direction
from abliterate.edit.formats import OutputOptions, Written, sources_of, write_edit
from abliterate.model.checkpoint import Checkpoint, read_config
from abliterate.model.loading import ModelSource
from abliterate.publish.provenance import record_output
from abliterate.storage.atomic import atomic_output
from abliterate.storage.hashing import FileHasher, HashCache

ExtraFiles = Callable[[Path], None]  # writes the caller's own files into the temporary output folder


def write_edited(
    out: Path,
    source: ModelSource | Path,
    direction: Direction,
    options: OutputOptions | None = None,
    *,
    run: RunRecord | None = None,
    extra: ExtraFiles | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Written:
    """Write `direction`'s edit of `source` to `out` atomically, with provenance and the model card.

    `source` is how the user named the model (a plain folder stands for itself); `run` records the prompts,
    selection and settings behind the direction (None for a saved direction); `extra` adds files to the
    output before provenance hashes it.
    """
    if isinstance(source, Path):
        source = ModelSource(str(source), source)
    options = options or OutputOptions()
    config = read_config(source.folder)
    checkpoint = Checkpoint.open(source.folder, allow_pickle=allow_pickle)
    hasher = FileHasher(algorithm=options.output_hash, cache=HashCache())
    with atomic_output(out, overwrite=overwrite, sources=sources_of(source)) as tmp, hasher:
        written = write_edit(options, source, checkpoint, config, direction, tmp, hasher)
        if extra is not None:
            extra(tmp)
        record_output(tmp, source, checkpoint, written.plan, direction, run=run, hasher=hasher,
                      output_format=written.record)
    return written
