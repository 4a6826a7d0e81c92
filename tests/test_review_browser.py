"""`halp review` in a real browser: Debian's Chromium driven by Playwright, against a real `halp review` process.

The run is extracted with a tiny offline checkpoint (halp.testing). The test labels rows with the keyboard only,
undoes one, reloads, kills the server with SIGKILL mid-way and restarts it, and then `halp label` and `halp probe`
train on the decisions. Skipped, with the reason, only where Chromium or Playwright is not installed (CI has both:
.ci/run installs them).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pandas as pd
import pytest
from typer.testing import CliRunner

import halp
from halp.cli import app
from halp.extract import run_extraction
from halp.testing import make_vqa_set
from halp.testing.runs import cpu_extract_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does)"),
    pytest.mark.slow,
]
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
pytest.importorskip("uvicorn", reason="the review extra (uvicorn) is not installed")
KEYS = {"h": "hallucinated", "c": "correct", "u": "unsure"}
WAIT_MS = 20_000


class Server:
    """`halp review` as its own process, so that it can be killed like a user's would be."""

    def __init__(self, run: Path, images: Path, log: Path, port: int = 0) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(halp.__file__).parents[1]), *sys.path])}
        command = [sys.executable, "-m", "halp", "review", str(run), "--images", str(images), "--port", str(port)]
        self.stderr = log.open("a")
        self.process = subprocess.Popen(
            [*command, "--reviewer", "ana"], stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.process.stdout.readline()), daemon=True).start()
        try:
            self.url = lines.get(timeout=120).strip()
        except queue.Empty:
            self.process.kill()
            raise AssertionError(f"halp review printed no URL; stderr: {log.read_text()}") from None
        assert self.url.startswith("http://127.0.0.1:"), f"{self.url!r}; stderr: {log.read_text()}"
        self.port = urlsplit(self.url).port
        query = parse_qs(urlsplit(self.url).query)
        # The token is required on loopback too; each start makes a new one.
        self.token = query.pop("token")[0]
        assert query == {"queue": ["unknown"], "order": ["table"]} and len(self.token) >= 32
        self.base = f"http://127.0.0.1:{self.port}/"

    def page(self, query: str = "", fragment: str = "") -> str:
        """A page URL with this server's token (a new browser context has no cookie yet)."""
        return f"{self.base}?{urlencode({'token': self.token})}{'&' + query if query else ''}{fragment}"

    def reopen(self, url: str) -> str:
        """`url` (a page of an earlier server on this port) with this server's token: a restart makes a new one."""
        parts = urlsplit(url)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        return self.page(urlencode({key: value for key, value in query.items() if key != "token"}),
                         f"#{parts.fragment}" if parts.fragment else "")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.stderr.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.stderr.close()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory, checkpoint_dir) -> tuple[Path, Path]:
    """A run with answers from a tiny Qwen2-VL: random weights, so the rules leave most rows unknown."""
    root = tmp_path_factory.mktemp("review_browser")
    table, images = make_vqa_set(root / "data", n=12)
    config = cpu_extract_config(checkpoint_dir("qwen2_vl"), table, images, root / "run", max_new_tokens=6)
    assert run_extraction(config).finished
    return root / "run", images


@pytest.fixture()
def browser():
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def _text(page, selector: str) -> str:
    return page.text_content(selector) or ""


def _wait_text(page, selector: str, expected: str) -> None:
    page.wait_for_function(
        "([s, t]) => (document.querySelector(s).textContent || '') === t", arg=[selector, expected], timeout=WAIT_MS
    )


def _decide(page, key: str) -> tuple[str, str]:
    """Press a verdict key on the row shown; returns (question_id, verdict) once it is saved."""
    qid = _text(page, "#qid")
    page.keyboard.press(key)
    _wait_text(page, "#save-state", f"✓ {qid} saved: {KEYS[key]}")
    return qid, KEYS[key]


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_function("() => document.getElementById('qid').textContent !== ''", timeout=WAIT_MS)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "reviews.jsonl").read_text().splitlines()]


