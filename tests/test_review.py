"""Manual review: the reviews.jsonl log, its merge into labels.csv, Label Studio interop, the session and the app.

The page itself is driven in a real browser in test_review_browser.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import parse_qs, urlsplit
from urllib.request import Request, urlopen

import h5py
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import halp
from halp.cli import app
from halp.data import Sample
from halp.errors import HalpError, ReviewError, ReviewServerError
from halp.label import Label, label_run
from halp.review.decisions import Decision, ReviewLog, ReviewState, agreement, merge_decisions
from halp.review.label_studio import LABEL_CONFIG, read_export
from halp.review.session import ReviewSession, pace_per_minute
from halp.store import rows_for, write_rows
from halp.testing import make_vqa_set


def require_web_stack() -> None:
    pytest.importorskip("starlette", reason="the review extra (starlette, uvicorn) is not installed")
    pytest.importorskip("uvicorn", reason="the review extra (starlette, uvicorn) is not installed")


# (question, ground truth, answer): rows 0-2 the rules label, 3-5 they leave unknown.
ROWS = [
    ("Is there a red shape in the image?", "yes", "Yes, there is a red circle."),  # rule: correct
    ("How many shapes are there?", "1", "There are 3 shapes."),  # rule: hallucinated
    ("What color is the shape?", "red", "The shape is red."),  # rule: correct
    ("What color is the shape?", "blue", "It looks <b>crimson</b> <script>alert(1)</script>"),  # paraphrase
    ("Describe the image.", "a green shape", "A green ball on grass."),  # open
    ("Is the picture bright or dark?", "dark", "It is hard to tell."),  # hedge
]


def make_run(root: Path, rows=ROWS, generated: bool = True, categories=None) -> tuple[Path, Path]:
    """A finished run (features.h5 with answers) over real PNGs of halp.testing's VQA set."""
    _, images = make_vqa_set(root / "data", n=len(rows))
    categories = categories or [f"cat{i % 2}" for i in range(len(rows))]
    samples = [
        Sample(f"q{i}", f"img_{i:04d}.png", q, gt, {"category": categories[i], "dataset": "toy"})
        for i, (q, gt, _) in enumerate(rows)
    ]
    rng = np.random.default_rng(0)
    features = {"vision_only": rng.normal(size=(len(rows), 6)).astype(np.float32)}
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    answers = [a if generated else "" for _, _, a in rows]
    attrs = {"model_id": "toy", "generated": generated, "max_new_tokens": 8 if generated else 0}
    write_rows(run / "features.h5", rows_for(samples, answers, features), attrs)
    return run, images


def read_labels(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "labels.csv", dtype=str, keep_default_na=False).set_index("question_id")


def decision(qid: str, label: str | None, reviewer: str, n: int) -> Decision:
    return Decision(f"d{n}", qid, label, reviewer, f"2026-01-01T00:00:{n:02d}.000Z")


# ----- the log ---------------------------------------------------------------------------------------------------
def test_decisions_are_appended_with_the_previous_label_and_read_back(tmp_path):
    log = ReviewLog(tmp_path / "reviews.jsonl")
    first = log.decide("q1", "hallucinated", "ana")
    second = log.decide("q1", "correct", "ana")
    log.decide("q2", "unsure", "bob")
    assert (first.previous, second.previous) == (None, "hallucinated")
    lines = (tmp_path / "reviews.jsonl").read_text().splitlines()
    assert len(lines) == 3
    record = json.loads(lines[1])
    assert set(record) == {"id", "question_id", "label", "reviewer", "time", "previous", "action", "undoes"}
    assert (record["question_id"], record["label"], record["reviewer"], record["previous"]) == (
        "q1", "correct", "ana", "hallucinated",
    )  # fmt: skip
    assert datetime.fromisoformat(record["time"].replace("Z", "+00:00")).tzinfo is not None
    again = ReviewLog(tmp_path / "reviews.jsonl")
    again.refresh()
    assert again.state.current("ana", "q1") == "correct"
    assert again.state.current("bob", "q2") == "unsure"
    assert again.state.current("bob", "q1") is None
    assert again.damaged == []


def test_undo_goes_back_step_by_step_and_refuses_a_row_changed_since(tmp_path):
    log = ReviewLog(tmp_path / "reviews.jsonl")
    first = log.decide("q1", "hallucinated", "ana")
    second = log.decide("q1", "correct", "ana")
    undone = log.undo(second.id, "ana")
    assert (undone.label, undone.previous, undone.action) == ("hallucinated", "correct", "undo")
    assert undone.undoes == second.id
    assert log.state.current("ana", "q1") == "hallucinated"
    log.undo(first.id, "ana")
    assert log.state.current("ana", "q1") is None
    third = log.decide("q2", "correct", "ana")
    log.decide("q2", "unsure", "ana")  # another tab changed the row
    with pytest.raises(ReviewError, match="changed since"):
        log.undo(third.id, "ana")
    with pytest.raises(ReviewError, match="not bob's"):
        log.undo(third.id, "bob")
    with pytest.raises(ReviewError, match="no decision"):
        log.undo("nope", "ana")
    assert len((tmp_path / "reviews.jsonl").read_text().splitlines()) == 6  # refusals wrote nothing


def test_a_torn_last_line_is_not_read_then_ended_and_counted_never_glued(tmp_path):
    path = tmp_path / "reviews.jsonl"
    log = ReviewLog(path)
    log.decide("q1", "hallucinated", "ana")
    with path.open("ab") as handle:  # a writer killed in the middle of its line
        handle.write(b'{"id": "x", "question_id": "q2", "lab')
    reader = ReviewLog(path)
    reader.refresh()
    assert len(reader.state.decisions) == 1 and reader.damaged == []
    ReviewLog(path).decide("q3", "correct", "ana")
    reread = ReviewLog(path)
    reread.refresh()
    assert [d.question_id for d in reread.state.decisions] == ["q1", "q3"]
    assert reread.damaged == [2]


