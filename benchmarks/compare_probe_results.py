"""Compare two probes/results.csv files feature by feature: is every AUROC the same science?

    python benchmarks/compare_probe_results.py BEFORE/probes/results.csv AFTER/probes/results.csv

The rule (issue 24): a (feature, probe) passes when its AUROC after is within 0.01 of before, or inside before's
95% bootstrap interval, whichever band is wider. It is applied to the pooled out-of-fold AUROC (the one the
interval belongs to) and to the fold mean (with the same band around before's fold mean, widened to the interval).
Prints one row per (feature, probe), then the largest differences and how many pass; exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

TOLERANCE = 0.01
KEY = ["feature", "probe"]


def compare(before: pd.DataFrame, after: pd.DataFrame, tolerance: float = TOLERANCE) -> pd.DataFrame:
    """One row per (feature, probe) present in both: AUROCs before and after, differences, bands and verdicts."""
    merged = before.merge(after, on=KEY, suffixes=("_before", "_after"), validate="one_to_one")
    if len(merged) != len(before) or len(merged) != len(after):
        missing = set(map(tuple, before[KEY].to_numpy())) ^ set(map(tuple, after[KEY].to_numpy()))
        raise SystemExit(f"the two results do not hold the same (feature, probe) rows: {sorted(missing)}")
    rows = []
    for record in merged.to_dict(orient="records"):
        low, high = record["auroc_ci_low_before"], record["auroc_ci_high_before"]
        row = {"feature": record["feature"], "probe": record["probe"]}
        passed = True
        for which in ("pooled", "mean"):
            old, new = record[f"auroc_{which}_before"], record[f"auroc_{which}_after"]
            band_low, band_high = min(old - tolerance, low), max(old + tolerance, high)
            ok = bool(band_low <= new <= band_high)
            row |= {f"{which}_before": old, f"{which}_after": new, f"{which}_diff": new - old, f"{which}_ok": ok}
            passed &= ok
        row |= {
            "ci_before": f"[{low:.3f}, {high:.3f}]",
            "control_before": record["control_auroc_mean_before"],
            "control_after": record["control_auroc_mean_after"],
            "pass": passed,
        }
        rows.append(row)
    return pd.DataFrame(rows)


def render(table: pd.DataFrame) -> str:
    lines = [
        f"{'feature':<28} {'probe':<6} {'pooled before':>13} {'after':>6} {'diff':>7}  "
        f"{'mean before':>11} {'after':>6} {'diff':>7}  {'interval before':>16}  {'control b/a':>11}  verdict"
    ]
    for row in table.to_dict(orient="records"):
        lines.append(
            f"{row['feature']:<28} {row['probe']:<6} {row['pooled_before']:13.3f} {row['pooled_after']:6.3f} "
            f"{row['pooled_diff']:+7.3f}  {row['mean_before']:11.3f} {row['mean_after']:6.3f} "
            f"{row['mean_diff']:+7.3f}  "
            f"{row['ci_before']:>16}  {row['control_before']:.3f}/{row['control_after']:.3f}  "
            f"{'pass' if row['pass'] else 'FAIL'}"
        )
    for probe, frame in table.groupby("probe"):
        lines.append(
            f"{probe}: largest |diff| pooled {frame['pooled_diff'].abs().max():.3f}, "
            f"mean {frame['mean_diff'].abs().max():.3f}; "
            f"mean diff pooled {frame['pooled_diff'].mean():+.3f}, mean {frame['mean_diff'].mean():+.3f}"
        )
    passed = int(table["pass"].sum())
    lines.append(f"{passed} of {len(table)} (feature, probe) pass (within 0.01 or inside the interval)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="results.csv of today's implementation")
    parser.add_argument("after", type=Path, help="results.csv of the changed implementation")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = parser.parse_args()
    table = compare(pd.read_csv(args.before), pd.read_csv(args.after), args.tolerance)
    print(render(table))
    sys.exit(0 if table["pass"].all() else 1)


if __name__ == "__main__":
    main()
