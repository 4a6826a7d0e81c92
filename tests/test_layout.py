"""halp.layout: the one way to write a file or a folder of the run (atomic, fsynced, one staging scheme)."""

from __future__ import annotations

import os

import pytest

from halp.layout import atomic_directory, atomic_write, temporary_path


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_directory(target) as staging:
        assert staging == temporary_path(target) and staging.parent == target.parent and staging.name.startswith(".")
        (staging / "nested").mkdir()
        (staging / "nested" / "weights.bin").write_bytes(b"\x00" * 10)
        (staging / "config.json").write_text("{}")
        assert not target.exists()  # nothing under the final name while it is being written
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "config.json", "nested", "nested/weights.bin",
    ]
    assert not staging.exists()


def test_a_failed_folder_leaves_the_old_one_and_no_staging(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_directory(target, replace=True) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert not staging.exists()


def test_an_existing_folder_is_replaced_only_when_asked(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError), atomic_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["old.txt"] and not staging.exists()
    with atomic_directory(target, replace=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_a_file_is_written_through_a_temporary_and_replaced_in_one_step(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old\n")
    with pytest.raises(OSError), atomic_write(target) as handle:
        handle.write("half")
        raise OSError("disk full")
    assert target.read_text() == "old\n" and not temporary_path(target).exists()
    with atomic_write(target) as handle:
        handle.write("new\n")
        assert target.read_text() == "old\n"
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["results.csv"]