def test_an_unwritable_log_is_a_clear_error_not_a_lost_decision(tmp_path):
    (tmp_path / "reviews.jsonl").mkdir()  # something that cannot be appended to, even by root
    with pytest.raises(ReviewError, match=r"cannot open .*reviews\.jsonl to append: .*the decision was not saved"):
        ReviewLog(tmp_path / "reviews.jsonl").decide("q1", "correct", "ana")


def test_bad_reviewer_names_and_labels_are_refused(tmp_path):
    log = ReviewLog(tmp_path / "reviews.jsonl")
    with pytest.raises(ReviewError, match="not allowed"):
        log.decide("q1", "correct", "<b>x</b>")
    with pytest.raises(ReviewError, match="not one of"):
        log.decide("q1", "maybe", "ana")
    assert not (tmp_path / "reviews.jsonl").exists()


WRITE_MANY = """
import sys
from halp.review.decisions import ReviewLog
log = ReviewLog(sys.argv[1])
for i in range(20):
    log.decide(f"q{i}", "hallucinated" if i % 2 else "correct", sys.argv[2])
"""


def test_concurrent_writers_in_threads_and_processes_lose_nothing(tmp_path):
    path = tmp_path / "reviews.jsonl"
    shared = ReviewLog(path)  # one server, several tabs: threads on one log
    threads = [
        threading.Thread(target=lambda r=r: [shared.decide(f"t{i}", "unsure", r) for i in range(20)])
        for r in ("tab1", "tab2")
    ]
    # Two servers on the same run: processes appending to one file.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(halp.__file__).parents[1]), *sys.path])}
    processes = [
        subprocess.Popen([sys.executable, "-c", WRITE_MANY, str(path), name], env=env) for name in ("ana", "bob")
    ]
    for worker in threads:
        worker.start()
    for worker in threads:
        worker.join(timeout=120)
    assert [process.wait(timeout=120) for process in processes] == [0, 0]
    reread = ReviewLog(path)
    reread.refresh()
    assert reread.damaged == []
    assert len(reread.state.decisions) == 80
    assert len({d.id for d in reread.state.decisions}) == 80
    for name in ("ana", "bob"):
        assert len(reread.state.reviewed_by(name)) == 20
        assert reread.state.current(name, "q3") == "hallucinated"


# ----- merging into labels ---------------------------------------------------------------------------------------
AUTO = [
    Label(1, "rule:yesno", "answer says yes, ground truth no", "yesno"),
    Label(0, "rule:number", "answer says 2, ground truth 2", "number"),
    Label(None, "none", "open-ended answer", "open"),
    Label(None, "rule:short", "paraphrase", "short"),
]
IDS = ["q0", "q1", "q2", "q3"]


def test_the_latest_decision_of_a_reviewer_wins_and_the_method_names_them():
    state = ReviewState([decision("q0", "correct", "ana", 1), decision("q0", "hallucinated", "ana", 2),
                         decision("q2", "correct", "ana", 3), decision("q2", "correct", "bob", 4)])  # fmt: skip
    merged, summary = merge_decisions(IDS, AUTO, state)
    assert (merged[0].label, merged[0].method) == (1, "manual:ana")
    assert (merged[2].label, merged[2].method) == (0, "manual:ana+bob")
    assert "none said unknown" not in merged[2].reason and "rule:yesno said hallucinated" in merged[0].reason
    assert merged[1] == AUTO[1] and merged[3] == AUTO[3]
    assert (summary.reviewed, summary.labelled, summary.conflicts, summary.changed) == (2, 2, [], 0)
    assert summary.reviewers == {"ana": 2, "bob": 1}


def test_conflicts_stay_unknown_and_are_reported_unless_resolved_by_the_latest():
    state = ReviewState([decision("q3", "hallucinated", "ana", 1), decision("q3", "correct", "bob", 2)])
    merged, summary = merge_decisions(IDS, AUTO, state)
    assert (merged[3].label, merged[3].method) == (None, "manual:conflict")
    assert summary.conflicts == [("q3", "reviewers disagree: ana hallucinated, bob correct")]
    merged, summary = merge_decisions(IDS, AUTO, state, resolve="latest")
    assert (merged[3].label, merged[3].method) == (0, "manual:bob")
    assert summary.conflicts == [] and len(summary.resolved) == 1
    with pytest.raises(ReviewError, match="resolve='vote'"):
        merge_decisions(IDS, AUTO, state, resolve="vote")


def test_unsure_withdraws_a_rule_label_and_a_withdrawn_decision_restores_it():
    state = ReviewState([decision("q0", "unsure", "ana", 1), decision("q1", "hallucinated", "ana", 2),
                         decision("q1", None, "ana", 3)])  # fmt: skip
    merged, summary = merge_decisions(IDS, AUTO, state)
    assert (merged[0].label, merged[0].method) == (None, "manual:ana")
    assert merged[1] == AUTO[1]  # the undo took ana's decision back: the rule's label stands
    assert (summary.unsure, summary.changed, summary.reviewed) == (1, 1, 1)


def _kappa_by_formula(a: list[str], b: list[str]) -> float:
    categories = sorted(set(a) | set(b))
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    expected = sum((a.count(c) / n) * (b.count(c) / n) for c in categories)
    return (observed - expected) / (1 - expected)


