"""Generation with a fine-tuned Chameleon: text answers / captions, text-to-image, interleaved answers.

- :class:`Generator` loads a base checkpoint plus an adapter (merged in memory), or a merged checkpoint,
  with the sample settings it was trained with (``chameleon_ft.json``), and builds prompts exactly as the
  training samples were built: the task's template, the chat template and the image tokens all come from
  the same code (:mod:`chameleon_ft.tasks`, :class:`~chameleon_ft.data.tokenize.ConversationEncoder`).
- :func:`generate_text` answers a batch of prompts (left padding, KV cache; greedy or seeded sampling).
- :func:`generate_images` draws images with classifier-free guidance batched as ``[cond; uncond]``, the
  grid constraint, image top-k and temperature (:mod:`chameleon_ft.generation.logits`): with transformers'
  ``generate`` (``sampler="hf"``), or on a static KV cache (:mod:`chameleon_ft.generation.kv_cache`) one
  token per forward (``"plain"``) or by speculative Jacobi decoding (``"sjd"``,
  :mod:`chameleon_ft.generation.image_sampler`), optionally with a compiled decode step.
- :func:`generate_interleaved` answers with text, then an image, then text
  (:mod:`chameleon_ft.generation.interleaved`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from chameleon_ft.adapter import SampleSettings, load_adapter, read_adapter
from chameleon_ft.data.conversation import MarkerRules
from chameleon_ft.data.image_layout import LAYOUTS, ids_to_image, image_span_length
from chameleon_ft.data.sample import Conversation
from chameleon_ft.errors import ConfigError, DataError
from chameleon_ft.generation.image_sampler import (
    DEFAULT_WINDOW,
    SAMPLERS,
    ImageGrid,
    ImageSampling,
    sample_image,
    sampler_window,
)
from chameleon_ft.generation.interleaved import InterleavedAnswer, InterleavedSampler, TextSampling
from chameleon_ft.generation.kv_cache import CachedDecoder
from chameleon_ft.generation.logits import LockstepSamplingLogitsProcessor, image_generation_processors
from chameleon_ft.model.assets import CheckpointAssets
from chameleon_ft.model.modeling import image_logits_unmasked
from chameleon_ft.model.tensors import resolve_device, resolve_dtype
from chameleon_ft.model.tokens import ChameleonTokens
from chameleon_ft.tasks import SampleContext, get_task

log = logging.getLogger(__name__)

PIXELS_PER_CODE = 16
# How images are marked in generation requests' prompt text: Lumina-mGPT's convention.
PROMPT_RULES = MarkerRules("<|image|>", unmarked="all", verbatim=True, implicit_separator=" ")


class GenerationError(DataError):
    """Bad generation input: unreadable JSONL record, missing image, impossible image size, ..."""


# ---------------------------------------------------------------------------------------------
# A model ready to generate, and its prompts
# ---------------------------------------------------------------------------------------------
def trained_settings(assets: CheckpointAssets, adapter: str | Path | None = None) -> SampleSettings:
    """The settings the model was trained with: the adapter's, a merged checkpoint's own, or (a base model)
    chat with the checkpoint's own image layout and resolution."""
    saved = read_adapter(adapter).settings if adapter is not None else SampleSettings.load(assets.path)
    if saved is not None:
        return saved
    return SampleSettings(task="chat", prompt_template=None, image_layout=assets.default_image_layout,
                          image_size=assets.vq_resolution)


def settings_with(settings: SampleSettings, overrides: dict, source: str) -> SampleSettings:
    """``settings`` with the explicitly set ``overrides`` (None = not set); a value that differs from what the
    model was trained with gets a warning naming both, since prompts or image tokens then differ from training."""
    changed = {}
    for key, value in overrides.items():
        if value is None:
            continue
        trained = getattr(settings, key)
        if value != trained:
            log.warning("%s=%r differs from the %r this model was trained with (%s): its %s then differ from "
                        "training", key, value, trained, source, "image tokens" if "image" in key else "prompts")
        changed[key] = value
    return replace(settings, **changed)


