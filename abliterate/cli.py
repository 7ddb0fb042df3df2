"""The `abliterate` command line: one click group, options built from the shared Settings model.

Only this module prints, shows progress bars and turns errors into one-line messages (a traceback only
with -v).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args

import click

from abliterate import __version__, progress
from abliterate.errors import AbliterateError
from abliterate.model.archs import register_file
from abliterate.settings import Settings, build_settings

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
    "kl_threshold",
    "prune_layers",
    "screen_prompts",
    "finalists",
    "filter_prompts",
    "refusal_tokens",
]
# Options of the written output (`edit`, `apply`, `optimize --pick`).
FORMAT_OPTIONS = ["format", "gguf_edited_type", "gguf_reproject", "adapter_embedding"]
# Options of the evaluation (`eval`, and `edit` unless --no-eval).
EVAL_OPTIONS = ["langs", "judge", "harm_judge", "tasks", "limit", "max_new_tokens", "engine"]


def _option_for(name: str) -> Callable[[F], F]:
    """A click option for one Settings field, with its help text; default None = 'not given'."""
    field = Settings.model_fields[name]
    flag = "--" + name.replace("_", "-")
    help_text = field.description or ""
    annotation = field.annotation
    if annotation is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    if name == "refusal_tokens":
        return click.option(flag, name, multiple=True, default=None, help=help_text + " Repeatable.")
    if name == "batch_size":  # a number or auto, checked by Settings
        return click.option(flag, name, metavar="N|auto", default=None, help=help_text)
    choices = [a for a in get_args(annotation) if isinstance(a, str)]
    if choices:
        return click.option(flag, name, type=click.Choice(choices), default=None, help=help_text)
    types: dict[str, Any] = {"int": int, "float": float}
    base = next((t for t in get_args(annotation) if t is not type(None)), annotation)
    click_type = types.get(getattr(base, "__name__", ""), str)
    if base is Path:
        click_type = click.Path(path_type=Path)
    return click.option(flag, name, type=click_type, default=None, help=help_text)


def settings_options(*names: str) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        for name in reversed(names):
            func = _option_for(name)(func)
        return func

    return decorate


recipe_option = click.option(
    "--recipe", type=click.Path(path_type=Path), default=None, help="YAML recipe with settings; flags override it."
)


def _settings(recipe: Path | None, **given: Any) -> Settings:
    if given.get("refusal_tokens") == ():
        given["refusal_tokens"] = None
    settings = build_settings(recipe, given)
    if settings.arch is not None:
        register_file(settings.arch)
    return settings


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--overwrite/--no-overwrite", default=None, help="Replace an existing --out.")
@click.option("--eval/--no-eval", "eval_", default=None, help="Evaluate the base and edited model (default on).")
@click.option("--push-to", metavar="ORG/NAME", default=None, help="Upload the result to this hub repo (private).")
@click.option("--public", is_flag=True, help="With --push-to: make a new hub repo public instead of private.")
@settings_options("max_shard_size", *FORMAT_OPTIONS, *DIRECTION_OPTIONS, *EVAL_OPTIONS, "eval_prompts", *MODEL_OPTIONS)
def edit(
    model: str | None, recipe: Path | None, eval_: bool | None, push_to: str | None, public: bool, **given: Any
) -> None:
    """Compute the refusal direction of MODEL and write an orthogonalized checkpoint to --out.

    MODEL is a hub id, a local folder or a .gguf file; it may also come from --recipe.
    """
    from abliterate.commands.edit import run_edit

    settings = _settings(recipe, model=model, eval=eval_, **given)
    _check_push_options(push_to, public)
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
@click.option("--overwrite/--no-overwrite", default=None, help="Replace an existing --out.")
@settings_options(*DIRECTION_OPTIONS, *MODEL_OPTIONS)
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
@settings_options("max_shard_size", *FORMAT_OPTIONS, "revision", "allow_pickle", "arch")
def apply(model: str, direction_file: Path, out: Path, overwrite: bool, **given: Any) -> None:
    """Orthogonalize MODEL's weights against a saved direction (streaming; no GPU, no forward pass)."""
    from abliterate.direction.vector import Direction
    from abliterate.edit.formats import OutputOptions, check_format
    from abliterate.model.loading import resolve
    from abliterate.publish.write_edited import write_edited

    settings = _settings(None, model=model, out=out, overwrite=overwrite, **given)
    check_format(settings)
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
@click.option(
    "--lang", default="en", show_default=True, help="Language code (ar de en es fr it ja ko nl pl ru th zh yo)."
)
@click.option(
    "--prompts",
    "source",
    default="builtin",
    show_default=True,
    help="Prompt source: 'builtin' or a .jsonl/.json/.csv/.txt file or folder.",
)
@click.option("--samples", default=3, show_default=True, help="Sample lines to show per kind.")
def prompts_command(lang: str, source: str, samples: int) -> None:
    """Show the prompt counts per kind and split for a language, with a few samples."""
    from abliterate.prompts import sources
    from abliterate.prompts.languages import check_language

    click.echo(sources.describe(sources.load(source, default_lang=check_language(lang)), lang, samples))


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


