"""One source for options (issue 15): every command's settings flags come from the fields of Settings or of a
command's section, one option has one default wherever it appears, `--help` shows it, every command that runs a
model on user settings takes --recipe, and a recipe key is a field name. No model is loaded here."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import click
import pytest

from abliterate.cli import cli
from abliterate.errors import UsageError
from abliterate.settings import (
    SECTIONS,
    CrosslingualSettings,
    OptimizeSettings,
    Settings,
    build_command_settings,
    build_settings,
)

# Commands that load a model on the user's settings: each takes --recipe. (`apply` and `verify` run no model;
# `arch-propose` is for a family no recipe can name yet; `organism` and `demo` run fixed settings of their own.)
RECIPE_COMMANDS = {"edit", "directions", "eval", "chat", "crosslingual", "optimize"}
# Options of those commands that are not recipe keys: what to read or write in this run, not how.
NOT_RECIPE_KEYS = {"help", "recipe", "base", "kl_tokens", "cache", "push_to", "public"}
FIELDS = {**Settings.model_fields, **{k: f for s in SECTIONS for k, f in s.model_fields.items()}}
# --out names what a command writes; where a command has a default destination (demo) it is its own.
OWN_DEFAULTS = {"--out"}


def _options(name: str) -> list[click.Option]:
    command = cli.commands[name]
    return [p for p in command.params if isinstance(p, click.Option)]


def _help_records(name: str) -> dict[str, str]:
    """Each option's help text as `abliterate NAME --help` shows it (the group's show_default applies)."""
    command = cli.commands[name]
    with click.Context(cli, info_name="abliterate", **cli.context_settings) as parent:
        ctx = click.Context(command, info_name=name, parent=parent)
        records = {p.name or "": p.get_help_record(ctx) for p in _options(name)}
    return {k: record[1] for k, record in records.items() if record is not None}


def _default(name: str, option: click.Option) -> Any:
    """The value an option has when not given (None when it has none)."""
    with click.Context(cli, info_name="abliterate", **cli.context_settings) as parent:
        value = option.get_default(click.Context(cli.commands[name], info_name=name, parent=parent), call=False)
    return None if value is None or repr(value) == "Sentinel.UNSET" else value


def _has_default(name: str, option: click.Option) -> bool:
    """Whether the option has a default worth showing: its field's (for a settings flag), else click's."""
    field = FIELDS.get(option.name or "")
    default = field.get_default() if field is not None and option.name != "out" else _default(name, option)
    if option.name == "help" or default is None or option.multiple:
        return False
    return not (option.is_flag and not option.secondary_opts and not default)  # a plain switch: off


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_help_shows_every_default(name: str) -> None:
    records = _help_records(name)
    missing = [o.opts[0] for o in _options(name) if _has_default(name, o) and "default:" not in records[o.name or ""]]
    assert not missing, f"`abliterate {name} --help` shows no default for {missing}"


def test_settings_flags_default_to_their_field() -> None:
    """A flag built from a field has the field's default (shown by --help; left at it, a recipe value stands)."""
    for name in cli.commands:
        for option in _options(name):
            field = FIELDS.get(option.name or "")
            if field is not None and not option.required and option.name not in {"out", "refusal_tokens"}:
                assert _default(name, option) == field.get_default(), f"{name} {option.opts[0]}"


def test_one_option_one_default_everywhere() -> None:
    defaults: dict[str, set[Any]] = defaultdict(set)
    where: dict[str, list[str]] = defaultdict(list)
    for name in cli.commands:
        for option in _options(name):
            for flag in option.opts:
                if flag not in OWN_DEFAULTS:
                    defaults[flag].add(repr(_default(name, option)))
                    where[flag].append(name)
    differing = {flag: (sorted(d), where[flag]) for flag, d in defaults.items() if len(d) > 1}
    assert not differing, differing
    assert len(defaults["--max-new-tokens"]) == 1 and set(where["--max-new-tokens"]) <= {"edit", "eval", "chat"}


