"""The `halp` command: typer wrappers that call the library and render what it returns.

`app.py` holds the app, shared options and the error exit; each module below registers its commands.
"""

from halp.cli import (
    commands,  # noqa: F401  (registers the commands)
    data,  # noqa: F401  (registers `halp data`)
    review,  # noqa: F401  (registers `halp review`)
    serve,  # noqa: F401  (registers `halp serve`)
    world,  # noqa: F401  (registers `halp world`)
)
from halp.cli.app import app

__all__ = ["app"]
