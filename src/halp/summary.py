"""What a run holds (`halp inspect`) and where halp reads each supported family (`halp models`), as data.

The CLI renders these (halp.cli.render); Python users get plain dataclasses and dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from halp.errors import ParameterError
from halp.layout import features_file
from halp.store import STRING_FIELDS, feature_datasets, meta_columns, open_run_file, read_strings


@dataclass
class FeatureInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    #: min, max, mean, std over all values (only when asked for: it reads every array).
    stats: dict[str, float] | None = None


@dataclass
class RunSummary:
    path: Path
    num_samples: int
    attrs: dict[str, Any]
    features: list[FeatureInfo]
    meta_columns: list[str]
    #: Per shown sample: field -> value (strings as stored, features as "dim, norm, mean, std" statistics).
    samples: list[dict[str, Any]] = field(default_factory=list)


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def summarize_run(run: str | Path, sample: str | None = None, detailed: bool = False) -> RunSummary:
    """The run's attributes, features (with statistics if `detailed`), metadata columns and the samples asked for:
    `sample` (a question_id), else the first three when `detailed`."""
    path = features_file(run)
    with open_run_file(path) as handle:
        ids = read_strings(handle["question_id"])
        names = feature_datasets(handle)
        features = []
        for name in names:
            dataset = handle[name]
            stats = None
            if detailed:
                values = dataset[()]
                stats = {
                    "min": float(values.min()),
                    "max": float(values.max()),
                    "mean": float(values.mean()),
                    "std": float(values.std()),
                }
            features.append(FeatureInfo(name, tuple(dataset.shape), str(dataset.dtype), stats))
        meta = meta_columns(handle)
        if sample is not None:
            if sample not in ids:
                raise ParameterError("sample", f": question_id {sample!r} is not in {path}")
            shown = [ids.index(sample)]
        else:
            shown = list(range(min(3, len(ids)))) if detailed else []
        samples = []
        for index in shown:
            view: dict[str, Any] = {"question_id": ids[index]}
            for name in STRING_FIELDS:
                view[name] = read_strings(handle[name])[index]
            for column, dataset in meta.items():
                view[f"meta/{column}"] = read_strings(dataset)[index]
            for name in names:
                vector = handle[name][index]
                view[name] = {
                    "dim": int(vector.shape[0]),
                    "norm": float(np.linalg.norm(vector)),
                    "mean": float(vector.mean()),
                    "std": float(vector.std()),
                }
            samples.append(view)
        attrs = {key: _plain(value) for key, value in handle.attrs.items()}
    return RunSummary(path, len(ids), attrs, features, list(meta), samples)


def supported_families() -> list[dict[str, str]]:
    """One row per model_type: its adapter, projector module and decoder layers."""
    from halp.models import adapter_classes

    return [
        {
            "model_type": model_type,
            "adapter": adapter.__name__,
            "projector": adapter.projector,
            "decoder_layers": adapter.decoder_layers,
        }
        for model_type, adapter in sorted(adapter_classes().items())
    ]


def describe_checkpoint(model: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """Where halp reads this checkpoint: the adapter's resolved extraction points, HALP layers and image token."""
    from halp.capture import parse_layers
    from halp.loading import load_model
    from halp.models import adapter_for

    loaded, processor = load_model(model, device="cpu", dtype="auto", trust_remote_code=trust_remote_code)
    adapter = adapter_for(loaded, processor)
    description: dict[str, Any] = adapter.describe()
    description["halp_layers"] = parse_layers("halp", adapter.num_layers)
    description["image_token"] = adapter.tokenizer().convert_ids_to_tokens(adapter.image_token_id)
    return description
