"""Screenshots of `halp review` for docs/images: the main screen mid-sitting, a row two reviewers decided, the help.

    python tests/scripts/review_screenshots.py docs/images

Builds a small run whose answers read like a real VLM's (images from halp.testing's VQA set), labels it
with the rules, trains a probe so the page shows a risk, writes an hour-old sitting of two reviewers
into reviews.jsonl (so the pace and ETA are those of a person, not of a script), then drives Debian's
Chromium with Playwright against a real `halp review` process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from halp.data import Sample
from halp.label import label_run
from halp.probe import train_probes
from halp.review.decisions import Decision
from halp.store import rows_for, write_rows
from halp.testing import make_vqa_set

ROWS = [  # question, ground truth, answer, category
    ("Is there a red shape in the image?", "yes", "Yes, a red circle sits near the top left.", "color"),
    ("How many shapes are there?", "1", "There is one shape.", "count"),
    ("What color is the shape?", "blue", "The shape is a deep navy, almost violet.", "color"),
    ("Is the picture bright or dark?", "dark", "The picture is rather dim, with a grainy texture.", "scene"),
    ("Describe the image.", "a yellow shape on a bright background",
     "A yellow oval floats over a light, speckled surface, like a lemon on sand.", "scene"),
    ("Is there a red shape in the image?", "no", "There is a reddish blob in the centre of the frame.", "color"),
    ("How many shapes are there?", "1", "I can see two circles and a small square.", "count"),
    ("What color is the shape?", "green", "Green.", "color"),
]


def build_run(root: Path, copies: int = 6) -> tuple[Path, Path]:
    rows = ROWS * copies
    _, images = make_vqa_set(root / "data", n=len(rows))
    samples = [
        Sample(f"q{i:04d}", f"img_{i:04d}.png", q, gt, {"category": c, "dataset": "shapes-vqa"})
        for i, (q, gt, _, c) in enumerate(rows)
    ]
    rng = np.random.default_rng(0)
    # Features with a planted signal along one direction: rows whose answer is wrong sit further along it.
    wrong = np.array([i % len(ROWS) in (2, 5, 6) for i in range(len(rows))], dtype=np.float32)
    features = rng.normal(size=(len(rows), 16)).astype(np.float32)
    features[:, 0] += 1.5 * wrong
    run = root / "run"
    run.mkdir(parents=True)
    write_rows(
        run / "features.h5",
        rows_for(samples, [a for _, _, a, _ in rows], {"vision_only": features}),
        {"model_id": "Qwen/Qwen2.5-VL-7B-Instruct", "generated": True, "max_new_tokens": 64},
    )
    return run, images


def write_sitting(run: Path, count: int) -> int:
    """Decisions of ana (about 8 s each, just now) and of bob (yesterday) on rows the rules leave unknown."""
    import h5py

    from halp.label import label_answer
    from halp.store import read_strings

    with h5py.File(run / "features.h5") as handle:
        ids = read_strings(handle["question_id"])
        fields = [read_strings(handle[name]) for name in ("question", "ground_truth", "answer")]
    unknown = [qid for qid, q, t, a in zip(ids, *fields, strict=True) if label_answer(q, t, a).label is None]
    start = datetime.now(timezone.utc) - timedelta(seconds=8.5 * count + 4)
    lines = []
    for n, qid in enumerate(unknown[:count]):
        when = start + timedelta(seconds=8.5 * n)
        verdict = ("hallucinated", "correct", "correct", "unsure")[n % 4]
        lines.append(Decision(f"a{n}", qid, verdict, "ana", when.isoformat(timespec="milliseconds")))
        if n % 3 == 0:
            other = "hallucinated" if n % 2 else verdict
            lines.append(Decision(f"b{n}", qid, other, "bob", (when - timedelta(days=1)).isoformat()))
    (run / "reviews.jsonl").write_text("".join(line.to_json() + "\n" for line in lines))
    return ids.index(unknown[0])  # a row both reviewers decided


def main(out_dir: Path) -> None:
    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run, images = build_run(Path(tmp))
        label_run(run)
        train_probes(run, folds=3, bootstrap=0, group_by_image=False, probe_params={"logreg": {"C": 1.0}})
        (run / "labels.csv").unlink()  # the sitting is under way: labels.csv is written after it
        both = write_sitting(run, 9)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        server = subprocess.Popen(
            [sys.executable, "-m", "halp", "review", str(run), "--images", str(images), "--port", "0",
             "--reviewer", "ana"],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            url = server.stdout.readline().strip().split("?")[0]
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1440, "height": 860})
                page.goto(url + "?queue=unknown&order=risk")
                page.wait_for_function("() => document.getElementById('qid').textContent !== ''")
                page.keyboard.press("c")
                page.wait_for_function("() => document.getElementById('save-state').textContent.startsWith('✓')")
                page.wait_for_timeout(400)
                page.screenshot(path=str(out_dir / "review-main.png"))
                page.goto(url + f"?queue=unknown&order=risk#row={both}")
                page.wait_for_function("() => document.getElementById('others').textContent.includes('bob')")
                page.wait_for_timeout(400)
                page.screenshot(path=str(out_dir / "review-decided.png"))
                page.keyboard.press("?")
                page.wait_for_timeout(200)
                page.screenshot(path=str(out_dir / "review-help.png"))
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote review-main.png, review-decided.png and review-help.png to {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images"))
