"""Absolute paths of the local tasks' data files, for their YAML (`!function files.NAME` returns the value).

`datasets` resolves a relative `data_files` path against the current directory, not the YAML's folder, so
the YAML takes the path from here; this keeps `lm_eval --include_path` working from any directory.
"""

from pathlib import Path

mini_mc = str(Path(__file__).with_name("abliterate_mini_mc.jsonl"))