def _echo_results(results: dict[str, Any]) -> None:
    for lang, row in results["languages"].items():
        harm = "" if row.get("attack_success") is None else f", attack success {row['attack_success']:.2f}"
        click.echo(
            f"{lang}: compliance {row['compliance']:.2f} (n={row['harmful']['n']}), "
            f"over-refusal {row['over_refusal']:.2f} (n={row['harmless']['n']}), "
            f"evasion {row.get('evasion') or 0.0:.2f}{harm}"
        )
    kl = results.get("kl")
    if kl:
        click.echo(
            f"KL vs base ({kl['n_prompts']} harmless prompts): first token {kl['first_token']:.4g}, "
            f"first {kl['tokens']} tokens {kl['first_n_tokens']:.4g}"
        )
    from abliterate.evaluation.capability import metrics

    for task, metric, value, _stderr in metrics(results.get("lm_eval")):
        click.echo(f"{task} {metric}: {value:.3f}")


def _echo_report(report: dict[str, Any], folder: Path) -> None:
    s = report["summary"]
    click.echo(
        f"compliance {s['compliance_before']:.2f} -> {s['compliance_after']:.2f}, "
        f"over-refusal {s['over_refusal_before']:.2f} -> {s['over_refusal_after']:.2f}, "
        f"evasion {s.get('evasion_before') or 0.0:.2f} -> {s.get('evasion_after') or 0.0:.2f} "
        f"(mean of {len(report['languages'])} languages)"
    )
    if s.get("attack_success_after") is not None:
        before = s.get("attack_success_before")
        click.echo(f"attack success {'–' if before is None else f'{before:.2f}'} -> {s['attack_success_after']:.2f}")
    if s.get("kl_first_token") is not None:
        click.echo(f"KL vs base: first token {s['kl_first_token']:.4g}, first tokens {s['kl_first_n_tokens']:.4g}")
    for row in report["capability"]:
        if row["delta"] is not None:
            click.echo(f"{row['task']} {row['metric']}: {row['before']:.3f} -> {row['after']:.3f}")
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
@settings_options(*EVAL_OPTIONS, "prompts", *MODEL_OPTIONS)
def eval_command(
    model: str | None, recipe: Path | None, out: Path, base: str | None, kl_tokens: int, cache: bool, **given: Any
) -> None:
    """Evaluate MODEL: refusal per language, over-refusal, damage against --base, lm-eval capability.

    Writes a results JSON (schema in docs/evaluation.md) with every prompt's answer and verdict.
    """
    from abliterate.evaluation.evaluate import run_eval

    settings = _settings(recipe, model=model, out=out, **given)
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


CROSSLINGUAL_OPTIONS = ["prompts", "n_train", "n_val", "layer", "pos", "method", "kl_threshold", "prune_layers",
                        "screen_prompts", "finalists", "filter_prompts"]


@cli.command("crosslingual")
@click.argument("model")
@click.option("--langs", default="all", show_default=True,
              help="Languages compared: all, or at least two codes such as en,de,fr.")
@click.option("--source-lang", default=None,
              help="Language whose normal selection picks the layer and position (default: the first of --langs).")
@click.option("--direction", "direction_file", type=click.Path(path_type=Path), default=None,
              help="Take the layer and position from this direction file (or edited model folder) instead.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output folder: crosslingual.json, transfer_answers.jsonl and PNG plots.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--n-prompts", type=click.IntRange(1), default=32, show_default=True,
              help="Harmful test prompts per target language in the transfer matrix.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True,
              help="Greedy answer length cap in the transfer matrix.")
@click.option("--transfer/--no-transfer", default=True, show_default=True,
              help="Measure the transfer matrix (greedy generation: the slow part).")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write the PNG plots.")
@settings_options(*CROSSLINGUAL_OPTIONS, *MODEL_OPTIONS)
def crosslingual_command(
    model: str,
    langs: str,
    source_lang: str | None,
    direction_file: Path | None,
    out: Path,
    overwrite: bool,
    n_prompts: int,
    max_new_tokens: int,
    transfer: bool,
    plots: bool,
    **given: Any,
) -> None:
    """Compare MODEL's refusal directions across languages (PolyRefuse style); see docs/crosslingual.md.

    Per language: the difference-in-means direction at one layer and position; their cosine similarities, per-layer
    cosines, a PCA of the activations, and a transfer matrix (compliance in each target language with each source
    language's direction ablated, plus an unablated baseline row).
    """
    from abliterate.commands.crosslingual import BASELINE, CrosslingualOptions, run_crosslingual

    options = CrosslingualOptions.parse(langs, source_lang, direction_file, n_prompts, max_new_tokens, transfer, plots)
    settings = _settings(None, model=model, out=out, overwrite=overwrite, lang=options.source_lang, **given)
    result = run_crosslingual(settings, options)
    r = result.report
    click.echo(f"layer {r['layer']}, position {r['pos']} ({r['chosen_by']})")
    click.echo("cosine similarity of the directions:")
    click.echo("      " + "".join(f"{lang:>7}" for lang in r["languages"]))
    for lang, row in zip(r["languages"], r["cosine"]["matrix"], strict=True):
        click.echo(f"{lang:>6}" + "".join(f"{v:7.3f}" for v in row))
    if "transfer" in r:
        t = r["transfer"]
        click.echo(f"compliance on harmful test prompts (n={t['n_prompts']} per cell), rows: direction ablated")
        click.echo("      " + "".join(f"{lang:>7}" for lang in t["columns"]))
        for source, row in zip(t["rows"], t["compliance"], strict=True):
            label = "base" if source == BASELINE else source
            click.echo(f"{label:>6}" + "".join(f"{v:7.2f}" for v in row))
    click.echo(f"results -> {result.out}")


