"""`abliterate optimize`: a multi-objective Optuna search over partial, depth-dependent ablations.

Each trial picks a direction and per-layer ablation weights and measures two objectives, both minimised: the
mean refusal rate over `--langs` (greedy answers to harmful val prompts, judged by `--judge`) and the mean
first-token KL divergence on harmless val prompts against the unedited model; `--over-refusal-max` adds a
constraint. The model is loaded once; a trial applies its edit with hooks (`model.hooks.weighted_ablation`) or,
with `--trial-edit weights`, to the loaded weights themselves (`edit.in_memory.edited_weights`), undone after it.

What is searched is `space.py` (the window kernel by default, docs/optimize.md): the direction's (fractional)
layer or each layer's own direction, and per component (attention, MLP, embedding) a weight profile over depth
that can reach exactly 0. The sampler is multivariate TPE after `--startup-trials` random trials.

Trial 0 is the paper's default edit (selected layer, weight 1 everywhere), enqueued so the front can be
compared with it; with the window kernel, trial 1 is its per-layer twin. The study lives in `--study` as
SQLite (`study.db`), next to the cached directions and the settings it was made with (`study.json`, the space
included), so re-running the same command resumes it. `--pick N` writes trial N's edit through the normal
streaming path with its per-layer weights.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from abliterate import __version__, progress
from abliterate.commands.optimize.pareto import ParetoReport, TrialRow, write_report
from abliterate.commands.optimize.space import Kernel, SearchSpace, TrialParams
from abliterate.direction.run_record import PromptsRecord, RunRecord
from abliterate.direction.search import find_direction, load, resolve_batch_size
from abliterate.direction.selection import Batches, collect_logits, eligible_layers, kl_divergence
from abliterate.direction.vector import Direction
from abliterate.edit.formats import OutputOptions, check_format
from abliterate.edit.in_memory import edited_weights
from abliterate.edit.projection import NORM_PRESERVING
from abliterate.errors import UsageError
from abliterate.evaluation.generate import generate
from abliterate.evaluation.judge import Judge, make_judge
from abliterate.model.ablation import AblationWeights
from abliterate.model.batching import fixed_batch_size
from abliterate.model.forward import make_batches
from abliterate.model.hooks import weighted_ablation
from abliterate.model.loading import resolve
from abliterate.prompts import sources
from abliterate.prompts.languages import parse_languages
from abliterate.publish.write_edited import write_edited
from abliterate.settings import OptimizeSettings, Settings, TrialEdit
from abliterate.storage.atomic import check_output, write_json

if TYPE_CHECKING:
    import optuna

    from abliterate.direction.search import LoadedModel

log = logging.getLogger(__name__)

STUDY_DB = "study.db"
STUDY_NAME = "abliterate-optimize"
STUDY_CONFIG = "study.json"
DIRECTIONS_FILE = "directions.safetensors"
LOCK_FILE = ".lock"
OPTIMIZE_FILE = "optimize.json"  # in an output's abliterate/ folder: the picked trial
PER_LAYER_ANCHOR = "per layer"  # user attribute of the enqueued per-layer twin of the reference trial
DEFAULT_TRIALS = 50
STARTUP_SHARE = 0.3  # random start-up trials by default: Heretic's 60 of 200
# Settings a study's objectives depend on: a resumed study must be run with the same values.
STUDY_KEYS = ("model", "revision", "lang", "prompts", "method", "n_train", "n_val", "layer", "pos", "prune_layers",
              "kl_threshold", "screen_prompts", "finalists", "filter_prompts", "refusal_tokens", "judge", "quantize",
              "winsorize")
# Study settings added after studies existed, with the value an older study.json's absence means.
ADDED_KEYS: dict[str, Any] = {"kernel": "gaussian", "trial_edit": "hooks", "over_refusal_max": None, "winsorize": 1.0}


@dataclass(frozen=True)
class OptimizeOptions:
    """The `optimize` section (OptimizeSettings) resolved: the study folder and the trial count filled in."""

    study: Path
    trials: int
    pick: int | None
    out: Path | None
    overwrite: bool
    seed: int
    trial_prompts: int
    kl_prompts: int
    trial_max_new_tokens: int
    plots: bool
    startup_trials: int
    kernel: Kernel = "window"
    trial_edit: TrialEdit = "hooks"
    over_refusal_max: float | None = None

    @classmethod
    def from_section(cls, settings: Settings, section: OptimizeSettings) -> OptimizeOptions:
        """Fill defaults (--study from the model's name; no new trials when only picking) and check the combination."""
        pick, out = section.pick, settings.out
        if pick is not None and out is None:
            raise UsageError("--pick needs --out", hint="pass --out DIR for the picked trial's checkpoint")
        if out is not None and pick is None:
            raise UsageError("--out is only used with --pick", hint="pass --pick N to write trial N's checkpoint")
        trials = section.trials if section.trials is not None else 0 if pick is not None else DEFAULT_TRIALS
        startup = section.startup_trials
        if startup is None:
            startup = max(1, round(STARTUP_SHARE * (trials or DEFAULT_TRIALS)))
        trial_edit: TrialEdit = section.trial_edit if section.trial_edit != "auto" else (
            "weights" if settings.method == NORM_PRESERVING else "hooks")
        return cls(section.study or default_study(settings.model), trials, pick, out, settings.overwrite, section.seed,
                   section.trial_prompts, section.kl_prompts, section.trial_max_new_tokens, section.plots, startup,
                   section.kernel, trial_edit, section.over_refusal_max)


def default_study(model: str) -> Path:
    """optimize-<model name> in the current folder."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name).strip("-.") or "model"
    return Path(f"optimize-{name}")


# --- the candidate directions of one study ----------------------------------------------------------------


@dataclass
class LayerDirections:
    """The difference-in-means candidate of every layer at one position, and the default selection."""

    vectors: torch.Tensor  # [n_layers, hidden] float32, not normalised
    pos: int
    default_layer: int
    lang: str
    method: str
    source_model: str

    def at(self, layer: float) -> torch.Tensor:
        """The unit direction at a fractional layer: neighbours normalised, mixed linearly, renormalised."""
        last = self.vectors.shape[0] - 1
        low = min(max(math.floor(layer), 0), last)
        t = min(max(layer - low, 0.0), 1.0)
        if t == 0.0 or low == last:
            vector = self.vectors[low]
        else:
            a, b = (self.vectors[i] / self.vectors[i].norm().clamp_min(1e-30) for i in (low, low + 1))
            vector = (1.0 - t) * a + t * b
        return vector / vector.norm()

    def layer_vectors(self) -> torch.Tensor:
        """[n_layers, hidden] unit rows: row l for layer l's writers, the candidate at the input of layer l + 1
        (the stream they write into; the last layer: its own input's); a zero candidate: the default layer's."""
        n = int(self.vectors.shape[0])
        rows = self.vectors[[min(layer + 1, n - 1) for layer in range(n)]].clone()
        zero = rows.norm(dim=-1) == 0
        rows[zero] = self.vectors[self.default_layer]
        return rows / rows.norm(dim=-1, keepdim=True)

    def per_layer(self, params: TrialParams) -> torch.Tensor | None:
        return self.layer_vectors() if params.per_layer else None

    def direction(self, params: TrialParams, trial: int) -> Direction:
        """Trial `trial`'s direction with its per-layer weights, ready for `write_checkpoint`."""
        n_layers = int(self.vectors.shape[0])
        return Direction(
            self.at(params.layer),
            layer=round(params.layer),
            pos=self.pos,
            lang=self.lang,
            source_model=self.source_model,
            method=self.method,
            extra={"optimize_trial": str(trial), "layer_float": f"{params.layer:.6f}"},
            weights=params.weights(n_layers),
            per_layer=self.per_layer(params),
        )

    def save(self, path: Path) -> None:
        meta = {"pos": str(self.pos), "default_layer": str(self.default_layer), "lang": self.lang,
                "method": self.method, "source_model": self.source_model}
        save_file({"vectors": self.vectors.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> LayerDirections:
        with safe_open(str(path), framework="pt") as fh:
            vectors, meta = fh.get_tensor("vectors"), dict(fh.metadata() or {})
        return cls(vectors, int(meta["pos"]), int(meta["default_layer"]), meta["lang"], meta["method"],
                   meta["source_model"])


# --- objectives -------------------------------------------------------------------------------------------


def trial_prompts(settings: Settings, options: OptimizeOptions) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The harmful and harmless val instructions of every trial, per language."""
    langs = parse_languages(settings.langs)
    source = sources.load(settings.prompts, default_lang=settings.lang)
    harmful = {lang: source.instructions(lang, "harmful", "val", options.trial_prompts) for lang in langs}
    harmless = {lang: source.instructions(lang, "harmless", "val", options.kl_prompts) for lang in langs}
    return harmful, harmless


@dataclass
class TrialSet:
    """The fixed prompts every trial is measured on, and the unedited model's logits on the harmless ones."""

    langs: list[str]
    harmful: list[str]
    harmful_langs: list[str]
    harmless: Batches
    harmless_langs: list[str]
    base_logits: torch.Tensor
    harmless_texts: list[str]

    @classmethod
    def build(cls, loaded: LoadedModel, settings: Settings, options: OptimizeOptions) -> TrialSet:
        langs = parse_languages(settings.langs)
        harmful, harmless = trial_prompts(settings, options)
        batches = make_batches(loaded.tokenizer, [t for lang in langs for t in harmless[lang]],
                               fixed_batch_size(settings.batch_size))
        return cls(
            langs,
            [t for lang in langs for t in harmful[lang]],
            [lang for lang in langs for _ in harmful[lang]],
            batches,
            [lang for lang in langs for _ in harmless[lang]],
            collect_logits(loaded.model, batches, "unedited logits"),
            [t for lang in langs for t in harmless[lang]],
        )


@dataclass(frozen=True)
class TrialScores:
    """A trial's per-language refusal rates and KL divergences; the objectives are their means."""

    refusal_by_lang: dict[str, float]
    kl_by_lang: dict[str, float]
    over_refusal_by_lang: dict[str, float] | None = None  # measured only under --over-refusal-max

    @property
    def refusal(self) -> float:
        return sum(self.refusal_by_lang.values()) / len(self.refusal_by_lang)

    @property
    def over_refusal(self) -> float | None:
        values = self.over_refusal_by_lang
        return sum(values.values()) / len(values) if values else None

    @property
    def kl(self) -> float:
        return sum(self.kl_by_lang.values()) / len(self.kl_by_lang)


def _means(values: list[float], langs: list[str], order: list[str]) -> dict[str, float]:
    return {lang: _mean([v for v, l_ in zip(values, langs, strict=True) if l_ == lang]) for lang in order}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class TrialEditing:
    """How a trial puts its edit into the loaded model (`--trial-edit`) and what it measures besides."""

    mode: TrialEdit
    norm_preserving: bool
    over_refusal: bool

    def applied(self, loaded: LoadedModel, direction: torch.Tensor, weights: AblationWeights,
                per_layer: torch.Tensor | None) -> Any:
        """A context manager: hooks on the residual writes, or the checkpoint's weight edit done in memory."""
        if self.mode == "weights":
            return edited_weights(loaded.model, loaded.arch, direction, weights, norm_preserving=self.norm_preserving,
                                  per_layer=per_layer)
        return weighted_ablation(loaded.model, loaded.arch, direction, weights, per_layer)


def measure(
    loaded: LoadedModel, trial_set: TrialSet, judge: Judge, direction: torch.Tensor, weights: AblationWeights,
    max_new_tokens: int, batch_size: int, editing: TrialEditing, per_layer: torch.Tensor | None = None,
) -> TrialScores:
    """Refusal rate and first-token KL per language (and over-refusal if asked) with the edit applied (undone after)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    asked = trial_set.harmless_texts if editing.over_refusal else []
    with editing.applied(loaded, direction, weights, per_layer):  # harmful and harmless answers in one queue
        answers = generate(model, tokenizer, [*trial_set.harmful, *asked], max_new_tokens, batch_size)
        logits = collect_logits(model, trial_set.harmless)
    texts, harmless_texts = (part.texts for part in answers.split([len(trial_set.harmful), len(asked)]))
    verdicts = judge.judge(trial_set.harmful, texts, trial_set.harmful_langs)
    kl = kl_divergence(trial_set.base_logits, logits).tolist()
    over = None
    if editing.over_refusal:
        refused = judge.judge(trial_set.harmless_texts, harmless_texts, trial_set.harmless_langs)
        over = _means([float(v) for v in refused], trial_set.harmless_langs, trial_set.langs)
    return TrialScores(
        _means([float(v) for v in verdicts], trial_set.harmful_langs, trial_set.langs),
        _means(kl, trial_set.harmless_langs, trial_set.langs),
        over,
    )


# --- the study on disk --------------------------------------------------------------------------------------


def _optuna() -> Any:
    level = logging.getLogger("optuna").level  # as the application set it; optuna resets it on import
    try:
        import optuna
    except ImportError:
        raise UsageError("optuna is not installed", hint="pip install 'abliterate[optimize]'") from None
    optuna.logging.disable_default_handler()  # its messages go through logging like everyone else's
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(level or logging.WARNING)
    return optuna


@contextmanager
def study_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the study folder (one process per study); released when the process ends."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    with (folder / LOCK_FILE).open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"study {folder} is in use by another process",
                             hint="wait for it to finish, or choose another --study") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def requested_config(settings: Settings, options: OptimizeOptions) -> dict[str, Any]:
    """What a study's objectives depend on, as given on the command line."""
    values = settings.model_dump(mode="json")
    return {
        **{key: values[key] for key in STUDY_KEYS},
        "langs": parse_languages(settings.langs),
        "trial_prompts": options.trial_prompts,
        "kl_prompts": options.kl_prompts,
        "max_new_tokens": options.trial_max_new_tokens,
        "kernel": options.kernel,
        "trial_edit": options.trial_edit,
        "over_refusal_max": options.over_refusal_max,
    }


def read_config_file(folder: Path) -> dict[str, Any] | None:
    path = folder / STUDY_CONFIG
    if not path.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {err}", hint="delete the study folder to start again") from None
    return data


def check_config(folder: Path, stored: dict[str, Any], requested: dict[str, Any], keys: list[str]) -> None:
    """A one-line error naming the first setting that differs from the one the study was made with."""
    for key in keys:
        made_with = stored["settings"].get(key, ADDED_KEYS.get(key))
        if made_with != requested.get(key):
            raise UsageError(
                f"study {folder} was made with {key}={made_with!r}, not {requested.get(key)!r}",
                hint="run it with the same settings, choose another --study, or delete the folder to start again",
            )


def write_config_file(
    folder: Path, requested: dict[str, Any], space: SearchSpace, dirs: LayerDirections, prompts: PromptsRecord
) -> None:
    record = {
        "tool_version": __version__,
        "settings": requested,
        "space": space.to_json(),
        "direction": {"pos": dirs.pos, "default_layer": dirs.default_layer, "lang": dirs.lang, "method": dirs.method},
        "prompts": prompts.model_dump(mode="json"),
    }
    write_json(folder / STUDY_CONFIG, record)


def open_study(folder: Path, seed: int, startup_trials: int = 10) -> optuna.Study:
    """Create or load the study; the sampler's seed moves on with the trials already run (no repeats).

    The sampler is Optuna's multivariate TPE (parameters modelled jointly) after `startup_trials` random trials;
    trials that break the over-refusal constraint (user attribute `over_refusal_excess` > 0) count as infeasible.
    """
    optuna = _optuna()
    storage = f"sqlite:///{(folder / STUDY_DB).resolve()}"
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=["minimize", "minimize"],
                                load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate, constraints
        study.sampler = optuna.samplers.TPESampler(
            seed=seed + len(study.trials), n_startup_trials=startup_trials, multivariate=True,
            n_ei_candidates=128, constraints_func=constraint_values,
        )
    return study


def constraint_values(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna's constraint: the over-refusal above --over-refusal-max (feasible when <= 0; 0 when not measured)."""
    return [float(trial.user_attrs.get("over_refusal_excess", 0.0))]


def prepare_study(study: optuna.Study, default_layer: int, space: SearchSpace) -> None:
    """Fail trials left running by a killed process; enqueue the reference trial (and, with the window kernel,
    its per-layer twin: each layer's own direction at weight 1) unless it ran or is queued."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.warning("trial %d was interrupted; marking it failed", trial.number)
        study.tell(trial.number, state=TrialState.FAIL)
    alive = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING))
    if not any(t.user_attrs.get("reference") for t in alive):
        study.enqueue_trial(TrialParams.reference(default_layer, space), user_attrs={"reference": True})
    if space.kernel == "window" and not any(t.user_attrs.get("anchor") == PER_LAYER_ANCHOR for t in alive):
        study.enqueue_trial(TrialParams.reference(default_layer, space, scope="per layer"),
                            user_attrs={"anchor": PER_LAYER_ANCHOR})


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    from optuna.trial import TrialState

    return list(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


# --- running ------------------------------------------------------------------------------------------------


@dataclass
class Searcher:
    """Everything a trial needs: the loaded model, its directions, the prompts and the judge."""

    loaded: LoadedModel
    directions: LayerDirections
    space: SearchSpace
    trial_set: TrialSet
    judge: Judge
    options: OptimizeOptions
    batch_size: int
    editing: TrialEditing

    def run_trial(self, study: optuna.Study) -> None:
        """Ask, measure, tell; a failed or interrupted trial is told as failed before the error goes on."""
        from optuna.trial import TrialState

        trial, start = study.ask(), time.perf_counter()
        try:
            params = TrialParams.suggest(trial, self.space)
            scores = measure(self.loaded, self.trial_set, self.judge, self.directions.at(params.layer),
                             params.weights(self.space.n_layers), self.options.trial_max_new_tokens, self.batch_size,
                             self.editing, self.directions.per_layer(params))
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        trial.set_user_attr("refusal_by_lang", scores.refusal_by_lang)
        trial.set_user_attr("kl_by_lang", scores.kl_by_lang)
        if scores.over_refusal is not None and self.options.over_refusal_max is not None:
            trial.set_user_attr("over_refusal_by_lang", scores.over_refusal_by_lang)
            trial.set_user_attr("over_refusal_excess", scores.over_refusal - self.options.over_refusal_max)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
        study.tell(trial, [scores.refusal, scores.kl])
        log.info("trial %d: refusal %.3f, KL %.4f (direction layer %.2f; %.1f s)", trial.number, scores.refusal,
                 scores.kl, params.layer, time.perf_counter() - start)


def compute_directions(loaded: LoadedModel, settings: Settings) -> tuple[LayerDirections, PromptsRecord]:
    """The default selection (find_direction), then every layer's candidate at the chosen position.

    Also the record of the prompts the candidates came from, which the study keeps for provenance.
    """
    result = find_direction(settings, loaded)
    chosen = result.direction
    vectors = torch.stack([result.candidates.vector(chosen.pos, layer) for layer in range(loaded.n_layers)])
    directions = LayerDirections(vectors.float(), chosen.pos, chosen.layer, settings.lang, settings.method,
                                 settings.model)
    prompts = result.run_record(settings).prompts
    assert prompts is not None  # a search always records its prompts
    return directions, prompts


def search_space(directions: LayerDirections, settings: Settings, kernel: Kernel) -> SearchSpace:
    """Direction layers: from the first non-zero candidate (window kernel: from 40% of the depth, or the default
    layer if earlier) to the last eligible layer (and the default one)."""
    n_layers, default = int(directions.vectors.shape[0]), directions.default_layer
    nonzero = [layer for layer in range(n_layers) if float(directions.vectors[layer].norm()) > 0.0]
    if not nonzero:
        raise UsageError("every candidate direction is zero", hint="check the prompts: harmful and harmless differ?")
    layer_max = max(eligible_layers(n_layers, settings.prune_layers)[-1], default, nonzero[0])
    if kernel == "window":
        return SearchSpace.informed(n_layers, nonzero[0], default, layer_max)
    return SearchSpace(n_layers, min(nonzero[0], default), layer_max, kernel)


def run_search(settings: Settings, options: OptimizeOptions, stored: dict[str, Any] | None) -> int:
    """Load the model, create or resume the study, and run trials until it holds `options.trials`; new trials."""
    folder = options.study
    loaded = load(settings)
    trial_texts = [text for per_lang in trial_prompts(settings, options) for ts in per_lang.values() for text in ts]
    settings = resolve_batch_size(settings, loaded, trial_texts)
    if stored is None:
        directions, prompts = compute_directions(loaded, settings)
        space = search_space(directions, settings, options.kernel)
        directions.save(folder / DIRECTIONS_FILE)
        write_config_file(folder, requested_config(settings, options), space, directions, prompts)
    else:
        directions, space = LayerDirections.load(folder / DIRECTIONS_FILE), SearchSpace.from_json(stored["space"])
    study = open_study(folder, options.seed, options.startup_trials)
    prepare_study(study, directions.default_layer, space)
    remaining = options.trials - len(finished(study))
    if remaining <= 0:
        return 0
    judge = make_judge(settings.judge, device=settings.device, dtype=settings.dtype)
    editing = TrialEditing(options.trial_edit, settings.method == NORM_PRESERVING, options.over_refusal_max is not None)
    searcher = Searcher(loaded, directions, space, TrialSet.build(loaded, settings, options), judge, options,
                        fixed_batch_size(settings.batch_size), editing)
    for _ in progress.track(range(remaining), "optimize", remaining, "trial"):
        searcher.run_trial(study)
    return remaining


def trial_row(trial: optuna.trial.FrozenTrial, n_layers: int) -> TrialRow:
    params = TrialParams.from_params(trial.params)
    refusal, kl = trial.values
    over = trial.user_attrs.get("over_refusal_by_lang")
    return TrialRow(
        trial.number, float(refusal), float(kl), params.layer, params.attention.profile(n_layers),
        params.mlp.profile(n_layers), params.weights(n_layers).embedding, bool(trial.user_attrs.get("reference")),
        dict(trial.user_attrs.get("refusal_by_lang", {})), dict(trial.user_attrs.get("kl_by_lang", {})),
        dict(over) if over is not None else None, float(trial.user_attrs.get("over_refusal_excess", 0.0)) <= 0.0,
        params.per_layer,
    )


def pick_record(settings: Settings, options: OptimizeOptions, picked: dict[str, Any]) -> RunRecord:
    """Provenance of a picked trial: the study's prompts, the trial as the selection, the settings and seed."""
    stored = read_config_file(options.study) or {}
    prompts = stored.get("prompts")
    selection = {**picked, "file": f"abliterate/{OPTIMIZE_FILE}"}
    return RunRecord(
        prompts=PromptsRecord.model_validate(prompts) if prompts else PromptsRecord(source=settings.prompts,
                                                                                    lang=settings.lang),
        selection=selection,
        settings=settings.model_dump(mode="json"),
        seed=options.seed,
    )


def pick_trial(
    settings: Settings, options: OptimizeOptions, study: optuna.Study, directions: LayerDirections
) -> tuple[Path, TrialRow]:
    """Write trial `options.pick`'s edit to `options.out` (streaming, with provenance and optimize.json)."""
    assert options.pick is not None and options.out is not None
    done = {t.number: t for t in finished(study)}
    if options.pick not in done:
        raise UsageError(f"trial {options.pick} has not finished in study {options.study}",
                         hint=f"pick one of the finished trials listed in {options.study / 'pareto.md'}")
    trial = done[options.pick]
    params = TrialParams.from_params(trial.params)
    n_layers = int(directions.vectors.shape[0])
    direction = directions.direction(params, trial.number)
    row = trial_row(trial, n_layers)
    weights = params.weights(n_layers).to_dict()
    record = {"trial": row.to_json(), "params": trial.params, "weights": weights, "study": options.study.name}

    def optimize_json(tmp: Path) -> None:
        write_json(tmp / "abliterate" / OPTIMIZE_FILE, record)

    source = resolve(settings.model, revision=settings.revision, allow_pickle=settings.allow_pickle)
    write_edited(options.out, source, direction, OutputOptions.from_settings(settings),
                 run=pick_record(settings, options, record), extra=optimize_json, overwrite=options.overwrite,
                 allow_pickle=settings.allow_pickle)
    return Path(options.out).resolve(), row


@dataclass
class OptimizeResult:
    """What `run_optimize` did."""

    study: Path
    new_trials: int
    report: ParetoReport
    picked: Path | None = None
    picked_row: TrialRow | None = None


def _check_start(settings: Settings, options: OptimizeOptions) -> None:
    """Fail fast, before the study folder is created or any forward pass: the method, MODEL, --pick's --out."""
    if settings.method == NORM_PRESERVING and options.trial_edit == "hooks":
        raise UsageError("--trial-edit hooks cannot model --method norm-preserving (its rescaling changes weights)",
                         hint="use --trial-edit weights (or auto), which edits the loaded weights as the checkpoint")
    check_format(settings)
    source = resolve(settings.model, revision=settings.revision, allow_pickle=settings.allow_pickle)  # a bad MODEL
    if options.out is not None:
        check_output(options.out, overwrite=options.overwrite, sources=[source.folder])


def _stored_config(settings: Settings, options: OptimizeOptions) -> dict[str, Any] | None:
    """The study's settings, checked against this run's (only the model when nothing new is run)."""
    folder = options.study
    stored = read_config_file(folder)
    if stored is None:
        if options.trials == 0:
            raise UsageError(f"no study in {folder}", hint="run optimize with --trials N first, or pass its --study")
        return None
    requested = requested_config(settings, options)
    check_config(folder, stored, requested, list(requested) if options.trials > 0 else ["model", "revision"])
    return stored


def _needs_trials(options: OptimizeOptions, stored: dict[str, Any] | None) -> bool:
    if options.trials == 0:
        return False
    return stored is None or len(finished(open_study(options.study, options.seed))) < options.trials


def _report(settings: Settings, options: OptimizeOptions) -> tuple[optuna.Study, ParetoReport]:
    folder = options.study
    stored = read_config_file(folder)
    assert stored is not None
    study = open_study(folder, options.seed)
    n_layers = int(stored["space"]["n_layers"])
    meta = {"model": settings.model, "langs": stored["settings"]["langs"], "study": str(folder),
            "direction": stored["direction"], "space": stored["space"]}
    rows = [trial_row(t, n_layers) for t in finished(study)]
    return study, write_report(folder, rows, meta, plots=options.plots)


def run_optimize(settings: Settings, options: OptimizeOptions) -> OptimizeResult:
    """`abliterate optimize`: run or resume the study, write the Pareto front, and optionally pick a trial."""
    _check_start(settings, options)
    _optuna()
    with study_lock(options.study):
        stored = _stored_config(settings, options)
        new = run_search(settings, options, stored) if _needs_trials(options, stored) else 0
        study, report = _report(settings, options)
        result = OptimizeResult(options.study.resolve(), new, report)
        if options.pick is not None:
            directions = LayerDirections.load(options.study / DIRECTIONS_FILE)
            result.picked, result.picked_row = pick_trial(settings, options, study, directions)
    return result
