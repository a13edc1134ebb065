"""Any local ``datasets`` data: a ``save_to_disk`` directory (Dataset or DatasetDict), parquet/json/csv/arrow
files (or a glob), or an image folder (with ``metadata.jsonl``). Fields as for ``jsonl``, through
``data.columns``; an ``Image`` column is kept as encoded bytes (or its file path), never decoded here.

A DatasetDict's own validation/test split is used for ``val``/``test`` when no separate file is given;
it wins over ``data.val_fraction``.
"""

from __future__ import annotations

import glob
import os
from dataclasses import replace
from pathlib import Path

import datasets

from chameleon_ft.data.errors import DataConfigError, DataFormatError
from chameleon_ft.data.formats import (
    Format,
    RowContext,
    SplitInputs,
    _expand,
    flat_fields,
    image_root,
    register_format,
)

_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}
_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def load_local(path: str, split: str, cache_dir: str | None, single_ok: bool) -> datasets.Dataset | None:
    """A local datasets source -> its Dataset for ``split``, or None when it has no such split.

    A source with a single split (a plain Dataset, one data file) counts as ``split`` only if ``single_ok``.
    """
    p = Path(path)
    if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
    elif p.is_dir():
        ds = datasets.load_dataset("imagefolder", data_dir=str(p), cache_dir=cache_dir)
    else:
        builder = _BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise DataConfigError(f"{path}: an hf_dataset path must be a save_to_disk or image directory, or "
                                  f"{sorted(_BUILDERS)} file(s)")
        if not glob.glob(path):
            raise DataFormatError(f"{path}: file not found")
        ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
    if isinstance(ds, datasets.DatasetDict):
        for n in _SPLIT_NAMES[split]:
            if n in ds:
                return ds[n]
        return next(iter(ds.values())) if single_ok and len(ds) == 1 else None
    return ds if single_ok else None


def _undecoded(ds: datasets.Dataset) -> datasets.Dataset:
    """Keep images as bytes/paths (no decoding) and number the rows."""
    for name, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feat, (datasets.List, datasets.Sequence, datasets.LargeList)) and isinstance(
                getattr(feat, "feature", None), datasets.Image):
            ds = ds.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return ds.add_column("_row", list(range(len(ds))))


@register_format
class HFDatasetFormat(Format):
    name = "hf_dataset"
    description = "any local datasets dataset (save_to_disk dir, parquet, json, imagefolder); map columns"

    def split_inputs(self, cfg, split: str) -> SplitInputs:
        own = {"train": cfg.path, "val": cfg.val_path, "test": cfg.test_path}[split]
        if split == "train" or own is not None:
            return super().split_inputs(cfg, split)
        # The dataset may hold the split itself (a DatasetDict); a holdout applies only if it does not.
        path = _expand(cfg.path)
        has_own = load_local(path, split, cfg.cache_dir, single_ok=False) is not None
        holdout = split == "val" and not has_own and float(cfg.val_fraction) > 0
        if not has_own and not holdout:
            raise DataConfigError(f"{path}: has no {split!r} split; set data.{split}_path"
                                  + (" or data.val_fraction" if split == "val" else ""))
        return SplitInputs({"path": path}, holdout=holdout)

    def raw(self, cfg, split: str, inputs: SplitInputs, task: str):
        path = inputs.files["path"]
        own_file = split != "train" and path != _expand(cfg.path)
        if inputs.holdout:
            ds = load_local(path, "train", cfg.cache_dir, single_ok=True)
        else:
            ds = load_local(path, split, cfg.cache_dir, single_ok=own_file or split == "train")
        if ds is None:
            raise DataConfigError(f"{path}: has no {split!r} split; set data.{split}_path")
        return _undecoded(ds)

    def split_holdout(self, cfg, split: str, inputs: SplitInputs) -> bool:
        """Train is cut by a holdout only when the dataset has no validation split of its own."""
        if split == "train" and inputs.holdout:
            return load_local(inputs.files["path"], "val", cfg.cache_dir, single_ok=False) is None
        return inputs.holdout

    def context(self, cfg, split: str, inputs: SplitInputs) -> RowContext:
        ctx = super().context(cfg, split, inputs)
        path = inputs.files["path"]
        base = path if Path(path).is_dir() else os.path.dirname(os.path.abspath(path))
        return replace(ctx, image_root=image_root(cfg, split, base))

    def fields(self, row: dict, ctx: RowContext) -> dict:
        return flat_fields(row, ctx, int(row["_row"]))
