"""Image preprocessing for the VQGAN: Meta's square crop and Lumina-mGPT's aspect-ratio buckets.

Pixel convention (Meta's): tensors are float ``[3, H, W]`` in [-1, 1], ``x / 255 * 2 - 1``.
:func:`prepare_image` is the one entry point per image; it applies each reference's order of
compositing and resizing (see there).
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch
from PIL import Image

# Modes whose pixels carry an alpha channel.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def to_rgb_on_white(img: Image.Image) -> Image.Image:
    """RGB image with any transparency composited onto white (Meta's ``_whiten_transparency``, which
    transformers' and Lumina-mGPT's ``blend_rgba`` repeat).

    Alpha channels (RGBA, LA, PA...) and palette/RGB/L transparency (``info["transparency"]``) are
    blended as ``(1 - a) * 255 + a * c`` with ``a = alpha / 255``, truncated to uint8 as Meta does.
    Other modes (L, P, CMYK, I;16, ...) are converted with ``Image.convert("RGB")``.
    Deviation: Meta returns an RGB image with a transparent colour key (``info["transparency"]``)
    unchanged; we whiten the keyed colour, as every other transparent input is whitened.
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode == "La":  # Pillow converts premultiplied La only to LA
        img = img.convert("LA")
    if img.mode not in _ALPHA_MODES and "transparency" not in img.info:
        return img.convert("RGB")
    rgba = np.asarray(img.convert("RGBA"))
    if (rgba[:, :, 3] == 255).all():
        return Image.fromarray(np.ascontiguousarray(rgba[:, :, :3]), "RGB")
    alpha = rgba[:, :, 3:4] / 255.0
    blended = (1 - alpha) * 255 + alpha * rgba[:, :, :3]
    return Image.fromarray(blended.astype(np.uint8), "RGB")


def center_crop_resize(img: Image.Image, size: int, *, rng: random.Random | None = None) -> Image.Image:
    """Resize the shortest side to ``size`` (LANCZOS, aspect kept) and crop ``size`` x ``size``: the
    centre (Meta's), or at an offset drawn from ``rng`` (see :func:`crop_box`)."""
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        img = img.resize(new, Image.LANCZOS)
    return img.crop(crop_box(img.size, (size, size), rng))


