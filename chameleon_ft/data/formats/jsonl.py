"""Simple per-task JSON lines: ``{image, caption}``, ``{image, question, answer(s)}``, ``{prompt, image}``,
or ``{conversations, image}`` (as LLaVA). ``data.task`` selects the task; ``auto`` infers it per record
from its fields. ``data.columns`` renames fields."""

from __future__ import annotations

from chameleon_ft.data.conversation import MarkerRules
from chameleon_ft.data.formats import RowContext, flat_fields, register_format
from chameleon_ft.data.formats.llava import ConversationFormat
from chameleon_ft.data.jsonfile import record_from_row


@register_format
class JsonlFormat(ConversationFormat):
    name = "jsonl"
    description = "simple JSONL per task: {image, caption} | {image, question, answer} | {prompt, image}"
    rules = MarkerRules("<image>", unmarked="single")

    def fields(self, row: dict, ctx: RowContext) -> dict:
        index = int(row["_row"])
        return flat_fields(record_from_row(row, ctx.file), ctx, index)
