"""Chat messages with image markers -> a canonical :class:`~chameleon_ft.data.sample.Conversation`.

Messages are ``{"from"|"role": ..., "value"|"content": ...}``; content is a string with image markers
(``<image>``, ``<|image|>``) or OpenAI/HF-style parts (``{"type": "text", "text": ...}``,
``{"type": "image"}``). Conversation formats (LLaVA, Lumina-mGPT, ShareGPT) differ only in their
:class:`MarkerRules`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chameleon_ft.data.errors import BadSampleError
from chameleon_ft.data.sample import Conversation, ImageRef, Segment, Turn

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "model": "assistant", "system": "system"}
_MARK = object()  # an image position inside a message, after splitting on the marker


@dataclass(frozen=True)
class MarkerRules:
    """How a format marks images in text.

    ``marker``: the placeholder string. ``unmarked``: where images go when the text has no marker at all,
    ``"single"`` (LLaVA: one image allowed, at the start of the first user turn), ``"all"`` (Lumina:
    every image there) or ``"none"`` (LLaMA-Factory: every image needs its marker). ``verbatim``: text
    next to a marker is kept exactly as written (Lumina-mGPT tokenizes the whole conversation, so the
    newline in ``"<|image|>\n..."`` and the space in ``"... <|image|>"`` are tokens); otherwise whitespace
    that only separates a marker from the text is dropped. ``implicit_separator``: what follows each image
    put at the start of the first user turn when the text has no marker (Lumina-mGPT inserts
    ``"<|image|> "``).
    """

    marker: str = "<image>"
    unmarked: str = "single"
    verbatim: bool = False
    implicit_separator: str = ""


def _pieces(content: Any, marker: str, file: str, index: int, turn: int) -> list:
    """A message's content as text pieces and ``_MARK`` image positions."""
    if content is None:
        return []
    if isinstance(content, str):
        out: list = []
        for k, part in enumerate(content.split(marker)):
            if k:
                out.append(_MARK)
            out.append(part)
        return out
    if isinstance(content, list):
        out = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                out += _pieces(part.get("text") or "", marker, file, index, turn)
            elif kind == "image":
                out.append(_MARK)
            else:
                raise BadSampleError(file, index, "bad_record",
                                     f"turn {turn}: content part {part!r} is not text or image")
        return out
    raise BadSampleError(file, index, "bad_record",
                         f"turn {turn}: content must be a string, got {type(content).__name__}")


def _segments(pieces: list, images: list[ImageRef], verbatim: bool) -> list[Segment]:
    """Text pieces and image marks -> segments. Unless ``verbatim``, whitespace that only separated a marker
    from the text is dropped (an image has its own begin/end tokens); other text is kept as written."""
    merged: list = []  # adjacent text pieces are one text (tokenized together, as in the whole string)
    for p in pieces:
        if p is not _MARK and merged and merged[-1] is not _MARK:
            merged[-1] += p
        else:
            merged.append(p)
    pieces = merged
    segs: list[Segment] = []
    for k, p in enumerate(pieces):
        if p is _MARK:
            segs.append(Segment(image=images.pop(0)))
            continue
        if not verbatim and k > 0 and pieces[k - 1] is _MARK:
            p = p.lstrip()
        if not verbatim and k + 1 < len(pieces) and pieces[k + 1] is _MARK:
            p = p.rstrip()
        if p:
            segs.append(Segment.of_text(p))
    return segs


def chat_conversation(messages: Any, images: list[ImageRef], rules: MarkerRules, *, file: str, index: int,
                      task: str = "chat", meta: dict | None = None) -> Conversation:
    """Build a conversation from a list of messages and the record's (already resolved) images."""
    if not isinstance(messages, list):
        raise BadSampleError(file, index, "missing_field" if messages is None else "bad_record",
                             "conversations must be a list of turns")
    if not messages:
        raise BadSampleError(file, index, "empty_conversation", "conversations is empty")
    roles, contents = [], []
    for t, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadSampleError(file, index, "bad_record", f"turn {t} is not an object")
        raw_role = m.get("from", m.get("role"))
        role = ROLE_ALIASES.get(str(raw_role).strip().lower()) if raw_role is not None else None
        if role is None:
            raise BadSampleError(file, index, "unknown_role",
                                 f"turn {t} has role {raw_role!r}; expected one of {sorted(ROLE_ALIASES)}")
        roles.append(role)
        contents.append(_pieces(m.get("value", m.get("content")), rules.marker, file, index, t))
    refs = list(images)
    n_marks = sum(p is _MARK for c in contents for p in c)
    if n_marks == 0 and refs and (rules.unmarked == "all" or (rules.unmarked == "single" and len(refs) == 1)):
        first = roles.index("user") if "user" in roles else 0
        implicit: list = []
        for _ in refs:
            implicit += [_MARK, rules.implicit_separator]
        contents[first] = implicit + contents[first]
    elif n_marks != len(refs):
        raise BadSampleError(file, index, "placeholder_count",
                             f"{n_marks} {rules.marker} markers but {len(refs)} images")
    turns = [Turn(r, _segments(c, refs, rules.verbatim)) for r, c in zip(roles, contents, strict=True)]
    return Conversation(turns, task, dict(meta or {}), file, index)
