"""Who may write a run directory: OS file locks, released by the OS when a process dies (no stale locks).

Two kinds, one mechanism underneath (the OS's `flock`):
- the run's writer locks below hold `.lock` files that also say who holds them ("<pid>" for a lifetime holder,
  "<pid> brief <writer>" for a brief one), which a shard reads to tell a single-process run from another shard;
  `filelock` empties a lock file when it takes it, so these are taken here with `fcntl` directly;
- `appender_lock`: the maintained `filelock` package's lock for an append-only log several processes write
  (reviews.jsonl), whose lock file says nothing.

A single-process run (and a Ray driver) holds `RUN_DIR/.lock` for its whole life. A shard or Ray worker holds its
own directory's `.lock` for its life and takes `RUN_DIR/.lock` only briefly (the "run lock"): to check the run's
identity and list what is committed when it starts, and to assemble when it finishes. Brief holders write
"<pid> brief <writer>" in the lock file; lifetime holders just "<pid>".
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from filelock import FileLock

from halp.errors import RunLockedError
from halp.layout import LOCK_FILE, RAY_DIR, SHARDS_DIR, lock_file_of

#: How long a shard waits for another shard's brief hold of the run lock (an assembly of a large run).
SYNC_TIMEOUT_S = 3600.0
_BRIEF = " brief "


def _try_lock(path: Path) -> IO[str] | None:
    """An open handle holding an exclusive lock on `path`, or None if another open file holds it."""
    handle = open(path, "a+")  # noqa: SIM115 - returned to the caller, who closes it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _release(handle: IO[str]) -> None:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class RunLocks:
    """The locking half of a run store: `root` (RUN_DIR), `writer` (None, `shards/<i>-of-<k>` or `ray/<id>`) and
    `writer_dir` (the directory this writer commits to) are set by the store."""

    root: Path
    writer: str | None
    writer_dir: Path

    # ----- one writer ----------------------------------------------------------------------
    def lock(self) -> None:
        """Hold an exclusive lock for this process's lifetime; the OS drops it if the process dies (no stale locks).

        The single-process writer locks RUN_DIR/.lock (the run lock); a shard or Ray worker locks its own directory.
        """
        self.writer_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.writer_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open until the process ends or unlock()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            what = f"{self.root}" if self.writer is None else f"{self.writer} of {self.root}"
            raise RunLockedError(
                f"{what} is being written by another halp process (pid {holder.split()[0]}); "
                "wait for it to finish or stop it, then rerun"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle

    def unlock(self) -> None:
        handle = getattr(self, "_lock_handle", None)
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            self._lock_handle = None

    @contextmanager
    def held(self) -> Iterator[None]:
        """`lock` for the block's duration (also when it raises)."""
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    @contextmanager
    def sync(self, timeout: float = SYNC_TIMEOUT_S) -> Iterator[None]:
        """Hold the run lock briefly (a shard's start and finish). The single-process writer already holds it."""
        if self.writer is None:
            yield
            return
        with self.hold_run_lock(self.writer, timeout):
            yield

    @contextmanager
    def hold_run_lock(self, holder_name: str, timeout: float = SYNC_TIMEOUT_S) -> Iterator[None]:
        """Hold the run lock briefly, as `holder_name` (a shard, `merge`).

        Waits while another shard holds it briefly; fails at once if a single-process run or a Ray driver holds it
        for its lifetime (a shard cannot join such a run: both would extract the same rows).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        deadline = time.monotonic() + timeout
        lifetime_seen: str | None = None
        while (handle := _try_lock(path)) is None:
            holder = _holder(path)
            if holder.isdigit():
                # A bare pid: a lifetime holder, unless a new brief holder has not rewritten the file yet;
                # seeing the same pid twice, half a second apart, rules that out.
                if lifetime_seen == holder:
                    raise RunLockedError(
                        f"{self.root} is being written by a single-process run or a Ray driver (pid {holder}); "
                        "a shard cannot join it. Wait for it to finish, or stop it and rerun the shards."
                    )
                lifetime_seen = holder
                time.sleep(0.5)
                continue
            lifetime_seen = None
            if time.monotonic() > deadline:
                raise RunLockedError(f"{self.root}: the run lock was held by {holder or 'another process'} too long")
            time.sleep(0.05)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}{_BRIEF}{holder_name}")
            handle.flush()
            yield
        finally:
            _release(handle)

    # ----- other writers -------------------------------------------------------------------
    def writer_dirs(self) -> list[Path]:
        """Directories of shards and Ray workers, past and present."""
        found: list[Path] = []
        for group in (SHARDS_DIR, RAY_DIR):
            base = self.root / group
            if base.is_dir():
                found += sorted(path for path in base.iterdir() if path.is_dir())
        return found

    def live_writers(self) -> dict[Path, str]:
        """Directories of shards and Ray workers, other than this one, whose lock is held right now -> holder pid."""
        live = {}
        for directory in self.writer_dirs():
            if directory == self.writer_dir or not (directory / LOCK_FILE).exists():
                continue
            handle = _try_lock(directory / LOCK_FILE)
            if handle is None:
                live[directory] = (_holder(directory / LOCK_FILE).split() or ["unknown"])[0]
            else:
                _release(handle)
        return live

    def _require_no_live_writers(self, why: str) -> None:
        live = self.live_writers()
        if live:
            running = ", ".join(f"{path.relative_to(self.root)} (pid {pid})" for path, pid in live.items())
            raise RunLockedError(f"{self.root}: {why}, but {running} is still running. Wait for it or stop it.")


def appender_lock(path: str | Path) -> FileLock:
    """An exclusive lock for appending to the log at `path` (its hidden `.<name>.lock` beside it), held across
    processes, released by the OS if the holder dies. Not reentrant across threads: take a thread lock first."""
    return FileLock(lock_file_of(path), thread_local=False)
