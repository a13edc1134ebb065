"""Chat: multi-turn conversations with images anywhere; every assistant turn is learned."""

from __future__ import annotations

from chameleon_ft.data.conversation import chat_conversation
from chameleon_ft.data.sample import Conversation, Turn
from chameleon_ft.tasks import SampleContext, Task, chat_sample, register_task


def _conversation(fields: dict, ctx: SampleContext) -> Conversation:
    return chat_sample(fields, ctx, "chat")


def _prompt(fields: dict, ctx: SampleContext) -> list[Turn]:
    """The conversation up to (not including) its last assistant turn; a bare ``prompt`` is one user turn."""
    if fields.get("conversations") is None:
        fields = {**fields, "conversations": [{"role": "user", "content": fields.get("prompt") or ""}]}
    turns = chat_conversation(fields["conversations"], list(fields.get("images") or []), ctx.rules,
                              file=ctx.file, index=ctx.index).turns
    while turns and turns[-1].role == "assistant":
        turns = turns[:-1]
    return turns


def _score(preds, refs, **_) -> dict[str, float]:
    from chameleon_ft.evaluation.metrics import exact_match

    return {"exact_match": exact_match(preds, refs)}


TASK = register_task(Task(
    name="chat",
    description="multi-turn conversations with images anywhere (assistant turns learned)",
    key_field="conversations",
    fields=("conversations", "images"),
    needs_image=False,
    label_mask="assistant",
    monitor="val/loss",
    monitor_mode="min",
    output="text",
    conversation=_conversation,
    prompt=_prompt,
    prompt_field="prompt",
    score=_score,
))