OPTIMIZE_OPTIONS = ["langs", "judge", "lang", "prompts", "n_train", "n_val", "layer", "pos", "method", "kl_threshold",
                    "prune_layers", "screen_prompts", "finalists", "filter_prompts", "refusal_tokens", "max_shard_size",
                    *FORMAT_OPTIONS]


@cli.command("optimize")
@click.argument("model", required=False)
@recipe_option
@click.option("--trials", type=click.IntRange(0), default=None,
              help="Finished trials the study should hold; re-running the command continues the study up to this "
                   "many (default 50, or none with --pick).")
@click.option("--study", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Study folder (SQLite study, cached directions, pareto.json/.md/.png); default: optimize-<model>.")
@click.option("--pick", type=click.IntRange(0), default=None,
              help="Write this finished trial's edit to --out (trial numbers: the first column of pareto.md).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder for --pick's checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the TPE sampler.")
@click.option("--trial-prompts", type=click.IntRange(1), default=8, show_default=True,
              help="Harmful val prompts per language whose greedy answers give a trial's refusal rate.")
@click.option("--kl-prompts", type=click.IntRange(1), default=8, show_default=True,
              help="Harmless val prompts per language for a trial's first-token KL.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True,
              help="Greedy answer length cap in the trials.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write pareto.png.")
@settings_options(*OPTIMIZE_OPTIONS, *MODEL_OPTIONS)
def optimize_command(
    model: str | None,
    recipe: Path | None,
    trials: int | None,
    study: Path | None,
    pick: int | None,
    out: Path | None,
    overwrite: bool,
    seed: int,
    trial_prompts: int,
    kl_prompts: int,
    max_new_tokens: int,
    plots: bool,
    **given: Any,
) -> None:
    """Search per-layer ablation weights and the direction's layer for MODEL (Optuna, two objectives).

    Objectives, both minimised: mean refusal rate over --langs and mean first-token KL on harmless prompts.
    Prints and writes the Pareto front, with the paper's default edit (trial 0) as the reference; --pick N
    --out DIR writes trial N's checkpoint. See docs/optimize.md.
    """
    from abliterate.commands.optimize.pareto import table_lines, verdict_line
    from abliterate.commands.optimize.study import OptimizeOptions, run_optimize

    settings = _settings(recipe, model=model, **given)
    options = OptimizeOptions.parse(
        settings.model, study, trials, pick, out, overwrite=overwrite, seed=seed, trial_prompts=trial_prompts,
        kl_prompts=kl_prompts, max_new_tokens=max_new_tokens, plots=plots,
    )
    result = run_optimize(settings, options)
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
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also copy the organism to this folder.")
@click.option("--force", is_flag=True, help="Rebuild even if a cached organism exists.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def organism_command(out: Path | None, force: bool, overwrite: bool) -> None:
    """Build (or reuse) the model organism: SmolLM2-135M-Instruct safety-tuned to refuse (docs/organism.md)."""
    from abliterate.commands.organism.train import build_organism, copy_organism, read_info

    folder = build_organism(force=force)
    if out is not None:
        folder = copy_organism(folder, out, overwrite=overwrite)
    click.echo(f"organism: {folder}")
    heldout = read_info(folder).get("heldout_val_refusal")
    if heldout:
        click.echo(f"held-out refusal rates: {json.dumps(heldout)}")


@cli.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("abliterate-demo"), show_default=True,
              help="Folder for organism/ (the safety-tuned base) and edited/ (the abliterated model and report).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def demo_command(out: Path, overwrite: bool) -> None:
    """Build the model organism, abliterate it (--lang en) and measure refusal before and after."""
    from abliterate.commands.organism.demo import run_demo

    result = run_demo(out, overwrite=overwrite)
    click.echo(f"organism (safety-tuned base): {result.organism}")
    click.echo(f"abliterated checkpoint:       {result.edited}")
    click.echo(f"report:                       {result.report} (and report.html)")
    click.echo(f"direction: layer {result.layer}, position {result.pos}")
    for lang, rates in result.harmful.items():
        click.echo(f"harmful refusal [{lang}]: {rates.before:.2f} -> {rates.after:.2f} (n={rates.n})")
    for lang, rates in result.harmless.items():
        click.echo(f"harmless refusal [{lang}]: {rates.before:.2f} -> {rates.after:.2f} (n={rates.n})")
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
