"""Interleaved text and image: an instruction, an answer of text followed by an image in the same turn.

The assistant turn is ``[text, image]``; its text, its whole image span and its end-of-turn are learned
(label mask ``assistant``), so the model learns when to open an image, the image, and that the turn ends
after it. Generation (``python -m chameleon_ft.generate mode=interleaved``) samples the text until the
model opens an image, draws the image with the grid constraint and classifier-free guidance, then goes
on with text until end-of-turn.
"""

from __future__ import annotations

from chameleon_ft.data.sample import Conversation, Segment, Turn
from chameleon_ft.tasks import SampleContext, Task, record_meta, register_task, single_image, text_field, user_turn


def _prompt(fields: dict, ctx: SampleContext) -> list[Turn]:
    return [user_turn(text_field(fields, "instruction", ctx))]


def _conversation(fields: dict, ctx: SampleContext) -> Conversation:
    """user: [instruction]; assistant: [response text, image]."""
    image = single_image(fields, TASK.name, ctx)
    answer = Turn("assistant", [Segment.of_text(text_field(fields, "response", ctx)), Segment(image=image)])
    return Conversation(_prompt(fields, ctx) + [answer], TASK.name, record_meta(fields), ctx.file, ctx.index)


TASK = register_task(Task(
    name="interleaved",
    description="an instruction -> text, then an image, in one answer (text, image and end-of-turn learned)",
    key_field="response",
    fields=("instruction", "response", "image"),
    needs_image=True,
    label_mask="assistant",
    monitor="val/loss",
    monitor_mode="min",
    output="interleaved",
    conversation=_conversation,
    prompt=_prompt,
    prompt_field="instruction",
))
