"""What `halp probe` wrote, read back: the one reader each of `probes/results.csv`, `predictions.csv`, `groups.csv`
and the settings of `results.json` (halp.probe's `write_probe_outputs` writes them; layout.py names them).

Every reader reads the CSV as text first, so identifiers stay as written (a question_id "007", a group value "1.0",
a feature named "NA"), then turns into numbers exactly the columns that hold numbers: an empty cell is NaN, and a
column with any other text stays text. `halp report`, `halp predict`, `halp review` and `halp world` read these
files here and nowhere else, so they all see the same values with the same types.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from halp.errors import RunDamagedError, first_line

#: The columns of results.csv that name a result; every other column holds numbers where it can.
RESULT_KEYS = ("feature", "probe")
#: The numeric columns of predictions.csv and groups.csv.
PREDICTION_NUMBERS = ("fold", "label", "score")
GROUP_NUMBERS = ("n", "n_positive", "auroc")


#: What to do about a damaged output of `halp probe`.
REWRITE = "rerun `halp probe` on the run to write it again"


def read_text_table(path: str | Path) -> pd.DataFrame:
    """A CSV of `halp probe`'s output with every cell as text (no NaN guessing: "" stays "").

    halp writes these files whole (atomically) and ends them with a line break, so one that does not end with one
    was cut short by something else; it, and one that is not CSV, is a RunDamagedError naming the file."""
    path = Path(path)
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        problem = "empty" if not data else "cut short: it does not end with a line break, as halp writes it"
        raise RunDamagedError(f"{path} is damaged ({problem}); {REWRITE}")
    try:
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        raise RunDamagedError(f"{path} is damaged (not a CSV table: {first_line(err)}); {REWRITE}") from err


def as_numbers(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Columns whose every non-empty cell is a number become numbers (empty -> NaN); others stay text."""
    for column in columns:
        if column in frame:
            try:
                frame[column] = pd.to_numeric(frame[column].replace("", np.nan))
            except (ValueError, TypeError):
                continue
    return frame


def read_results(path: str | Path) -> pd.DataFrame:
    """probes/results.csv: one row per feature x probe; feature and probe as text, the metrics as numbers."""
    frame = read_text_table(path)
    return as_numbers(frame, [column for column in frame.columns if column not in RESULT_KEYS])


def read_predictions(path: str | Path) -> pd.DataFrame:
    """probes/predictions.csv: question_id, feature and probe as text; fold, label and score as numbers."""
    return as_numbers(read_text_table(path), PREDICTION_NUMBERS)


def read_groups(path: str | Path) -> pd.DataFrame:
    """probes/groups.csv: feature, probe and group as text; n, n_positive and auroc as numbers."""
    return as_numbers(read_text_table(path), GROUP_NUMBERS)


def read_settings(path: str | Path) -> dict[str, Any]:
    """How the probes were trained: the single values of probes/results.json (not its per-result list); {} without
    the file."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDamagedError(f"{path} is damaged (not JSON: {err}); {REWRITE}") from err
    if not isinstance(loaded, dict):
        return {}
    return {key: value for key, value in loaded.items() if not isinstance(value, (list, dict))}


def best_result(results: pd.DataFrame) -> pd.Series | None:
    """The feature x probe row with the highest auroc_mean (ties: the earlier row); None when no row has one."""
    ranked = results.dropna(subset=["auroc_mean"])
    if ranked.empty:
        return None
    return ranked.loc[ranked["auroc_mean"].idxmax()]
