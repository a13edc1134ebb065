"""Errors for bad input data, and the policy that decides whether a bad sample stops the run.

Every problem with one sample is a :class:`BadSampleError` naming the file, the record index and a short
machine-readable reason. Problems with a whole file or with the configuration are
:class:`DataFormatError` / :class:`DataConfigError` and always stop the run.

With ``on_bad_sample: skip`` a :class:`BadSamplePolicy` counts each skipped sample per reason, keeps a few
examples, logs a summary and can write a JSON report: nothing is ever dropped silently.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from chameleon_ft.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# reason code -> what it means (the report and the docs list these)
REASONS = {
    "missing_image": "an image file named by the record does not exist",
    "outside_root": "an image path lies outside the image root (data.allow_outside_root=false)",
    "bad_image": "an image file cannot be decoded (truncated, not an image, too large)",
    "placeholder_count": "the number of image markers in the text differs from the number of images",
    "empty_conversation": "the record has no turns",
    "empty_turn": "a turn has neither text nor image",
    "unknown_role": "a turn's role is not one of system/user/assistant (or a known alias)",
    "no_assistant_turn": "nothing to learn: the conversation has no assistant turn",
    "turn_order": "ShareGPT turns do not alternate user/assistant (after an optional system turn) in pairs",
    "no_trainable_tokens": "after tokenization (and truncation) no label is trained",
    "text_only": "the task needs an image but the record has none",
    "missing_field": "a field the format or task requires is absent or empty",
    "bad_record": "the record has the wrong shape (e.g. a field of the wrong type)",
    "bad_json": "the line is not valid JSON",
    "non_utf8": "the text is not valid UTF-8",
    "too_long": "the tokenized sample is longer than max_length and cannot be truncated",
}

POLICIES = ("raise", "skip")


class DataConfigError(ConfigError):
    """The data configuration is invalid (unknown format, missing path, split not available...)."""


class DataFormatError(DataError):
    """A whole input file is unusable (missing, not JSON, wrong top-level structure)."""


class EmptySplitError(DataError):
    """A split has no usable sample: its file is empty, or every record of it was skipped as bad."""

    @classmethod
    def for_split(cls, file: str, split: str, read: int, skipped: dict[str, int], report: str | Path | None = None
                  ) -> EmptySplitError:
        """The error for ``split`` of ``file``: ``read`` records, ``skipped`` counts per reason."""
        if read == 0:
            return cls(f"{file}: split {split!r} is empty: the file has no records")
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(skipped.items())) or "none"
        where = f"; report: {report}" if report else ""
        return cls(f"{file}: split {split!r} has no usable samples: {read} record(s) read, all skipped as bad "
                   f"(counts per reason: {reasons}){where}")


class BadSampleError(DataError):
    """One record of an input file is unusable.

    ``str(err)`` reads ``"<file>: record <index>: <reason>: <detail>"``.
    """

    def __init__(self, file: str, record: int, reason: str, detail: str = ""):
        self.file = str(file)
        self.record = int(record)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.file}: record {self.record}: {reason}" + (f": {detail}" if detail else ""))

    def __reduce__(self):  # keep the fields when the error crosses a process boundary (datasets num_proc)
        return (type(self), (self.file, self.record, self.reason, self.detail))

    def to_dict(self) -> dict:
        return {"file": self.file, "record": self.record, "reason": self.reason, "detail": self.detail}

    @classmethod
    def from_dict(cls, d: dict) -> BadSampleError:
        return cls(d["file"], d["record"], d["reason"], d.get("detail", ""))


class BadSamplePolicy:
    """What to do with a :class:`BadSampleError`: ``"raise"`` it, or ``"skip"`` the sample and account for it.

    ``max_examples`` examples are kept per reason for the report.
    """

    def __init__(self, on_bad_sample: str = "raise", max_examples: int = 5):
        if on_bad_sample not in POLICIES:
            raise DataConfigError(f"on_bad_sample must be one of {POLICIES}, got {on_bad_sample!r}")
        self.on_bad_sample = on_bad_sample
        self.max_examples = int(max_examples)
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[dict]] = {}

    @property
    def skip(self) -> bool:
        return self.on_bad_sample == "skip"

    @property
    def total(self) -> int:
        """Number of samples skipped so far."""
        return sum(self.counts.values())

    def handle(self, err: BadSampleError) -> None:
        """Raise ``err`` under ``"raise"``; under ``"skip"`` record it (the caller drops the sample)."""
        if not self.skip:
            raise err
        self.counts[err.reason] += 1
        ex = self.examples.setdefault(err.reason, [])
        if len(ex) < self.max_examples:
            ex.append(err.to_dict())

    def summary(self) -> str:
        """One line: total skipped and the count per reason."""
        if not self.total:
            return "no bad samples"
        parts = ", ".join(f"{r}: {n}" for r, n in sorted(self.counts.items()))
        return f"skipped {self.total} bad sample(s) ({parts})"

    def log_summary(self, what: str = "data") -> None:
        """Warn with the summary and the first example of each reason (no-op when nothing was skipped)."""
        if not self.total:
            return
        lines = [f"{what}: {self.summary()}"]
        for _, ex in sorted(self.examples.items()):
            lines.append("  e.g. " + str(BadSampleError.from_dict(ex[0])))
        logger.warning("\n".join(lines))

    def to_dict(self) -> dict:
        return {
            "on_bad_sample": self.on_bad_sample,
            "total_skipped": self.total,
            "counts": dict(sorted(self.counts.items())),
            "examples": {r: list(e) for r, e in sorted(self.examples.items())},
            "reasons": {r: REASONS.get(r, "") for r in sorted(self.counts)},
        }

    def write_report(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` (parents created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))
        tmp.replace(path)
        return path

    @staticmethod
    def read_report(path: str | Path) -> dict:
        """Load a report written by :meth:`write_report`."""
        return json.loads(Path(path).read_text())
