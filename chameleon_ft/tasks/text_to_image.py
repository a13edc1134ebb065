"""Text-to-image: a prompt, an image to draw (image logits unmasked, the image span learned)."""

from __future__ import annotations

from chameleon_ft.data.sample import Conversation, Segment, Turn
from chameleon_ft.tasks import SampleContext, Task, record_meta, register_task, single_image, text_field, user_turn

# Lumina-mGPT's text-to-image prompt style
DEFAULT_TEMPLATE = "Generate an image of {width}x{height} according to the following prompt:\n{prompt}"


def render_prompt(template: str, prompt: str, width: int, height: int) -> str:
    """The user text asking for a ``width`` x ``height`` image of ``prompt``."""
    return template.format(prompt=prompt, width=width, height=height)


def _prompt(fields: dict, ctx: SampleContext) -> list[Turn]:
    prompt = text_field(fields, "prompt", ctx)
    size = int(fields.get("width") or ctx.image_size), int(fields.get("height") or ctx.image_size)
    return [user_turn(render_prompt(TASK.template(ctx.prompt_template), prompt, *size))]


def _conversation(fields: dict, ctx: SampleContext) -> Conversation:
    """user: [template(prompt, width, height)]; assistant: [image].

    ``meta["prompt"]`` and ``meta["prompt_template"]`` keep the parts, so tokenization can re-render the
    prompt when the image ends up at another size (aspect buckets) or drop it (classifier-free guidance).
    """
    image = single_image(fields, TASK.name, ctx)
    turns = _prompt(fields, ctx)
    meta = record_meta(fields)
    meta.update(prompt=fields["prompt"], prompt_template=TASK.template(ctx.prompt_template))
    return Conversation(turns + [Turn("assistant", [Segment(image=image)])], TASK.name, meta, ctx.file, ctx.index)


TASK = register_task(Task(
    name="text_to_image",
    description="a prompt -> an image (image tokens learned; classifier-free guidance at generation)",
    key_field="prompt",
    fields=("prompt", "image"),
    needs_image=True,
    label_mask="image",
    monitor="val/loss",
    monitor_mode="min",
    output="image",
    conversation=_conversation,
    prompt=_prompt,
    prompt_template=DEFAULT_TEMPLATE,
    template_keys=("prompt",),
    prompt_field="prompt",
))