def test_agreement_with_the_rules_and_cohens_kappa_between_reviewers_match_the_formula():
    ids = [f"q{i}" for i in range(10)]
    auto = [Label(i % 2, "rule:yesno", "", "yesno") for i in range(8)] + [Label(None, "none", "", "open")] * 2
    ana = ["hallucinated", "correct", "hallucinated", "hallucinated", "hallucinated", "correct", "correct", "correct",
           "unsure", "hallucinated"]  # fmt: skip
    bob = ["hallucinated", "correct", "correct", "hallucinated", "hallucinated", "correct", "correct", "hallucinated",
           "unsure", "correct"]  # fmt: skip
    decisions = [decision(q, label, "ana", i) for i, (q, label) in enumerate(zip(ids, ana, strict=True))]
    decisions += [decision(q, label, "bob", 20 + i) for i, (q, label) in enumerate(zip(ids, bob, strict=True))]
    _, summary = merge_decisions(ids, auto, ReviewState(decisions), resolve="latest")
    (pair,) = summary.reviewer_pairs
    assert (pair.first, pair.second, pair.n, pair.agree) == ("ana", "bob", 10, 7)
    assert pair.kappa == pytest.approx(_kappa_by_formula(ana, bob), abs=1e-12)
    # Rule vs manual over the 8 rule-labelled rows, the manual side resolved to bob's (later) verdict.
    (rule,) = summary.automatic
    rule_words = ["hallucinated" if i % 2 else "correct" for i in range(8)]
    agreeing = sum(r == m for r, m in zip(rule_words, bob[:8], strict=True))
    assert (rule.first, rule.n, rule.agree) == ("rule", 8, agreeing)
    assert rule.kappa == pytest.approx(_kappa_by_formula(rule_words, bob[:8]), abs=1e-12)
    assert sum(rule.table.values()) == 8


def test_kappa_is_undefined_when_both_sides_use_one_category():
    assert agreement("a", "b", [("correct", "correct")] * 3).kappa is None
    assert agreement("a", "b", [("correct", "hallucinated")]).kappa is None  # one row


# ----- halp label ------------------------------------------------------------------------------------------------
def test_halp_label_takes_reviews_reports_conflicts_and_kappa(tmp_path):
    run, _ = make_run(tmp_path)
    log = ReviewLog(run / "reviews.jsonl")
    log.decide("q3", "hallucinated", "ana")
    log.decide("q4", "correct", "ana")
    log.decide("q4", "hallucinated", "bob")  # conflict
    log.decide("q0", "hallucinated", "ana")  # overrides the rule's "correct"
    log.decide("q0", "hallucinated", "bob")
    runner = CliRunner()
    result = runner.invoke(app, ["label", str(run)])
    assert result.exit_code == 0, result.output
    labels = read_labels(run)
    assert (labels.loc["q3", "label"], labels.loc["q3", "method"]) == ("1", "manual:ana")
    assert (labels.loc["q4", "label"], labels.loc["q4", "method"]) == ("", "manual:conflict")
    assert (labels.loc["q0", "label"], labels.loc["q0", "method"]) == ("1", "manual:ana+bob")
    assert labels.loc["q1", "method"] == "rule:number"
    assert "1 in conflict" in result.output and "q4: reviewers disagree: ana correct, bob hallucinated" in result.output
    assert "rule vs manual" in result.output and "ana vs bob" in result.output and "Cohen's kappa" in result.output
    result = runner.invoke(app, ["label", str(run), "--resolve", "latest"])
    assert result.exit_code == 0, result.output
    assert (read_labels(run).loc["q4", "label"], read_labels(run).loc["q4", "method"]) == ("1", "manual:bob")


def test_reviews_apply_over_an_imported_table_too(tmp_path):
    run, _ = make_run(tmp_path)
    table = tmp_path / "manual.csv"
    table.write_text("question_id,label\nq0,0\nq1,1\nq3,0\n")
    log = ReviewLog(run / "reviews.jsonl")
    log.decide("q1", "hallucinated", "ana")
    log.decide("q3", "hallucinated", "ana")
    summary = label_run(run, labels=table)
    labels = read_labels(run)
    assert (labels.loc["q0", "label"], labels.loc["q0", "method"]) == ("0", "manual")
    assert (labels.loc["q3", "label"], labels.loc["q3", "method"]) == ("1", "manual:ana")
    (versus,) = summary.reviews.automatic
    assert (versus.first, versus.n, versus.agree) == ("table", 2, 1)


def test_halp_label_then_probe_trains_on_reviewed_rows(tmp_path):
    from halp.probe import train_probes

    run, _ = make_run(tmp_path, ROWS * 3)
    log = ReviewLog(run / "reviews.jsonl")
    reviewed = [i for i in range(18) if i % 6 >= 3]  # the 9 rows the rules leave unknown
    for i in reviewed:
        log.decide(f"q{i}", "hallucinated" if i % 2 else "correct", "ana")
    assert CliRunner().invoke(app, ["label", str(run)]).exit_code == 0
    # A fixed C: choosing it by inner CV on these random features is slow and beside the point here.
    results = train_probes(run, folds=2, bootstrap=0, group_by_image=False, probe_params={"logreg": {"C": 1.0}})
    assert results["n"].tolist() == [18]  # 9 labelled by the rules, 9 by ana
    predictions = pd.read_csv(run / "probes" / "predictions.csv", dtype={"question_id": str}).set_index("question_id")
    assert len(predictions) == 18
    assert {qid: predictions.loc[f"q{qid}", "label"] for qid in reviewed} == {i: i % 2 for i in reviewed}


