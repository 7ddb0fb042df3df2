"""One validated settings model shared by every command, by recipes (YAML) and by the CLI's options.

A recipe file holds the same keys as the options (with underscores); CLI flags override it. The CLI builds
its options from the field descriptions here, so help text, defaults and validation live in one place.
`Settings` holds what several commands share; a command's own options are a section (`CrosslingualSettings`,
`OptimizeSettings`) whose fields become flags and recipe keys the same way. Every field name is one option with
one default: no section repeats a Settings field.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from abliterate.errors import UsageError
from abliterate.prompts.languages import LANGUAGES, check_language, parse_languages
from abliterate.storage.shards import parse_size

log = logging.getLogger(__name__)


TrialEdit = Literal["hooks", "weights"]
"""How `optimize` trials apply their edit, once --trial-edit auto is resolved."""


class Settings(BaseModel):
    """Everything a run of abliterate can be told."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Hugging Face model id, local model folder, or .gguf file.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of MODEL.")
    lang: str = Field(
        "en", description="Language whose prompts define the direction (ar de en es fr it ja ko nl pl ru th zh yo)."
    )
    prompts: str = Field(
        "builtin",
        description="Prompt source: 'builtin', a .jsonl/.json/.csv/.txt file or folder, "
        "'hf:ORG/NAME?column=...&kind=...', or 'polyrefuse' (see docs/data.md).",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype for forward passes (auto: float32 on CPU, bfloat16 on GPU)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where forward passes run (auto: all GPUs via device_map=auto if any, else CPU)."
    )
    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="Load the model for forward passes with bitsandbytes (4bit: NF4; needs the quantize extra); "
        "the edit still streams the original full-precision shards, and the edited model is evaluated the same way.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model's own Python code to run (only if you trust it)."
    )
    allow_pickle: bool = Field(False, description="Allow pickle (.bin) checkpoints, which can run code when loaded.")
    chat_template: Path | None = Field(None, description="Jinja chat template file, for models that lack one.")
    arch: Path | None = Field(
        None,
        description="Registry entry (YAML) for a family abliterate does not ship, e.g. one written by "
        "`abliterate arch-propose MODEL > fam.yaml` (docs/architectures.md).",
    )
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        16,
        description="Prompts per forward pass, or auto: measured once after the model loads (on a GPU the largest "
        "batch of the longest prompts that fits in memory, up to 256; on the CPU the fastest per prompt).",
    )
    n_train: int = Field(128, ge=2, description="Harmful and harmless train prompts used for the mean activations.")
    n_val: int = Field(32, ge=1, description="Harmful and harmless validation prompts used to select the direction.")
    layer: int | None = Field(None, ge=0, description="Use the direction from this layer (skips the layer search).")
    pos: int | None = Field(
        None, le=-1, description="Use this post-instruction position, e.g. -1 (skips the position search)."
    )
    method: Literal["standard", "projected", "norm-preserving"] = Field(
        "projected",
        description="standard: raw difference in means (the paper); "
        "projected: also remove its component along the harmless mean; "
        "norm-preserving: the projected direction, and every edited weight vector keeps its norm (docs/method.md).",
    )
    winsorize: float = Field(
        1.0, gt=0, le=1, description="Clamp each prompt's activation vector to this quantile of its absolute "
        "entries before the means (for models with massive activations; Heretic's winsorization_quantile); 1: off.",
    )
    kl_threshold: float = Field(0.1, gt=0, description="Selection keeps candidates whose first-token KL is below this.")
    prune_layers: float = Field(0.2, ge=0, lt=1, description="Fraction of final layers never selected.")
    screen_prompts: int = Field(
        8, ge=1, description="Harmful and harmless validation prompts in the quick first pass over all candidates."
    )
    finalists: int = Field(12, ge=1, description="Candidates that get the full validation scores after screening.")
    filter_prompts: bool = Field(
        True, description="Keep only harmful prompts the model refuses and harmless ones it answers (by refusal score)."
    )
    refusal_tokens: list[str] | None = Field(
        None, description="Strings whose first tokens count as refusal openings (default: derived from --lang)."
    )
    max_shard_size: str = Field("5GB", description="Largest output shard, e.g. 5GB or 500MB.")
    format: Literal["safetensors", "gguf", "adapter"] = Field(
        "safetensors",
        description="Output: safetensors (a transformers checkpoint), gguf (OUT/NAME-abliterated.gguf from a .gguf "
        "MODEL: untouched tensors copied as they are, edited ones re-quantized), or adapter (a rank-1 PEFT LoRA "
        "adapter for MODEL); see docs/usage.md.",
    )
    gguf_edited_type: Literal["q8_0", "source", "f32", "f16", "bf16", "q5_1", "q5_0", "q4_1", "q4_0", "mxfp4"] = Field(
        "q8_0",
        description="--format gguf: the type of the edited tensors (source: the type they had; 4-bit types undo "
        "part of the edit, see docs/usage.md).",
    )
    compare: str | None = Field(
        None, description="chat: a second model (hub id, folder or .gguf; e.g. the unedited base) answering every "
        "turn, shown beside MODEL's answer.",
    )
    adapter_embedding: bool = Field(
        True,
        description="--format adapter: include the embedding's LoRA (off for servers that reject embed_tokens "
        "adapters; the embedding then stays unedited, see docs/usage.md).",
    )
    gguf_reproject: int = Field(
        0, ge=0, le=16,
        description="--format gguf: rounds of re-projecting the quantization error of each edited tensor "
        "(W <- W - r r^T Q(W), quantized again), for low-bit --gguf-edited-type.",
    )
    output_hash: Literal["xxh3_128", "sha256"] = Field(
        "xxh3_128",
        description="Hash of every output file in abliterate/provenance.json: xxh3_128 (fast; catches any "
        "accidental change) or sha256 (slower; also proof against deliberate tampering). `verify` checks with "
        "the recorded one; the source's files are always sha256.",
    )
    out: Path | None = Field(None, description="Output folder (or file, for `directions`).")
    overwrite: bool = Field(False, description="Replace an existing --out.")
    eval: bool = Field(True, description="Evaluate the base and edited model after the edit.")
    langs: str = Field(
        "all", description="Languages evaluated: all, or a comma-separated list such as en,de,fr (docs/evaluation.md)."
    )
    judge: str = Field("markers", description="Refusal judge: markers, or model:ORG/NAME (docs/judges.md).")
    harm_judge: str | None = Field(
        None,
        description="A second judge that says whether each answer is harmful (attack success): model:ORG/NAME, "
        "e.g. model:allenai/wildguard or model:meta-llama/Llama-Guard-3-8B (docs/judges.md).",
    )
    tasks: str = Field(
        "mmlu,arc_challenge,gsm8k,truthfulqa_mc2",
        description="lm-eval tasks, comma-separated; none skips; abliterate_mini_mc is a small offline task.",
    )
    limit: int | None = Field(None, ge=1, description="Examples per lm-eval task (default: all), for quick runs.")
    max_new_tokens: int = Field(
        128, ge=1, description="Greedy answer length cap in the refusal benchmark (eval, edit) and in chat."
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="What generates the refusal benchmark's answers: hf (transformers) or vllm (vLLM from the model "
        "folder, in a child process; needs the vllm extra and a CUDA GPU).",
    )
    eval_prompts: int | None = Field(
        None, ge=1, description="Harmful and harmless test prompts per language in the evaluation (default: all)."
    )
    plan: bool = Field(
        False, description="Print what the run will do and need (forward passes, answers, peak memory, disk, a time "
        "estimated from a short calibration on this machine) and exit without running it (docs/usage.md).",
    )
    preflight: bool = Field(
        True, description="Before the run, check that memory and disk will do (estimated as --plan does) and stop "
        "with the fix if not; --no-preflight runs anyway (when the estimate is wrong).",
    )

    @field_validator("lang")
    @classmethod
    def _known_language(cls, value: str) -> str:
        return check_language(value)

    @field_validator("langs")
    @classmethod
    def _known_languages(cls, value: str) -> str:
        if not parse_languages(value):
            raise UsageError("--langs names no language", hint=f"use all or some of: {' '.join(LANGUAGES)}")
        return value

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        """A whole number >= 1 (also as text, from a flag) or auto; anything else is one clear error."""
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
            raise UsageError(f"batch_size must be a whole number >= 1 or auto, got {value!r}",
                             hint="e.g. --batch-size 16, or --batch-size auto")
        return int(text)

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)
        return value

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


