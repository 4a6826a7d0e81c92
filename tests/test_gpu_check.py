"""benchmarks/gpu_check.sh, the one prepared GPU check, runs on CPU in its reduced mode so it cannot rot.

Only that it runs and reports every figure is checked here; the figures themselves belong in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"


def test_gpu_check_runs_in_reduced_mode_and_reports_every_figure(tmp_path):
    figures_path = tmp_path / "figures.json"
    done = subprocess.run(
        ["bash", str(SCRIPT), "--reduced", "--json", str(figures_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        # The script runs "$PYTHON" (default: the python on PATH); this test's interpreter has halp's dependencies.
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(figures_path.read_text())
    assert figures["reduced"] is True
    settings = figures["halp"]
    assert {(s["batch_size"], s["mode"]) for s in settings} == {
        (1, "2 new tokens"),
        (1, "--no-generate"),
        (2, "2 new tokens"),
        (2, "--no-generate"),
    }
    assert all(s["samples"] == max(2 * s["batch_size"], 4) and s["samples_per_second"] > 0 for s in settings)
    assert all(0 <= s["stall_fraction"] <= 1 for s in settings)
    assert all(s["fraction_of_peak"] is not None for s in settings if s["mode"] == "--no-generate")
    assert figures["seeds_samples_per_second"] > 0 and figures["ratio_to_seeds"] > 0
    assert figures["probe_cell_seconds"] > 0
    totals = figures["probe_cell"]["totals"]
    assert set(totals) == {"logreg", "mlp", "all"} and totals["all"]["fits"] == 22
    assert all(t["seconds_per_fit"] > 0 and t["fraction_of_matmul_rate"] > 0 for t in totals.values())
    assert "seeds' method" in done.stdout and "probe cell" in done.stdout
