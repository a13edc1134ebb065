"""Logits processors for Chameleon / Lumina-mGPT image generation with Hugging Face ``model.generate``.

All processors follow ``transformers.LogitsProcessor``: ``__call__(input_ids [B, L], scores [B, V]) -> [B, V]``.
They are *stateless*: each call re-derives every row's position from ``input_ids``, so they work batched,
with left padding, and with rows at different positions.

Typical text-to-image chain (see :func:`image_generation_processors`), in this order::

    [ClassifierFreeGuidanceLogitsProcessor,   # mix cond/uncond halves, both halves identical afterwards
     ImageGridLogitsProcessor,                # only legal tokens of the image layout survive
     ImageTopKLogitsProcessor,                # top-k ~2000 inside an image, 5-10 for text
     TemperatureLogitsWarper,                 # (transformers)
     LockstepSamplingLogitsProcessor]         # draw one token per cond/uncond pair, one-hot for both rows

and call ``model.generate(..., logits_processor=chain, do_sample=False)``: the sampling happens in the last
processor, and greedy decoding of its one-hot output picks exactly that token in both rows of every pair.
(``generate`` inserts its own processors *before* custom ones and its top-k/top-p/temperature warpers
*after* them when ``do_sample=True``; with ``do_sample=False`` none of those warpers run.)
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper

from chameleon_ft.data.image_layout import LAYOUTS, image_span_length
from chameleon_ft.errors import ConfigError
from chameleon_ft.model.tokens import ChameleonTokens

NEG_INF = float("-inf")


class GenerationConfigError(ConfigError):
    """Invalid arguments for an image-generation logits processor."""


def restrict_to_image_codes(scores: torch.Tensor, tokens: ChameleonTokens) -> torch.Tensor:
    """Return ``scores`` ``[..., V]`` with every non-image-code id set to ``-inf``."""
    keep = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    keep[tokens.image_token_ids.to(scores.device)] = True
    return scores.masked_fill(~keep, NEG_INF)


def open_image_offset(input_ids: torch.Tensor, tokens: ChameleonTokens) -> torch.Tensor:
    """Per row: how many tokens follow the last begin-image token, or -1 if no image is open.

    An image is open when the row's last ``boi`` comes after its last ``eoi``. The next token to generate is
    then at offset ``k`` from that ``boi`` (``k = 0``: the token right after it).
    """
    L = input_ids.shape[1]
    pos = torch.arange(L, device=input_ids.device).expand_as(input_ids)
    last_boi = torch.where(input_ids == tokens.boi, pos, -1).max(dim=1).values
    last_eoi = torch.where(input_ids == tokens.eoi, pos, -1).max(dim=1).values
    is_open = (last_boi >= 0) & (last_boi > last_eoi)
    return torch.where(is_open, L - 1 - last_boi, torch.full_like(last_boi, -1))


def guided_log_probs(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance of one pair of branches: ``g * (cond - uncond) + uncond`` on log-probabilities
    (float32). Ids that are ``-inf`` in either branch stay ``-inf`` (``inf - inf`` would be nan)."""
    lc, lu = torch.log_softmax(cond.float(), dim=-1), torch.log_softmax(uncond.float(), dim=-1)
    mixed = float(guidance_scale) * (lc - lu) + lu
    return mixed.masked_fill(torch.isneginf(lc) | torch.isneginf(lu), NEG_INF)


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``scores`` with everything below the ``k``-th largest of its last dimension set to ``-inf`` (ties kept)."""
    k = min(int(k), scores.shape[-1])
    threshold = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < threshold, NEG_INF)


class ImageGridLogitsProcessor(LogitsProcessor):
    """Force the tokens generated after the prompt to form exactly one ``height_tokens x width_tokens`` image.

    State machine, evaluated independently for each row from its ``input_ids`` (prompt included):

    * **open image** (the row's last ``boi`` is after its last ``eoi``; the prompt may end with ``boi`` or with
      ``boi`` + size tokens): let ``k`` = tokens since that ``boi``.

      - ``lumina``: ``k = 0`` -> size token of H, ``k = 1`` -> size token of W; then with ``j = k - 2`` and
        ``c = j mod (w + 1)``: ``j < h (w + 1)`` and ``c < w`` -> any image code; ``c = w`` -> ``row_end``;
        ``j >= h (w + 1)`` -> ``eoi``. So the image is ``boi, sH, sW, h x (w codes, row_end), eoi``.
      - ``chameleon``: ``k < h w`` -> any image code; otherwise ``eoi``.
    * **before the image** (no open image and no ``eoi`` generated after ``prompt_len``): only ``boi``.
    * **after the image** (an ``eoi`` was generated after ``prompt_len``): only ``after_image`` (default
      ``tokens.eot``, which ends the assistant turn in the Lumina-mGPT template; use it as ``eos_token_id``).

    Every other id gets ``-inf``. Size tokens default to 16 px per code (``pixel_size = (16 h, 16 w)``), as in
    :mod:`chameleon_ft.data.image_layout`; they are forced only when the model generates them, a prompt that
    already holds them is trusted.
    """

    def __init__(self, tokens: ChameleonTokens, prompt_len: int, height_tokens: int, width_tokens: int,
                 layout: str = "lumina", pixel_size: tuple[int, int] | None = None,
                 after_image: int | None = None):
        if layout not in LAYOUTS:
            raise GenerationConfigError(f"unknown image layout {layout!r}; choose one of {LAYOUTS}")
        if height_tokens < 1 or width_tokens < 1:
            raise GenerationConfigError(f"image grid must be at least 1x1, got {height_tokens}x{width_tokens}")
        if prompt_len < 0:
            raise GenerationConfigError(f"prompt_len must be >= 0, got {prompt_len}")
        self.tokens = tokens
        self.prompt_len = int(prompt_len)
        self.h, self.w = int(height_tokens), int(width_tokens)
        self.layout = layout
        self.after_image = tokens.eot if after_image is None else int(after_image)
        if layout == "lumina":
            H, W = pixel_size or (16 * self.h, 16 * self.w)
            self.size_ids = (tokens.size_token(H), tokens.size_token(W))
        else:
            self.size_ids = None
        self._image_ids = tokens.image_token_ids

    @property
    def image_length(self) -> int:
        """Tokens of the whole image span, ``boi`` and ``eoi`` included."""
        return image_span_length(self.h, self.w, self.layout)

    def forced_token(self, offset: torch.Tensor, image_done: torch.Tensor) -> torch.Tensor:
        """Per row: the single allowed id, or -1 where any image code is allowed (see the class docstring)."""
        t = self.tokens
        forced = torch.full_like(offset, -1)
        closed = offset < 0
        forced[closed & image_done] = self.after_image
        forced[closed & ~image_done] = t.boi
        k = offset.clamp(min=0)
        if self.layout == "lumina":
            forced[(offset == 0)] = self.size_ids[0]
            forced[(offset == 1)] = self.size_ids[1]
            j = k - 2
            grid = (offset >= 2) & (j < self.h * (self.w + 1))
            forced[grid & (j % (self.w + 1) == self.w)] = t.row_end
            forced[(offset >= 2) & (j >= self.h * (self.w + 1))] = t.eoi
        else:
            forced[(offset >= 0) & (k >= self.h * self.w)] = t.eoi
        return forced

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] < self.prompt_len:
            raise GenerationConfigError(
                f"input_ids has {input_ids.shape[1]} tokens, fewer than prompt_len={self.prompt_len}")
        V = scores.shape[-1]
        if max(self.tokens.boi, self.tokens.eoi, self.tokens.row_end, self.after_image,
               int(self._image_ids.max())) >= V:
            raise GenerationConfigError(f"scores have {V} columns, too few for the vocabulary's special ids")
        offset = open_image_offset(input_ids, self.tokens)
        image_done = (input_ids[:, self.prompt_len:] == self.tokens.eoi).any(dim=1)
        forced = self.forced_token(offset, image_done)

        allowed = torch.zeros_like(scores, dtype=torch.bool)
        rows = torch.nonzero(forced >= 0).squeeze(1)
        allowed[rows, forced[rows]] = True
        code_rows = torch.nonzero(forced < 0).squeeze(1)
        if code_rows.numel():
            allowed[code_rows.unsqueeze(1), self._image_ids.to(scores.device).unsqueeze(0)] = True
        return scores.masked_fill(~allowed, NEG_INF)


class ClassifierFreeGuidanceLogitsProcessor(LogitsProcessor):
    """Batched classifier-free guidance: the batch is ``[cond rows; uncond rows]`` (first half conditional).

    For each pair ``i``: ``mixed = g * (cond_i - uncond_i) + uncond_i`` on log-probabilities (log-softmax of each
    branch first, as transformers' unbatched CFG and Lumina-mGPT do; it differs from mixing raw logits only by a
    per-row constant, so the sampling distribution is the same). ``mixed`` is written to *both* rows of the
    pair, so any row-wise processor after it treats the pair identically. Keeping the pair's sampled tokens
    equal is the caller's job: greedy decoding does it automatically; for sampling end the chain with
    :class:`LockstepSamplingLogitsProcessor`. Ids that are ``-inf`` in either branch stay ``-inf``.

    Unlike ``transformers.ClassifierFreeGuidanceLogitsProcessor`` (MusicGen: input_ids hold only the cond half
    and the output is half the batch), here both halves are real sequences in the batch, as Lumina-mGPT's
    unconditional context (``boi`` onwards, no text) needs its own tokens.
    """

    def __init__(self, guidance_scale: float):
        self.guidance_scale = float(guidance_scale)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        B = scores.shape[0]
        if B % 2:
            raise GenerationConfigError(
                f"classifier-free guidance needs an even batch [cond; uncond], got batch size {B}")
        cond, uncond = scores.split(B // 2, dim=0)
        mixed = guided_log_probs(cond, uncond, self.guidance_scale)
        return torch.cat([mixed, mixed], dim=0).to(scores.dtype)


class ImageTopKLogitsProcessor(LogitsProcessor):
    """Top-k with one ``k`` inside an open image (``image_top_k``, ~2000) and another for text (5-10).

    A row is "inside an image" when its last ``boi`` is after its last ``eoi`` (see :func:`open_image_offset`);
    the grid processor then leaves either one forced id (top-k is moot) or only image codes. A single top-k
    cannot serve both: 2000 would make text sampling near-uniform over junk, 10 would starve image diversity.
    """

    def __init__(self, tokens: ChameleonTokens, image_top_k: int = 2000, text_top_k: int = 10):
        if image_top_k < 1 or text_top_k < 1:
            raise GenerationConfigError(f"top-k values must be >= 1, got image {image_top_k}, text {text_top_k}")
        self.tokens = tokens
        self.image_top_k, self.text_top_k = int(image_top_k), int(text_top_k)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        V = scores.shape[-1]
        in_image = open_image_offset(input_ids, self.tokens) >= 0
        k = torch.where(in_image, min(self.image_top_k, V), min(self.text_top_k, V))
        kmax = int(k.max())
        top = torch.topk(scores, kmax, dim=-1).values
        threshold = top.gather(1, (k - 1).unsqueeze(1))
        return scores.masked_fill(scores < threshold, NEG_INF)


class LockstepSamplingLogitsProcessor(LogitsProcessor):
    """Sample the next token here and return one-hot logits (0 at the choice, ``-inf`` elsewhere).

    With ``paired=True`` (classifier-free guidance) one token is drawn per ``[cond; uncond]`` pair from the cond
    row and written to both rows, so the two branches never diverge. Put it last in the chain and call
    ``generate(do_sample=False)``: greedy decoding then picks exactly the drawn token. ``sample=False`` takes the
    argmax instead (deterministic). ``generator`` makes the draws reproducible.
    """

    def __init__(self, paired: bool = True, sample: bool = True, generator: torch.Generator | None = None):
        self.paired, self.sample, self.generator = paired, sample, generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        B = scores.shape[0]
        if self.paired and B % 2:
            raise GenerationConfigError(f"paired sampling needs an even batch [cond; uncond], got {B}")
        src = scores[: B // 2] if self.paired else scores
        if self.sample:
            probs = torch.softmax(src.float(), dim=-1)
            choice = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        else:
            choice = src.argmax(dim=-1)
        if self.paired:
            choice = torch.cat([choice, choice])
        out = torch.full_like(scores, NEG_INF)
        out[torch.arange(B, device=scores.device), choice] = 0.0
        return out


def image_generation_processors(tokens: ChameleonTokens, prompt_len: int, height_tokens: int, width_tokens: int,
                                layout: str = "lumina", guidance_scale: float | None = None,
                                image_top_k: int = 2000, text_top_k: int = 10, temperature: float = 1.0,
                                sample: bool = True, generator: torch.Generator | None = None,
                                pixel_size: tuple[int, int] | None = None) -> LogitsProcessorList:
    """The full chain for ``model.generate(..., logits_processor=chain, do_sample=False)``.

    With ``guidance_scale`` set the batch must be ``[cond; uncond]`` (same padded prompt length, both prompts
    ending in the same open image, e.g. ``... boi sH sW`` for cond and ``boi sH sW`` for uncond).
    """
    chain = LogitsProcessorList()
    paired = guidance_scale is not None
    if paired:
        chain.append(ClassifierFreeGuidanceLogitsProcessor(guidance_scale))
    chain.append(ImageGridLogitsProcessor(tokens, prompt_len, height_tokens, width_tokens, layout,
                                          pixel_size=pixel_size))
    chain.append(ImageTopKLogitsProcessor(tokens, image_top_k, text_top_k))
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    chain.append(LockstepSamplingLogitsProcessor(paired=paired, sample=sample, generator=generator))
    return chain
