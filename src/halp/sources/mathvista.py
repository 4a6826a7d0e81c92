"""MathVista (Lu et al. 2024): math reasoning on figures, charts, plots and photos.

Published as the hub dataset AI4Math/MathVista (splits testmini, 1,000 with answers, and test, answers withheld):
Parquet with `pid, question, image` (a path), `decoded_image` (the image), `choices` (null for free-form),
`unit, precision, answer, question_type` (multi_choice / free_form), `answer_type` (text / integer / float / list),
`metadata` (category, context, grade, skills, source, task, ...) and `query` (the prompt with its hint); and as
the repository's `testmini.json` / `test.json`: an object `pid -> problem` with the same fields, beside `images/`.

Multiple choice: the choices are folded into the question as lettered options, `(A) ...` one per line, and the
ground truth becomes the letter of the correct choice. Numbers keep their unit and precision in `extra` (the
label rules round to `precision` decimals, as MathVista's scorer does). Lists and texts are open answers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from halp.errors import SourceError
from halp.sources.common import (
    ConvertSummary,
    Row,
    embedded_bytes,
    file_bytes,
    hub_parquet,
    is_present,
    parquet_rows,
    read_json,
    require_split,
    split_of,
    unknown_layout,
    write_table,
)

NAME = "mathvista"
EXPECTED = (
    "Parquet files with pid, question, decoded_image, choices, answer, question_type, answer_type (AI4Math/MathVista), "
    "or testmini.json / test.json (pid -> problem) beside images/"
)
KEYS = ("pid", "question", "answer", "question_type", "answer_type")
LETTERS = "ABCDEFGH"


def convert(path: Path, out: Path, images: Path | None = None, split: str | None = None) -> ConvertSummary:
    files = hub_parquet(path, split, (*KEYS, "decoded_image"), NAME, EXPECTED)
    if files is not None:
        rows = ((split_of(file, path), row, None) for file, row in parquet_rows(files))
        return write_table(NAME, _rows(rows), out, "hub parquet", str(path))
    candidates = [path] if is_present(path) else sorted(
        p for p in path.glob("*.json") if p.stem in {"testmini", "test"}
    )
    if not candidates or candidates[0].suffix != ".json":
        raise unknown_layout(NAME, path, EXPECTED)
    if split is not None:
        candidates = [p for p in candidates if p.stem == split]
        require_split(path, candidates, split, sorted(p.stem for p in candidates) or ["testmini", "test"])
    def items() -> Iterator[tuple[str, dict[str, Any], Path]]:
        for file in candidates:
            problems = read_json(file)
            if not isinstance(problems, dict):
                raise SourceError(f"{file}: expected an object pid -> problem; found a {type(problems).__name__}")
            for pid, problem in problems.items():
                missing = [key for key in KEYS if key not in problem and key != "pid"]
                if missing:
                    raise SourceError(f"{file} problem {pid}: missing {', '.join(missing)}")
                yield file.stem, {"pid": pid, **problem}, images or file.parent

    return write_table(NAME, _rows(items()), out, "problems json + images", str(path))


def _precision(value: Any) -> int | None:
    """Decimal places of a float answer; None when absent (NaN in Parquet, null in JSON)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def fold_choices(question: str, choices: list[str]) -> str:
    """The question with its choices as lettered options, one per line."""
    options = "\n".join(f"({LETTERS[index]}) {choice}" for index, choice in enumerate(choices))
    return f"{question.strip()}\nChoices:\n{options}"


def _rows(items: Iterator[tuple[str, dict[str, Any], Path | None]]) -> Iterator[Row]:
    for split, problem, folder in items:
        pid = str(problem["pid"])
        what = f"MathVista {pid}"
        choices = problem.get("choices")
        if choices is not None and not isinstance(choices, list):
            choices = list(choices)
        answer = "" if problem.get("answer") is None else str(problem["answer"]).strip()
        question = str(problem["question"])
        metadata = problem.get("metadata") or {}
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        if problem["question_type"] == "multi_choice" and choices:
            if len(choices) > len(LETTERS):
                raise SourceError(f"{what}: {len(choices)} choices; halp letters at most {len(LETTERS)}")
            question = fold_choices(question, [str(choice) for choice in choices])
            matches = [index for index, choice in enumerate(choices) if str(choice).strip() == answer]
            answer_format = "choice"
            # testmini answers are one of the choices; test answers are withheld (empty).
            ground_truth = LETTERS[matches[0]] if len(matches) == 1 else ""
        elif problem["answer_type"] in {"integer", "float"}:
            answer_format, ground_truth = "number", answer
        else:
            answer_format, ground_truth = "text" if answer else "open", answer
        image_name = str(problem.get("image") or f"images/{pid}.jpg")
        image = (file_bytes(folder, image_name, what) if folder is not None
                 else embedded_bytes(problem.get("decoded_image"), what))
        yield Row(
            source_id=pid,
            image_id=Path(image_name).name,
            question=question,
            answer=ground_truth,
            answer_format=answer_format,
            category=str(metadata.get("category", "")),
            image=image,
            references=[answer] if answer else [],
            split=split,
            extra={
                "unit": str(problem.get("unit") or ""),
                "precision": _precision(problem.get("precision")),
                "question_type": str(problem["question_type"]),
                "answer_type": str(problem["answer_type"]),
                "choices": [str(choice) for choice in choices] if choices else [],
                "task": str(metadata.get("task", "")),
                "context": str(metadata.get("context", "")),
            },
        )
