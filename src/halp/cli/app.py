"""The typer app, the options shared by several commands, the consoles and the one error exit."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import click
import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from halp.errors import PARAMETER_MENTION, HalpError, ParameterError


def command_options(group: click.Group, ctx: click.Context) -> dict[str, Any]:
    """Python parameter name -> option of the command being run (of every command of a sub-group: `halp data ...`).

    Options are recognised by their attributes: typer builds its commands on its own copy of click's classes.
    """
    name = ctx.invoked_subcommand
    command = group.get_command(ctx, name) if name else None
    found: dict[str, Any] = {}
    pending = [command] if command is not None else []
    while pending:
        current = pending.pop()
        if hasattr(current, "list_commands"):  # a sub-group
            pending += [current.get_command(ctx, sub) for sub in current.list_commands(ctx)]
            continue
        for param in current.params:
            if getattr(param, "param_type_name", None) == "option" and param.name:
                found[param.name] = param
    return found


def _flag(option: Any, value: str | None) -> str:
    if value == "False":
        return option.secondary_opts[0] if option.secondary_opts else f"no {option.opts[0]}"
    return option.opts[0]


def describe(error: HalpError, options: dict[str, Any] | None = None) -> str:
    """One line for a user: the library's message with each parameter it names shown as the command's flag.

    A `ParameterError` starts with its parameter; any message may mention one as `name=` (a value follows) or
    `name=True` / `name=False` (a switch) (`halp.errors.PARAMETER_MENTION`): `labels=` becomes `--labels`,
    `overwrite=True` `--overwrite`, `exif_orientation=False` `--no-exif-orientation`.
    """
    options = options or {}
    text = str(error)
    if isinstance(error, ParameterError):
        flag = options[error.parameter].opts[0] if error.parameter in options else error.flag
        text = text.replace(error.parameter, flag, 1)

    def as_flag(match: re.Match) -> str:
        option = options.get(match.group("name"))
        if option is None:
            return match.group(0)
        flag = _flag(option, match.group("switch"))
        return flag + (" " if match.group("value") else "") + (match.group("value") or "")

    return re.sub(PARAMETER_MENTION, as_flag, text)


class HalpGroup(TyperGroup):
    """The one error handler: a `HalpError` from any command is one line on stderr and exit status 2; anything
    else is a bug and surfaces with its traceback. Ctrl-C is one line and exit status 130."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except HalpError as error:
            fail(describe(error, command_options(self, ctx)))
        except KeyboardInterrupt:
            err_console.print("interrupted; rerun the same command to resume", markup=False, highlight=False)
            raise typer.Exit(130) from None


#: Help as click lays it out: an option name too long for its column gets a line of its own, so every flag stays
#: whole at any width (rich's option table cuts long names to `--processor-dev…` at 80 columns).
HELP_MARKUP = None

app = typer.Typer(
    cls=HalpGroup,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=HELP_MARKUP,
    help="Predict VLM hallucinations before generation: extract, label, probe, report, predict.",
)


def command_group(name: str, help: str) -> typer.Typer:
    """The sub-command group `halp <name> ...`, its help laid out as the app's."""
    group = typer.Typer(no_args_is_help=True, rich_markup_mode=HELP_MARKUP, help=help)
    app.add_typer(group, name=name)
    return group


# Options shared by several commands, one alias per meaning (a command gives the default where there is one).
ModelOption = Annotated[str, typer.Option(help="Hub id or local checkpoint directory.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
DtypeOption = Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")]
TrustRemoteCodeOption = Annotated[bool, typer.Option(help="Allow the checkpoint's own Python code to run.")]
LayersOption = Annotated[str, typer.Option(help="'halp' = {0,L/4,L/2,3L/4,L-1}, 'all', or e.g. '0,7,-1'.")]
# --images, by meaning: the folder a table's image ids are relative to, the images a command reads itself, how
# many synthetic images a generated set has (review's and `data convert`'s folders are their commands' own).
TableImagesOption = Annotated[
    Path | None,
    typer.Option("--images", help="Directory the table's image ids are relative to (not for embedded images)."),
]
ImagesToReadOption = Annotated[Path, typer.Option("--images", help="A directory of images (or one image file).")]
ImageCountOption = Annotated[int | None, typer.Option("--images", help="Synthetic images, two questions each.")]
PromptOption = Annotated[str, typer.Option(help="Prompt paired with each image.")]
ImageBatchOption = Annotated[int, typer.Option(help="Images per prefill pass.")]
ImageLimitOption = Annotated[int | None, typer.Option(min=1, help="Only the first N images (by name).")]
FinishedRunArgument = Annotated[Path, typer.Argument(help="Finished run directory.")]
AnsweredRunArgument = Annotated[Path, typer.Argument(help="Finished run directory (features.h5 with answers).")]
LabelColumnOption = Annotated[
    str | None, typer.Option(help="0/1 column of the labels (default: label, else is_hallucinating_manual).")
]
ProbeKindOption = Annotated[str, typer.Option(help="logreg, mlp (the paper's) or both.")]
FoldsOption = Annotated[int, typer.Option(help="Cross-validation folds (stratified) of the probes.")]
BootstrapOption = Annotated[int, typer.Option(help="Bootstrap resamples of every 95% interval.")]

Built = TypeVar("Built")


def from_options(target: Callable[..., Built], options: Mapping[str, Any], /, **given: Any) -> Built:
    """`target(...)` (a config class, a library function) given every command option it takes by name.

    `options` is the command's parameters (`dict(locals())` on entry); `given` adds or replaces values (converted
    ones, ones named otherwise). A command passes its options on whole instead of copying them one by one: an
    option reaches the library by having the name of the library's parameter.
    """
    accepted = inspect.signature(target).parameters
    return target(**{**{name: value for name, value in options.items() if name in accepted}, **given})


def options_set(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options the user gave: typer passes None for an optional value left out, which then takes the default of
    the library's own parameter (a recipe's setting, a count) instead of overriding it."""
    return {name: value for name, value in options.items() if value is not None}


class LineConsole(Console):
    """A rich console whose lines of text are not wrapped when it writes to a file or a pipe (`2> run.log`, CI
    logs): a terminal wraps them at its width, a log keeps each line whole (no break in the middle of a number or a
    path). Tables and boxes are laid out at the console's width either way."""

    def print(self, *objects: Any, soft_wrap: bool | None = None, **kwargs: Any) -> None:  # type: ignore[override]
        if soft_wrap is None and not self.is_terminal and all(isinstance(item, (str, Text)) for item in objects):
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)


console = LineConsole()
err_console = LineConsole(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    from rich.markup import escape

    # Messages name things like `halp-vlm[latentlens]` that rich would otherwise read as markup tags.
    # soft_wrap: the message stays one line however narrow the terminal (scripts grep it).
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def setup_logging() -> None:
    """Warnings and errors of halp's modules on stderr, one line each (the run's own log file gets the rest)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def say(message: str) -> None:
    """A progress line on stderr, printed literally (user strings are never markup)."""
    err_console.print(message, markup=False, highlight=False)
