"""The one canonical training sample: a conversation of turns, each a list of text and image segments.

Every reader produces this, and tokenization consumes only this. Two forms:

- dataclasses (:class:`Conversation`, :class:`Turn`, :class:`Segment`, :class:`ImageRef`) for code;
- a plain record (:meth:`Conversation.to_record`), Arrow-friendly so ``datasets`` can map and cache it::

    {"turns": [{"role": "user", "segments": [{"type": "image", "text": None,
                                              "image_path": "/data/coco/0001.jpg", "image_bytes": None},
                                             {"type": "text", "text": "Describe the image.",
                                              "image_path": None, "image_bytes": None}]},
               {"role": "assistant", "segments": [...]}],
     "task": "captioning", "meta_json": "{...}", "source": "/data/captions.json", "index": 17}

An image is given either by a path (already resolved against the image root by the reader) or by its
encoded bytes (in-memory images from a ``datasets`` Image column).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import datasets

from chameleon_ft.data.errors import BadSampleError

ROLES = ("system", "user", "assistant")

# Arrow schema of a canonical record. Given explicitly so that all-None columns (e.g. no in-memory image
# anywhere) still have a type, and splits/shards can be concatenated.
SEGMENT_FEATURES = {
    "type": datasets.Value("string"),
    "text": datasets.Value("string"),
    "image_path": datasets.Value("string"),
    "image_bytes": datasets.Value("binary"),
}
RECORD_FEATURES = datasets.Features({
    "turns": datasets.List({"role": datasets.Value("string"), "segments": datasets.List(SEGMENT_FEATURES)}),
    "task": datasets.Value("string"),
    "meta_json": datasets.Value("string"),
    "source": datasets.Value("string"),
    "index": datasets.Value("int64"),
})


@dataclass(frozen=True)
class ImageRef:
    """An image: a file ``path`` or encoded ``data`` bytes (exactly one)."""

    path: str | None = None
    data: bytes | None = None

    def __post_init__(self):
        if (self.path is None) == (self.data is None):
            raise ValueError("ImageRef needs exactly one of path or data")

    def open(self, file: str = "<memory>", index: int = -1):
        """Decode fully (see :func:`chameleon_ft.data.images.open_image`); errors name ``file``/``index``."""
        from chameleon_ft.data.images import open_image

        return open_image(self.path if self.path is not None else self.data, file, index)


@dataclass(frozen=True)
class Segment:
    """Text or an image (exactly one)."""

    text: str | None = None
    image: ImageRef | None = None

    def __post_init__(self):
        if (self.text is None) == (self.image is None):
            raise ValueError("Segment needs exactly one of text or image")

    @property
    def type(self) -> str:
        return "text" if self.text is not None else "image"

    @classmethod
    def of_text(cls, text: str) -> Segment:
        return cls(text=text)

    @classmethod
    def of_image(cls, path: str | None = None, data: bytes | None = None) -> Segment:
        return cls(image=ImageRef(path=path, data=data))

    def to_record(self) -> dict:
        img = self.image
        return {"type": self.type, "text": self.text,
                "image_path": img.path if img else None, "image_bytes": img.data if img else None}

    @classmethod
    def from_record(cls, rec: dict) -> Segment:
        if rec["type"] == "text":
            return cls(text=rec["text"])
        if rec["type"] == "image":
            return cls(image=ImageRef(path=rec.get("image_path"), data=rec.get("image_bytes")))
        raise ValueError(f"unknown segment type {rec['type']!r}")


@dataclass
class Turn:
    role: str  # system | user | assistant
    segments: list[Segment] = field(default_factory=list)

    @property
    def images(self) -> list[ImageRef]:
        return [s.image for s in self.segments if s.image is not None]

    @property
    def text(self) -> str:
        """The turn's text segments joined (images left out)."""
        return "".join(s.text for s in self.segments if s.text is not None)


@dataclass
class Conversation:
    """A sample. ``meta`` holds whatever evaluation or bookkeeping needs (VQA ``answers``, caption
    ``references``, ``question_id``...); ``source``/``index`` name the input file and record."""

    turns: list[Turn]
    task: str = "chat"
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    index: int = -1

    @property
    def images(self) -> list[ImageRef]:
        return [im for t in self.turns for im in t.images]

    def to_record(self) -> dict:
        """The plain-dict form (see the module docstring)."""
        return {
            "turns": [{"role": t.role, "segments": [s.to_record() for s in t.segments]} for t in self.turns],
            "task": self.task,
            "meta_json": json.dumps(self.meta, ensure_ascii=False, sort_keys=True),
            "source": self.source,
            "index": int(self.index),
        }

    @classmethod
    def from_record(cls, rec: dict) -> Conversation:
        """Inverse of :meth:`to_record` (accepts a row of a ``datasets.Dataset`` of records)."""
        turns = [Turn(t["role"], [Segment.from_record(s) for s in t["segments"]]) for t in rec["turns"]]
        meta = json.loads(rec["meta_json"]) if rec.get("meta_json") else {}
        return cls(turns=turns, task=rec.get("task") or "chat", meta=meta,
                   source=rec.get("source") or "", index=int(rec.get("index", -1)))


def validate_conversation(conv: Conversation, file: str | None = None, index: int | None = None) -> Conversation:
    """Check the structure every consumer relies on; returns ``conv`` or raises :class:`BadSampleError`.

    Reasons: ``empty_conversation`` (no turns), ``unknown_role``, ``empty_turn`` (a turn with no segment or
    only empty text), ``no_assistant_turn``.
    """
    file = conv.source if file is None else file
    index = conv.index if index is None else index
    if not conv.turns:
        raise BadSampleError(file, index, "empty_conversation", "the conversation has no turns")
    for i, turn in enumerate(conv.turns):
        if turn.role not in ROLES:
            raise BadSampleError(file, index, "unknown_role",
                                 f"turn {i} has role {turn.role!r}; expected one of {ROLES}")
        if not any(s.image is not None or (s.text and s.text.strip()) for s in turn.segments):
            raise BadSampleError(file, index, "empty_turn", f"turn {i} ({turn.role}) has no text and no image")
    if not any(t.role == "assistant" for t in conv.turns):
        raise BadSampleError(file, index, "no_assistant_turn", "the conversation has no assistant turn to learn")
    return conv
