"""Label Studio interop: a run's rows as Label Studio tasks, and a Label Studio JSON export read back.

Export (`halp review RUN --export label-studio tasks.json`): one task per row with the image, question,
ground truth, model answer and metadata in `data`, and the rule label, where the rules give one, as a
prediction (model_version `halp-rules`) so annotators see it pre-selected. The labeling config to paste
into the project (`LABEL_CONFIG`) is written beside the tasks (`tasks.label_config.xml`); its choice
control is `verdict` with the values `hallucinated`, `correct`, `unsure` and the hotkeys h/c/u.

Import (`halp label RUN --labels export.json`): Label Studio's JSON export (each task with its
`annotations`) or JSON-MIN export (one flat object per annotation). Every annotation becomes a
decision of reviewer `ls-<annotator>` and goes through the same merge as `halp review`'s decisions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from halp.errors import LabelError
from halp.layout import atomic_write
from halp.review.model import VERDICT_LABELS, Decision
from halp.userfiles import read_user_file

#: Where Label Studio serves files of its local-files storage; image ids are appended, URL-quoted.
DEFAULT_IMAGE_URL_PREFIX = "/data/local-files/?d="
CONTROL = "verdict"
MODEL_VERSION = "halp-rules"
LABEL_CONFIG = """<View>
  <Header value="$question"/>
  <Image name="image" value="$image" zoom="true" zoomControl="true"/>
  <Text name="answer" value="$answer"/>
  <Text name="ground_truth" value="$ground_truth"/>
  <Text name="rule" value="$rule"/>
  <Choices name="verdict" toName="image" choice="single" showInline="true" required="true">
    <Choice value="hallucinated" hotkey="h"/>
    <Choice value="correct" hotkey="c"/>
    <Choice value="unsure" hotkey="u"/>
  </Choices>
</View>
"""


def config_path(tasks_path: str | Path) -> Path:
    path = Path(tasks_path)
    return path.with_name(f"{path.stem}.label_config.xml")


def make_tasks(rows: Sequence[Any], image_url_prefix: str = DEFAULT_IMAGE_URL_PREFIX) -> list[dict[str, Any]]:
    """Label Studio tasks for review rows (`halp.review.session.Row`)."""
    tasks = []
    for row in rows:
        rule = row.rule
        data: dict[str, Any] = {
            "image": image_url_prefix + quote(row.image_id),
            "question_id": row.question_id,
            "image_id": row.image_id,
            "question": row.question,
            "ground_truth": row.ground_truth,
            "answer": row.answer,
            "rule": f"{rule.method}: {rule.reason}",
            **{f"meta_{name}": value for name, value in row.meta.items()},
        }
        if row.risk is not None:
            data["risk"] = row.risk
        task: dict[str, Any] = {"data": data}
        if rule.label is not None:
            verdict = "hallucinated" if rule.label == 1 else "correct"
            task["predictions"] = [
                {
                    "model_version": MODEL_VERSION,
                    "result": [
                        {"from_name": CONTROL, "to_name": "image", "type": "choices", "value": {"choices": [verdict]}}
                    ],
                }
            ]
        tasks.append(task)
    return tasks


def write_tasks(
    rows: Sequence[Any], out: str | Path, image_url_prefix: str = DEFAULT_IMAGE_URL_PREFIX
) -> tuple[Path, Path]:
    """Write the tasks (JSON) and the labeling config beside them; returns both paths."""
    out = Path(out)
    with atomic_write(out) as handle:
        json.dump(make_tasks(rows, image_url_prefix), handle, ensure_ascii=False, indent=1)
    config = config_path(out)
    with atomic_write(config) as handle:
        handle.write(LABEL_CONFIG)
    return out, config


# ----- import ----------------------------------------------------------------------------------------------------
def _load(path: str | Path) -> Any:
    data = read_user_file(path, "Label Studio export", error=LabelError)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise LabelError(f"{path} cannot be read as a Label Studio JSON export: {err}") from err


def _looks_like_export(content: Any) -> bool:
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        return False
    first = content[0]
    return "annotations" in first or (CONTROL in first and "question_id" in first and "data" not in first)


def is_export(path: str | Path) -> bool:
    """Whether `path` is a Label Studio JSON or JSON-MIN export (a .json list of annotated tasks)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        return _looks_like_export(_load(path))
    except LabelError:
        return False


_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")


def _reviewer(completed_by: Any) -> str:
    """`ls-<annotator>`: Label Studio gives an id, or an object with an email and an id."""
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("email") or completed_by.get("id")
    name = _UNSAFE.sub("_", str(completed_by if completed_by not in (None, "") else "unknown"))
    return f"ls-{name}"[:64]


def _verdict(value: Any, where: str) -> str:
    choices = value if isinstance(value, list) else [value]
    if len(choices) != 1 or not isinstance(choices[0], str):
        raise LabelError(f"{where}: expected one choice of {', '.join(VERDICT_LABELS)}, got {value!r}")
    verdict = choices[0].strip().lower()
    if verdict not in VERDICT_LABELS:
        raise LabelError(f"{where}: choice {choices[0]!r} is not one of {', '.join(VERDICT_LABELS)}")
    return verdict


def _choice_of(result: Sequence[Any], where: str) -> str | None:
    """The verdict of an annotation's result list: the `verdict` choices, else its only choices region."""
    regions = [item for item in result if isinstance(item, dict) and item.get("type") == "choices"]
    named = [item for item in regions if item.get("from_name") == CONTROL]
    chosen = named or regions
    if not chosen:
        return None
    if len(chosen) > 1:
        raise LabelError(f"{where}: several choice controls; name the verdict control {CONTROL!r}")
    return _verdict(chosen[0].get("value", {}).get("choices"), where)


def read_export(path: str | Path) -> list[Decision]:
    """Every annotation of a Label Studio JSON (or JSON-MIN) export as a decision, in time order."""
    content = _load(path)
    if not _looks_like_export(content):
        raise LabelError(f"{path} is not a Label Studio export (a JSON list of tasks with annotations)")
    decisions = []
    for number, task in enumerate(content):
        if not isinstance(task, dict):
            raise LabelError(f"{path}: item {number} is not a task object")
        where = f"{path}: task {task.get('id', number)}"
        if "annotations" not in task:  # JSON-MIN: one flat object per annotation
            qid, verdict = task.get("question_id"), task.get(CONTROL)
            if qid is None:
                raise LabelError(f"{where} has no question_id")
            if verdict in (None, "", []):
                continue
            decisions.append(
                Decision(
                    f"ls-{task.get('annotation_id', number)}", str(qid), _verdict(verdict, where),
                    _reviewer(task.get("annotator")), str(task.get("updated_at") or task.get("created_at") or ""),
                )
            )  # fmt: skip
            continue
        data = task.get("data") or {}
        qid = data.get("question_id")
        if qid is None:
            raise LabelError(f"{where} has no data.question_id (export the tasks with `halp review --export`)")
        for annotation in task.get("annotations") or []:
            if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
                continue
            verdict = _choice_of(annotation.get("result") or [], f"{where}, annotation {annotation.get('id')}")
            if verdict is None:
                continue
            decisions.append(
                Decision(
                    f"ls-{task.get('id', number)}-{annotation.get('id')}", str(qid), verdict,
                    _reviewer(annotation.get("completed_by")),
                    str(annotation.get("updated_at") or annotation.get("created_at") or ""),
                )
            )  # fmt: skip
    # Stable sort: annotations without a time keep their file order, before the timed ones.
    return sorted(decisions, key=lambda decision: decision.time)
