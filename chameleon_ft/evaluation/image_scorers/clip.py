"""``clip``: CLIPScore of each generated image with its prompt text, for any data (``eval.clip_model=DIR``).

``clip_score`` = ``max(100 * cos(E_image, E_prompt), 0)``, with the embeddings of transformers'
``CLIPModel`` and the preprocessing of its ``CLIPProcessor``, both loaded from the local directory the
user names (never downloaded). This is the definition torchmetrics' ``CLIPScore`` uses (Hessel et al.,
2021, with a weight of 100), so values are comparable with published text-to-image CLIP scores of the same
CLIP model. Prompts longer than the text model's positions are truncated, as torchmetrics does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chameleon_ft.errors import ConfigError
from chameleon_ft.evaluation.image_scorers import ImageScorer, ScorerOptions, meta_value, register_image_scorer

BATCH = 32


def _embeddings(out) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding.
    return out.pooler_output if hasattr(out, "pooler_output") else out


def load_clip(directory: str, device: str = "cpu"):
    """``(CLIPModel, CLIPProcessor)`` from a local directory, in eval mode on ``device``."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(directory).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"eval.clip_model={directory}: not a local CLIP directory (no config.json there); "
                          "save one with CLIPModel.save_pretrained and CLIPProcessor.save_pretrained")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"eval.clip_model={directory}: cannot load a CLIPModel and CLIPProcessor from it ({e})") from e
    return model.to(device).eval(), processor


@register_image_scorer
class ClipScore(ImageScorer):
    """``clip_score`` of each image with its sample's ``meta["prompt"]`` (see the module docstring)."""

    name = "clip"
    metrics = ("clip_score",)

    def __init__(self, options: ScorerOptions):
        if not options.clip_model:
            raise ConfigError("the clip image scorer needs eval.clip_model=<local CLIP directory>")
        self.device = options.device
        self.model, self.processor = load_clip(options.clip_model, options.device)
        self.max_text = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def score(self, images, metas) -> dict[str, list[float]]:
        prompts = [str(meta_value(m, "prompt", self.name, i)) for i, m in enumerate(metas)]
        scores: list[float] = []
        for s in range(0, len(images), BATCH):
            pix = self.processor(images=[im.convert("RGB") for im in images[s : s + BATCH]], return_tensors="pt")
            text = self.processor(text=prompts[s : s + BATCH], return_tensors="pt", padding=True, truncation=True,
                                  max_length=self.max_text)
            img = _embeddings(self.model.get_image_features(pixel_values=pix["pixel_values"].to(self.device)))
            txt = _embeddings(self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                           attention_mask=text["attention_mask"].to(self.device)))
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
            scores += (100 * cos).clamp(min=0).cpu().tolist()
        return {"clip_score": scores}