def crop_box(size: tuple[int, int], crop: tuple[int, int],
             rng: random.Random | None = None) -> tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` box of a ``crop`` ``(w, h)`` inside an image of ``size`` ``(w, h)``.

    Centred (rounded down) without ``rng``; otherwise Lumina-mGPT's random crop: ``left`` then ``top``
    drawn with ``rng.randint(0, slack)``, so the box always lies inside the image.
    """
    (w, h), (cw, ch) = size, crop
    if cw > w or ch > h:
        raise ValueError(f"crop_box: a {cw}x{ch} crop does not fit in a {w}x{h} image")
    if rng is None:
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    else:
        x0 = rng.randint(0, w - cw)
        y0 = rng.randint(0, h - ch)
    return x0, y0, x0 + cw, y0 + ch


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` float32 in [-1, 1] (``x / 255 * 2 - 1``) of an RGB image."""
    if img.mode != "RGB":
        img = to_rgb_on_white(img)
    arr = np.asarray(img, dtype=np.float64) / 255.0 * 2 - 1
    return torch.from_numpy(arr).permute(2, 0, 1).float().contiguous()


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """RGB image of ``[3, H, W]`` pixels in [-1, 1]: clamp, then ``(x + 1) / 2 * 255``, rounded.

    Rounding (Meta truncates; at most one level apart) makes ``pil_to_tensor`` -> ``tensor_to_pil`` lossless.
    """
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"tensor_to_pil: expected a [3, H, W] tensor, got {list(t.shape)}")
    x = (t.detach().float().cpu().clamp(-1, 1) + 1) / 2 * 255
    return Image.fromarray(x.round().to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")


# ---------------------------------------------------------------------------------------------
# Lumina-mGPT aspect-ratio buckets
# ---------------------------------------------------------------------------------------------
def lumina_buckets(target: int = 512, patch: int = 32, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """Lumina-mGPT's crop sizes ``(w, h)`` in pixels for a ``target`` x ``target`` token budget.

    With ``N = (target // patch) ** 2`` patches, a ``w x h`` patch grid is a bucket when it fits
    (``w * h <= N``), cannot grow by one patch in both directions (``(w + 1) * (h + 1) > N``: the
    staircase Lumina walks from ``(N, 1)`` to ``(1, N)``) and ``max(w, h) <= max_ratio * min(w, h)``.
    Ordered widest first. 49 buckets for target 512.
    """
    if target % patch:
        raise ValueError(f"lumina_buckets: target {target} is not a multiple of the patch size {patch}")
    n = (target // patch) ** 2
    out = []
    for w in range(n, 0, -1):
        for h in range(max(1, n // (w + 1)), n // w + 1):
            if w * h <= n < (w + 1) * (h + 1) and max(w, h) <= max_ratio * min(w, h):
                out.append((w * patch, h * patch))
    return out


def retained_fraction(w: int, h: int, bucket: tuple[int, int]) -> float:
    """Fraction of a ``w`` x ``h`` image kept when scaled to cover ``bucket`` and centre-cropped."""
    sx, sy = bucket[0] / w, bucket[1] / h
    return min(sx, sy) / max(sx, sy)


def choose_bucket(w: int, h: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket keeping the most of a ``w`` x ``h`` image.

    Rule: maximise :func:`retained_fraction` (the image is scaled by ``max(bw / w, bh / h)`` to
    cover the bucket, and the crop keeps ``min / max`` of the two scale ratios of its area). Ties
    go to the larger bucket area, then the larger width (Lumina sorts ``(fraction, (w, h))``
    descending, which agrees on its staircase buckets).
    """
    if w <= 0 or h <= 0:
        raise ValueError(f"choose_bucket: image size {w}x{h} must be positive")
    if not buckets:
        raise ValueError("choose_bucket: no buckets")
    return max(buckets, key=lambda b: (round(retained_fraction(w, h, b), 12), b[0] * b[1], b[0]))


def resize_to_bucket(img: Image.Image, bucket: tuple[int, int], *, rng: random.Random | None = None) -> Image.Image:
    """Lumina's crop to ``bucket``: halve with BOX while >= 2x, scale to cover (BICUBIC), then crop the
    centre, or at an offset drawn from ``rng`` (Lumina's augmentation, see :func:`crop_box`).

    The image is resized in its own mode, so Pillow's rules apply as in Lumina: alpha modes are
    resampled premultiplied, palette and 1-bit images with NEAREST.
    """
    bw, bh = bucket
    while img.width >= 2 * bw and img.height >= 2 * bh:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = max(bw / img.width, bh / img.height)
    new = (max(bw, round(img.width * scale)), max(bh, round(img.height * scale)))
    if new != img.size:
        img = img.resize(new, resample=Image.BICUBIC)
    return img.crop(crop_box(img.size, bucket, rng))


@functools.lru_cache(maxsize=8)
def _bucket_table(image_size: int) -> tuple[tuple[int, int], ...]:
    return tuple(lumina_buckets(image_size))


def prepare_image(img: Image.Image, *, image_size: int, buckets: bool = False,
                  rng: random.Random | int | None = None) -> Image.Image:
    """One image, as the reference pipelines prepare it: an RGB image ready for :func:`pil_to_tensor`.

    - ``buckets=False`` (Meta's tokenizer): composite transparency onto white, then resize the shortest
      side to ``image_size`` (LANCZOS) and crop ``image_size`` x ``image_size``.
    - ``buckets=True`` (Lumina-mGPT's item processor): pick the :func:`lumina_buckets` entry of
      ``image_size`` that keeps most of the image, resize and crop the image in its own mode, THEN
      composite onto white. For transparent images the two orders give different pixels (resampling
      premultiplies alpha; palettes resample with NEAREST).

    ``rng`` (a ``random.Random`` or an int seed) draws the crop offset instead of centring it, as
    Lumina's training does inside its bucket (the square path accepts it too; Meta has no random
    crop); ``None`` (the default) crops the centre. Offsets are
    drawn ``left`` then ``top`` with ``randint``; Lumina draws from the global ``random`` after a
    ``random.choice`` of the bucket, so equal seeds do not give Lumina's exact offsets.

    Documented deviations from Lumina in the bucket path: a transparent colour key on an interpolated
    mode (RGB, L, I...; not P) is composited before resizing (Lumina ignores an RGB key and matches an
    L key against resampled values), and PA images are converted to RGBA first (Pillow would
    interpolate their palette indices).
    """
    if isinstance(rng, int) and not isinstance(rng, bool):
        rng = random.Random(rng)
    elif rng is not None and not isinstance(rng, random.Random):
        raise TypeError(f"prepare_image: rng must be a random.Random, an int seed or None, not {type(rng).__name__}")
    if not buckets:
        return center_crop_resize(to_rgb_on_white(img), image_size, rng=rng)
    bucket = choose_bucket(img.width, img.height, list(_bucket_table(image_size)))
    if "transparency" in img.info and img.mode not in _ALPHA_MODES | {"P", "1"}:  # a colour key
        img = to_rgb_on_white(img)
    elif img.mode == "PA":
        img = img.convert("RGBA")
    return to_rgb_on_white(resize_to_bucket(img, bucket, rng=rng))