def test_sections_repeat_no_settings_field() -> None:
    """A section field is a new option: its name is no Settings field, and sections sharing a name share it."""
    for section in SECTIONS:
        assert not set(section.model_fields) & set(Settings.model_fields), section.__name__
        for other in SECTIONS:
            for name in set(section.model_fields) & set(other.model_fields):
                assert section.model_fields[name].get_default() == other.model_fields[name].get_default()
                assert section.model_fields[name].description == other.model_fields[name].description or name == "plots"
    assert OptimizeSettings().trial_max_new_tokens == 32 and CrosslingualSettings().transfer_max_new_tokens == 64
    assert Settings.model_fields["max_new_tokens"].default == 128


@pytest.mark.parametrize("name", sorted(RECIPE_COMMANDS))
def test_commands_that_run_a_model_take_a_recipe(name: str) -> None:
    names = {o.name for o in _options(name)}
    assert "recipe" in names
    assert not names - set(FIELDS) - NOT_RECIPE_KEYS, f"{name}: flags that are no recipe key"


def test_section_keys_in_a_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\nlayer: 3\ntrials: 9\ntransfer_prompts: 5\nplots: false\n", encoding="utf-8")
    assert build_settings(recipe, {}).layer == 3  # another command's keys are left to it
    settings, optimize = build_command_settings(recipe, {"trials": 4}, OptimizeSettings)
    assert (settings.layer, optimize.trials, optimize.plots) == (3, 4, False)  # the flag wins
    _, crosslingual = build_command_settings(recipe, {}, CrosslingualSettings)
    assert (crosslingual.transfer_prompts, crosslingual.plots) == (5, False)


def test_unknown_recipe_key_fails_in_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ntrial_tokens: 9\n", encoding="utf-8")
    for build in (lambda: build_settings(recipe, {}), lambda: build_command_settings(recipe, {}, OptimizeSettings)):
        with pytest.raises(UsageError, match="unknown setting 'trial_tokens'") as err:
            build()
        assert "\n" not in err.value.one_line() and err.value.hint


@pytest.mark.parametrize(("section", "instead"), [(OptimizeSettings, "trial_max_new_tokens"),
                                                  (CrosslingualSettings, "transfer_max_new_tokens")])
def test_recipe_max_new_tokens_is_said_not_silently_ignored(
    tmp_path: Path, section: Any, instead: str, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\nmax_new_tokens: 256\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="abliterate.settings"):
        _, values = build_command_settings(recipe, {}, section)
    assert getattr(values, instead) == section.model_fields[instead].default  # the command's own cap
    assert f"max_new_tokens=256, which {section.command} does not use" in caplog.text and instead in caplog.text
    caplog.clear()
    _, flagged = build_command_settings(recipe, {instead: 48}, section)
    assert getattr(flagged, instead) == 48
    recipe.write_text(f"model: m\nmax_new_tokens: 256\n{instead}: 24\n", encoding="utf-8")
    settings, values = build_command_settings(recipe, {}, section)
    assert getattr(values, instead) == 24 and settings.max_new_tokens == 256
    assert build_settings(recipe, {}).max_new_tokens == 256  # edit and eval: the recipe's answer cap


def test_bad_section_values_fail_in_one_line() -> None:
    with pytest.raises(UsageError, match="trial_prompts"):
        build_command_settings(None, {"model": "m", "trial_prompts": 0}, OptimizeSettings)
    with pytest.raises(UsageError, match="unknown language"):
        build_command_settings(None, {"model": "m", "source_lang": "klingon"}, CrosslingualSettings)


@pytest.mark.parametrize("name", sorted(n for n in cli.commands if "batch_size" in {o.name for o in _options(n)}))
def test_batch_size_flag_takes_auto(name: str) -> None:
    """The flag's default (16) must not make click read --batch-size as a whole number only."""
    with click.Context(cli, info_name="abliterate", **cli.context_settings) as parent:
        ctx = cli.commands[name].make_context(name, ["m", "--out", "o", "--batch-size", "auto"], parent=parent)
    assert ctx.params["batch_size"] == "auto"


def test_every_setting_is_an_option_of_some_command() -> None:
    """A Settings field no command declares would be reachable from recipes only (--winsorize once was)."""
    declared = {param.name for command in cli.commands.values() for param in command.params}
    assert [name for name in Settings.model_fields if name not in declared] == []
