"""Prompts through a model in batches: render with the chat template, sort by length, left-pad, forward.

Every stage that runs prompts (the direction search, its selection, optimize's trials, the evaluation's
greedy answers) batches them with `make_batches` and reads first-answer-token logits with `run_batches`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from abliterate import progress
from abliterate.model.chat import encode, render


def make_batches(
    tokenizer: PreTrainedTokenizerBase, instructions: list[str], batch_size: int
) -> list[tuple[list[int], BatchEncoding]]:
    """Render, tokenize, sort by length and left-pad. Returns (original indices, batch) pairs."""
    ids = encode(tokenizer, [render(tokenizer, text) for text in instructions])
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in chosen]}, padding=True, return_tensors="pt")
        batches.append((chosen, batch))
    return batches


def first_token_index(batch: BatchEncoding) -> torch.Tensor:
    """Index of each row's first real token under left padding."""
    mask: torch.Tensor = batch["attention_mask"]
    return mask.argmax(dim=1)


def forward_last_logits(model: PreTrainedModel, batch: BatchEncoding) -> torch.Tensor:
    """Logits at the last position only ([batch, vocab], float32): the first answer token."""
    inputs = {k: v.to(model.device) for k, v in batch.items()}
    out = model(**inputs, use_cache=False, logits_to_keep=1)
    logits: torch.Tensor = out.logits[:, -1, :].float()
    return logits


def run_batches(
    model: PreTrainedModel, batches: list[tuple[list[int], BatchEncoding]], desc: str | None = None
) -> Iterator[tuple[list[int], BatchEncoding, torch.Tensor]]:
    """Forward every batch (no grad), yielding indices, batch and last-position logits."""
    items = progress.track(batches, desc, len(batches), "batch") if desc else iter(batches)
    with torch.inference_mode():
        for indices, batch in items:
            yield indices, batch, forward_last_logits(model, batch)
