"""Nothing lost, nothing let in: bad rows, out-of-memory, non-finite features, locks, write failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from halp.capture import FeatureExtractor
from halp.cli import app
from halp.extract import run_extraction
from halp.store import RunLockedError, RunStore, read_strings
from halp.testing import make_vqa_set
from halp.testing.runs import cpu_extract_config

runner = CliRunner()


_config = partial(cpu_extract_config, batch_size=3, max_new_tokens=2)


def _ids(run_dir: Path) -> list[str]:
    with h5py.File(run_dir / "features.h5", "r") as handle:
        return read_strings(handle["question_id"])


def _errors(run_dir: Path) -> dict[str, dict]:
    lines = (run_dir / "errors.jsonl").read_text().splitlines()
    return {entry["question_id"]: entry for entry in map(json.loads, lines)}


@pytest.fixture
def bad_rows(tmp_path):
    """A table whose rows hit every kind of bad input, plus good rows in exotic image modes."""
    images = tmp_path / "images"
    images.mkdir()
    good = Image.fromarray((np.arange(64 * 48 * 3) % 251).astype(np.uint8).reshape(48, 64, 3))
    good.save(images / "good.png")
    good.convert("L").save(images / "gray.png")
    good.convert("RGBA").save(images / "rgba.png")
    good.convert("P").save(images / "palette.png")
    good.convert("CMYK").save(images / "cmyk.jpg")
    Image.fromarray(np.asarray(good.convert("L")).astype(np.uint16) * 257).save(images / "sixteen.png")
    (images / "empty.png").write_bytes(b"")
    (images / "truncated.png").write_bytes((images / "good.png").read_bytes()[:200])
    (images / "text.png").write_text("not an image")
    Image.new("RGB", (120, 120), "white").save(images / "bomb.png")
    (tmp_path / "outside.png").write_bytes((images / "good.png").read_bytes())
    rows = [
        ("ok_rgb", "good.png", "Is it red?"),
        ("ok_gray", "gray.png", "Is it red?"),
        ("ok_rgba", "rgba.png", "Is it red?"),
        ("ok_palette", "palette.png", "Is it red?"),
        ("ok_cmyk", "cmyk.jpg", "Is it red?"),
        ("ok_16bit", "sixteen.png", "Is it red?"),
        ("missing", "nope.png", "Is it red?"),
        ("zero_bytes", "empty.png", "Is it red?"),
        ("truncated", "truncated.png", "Is it red?"),
        ("not_image", "text.png", "Is it red?"),
        ("bomb", "bomb.png", "Is it red?"),
        ("escape", "../outside.png", "Is it red?"),
        ("no_question", "good.png", "  "),
    ]
    table = tmp_path / "bad.csv"
    table.write_text("question_id,image_id,question\n" + "".join(f"{q},{i},{t}\n" for q, i, t in rows))
    return table, images


def test_bad_rows_are_recorded_and_retried_not_dropped(tmp_path, checkpoint_dir, bad_rows, monkeypatch):
    table, images = bad_rows
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # bomb.png (14,400 px) is over twice this limit
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "extract",
            "--model",
            str(checkpoint_dir("qwen2_vl")),
            "--data",
            str(table),
            "--images",
            str(images),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--max-new-tokens",
            "2",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "7 failed" in result.output
    errors = _errors(out)
    assert set(errors) == {"missing", "zero_bytes", "truncated", "not_image", "bomb", "escape", "no_question"}
    assert errors["missing"]["stage"] == "image" and "does not exist" in errors["missing"]["message"]
    assert "decompression-bomb" in errors["bomb"]["message"]
    assert "outside the images directory" in errors["escape"]["message"]
    assert errors["no_question"]["stage"] == "input"
    assert _ids(out) == ["ok_rgb", "ok_gray", "ok_rgba", "ok_palette", "ok_cmyk", "ok_16bit"]
    with h5py.File(out / "features.h5") as handle:
        assert bool(handle.attrs["complete"]) is False and int(handle.attrs["num_failed"]) == 7

    # Fix one image; the rerun retries only the failed rows and keeps everything committed.
    (images / "nope.png").write_bytes((images / "good.png").read_bytes())
    summary = run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out))
    assert summary.already_done == 6 and summary.processed == 1 and len(summary.failed) == 6
    assert _ids(out) == ["ok_rgb", "ok_gray", "ok_rgba", "ok_palette", "ok_cmyk", "ok_16bit", "missing"]
    assert "missing" not in _errors(out)


def test_out_of_memory_splits_the_batch_and_isolates_the_culprit(tmp_path, checkpoint_dir, monkeypatch):
    table, images = make_vqa_set(tmp_path / "data", n=7)
    reference = tmp_path / "reference"
    run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, reference, batch_size=7))
    real_run = FeatureExtractor.run
    calls = []

    def tight_memory(self, inputs, max_new_tokens=0, positions=None):
        prompts = self.adapter.tokenizer().batch_decode(inputs["input_ids"])
        calls.append(len(prompts))
        if len(prompts) > 2 or any("Describe the image." in prompt for prompt in prompts):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(self, inputs, max_new_tokens, positions)

    monkeypatch.setattr(FeatureExtractor, "run", tight_memory)
    out = tmp_path / "run"
    summary = run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out, batch_size=7))
    assert calls == [7, 3, 1, 2, 4, 2, 1, 1, 2]  # halves until each piece fits; q0004 fails alone
    assert [entry["question_id"] for entry in summary.failed] == ["q0004"]  # q0004 asks "Describe the image."
    assert summary.failed[0]["error"] == "OutOfMemoryError"
    ids = _ids(out)
    assert ids == [f"q{i:04d}" for i in range(7) if i != 4]
    with h5py.File(out / "features.h5") as got, h5py.File(reference / "features.h5") as ref:
        keep = [i for i in range(7) if i != 4]
        np.testing.assert_allclose(
            got["query_token/layer_3"][()], ref["query_token/layer_3"][()][keep], rtol=1e-4, atol=1e-6
        )


def test_non_finite_features_are_flagged_not_stored(tmp_path, checkpoint_dir, monkeypatch):
    table, images = make_vqa_set(tmp_path / "data", n=4)
    real_run = FeatureExtractor.run

    def overflow_row_1(self, inputs, max_new_tokens=0, positions=None):
        result = real_run(self, inputs, max_new_tokens, positions)
        result.features["query_token/layer_2"][1, 5] = np.inf
        return result

    monkeypatch.setattr(FeatureExtractor, "run", overflow_row_1)
    out = tmp_path / "run"
    summary = run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out, batch_size=4))
    assert [entry["question_id"] for entry in summary.failed] == ["q0001"]
    assert "query_token/layer_2" in summary.failed[0]["message"] and "float32" in summary.failed[0]["message"]
    assert _ids(out) == ["q0000", "q0002", "q0003"]
    with h5py.File(out / "features.h5") as handle:
        assert all(np.isfinite(handle[name][()]).all() for name in ("query_token/layer_2", "vision_only"))


def test_one_writer_per_run_and_stale_locks_recover(tmp_path, checkpoint_dir):
    table, images = make_vqa_set(tmp_path / "data", n=2)
    out = tmp_path / "run"
    holder = RunStore(out)
    holder.lock()
    with pytest.raises(RunLockedError, match=str(os.getpid())):
        run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out))
    holder.unlock()
    # A process that dies holding the lock leaves the file but not the lock.
    code = (
        f"from halp.store import RunStore; RunStore({str(out)!r}).lock(); "
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    )
    died = subprocess.run([sys.executable, "-c", code], check=False)
    assert died.returncode == -signal.SIGKILL and (out / ".lock").exists()
    assert run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out)).finished


def test_write_failure_is_clear_and_keeps_committed_data(tmp_path, checkpoint_dir):
    table, images = make_vqa_set(tmp_path / "data", n=12)
    # A long metadata value makes the part holding q0005 (the largest image: batched last) exceed the
    # file-size limit, part-way through the run.
    lines = table.read_text().splitlines()
    lines = [lines[0] + ",note"] + [row + ("," + "x" * 30_000 if row.startswith("q0005") else ",") for row in lines[1:]]
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG errors instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
        from halp.cli import app
        sys.argv = ["halp", "extract", "--model", {str(checkpoint_dir("qwen2_vl"))!r}, "--data", {str(table)!r},
                    "--images", {str(images)!r}, "--out", {str(out)!r}, "--batch-size", "2", "--max-new-tokens", "2"]
        app()
    """)
    failed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    message = failed.stdout + failed.stderr
    assert "could not write" in message and "rerun the same command" in message
    store = RunStore(out)
    committed = store.committed_ids()  # every committed part is still readable
    # Rows are committed batch by batch until the part holding q0005 is too large to write.
    assert committed and "q0005" not in committed and len(committed) < 12, committed
    assert not list(out.glob("**/.*.tmp-*"))
    summary = run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out, batch_size=2))
    assert summary.finished and summary.already_done == len(committed)
    assert _ids(out) == [f"q{i:04d}" for i in range(12)]