class Section(BaseModel):
    """A command's own options: its flags, recipe keys and --help come from these fields, as Settings' do."""

    model_config = ConfigDict(extra="forbid")

    command: ClassVar[str] = ""
    replaces: ClassVar[dict[str, str]] = {}
    """A Settings field this command does not use -> the field of this section that does that job here."""


class CrosslingualSettings(Section):
    """What `crosslingual` adds to the shared Settings (its --langs is Settings.langs)."""

    command = "crosslingual"
    replaces = {"max_new_tokens": "transfer_max_new_tokens"}

    source_lang: str | None = Field(
        None,
        description="Language whose normal selection picks the layer and position (default: the first of --langs).",
    )
    direction: Path | None = Field(
        None, description="Take the layer and position from this direction file (or edited model folder) instead."
    )
    transfer_prompts: int = Field(
        32, ge=1, description="Harmful test prompts per target language in the transfer matrix."
    )
    transfer_max_new_tokens: int = Field(64, ge=1, description="Greedy answer length cap in the transfer matrix.")
    transfer: bool = Field(True, description="Measure the transfer matrix (greedy generation: the slow part).")
    plots: bool = Field(True, description="Write the PNG plots.")

    @field_validator("source_lang")
    @classmethod
    def _known_source(cls, value: str | None) -> str | None:
        return None if value is None else check_language(value.strip().lower())