def test_the_report_shows_rule_vs_manual_agreement_and_kappa(tmp_path):
    from halp.probe import train_probes
    from halp.report import build_report

    run, _ = make_run(tmp_path, ROWS * 3)
    log = ReviewLog(run / "reviews.jsonl")
    for i in range(18):
        log.decide(f"q{i}", "hallucinated" if i % 2 else "correct", "ana")
        if i < 6:
            log.decide(f"q{i}", "correct", "bob")
    label_run(run)
    train_probes(run, folds=2, bootstrap=0, group_by_image=False, probe_params={"logreg": {"C": 1.0}})
    page = build_report(run).html_path.read_text()
    assert "<h2>Manual review</h2>" in page and "18 rows reviewed by ana (18), bob (6); 3 in conflict" in page
    # The rules label rows 0-2 of every 6 as the answers are (correct, hallucinated, correct), as ana does; bob's
    # "correct" puts q1, q3, q5 in conflict, so rule vs manual compares the other 8 rule-labelled rows.
    assert "<td>rule vs manual</td><td>8</td><td>8</td><td>1.000</td>" in page
    assert "<td>ana vs bob</td><td>6</td><td>3</td><td>0.500</td><td>0.000</td>" in page


# ----- Label Studio ----------------------------------------------------------------------------------------------
def test_export_writes_tasks_with_rule_predictions_and_a_labeling_config(tmp_path):
    run, _ = make_run(tmp_path)
    out = tmp_path / "tasks.json"
    result = CliRunner().invoke(app, ["review", str(run), "--export", "label-studio", str(out)])
    assert result.exit_code == 0, result.output
    tasks = json.loads(out.read_text())
    assert [task["data"]["question_id"] for task in tasks] == [f"q{i}" for i in range(6)]
    first = tasks[0]["data"]
    assert first["image"] == "/data/local-files/?d=img_0000.png"
    assert (first["question"], first["ground_truth"], first["answer"]) == ROWS[0]
    assert first["meta_category"] == "cat0"
    predicted = {t["data"]["question_id"]: t["predictions"][0]["result"][0]["value"]["choices"] for t in tasks
                 if "predictions" in t}  # fmt: skip
    assert predicted == {"q0": ["correct"], "q1": ["hallucinated"], "q2": ["correct"]}
    config = ET.fromstring((tmp_path / "tasks.label_config.xml").read_text())
    choices = config.find("Choices")
    assert choices.get("name") == "verdict"
    assert [c.get("value") for c in choices] == ["hallucinated", "correct", "unsure"]
    assert LABEL_CONFIG.count("$image") == 1


