"""Bundled real data: scikit-learn's handwritten digits as captioning, VQA and text-to-image sets.

``sklearn.datasets.load_digits`` ships 1797 real 8x8 scans (values 0..16) inside scikit-learn, so these
sets need no download. They exercise the same path-based code as real data: each scan is rendered to a
PNG file in a cache directory (``$CHAMELEON_FT_CACHE`` or ``~/.cache/chameleon_ft``) and referenced by path.

- Rendering: dark ink on a white background (like a scan, and like the white compositing of the image
  preprocessing); ``value 0 -> 255, value 16 -> 0``, upscaled from 8x8 to ``image_size`` with BICUBIC.
- Split: stratified per digit, fixed and independent of library versions. Within each class the scans
  are ordered by ``blake2b("digits:<index>")``; the first ``round(0.1 n)`` are val, the next ``round(0.1 n)``
  test, the rest train. Counts: train 1439, val 179, test 179 (all 1797 covered, disjoint).
- captioning: user ``[image, "Describe the image briefly."]``, assistant ``"a handwritten digit seven"``.
- vqa: train asks all three questions of every image (4317 samples); val and test ask one per image,
  the type rotating by the image's position in its split (sorted by sklearn index): ``digit`` ("What digit is this?" -> "7"), ``parity`` ("Is this digit even?" -> "no"),
  ``greater_than_five`` ("Is this digit greater than five?" -> "yes"), so held-out splits mix the types
  evenly. ``meta["answers"]`` is the answer ten times (the VQAv2 metric's shape), ``meta["question_type"]``
  the type.
- text_to_image: user ``"Generate an image of 64x64 according to the following prompt:\\nDraw the digit 7"``
  (Lumina-mGPT's style; the template is configurable), assistant ``[image]``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from chameleon_ft.data.config import canonical_split
from chameleon_ft.data.errors import DataConfigError
from chameleon_ft.data.sample import (
    RECORD_FEATURES, ImageRef, captioning_conversation, text_to_image_conversation, vqa_conversation,
)

NUM_DIGITS = 1797
SOURCE = "sklearn.datasets.load_digits"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION_TYPES = ("digit", "parity", "greater_than_five")
VAL_FRACTION = TEST_FRACTION = 0.1
RENDER_VERSION = "v1"  # bump when rendering changes, so stale cached PNGs are not reused
DATASET_VERSION = "2"  # bump when the samples built from the scans change (part of the pre-tokenization key)
DIGITS_TASKS = {"captioning": "captioning", "vqa": "vqa", "t2i": "text_to_image", "text_to_image": "text_to_image"}


def default_cache_dir() -> Path:
    """``$CHAMELEON_FT_CACHE`` or ``~/.cache/chameleon_ft``."""
    env = os.environ.get("CHAMELEON_FT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "chameleon_ft"


@functools.lru_cache(maxsize=1)
def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] float 0..16, labels [1797] int)`` from scikit-learn."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(int)


def split_indices(split: str) -> list[int]:
    """Sorted sklearn indices of ``split`` (``train``/``val``/``test``)."""
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
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = folder / "digits" / f"{RENDER_VERSION}-{size}px"
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


def digits_conversations(task: str, split: str, image_size: int = 64, cache_dir: str | Path | None = None,
                         prompt_template: str | None = None) -> list[dict]:
    """Canonical records (:meth:`Conversation.to_record`) of the digits ``task`` (``captioning``, ``vqa``,
    ``t2i``/``text_to_image``) for ``split``, in sklearn-index order."""
    if task not in DIGITS_TASKS:
        raise DataConfigError(f"unknown digits task {task!r}; choose one of {sorted(DIGITS_TASKS)}")
    task = DIGITS_TASKS[task]
    _, labels = load_scans()
    records = []
    split_name = canonical_split(split)
    for pos, idx in enumerate(split_indices(split)):
        label = int(labels[idx])
        image = ImageRef(path=str(digit_image_path(idx, image_size, cache_dir)))
        meta = {"label": label}
        if task == "captioning":
            conv = captioning_conversation(image, f"a handwritten digit {DIGIT_WORDS[label]}", prompt=prompt_template,
                                           meta=meta, source=SOURCE, index=idx)
        elif task == "vqa":
            # Training asks every question of every image (more supervision from few scans); held-out splits
            # ask one per image, rotating the type, so each image is scored once.
            qtypes = QUESTION_TYPES if split_name == "train" else [QUESTION_TYPES[pos % len(QUESTION_TYPES)]]
            for qtype in qtypes:
                question, answer = digit_question(label, qtype)
                qmeta = dict(meta, question_type=qtype, answers=[answer] * 10)
                records.append(vqa_conversation(image, question, answer, template=prompt_template, meta=qmeta,
                                                source=SOURCE, index=idx).to_record())
            continue
        else:
            conv = text_to_image_conversation(f"Draw the digit {label}", image, width=image_size, height=image_size,
                                              template=prompt_template, meta=meta, source=SOURCE, index=idx)
        records.append(conv.to_record())
    return records


def digits_dataset(task: str, split: str, image_size: int = 64, cache_dir: str | Path | None = None,
                   prompt_template: str | None = None) -> datasets.Dataset:
    """:func:`digits_conversations` as a ``datasets.Dataset`` with the canonical features."""
    recs = digits_conversations(task, split, image_size, cache_dir, prompt_template)
    return datasets.Dataset.from_list(recs, features=RECORD_FEATURES)