def test_remote_code_only_when_asked(monkeypatch, checkpoint_dir):
    import transformers

    from halp.loading import load_model

    seen = []
    real = transformers.AutoModelForImageTextToText.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", spy)
    load_model(str(checkpoint_dir("qwen2_vl")), device="cpu", dtype="float32")
    load_model(str(checkpoint_dir("qwen2_vl")), device="cpu", dtype="float32", trust_remote_code=True)
    assert seen == [False, True]


def test_no_pickle_in_the_package():
    source = Path(__file__).parents[1] / "src" / "halp"
    for path in source.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "torch.load(" not in text and "joblib" not in text, path


def test_inspect_prints_user_strings_literally(tmp_path, checkpoint_dir):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), "red").save(images / "a.png")
    table = tmp_path / "t.csv"
    table.write_text(
        'question_id,image_id,question\nq[bold]1[/bold],a.png,"[red]Is it red?[/red] <script>x</script>"\n'
    )
    out = tmp_path / "run"
    assert run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out)).finished
    shown = runner.invoke(app, ["inspect", str(out), "--detailed"])
    assert "[red]Is it red?[/red]" in shown.output and "q[bold]1[/bold]" in shown.output


# ----- a mistyped --model: checked before anything is written into --out ---------------------------------------------
def _one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


