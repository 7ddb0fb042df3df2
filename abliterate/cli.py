"""The `abliterate` command line: one click group, options built from the shared Settings model.

Only this module prints, shows progress bars and turns errors into one-line messages (a traceback only
with -v).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args

import click

from abliterate import __version__, progress
from abliterate.errors import AbliterateError
from abliterate.settings import Settings, build_settings

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("abliterate")

# Options shared by commands that run forward passes.
MODEL_OPTIONS = ["revision", "dtype", "device", "trust_remote_code", "allow_pickle", "chat_template", "batch_size"]
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
    return build_settings(recipe, given)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "huggingface_hub", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR if verbose < 2 else logging.INFO)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if verbose < 2:
            hf_logging.disable_progress_bar()
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
@settings_options("max_shard_size", *DIRECTION_OPTIONS, *MODEL_OPTIONS)
def edit(
    model: str | None, recipe: Path | None, eval_: bool | None, push_to: str | None, public: bool, **given: Any
) -> None:
    """Compute the refusal direction of MODEL and write an orthogonalized checkpoint to --out.

    MODEL is a hub id, a local folder or a .gguf file; it may also come from --recipe.
    """
    from abliterate.pipeline import run_edit

    settings = _settings(recipe, model=model, eval=eval_, **given)
    _check_push_options(push_to, public)
    result = run_edit(settings)
    chosen = result.direction.direction
    click.echo(f"direction: layer {chosen.layer}, position {chosen.pos} ({settings.lang}, {settings.method})")
    if result.direction.chosen is not None:
        c = result.direction.chosen
        click.echo(f"validation: refusal score {c.refusal:.2f}, induce score {c.induce:.2f}, first-token KL {c.kl:.4f}")
    click.echo(f"edited {result.edited_tensors} tensors -> {result.out}")
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
    from abliterate.pipeline import run_directions

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
@settings_options("max_shard_size", "revision", "allow_pickle")
def apply(model: str, direction_file: Path, out: Path, overwrite: bool, **given: Any) -> None:
    """Orthogonalize MODEL's weights against a saved direction (streaming; no GPU, no forward pass)."""
    from abliterate.direction import Direction
    from abliterate.loading import resolve
    from abliterate.orthogonalize import apply_direction

    settings = _settings(None, model=model, out=out, overwrite=overwrite, **given)
    direction = Direction.load(direction_file)
    source = resolve(model, revision=settings.revision, allow_pickle=settings.allow_pickle)
    plan = apply_direction(
        source.folder,
        direction,
        out,
        max_shard_size=settings.max_shard_bytes,
        overwrite=overwrite,
        allow_pickle=settings.allow_pickle,
        model=source,
    )
    click.echo(f"edited {len(plan.edits)} tensors ({plan.arch.name}) -> {out}")


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
    from abliterate import prompts
    from abliterate.languages import check_language

    click.echo(prompts.describe(prompts.load(source, default_lang=check_language(lang)), lang, samples))


def _check_push_options(push_to: str | None, public: bool) -> None:
    """Before a long edit: a valid repo id and a token (no network)."""
    if push_to is None:
        if public:
            raise click.UsageError("--public only applies with --push-to")
        return
    from abliterate.publish import check_ready

    check_ready(push_to)


def _push(folder: Path, repo_id: str, *, public: bool, revision: str | None = None, message: str | None = None) -> None:
    from abliterate.publish import plan_upload, push

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
    from abliterate.publish import plan_upload

    plan = plan_upload(folder, repo_id, public=public, revision=revision)
    click.echo("dry run: nothing is uploaded and the hub is not contacted")
    for line in plan.describe():
        click.echo(line)


@cli.command("verify")
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path, exists=True, file_okay=False))
def verify_command(folder: Path) -> None:
    """Re-check DIR against abliterate/provenance.json: file hashes and orthogonality of every edited tensor."""
    from abliterate.verify import verify

    click.echo(verify(folder).summary())


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