class OptimizeSettings(Section):
    """What `optimize` adds to the shared Settings (its --langs, --judge and --out are Settings fields)."""

    command = "optimize"
    replaces = {"max_new_tokens": "trial_max_new_tokens"}

    trials: int | None = Field(
        None, ge=0, description="Finished trials the study should hold; re-running the command continues the study "
        "up to this many (default: 50, or none with --pick).",
    )
    study: Path | None = Field(
        None, description="Study folder (SQLite study, cached directions, pareto.json/.md/.png); "
        "default: optimize-<model name>.",
    )
    pick: int | None = Field(
        None, ge=0, description="Write this finished trial's edit to --out (trial numbers: the first column of "
        "pareto.md).",
    )
    seed: int = Field(0, description="Seed of the TPE sampler.")
    startup_trials: int | None = Field(
        None, ge=1, description="Random trials before the multivariate TPE sampler models the results "
        "(default: 30% of --trials, Heretic's share).",
    )
    kernel: Literal["window", "gaussian"] = Field(
        "window", description="Weight kernel over depth per component: window (peak, linear to an edge weight, "
        "0 beyond; attention, MLP and embedding can each be off) or gaussian (a bump; studies made before "
        "the window).",
    )
    trial_edit: Literal["auto", "hooks", "weights"] = Field(
        "auto", description="How trials apply the edit: hooks on residual writes, or weights (the checkpoint's "
        "edit done in memory, exact for every method; keeps a copy of the edited matrices); auto: weights for "
        "--method norm-preserving, else hooks.",
    )
    over_refusal_max: float | None = Field(
        None, ge=0.0, le=1.0, description="Constraint: trials refusing more than this share of harmless val "
        "prompts are infeasible and left off the front (each trial then also answers the harmless prompts).",
    )
    trial_prompts: int = Field(
        32, ge=1, description="Harmful val prompts per language whose greedy answers give a trial's refusal rate "
        "(sized for a GPU; on a CPU, 8 is 4x faster but moves in steps of 1/8).",
    )
    kl_prompts: int = Field(32, ge=1, description="Harmless val prompts per language for a trial's first-token KL.")
    trial_max_new_tokens: int = Field(
        32, ge=1, description="Greedy answer length cap in the trials (short, for speed; eval uses --max-new-tokens)."
    )
    plots: bool = Field(True, description="Write pareto.png.")


