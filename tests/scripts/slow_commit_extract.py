"""`halp` CLI with a pause after every committed part, so a test can SIGKILL it mid-run deterministically."""

import os
import sys
import time

from halp import store

_commit = store.RunStore.commit


def _slow_commit(self, rows, attrs):
    path = _commit(self, rows, attrs)
    time.sleep(float(os.environ.get("SLOW_COMMIT_SECONDS", "0.5")))
    return path


store.RunStore.commit = _slow_commit

if __name__ == "__main__":
    from halp.cli import app

    sys.exit(app(prog_name="halp"))
