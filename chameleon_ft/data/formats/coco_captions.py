"""COCO captions: an annotation file (``images[]``, ``annotations[]`` with ``image_id`` and ``caption``) plus
the image directory. One sample per entry of ``images[]`` in file order; the target is the image's first
caption in the annotation file's order, and all its captions are the references for BLEU/CIDEr."""

from __future__ import annotations

from typing import Any

import datasets

from chameleon_ft.data.errors import BadSampleError, DataFormatError
from chameleon_ft.data.formats import (
    Format,
    RowContext,
    SplitInputs,
    dataset_from_generator,
    register_format,
)
from chameleon_ft.data.jsonfile import file_stamp, load_json

_RAW = datasets.Features({"_row": datasets.Value("int64"), "image_id": datasets.Value("string"),
                          "file_name": datasets.Value("string"), "captions": datasets.List(datasets.Value("string"))})


def coco_rows(path: str, stamp: str):
    """Raw rows of a COCO captions file: one per image, with every caption of that image."""
    del stamp
    data = load_json(path)
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise DataFormatError(f"{path}: expected a COCO captions file with 'images' and 'annotations' lists")
    caps: dict[Any, list[str]] = {}
    for a in data["annotations"]:
        if isinstance(a, dict) and isinstance(a.get("caption"), str):
            caps.setdefault(a.get("image_id"), []).append(a["caption"].strip())
    for i, im in enumerate(data["images"]):
        im = im if isinstance(im, dict) else {}
        yield {"_row": i, "image_id": str(im.get("id")), "file_name": im.get("file_name") or "",
               "captions": caps.get(im.get("id"), [])}


@register_format
class CocoCaptionsFormat(Format):
    name = "coco_captions"
    description = "COCO captions: data.path = captions annotation JSON, data.image_root = image directory"
    tasks = ("captioning",)

    def raw(self, cfg, split: str, inputs: SplitInputs, task: str):
        path = inputs.files["path"]
        return dataset_from_generator(coco_rows, {"path": path, "stamp": file_stamp(path)}, _RAW, cfg.cache_dir)

    def fields(self, row: dict, ctx: RowContext) -> dict:
        index = int(row["_row"])
        if not row["file_name"]:
            raise BadSampleError(ctx.file, index, "missing_field", "image entry has no file_name")
        if not row["captions"]:
            raise BadSampleError(ctx.file, index, "missing_field", f"image id {row['image_id']} has no caption")
        return {"image": ctx.resolve_image(row["file_name"], index),
                "caption": row["captions"][0], "references": list(row["captions"]),
                "_meta": {"image_id": row["image_id"]}}
