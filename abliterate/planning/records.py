"""The plan of a run (`--plan`): what it will do (per stage), what it needs (memory, disk) and how long it takes.

`RunPlan` is a pydantic record, like every record of the package; `--plan` prints its `lines()` and writes
nothing. Bytes are bytes, times are seconds (None where nothing was calibrated).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StagePlan(BaseModel):
    """One stage of the run: forward passes and the prompt rows they carry, generations, estimated seconds."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    passes: int = 0
    rows: int = 0
    generations: int = Field(0, description="prompts answered greedily")
    new_tokens: int = Field(0, description="at most this many generated tokens (generations x the length cap)")
    seconds: float | None = None
    note: str = ""


class MemoryPlan(BaseModel):
    """Peak memory of the run's largest stage, on the CPU and on the GPU(s), and how it is made up."""

    model_config = ConfigDict(extra="forbid")

    device: str  # cpu or cuda, resolved
    dtype: str  # the forward passes' dtype, resolved
    quantize: str
    weights: int  # the loaded model's weights in that dtype/quantization
    activations: int  # the largest forward pass or generation batch (activations, KV cache, logits)
    cpu_peak: int
    gpu_peak: int
    cpu_available: int
    gpu_available: int
    peak_stage: str


class DiskPlan(BaseModel):
    """Bytes one run writes to one place, and what that place has free."""

    model_config = ConfigDict(extra="forbid")

    what: str
    path: str
    bytes: int
    free: int


class RunPlan(BaseModel):
    """What a run will do and need, printed by `--plan` before anything runs."""

    model_config = ConfigDict(extra="forbid")

    command: str
    model: str
    model_info: str
    hardware: str
    batch_size: int | None = None
    stages: list[StagePlan] = Field(default_factory=list)
    memory: MemoryPlan | None = None
    disk: list[DiskPlan] = Field(default_factory=list)
    calibration: dict[str, float] = Field(default_factory=dict, description="measured seconds the times come from")
    notes: list[str] = Field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        times = [s.seconds for s in self.stages]
        return None if any(t is None for t in times) else sum(t for t in times if t is not None)

    def lines(self) -> list[str]:
        """The plan as the CLI prints it."""
        head = [f"plan: abliterate {self.command} {self.model}", f"  model: {self.model_info}",
                f"  hardware: {self.hardware}"]
        if self.batch_size is not None:
            head.append(f"  batch size: {self.batch_size}")
        return head + _stage_lines(self.stages, self.seconds) + _memory_lines(self.memory) + _disk_lines(self.disk) \
            + [f"  calibration: {', '.join(f'{k} {v:.3g} s' for k, v in self.calibration.items())}"] * bool(
                self.calibration) + [f"  note: {note}" for note in self.notes]


def gb(value: int) -> str:
    return f"{value / 1e9:.2f} GB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _stage_lines(stages: list[StagePlan], total: float | None) -> list[str]:
    lines = [f"  {'stage':<22}{'passes':>8}{'rows':>8}{'answers':>9}{'tokens<=':>10}{'time':>10}"]
    for s in stages:
        lines.append(f"  {s.stage:<22}{s.passes:>8}{s.rows:>8}{s.generations:>9}{s.new_tokens:>10}"
                     f"{_duration(s.seconds):>10}" + (f"  ({s.note})" if s.note else ""))
    passes, rows = sum(s.passes for s in stages), sum(s.rows for s in stages)
    gens, tokens = sum(s.generations for s in stages), sum(s.new_tokens for s in stages)
    lines.append(f"  {'total':<22}{passes:>8}{rows:>8}{gens:>9}{tokens:>10}{_duration(total):>10}")
    return lines


def _memory_lines(memory: MemoryPlan | None) -> list[str]:
    if memory is None:
        return []
    where = f"{memory.device}, {memory.dtype}" + (f", {memory.quantize}" if memory.quantize != "none" else "")
    lines = [f"  memory ({where}): weights {gb(memory.weights)}, largest batch {gb(memory.activations)} "
             f"({memory.peak_stage})",
             f"    CPU peak {gb(memory.cpu_peak)} of {gb(memory.cpu_available)} available"]
    if memory.device != "cpu":
        lines.append(f"    GPU peak {gb(memory.gpu_peak)} of {gb(memory.gpu_available)} free")
    return lines


def _disk_lines(disk: list[DiskPlan]) -> list[str]:
    return [f"  disk: {d.what} {gb(d.bytes)} at {d.path} ({gb(d.free)} free)" for d in disk]
