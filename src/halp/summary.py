"""Human-readable views of runs (`halp inspect`) and of supported families (`halp models`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from halp.store import (
    FEATURES_FILE,
    STRING_FIELDS,
    RunStore,
    feature_datasets,
    meta_columns,
    open_run_file,
    read_strings,
)


def features_file(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    if path.is_file():
        return path
    if (path / FEATURES_FILE).is_file():
        return path / FEATURES_FILE
    parts = RunStore(path).part_paths()
    if parts:
        raise FileNotFoundError(
            f"{path} is an unfinished run ({len(parts)} committed part(s)); rerun `halp extract` to finish it"
        )
    raise FileNotFoundError(f"no {FEATURES_FILE} in {path}")


def _short(text: str, width: int = 80) -> str:
    return escape(text if len(text) <= width else text[: width - 1] + "…")


def render_inspect(run_dir: str | Path, console: Console, sample: str | None = None, detailed: bool = False) -> None:
    path = features_file(run_dir)
    with open_run_file(path) as handle:
        ids = read_strings(handle["question_id"])
        names = feature_datasets(handle)
        console.print(f"[bold]{escape(str(path))}[/]: {len(ids)} samples, {len(names)} features", soft_wrap=True)
        attrs = Table("attribute", "value", title="run")
        for key, value in handle.attrs.items():
            attrs.add_row(escape(key), _short(str(value.tolist() if isinstance(value, np.ndarray) else value), 100))
        console.print(attrs)
        features = Table(title="features")
        features.add_column("feature", no_wrap=True)
        features.add_column("shape", no_wrap=True)
        features.add_column("dtype")
        if detailed:
            for column in ("min", "max", "mean", "std"):
                features.add_column(column, justify="right")
        for name in names:
            dataset = handle[name]
            row = [name, str(dataset.shape), str(dataset.dtype)]
            if detailed:
                values = dataset[()]
                row += [f"{values.min():.4g}", f"{values.max():.4g}", f"{values.mean():.4g}", f"{values.std():.4g}"]
            features.add_row(*row)
        console.print(features)
        meta = meta_columns(handle)
        if meta:
            console.print("metadata columns: " + ", ".join(escape(m) for m in meta))
        shown = []
        if sample is not None:
            if sample not in ids:
                raise KeyError(f"question_id {sample!r} is not in {path}")
            shown = [ids.index(sample)]
        elif detailed:
            shown = list(range(min(3, len(ids))))
        for index in shown:
            view = Table(title=f"sample {escape(ids[index])}")
            view.add_column("field", no_wrap=True)
            view.add_column("value")
            for field in STRING_FIELDS:
                view.add_row(field, _short(read_strings(handle[field])[index], 200))
            for column, dataset in meta.items():
                view.add_row(f"meta/{escape(column)}", _short(read_strings(dataset)[index], 200))
            for name in names:
                vector = handle[name][index]
                view.add_row(
                    name,
                    f"dim {vector.shape[0]}, norm {np.linalg.norm(vector):.4g}, "
                    f"mean {vector.mean():.4g}, std {vector.std():.4g}",
                )
            console.print(view)


def render_models(console: Console, model: str | None = None, trust_remote_code: bool = False) -> None:
    from halp.models import adapter_classes, adapter_for

    if model is None:
        table = Table("model_type", "adapter", "projector", "decoder layers", title="supported families")
        for model_type, adapter in sorted(adapter_classes().items()):
            table.add_row(model_type, adapter.__name__, adapter.projector, adapter.decoder_layers)
        console.print(table)
        return
    from halp.capture import parse_layers
    from halp.loading import load_model

    loaded, processor = load_model(model, device="cpu", dtype="auto", trust_remote_code=trust_remote_code)
    adapter = adapter_for(loaded, processor)
    description: dict[str, Any] = adapter.describe()
    description["halp_layers"] = parse_layers("halp", adapter.num_layers)
    description["image_token"] = adapter.tokenizer().convert_ids_to_tokens(adapter.image_token_id)
    table = Table("extraction point", "value", title=escape(model))
    for key, value in description.items():
        table.add_row(key, escape(str(value)))
    console.print(table)
