"""Captioning: an image and an instruction, a caption; scored with BLEU-4, CIDEr-D and exact match."""

from __future__ import annotations

from chameleon_ft.data.sample import Conversation, Segment, Turn
from chameleon_ft.tasks import SampleContext, Task, record_meta, register_task, single_image, text_field, user_turn

DEFAULT_INSTRUCTION = "Describe the image briefly."


def _references(fields: dict) -> list[str] | None:
    refs = fields.get("references")
    if isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs):
        return list(refs)
    return None


def _prompt(fields: dict, ctx: SampleContext) -> list[Turn]:
    instruction = fields.get("prompt") if isinstance(fields.get("prompt"), str) else None
    return [user_turn(single_image(fields, TASK.name, ctx), instruction or TASK.template(ctx.prompt_template))]


def _conversation(fields: dict, ctx: SampleContext) -> Conversation:
    prompt = _prompt(fields, ctx)
    refs = _references(fields)
    caption = text_field(fields, "caption", ctx, required=refs is None)
    caption = refs[0] if caption is None else caption
    meta = record_meta(fields)
    meta["references"] = refs or [caption]
    return Conversation(prompt + [Turn("assistant", [Segment.of_text(caption)])], TASK.name, meta, ctx.file,
                        ctx.index)


def _score(preds, refs, *, caption_tokenizer: str = "auto", **_) -> dict[str, float]:
    from chameleon_ft.evaluation.metrics import caption_metrics, exact_match

    return {**caption_metrics(preds, refs, tokenizer=caption_tokenizer), "exact_match": exact_match(preds, refs)}


TASK = register_task(Task(
    name="captioning",
    description="an image -> a caption (BLEU-4, CIDEr-D, exact match)",
    key_field="caption",
    fields=("image", "caption", "references"),
    needs_image=True,
    label_mask="assistant",
    monitor="val/exact_match",
    monitor_mode="max",
    output="text",
    conversation=_conversation,
    prompt=_prompt,
    prompt_template=DEFAULT_INSTRUCTION,
    reference_key="references",
    score=_score,
))
