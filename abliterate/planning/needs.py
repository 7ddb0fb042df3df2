"""Peak memory and disk of one run, and the pre-flight check that refuses a run that will not fit.

The model as the plan sees it (`Subject`: config, checkpoint headers, tokenizer) and the batch shapes each stage
runs (`Batch`) go in; `MemoryPlan` and `DiskPlan` records come out (planning/memory.py does the arithmetic).
`check` raises `ResourceError` with the fix: `--quantize 4bit` or `--device cpu` when that would fit, `free N GB
at PATH` for disk, always naming `--no-preflight` for an estimate that is wrong.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from abliterate.errors import ResourceError
from abliterate.model.chat import encode, render, set_chat_template
from abliterate.model.checkpoint import Checkpoint, read_config
from abliterate.model.loading import ModelSource, load_tokenizer, resolve, resolve_dtype
from abliterate.planning.hardware import Hardware, disk_free, existing
from abliterate.planning.memory import (
    GPU_SLACK,
    PROCESS_BYTES,
    ModelShape,
    edit_peak,
    forward_bytes,
    generation_bytes,
    itemsize,
    output_bytes,
    side_bytes,
    weight_bytes,
)
from abliterate.planning.records import DiskPlan, MemoryPlan, gb
from abliterate.settings import Settings

RECORD_BYTES = 8 * 1024  # the model card and provenance.json's fixed part
RUN_RECORD_BYTES = 8 * 1024  # provenance.json's record of the search (settings, prompts) when `edit` wrote it
CANDIDATE_BYTES = 225  # one row of candidates.json
TENSOR_BYTES = 160  # one tensor's entry in its shard's header and in the index
OVERRIDE = "--no-preflight runs anyway"


@dataclass
class Subject:
    """The model a run uses, read without loading its weights: source folder, config, headers, tokenizer."""

    settings: Settings
    source: ModelSource
    config: dict[str, object]
    checkpoint: Checkpoint
    shape: ModelShape

    @classmethod
    def open(cls, settings: Settings) -> Subject:
        source = resolve(settings.model, revision=settings.revision, allow_pickle=settings.allow_pickle)
        config = read_config(source.folder)
        checkpoint = Checkpoint.open(source.folder, allow_pickle=settings.allow_pickle)
        return cls(settings, source, config, checkpoint, ModelShape.of(config))

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """Loaded when first needed (the commands that forward prompts; `apply` needs none)."""
        tokenizer = load_tokenizer(self.source, trust_remote_code=self.settings.trust_remote_code)
        set_chat_template(tokenizer, self.settings.chat_template, self.settings.model)
        return tokenizer

    def info(self) -> str:
        params = sum(_numel(info.shape) for info in self.checkpoint.tensors.values())
        return (f"{self.config.get('model_type')}, {self.shape.layers} layers, hidden {self.shape.hidden}, "
                f"{params / 1e6:.0f}M parameters; {gb(self.checkpoint.total_bytes())} on disk")

    def longest(self, texts: list[str]) -> int:
        """Tokens of the longest rendered prompt among `texts`."""
        return max((len(ids) for ids in encode(self.tokenizer, [render(self.tokenizer, t) for t in texts])),
                   default=1)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


@dataclass(frozen=True)
class Batch:
    """The largest batch a stage runs: rows x prompt tokens, plus the answer tokens of a generation."""

    stage: str
    rows: int
    prompt: int
    new_tokens: int = 0


def run_device(settings: Settings, hardware: Hardware) -> str:
    """Where the forward passes run: cuda if asked or (auto) if a GPU is there, else cpu."""
    if settings.device == "cuda" or (settings.device == "auto" and hardware.gpus_free):
        return "cuda"
    return "cpu"


def _batch_bytes(subject: Subject, batch: Batch, size: int) -> int:
    if batch.new_tokens:
        return generation_bytes(subject.shape, batch.rows, batch.prompt, batch.new_tokens, size)
    return forward_bytes(subject.shape, batch.rows, batch.prompt, size)


def memory_plan(settings: Settings, subject: Subject, hardware: Hardware, batches: list[Batch],
                edit: bool) -> MemoryPlan:
    """Peak CPU and GPU memory of the run's forward passes (and streaming edit, if `edit`) with these settings."""
    device = run_device(settings, hardware)
    dtype = resolve_dtype(settings.dtype, device)
    weights = weight_bytes(subject.checkpoint, subject.shape, dtype, settings.quantize) if batches else 0
    sized = [(_batch_bytes(subject, b, itemsize(dtype)), b.stage) for b in batches] or [(0, "streaming edit")]
    activations, stage = max(sized)
    largest = max((info.nbytes for info in subject.checkpoint.tensors.values()), default=0)
    if device == "cpu":
        cpu, gpu = PROCESS_BYTES + weights + activations, 0
    else:
        cpu, gpu = PROCESS_BYTES + largest, int((weights + activations) * GPU_SLACK)
    if edit and edit_peak(subject.checkpoint) > cpu:
        cpu = edit_peak(subject.checkpoint)
    return MemoryPlan(device=device, dtype=str(dtype).removeprefix("torch."), quantize=settings.quantize,
                      weights=weights, activations=activations, cpu_peak=cpu, gpu_peak=gpu,
                      cpu_available=hardware.ram_available, gpu_available=hardware.gpu_free, peak_stage=stage)


