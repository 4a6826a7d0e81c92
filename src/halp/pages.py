"""The HTML pages halp writes (`halp report`'s report.html, `halp analyze neighbors`' neighbors.html), rendered from
the Jinja2 templates in `halp/templates/`.

`base.html` is the page both share (its CSS included, so a page stands alone when sent on its own);
`macros.html` holds the pieces both may use (a table of values, an embedded PNG); each page has its own template.
Autoescape is on for every template: each value a page shows, from whatever file it came, is escaped. The library
hands the templates data (strings, numbers, `Table`s), never markup.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined


def number_text(value: Any, digits: int = 3) -> str:
    """A value as a page shows it: floats with `digits` decimals, None and NaN as "n/a", anything else as str()."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def png_base64(png: bytes) -> str:
    """A PNG as the base64 text of a `data:image/png;base64,` URL (the page embeds its figures)."""
    return base64.b64encode(png).decode("ascii")


@dataclass
class Table:
    """A frame's column names and rows of values, for the `table` macro (values shown with `number_text`)."""

    columns: list[str]
    rows: list[list[Any]]
    #: The position of the row shown highlighted (the best), if any.
    highlight: int | None = None

    @classmethod
    def of(cls, frame: pd.DataFrame, highlight: int | None = None) -> Table:
        return cls([str(column) for column in frame.columns], [row.tolist() for _, row in frame.iterrows()], highlight)


ENVIRONMENT = Environment(
    loader=PackageLoader("halp", "templates"),
    autoescape=True,
    undefined=StrictUndefined,  # a name a template uses and the page does not pass is an error, not an empty string
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
ENVIRONMENT.filters["number"] = number_text
ENVIRONMENT.filters["repr"] = repr


def render_page(template: str, **context: Any) -> str:
    """The page `template` (a file of halp/templates) filled with `context`, every value escaped."""
    return ENVIRONMENT.get_template(template).render(**context)