def test_keyboard_review_survives_reload_and_a_killed_server_then_trains_a_probe(extracted, browser, tmp_path):
    source_run, images = extracted
    run = tmp_path / "run"
    shutil.copytree(source_run, run)
    server_log = tmp_path / "server.log"
    server = Server(run, images, server_log)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    try:
        _open(page, server.page("queue=all"))
        assert _text(page, "#count") == "12"
        decided: dict[str, str] = {}
        for key in "hcu":
            qid, verdict = _decide(page, key)
            decided[qid] = verdict
        # z: back to the last row, its decision withdrawn; then decide it again.
        last = list(decided)[-1]
        page.keyboard.press("z")
        _wait_text(page, "#qid", last)
        _wait_text(page, "#mine", "not decided")
        qid, verdict = _decide(page, "h")
        assert qid == last
        decided[qid] = verdict
        for key in "ch":
            qid, verdict = _decide(page, key)
            decided[qid] = verdict
        assert len(decided) == 5

        # Reload: every decision is shown again, and the progress counts them.
        shown = _text(page, "#qid")
        page.reload()
        _wait_text(page, "#qid", shown)  # the row the page was on
        assert _text(page, "#done") == "5"
        for _ in range(5):
            before = _text(page, "#qid")
            page.keyboard.press("ArrowLeft")
            page.wait_for_function(
                "b => document.getElementById('qid').textContent !== b", arg=before, timeout=WAIT_MS
            )
            assert _text(page, "#mine") == decided[_text(page, "#qid")]
        page.keyboard.press("n")  # the next row without a decision
        page.wait_for_function("() => document.getElementById('mine').textContent === 'not decided'")

        # SIGKILL the server: a key pressed now is refused visibly, nothing saved is lost, a restart continues.
        server.kill()
        qid = _text(page, "#qid")
        page.keyboard.press("c")
        _wait_text(page, "#save-state", "not saved")
        assert "does not answer" in _text(page, "#toast")
        assert _text(page, "#qid") == qid  # no advance past an unsaved decision
        server = Server(run, images, server_log, port=server.port)
        # The restarted server has a new token: the page's cookie (the old one) is refused.
        assert page.request.get(server.base + "api/config").status == 403
        _open(page, server.reopen(page.url))  # the URL it printed, with the row the page was on
        _wait_text(page, "#qid", qid)
        assert _text(page, "#done") == "5"
        for key in "ccchu":  # 4 hallucinated and 5 correct in all: enough for 2-fold CV with C chosen inside
            qid, verdict = _decide(page, key)
            decided[qid] = verdict
        _wait_text(page, "#done", "10")
    finally:
        server.stop()
        page.close()
    assert dialogs == []

    current: dict[str, str | None] = {}
    for record in _log(run):
        current[record["question_id"]] = record["label"]
    assert {qid: label for qid, label in current.items() if label is not None} == decided
    assert sum(record["action"] == "undo" for record in _log(run)) == 1

    # The decisions flow into labels.csv and into the probes.
    runner = CliRunner()
    result = runner.invoke(app, ["label", str(run)])
    assert result.exit_code == 0, result.output
    labels = pd.read_csv(run / "labels.csv", dtype=str, keep_default_na=False).set_index("question_id")
    words = {"hallucinated": "1", "correct": "0", "unsure": ""}
    for qid, verdict in decided.items():
        assert (labels.loc[qid, "label"], labels.loc[qid, "method"]) == (words[verdict], "manual:ana")
    result = runner.invoke(
        app, ["probe", str(run), "--features", "vision_only", "--folds", "2", "--bootstrap", "0", "--no-group-by-image"]
    )
    assert result.exit_code == 0, result.output
    predictions = pd.read_csv(run / "probes" / "predictions.csv", dtype={"question_id": str}).set_index("question_id")
    for qid, verdict in decided.items():
        if verdict == "unsure":
            assert qid not in predictions.index  # unknown rows are not trained on
        else:
            assert predictions.loc[qid, "label"] == int(words[verdict])


