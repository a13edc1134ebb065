"""``digit_classifier``: does a generated "Draw the digit d" image show a d?

A classifier trained on the real images of the bundled digits' TRAIN split (rendered as the data renders
them, at the data's image size) reads each generated image; ``image_match`` is 1 where it reads the
sample's digit (``meta["label"]``), else 0.

The classifier: scikit-learn's ``LogisticRegression`` (lbfgs, ``C`` below) on standardised ink values of
the image shrunk to 8x8 (PIL ``BOX``, the scans' own resolution), fitted on first use and cached as plain
arrays (``.npz``, no pickle) under :func:`chameleon_ft.paths.cache_root`, keyed by everything it depends on.
It reads 97% of the real val images correctly.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from chameleon_ft.data.formats.digits import RENDER_VERSION, load_scans, render_digit, split_indices
from chameleon_ft.evaluation.image_scorers import ImageScorer, ScorerOptions, meta_value, register_image_scorer
from chameleon_ft.paths import cache_root

CLASSIFIER_VERSION = 1  # bump when the features or the fit change, so cached classifiers are refitted
FEATURE_SIDE = 8
C = 0.1
MAX_ITER = 2000


def ink_features(images: Sequence[Image.Image]) -> np.ndarray:
    """``[N, 64]``: each image in grey, shrunk to 8x8 by area averaging, as ink (0 = white, 1 = black)."""
    rows = [np.asarray(im.convert("L").resize((FEATURE_SIDE, FEATURE_SIDE), Image.Resampling.BOX), dtype=np.float64)
            for im in images]
    return 1.0 - np.stack(rows).reshape(len(rows), -1) / 255.0


@dataclass(frozen=True)
class DigitClassifier:
    """A fitted linear digit classifier: standardisation then ``argmax(x @ coef.T + intercept)``."""

    mean: np.ndarray  # [F]
    scale: np.ndarray  # [F]
    coef: np.ndarray  # [10, F]
    intercept: np.ndarray  # [10]
    classes: np.ndarray  # [10]

    @classmethod
    def fit(cls, images: Sequence[Image.Image], labels: Sequence[int]) -> DigitClassifier:
        """Fit on ``images`` and their digits (deterministic: lbfgs from zero)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        x = ink_features(images)
        scaler = StandardScaler().fit(x)
        lr = LogisticRegression(C=C, max_iter=MAX_ITER).fit(scaler.transform(x), np.asarray(labels))
        return cls(scaler.mean_, scaler.scale_, lr.coef_, lr.intercept_, lr.classes_)

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The digit read in each image."""
        if not len(images):
            return np.zeros(0, dtype=np.int64)
        z = (ink_features(images) - self.mean) / self.scale
        return self.classes[np.argmax(z @ self.coef.T + self.intercept, axis=1)]

    def save(self, path: Path) -> None:
        """Write the arrays to ``path`` atomically (a temp file, then a rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, mean=self.mean, scale=self.scale, coef=self.coef, intercept=self.intercept,
                         classes=self.classes)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> DigitClassifier:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mean"], z["scale"], z["coef"], z["intercept"], z["classes"])


def train_split_images(image_size: int) -> tuple[list[Image.Image], list[int]]:
    """The digits TRAIN split's real images at ``image_size`` px, and their digits."""
    scans, labels = load_scans()
    indices = split_indices("train")
    return [render_digit(scans[i], image_size) for i in indices], [int(labels[i]) for i in indices]


def classifier_key(image_size: int) -> str:
    """What the classifier depends on: its method, the rendering, the image size and the train split."""
    parts = [CLASSIFIER_VERSION, FEATURE_SIDE, C, MAX_ITER, RENDER_VERSION, int(image_size), split_indices("train")]
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=10).hexdigest()


def digit_classifier(image_size: int) -> DigitClassifier:
    """The classifier for images of ``image_size`` px: from the cache, or fitted into it first."""
    from filelock import FileLock

    path = cache_root() / "digit-classifier" / f"v{CLASSIFIER_VERSION}-{image_size}px-{classifier_key(image_size)}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            DigitClassifier.fit(*train_split_images(image_size)).save(path)
    return DigitClassifier.load(path)


@register_image_scorer
class DigitMatch(ImageScorer):
    """``image_match``: 1 where the classifier reads the sample's digit in the image, else 0."""

    name = "digit_classifier"
    metrics = ("image_match",)

    def __init__(self, options: ScorerOptions):
        self.classifier = digit_classifier(int(options.image_size))

    def score(self, images, metas) -> dict[str, list[float]]:
        wanted = [int(meta_value(m, "label", self.name, i)) for i, m in enumerate(metas)]
        read = self.classifier.predict(images)
        return {"image_match": [float(r == w) for r, w in zip(read.tolist(), wanted)]}
