"""The typer app, the options shared by several commands, the consoles and the one error exit."""

from __future__ import annotations

import logging
from typing import Annotated, NoReturn

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from halp.errors import HalpError, ParameterError


def describe(error: HalpError) -> str:
    """One line for a user: a parameter error names the flag, not the Python parameter."""
    if isinstance(error, ParameterError):
        return str(error).replace(error.parameter, error.flag, 1)
    return str(error)


class HalpGroup(TyperGroup):
    """The one error handler: a `HalpError` from any command is one line on stderr and exit status 2; anything
    else is a bug and surfaces with its traceback. Ctrl-C is one line and exit status 130."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except HalpError as error:
            fail(describe(error))
        except KeyboardInterrupt:
            err_console.print("interrupted; rerun the same command to resume", markup=False, highlight=False)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=HalpGroup,
    add_completion=False,
    no_args_is_help=True,
    help="Predict VLM hallucinations before generation: extract, label, probe, report, predict.",
)
# Options shared by several commands.
ModelOption = Annotated[str, typer.Option(help="Hub id or local checkpoint directory.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
DtypeOption = Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")]
TrustRemoteCodeOption = Annotated[bool, typer.Option(help="Allow the checkpoint's own Python code to run.")]

console = Console()
err_console = Console(stderr=True)


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
