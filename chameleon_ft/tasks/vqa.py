"""Visual question answering: an image and a question, a short answer; scored with the VQAv2 accuracy."""

from __future__ import annotations

from collections import Counter

from chameleon_ft.data.sample import Conversation, Segment, Turn
from chameleon_ft.tasks import SampleContext, Task, record_meta, register_task, single_image, text_field, user_turn

DEFAULT_TEMPLATE = "{question}\nAnswer the question using a single word or phrase."


def most_common_answer(answers: list[str], preferred: str | None = None) -> str:
    """The most frequent answer. Ties: ``preferred`` (VQAv2's ``multiple_choice_answer``) if it is among
    the tied answers, else the tied answer that appears first in ``answers``. Answers are compared as
    given, after stripping surrounding whitespace."""
    answers = [a.strip() for a in answers if isinstance(a, str) and a.strip()]
    if not answers:
        raise ValueError("no answers")
    counts = Counter(answers)
    top = max(counts.values())
    tied = [a for a in dict.fromkeys(answers) if counts[a] == top]
    if preferred is not None and preferred.strip() in tied:
        return preferred.strip()
    return tied[0]


def _prompt(fields: dict, ctx: SampleContext) -> list[Turn]:
    question = text_field(fields, "question", ctx)
    text = TASK.template(ctx.prompt_template).format(question=question)
    return [user_turn(single_image(fields, TASK.name, ctx), text)]


def _conversation(fields: dict, ctx: SampleContext) -> Conversation:
    prompt = _prompt(fields, ctx)
    answers = fields.get("answers")
    if isinstance(answers, list):  # plain strings, or VQAv2-style {"answer": ...}
        answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
        if not any(isinstance(a, str) and a.strip() for a in answers):
            answers = None
    else:
        answers = None
    answer = text_field(fields, "answer", ctx, required=not answers)
    if answer is None:
        answer = most_common_answer(answers, fields.get("multiple_choice_answer"))
    meta = record_meta(fields)
    meta["answers"] = answers or [answer]
    meta.setdefault("question", fields["question"])
    return Conversation(prompt + [Turn("assistant", [Segment.of_text(answer)])], TASK.name, meta, ctx.file, ctx.index)


def _score(preds, answers, *, vqa_normalization: str = "official", **_) -> dict[str, float]:
    from chameleon_ft.evaluation.metrics import exact_match, vqa_accuracy

    return {"acc": vqa_accuracy(preds, answers, normalization=vqa_normalization),
            "exact_match": exact_match(preds, answers)}


TASK = register_task(Task(
    name="vqa",
    description="an image and a question -> a short answer (VQAv2 accuracy)",
    key_field="question",
    fields=("image", "question", "answer", "answers"),
    needs_image=True,
    label_mask="assistant",
    monitor="val/acc",
    monitor_mode="max",
    output="text",
    conversation=_conversation,
    prompt=_prompt,
    prompt_template=DEFAULT_TEMPLATE,
    template_keys=("question",),
    prompt_field="question",
    reference_key="answers",
    score=_score,
))