class OrganismSettings(Section):
    """What `abliterate organism` is told: which named organism recipe, where to copy it, how many CPU threads.

    Not a recipe section: `organism` runs no user model and takes no `--recipe FILE`.
    """

    command = "organism"

    organism: Literal["english", "multilingual"] = Field(
        "english", description="Which organism recipe: english (the demo's) or multilingual (docs/organism.md)."
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads for the build (default: torch's setting); set it when other torch "
        "jobs share the cores, or the build slows several times over.",
    )
    force: bool = Field(False, description="Rebuild even if a cached organism exists.")
    out: Path | None = Field(None, description="Also copy the organism to this folder.")
    overwrite: bool = Field(False, description="Replace an existing --out.")


SECTIONS: tuple[type[Section], ...] = (CrosslingualSettings, OptimizeSettings)
"""The sections a YAML recipe may carry keys of."""
SectionT = TypeVar("SectionT", bound=Section)


def load_recipe(path: Path) -> dict[str, Any]:
    """Read a recipe YAML into a dict of settings (validated later, together with the CLI's flags)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"cannot read recipe {path}: {err.strerror}", hint="check the path") from None
    except yaml.YAMLError as err:
        raise UsageError(f"recipe {path} is not valid YAML: {err}", hint="fix the file") from None
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must be a mapping of settings", hint="see recipes/ for examples")
    settings = data.get("settings", data)
    if not isinstance(settings, dict):
        raise UsageError(f"recipe {path}: 'settings' must be a mapping", hint="see recipes/ for examples")
    return {str(k).replace("-", "_"): v for k, v in settings.items()}


def _usage_error(err: ValidationError) -> UsageError:
    """The first validation error as one line with a hint."""
    first = err.errors()[0]
    if first["type"] == "missing" and first["loc"] == ("model",):
        return UsageError("no model given", hint="pass MODEL (hub id, folder or .gguf) or a --recipe with model:")
    where = ".".join(str(p) for p in first["loc"]) or "settings"
    if isinstance(first.get("ctx", {}).get("error"), UsageError):
        error: UsageError = first["ctx"]["error"]
        return error
    return UsageError(f"invalid value for {where}: {first['msg']}", hint="see `abliterate COMMAND --help`")


def _recipe_values(recipe: Path | None) -> dict[str, Any]:
    """A recipe's settings; a key that is neither a Settings field nor a section's field fails in one line."""
    if recipe is None:
        return {}
    values = load_recipe(recipe)
    known = set(Settings.model_fields) | {name for section in SECTIONS for name in section.model_fields}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"recipe {recipe}: unknown setting {unknown[0]!r}",
                         hint="a recipe key is an option's name with underscores (see `abliterate COMMAND --help`)")
    return values


def _validated(values: dict[str, Any]) -> Settings:
    try:
        return Settings.model_validate(values)
    except ValidationError as err:
        raise _usage_error(err) from None


def build_settings(recipe: Path | None, overrides: dict[str, Any]) -> Settings:
    """Recipe values, then CLI flags that were given; validation errors become one-line UsageErrors.

    A recipe's section keys (another command's options) are left to that command.
    """
    section_keys = {name for section in SECTIONS for name in section.model_fields}
    values = {k: v for k, v in _recipe_values(recipe).items() if k not in section_keys}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return _validated(values)


def build_section(section: type[SectionT], values: dict[str, Any]) -> SectionT:
    """A command's section from its values (None: not given); errors become one-line UsageErrors."""
    try:
        return section.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as err:
        raise _usage_error(err) from None


def _check_replaced(section: type[Section], recipe: Path | None, values: dict[str, Any], given: dict[str, Any]) -> None:
    """Say so when a recipe key does not reach this command (a section field does that job here), never silently.

    Shipped recipes carry the evaluation's `max_new_tokens`; `optimize` and `crosslingual` cap their answers with
    their own field, which the recipe or a flag may set. A warning, not an error: the recipe stays usable as is.
    """
    for key, instead in section.replaces.items():
        if key in values and instead not in values and given.get(instead) is None:
            default = section.model_fields[instead].default
            log.warning("recipe %s sets %s=%s, which %s does not use: its answers are capped by %s (%s; set it in "
                        "the recipe or pass --%s)", recipe, key, values[key], section.command, instead, default,
                        instead.replace("_", "-"))


def build_command_settings(
    recipe: Path | None, overrides: dict[str, Any], section: type[SectionT]
) -> tuple[Settings, SectionT]:
    """Settings and one command's section from a recipe and the flags given (flags win), both validated."""
    values = _recipe_values(recipe)
    _check_replaced(section, recipe, values, overrides)
    own = set(section.model_fields)
    given = {k: v for k, v in overrides.items() if v is not None}
    shared = {k: v for k, v in {**values, **given}.items() if k in Settings.model_fields}
    settings = _validated(shared)
    return settings, build_section(section, {k: v for k, v in {**values, **given}.items() if k in own})
