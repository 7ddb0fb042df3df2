"""What this machine has for a run: CPU cores and available RAM, each GPU's free memory, free disk where files go.

`probe` is the one place that asks the system (tests replace it to simulate a small machine). RAM is Linux's
`MemAvailable` (what can be allocated without swapping), falling back to physical pages where /proc is absent;
GPU memory is `torch.cuda.mem_get_info` of every visible device; disk space is `shutil.disk_usage` of the
nearest existing folder.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Hardware:
    """Cores, available CPU memory and the free memory of each GPU, in bytes."""

    cores: int
    ram_available: int
    gpus_free: tuple[int, ...] = ()
    gpu_names: tuple[str, ...] = field(default=(), compare=False)

    @property
    def gpu_free(self) -> int:
        return sum(self.gpus_free)

    def describe(self) -> str:
        gpus = (f"{len(self.gpus_free)} GPU ({', '.join(self.gpu_names)}), {self.gpu_free / 1e9:.1f} GB free"
                if self.gpus_free else "no GPU")
        return f"{self.cores} CPU cores, {self.ram_available / 1e9:.1f} GB RAM available; {gpus}"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def ram_available() -> int:
    """Bytes of CPU memory a new allocation can use without swapping."""
    found = _meminfo_available()
    if found is not None:
        return found
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def gpus() -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Free bytes and names of the visible CUDA devices (none without CUDA)."""
    if not torch.cuda.is_available():
        return (), ()
    count = torch.cuda.device_count()
    free = tuple(int(torch.cuda.mem_get_info(i)[0]) for i in range(count))
    return free, tuple(torch.cuda.get_device_name(i) for i in range(count))


def probe() -> Hardware:
    """This machine, now."""
    free, names = gpus()
    return Hardware(os.cpu_count() or 1, ram_available(), free, names)


def existing(path: Path) -> Path:
    """`path` or its nearest existing parent folder (where a new file under `path` would land)."""
    path = Path(path).expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem that would hold `path`."""
    return int(shutil.disk_usage(existing(path)).free)


def same_disk(a: Path, b: Path) -> bool:
    """Whether two paths (existing or not) are on one filesystem."""
    return existing(a).stat().st_dev == existing(b).stat().st_dev
