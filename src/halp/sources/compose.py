"""A composite of converted benchmarks, sampled like the HALP study's: per-source counts in proportion,
stratified by category within each source, reproducible from the seed.

`compose(dirs, out, total, seed, proportions)` writes `out/composite.parquet` (images embedded) and
`out/manifest.json`: the settings, and for each source its input, rows available, quota and the question_ids
drawn per category. Counts are rounded by largest remainder, so they add up to `total` exactly.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pyarrow import ArrowException

from halp.errors import HalpError, SourceError
from halp.layout import atomic_path, write_text_atomic
from halp.sources.common import MANIFEST, ROW_GROUP, features, open_parquet
from halp.userfiles import open_user_file, read_user_file

#: The HALP set's composition (10,000 questions; DATASET_SUMMARY of the study's extraction scripts).
STUDY_COUNTS = {
    "amber": 3926,
    "haloquest": 2784,
    "pope": 1230,
    "mme": 885,
    "hallusionbench": 617,
    "mathvista": 558,
}
COMPOSITE = "composite.parquet"
COMPOSE_MANIFEST = "manifest.json"


@dataclass
class ComposeSummary:
    table: Path
    manifest: Path
    total: int
    drawn: dict[str, int]


def largest_remainder(weights: dict[str, float], total: int) -> dict[str, int]:
    """Integer counts proportional to `weights` that add up to `total` (ties: larger weight, then name)."""
    weight_sum = sum(weights.values())
    if weight_sum <= 0:
        raise SourceError("proportions must have a positive sum")
    exact = {key: total * value / weight_sum for key, value in weights.items()}
    counts = {key: math.floor(value) for key, value in exact.items()}
    left = total - sum(counts.values())
    order = sorted(exact, key=lambda key: (-(exact[key] - counts[key]), -weights[key], key))
    for key in order[:left]:
        counts[key] += 1
    return counts


def read_proportions(spec: str, sources: list[str]) -> dict[str, float]:
    """'study' (the HALP set's shares), 'equal', or a JSON file {source: weight}."""
    if spec == "study":
        unknown = [source for source in sources if source not in STUDY_COUNTS]
        if unknown:
            raise SourceError(f"proportions=study has no share for {', '.join(unknown)}; use equal or a file")
        return {source: float(STUDY_COUNTS[source]) for source in sources}
    if spec == "equal":
        return {source: 1.0 for source in sources}
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"proportions={spec!r}: not study, equal or a JSON file")
    try:
        weights = json.loads(read_user_file(path, "proportions file", error=SourceError).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SourceError(f"{path} is not a UTF-8 JSON object {{source: weight}}: {err}") from err
    if not isinstance(weights, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in weights.values()):
        raise SourceError(f"{path}: expected a JSON object {{source: non-negative weight}}")
    missing = [source for source in sources if source not in weights]
    extra = [source for source in weights if source not in sources]
    if missing or extra:
        raise SourceError(
            f"{path}: weights must name exactly the sources given ({', '.join(sources)}); "
            f"missing {', '.join(missing) or 'none'}, not given {', '.join(extra) or 'none'}"
        )
    return {source: float(weights[source]) for source in sources}


#: What to do about a damaged `halp data convert` output.
RECONVERT = "run `halp data convert` into it again"


def _converted(directory: Path) -> tuple[str, Path]:
    """The source and table a `halp data convert` folder holds, from its manifest; a missing, cut or incomplete
    manifest, or a missing table, is a SourceError naming the file."""
    manifest = directory / MANIFEST
    if not manifest.exists() and not manifest.is_symlink():
        raise SourceError(f"{directory} is not a `halp data convert` output (no {MANIFEST})")
    try:
        info = json.loads(read_user_file(manifest, "convert manifest", error=SourceError).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SourceError(f"{manifest} is not valid JSON ({err}): it is cut short or damaged; {RECONVERT}") from err
    missing = [key for key in ("source", "table") if not isinstance(info, dict) or not isinstance(info.get(key), str)]
    if missing:
        raise SourceError(f"{manifest} is incomplete (no {' or '.join(missing)}); {RECONVERT}")
    table = directory / info["table"]
    if Path(info["table"]).name != info["table"] or not (table.exists() or table.is_symlink()):
        raise SourceError(f"{manifest} names the table {info['table']!r}, which is not in {directory}; {RECONVERT}")
    return info["source"], table


def _damaged_table(table: Path, err: BaseException) -> SourceError:
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    reason = "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in reason)
    return SourceError(f"{table} could not be read as a converted table: it is cut short or damaged ({reason}); "
                       f"{RECONVERT.replace('into it', 'into ' + str(table.parent))}")


def compose(
    dirs: list[str | Path], out: str | Path, total: int, seed: int, proportions: str = "study"
) -> ComposeSummary:
    import pyarrow.parquet as pq

    if total < 1:
        raise SourceError("total= must be at least 1")
    tables: dict[str, Path] = {}
    for directory in map(Path, dirs):
        source, table = _converted(directory)
        if source in tables:
            raise SourceError(
                f"{source} is given twice ({tables[source].parent} and {directory}): its question_ids would clash; "
                "give one converted folder per source"
            )
        tables[source] = table
    weights = read_proportions(proportions, list(tables))
    quotas = largest_remainder(weights, total)

    rng = np.random.default_rng(seed)
    chosen: dict[str, list[int]] = {}
    report: dict[str, Any] = {}
    all_ids: set[str] = set()
    for source, table in tables.items():  # in the order given; each source draws from the one generator
        try:
            with open_user_file(table, "converted table", error=SourceError) as handle:
                text = pq.read_table(handle, columns=["question_id", "category"]).to_pydict()
        except (ArrowException, OSError, ValueError) as err:  # cut, corrupt, or without the columns
            if isinstance(err, HalpError):
                raise
            raise _damaged_table(table, err) from err
        ids, categories = text["question_id"], text["category"]
        clash = all_ids.intersection(ids)
        if clash:
            raise SourceError(f"{table}: question_ids also in another source, e.g. {', '.join(sorted(clash)[:5])}")
        all_ids.update(ids)
        quota = quotas[source]
        if quota > len(ids):
            raise SourceError(
                f"{source} has {len(ids)} rows but its share of total={total} is {quota}; lower total= or "
                "change proportions="
            )
        by_category: dict[str, list[int]] = defaultdict(list)
        for index, category in enumerate(categories):
            by_category[category].append(index)
        per_category = largest_remainder({c: float(len(rows)) for c, rows in sorted(by_category.items())}, quota)
        picked: list[int] = []
        drawn_ids: dict[str, list[str]] = {}
        for category in sorted(by_category):
            rows = by_category[category]
            take = sorted(rng.choice(len(rows), size=per_category[category], replace=False).tolist())
            picked += [rows[i] for i in take]
            drawn_ids[category] = [ids[rows[i]] for i in take]
        chosen[source] = sorted(picked)
        report[source] = {
            "from": str(table),
            "available": len(ids),
            "drawn": quota,
            "categories": {category: len(values) for category, values in drawn_ids.items()},
            "question_ids": drawn_ids,
        }

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table_path = out / COMPOSITE
    schema = features().arrow_schema
    with atomic_path(table_path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for source, rows in chosen.items():
            try:
                _copy_rows(open_parquet(tables[source], "converted table"), set(rows), writer, schema)
            except (ArrowException, OSError, ValueError) as err:  # a damaged image page, say
                if isinstance(err, HalpError):
                    raise
                raise _damaged_table(tables[source], err) from err
    manifest = {
        "total": total,
        "seed": seed,
        "proportions": proportions,
        "weights": weights,
        "sources": report,
    }
    manifest_path = out / COMPOSE_MANIFEST
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return ComposeSummary(table_path, manifest_path, total, {source: quotas[source] for source in tables})


def _copy_rows(handle: Any, wanted: set[int], writer: Any, schema: Any) -> None:
    """The rows at `wanted` positions of a converted table, appended to the composite a batch at a time."""
    import pyarrow as pa

    start = 0
    for batch in handle.iter_batches(batch_size=ROW_GROUP):
        keep = [i for i in range(batch.num_rows) if start + i in wanted]
        start += batch.num_rows
        if keep:
            part = pa.Table.from_batches([batch.take(pa.array(keep))])
            writer.write_table(part.select(schema.names).cast(schema))
