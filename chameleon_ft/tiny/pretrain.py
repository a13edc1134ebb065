"""The tiny base's short pretraining on image-text pairs, as real Chameleon was pretrained before anyone
fine-tuned it.

A randomly initialised base cannot read or draw images, so a LoRA fine-tune would first have to learn
both from a few hundred steps. Real Chameleon was pretrained on interleaved image-text data; this is
that step in miniature: every image of the bundled digits' TRAIN split (never val or test, see
:func:`train_digits`) as a plain image-text document in both directions, without a chat template and
with words that differ from the fine-tuning prompts:

- image then text: ``<s> [image] A handwritten digit: 7 (seven).</s>``;
- text then image: ``<s> A handwritten digit: 7 (seven). [image]</s>``.

Every token after ``<s>`` is learned (image logits unmasked). The whole model trains (AdamW, warmup then
cosine), on seeded batches, single-threaded so that the same seed gives the same weights on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from chameleon_ft.data.formats.digits import DIGIT_WORDS, load_scans, render_digit, split_indices
from chameleon_ft.data.image_layout import image_to_ids
from chameleon_ft.model.loss import IGNORE_INDEX
from chameleon_ft.model.modeling import image_logits_unmasked
from chameleon_ft.model.tokens import ChameleonTokens
from chameleon_ft.vq.preprocess import pil_to_tensor

PRETRAIN_TEXT = "A handwritten digit: {digit} ({word})."


@dataclass(frozen=True)
class PretrainSettings:
    """How long and how hard the tiny base is pretrained."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 16
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass(frozen=True)
class DigitImages:
    """Digit scans of one split rendered as model inputs: ``pixels`` ``[N, 3, S, S]`` in [-1, 1]."""

    indices: list[int]  # scikit-learn indices of the scans
    labels: list[int]
    pixels: torch.Tensor


def train_digits(size: int) -> DigitImages:
    """Every scan of the digits TRAIN split, rendered as the digits data renders it (the only images the
    tiny base ever sees: its VQGAN is fitted to them and it is pretrained on them)."""
    scans, labels = load_scans()
    indices = split_indices("train")
    pixels = torch.stack([pil_to_tensor(render_digit(scans[i], size)) for i in indices])
    return DigitImages(indices, [int(labels[i]) for i in indices], pixels)


def pretraining_texts() -> list[str]:
    """The text of every digit's pretraining documents."""
    return [PRETRAIN_TEXT.format(digit=d, word=w) for d, w in enumerate(DIGIT_WORDS)]


def pretraining_documents(tokenizer, tokens: ChameleonTokens, codes: list[torch.Tensor], labels: list[int],
                          layout: str, image_size: int) -> list[list[int]]:
    """Token ids of the pretraining documents: for each image (its code grid and digit), image-then-text
    and text-then-image, each ``<s> ... </s>``."""
    docs = []
    for grid, label in zip(codes, labels):
        image = image_to_ids(grid, tokens, layout, pixel_size=(image_size, image_size))
        text = tokenizer.encode(pretraining_texts()[label], add_special_tokens=False)
        docs.append([tokens.bos, *image, *text, tokens.eos])
        docs.append([tokens.bos, *text, *image, tokens.eos])
    return docs


def _batch(docs: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    n = max(len(d) for d in docs)
    ids = torch.full((len(docs), n), pad, dtype=torch.long)
    labels = torch.full((len(docs), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(docs), n), dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = labels[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d)] = 1
    labels[:, 0] = IGNORE_INDEX  # <s> is never predicted
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_factor(step: int, s: PretrainSettings) -> float:
    """Linear warmup to 1, then cosine down to ``min_lr_ratio`` at the last step."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain(model, docs: list[list[int]], pad: int, settings: PretrainSettings = PretrainSettings(),
             seed: int = 0) -> list[float]:
    """Train every parameter of ``model`` on ``docs`` (batches drawn by a ``seed``-ed permutation, epoch
    after epoch); returns the loss of each step. Global RNG state is left untouched."""
    s = settings
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, s))
    order: list[int] = []
    losses = []
    model.train()
    with image_logits_unmasked(model):
        for _ in range(s.steps):
            if len(order) < s.batch_size:
                order += rng.permutation(len(docs)).tolist()
            take, order = order[: s.batch_size], order[s.batch_size :]
            batch = _batch([docs[i] for i in take], pad)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    model.eval()
    for p in model.parameters():
        p.grad = None
    return losses
