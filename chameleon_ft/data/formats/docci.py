"""DOCCI (Google's Descriptions of Connected and Contrasting Images): long image descriptions.

One JSON-lines file (``docci_descriptions.jsonlines``) holds every split: each record has ``example_id``,
``split`` (``train``, ``test``, ``qual_dev``, ``qual_test``), ``image_file`` and ``description``. A run's
``train`` reads the records of split ``train``, ``val`` those of ``qual_dev`` (or a holdout of train with
``data.val_fraction``), ``test`` those of ``test``. Images are ``image_file`` under ``data.image_root``
(default: ``images/`` next to the file). Captioning: the description is the caption.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import datasets

from chameleon_ft.data.errors import BadSampleError, DataConfigError
from chameleon_ft.data.formats import (
    Format,
    RowContext,
    SplitInputs,
    _expand,
    dataset_from_generator,
    image_root,
    register_format,
)
from chameleon_ft.data.jsonfile import file_stamp, json_record_rows

# A run's split -> the value of DOCCI's own "split" field it reads.
SPLIT_VALUES = {"train": "train", "val": "qual_dev", "test": "test"}
_RAW = datasets.Features({"_row": datasets.Value("int64"), "raw": datasets.Value("string"),
                          "_error": datasets.Value("string")})


def docci_rows(path: str, split_value: str, stamp: str):
    """The rows of one DOCCI split, keeping each record's line position as ``_row``."""
    del stamp
    for row in json_record_rows(path):
        if row["_error"]:
            yield row
            continue
        rec = json.loads(row["raw"])
        if isinstance(rec, dict) and rec.get("split") == split_value:
            yield row


@register_format
class DocciFormat(Format):
    name = "docci"
    description = "DOCCI descriptions JSONL: one file, records picked by their own split field; captioning"
    tasks = ("captioning",)

    def split_inputs(self, cfg, split: str) -> SplitInputs:
        if cfg.path is None:
            raise DataConfigError("data.format=docci: set data.path to docci_descriptions.jsonlines")
        holdout = split != "test" and float(cfg.val_fraction) > 0
        return SplitInputs({"path": _expand(cfg.path)}, holdout=holdout)

    def raw(self, cfg, split: str, inputs: SplitInputs, task: str):
        path = inputs.files["path"]
        value = SPLIT_VALUES["train" if inputs.holdout else split]
        return dataset_from_generator(docci_rows, {"path": path, "split_value": value, "stamp": file_stamp(path)},
                                      _RAW, cfg.cache_dir)

    def context(self, cfg, split: str, inputs: SplitInputs) -> RowContext:
        ctx = super().context(cfg, split, inputs)
        default_root = os.path.join(os.path.dirname(os.path.abspath(inputs.files["path"])), "images")
        return replace(ctx, image_root=image_root(cfg, split, default_root))

    def fields(self, row: dict, ctx: RowContext) -> dict:
        index = int(row["_row"])
        rec = json.loads(row["raw"])
        for key in ("image_file", "description"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise BadSampleError(ctx.file, index, "missing_field",
                                     f"field {key!r} is missing or empty; the record has {sorted(rec)}")
        return {"image": ctx.resolve_image(rec["image_file"], index),
                "caption": rec["description"], "id": rec.get("example_id")}