class Generator:
    """A base checkpoint (+ adapter) loaded for generation, with the sample settings it was trained with."""

    def __init__(self, assets: CheckpointAssets, adapter: str | Path | None = None, *, settings: SampleSettings,
                 device: str = "auto", dtype: str = "auto"):
        self.assets, self.settings = assets, settings
        self.device = resolve_device(device)
        model = assets.load_model(dtype=resolve_dtype(dtype, self.device, what="dtype"), device=self.device)
        if adapter is not None:
            model = load_adapter(model, adapter)
        self.model = model.eval()
        if settings.image_layout not in LAYOUTS:
            raise ConfigError(f"image_layout={settings.image_layout!r}: choose one of {LAYOUTS}")

    @property
    def tokens(self) -> ChameleonTokens:
        return self.assets.tokens

    @cached_property
    def encoder(self):
        """The training samples' encoder: chat template, image preprocessing and image tokens."""
        from chameleon_ft.data.tokenize import ConversationEncoder, EncoderOptions

        opts = EncoderOptions(layout=self.settings.image_layout, image_size=int(self.settings.image_size),
                              buckets=bool(self.settings.image_buckets), max_length=int(self.settings.max_length))
        return ConversationEncoder(self.assets.tokenizer, self.tokens, lambda: self.assets.vqgan(self.device), opts)

    def prompt_ids(self, requests: Sequence[dict], *, source: str = "<requests>") -> list[list[int]]:
        """Prompt ids of generation requests: canonical fields (``prompt`` fills the task's prompt field;
        images as :class:`~chameleon_ft.data.sample.ImageRef`), built by the task as training built them."""
        task = get_task(self.settings.task)
        convs = []
        for i, fields in enumerate(requests):
            fields = dict(fields)
            if task.prompt_field and task.prompt_field not in fields and "prompt" in fields:
                fields[task.prompt_field] = fields["prompt"]
            ctx = SampleContext(file=source, index=i, prompt_template=self.settings.prompt_template,
                                image_size=int(self.settings.image_size), rules=PROMPT_RULES)
            convs.append(Conversation(task.prompt(fields, ctx), task.name, {}, source, i))
        return self.encoder.encode_prompts(convs)

    def decode_image(self, codes: torch.Tensor):
        """A code grid as a PIL image, with the checkpoint's VQGAN."""
        return self.encoder.image_tokenizer.decode([codes])[0]


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every row right-aligned (left padding)."""
    if not rows:
        raise ConfigError("nothing to generate: empty batch")
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, L - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, L - len(r):] = 1
    return ids, mask


def _generate(model, input_ids, attention_mask, **kwargs) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             use_cache=True, **kwargs)
    return out[:, input_ids.shape[1]:].cpu()


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------
def generate_text(model, tokens: ChameleonTokens, tokenizer, prompts: Sequence[Sequence[int]], *,
                  max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                  top_k: int = 10, seed: int = 0, lockstep: bool = False) -> list[dict]:
    """Answer each prompt (token ids, e.g. from :meth:`Generator.prompt_ids`) in one left-padded batch.

    Greedy when ``do_sample`` is False; otherwise top-k + temperature sampling from a generator seeded with
    ``seed`` (the global RNG is not touched, so the same seed gives the same tokens). Returns per prompt
    ``{"text", "token_ids"}``, the answer cut at the first end-of-turn / ``</s>``. ``lockstep``: always
    decode ``max_new_tokens`` steps (no early stop), so that every rank of a sharded model runs the same
    forward passes.
    """
    input_ids, mask = left_pad(prompts, tokens.pad)
    chain = LogitsProcessorList()
    if do_sample:
        if temperature != 1.0:
            chain.append(TemperatureLogitsWarper(temperature))
        chain.append(TopKLogitsWarper(top_k))
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        chain.append(LockstepSamplingLogitsProcessor(paired=False, sample=True, generator=gen))
    new = _generate(model, input_ids, mask, max_new_tokens=max_new_tokens, do_sample=False,
                    logits_processor=chain, eos_token_id=None if lockstep else [tokens.eot, tokens.eos],
                    pad_token_id=tokens.pad)
    results = []
    stop = {tokens.eot, tokens.eos, tokens.pad}
    for row in new.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        answer = row[:cut]
        results.append({"text": tokenizer.decode(answer, skip_special_tokens=True).strip(), "token_ids": answer})
    return results


# ---------------------------------------------------------------------------------------------
# Text to image
# ---------------------------------------------------------------------------------------------
def image_grid(width: int, height: int) -> tuple[int, int]:
    """Code grid ``(h, w)`` for an image of ``width x height`` pixels (16 px per code, sides multiple of 32)."""
    for side in (width, height):
        if side <= 0 or side % 32:
            raise ConfigError(f"image size {width}x{height}: each side must be a positive multiple of 32 px")
    return height // PIXELS_PER_CODE, width // PIXELS_PER_CODE


def image_prefix(tokens: ChameleonTokens, width: int, height: int, layout: str) -> list[int]:
    """The open image the prompt ends with: ``boi sH sW`` (lumina) or ``boi`` (chameleon)."""
    if layout == "lumina":
        return [tokens.boi, tokens.size_token(height), tokens.size_token(width)]
    if layout == "chameleon":
        return [tokens.boi]
    raise ConfigError(f"unknown image layout {layout!r}; choose one of {LAYOUTS}")


def cfg_batch(conds: Sequence[Sequence[int]], unconds: Sequence[Sequence[int]] | None,
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One left-padded batch ``[cond_1..cond_B; uncond_1..uncond_B]`` (just the conds without guidance)."""
    rows = list(conds) + (list(unconds) if unconds is not None else [])
    return left_pad(rows, pad_id)


