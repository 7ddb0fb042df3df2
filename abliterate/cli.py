"""The `abliterate` command line: one click group, options built from the Settings model and its sections.

A settings option's flag, help and default come from its pydantic field; `--help` shows the default, and a value
left at its default does not override a --recipe (click tells which values were given).

Only this module prints, shows progress bars and turns errors into one-line messages (a traceback only
with -v).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args

import click
from click.core import ParameterSource
from pydantic import BaseModel

from abliterate import __version__, progress
from abliterate.errors import AbliterateError
from abliterate.model.archs import register_file
from abliterate.settings import (
    CrosslingualSettings,
    OptimizeSettings,
    OrganismSettings,
    Section,
    SectionT,
    Settings,
    build_command_settings,
    build_section,
    build_settings,
)

if TYPE_CHECKING:
    from abliterate.evaluation.report_record import ReportRecord
    from abliterate.evaluation.results import ResultsRecord
    from abliterate.planning.plan import Command

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("abliterate")

# Options shared by commands that run forward passes.
MODEL_OPTIONS = ["revision", "dtype", "device", "quantize", "trust_remote_code", "allow_pickle", "chat_template",
                 "batch_size", "arch"]
DIRECTION_OPTIONS = [
    "lang",
    "prompts",
    "n_train",
    "n_val",
    "layer",
    "pos",
    "method",
    "winsorize",
    "kl_threshold",
    "prune_layers",
    "screen_prompts",
    "finalists",
    "filter_prompts",
    "refusal_tokens",
]
# Options of the written output (`edit`, `apply`, `optimize --pick`).
FORMAT_OPTIONS = ["format", "gguf_edited_type", "gguf_reproject", "adapter_embedding", "output_hash"]
# The cost before the run (`edit`, `eval`, `optimize`, `apply`): --plan, and the pre-flight check.
PLAN_OPTIONS = ["plan", "preflight"]
# Options of the evaluation (`eval`, and `edit` unless --no-eval).
EVAL_OPTIONS = ["langs", "judge", "harm_judge", "tasks", "limit", "max_new_tokens", "engine"]


def _option_for(name: str, model: type[BaseModel] = Settings) -> Callable[[F], F]:
    """A click option for one field of Settings (or of a section), with the field's help text and default."""
    field = model.model_fields[name]
    flag = "--" + name.replace("_", "-")
    help_text = field.description or ""
    annotation = field.annotation
    default = field.get_default()
    if annotation is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=default, help=help_text)
    if name == "refusal_tokens":
        return click.option(flag, name, multiple=True, default=None, help=help_text + " Repeatable.")
    if name == "batch_size":  # a number or auto, checked by Settings
        return click.option(flag, name, type=str, metavar="N|auto", default=default, help=help_text)
    choices = [a for a in get_args(annotation) if isinstance(a, str)]
    if choices:
        return click.option(flag, name, type=click.Choice(choices), default=default, help=help_text)
    types: dict[str, Any] = {"int": int, "float": float}
    base = next((t for t in get_args(annotation) if t is not type(None)), annotation)
    click_type = types.get(getattr(base, "__name__", ""), str)
    if base is Path:
        click_type = click.Path(path_type=Path)
    return click.option(flag, name, type=click_type, default=default, help=help_text)


def settings_options(*names: str, model: type[BaseModel] = Settings) -> Callable[[F], F]:
    """Click options for these fields of Settings (or of a section), in this order in --help."""
    def decorate(func: F) -> F:
        for name in reversed(names):
            func = _option_for(name, model)(func)
        return func

    return decorate


def section_options(section: type[Section]) -> Callable[[F], F]:
    """Click options for every field of a command's section."""
    return settings_options(*section.model_fields, model=section)


recipe_option = click.option(
    "--recipe", type=click.Path(path_type=Path), default=None, help="YAML recipe with settings; flags override it."
)


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """The values the user gave: an option left at its default is dropped, so that a --recipe value stands."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        values = {k: v for k, v in values.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    if values.get("refusal_tokens") == ():
        values["refusal_tokens"] = None
    return values


def _settings(recipe: Path | None, **given: Any) -> Settings:
    settings = build_settings(recipe, _given(given))
    if settings.arch is not None:
        register_file(settings.arch)
    return settings


def _command_settings(recipe: Path | None, section: type[SectionT], **given: Any) -> tuple[Settings, SectionT]:
    """Settings and the command's section from --recipe and the flags given."""
    settings, values = build_command_settings(recipe, _given(given), section)
    if settings.arch is not None:
        register_file(settings.arch)
    return settings, values


