"""Bundled real data: scikit-learn's handwritten digits as captioning, VQA, text-to-image and interleaved sets.

``sklearn.datasets.load_digits`` ships 1797 real 8x8 scans (values 0..16) inside scikit-learn, so these
sets need no download. They exercise the same path-based code as real data: each scan is rendered to a
PNG file in the cache (:func:`chameleon_ft.paths.cache_root`) and referenced by path.

- Rendering: dark ink on a white background (like a scan, and like the white compositing of the image
  preprocessing); ``value 0 -> 255, value 16 -> 0``, upscaled from 8x8 to ``data.image_size`` with BICUBIC.
- Split: stratified per digit, fixed and independent of library versions. Within each class the scans
  are ordered by ``blake2b("digits:<index>")``; the first ``round(0.1 n)`` are val, the next ``round(0.1 n)``
  test, the rest train. Counts: train 1439, val 179, test 179 (all 1797 covered, disjoint).
- captioning: ``"a handwritten digit seven"``.
- vqa: train asks all three questions of every image (4317 samples); val and test ask one per image, the
  type rotating by the image's position in its split: ``digit`` ("What digit is this?" -> "7"),
  ``parity`` ("Is this digit even?" -> "no"), ``greater_than_five`` ("Is this digit greater than five?"
  -> "yes"), so held-out splits mix the types evenly. The answers are the answer ten times (the VQAv2
  metric's shape).
- text_to_image: ``"Draw the digit 7"``.
- interleaved: ``"Write the digit 7 in words and then draw it"`` -> ``"seven"``, then the image.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from chameleon_ft.data.formats import Format, RowContext, SplitInputs, register_format
from chameleon_ft.data.sample import ImageRef
from chameleon_ft.data.splits import canonical_split
from chameleon_ft.paths import cache_root

SOURCE = "sklearn.datasets.load_digits"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION_TYPES = ("digit", "parity", "greater_than_five")
VAL_FRACTION = TEST_FRACTION = 0.1
RENDER_VERSION = "v1"  # bump when rendering changes, so stale cached PNGs are not reused
DATASET_VERSION = "2"  # bump when the samples built from the scans change (part of the pre-tokenization key)
_RAW = datasets.Features({"_row": datasets.Value("int64"), "label": datasets.Value("int64"),
                          "qtype": datasets.Value("string")})


@functools.lru_cache(maxsize=1)
def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] float 0..16, labels [1797] int)`` from scikit-learn."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(int)


def split_indices(split: str) -> list[int]:
    """Sorted sklearn indices of ``split`` (``train``/``val``/``test``; aliases such as ``validation`` accepted)."""
    split = canonical_split(split)
    _, labels = load_scans()
    out: list[int] = []
    for c in range(10):
        members = sorted(np.flatnonzero(labels == c).tolist(),
                         key=lambda i: hashlib.blake2b(f"digits:{i}".encode(), digest_size=8).digest())
        n_val, n_test = round(len(members) * VAL_FRACTION), round(len(members) * TEST_FRACTION)
        part = {"val": members[:n_val], "test": members[n_val:n_val + n_test], "train": members[n_val + n_test:]}
        out += part[split]
    return sorted(out)


def render_digit(scan: np.ndarray, size: int = 64) -> Image.Image:
    """An 8x8 scan (0..16) as an RGB ``size`` x ``size`` image, dark digit on white."""
    gray = np.clip(np.rint(255.0 * (1.0 - np.asarray(scan, dtype=np.float64) / 16.0)), 0, 255).astype(np.uint8)
    img = Image.fromarray(gray, mode="L")
    if size != 8:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img.convert("RGB")


def digit_image_path(index: int, size: int = 64, cache_dir: str | Path | None = None) -> Path:
    """The PNG of scan ``index`` at ``size`` px, written on first use (atomically: temp file, then rename)."""
    folder = (Path(cache_dir).expanduser() if cache_dir else cache_root()) / "digits" / f"{RENDER_VERSION}-{size}px"
    path = folder / f"{index:04d}.png"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = load_scans()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{index:04d}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            render_digit(images[index], size).save(f, format="PNG")
        os.replace(tmp, path)  # atomic: concurrent writers produce identical bytes, readers never see a partial file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def digit_question(label: int, qtype: str) -> tuple[str, str]:
    """``(question, answer)`` of type ``qtype`` about digit ``label``."""
    if qtype == "digit":
        return "What digit is this?", str(label)
    if qtype == "parity":
        return "Is this digit even?", "yes" if label % 2 == 0 else "no"
    if qtype == "greater_than_five":
        return "Is this digit greater than five?", "yes" if label > 5 else "no"
    raise ValueError(f"unknown question type {qtype!r}; choose one of {QUESTION_TYPES}")


def _caption_fields(label: int, qtype: str | None) -> dict:
    return {"caption": f"a handwritten digit {DIGIT_WORDS[label]}"}


def _vqa_fields(label: int, qtype: str | None) -> dict:
    question, answer = digit_question(label, qtype)
    return {"question": question, "answer": answer, "answers": [answer] * 10, "_meta": {"question_type": qtype}}


def _t2i_fields(label: int, qtype: str | None) -> dict:
    return {"prompt": f"Draw the digit {label}"}


def _interleaved_fields(label: int, qtype: str | None) -> dict:
    return {"instruction": f"Write the digit {label} in words and then draw it", "response": DIGIT_WORDS[label]}


# The digits data for each task it supports: canonical fields of one image (and question type).
TASK_FIELDS = {"captioning": _caption_fields, "vqa": _vqa_fields, "text_to_image": _t2i_fields,
               "interleaved": _interleaved_fields}


@register_format
class DigitsFormat(Format):
    name = "digits"
    description = "bundled: scikit-learn's handwritten digits for captioning, vqa, text_to_image and interleaved"
    tasks = tuple(TASK_FIELDS)
    image_scorer = "digit_classifier"  # val/image_match: a classifier reads the drawn digit

    def split_inputs(self, cfg, split: str) -> SplitInputs:
        return SplitInputs({})

    def fingerprint(self, cfg, split: str) -> list:
        return ["digits", DATASET_VERSION, RENDER_VERSION]  # the scans ship with scikit-learn

    def raw(self, cfg, split: str, inputs: SplitInputs, task: str):
        _, labels = load_scans()
        rows = []
        for pos, idx in enumerate(split_indices(split)):
            # Training asks every question of every image (more supervision from few scans); held-out splits
            # ask one per image, rotating the type, so each image is scored once.
            if task != "vqa":
                qtypes = [None]
            elif canonical_split(split) == "train":
                qtypes = list(QUESTION_TYPES)
            else:
                qtypes = [QUESTION_TYPES[pos % len(QUESTION_TYPES)]]
            rows += [{"_row": idx, "label": int(labels[idx]), "qtype": q} for q in qtypes]
        return datasets.Dataset.from_list(rows, features=_RAW)

    def context(self, cfg, split: str, inputs: SplitInputs) -> RowContext:
        ctx = super().context(cfg, split, inputs)
        return replace(ctx, file=SOURCE)

    def fields(self, row: dict, ctx: RowContext) -> dict:
        idx, label = int(row["_row"]), int(row["label"])
        fields = TASK_FIELDS[ctx.task](label, row["qtype"])
        fields["image"] = ImageRef(path=str(digit_image_path(idx, ctx.image_size)))
        fields["_meta"] = {"label": label, **fields.get("_meta", {})}
        return fields
