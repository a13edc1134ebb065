"""Image scorers: does a generated image show what its prompt asked for? (a registry, one module per scorer)

A scorer measures images against the samples they were generated for (each sample's ``meta``) and returns
one value per image and metric, so that the shares of several processes can be gathered before the mean.

Which scorers run is chosen per data source, not per task: a data format names the scorer that knows its
content (:attr:`chameleon_ft.data.formats.Format.image_scorer`; the bundled digits name
``digit_classifier``), and ``eval.clip_model=/local/clip/dir`` adds ``clip`` for any data.

Adding a scorer is one module in this package that defines an :class:`ImageScorer` subclass decorated with
:func:`register_image_scorer` (modules are discovered automatically).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from PIL import Image

from chameleon_ft.errors import ConfigError, DataError
from chameleon_ft.registry import Registry


class ImageScoringError(DataError):
    """A sample lacks what its scorer needs (e.g. the digit label or the prompt text)."""


@dataclass(frozen=True)
class ScorerOptions:
    """What building a scorer may need."""

    image_size: int  # side of the generated images (the data's image size)
    clip_model: str | None = None  # eval.clip_model: a local CLIP directory
    device: str = "cpu"


class ImageScorer(ABC):
    """Scores generated images against their samples' meta."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # the metric names :meth:`score` returns

    @abstractmethod
    def score(self, images: Sequence[Image.Image], metas: Sequence[dict]) -> dict[str, list[float]]:
        """One value per image for each of :attr:`metrics`; ``metas[i]`` is image ``i``'s sample meta."""


IMAGE_SCORERS: Registry[type[ImageScorer]] = Registry("registered image scorer", "image_scorer", ConfigError)


def register_image_scorer(cls: type[ImageScorer]) -> type[ImageScorer]:
    """Class decorator: add ``cls`` to the registry under ``cls.name``."""
    return IMAGE_SCORERS.register(cls.name, cls)


def image_scorer_names(format_scorer: str | None, clip_model: str | None) -> list[str]:
    """The scorers that run: the data format's own (if it has one), and ``clip`` when a CLIP model is given."""
    names = [format_scorer] if format_scorer else []
    if clip_model:
        names.append("clip")
    return names


def build_image_scorers(names: Sequence[str], options: ScorerOptions) -> list[ImageScorer]:
    """Instances of the scorers ``names`` (an unknown name is an error listing the known ones)."""
    return [IMAGE_SCORERS.get(n)(options) for n in names]


def meta_value(meta: dict, key: str, scorer: str, index: int):
    """``meta[key]`` of sample ``index``, or an error naming the scorer, the sample and the keys it has."""
    if key not in meta or meta[key] is None:
        raise ImageScoringError(f"image scorer {scorer}: sample {index} has no {key!r} in its meta "
                                f"(it has {sorted(meta)})")
    return meta[key]


Registry.discover(__name__, __path__)
