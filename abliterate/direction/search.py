"""The direction search, one function per stage: load, prompts, filter, candidates, screen, score, choose.

`find_direction` is the front half that `edit`, `directions`, `crosslingual` and `optimize` share: model and
prompts in, the chosen direction and every candidate's scores out (Arditi et al. 2024, section 2 and
appendix C). It logs and raises typed errors; the commands print.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from abliterate import __version__, progress
from abliterate.direction.candidates import Candidates, make_candidates, mean_activations
from abliterate.direction.passes import SearchShape, SplitSizes, expected_passes, grid, screen_per_pass
from abliterate.direction.records import CANDIDATES_FILE, CandidateRow, CandidatesRecord
from abliterate.direction.run_record import PromptsRecord, RunRecord
from abliterate.direction.selection import (
    CandidateScore,
    ScreeningSet,
    ValidationSet,
    choose,
    collect_logits,
    finalists,
    refusal_score,
    score_candidate,
    screen_group,
)
from abliterate.direction.vector import Direction
from abliterate.errors import UsageError
from abliterate.model.archs import Architecture, lookup, register_file
from abliterate.model.batching import choose_batch_size, fixed_batch_size
from abliterate.model.chat import encode, post_instruction_length, render, set_chat_template
from abliterate.model.checkpoint import read_config
from abliterate.model.forward import make_batches
from abliterate.model.hooks import ForwardCount, count_forwards
from abliterate.model.loading import ModelSource, check_quantize, load_model, resolve
from abliterate.prompts import sources
from abliterate.prompts.refusals import refusal_token_ids
from abliterate.settings import Settings

log = logging.getLogger(__name__)

STAGES = ("filter", "activations", "screening", "finalists")  # the search's stages of forward passes


@dataclass
class LoadedModel:
    """A model ready for forward passes, with its family and resolved source."""

    source: ModelSource
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: Architecture

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


@dataclass
class PromptSplits:
    """Instructions used for one direction: train (means) and val (selection), per kind."""

    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]


@dataclass
class DirectionResult:
    """What `find_direction` produced."""

    direction: Direction
    chosen: CandidateScore | None
    scores: list[CandidateScore]
    candidates: Candidates
    n_pos: int
    filtered: dict[str, int] = field(default_factory=dict)
    splits: PromptSplits | None = None  # the instructions actually used (after filtering), for provenance
    forward_passes: dict[str, ForwardCount] = field(default_factory=dict)  # per stage (STAGES)
    batch_size: int | None = None  # the batch size the search ran with (--batch-size auto resolved)

    def report(self) -> CandidatesRecord:
        """The record of candidates.json."""
        chosen = self.chosen.row() if self.chosen else {"pos": self.direction.pos, "layer": self.direction.layer}
        return CandidatesRecord(
            tool_version=__version__,
            source_model=self.direction.source_model,
            lang=self.direction.lang,
            method=self.direction.method,
            chosen=CandidateRow.model_validate(chosen),
            post_instruction_tokens=self.n_pos,
            sink_layers=self.candidates.sink_layers,
            prompts_after_filter=self.filtered,
            batch_size=self.batch_size,
            **forward_pass_report(self.forward_passes),
            candidates=[CandidateRow.model_validate(s.row()) for s in self.scores],
        )

    def run_record(self, settings: Settings) -> RunRecord:
        """What provenance records of this search: the prompts used, the selection and every setting."""
        texts = dict(vars(self.splits)) if self.splits is not None else {}
        selection = {
            "chosen": self.chosen.row() if self.chosen else None,
            "kl_threshold": settings.kl_threshold,
            "candidates_scored": len(self.scores),
            "post_instruction_tokens": self.n_pos,
            "sink_layers": list(self.candidates.sink_layers),
            "file": f"abliterate/{CANDIDATES_FILE}",
        }
        prompts = PromptsRecord.of(settings.prompts, settings.lang, texts)
        return RunRecord(prompts=prompts, selection=selection, settings=settings.model_dump(mode="json"))


def forward_pass_report(counts: dict[str, ForwardCount]) -> dict[str, dict[str, int]]:
    """`forward_passes` (model calls) and `forward_rows` (prompts they carried) per stage, with totals."""
    stages = {stage: counts.get(stage, ForwardCount()) for stage in STAGES}
    total = sum(stages.values(), ForwardCount())
    return {
        "forward_passes": {**{k: c.calls for k, c in stages.items()}, "total": total.calls},
        "forward_rows": {**{k: c.rows for k, c in stages.items()}, "total": total.rows},
    }


def load(settings: Settings) -> LoadedModel:
    """Resolve and load the model; check its family and chat template before any work."""
    check_quantize(settings.quantize)  # before a download
    source = resolve(settings.model, revision=settings.revision, allow_pickle=settings.allow_pickle)
    if settings.arch is not None:
        register_file(settings.arch)
    arch = lookup(str(read_config(source.folder)["model_type"]))
    model, tokenizer = load_model(
        source, dtype=settings.dtype, device=settings.device, trust_remote_code=settings.trust_remote_code,
        quantize=settings.quantize,
    )
    set_chat_template(tokenizer, settings.chat_template, settings.model)
    return LoadedModel(source, model, tokenizer, arch)


def resolve_batch_size(settings: Settings, loaded: LoadedModel, extra: Sequence[str] = ()) -> Settings:
    """`settings` with --batch-size auto replaced by a number measured on `loaded` (unchanged otherwise).

    Measured on the run's direction prompts plus `extra` (other prompts the run will forward: evaluation or
    other languages), capped at the largest prompt set one stage forwards; call it once, after loading.
    """
    if settings.batch_size != "auto":
        return settings
    splits = load_prompts(settings)
    groups = list(vars(splits).values())
    texts = [text for group in groups for text in group] + list(extra)
    size = choose_batch_size(loaded.model, loaded.tokenizer, texts, max(len(group) for group in groups))
    log.info("--batch-size auto: %d prompts per forward pass (on %s)", size, loaded.model.device)
    return settings.model_copy(update={"batch_size": size})


def rounded(value: float | None) -> str:
    """A score for a log line: 3 significant digits (n/a when not scored)."""
    return "n/a" if value is None else f"{value:.3g}"


def config_layers(config: dict[str, object]) -> int | None:
    """The decoder layer count a config.json states (its own, or its text model's), if it states one."""
    text = config.get("text_config")
    value = config.get("num_hidden_layers") or (text.get("num_hidden_layers") if isinstance(text, dict) else None)
    return int(value) if isinstance(value, int) else None


def check_layer_choice(settings: Settings, n_layers: int | None, n_pos: int | None) -> None:
    """--layer and --pos within the model's range (each check only where the count is known)."""
    if settings.layer is not None and n_layers is not None and settings.layer >= n_layers:
        raise UsageError(f"--layer {settings.layer} is out of range", hint=f"this model has layers 0..{n_layers - 1}")
    if settings.pos is not None and n_pos is not None and settings.pos < -n_pos:
        raise UsageError(f"--pos {settings.pos} is out of range", hint=f"this chat template has positions -{n_pos}..-1")


def load_prompts(settings: Settings) -> PromptSplits:
    source = sources.load(settings.prompts, default_lang=settings.lang)
    lang = settings.lang
    return PromptSplits(
        harmful_train=source.instructions(lang, "harmful", "train", settings.n_train),
        harmless_train=source.instructions(lang, "harmless", "train", settings.n_train),
        harmful_val=source.instructions(lang, "harmful", "val", settings.n_val),
        harmless_val=source.instructions(lang, "harmless", "val", settings.n_val),
    )


def refusal_ids(settings: Settings, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """First-token ids of refusal openings: from --refusal-tokens, else from the language's markers."""
    if settings.refusal_tokens:
        ids = {tokenizer.encode(text, add_special_tokens=False)[0] for text in settings.refusal_tokens if text}
        return sorted(ids)
    return refusal_token_ids(tokenizer, settings.lang)


def _refusal_scores(
    loaded: LoadedModel, texts: list[str], ids: list[int], batch_size: int, what: str
) -> torch.Tensor:
    logits = collect_logits(loaded.model, make_batches(loaded.tokenizer, texts, batch_size), f"filtering {what}")
    return refusal_score(logits, ids)


def _keep(texts: list[str], mask: torch.Tensor, what: str) -> list[str]:
    kept = [t for t, keep in zip(texts, mask.tolist(), strict=True) if keep]
    if len(kept) < max(2, len(texts) // 4):
        log.warning(
            "only %d of %d %s prompts pass the refusal-score filter; using all of them", len(kept), len(texts), what
        )
        return texts
    return kept


def filter_prompts(loaded: LoadedModel, splits: PromptSplits, ids: list[int], batch_size: int) -> PromptSplits:
    """Keep harmful prompts the model refuses (score > 0) and harmless ones it answers (score < 0)."""

    def harmful(texts: list[str], what: str) -> list[str]:
        return _keep(texts, _refusal_scores(loaded, texts, ids, batch_size, what) > 0, what)

    def harmless(texts: list[str], what: str) -> list[str]:
        return _keep(texts, _refusal_scores(loaded, texts, ids, batch_size, what) < 0, what)

    return PromptSplits(
        harmful(splits.harmful_train, "harmful train"),
        harmless(splits.harmless_train, "harmless train"),
        harmful(splits.harmful_val, "harmful val"),
        harmless(splits.harmless_val, "harmless val"),
    )


def compute_candidates(loaded: LoadedModel, splits: PromptSplits, n_pos: int, settings: Settings) -> Candidates:
    args = (loaded.model, loaded.tokenizer, loaded.arch)
    bs = fixed_batch_size(settings.batch_size)
    harmful, _ = mean_activations(*args, splits.harmful_train, n_pos, bs, "harmful activations", settings.winsorize)
    harmless, sink = mean_activations(*args, splits.harmless_train, n_pos, bs, "harmless activations",
                                      settings.winsorize)
    return make_candidates(harmful, harmless, sink, settings.method)


def candidate_grid(loaded: LoadedModel, candidates: Candidates, settings: Settings) -> list[CandidateScore]:
    """Every eligible (pos, layer); --layer/--pos restrict the grid (`direction.passes.grid`)."""
    layers, positions = grid(settings, loaded.n_layers, candidates.n_pos)
    return [CandidateScore(p, layer) for layer in layers for p in positions]


def longest_prompt(tokenizer: PreTrainedTokenizerBase, splits: PromptSplits) -> int:
    """Tokens in the longest rendered prompt of the splits."""
    texts = [text for group in vars(splits).values() for text in group]
    return max(len(ids) for ids in encode(tokenizer, [render(tokenizer, text) for text in texts]))


def screening_tokens(tokenizer: PreTrainedTokenizerBase, splits: PromptSplits, n: int) -> int:
    """Rows times padded length of the screening batch (`screening_set`) of these splits."""
    texts = splits.harmful_val[:n] + splits.harmless_val[:n]
    lengths = [len(ids) for ids in encode(tokenizer, [render(tokenizer, text) for text in texts])]
    return len(lengths) * max(lengths, default=0)


def sizes(splits: PromptSplits) -> SplitSizes:
    """Prompts per split."""
    return SplitSizes(**{name: len(texts) for name, texts in vars(splits).items()})


def search_shape(
    settings: Settings, tokenizer: PreTrainedTokenizerBase, n_layers: int, before: PromptSplits, after: PromptSplits
) -> SearchShape:
    """The sizes that fix the search's forward passes (`direction.passes`), from the tokenizer and prompts alone."""
    bs = fixed_batch_size(settings.batch_size)
    layers, positions = grid(settings, n_layers, post_instruction_length(tokenizer))
    n_grid = len(layers) * len(positions)
    per_pass = screen_per_pass(bs, longest_prompt(tokenizer, after),
                               screening_tokens(tokenizer, after, settings.screen_prompts), n_grid)
    return SearchShape(sizes(before), sizes(after), bs, settings.filter_prompts, n_grid, per_pass,
                       settings.screen_prompts, settings.finalists)


def screening_set(loaded: LoadedModel, splits: PromptSplits, n: int) -> ScreeningSet:
    """The first `n` harmful and harmless val prompts in one batch, with their unedited logits."""
    harmful, harmless = splits.harmful_val[:n], splits.harmless_val[:n]
    batches = make_batches(loaded.tokenizer, harmful + harmless, len(harmful) + len(harmless))
    [(indices, batch)] = batches
    return ScreeningSet(indices, batch, len(harmful), collect_logits(loaded.model, batches))


def screen_candidates(
    loaded: LoadedModel,
    candidates: Candidates,
    grid: list[CandidateScore],
    splits: PromptSplits,
    ids: list[int],
    settings: Settings,
    *,
    grouped: bool = True,
) -> list[CandidateScore]:
    """First pass: ablation on a few prompts for every candidate, several per forward pass; returns the finalists.

    A pass holds as many copies of the screening batch as fit in the tokens of one batch of `batch_size` of the
    run's longest prompts (`direction.selection.screen_groups`); `grouped=False` screens one candidate per pass.
    """
    if len(grid) <= settings.finalists:
        return grid
    screen = screening_set(loaded, splits, settings.screen_prompts)
    longest = longest_prompt(loaded.tokenizer, splits)
    size = screen_per_pass(fixed_batch_size(settings.batch_size), longest, screen.tokens, len(grid)) if grouped else 1
    chunks = [grid[i : i + size] for i in range(0, len(grid), size)]
    log.info("screening %d candidates, %d per forward pass (%d passes)", len(grid), size, len(chunks))
    for chunk in progress.track(chunks, "screening candidates", len(chunks), "pass"):
        screen_group(loaded.model, loaded.arch, candidates, chunk, screen, ids)
    return finalists(grid, settings.finalists, settings.kl_threshold)


def score_finalists(
    loaded: LoadedModel,
    candidates: Candidates,
    chosen: list[CandidateScore],
    splits: PromptSplits,
    ids: list[int],
    settings: Settings,
) -> None:
    """Second pass: refusal, induce and KL scores on all validation prompts."""
    tok, bs = loaded.tokenizer, fixed_batch_size(settings.batch_size)
    harmless = make_batches(tok, splits.harmless_val, bs)
    val = ValidationSet(make_batches(tok, splits.harmful_val, bs), harmless, collect_logits(loaded.model, harmless))
    for score in progress.track(chosen, "scoring finalists", len(chosen), "cand"):
        score_candidate(loaded.model, loaded.arch, candidates, score, val, ids)


def check_forward_passes(counts: dict[str, ForwardCount], shape: SearchShape) -> None:
    """Log the counts, and warn when they differ from what `direction.passes` derives from the sizes (`--plan`)."""
    report = forward_pass_report(counts)
    calls, rows = report["forward_passes"], report["forward_rows"]
    log.info(
        "forward passes: %s (total %d passes, %d prompt rows)",
        ", ".join(f"{stage} {calls[stage]}" for stage in STAGES),
        calls["total"],
        rows["total"],
    )
    expected = forward_pass_report(expected_passes(shape))
    if expected != report:
        log.warning("forward passes differ from the plan's count: counted %s, planned %s", report, expected)


def find_direction(settings: Settings, loaded: LoadedModel, *, grouped_screening: bool = True) -> DirectionResult:
    """Prompts -> filtered prompts -> candidates -> scores -> chosen direction.

    Resolves --batch-size auto first if the caller has not; counts the model's forward passes per stage.
    """
    settings = resolve_batch_size(settings, loaded)
    n_pos = post_instruction_length(loaded.tokenizer)
    check_layer_choice(settings, loaded.n_layers, n_pos)
    splits = before = load_prompts(settings)
    ids = refusal_ids(settings, loaded.tokenizer)
    log.info("refusal tokens: %s", loaded.tokenizer.convert_ids_to_tokens(ids))
    passes: dict[str, ForwardCount] = {}
    with count_forwards(loaded.model) as passes["filter"]:
        if settings.filter_prompts:
            splits = filter_prompts(loaded, splits, ids, fixed_batch_size(settings.batch_size))
    filtered = {k: len(v) for k, v in vars(splits).items()}
    with count_forwards(loaded.model) as passes["activations"]:
        candidates = compute_candidates(loaded, splits, n_pos, settings)
    scores = candidate_grid(loaded, candidates, settings)
    with count_forwards(loaded.model) as passes["screening"]:
        chosen = screen_candidates(loaded, candidates, scores, splits, ids, settings, grouped=grouped_screening)
    with count_forwards(loaded.model) as passes["finalists"]:
        score_finalists(loaded, candidates, chosen, splits, ids, settings)
    shape = search_shape(settings, loaded.tokenizer, loaded.n_layers, before, splits)
    check_forward_passes(passes, shape if grouped_screening else replace(shape, screen_per_pass=1))
    best = choose(scores, settings.kl_threshold)
    direction = Direction(
        candidates.vector(best.pos, best.layer),
        layer=best.layer,
        pos=best.pos,
        lang=settings.lang,
        source_model=settings.model,
        method=settings.method,
    )
    log.info(
        "chosen direction: layer %d, pos %d (refusal %s, induce %s, KL %s)",
        best.layer,
        best.pos,
        rounded(best.refusal),
        rounded(best.induce),
        rounded(best.kl),
    )
    batch_size = fixed_batch_size(settings.batch_size)
    return DirectionResult(direction, best, scores, candidates, n_pos, filtered, splits, passes, batch_size)