IMAGE_SAMPLERS = ("hf",) + SAMPLERS


def generate_images(model, tokens: ChameleonTokens, prompts: Sequence[Sequence[int]], *, width: int, height: int,
                    layout: str = "lumina", cfg_scale: float | None = 3.0, image_top_k: int = 2000,
                    temperature: float = 1.0, seed: int = 0, sample: bool = True, sampler: str = "hf",
                    sjd_window: int = DEFAULT_WINDOW, compile: bool = False) -> list[dict]:
    """Draw one ``width`` x ``height`` image per prompt (the ids of the turns before the image, e.g. from
    :meth:`Generator.prompt_ids`), all in one batch; returns per prompt ``{"codes": [h, w] LongTensor,
    "token_ids": generated ids (image span from after the prefix), "forward_passes": model forwards the
    batch took}``.

    With ``cfg_scale`` (not None and != 1) the batch doubles to ``[cond; uncond]`` -- the unconditional
    context is the open image alone, as Lumina-mGPT -- and the two halves are mixed at every step, then one
    token per pair is drawn (seeded by ``seed``) for both halves.

    ``sampler``: ``hf`` -- transformers' ``generate`` with the logits processors of
    :mod:`chameleon_ft.generation.logits` (the reference; the default, so a seed keeps giving the images it
    gave); ``plain`` -- the same distribution on a static KV cache, one forward per token, logits of the
    image codes only; ``sjd`` -- speculative Jacobi decoding on the static cache, ``sjd_window`` tokens per
    forward, same distribution again (see :mod:`chameleon_ft.generation.image_sampler`). ``compile``
    compiles the static-cache decode step with ``torch.compile``. A seed fixes the images of each sampler;
    the samplers draw their random numbers differently, so only greedy decoding (``sample=False``) gives
    the same tokens across samplers.
    """
    if sampler not in IMAGE_SAMPLERS:
        raise ConfigError(f"sampler={sampler!r}: choose one of {IMAGE_SAMPLERS}")
    if not prompts:
        return []
    h, w = image_grid(width, height)
    prefix = image_prefix(tokens, width, height, layout)
    guided = cfg_scale is not None and float(cfg_scale) != 1.0
    conds = [list(p) + prefix for p in prompts]
    input_ids, mask = cfg_batch(conds, [list(prefix)] * len(conds) if guided else None, tokens.pad)
    if sampler == "hf":
        new, passes = _hf_image_tokens(model, tokens, input_ids, mask, h, w, width, height, layout,
                                       float(cfg_scale) if guided else None, image_top_k, temperature, seed, sample)
    else:
        opts = ImageSampling(guidance_scale=float(cfg_scale) if guided else None, top_k=image_top_k,
                             temperature=temperature, sample=sample, window=sampler_window(sampler, sjd_window))
        grid = ImageGrid(tokens, h, w, layout, pixel_size=(height, width))
        start = len(prefix) - 1  # the prompt's last token sits at offset start - 1 of the image
        decoder = CachedDecoder(model, input_ids.shape[0], input_ids.shape[1] + grid.length - start + opts.window,
                                compile=compile)
        last_hidden = decoder.prefill(input_ids, mask)
        gen = torch.Generator(device=decoder.device).manual_seed(seed)
        new = sample_image(decoder, start, grid, opts, gen, last_hidden=last_hidden)
        passes = decoder.forward_passes
    results = []
    for i in range(len(prompts)):
        row = new[i].tolist()
        codes, _ = ids_to_image(list(prefix) + row, tokens, layout, grid=(h, w))
        results.append({"codes": codes, "token_ids": row, "forward_passes": passes})
    return results