def test_user_strings_are_text_and_a_missing_image_shows_its_path(browser, tmp_path):
    from test_review import ROWS, make_run  # the synthetic run of the non-browser tests

    run, images = make_run(tmp_path, ROWS)
    (images / "img_0004.png").unlink()
    server = Server(run, images, tmp_path / "server.log")
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    try:
        _open(page, server.url)  # the unknown queue: rows 3, 4, 5
        assert _text(page, "#qid") == "q3"
        assert _text(page, "#answer") == ROWS[3][2]  # the markup shows as text
        assert page.query_selector("#answer b") is None and page.query_selector("#answer script") is None
        page.keyboard.press("f")  # zoom to full size and back
        page.wait_for_selector("#image-pane.zoomed", timeout=WAIT_MS)
        page.click("#image")
        page.wait_for_selector("#image-pane:not(.zoomed)", timeout=WAIT_MS)
        _decide(page, "h")
        assert _text(page, "#qid") == "q4"
        page.wait_for_selector("#placeholder:not([hidden])", timeout=WAIT_MS)
        assert _text(page, "#placeholder-title") == "Image not found"
        assert _text(page, "#placeholder-path") == str((images / "img_0004.png").resolve())
        assert page.is_hidden("#image")
        page.keyboard.press("?")
        page.wait_for_selector("#help:not([hidden])", timeout=WAIT_MS)
        page.keyboard.press("h")  # keys do nothing under the help
        page.keyboard.press("Escape")
        page.wait_for_selector("#help", state="hidden", timeout=WAIT_MS)
        assert _text(page, "#qid") == "q4" and _text(page, "#mine") == "not decided"

        # A second tab, as another reviewer: both tabs' decisions are kept, and each sees the other's.
        other = browser.new_page(viewport={"width": 1280, "height": 800})
        _open(other, server.page("reviewer=bob", "#row=4"))
        assert _text(other, "#reviewer") == "bob" and _text(other, "#qid") == "q4"
        _decide(other, "c")
        _decide(page, "u")
        assert {(r["question_id"], r["reviewer"], r["label"]) for r in _log(run)} == {
            ("q3", "ana", "hallucinated"), ("q4", "bob", "correct"), ("q4", "ana", "unsure"),
        }  # fmt: skip
        page.keyboard.press("ArrowLeft")
        _wait_text(page, "#qid", "q4")
        assert _text(page, "#others") == "bob correct" and _text(page, "#mine") == "unsure"
        other.close()
    finally:
        server.stop()
        page.close()
    assert dialogs == []


def test_a_labelled_run_shows_each_label_its_origin_and_the_doubtful_queue(browser, tmp_path):
    from test_review import make_labelled_run  # labels imported from a table, risk from halp predict

    run, images = make_labelled_run(tmp_path)
    server = Server(run, images, tmp_path / "server.log")
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        _open(page, server.page("queue=doubtful"))
        assert _text(page, "#count") == "3" and _text(page, "#qid") == "q0"
        assert _text(page, "#label-badge") == "hallucinated"
        assert _text(page, "#label-origin") == "imported from verdicts.csv (column label)"
        assert _text(page, "#rule-badge") == "correct"
        assert _text(page, "#doubts").startswith("In doubt: the rules say correct")
        page.keyboard.press("ArrowRight")
        _wait_text(page, "#qid", "q2")
        assert _text(page, "#label-badge") == "correct"
        assert _text(page, "#doubts") == "In doubt: the probe's risk is 0.90 (>= 0.5)"
        # The queue picker offers it, with what it holds; a row without a label says so and shows no doubt.
        assert "doubtful" in page.eval_on_selector("#queue", "s => [...s.options].map(o => o.value)")
        _open(page, server.page("queue=unknown"))
        assert _text(page, "#qid") == "q5" and _text(page, "#label-badge") == "unknown"
        assert _text(page, "#label-origin") == "not in verdicts.csv (column label)" and page.is_hidden("#doubts")
    finally:
        server.stop()
        page.close()