def fits(memory: MemoryPlan) -> bool:
    gpu_ok = memory.device == "cpu" or memory.gpu_peak <= memory.gpu_available
    return memory.cpu_peak <= memory.cpu_available and gpu_ok


def records_bytes(subject: Subject, candidates: int | None) -> int:
    """abliterate/ and the card: provenance, the direction file, and (after a search) candidates.json."""
    search = 0 if candidates is None else RUN_RECORD_BYTES + candidates * CANDIDATE_BYTES
    return RECORD_BYTES + 4 * subject.shape.hidden + search


def edit_output_bytes(settings: Settings, subject: Subject, candidates: int | None = None) -> int:
    """Bytes the edited output takes: safetensors exactly as laid out (headers, index, side files and records
    about), GGUF about the source file, an adapter small. `candidates`: the rows of candidates.json, if any."""
    if settings.format == "gguf" and subject.source.gguf_file is not None:
        return subject.source.gguf_file.stat().st_size
    if settings.format == "adapter":
        return RECORD_BYTES + 4 * 2 * sum(sum(info.shape) for info in subject.checkpoint.tensors.values())
    weights = output_bytes(subject.checkpoint, subject.config, settings.max_shard_bytes)
    headers = TENSOR_BYTES * (len(subject.checkpoint.tensors) + 1)
    return weights + headers + side_bytes(subject.source.folder, subject.config) + records_bytes(subject, candidates)


def disk_plans(settings: Settings, subject: Subject, out: Path | None, candidates: int | None = None) -> list[DiskPlan]:
    """The edited output (written into a temporary folder beside --out, then renamed), if this run writes one."""
    if out is None:
        return []
    place = existing(Path(out).expanduser().resolve().parent)
    return [DiskPlan(what="edited checkpoint (temporary folder beside --out, then renamed)", path=str(place),
                     bytes=edit_output_bytes(settings, subject, candidates), free=disk_free(place))]


def _memory_fix(settings: Settings, subject: Subject, hardware: Hardware, batches: list[Batch], edit: bool) -> str:
    """The first change of --quantize/--device that fits, as a hint."""
    tries = [{"quantize": "4bit"}, {"device": "cpu"}, {"device": "cpu", "quantize": "4bit"}]
    for change in tries:
        if all(getattr(settings, k) == v for k, v in change.items()):
            continue
        memory = memory_plan(settings.model_copy(update=change), subject, hardware, batches, edit)
        if fits(memory):
            flags = " ".join(f"--{k} {v}" for k, v in change.items())
            return f"{flags} (about {gb(max(memory.gpu_peak, memory.cpu_peak))}), or {OVERRIDE}"
    return f"use a machine with more memory or a smaller model, or {OVERRIDE}"


def check_memory(settings: Settings, subject: Subject, hardware: Hardware, batches: list[Batch], edit: bool) -> None:
    """Refuse a run whose estimated peak memory exceeds what is available (CPU RAM, or the GPUs' free memory)."""
    memory = memory_plan(settings, subject, hardware, batches, edit)
    if fits(memory):
        return
    on_gpu = memory.device != "cpu" and memory.gpu_peak > memory.gpu_available
    need, have = (memory.gpu_peak, memory.gpu_available) if on_gpu else (memory.cpu_peak, memory.cpu_available)
    where = "GPU memory" if on_gpu else "CPU memory"
    raise ResourceError(f"the run needs about {gb(need)} of {where} ({memory.peak_stage}), {gb(have)} is free",
                        hint=_memory_fix(settings, subject, hardware, batches, edit))


def check_disk(disk: list[DiskPlan]) -> None:
    """Refuse a run whose output will not fit on its disk."""
    for place in disk:
        if place.bytes > place.free:
            raise ResourceError(
                f"not enough disk space at {place.path}: the {place.what.split(' (')[0]} needs {gb(place.bytes)}, "
                f"{gb(place.free)} is free",
                hint=f"free {gb(place.bytes - place.free)} at {place.path} or choose an --out on another disk, "
                     f"or {OVERRIDE}")


def release() -> None:
    """Drop a calibration model before the run loads its own."""
    gc.collect()
