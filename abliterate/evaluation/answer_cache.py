"""Cached greedy generations: a model folder's identity, and answers stored under `cache_dir()/generations/`.

Greedy answers are the slow part of an evaluation, and they are deterministic for a given model, prompts and
generation settings, so a re-run reuses them. This module owns the cache key (a sha256 of the model's
identity, its chat template, the prompt texts and the generation settings), the cache files (one JSON file
per key, written atomically) and `GenerationCache.generate`, which wraps `generate` (`generate_jobs`: several
prompt lists in one call, each cached under its own key).

A model folder's identity is the sha256 of its config.json and the names, sizes and modification times of
its weight files: cheap for multi-GB checkpoints, unchanged by the rename that finishes an `edit`, and
changed by any rewrite of the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from abliterate.evaluation.generate import Generation, generate, stop_ids
from abliterate.storage.atomic import write_json
from abliterate.storage.paths import cache_dir

log = logging.getLogger(__name__)
JobT = TypeVar("JobT", bound=Hashable)

CACHE_VERSION = 1
"""Part of every key: bumped when the generation code changes what it produces."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_identity(folder: Path) -> str:
    """sha256 of config.json and the (name, size, mtime) of every weight file at the top of `folder`."""
    folder = Path(folder)
    config = folder / "config.json"
    weights = {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(folder.iterdir())
        if p.suffix in WEIGHT_SUFFIXES and p.is_file()
    }
    payload = {"config": _sha256_bytes(config.read_bytes()) if config.is_file() else None, "weights": weights}
    return _sha256_bytes(json.dumps(payload, sort_keys=True).encode())


def generation_key(
    identity: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
) -> str:
    """The cache key of one `generate` call (batch size, dtype and device can change greedy ties)."""
    payload: dict[str, Any] = {
        "cache_version": CACHE_VERSION,
        "model": identity,
        "chat_template": _template_hash(tokenizer),
        "stop_ids": stop_ids(model, tokenizer),
        "pad_id": tokenizer.pad_token_id,
        "dtype": str(model.dtype),
        "device": model.device.type,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "instructions": _sha256_bytes(json.dumps(list(instructions), ensure_ascii=False).encode()),
    }
    quantization = _quantization(model)
    if quantization is not None:  # only then: the keys of unquantized models stay as they were
        payload["quantization"] = quantization
    return _sha256_bytes(json.dumps(payload, sort_keys=True).encode())


def engine_generation_key(
    identity: str,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    max_new_tokens: int,
    engine: dict[str, Any],
) -> str:
    """The cache key of answers from another generation engine; `engine` names it and its settings."""
    payload: dict[str, Any] = {
        "cache_version": CACHE_VERSION,
        "model": identity,
        "chat_template": _template_hash(tokenizer),
        "engine": engine,
        "max_new_tokens": max_new_tokens,
        "instructions": _sha256_bytes(json.dumps(list(instructions), ensure_ascii=False).encode()),
    }
    return _sha256_bytes(json.dumps(payload, sort_keys=True, default=str).encode())


def _template_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    template = getattr(tokenizer, "chat_template", None)
    return _sha256_bytes(json.dumps(template, sort_keys=True, default=str).encode())


def _quantization(model: PreTrainedModel) -> dict[str, Any] | None:
    """The in-memory model's quantization config (e.g. bitsandbytes from --quantize), None if it has none."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    data = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(data, dict):
        return {"config": str(data)}
    plain: dict[str, Any] = json.loads(json.dumps(data, sort_keys=True, default=str))
    return plain


@dataclass
class GenerationCache:
    """Greedy generations stored by key in `folder` (None: no cache); counts hits and misses."""

    folder: Path | None
    hits: int = 0
    misses: int = 0

    @classmethod
    def default(cls, enabled: bool = True) -> GenerationCache:
        """The cache in `cache_dir()/generations` (ABLITERATE_CACHE moves it), or a disabled one."""
        return cls(cache_dir() / "generations" if enabled else None)

    def _path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.json"

    def read(self, key: str, n: int) -> Generation | None:
        """The stored generation of `key` (None if absent, unreadable or not for `n` prompts)."""
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            generation = Generation(
                [[int(t) for t in row] for row in data["ids"]],
                [str(t) for t in data["texts"]],
                [bool(f) for f in data["finished"]],
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring the unreadable cached generation %s (%s)", path, err)
            return None
        if not len(generation.ids) == len(generation.texts) == len(generation.finished) == n:
            log.warning("ignoring the cached generation %s: it holds a different number of answers", path)
            return None
        return generation

    def lookup(self, key: str, n: int) -> Generation | None:
        """`read`, counted as a hit or a miss."""
        cached = self.read(key, n)
        if cached is None:
            self.misses += 1
        else:
            self.hits += 1
        return cached

    def write(self, key: str, generation: Generation, meta: dict[str, Any]) -> None:
        """Store `generation` under `key` (atomically; a failure to write only logs a warning)."""
        path = self._path(key)
        if path is None:
            return
        data = {"key": key, "meta": meta, "ids": generation.ids, "texts": generation.texts,
                "finished": generation.finished}
        try:
            write_json(path, data, indent=None)
        except OSError as err:
            log.warning("cannot write the generation cache in %s (%s); continuing without it", path.parent, err)

    def generate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        identity: str,
        instructions: Sequence[str],
        max_new_tokens: int,
        batch_size: int,
        desc: str | None = None,
    ) -> Generation:
        """`generate`, answered from the cache when this exact call was made before."""
        key = generation_key(identity, model, tokenizer, instructions, max_new_tokens, batch_size)
        cached = self.lookup(key, len(instructions))
        if cached is not None:
            log.debug("generation cache hit %s (%s)", key[:12], desc)
            return cached
        generation = generate(model, tokenizer, instructions, max_new_tokens, batch_size, desc)
        meta = {"model": identity, "prompts": len(instructions), "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "what": desc}
        self.write(key, generation, meta)
        return generation

    def generate_jobs(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        identity: str,
        jobs: Mapping[JobT, Sequence[str]],
        max_new_tokens: int,
        batch_size: int,
        desc: str | None = None,
    ) -> dict[JobT, Generation]:
        """`generate` for several prompt lists, each cached under its own key as if generated alone: the lists
        not in the cache are answered in one call (one continuous-batching queue) and split afterwards."""
        keys = {job: generation_key(identity, model, tokenizer, texts, max_new_tokens, batch_size)
                for job, texts in jobs.items()}
        found = {job: self.lookup(keys[job], len(texts)) for job, texts in jobs.items()}
        missing = [job for job, cached in found.items() if cached is None]
        if missing:
            generation = generate(model, tokenizer, [t for job in missing for t in jobs[job]], max_new_tokens,
                                  batch_size, desc)
            for job, part in zip(missing, generation.split([len(jobs[job]) for job in missing]), strict=True):
                meta = {"model": identity, "prompts": len(jobs[job]), "max_new_tokens": max_new_tokens,
                        "batch_size": batch_size, "what": f"{desc} {job}"}
                self.write(keys[job], part, meta)
                found[job] = part
        return {job: generation for job, generation in found.items() if generation is not None}

    def stats(self) -> dict[str, Any]:
        return {"enabled": self.folder is not None, "hits": self.hits, "misses": self.misses}
