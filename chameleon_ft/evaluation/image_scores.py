"""Content metrics of text-to-image: images drawn from held-out prompts, scored by the data's image scorers.

:class:`ImageScoring` draws one image per held-out row (its ``prompt_ids``: the run's own template, built
as training built it) in batches with classifier-free guidance, decodes them with the checkpoint's VQGAN
and scores them with the scorers of :mod:`chameleon_ft.evaluation.image_scorers` (e.g. ``image_match``).

Each metric also gets a ceiling, ``<metric>_ceiling``: the same scorer on the VQ reconstructions of the
held-out rows' real images (their target codes, decoded). The image tokens cannot carry more than that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from chameleon_ft.data.image_layout import ids_to_image, image_spans
from chameleon_ft.evaluation.image_scorers import (
    ImageScorer, ImageScoringError, ScorerOptions, build_image_scorers, image_scorer_names,
)
from chameleon_ft.model.assets import CheckpointAssets
from chameleon_ft.model.tokens import ChameleonTokens
from chameleon_ft.vq.image_tokenizer import ImageTokenizer

CEILING_SUFFIX = "_ceiling"


def mean_scores(per_image: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each metric over its images (metrics without images are left out)."""
    return {k: sum(v) / len(v) for k, v in per_image.items() if v}


@dataclass
class ImageScoring:
    """Draw, decode and score images for held-out rows (see the module docstring)."""

    scorers: list[ImageScorer]
    tokens: ChameleonTokens
    decoder: ImageTokenizer
    layout: str  # the image-token layout the model was trained with
    size: int  # the generated images' side in pixels
    cfg_scale: float
    seed: int
    top_k: int = 2000
    temperature: float = 1.0

    @classmethod
    def build(cls, data_cfg, eval_cfg, assets: CheckpointAssets, *, seed: int, device="cpu") -> ImageScoring:
        """The scorers of ``data_cfg.format`` (and ``clip`` with ``eval_cfg.clip_model``) for ``assets``' images."""
        from chameleon_ft.data.formats import get_format

        size = int(data_cfg.image_size)
        clip_model = eval_cfg.clip_model
        names = image_scorer_names(get_format(str(data_cfg.format)).image_scorer, clip_model)
        scorers = build_image_scorers(names, ScorerOptions(image_size=size, clip_model=clip_model, device=str(device)))
        decoder = ImageTokenizer(assets.vqgan(device), image_size=size)
        return cls(scorers, assets.tokens, decoder, assets.image_layout(str(data_cfg.image_layout)), size,
                   float(eval_cfg.cfg_scale), int(seed), int(eval_cfg.image_top_k),
                   float(eval_cfg.image_temperature))

    def draw(self, model, prompts: Sequence[Sequence[int]], batch_size: int) -> list[Image.Image]:
        """One image per prompt, generated in batches of ``batch_size`` (batch ``k`` seeded ``seed + k``)."""
        from chameleon_ft.generation.generate import generate_images

        codes = []
        for k, s in enumerate(range(0, len(prompts), batch_size)):
            results = generate_images(model, self.tokens, prompts[s : s + batch_size], width=self.size,
                                      height=self.size, layout=self.layout, cfg_scale=self.cfg_scale,
                                      image_top_k=self.top_k, temperature=self.temperature, seed=self.seed + k)
            codes += [r["codes"] for r in results]
        return self.decoder.decode(codes) if codes else []

    def score(self, images: Sequence[Image.Image], metas: Sequence[dict]) -> dict[str, list[float]]:
        """Every scorer's per-image values."""
        out: dict[str, list[float]] = {}
        for scorer in self.scorers:
            out.update(scorer.score(list(images), list(metas)))
        return out

    def reconstructions(self, rows: Sequence[dict]) -> list[Image.Image]:
        """The VQ reconstructions of the rows' real images: each row's last image span, decoded."""
        grid = (self.size // 16, self.size // 16) if self.layout == "chameleon" else None
        codes = []
        for i, row in enumerate(rows):
            ids = list(row["input_ids"])
            spans = image_spans(ids, self.tokens)
            if not spans:
                raise ImageScoringError(f"held-out row {i} has no image to reconstruct")
            start, end = spans[-1]
            codes.append(ids_to_image(ids[start:end], self.tokens, self.layout, grid=grid)[0])
        return self.decoder.decode(codes) if codes else []

    def ceilings(self, rows: Sequence[dict], metas: Sequence[dict]) -> dict[str, float]:
        """``<metric>_ceiling``: each metric's mean on the VQ reconstructions of the rows' real images."""
        if not self.scorers or not rows:
            return {}
        return {k + CEILING_SUFFIX: v for k, v in mean_scores(self.score(self.reconstructions(rows), metas)).items()}