def test_a_mistyped_hub_model_offline_fails_at_once_and_the_corrected_rerun_runs(tmp_path, checkpoint_dir, monkeypatch):
    """Offline, a hub id that is not cached is one line before --out exists (no download retries); the rerun with
    the right model then starts afresh in the same --out, without --overwrite (nothing there was "created with other
    settings")."""
    import huggingface_hub.constants

    from halp.errors import ModelLoadError
    from halp.loading import check_model_source

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    table, images = make_vqa_set(tmp_path / "data", n=3, seed=2)
    out = tmp_path / "run"
    args = ["extract", "--data", str(table), "--images", str(images), "--out", str(out), "--device", "cpu",
            "--max-new-tokens", "2"]  # fmt: skip
    mistyped = runner.invoke(app, [*args, "--model", "halp-test/no-such-model"])
    line = _one_line_error(mistyped.output)
    assert mistyped.exit_code == 2, mistyped.output
    assert line == (
        "error: --model halp-test/no-such-model: no such directory, and not in the local hub cache (the hub is "
        "offline: HF_HUB_OFFLINE is set)"
    )
    assert not out.exists()  # no run.json, no lock file, no log: nothing was written into --out
    with pytest.raises(ModelLoadError, match=r"^model=halp-test/no-such-model: no such directory"):
        check_model_source("halp-test/no-such-model", trust_remote_code=False)  # Python names the parameter
    corrected = runner.invoke(app, [*args, "--model", str(checkpoint_dir("qwen2_vl"))])
    assert corrected.exit_code == 0, corrected.output
    assert (out / "run.json").is_file() and len(_ids(out)) == 3


def test_a_hub_model_the_hub_does_not_know_or_cannot_be_asked_about_is_one_line(tmp_path, monkeypatch):
    """Online, one request asks the hub (no retries); its answer, or why it could not be asked, is the message.
    The hub is stood in for by its client's answer, so the test does not depend on the network."""
    from huggingface_hub import HfApi

    table, images = make_vqa_set(tmp_path / "data", n=2, seed=3)
    out = tmp_path / "run"
    args = ["extract", "--model", "halp-test/no-such-model", "--data", str(table), "--images", str(images),
            "--out", str(out)]  # fmt: skip
    asked: list[str] = []

    def no_such_repository(self, repo_id, **kwargs):
        asked.append(repo_id)
        return False

    monkeypatch.setattr(HfApi, "repo_exists", no_such_repository)
    unknown = runner.invoke(app, args)
    assert unknown.exit_code == 2 and asked == ["halp-test/no-such-model"]
    assert "--model halp-test/no-such-model: no such directory or hub id" in _one_line_error(unknown.output)

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "repo_exists", unreachable)
    offline = runner.invoke(app, args)
    assert offline.exit_code == 2
    assert _one_line_error(offline.output).endswith(
        "not in the local hub cache, and the hub cannot be reached ([Errno -2] Name or service not known)"
    )
    assert not out.exists()