def _annotation(annotation_id: int, who, verdict: str, when: str) -> dict:
    region = {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": [verdict]}}
    return {"id": annotation_id, "completed_by": who, "result": [region], "was_cancelled": False, "updated_at": when}


def test_halp_label_reads_a_label_studio_export(tmp_path):
    run, _ = make_run(tmp_path)
    export = [
        {"id": 1, "data": {"question_id": "q0"}, "annotations": [
            _annotation(11, 7, "hallucinated", "2026-01-01T10:00"),
        ]},
        {"id": 2, "data": {"question_id": "q1"}, "annotations": [
            _annotation(12, 7, "correct", "2026-01-01T10:01"),
            _annotation(13, {"id": 8, "email": "bob@lab.org"}, "hallucinated", "2026-01-01T10:02"),
        ]},
        {"id": 3, "data": {"question_id": "q2"}, "annotations": [
            {**_annotation(14, 7, "correct", "2026-01-01T10:03"), "was_cancelled": True},
        ]},
        {"id": 4, "data": {"question_id": "q3"}, "annotations": [_annotation(15, 7, "unsure", "2026-01-01T10:04")]},
        {"id": 5, "data": {"question_id": "elsewhere"}, "annotations": [_annotation(16, 7, "correct", "2026-01-01")]},
    ]  # fmt: skip
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    result = CliRunner().invoke(app, ["label", str(run), "--labels", str(path)])
    assert result.exit_code == 0, result.output
    labels = read_labels(run)
    assert (labels.loc["q0", "label"], labels.loc["q0", "method"]) == ("1", "manual:ls-7")
    assert (labels.loc["q1", "label"], labels.loc["q1", "method"]) == ("", "manual:conflict")
    assert (labels.loc["q2", "label"], labels.loc["q2", "reason"]) == ("", "not annotated in export.json")
    assert (labels.loc["q3", "label"], labels.loc["q3", "method"]) == ("", "manual:ls-7")
    assert "1 reviewed question_id(s) are not in this run" in result.output
    assert CliRunner().invoke(app, ["label", str(run), "--labels", str(path), "--resolve", "latest"]).exit_code == 0
    assert (read_labels(run).loc["q1", "label"], read_labels(run).loc["q1", "method"]) == ("1", "manual:ls-bob@lab.org")


def test_a_json_min_export_and_bad_choices(tmp_path):
    path = tmp_path / "min.json"
    path.write_text(json.dumps([
        {"id": 1, "question_id": "q0", "verdict": "Hallucinated", "annotator": 3, "annotation_id": 9},
        {"id": 2, "question_id": "q1", "verdict": "", "annotator": 3, "annotation_id": 10},
    ]))  # fmt: skip
    (only,) = read_export(path)
    assert (only.question_id, only.label, only.reviewer) == ("q0", "hallucinated", "ls-3")
    path.write_text(json.dumps([{"id": 1, "data": {"question_id": "q0"},
                                 "annotations": [_annotation(1, 3, "wrong", "2026")]}]))  # fmt: skip
    with pytest.raises(HalpError, match="'wrong' is not one of hallucinated, correct, unsure"):
        read_export(path)


# ----- the session -----------------------------------------------------------------------------------------------
def test_a_run_without_answers_is_refused(tmp_path):
    run, images = make_run(tmp_path, generated=False)
    with pytest.raises(ReviewError, match="--no-generate: there are no answers to review"):
        ReviewSession(run, images, "ana")
    result = CliRunner().invoke(app, ["review", str(run), "--images", str(images)])
    assert result.exit_code == 2
    assert "no answers to review" in result.output and "Traceback" not in result.output


def test_queues_filters_and_risk_order(tmp_path):
    run, images = make_run(tmp_path)
    session = ReviewSession(run, images, "ana")
    assert session.queue("unknown") == [3, 4, 5]
    assert session.queue("rules") == [0, 1, 2]
    assert session.queue("all") == list(range(6))
    assert session.queue("all", "category=cat1") == [1, 3, 5]
    assert session.queue("unknown", {"answer_type": "open"}) == [4]
    assert session.queue("disagree") == []
    session.decide(4, "correct", "ana")
    session.decide(4, "hallucinated", "bob")
    session.decide(3, "correct", "bob")
    assert session.queue("disagree") == [4]
    for index, risk in zip(range(6), [0.2, None, 0.9, 0.5, None, 0.7], strict=True):
        session.rows[index].risk = risk
    assert session.queue("all", order="risk") == [2, 5, 3, 0, 1, 4]
    with pytest.raises(ReviewError, match="cannot filter by 'colour'"):
        session.queue("all", "colour=red")
    with pytest.raises(ReviewError, match="queue 'later'"):
        session.queue("later")
    progress = session.progress(session.queue("unknown"), "ana")
    assert (progress["done"], progress["total"]) == (1, 3)


def test_images_are_served_only_from_inside_the_images_directory(tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG not really")
    rows = [*ROWS[:2], ("Q?", "yes", "Yes."), ("Q?", "yes", "Yes."), ("Q?", "yes", "Yes."), ("Q?", "yes", "Yes.")]
    run, images = make_run(tmp_path, rows)
    (images / "link.png").symlink_to(outside)
    (images / "page.html").write_text("<script>alert(1)</script>")
    with h5py.File(run / "features.h5", "r+") as handle:
        ids = [b"../secret.png", b"link.png", b"gone.png", b"page.html"]
        handle["image_id"][2:6] = ids
    session = ReviewSession(run, images, "ana")
    assert session.image(0)[1] == "ok"
    assert session.image(2)[1] == "outside" and session.image(3)[1] == "outside"
    status, shown = session.image(4)[1:]
    assert status == "missing" and shown == str((images / "gone.png").resolve())
    client = _client(session)
    assert client.get("/image/0").headers["content-type"] == "image/png"
    for index in (2, 3, 4):
        response = client.get(f"/image/{index}")
        assert response.status_code == 404 and "image" in response.json()["error"]
        assert b"not really" not in response.content
    assert client.get("/image/5").status_code == 415
    item = client.get("/api/item/4").json()
    assert item["image"] == {"url": "image/4", "status": "missing", "path": shown}


def test_risk_is_the_out_of_fold_score_or_the_final_probe_on_unlabelled_rows(tmp_path):
    from halp.probe import load_probe, probe_stem, train_probes

    rows = [(f"Is there a red shape? ({i})", "yes", "Yes." if i % 2 else "No.") for i in range(10)]
    rows += [("Describe the image.", "a shape", "A shape.")] * 2
    run, images = make_run(tmp_path, rows)
    label_run(run)  # rules: 10 labelled (5 each), 2 unknown
    train_probes(run, folds=2, bootstrap=0, seed=0, group_by_image=False, probe_params={"logreg": {"C": 1.0}})
    session = ReviewSession(run, images, "ana")
    predictions = pd.read_csv(run / "probes" / "predictions.csv", dtype={"question_id": str}).set_index("question_id")
    for row in session.rows[:10]:
        assert row.risk == pytest.approx(predictions.loc[row.question_id, "score"], abs=1e-12)
        assert row.risk_source.startswith("out-of-fold score of the logreg probe on vision_only")
    probe, _ = load_probe(probe_stem(run, "vision_only", "logreg"))
    with h5py.File(run / "features.h5", "r") as handle:
        expected = probe.predict_proba(handle["vision_only"][10:12])[:, 1]
    assert [row.risk for row in session.rows[10:]] == pytest.approx(expected.tolist(), abs=1e-9)
    assert "unlabelled when it was trained" in session.rows[10].risk_source


def test_risk_from_halp_predict_output(tmp_path):
    run, images = make_run(tmp_path)
    (run / "risk").mkdir()
    (run / "risk" / "vqa.csv").write_text("question_id,risk,flagged,error\nq3,0.75,1,\nq4,,,image missing\n")
    session = ReviewSession(run, images, "ana")
    assert session.rows[3].risk == pytest.approx(0.75, abs=1e-12)
    assert session.rows[3].risk_source == "halp predict (risk/vqa.csv)"
    assert session.rows[4].risk is None


def test_probes_without_results_show_no_risk_and_say_why(tmp_path):
    run, images = make_run(tmp_path)
    (run / "probes").mkdir()
    predictions = "question_id,feature,probe,fold,label,score\nq0,vision_only,logreg,0,1,0.9\n"
    (run / "probes" / "predictions.csv").write_text(predictions)
    session = ReviewSession(run, images, "ana")
    assert all(row.risk is None for row in session.rows)
    (note,) = session.risk_sources
    assert note.startswith("no probe risk:") and "results.csv does not exist" in note


def test_pace_counts_pauses_up_to_two_minutes():
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert pace_per_minute([start + timedelta(seconds=10 * i) for i in range(4)]) == pytest.approx(6.0, abs=1e-9)
    seconds = [0, 10, 30 * 60, 30 * 60 + 10]
    times = [start + timedelta(seconds=s) for s in seconds]
    assert pace_per_minute(times) == pytest.approx(3 / (10 + 120 + 10) * 60, abs=1e-9)
    assert pace_per_minute(times[:2]) is None


# ----- the app ---------------------------------------------------------------------------------------------------
def _client(session: ReviewSession, token: str | None = None, loopback: bool = True, host: str = "127.0.0.1:8765"):
    require_web_stack()
    from starlette.testclient import TestClient

    from halp.review.app import create_app

    return TestClient(create_app(session, token, loopback), base_url=f"http://{host}")


def test_decide_and_undo_over_http_keep_the_log_and_the_progress(tmp_path):
    run, images = make_run(tmp_path)
    client = _client(ReviewSession(run, images, "ana"))
    queue = client.get("/api/queue").json()
    assert queue["indices"] == [3, 4, 5] and queue["reviewed"] == [False] * 3
    made = client.post("/api/decide", json={"index": 3, "label": "hallucinated"}).json()
    assert made["progress"]["done"] == 1 and made["decision"]["reviewer"] == "ana"
    other = client.post("/api/decide", json={"index": 3, "label": "correct", "reviewer": "bob"}).json()
    item = client.get("/api/item/3").json()
    assert item["mine"] == "hallucinated"
    assert item["others"] == [{"reviewer": "bob", "label": "correct", "time": other["decision"]["time"]}]
    assert item["answer"] == ROWS[3][2]  # the raw string: the page inserts it as text
    undone = client.post("/api/undo", json={"decision_id": made["decision"]["id"]}).json()
    assert undone["index"] == 3 and undone["progress"]["done"] == 0
    response = client.post("/api/undo", json={"decision_id": made["decision"]["id"]})
    assert response.status_code == 409 and "changed since" in response.json()["error"]
    assert client.post("/api/decide", json={"index": 3, "label": "nope"}).status_code == 400
    assert client.post("/api/decide", json={"index": 99, "label": "correct"}).status_code == 400
    assert len((run / "reviews.jsonl").read_text().splitlines()) == 3


def test_page_headers_forbid_inline_scripts_and_framing(tmp_path):
    run, images = make_run(tmp_path)
    client = _client(ReviewSession(run, images, "ana"))
    page = client.get("/")
    assert page.status_code == 200 and "<script src=\"static/review.js\"" in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert client.get("/static/review.js").status_code == 200


def test_a_token_is_required_off_loopback(tmp_path):
    run, images = make_run(tmp_path)
    client = _client(ReviewSession(run, images, "ana"), token="s3cret", loopback=False, host="10.0.0.5:8765")
    assert client.get("/").status_code == 403
    assert client.get("/api/queue").status_code == 403
    assert client.get("/?token=wrong").status_code == 403
    assert client.get("/?token=%C3%A9").status_code == 403  # non-ASCII: refused, not a server error
    first = client.get("/?token=s3cret")
    assert first.status_code == 200 and "httponly" in first.headers["set-cookie"].lower()
    assert client.get("/api/queue").status_code == 200  # the cookie carries the token
    client.cookies.clear()
    assert client.get("/api/queue", headers={"Authorization": "token s3cret"}).status_code == 200


def test_loopback_refuses_other_host_names_and_cross_origin_posts(tmp_path):
    run, images = make_run(tmp_path)
    session = ReviewSession(run, images, "ana")
    assert _client(session, host="evil.example:8765").get("/").status_code == 400  # DNS rebinding
    assert _client(session, host="[::1]:8765").get("/").status_code == 200
    assert _client(session, host="localhost:8765").get("/api/config").status_code == 200
    client = _client(session)
    body = {"index": 3, "label": "correct"}
    assert client.post("/api/decide", json=body, headers={"Origin": "http://evil.example"}).status_code == 403
    form = client.post("/api/decide", content=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert form.status_code == 400 and "application/json" in form.json()["error"]
    assert not (run / "reviews.jsonl").exists()
    same = client.post("/api/decide", json=body, headers={"Origin": "http://127.0.0.1:8765"})
    assert same.status_code == 200


def test_a_port_in_use_is_a_one_line_error(tmp_path):
    from halp.review.app import bind

    require_web_stack()
    run, images = make_run(tmp_path)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ReviewServerError, match=f"port {port} on 127.0.0.1 is in use"):
            bind("127.0.0.1", port)
        result = CliRunner().invoke(app, ["review", str(run), "--images", str(images), "--port", str(port)])
    finally:
        taken.close()
    assert result.exit_code == 2
    assert f"port {port} on 127.0.0.1 is in use" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_listening_socket_is_tcp_so_responses_are_not_held_by_nagle():
    from halp.review.app import bind

    sock = bind("127.0.0.1", 0)
    try:
        # asyncio sets TCP_NODELAY on accepted sockets only when the protocol says TCP; with 0, each small
        # response waited ~40 ms for a delayed ACK (measured: 104 ms per decision instead of 14 ms).
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_another_host_prints_a_token_url_and_refuses_requests_without_it(tmp_path):
    require_web_stack()
    run, images = make_run(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(halp.__file__).parents[1]), *sys.path])}
    server = subprocess.Popen(
        [sys.executable, "-m", "halp", "review", str(run), "--images", str(images), "--host", "0.0.0.0", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        url = urlsplit(server.stdout.readline().strip())
        token = parse_qs(url.query)["token"][0]
        assert len(token) >= 32
        local = f"http://127.0.0.1:{url.port}"
        with pytest.raises(HTTPError) as refused:
            urlopen(f"{local}/api/config", timeout=30)
        assert refused.value.code == 403
        with urlopen(f"{local}/api/config?token={token}", timeout=30) as response:
            assert json.loads(response.read())["rows"] == 6
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "needs the token in this URL" in err


def test_review_needs_images_and_a_known_export_format(tmp_path):
    run, _ = make_run(tmp_path)
    result = CliRunner().invoke(app, ["review", str(run)])
    assert result.exit_code == 2 and "pass --images DIR" in result.output
    result = CliRunner().invoke(app, ["review", str(run), "--export", "cvat", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "choose one of label-studio" in result.output
    images = tmp_path / "data" / "images"
    result = CliRunner().invoke(app, ["review", str(run), "--images", str(images), "--queue", "later"])
    assert result.exit_code == 2
    assert "queue 'later': choose one of unknown, all, rules, disagree, doubtful" in result.output
    result = CliRunner().invoke(app, ["review", str(run), "--images", str(images), "--only", "colour=red"])
    assert result.exit_code == 2 and "cannot filter by 'colour'" in result.output


# ----- review writes only what it accepts (issue 23) ------------------------------------------------------------
def test_a_refused_decision_writes_nothing(tmp_path):
    """Every field is checked before the decision is recorded: before the fix an unknown queue or filter column was
    refused only after the decision had been appended to reviews.jsonl, and a queue given as a list was a 500."""
    run, images = make_run(tmp_path)
    client = _client(ReviewSession(run, images, "ana"))
    good = {"index": 3, "label": "hallucinated", "queue": "unknown", "order": "table"}
    refused = {
        "unknown queue": {**good, "queue": "later"},
        "unknown filter column": {**good, "where": "colour=red"},
        "queue as a list": {**good, "queue": ["unknown"]},
        "where as an object": {**good, "where": {"category": "cat0"}},
        "order unknown": {**good, "order": "random"},
        "reviewer as a number": {**good, "reviewer": 7},
        "bad reviewer name": {**good, "reviewer": "a b\nc"},
        "label unknown": {**good, "label": "nope"},
        "label as a list": {**good, "label": ["correct"]},
        "index as a bool": {**good, "index": True},
        "index as text": {**good, "index": "3"},
        "index out of range": {**good, "index": 99},
    }
    for name, body in refused.items():
        response = client.post("/api/decide", json=body)
        assert response.status_code == 400, (name, response.status_code, response.text)
        assert not (run / "reviews.jsonl").exists(), f"{name}: a refused request was recorded"
    made = client.post("/api/decide", json=good).json()
    for name, body in {"unknown queue": {"queue": "later"}, "decision id as a list": {"decision_id": [1]},
                       "filter column": {"where": "colour=red"}}.items():
        response = client.post("/api/undo", json={"decision_id": made["decision"]["id"], **body})
        assert response.status_code == 400, (name, response.text)
    assert len((run / "reviews.jsonl").read_text().splitlines()) == 1  # the one accepted decision, no undo


def test_request_bodies_are_bounded_in_size_and_depth(tmp_path):
    from halp.review.app import MAX_BODY_BYTES, MAX_JSON_DEPTH

    run, images = make_run(tmp_path)
    client = _client(ReviewSession(run, images, "ana"))
    headers = {"Content-Type": "application/json"}
    nested = '{"index": 3, "label": "correct", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"  # a RecursionError once
    response = client.post("/api/decide", content=nested[:MAX_BODY_BYTES], headers=headers)
    assert response.status_code == 400 and "deeper" in response.json()["error"]
    deep = '{"index": 3, "label": "correct", "x": ' + "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH + "}"
    assert client.post("/api/decide", content=deep, headers=headers).status_code == 400
    shallow = '{"index": 3, "label": "correct", "x": "[[[[[[[[[[[[[[[[[[[[[[", "y": [[1]]}'  # brackets in a string
    assert client.post("/api/decide", content=shallow, headers=headers).status_code == 200
    big = json.dumps({"index": 4, "label": "correct", "pad": "x" * MAX_BODY_BYTES})
    assert client.post("/api/decide", content=big, headers=headers).status_code == 413

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024

    assert client.post("/api/decide", content=chunks(), headers=headers).status_code == 413
    assert len((run / "reviews.jsonl").read_text().splitlines()) == 1  # only the shallow one


def test_an_image_swapped_for_a_fifo_is_refused_not_waited_for(tmp_path, monkeypatch):
    """The image route reads through halp.userfiles: a FIFO put where the checked image was (after the session's
    check) is refused from its descriptor instead of blocking a server thread on open()."""
    run, images = make_run(tmp_path)
    session = ReviewSession(run, images, "ana")
    fifo = images / "swapped.png"
    os.mkfifo(fifo)
    monkeypatch.setattr(session, "image", lambda index: (fifo, "ok", str(fifo)))  # as if swapped after the check
    client = _client(session)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(response=client.get("/image/0")), daemon=True)
    thread.start()
    thread.join(120)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the blocked reader
        thread.join(30)
        pytest.fail("the image route waited for a writer on a FIFO")
    response = outcome["response"]
    assert response.status_code == 404 and "FIFO" in response.json()["error"]


def _start_review(run: Path, images: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(halp.__file__).parents[1]), *sys.path])}
    server = subprocess.Popen(
        [sys.executable, "-m", "halp", "review", str(run), "--images", str(images), "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    return server, server.stdout.readline().strip()


def test_loopback_needs_the_token_too_and_keeps_it_in_a_cookie_of_its_port(tmp_path):
    require_web_stack()
    run, images = make_run(tmp_path)
    server, url = _start_review(run, images)
    try:
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1"
        token = parse_qs(parts.query)["token"][0]
        assert len(token) >= 32
        local = f"http://127.0.0.1:{parts.port}"
        for path in ("/", "/api/config", "/api/queue", "/image/0"):
            with pytest.raises(HTTPError) as refused:
                urlopen(f"{local}{path}", timeout=30)
            assert refused.value.code == 403, path
        with urlopen(url, timeout=30) as response:
            cookie = response.headers["set-cookie"]
        assert cookie.startswith(f"halp_review_token_{parts.port}={token}") and "httponly" in cookie.lower()
        request = Request(f"{local}/api/config", headers={"Cookie": cookie.split(";")[0]})
        with urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["rows"] == 6
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "needs the token in this URL" in err


def test_no_token_serves_loopback_as_before_with_a_warning(tmp_path):
    require_web_stack()
    run, images = make_run(tmp_path)
    server, url = _start_review(run, images, "--no-token")
    try:
        assert "token" not in url
        with urlopen(f"http://127.0.0.1:{urlsplit(url).port}/api/config", timeout=30) as response:
            assert json.loads(response.read())["rows"] == 6
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "warning: --no-token" in err and "any user or process on this machine" in err
    result = CliRunner().invoke(app, ["review", str(run), "--images", str(images), "--host", "0.0.0.0", "--no-token"])
    assert result.exit_code == 2 and "--no-token is for loopback only" in result.output


# ----- a labelled run: the label each row has, where it came from, and the rows where it is in doubt -----------------
def make_labelled_run(root: Path) -> tuple[Path, Path]:
    """ROWS with labels imported from a table (q0 against the rules, q5 not in it) and halp predict's risk (q2, q3
    against their labels)."""
    run, images = make_run(root)
    table = root / "verdicts.csv"
    pd.DataFrame({"question_id": ["q0", "q1", "q2", "q3", "q4"], "label": ["1", "1", "0", "1", "0"]}).to_csv(
        table, index=False
    )
    label_run(run, labels=table)
    (run / "risk").mkdir()
    (run / "risk" / "vqa.csv").write_text("question_id,risk,flagged,error\nq2,0.9,1,\nq3,0.2,0,\nq4,0.1,0,\n")
    return run, images


def test_a_labelled_run_shows_each_label_and_its_origin_and_queues_the_doubtful(tmp_path):
    run, images = make_labelled_run(tmp_path)
    session = ReviewSession(run, images, "ana")
    assert session.labels_source == str(run / "labels.csv")
    # Rows the labels leave unknown, not those the rules do (q3 and q4 are labelled by the table).
    assert session.queue("unknown") == [5]
    assert session.queue("doubtful") == [0, 2, 3]
    first = session.item(0, "ana")
    assert first["label"] == {
        "label": "hallucinated", "method": "manual", "origin": "imported from verdicts.csv (column label)",
        "reason": "from verdicts.csv:label",
    }  # fmt: skip
    assert first["rule"]["label"] == "correct"
    (doubt,) = first["doubts"]
    assert doubt.startswith("the rules say correct (answer says yes, ground truth yes)")
    assert session.item(2, "ana")["doubts"] == ["the probe's risk is 0.90 (>= 0.5)"]
    assert session.item(3, "ana")["doubts"] == ["the probe's risk is 0.20 (< 0.5)"]  # the rules leave q3 unknown
    assert session.item(4, "ana")["doubts"] == [] and session.item(1, "ana")["doubts"] == []
    missing = session.item(5, "ana")
    assert missing["label"]["label"] == "unknown" and missing["doubts"] == []
    assert missing["label"]["origin"] == "not in verdicts.csv (column label)"
    client = _client(session)
    config = client.get("/api/config").json()
    assert "doubtful" in config["queues"] and config["labels_file"] == str(run / "labels.csv")
    assert client.get("/api/queue?queue=doubtful").json()["indices"] == [0, 2, 3]
    assert client.get("/api/item/0").json()["label"]["origin"] == "imported from verdicts.csv (column label)"


def test_labels_from_rules_and_reviews_say_so_and_a_run_without_labels_has_none(tmp_path):
    from halp.review.session import label_origin

    run, images = make_run(tmp_path)
    assert ReviewSession(run, images, "ana").item(0, "ana")["label"] is None  # no labels.csv yet
    ReviewLog.of_run(run).decide("q3", "hallucinated", "ana")
    label_run(run)
    session = ReviewSession(run, images, "ana")
    assert session.item(0, "ana")["label"]["origin"] == "rule (yesno)"
    assert session.item(3, "ana")["label"] == {
        "label": "hallucinated", "method": "manual:ana", "origin": "review by ana",
        "reason": session.rows[3].label.reason,
    }  # fmt: skip
    assert session.queue("unknown") == [4, 5]
    assert label_origin(Label(None, "manual:conflict", "", "short")) == "reviewers disagree"
    assert label_origin(Label(1, "judge:tiny-judge", "", "open")) == "judge tiny-judge"
    assert label_origin(Label(0, "manual:ana+bob", "", "short")) == "review by ana, bob"


def test_a_review_starts_on_the_doubtful_rows_when_every_row_has_a_label(tmp_path):
    """halp world's runs have an exact label for every row: the default queue `unknown` would be empty, so the
    review opens on the rows whose label the rules or the probe doubt (issue 27)."""
    run, images = make_labelled_run(tmp_path)
    assert ReviewSession(run, images, "ana").starting_queue() == "unknown"  # q5 has no label yet
    table = tmp_path / "all.csv"
    pd.DataFrame({"question_id": [f"q{i}" for i in range(6)], "label": ["1", "1", "0", "1", "0", "0"]}).to_csv(
        table, index=False
    )
    label_run(run, labels=table)
    session = ReviewSession(run, images, "ana")
    assert session.queue("unknown") == [] and session.queue("doubtful")
    assert session.starting_queue() == "doubtful"