def _hf_image_tokens(model, tokens, input_ids, mask, h, w, width, height, layout, guidance_scale, image_top_k,
                     temperature, seed, sample) -> tuple[torch.Tensor, int]:
    """The image tokens by transformers' ``generate`` and the processor chain; and its forward count."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    chain = image_generation_processors(
        tokens, input_ids.shape[1], h, w, layout=layout, guidance_scale=guidance_scale,
        image_top_k=image_top_k, temperature=temperature, sample=sample, generator=gen,
        pixel_size=(height, width))
    n_new = image_span_length(h, w, layout) - len(image_prefix(tokens, width, height, layout))
    with image_logits_unmasked(model):
        # No min_new_tokens: generate's own processors run before the chain and would change the branches'
        # normalisation; the grid already forbids ending early.
        new = _generate(model, input_ids, mask, max_new_tokens=n_new, do_sample=False,
                        logits_processor=chain, pad_token_id=tokens.pad, eos_token_id=tokens.eot)
    return new, n_new  # generate runs one forward per new token


# ---------------------------------------------------------------------------------------------
# Interleaved text and images
# ---------------------------------------------------------------------------------------------
def generate_interleaved(model, tokens: ChameleonTokens, prompt: Sequence[int], *, width: int, height: int,
                         layout: str = "lumina", cfg_scale: float | None = 3.0, image_top_k: int = 2000,
                         image_temperature: float = 1.0, max_new_tokens: int = 64, do_sample: bool = False,
                         temperature: float = 1.0, top_k: int = 10, max_images: int = 1, sampler: str = "plain",
                         sjd_window: int = DEFAULT_WINDOW, compile: bool = False, seed: int = 0) -> InterleavedAnswer:
    """One interleaved answer to ``prompt`` (e.g. from :meth:`Generator.prompt_ids`): text until the model
    opens an image, a ``width`` x ``height`` image in ``layout`` with guidance ``cfg_scale`` (``plain`` or
    ``sjd`` sampler), text again until end-of-turn; see :mod:`chameleon_ft.generation.interleaved`.
    ``max_new_tokens`` bounds the text tokens, ``max_images`` the images. Seeded by ``seed``."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler={sampler!r}: interleaved answers use one of {SAMPLERS}")
    h, w = image_grid(width, height)
    guided = cfg_scale is not None and float(cfg_scale) != 1.0
    image = ImageSampling(guidance_scale=float(cfg_scale) if guided else None, top_k=image_top_k,
                          temperature=image_temperature, window=sampler_window(sampler, sjd_window))
    text = TextSampling(max_new_tokens=max_new_tokens, sample=do_sample, temperature=temperature, top_k=top_k)
    interleaved = InterleavedSampler(tokens, ImageGrid(tokens, h, w, layout, pixel_size=(height, width)), image, text,
                                     max_images=max_images)
    decoder = CachedDecoder(model, 2 if guided else 1, interleaved.capacity(len(prompt)), compile=compile)
    gen = torch.Generator(device=decoder.device).manual_seed(seed)
    return interleaved.run(decoder, list(prompt), gen)