def _planned(settings: Settings, command: Command, **request: Any) -> bool:
    """--plan: print what the run will do and need and return True (nothing runs); else the pre-flight check
    (refuses a run that memory or disk will not hold; --no-preflight skips it) and False."""
    from abliterate.planning.plan import Request, plan_run, preflight

    run = Request(command, settings, **request)
    if settings.plan:
        for line in plan_run(run).lines():
            click.echo(line)
        return True
    if settings.preflight:
        preflight(run)
    return False


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    noisy_libraries = ("transformers", "huggingface_hub", "urllib3", "filelock", "httpx", "lm_eval", "datasets",
                       "optuna", "alembic", "bitsandbytes", "gguf", "peft")
    for noisy in (*noisy_libraries, "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR if verbose < 2 else logging.INFO)
    # Python warnings of the libraries (FutureWarning, DeprecationWarning, ...) become log records of
    # `py.warnings`: shown with -vv only. abliterate's own code logs instead of warning.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR if verbose < 2 else logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        if verbose < 2:
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        else:
            hf_logging.set_verbosity_info()
    except ImportError:
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="abliterate")
@click.option("-v", "--verbose", count=True, help="More logging; -v also shows tracebacks, -vv library logs.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Find a chat model's refusal direction and project it out of the weights."""
    ctx.obj = {"verbose": verbose}
    _setup_logging(verbose, quiet)
    progress.enable(sys.stderr.isatty() and not quiet)


@cli.command()
@click.argument("model", required=False)
@recipe_option
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder for the edited checkpoint.")
@settings_options("overwrite", "eval")
@click.option("--push-to", metavar="ORG/NAME", default=None, help="Upload the result to this hub repo (private).")
@click.option("--public", is_flag=True, help="With --push-to: make a new hub repo public instead of private.")
@settings_options("max_shard_size", *FORMAT_OPTIONS, *DIRECTION_OPTIONS, *EVAL_OPTIONS, "eval_prompts", *MODEL_OPTIONS,
                  *PLAN_OPTIONS)
def edit(model: str | None, recipe: Path | None, push_to: str | None, public: bool, **given: Any) -> None:
    """Compute the refusal direction of MODEL and write an orthogonalized checkpoint to --out.

    MODEL is a hub id, a local folder or a .gguf file; it may also come from --recipe.
    """
    from abliterate.commands.edit import run_edit

    settings = _settings(recipe, model=model, **given)
    _check_push_options(push_to, public)
    if _planned(settings, "edit", out=settings.out):
        return
    result = run_edit(settings)
    chosen = result.direction.direction
    click.echo(f"direction: layer {chosen.layer}, position {chosen.pos} ({settings.lang}, {settings.method})")
    if result.direction.chosen is not None:
        c = result.direction.chosen
        click.echo(f"validation: refusal score {c.refusal:.2f}, induce score {c.induce:.2f}, first-token KL {c.kl:.4f}")
    click.echo(f"edited {result.edited_tensors} tensors -> {result.out}")
    if result.report is not None:
        _echo_report(result.report, result.out / "abliterate")
    if push_to is not None:
        _push(result.out, push_to, public=public)


@cli.command()
@click.argument("model", required=False)
@recipe_option
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Direction file to write (.safetensors).")
@settings_options("overwrite", *DIRECTION_OPTIONS, *MODEL_OPTIONS)
def directions(model: str | None, recipe: Path | None, **given: Any) -> None:
    """Compute candidate directions for MODEL, select one, and save it (no weights are written)."""
    from abliterate.commands.edit import run_directions

    settings = _settings(recipe, model=model, **given)
    result = run_directions(settings)
    d = result.direction
    click.echo(f"direction: layer {d.layer}, position {d.pos}; {len(result.scores)} candidates scored")


@cli.command()
@click.argument("model")
@click.option(
    "--direction",
    "direction_file",
    type=click.Path(path_type=Path),
    required=True,
    help="Direction file (direction.safetensors, or an edited model folder holding one).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@settings_options("max_shard_size", *FORMAT_OPTIONS, "revision", "allow_pickle", "arch", *PLAN_OPTIONS)
def apply(model: str, direction_file: Path, out: Path, overwrite: bool, **given: Any) -> None:
    """Orthogonalize MODEL's weights against a saved direction (streaming; no GPU, no forward pass)."""
    from abliterate.direction.vector import Direction
    from abliterate.edit.formats import OutputOptions, check_format
    from abliterate.model.loading import resolve
    from abliterate.publish.write_edited import write_edited

    settings = _settings(None, model=model, out=out, overwrite=overwrite, **given)
    check_format(settings)
    if _planned(settings, "apply", out=out):
        return
    direction = Direction.load(direction_file)
    source = resolve(model, revision=settings.revision, allow_pickle=settings.allow_pickle)
    written = write_edited(out, source, direction, OutputOptions.from_settings(settings), overwrite=overwrite,
                           allow_pickle=settings.allow_pickle)
    click.echo(f"edited {len(written.plan.edits)} tensors ({written.plan.arch.name}) -> {out}")
    if written.summary:
        click.echo(written.summary)


@cli.command("arch-propose")
@click.argument("model")
@settings_options("revision", "trust_remote_code", "allow_pickle")
def arch_propose_command(model: str, **given: Any) -> None:
    """Propose a registry entry (YAML, on stdout) for MODEL's family, found by hooks on the loaded model.

    Check it, save it (`abliterate arch-propose MODEL > fam.yaml`) and pass --arch fam.yaml to the other commands.
    """
    from abliterate.model.checkpoint import read_config
    from abliterate.model.loading import resolve
    from abliterate.model.propose import propose_for

    settings = _settings(None, model=model, **given)
    source = resolve(model, revision=settings.revision, allow_pickle=settings.allow_pickle)
    model_type = str(read_config(source.folder)["model_type"])
    proposal = propose_for(source.folder, model_type, trust_remote_code=settings.trust_remote_code)
    click.echo(proposal.to_yaml(model), nl=False)


@cli.command("chat")
@click.argument("model", required=False)
@recipe_option
@settings_options("compare", "max_new_tokens", "chat_template", "revision", "dtype", "device", "quantize",
                  "trust_remote_code", "allow_pickle")
def chat_command(model: str | None, recipe: Path | None, **given: Any) -> None:
    """Chat with MODEL in the terminal: its chat template, greedy answers streamed as they are generated.

    With --compare BASE both models answer every turn (streamed to stderr) and stdout shows the two answers side
    by side. Lines are read from stdin: /reset starts a new conversation, /quit or Ctrl-D ends.
    """
    import shutil

    from abliterate.commands.repl import QUIT, RESET, ChatModel, side_by_side

    settings = _settings(recipe, model=model, **given)
    models = [ChatModel.from_settings(spec, settings) for spec in (settings.model, settings.compare) if spec]
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"chatting with {' and '.join(m.name for m in models)}; {RESET} starts over, {QUIT[0]} ends")
    while True:
        if interactive:
            click.echo("you> ", nl=False)
        line = sys.stdin.readline()
        text = line.strip()
        if not line or text in QUIT:
            break
        if text == RESET:
            for chat in models:
                chat.reset()
            click.echo("(new conversation)")
        elif text and len(models) == 1:
            for piece in models[0].stream(text, settings.max_new_tokens):
                click.echo(piece, nl=False)
            click.echo()
        elif text:
            answers = []
            for chat in models:
                click.echo(f"[{chat.name}] ", nl=False, err=True)
                pieces = []
                for piece in chat.stream(text, settings.max_new_tokens):
                    pieces.append(piece)
                    click.echo(piece, nl=False, err=True)
                click.echo(err=True)
                answers.append((chat.name, "".join(pieces)))
            width = shutil.get_terminal_size((100, 24)).columns
            for row in side_by_side(answers[0], answers[1], width):
                click.echo(row)


@cli.command("prompts")
@settings_options("lang", "prompts")
@click.option("--samples", default=3, show_default=True, help="Sample lines to show per kind.")
def prompts_command(lang: str, prompts: str, samples: int) -> None:
    """Show the prompt counts per kind and split for a language, with a few samples."""
    from abliterate.prompts import sources
    from abliterate.prompts.languages import check_language

    click.echo(sources.describe(sources.load(prompts, default_lang=check_language(lang)), lang, samples))


def _check_push_options(push_to: str | None, public: bool) -> None:
    """Before a long edit: a valid repo id and a token (no network)."""
    if push_to is None:
        if public:
            raise click.UsageError("--public only applies with --push-to")
        return
    from abliterate.publish.hub import check_ready

    check_ready(push_to)


def _push(folder: Path, repo_id: str, *, public: bool, revision: str | None = None, message: str | None = None) -> None:
    from abliterate.publish.hub import plan_upload, push

    plan = plan_upload(folder, repo_id, public=public, revision=revision)
    url = push(plan, message=message)
    click.echo(f"pushed {len(plan.files)} files to {url} ({'private' if plan.private else 'public'})")


@cli.command("push")
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("repo_id", metavar="ORG/NAME")
@click.option("--public", is_flag=True, help="Create the repo public (default: private).")
@click.option("--dry-run", is_flag=True, help="Only list what would be uploaded; contacts nothing.")
@click.option("--revision", metavar="BRANCH", default=None, help="Upload to this branch (created if missing).")
@click.option("--message", metavar="MSG", default=None, help="Commit message.")
def push_command(
    folder: Path, repo_id: str, public: bool, dry_run: bool, revision: str | None, message: str | None
) -> None:
    """Upload an edited checkpoint DIR to the hub repo ORG/NAME, with a model card and provenance.

    The token comes from HF_TOKEN or `hf auth login`; it needs write access.
    """
    if not dry_run:
        _push(folder, repo_id, public=public, revision=revision, message=message)
        return
    from abliterate.publish.hub import plan_upload

    plan = plan_upload(folder, repo_id, public=public, revision=revision)
    click.echo("dry run: nothing is uploaded and the hub is not contacted")
    for line in plan.describe():
        click.echo(line)


@cli.command("verify")
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path, exists=True, file_okay=False))
def verify_command(folder: Path) -> None:
    """Re-check DIR against abliterate/provenance.json: file hashes and orthogonality of every edited tensor."""
    from abliterate.publish.verify import verify

    click.echo(verify(folder).summary())


