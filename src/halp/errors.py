"""The error root: every error halp raises for bad input, bad state or a refused request derives from `HalpError`.

The CLI catches `HalpError` alone (one line, exit 2); anything else is a bug and surfaces with its traceback.
Each class keeps the built-in base it had before the root existed, so `except ValueError` in user code still works.
"""

from __future__ import annotations

import shlex
from pathlib import Path

#: The distribution halp is installed as (`pip install halp-vlm`): `halp` on the package index is an unrelated
#: project. The import name and the command stay `halp`.
DISTRIBUTION = "halp-vlm"


def first_line(err: BaseException) -> str:
    """An error's first line, printable, for a one-line message (a library's error can span many lines, and
    pyarrow's quotes the raw bytes of a corrupt page); the error's class name when it has no text."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in line)


def source_checkout() -> Path | None:
    """The source checkout halp runs from (an editable install, as the README sets up), else None."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "src" / "halp").is_dir():
        return checkout
    return None


def install_hint(extra: str) -> str:
    """The pip command that installs one of halp's optional extras into this installation.

    From a source checkout the command names the checkout, which works whether or not the distribution is on the
    package index; otherwise it names the distribution.
    """
    checkout = source_checkout()
    if checkout is not None:
        return f"pip install -e {shlex.quote(f'{checkout}[{extra}]')}"
    return f"pip install '{DISTRIBUTION}[{extra}]'"


#: How a message names a parameter the user can set, so that the CLI can show it as the flag of the command being
#: run: `name=` followed by a value or by nothing ("pass a label table as labels="), or `name=True` / `name=False`
#: for a switch ("rerun with overwrite=True"). Python users read the call they would make; the CLI (`halp.cli.app.
#: describe`) shows `--labels`, `--overwrite`, `--no-exif-orientation`.
PARAMETER_MENTION = r"(?<![\w.-])(?P<name>[a-z][a-z0-9_]*)=(?:(?P<switch>True|False)\b|(?P<value>[^\s,;:)]+))?"


class HalpError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


class ParameterError(HalpError, ValueError):
    """A parameter has a value that cannot be used. `parameter` is its Python name; the CLI shows it as the flag
    (`batch_size` -> `--batch-size`), so the library never has to know how it was called."""

    def __init__(self, parameter: str, message: str) -> None:
        self.parameter = parameter
        self.message = message
        super().__init__(f"{parameter}{message}" if message.startswith(":") else f"{parameter} {message}")

    @property
    def flag(self) -> str:
        return "--" + self.parameter.replace("_", "-")


class RunNotFoundError(HalpError, FileNotFoundError):
    """A path given as a run directory (or its features.h5) does not exist or holds no run."""


class MissingInputError(HalpError, FileNotFoundError):
    """A file the request needs does not exist; says which and which command makes it."""


class MissingDependencyError(HalpError, ImportError):
    """An optional package the request needs is not installed; says which extra installs it."""


class ShardError(HalpError, ValueError):
    """The shard layout asked for (flags or launcher environment) is inconsistent."""


class TableError(HalpError, ValueError):
    """The input table cannot be used; raised before any model is loaded."""


class UserFileError(HalpError, OSError):
    """A user's file cannot be read as asked: missing, not a regular file (a FIFO, device, socket or directory),
    unreadable or too large (halp.userfiles); names it and says what it is."""


class ImageError(HalpError, ValueError):
    """One row's image cannot be used; the row fails, the run goes on."""


class RowError(HalpError, ValueError):
    """One row cannot be prepared for the model (prompt, processor); the row fails, the run goes on."""


class ModelLoadError(HalpError, OSError):
    """A checkpoint cannot be loaded as asked (no such path or hub id, remote code not allowed, missing kernel)."""


class ExtractionPointError(HalpError, RuntimeError):
    """An extraction point (module, token, position) cannot be found; says what and why."""


class RunMismatchError(HalpError, RuntimeError):
    """A rerun asks for different settings or content than the run directory was created with."""


class RunLockedError(HalpError, RuntimeError):
    """Another live process is writing to this run directory."""


class StoreWriteError(HalpError, OSError):
    """Writing to the run directory failed (disk full, read-only, ...); committed data is intact."""


class RunDamagedError(HalpError, RuntimeError):
    """A file of the run directory cannot be read (truncated, corrupt); names the file and what to do."""


class OutputPathError(HalpError, ValueError):
    """An output path is refused: it is one of the command's own inputs (writing it would destroy the input)."""


class LabelError(HalpError, ValueError):
    """A label table or labelling request cannot be used; says which file or column and why."""


class ProbeError(HalpError, ValueError):
    """Probes cannot be trained as asked (no labels, one class, unknown feature); says why."""


class ReportError(HalpError, RuntimeError):
    """The run directory lacks what the report is made from; says which file and which command makes it."""


class ScorerError(HalpError, ValueError):
    """A run cannot be used for scoring as asked (no probes, unknown feature, model mismatch); says why."""


class RayWorkerError(HalpError, RuntimeError):
    """A Ray worker failed in a way a retry does not fix (model not loadable, extraction point missing, ...)."""


class SourceError(HalpError, ValueError):
    """A benchmark's files cannot be converted or composed (unknown layout, missing split, clashing ids); says
    what was expected and what was found."""


class AdapterPluginError(HalpError, ImportError):
    """A third-party adapter registered under the `halp.adapters` entry-point group cannot be used; names the plugin."""


class ReviewError(HalpError, ValueError):
    """A review cannot be done or recorded as asked (no answers, unknown row or reviewer, a stale undo); says why."""


class ReviewServerError(HalpError, OSError):
    """The review server cannot start (port in use, address not available, web extra missing); says what to do."""


class InputWorkerError(HalpError, RuntimeError):
    """The input worker processes cannot start (the processor does not load in a worker); says why."""


class WorldError(HalpError, RuntimeError):
    """The synthetic world cannot be generated, trained or studied as asked; says what and why."""


class ServeError(HalpError, ValueError):
    """`halp serve` cannot start as asked (options, the run's probes, the port, a missing extra); says what to do."""


class ServeRequestError(HalpError, ValueError):
    """One request to `halp serve` cannot be served as asked; answered with OpenAI's error JSON and `status`."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.kind = kind
