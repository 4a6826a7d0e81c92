"""Export to the seeds' per-question HDF5 layout, which the HALP probe scripts read."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from halp.layout import features_file
from halp.store import STR, feature_datasets, read_strings

LEGACY_GROUPS = {"vision_token": "vision_token_representation", "query_token": "query_token_representation"}


def export_legacy(run_dir: str | Path, output: str | Path) -> Path:
    """`<qid>/vision_only_representation`, `<qid>/{vision,query}_token_representation/layer_<k>`, strings."""
    source = features_file(run_dir)
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    with h5py.File(source, "r") as run, h5py.File(tmp, "w") as out:
        for key, value in run.attrs.items():
            out.attrs[key] = value
        ids = read_strings(run["question_id"])
        out.attrs["num_samples"] = len(ids)
        strings = {name: read_strings(run[name]) for name in ("image_id", "question", "ground_truth", "answer")}
        names = feature_datasets(run)
        arrays = {name: run[name][()] for name in names}
        for index, qid in enumerate(ids):
            group = out.create_group(qid.replace("/", "_"))
            group.create_dataset("image_id", data=strings["image_id"][index], dtype=STR)
            group.create_dataset("question", data=strings["question"][index], dtype=STR)
            group.create_dataset("ground_truth_answer", data=strings["ground_truth"][index], dtype=STR)
            group.create_dataset("answer", data=strings["answer"][index], dtype=STR)
            group.create_dataset("vision_only_representation", data=arrays["vision_only"][index].astype(np.float32))
            for name in names:
                prefix, _, layer = name.partition("/")
                if prefix in LEGACY_GROUPS:
                    group.require_group(LEGACY_GROUPS[prefix]).create_dataset(
                        layer, data=arrays[name][index].astype(np.float32)
                    )
    os.replace(tmp, output)
    return output
