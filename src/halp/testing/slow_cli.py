"""`python -m halp.testing.slow_cli ARGS...`: the real `halp` CLI with controlled commits, for crash tests.

- `HALP_COMMIT_PAUSE=S`: sleep S seconds after every committed part (kills then land inside the extraction
  phase as well as inside commits: the fault-injection harness).
- `HALP_HALT_AFTER_COMMITS=K`: after this process's K-th committed part, stop making progress (block until
  killed). A test that waits for K parts and then SIGKILLs the process knows exactly what was committed,
  whatever the machine's speed or load.
- `HALP_HALT_MODEL_AFTER_BATCHES=K`: the model step (which runs in the main thread) blocks before its
  (K+1)-th batch, in a sleep that Ctrl-C interrupts. A test that waits for K committed parts and then sends
  SIGINT interrupts the run at a known point: K batches done, none after.

SIGUSR1 prints the stacks of all threads to stderr (faulthandler), for tests to show where a process hung.
"""

from __future__ import annotations

import os
import sys
import threading

from halp import store


def _install() -> None:
    commit = store.RunStore.commit
    pause = float(os.environ.get("HALP_COMMIT_PAUSE", "0"))
    halt_after = int(os.environ.get("HALP_HALT_AFTER_COMMITS", "0"))
    committed = 0

    def controlled_commit(self, rows, attrs):
        nonlocal committed
        path = commit(self, rows, attrs)
        committed += 1
        if halt_after and committed >= halt_after:
            threading.Event().wait()  # blocks until the test kills this process
        if pause:
            threading.Event().wait(pause)
        return path

    store.RunStore.commit = controlled_commit

    model_halt_after = int(os.environ.get("HALP_HALT_MODEL_AFTER_BATCHES", "0"))
    if model_halt_after:
        import time

        from halp.capture import FeatureExtractor

        run = FeatureExtractor.run
        batches = 0

        def halting_run(self, *args, **kwargs):
            nonlocal batches
            if batches >= model_halt_after:
                while True:  # the main thread: SIGINT raises KeyboardInterrupt here
                    time.sleep(0.05)
            batches += 1
            return run(self, *args, **kwargs)

        FeatureExtractor.run = halting_run


if __name__ == "__main__":
    import faulthandler
    import signal

    # SIGUSR1 prints every thread's Python stack to stderr: a test whose process hangs asks for it before
    # killing the process, so the failure shows where it hung.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # The tests' SIGINT stands for a user's Ctrl-C. A process started from a background job (`.ci/run &` in a
    # non-interactive shell) inherits SIGINT as ignored, and Python then installs no KeyboardInterrupt
    # handler: the signal would never reach halp. The harness restores Python's own handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _install()
    from halp.cli import app

    sys.exit(app(prog_name="halp"))


def kill_after_commits(cli_args: list[str], parts_dir_store: store.RunStore, commits: int, env: dict | None = None,
                       safety_timeout_s: float = 600.0) -> int:
    """Run `halp CLI_ARGS` halting after its `commits`-th committed part, SIGKILL it there, return how many parts
    its writer directory holds. The count does not depend on the machine's speed: the process cannot commit more.
    The timeout only guards against a hung child (it is never the expected way out)."""
    import subprocess
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "halp.testing.slow_cli", *cli_args],
        env={**os.environ, **(env or {}), "HALP_HALT_AFTER_COMMITS": str(commits)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + safety_timeout_s
    try:
        while len(parts_dir_store.part_paths()) < commits and process.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"halp did not commit {commits} parts within {safety_timeout_s:.0f} s")
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
    return len(parts_dir_store.part_paths())
