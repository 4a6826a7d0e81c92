"""Export to the seeds' per-question HDF5 layout, which the HALP probe scripts read.

Group names: HDF5 cannot name a group `.` or anything with `/` (a path separator), so a question_id is used as the
group name when it can be one, and otherwise percent-encoded (`%` -> `%25`, `/` -> `%2F`, a leading `.` -> `%2E`):
an injective mapping, so two ids never share a group. Every group carries its question_id as the attribute
`question_id`, and the root attribute `question_id_map` (JSON) lists the encoded ones, group -> question_id.

Attributes are what the study's tools read and serialize: `model_name`, `created_at`, `num_samples`, and the run's
attributes with booleans written as 0/1 integers (its h5_to_json.py passes attributes to json.dump, which takes
no numpy bool).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from halp.errors import OutputPathError
from halp.layout import atomic_path, features_file
from halp.store import STR, feature_datasets, from_hdf5_name, hdf5_name, open_run_file, read_strings

LEGACY_GROUPS = {"vision_token": "vision_token_representation", "query_token": "query_token_representation"}


def group_name(question_id: str) -> str:
    """The group of a question_id: itself if HDF5 can name a group so, else its percent-encoding (reversible)."""
    return hdf5_name(question_id)


def question_id_of(group: str) -> str:
    """The inverse of `group_name`."""
    return from_hdf5_name(group)


def json_safe_attribute(value: Any) -> Any:
    """An attribute value that h5py reads back as something json.dump takes (with numpy numbers made plain):
    booleans become 0/1, arrays of booleans lists of 0/1."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, np.ndarray) and value.dtype == bool:
        return value.astype(np.int64)
    return value


def export_legacy(run_dir: str | Path, output: str | Path) -> Path:
    """`<qid>/vision_only_representation`, `<qid>/{vision,query}_token_representation/layer_<k>`, strings."""
    source = features_file(run_dir)
    output = Path(output)
    if output.resolve() == source.resolve():
        raise OutputPathError(f"the output {output} is the run's own {source.name}; choose another file")
    with open_run_file(source) as run, atomic_path(output) as tmp, h5py.File(tmp, "w") as out:
        for key, value in run.attrs.items():
            out.attrs[key] = json_safe_attribute(value)
        ids = read_strings(run["question_id"])
        out.attrs["num_samples"] = len(ids)
        out.attrs["model_name"] = str(run.attrs.get("model_id", ""))
        out.attrs["created_at"] = str(run.attrs.get("created", ""))
        strings = {name: read_strings(run[name]) for name in ("image_id", "question", "ground_truth", "answer")}
        names = feature_datasets(run)
        arrays = {name: run[name][()] for name in names}
        encoded: dict[str, str] = {}
        for index, qid in enumerate(ids):
            name = group_name(qid)
            if name != qid:
                encoded[name] = qid
            group = out.create_group(name)
            group.attrs["question_id"] = qid
            group.create_dataset("image_id", data=strings["image_id"][index], dtype=STR)
            group.create_dataset("question", data=strings["question"][index], dtype=STR)
            group.create_dataset("ground_truth_answer", data=strings["ground_truth"][index], dtype=STR)
            group.create_dataset("answer", data=strings["answer"][index], dtype=STR)
            group.create_dataset("vision_only_representation", data=arrays["vision_only"][index].astype(np.float32))
            for feature in names:
                prefix, _, layer = feature.partition("/")
                if prefix in LEGACY_GROUPS:
                    group.require_group(LEGACY_GROUPS[prefix]).create_dataset(
                        layer, data=arrays[feature][index].astype(np.float32)
                    )
        out.attrs["question_id_map"] = json.dumps(encoded, ensure_ascii=False)
    return output