def _num(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`; "–" (as wide) when it is unknown."""
    return format(value, spec) if value is not None else "–".rjust(len(format(0.0, spec)))


def _echo_results(results: ResultsRecord) -> None:
    for lang, row in results.languages.items():
        harm = "" if row.attack_success is None else f", attack success {row.attack_success:.2f}"
        click.echo(
            f"{lang}: compliance {_num(row.compliance, '.2f')} (n={row.harmful.n}), "
            f"over-refusal {_num(row.over_refusal, '.2f')} (n={row.harmless.n}), "
            f"evasion {row.evasion or 0.0:.2f}{harm}"
        )
    kl = results.kl
    if kl:
        click.echo(
            f"KL vs base ({kl.n_prompts} harmless prompts): first token {_num(kl.first_token, '.4g')}, "
            f"first {kl.tokens} tokens {_num(kl.first_n_tokens, '.4g')}"
        )
    from abliterate.evaluation.capability import metrics

    for task, metric, value, _stderr in metrics(results.lm_eval):
        click.echo(f"{task} {metric}: {value:.3f}")


def _echo_report(report: ReportRecord, folder: Path) -> None:
    s = report.summary
    click.echo(
        f"compliance {_num(s.compliance_before, '.2f')} -> {_num(s.compliance_after, '.2f')}, "
        f"over-refusal {_num(s.over_refusal_before, '.2f')} -> {_num(s.over_refusal_after, '.2f')}, "
        f"evasion {s.evasion_before or 0.0:.2f} -> {s.evasion_after or 0.0:.2f} "
        f"(mean of {len(report.languages)} languages)"
    )
    if s.attack_success_after is not None:
        click.echo(f"attack success {_num(s.attack_success_before, '.2f').strip()} -> {s.attack_success_after:.2f}")
    if s.kl_first_token is not None:
        click.echo(f"KL vs base: first token {s.kl_first_token:.4g}, first tokens {_num(s.kl_first_n_tokens, '.4g')}")
    for row in report.capability:
        if row.delta is not None:
            click.echo(f"{row.task} {row.metric}: {_num(row.before, '.3f')} -> {_num(row.after, '.3f')}")
    click.echo(f"report: {folder / 'report.html'}")


@cli.command("eval")
@click.argument("model", required=False)
@recipe_option
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Results file to write (JSON).")
@click.option("--base", metavar="BASE", default=None, help="Base model (hub id or folder) for the KL damage measure.")
@click.option(
    "--n-prompts", "--eval-prompts", "eval_prompts", type=int, default=None,
    help="Harmful and harmless test prompts per language (default: all).",
)
@click.option("--kl-tokens", type=click.IntRange(1), default=16, show_default=True,
              help="Answer tokens the mean KL is taken over (with --base).")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Reuse greedy answers cached by an earlier run of the same model, prompts and settings.")
@settings_options(*EVAL_OPTIONS, "prompts", *MODEL_OPTIONS, *PLAN_OPTIONS)
def eval_command(
    model: str | None, recipe: Path | None, out: Path, base: str | None, kl_tokens: int, cache: bool, **given: Any
) -> None:
    """Evaluate MODEL: refusal per language, over-refusal, damage against --base, lm-eval capability.

    Writes a results JSON (schema in docs/evaluation.md) with every prompt's answer and verdict.
    """
    from abliterate.evaluation.evaluate import run_eval

    settings = _settings(recipe, model=model, out=out, **given)
    if _planned(settings, "eval", base=base):
        return
    results = run_eval(settings, base, kl_tokens=kl_tokens, cache=cache)
    _echo_results(results)
    click.echo(f"results -> {out}")


@cli.command("report")
@click.argument("before", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.argument("after", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Folder for the report.")
def report_command(before: Path, after: Path, out: Path) -> None:
    """Build report.md, report.html, report.json and plots from two `eval` results files (BEFORE, AFTER)."""
    from abliterate.evaluation.report import write_report
    from abliterate.evaluation.results import read_results

    report = write_report(out, read_results(before), read_results(after))
    _echo_report(report, out)


CROSSLINGUAL_OPTIONS = ["prompts", "n_train", "n_val", "layer", "pos", "method", "winsorize", "kl_threshold",
                        "prune_layers", "screen_prompts", "finalists", "filter_prompts"]


@cli.command("crosslingual")
@click.argument("model", required=False)
@recipe_option
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder: crosslingual.json, transfer_answers.jsonl and PNG plots.")
@settings_options("overwrite", "langs")
@section_options(CrosslingualSettings)
@settings_options(*CROSSLINGUAL_OPTIONS, *MODEL_OPTIONS)
def crosslingual_command(model: str | None, recipe: Path | None, **given: Any) -> None:
    """Compare MODEL's refusal directions across languages (PolyRefuse style); see docs/crosslingual.md.

    Per language: the difference-in-means direction at one layer and position; their cosine similarities, per-layer
    cosines, a PCA of the activations, and a transfer matrix (compliance in each target language with each source
    language's direction ablated, plus an unablated baseline row).
    """
    from abliterate.commands.crosslingual import BASELINE, CrosslingualOptions, run_crosslingual

    settings, section = _command_settings(recipe, CrosslingualSettings, model=model, **given)
    options = CrosslingualOptions.from_section(settings.langs, section)
    result = run_crosslingual(settings.model_copy(update={"lang": options.source_lang}), options)
    r = result.report
    click.echo(f"layer {r.layer}, position {r.pos} ({r.chosen_by})")
    click.echo("cosine similarity of the directions:")
    click.echo("      " + "".join(f"{lang:>7}" for lang in r.languages))
    for lang, row in zip(r.languages, r.cosine.matrix, strict=True):
        click.echo(f"{lang:>6}" + "".join(_num(v, "7.3f") for v in row))
    if r.transfer is not None:
        t = r.transfer
        click.echo(f"compliance on harmful test prompts (n={t.n_prompts} per cell), rows: direction ablated")
        click.echo("      " + "".join(f"{lang:>7}" for lang in t.columns))
        for source, cells in zip(t.rows, t.compliance, strict=True):
            label = "base" if source == BASELINE else source
            click.echo(f"{label:>6}" + "".join(f"{v:7.2f}" for v in cells))
        if t.verdict is not None:
            click.echo(f"transfer: {t.verdict.summary}")
    click.echo(f"results -> {result.out}")


OPTIMIZE_OPTIONS = ["langs", "judge", "lang", "prompts", "n_train", "n_val", "layer", "pos", "method", "winsorize",
                    "kl_threshold", "prune_layers", "screen_prompts", "finalists", "filter_prompts", "refusal_tokens",
                    "max_shard_size", *FORMAT_OPTIONS]


@cli.command("optimize")
@click.argument("model", required=False)
@recipe_option
@section_options(OptimizeSettings)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder for --pick's checkpoint.")
@settings_options("overwrite", *OPTIMIZE_OPTIONS, *MODEL_OPTIONS, *PLAN_OPTIONS)
def optimize_command(model: str | None, recipe: Path | None, **given: Any) -> None:
    """Search per-layer ablation weights and the direction's layer for MODEL (Optuna, two objectives).

    Objectives, both minimised: mean refusal rate over --langs and mean first-token KL on harmless prompts.
    Prints and writes the Pareto front, with the paper's default edit (trial 0) as the reference; --pick N
    --out DIR writes trial N's checkpoint. See docs/optimize.md.
    """
    from abliterate.commands.optimize.pareto import table_lines, verdict_line
    from abliterate.commands.optimize.study import DEFAULT_TRIALS, OptimizeOptions, run_optimize

    settings, section = _command_settings(recipe, OptimizeSettings, model=model, **given)
    trials = section.trials if section.trials is not None else 0 if section.pick is not None else DEFAULT_TRIALS
    if _planned(settings, "optimize", section=section, trials=trials,
                out=settings.out if section.pick is not None else None):
        return
    result = run_optimize(settings, OptimizeOptions.from_section(settings, section))
    report = result.report
    click.echo(f"study {result.study}: {len(report.rows)} finished trials ({result.new_trials} run now)")
    for line in table_lines(report.front, report.reference):
        click.echo(line)
    click.echo(verdict_line(report))
    click.echo("front -> " + ", ".join(str(path) for path in report.files))
    if result.picked is not None and result.picked_row is not None:
        row = result.picked_row
        click.echo(f"trial {row.number} (refusal {row.refusal:.3f}, KL {row.kl:.4f}) -> {result.picked}")


@cli.command("organism")
@section_options(OrganismSettings)
def organism_command(**given: Any) -> None:
    """Build (or reuse) the model organism: SmolLM2-135M-Instruct safety-tuned to refuse (docs/organism.md)."""
    from abliterate.commands.organism.train import build_organism, copy_organism, named_recipe, read_info

    options = build_section(OrganismSettings, given)
    folder = build_organism(force=options.force, recipe=named_recipe(options.organism), threads=options.threads)
    if options.out is not None:
        folder = copy_organism(folder, options.out, overwrite=options.overwrite)
    click.echo(f"organism ({options.organism}): {folder}")
    heldout = read_info(folder).get("heldout_val_refusal")
    if heldout:
        click.echo(f"held-out refusal rates: {json.dumps(heldout)}")


@cli.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("abliterate-demo"), show_default=True,
              help="Folder for organism/ (the safety-tuned base) and edited/ (the abliterated model and report).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def demo_command(out: Path, overwrite: bool) -> None:
    """Build the multilingual model organism, abliterate it with a direction from German prompts (edit --lang de)
    and measure refusal before and after in English, German, French, Chinese and Italian."""
    from abliterate.commands.organism.demo import run_demo

    result = run_demo(out, overwrite=overwrite)
    click.echo(f"organism (safety-tuned base): {result.organism}")
    click.echo(f"abliterated checkpoint:       {result.edited}")
    click.echo(f"report:                       {result.report} (and report.html)")
    click.echo(f"direction: layer {result.layer}, position {result.pos}")
    for lang, rates in result.harmful.items():
        evasive = result.evasive[lang]
        click.echo(f"harmful refused [{lang}]: {rates.before:.2f} -> {rates.after:.2f} "
                   f"(evasive {evasive.before:.2f} -> {evasive.after:.2f}, n={rates.n})")
    for lang, rates in result.harmless.items():
        click.echo(f"harmless refused [{lang}]: {rates.before:.2f} -> {rates.after:.2f} (n={rates.n})")
    click.echo(f"first-token KL on harmless prompts: {result.kl_mean:.3f} (n={result.kl_prompts})")
    click.echo(f"total time: {result.seconds.get('total', 0):.0f} s (summary: {result.out / 'demo.md'})")


def main() -> None:
    """Console entry point: run the group, turning library errors into one-line messages."""
    verbose = any(a in ("-v", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in sys.argv[1:])
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except AbliterateError as err:
        if verbose:
            raise
        click.echo(f"error: {err.one_line()}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
