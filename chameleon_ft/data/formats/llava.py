"""LLaVA / ShareGPT JSON or JSON lines: ``conversations`` of ``{"from", "value"}`` with ``<image>`` markers.

``image`` is a path or a list of paths relative to the image root (``images`` is accepted too). The number
of markers must equal the number of images, except LLaVA's own convention: a single image and no marker
puts the image at the start of the first user turn.
"""

from __future__ import annotations

from chameleon_ft.data.conversation import MarkerRules
from chameleon_ft.data.errors import BadSampleError
from chameleon_ft.data.formats import (
    JSON_ROW_FEATURES,
    Format,
    RowContext,
    SplitInputs,
    dataset_from_generator,
    register_format,
)
from chameleon_ft.data.jsonfile import file_stamp, json_record_rows, record_from_row


class ConversationFormat(Format):
    """A JSON / JSON-lines file of conversation records (base of the LLaVA-like formats)."""

    def raw(self, cfg, split: str, inputs: SplitInputs, task: str):
        path = inputs.files["path"]
        return dataset_from_generator(json_record_rows, {"path": path, "stamp": file_stamp(path)}, JSON_ROW_FEATURES,
                                      cfg.cache_dir)

    def fields(self, row: dict, ctx: RowContext) -> dict:
        index = int(row["_row"])
        rec = record_from_row(row, ctx.file)
        cols = ctx.columns
        images = rec.get(cols.get("image", "image"))
        if images is None:
            images = rec.get(cols.get("images", "images"))
        key = cols.get("conversations", "conversations")
        if rec.get(key) is None:
            hint = next((f" (set data.columns.conversations={k})" for k in ("messages", "conversation", "dialog")
                         if k in rec), "")
            raise BadSampleError(ctx.file, index, "missing_field",
                                 f"the record has keys {sorted(rec)}; expected {key!r}{hint}")
        fields = {"conversations": rec[key], "images": ctx.resolve_images(images, index), "_keys": sorted(rec)}
        if isinstance(rec.get("id"), (str, int)):
            fields["id"] = rec["id"]
        return fields


@register_format
class LlavaFormat(ConversationFormat):
    name = "llava"
    description = "LLaVA/ShareGPT JSON or JSONL: conversations with from/value, <image> markers, image path(s)"
    rules = MarkerRules("<image>", unmarked="single")
