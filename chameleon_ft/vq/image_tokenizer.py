"""PIL images <-> VQ code grids, batched, on top of :class:`~chameleon_ft.vq.vqgan.VQGAN`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from chameleon_ft.errors import DataError
from chameleon_ft.vq.preprocess import lumina_buckets, pil_to_tensor, prepare_image, tensor_to_pil
from chameleon_ft.vq.vqgan import VQGAN, VQGANError, load_vqgan

BUCKET_PATCH = 32  # Lumina-mGPT's size tokens count 32-px patches


class ImageTokenizerError(DataError):
    """An image or tensor cannot be tokenized (wrong size, mode, dtype or range), or codes cannot be decoded."""


class ImageTokenizer:
    """Encode images to VQ code grids ``[h, w]`` and decode grids back to images.

    ``image_size``: side of the square Meta crop, and the token budget of Lumina buckets
    (``image_size`` / 32 squared patches); defaults to the VQGAN's ``resolution``.
    ``bucket=True`` makes :meth:`preprocess` / :meth:`encode` use Lumina-mGPT's aspect-ratio buckets
    instead of the square crop. Work runs in batches of ``batch_size`` on ``device`` (default: the
    VQGAN's device).
    """

    def __init__(
        self,
        vqgan: VQGAN,
        image_size: int | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        *,
        bucket: bool = False,
        max_ratio: float = 4.0,
    ):
        self.vqgan = vqgan if device is None else vqgan.to(device)
        self.image_size = int(image_size or vqgan.config.resolution)
        self.batch_size = int(batch_size)
        self.bucket = bool(bucket)
        ds = vqgan.config.downsample
        if self.image_size % ds:
            raise ImageTokenizerError(f"image_size {self.image_size} is not a multiple of the VQGAN's downsampling ({ds})")
        if self.batch_size < 1:
            raise ImageTokenizerError(f"batch_size must be >= 1, got {batch_size}")
        self.buckets = lumina_buckets(self.image_size, BUCKET_PATCH, max_ratio) if self.image_size % BUCKET_PATCH == 0 else []

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, image_size: int | None = None, device=None,
                        batch_size: int = 32, **kwargs) -> ImageTokenizer:
        """Tokenizer over :func:`~chameleon_ft.vq.vqgan.load_vqgan` of a checkpoint directory."""
        return cls(load_vqgan(checkpoint_dir), image_size=image_size, device=device, batch_size=batch_size, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.vqgan.quantize.embedding.weight.device

    @property
    def downsample(self) -> int:
        return self.vqgan.config.downsample

    # --- preprocessing --------------------------------------------------------------------------
    def preprocess(self, img: Image.Image, bucket: bool | None = None, rng=None) -> torch.Tensor:
        """``[3, S, S]`` in [-1, 1] (Meta: white background, LANCZOS shortest side, centre crop), or with
        ``bucket`` (default: the tokenizer's setting) ``[3, bh, bw]`` of the Lumina bucket keeping most of it
        (resized and cropped before compositing, as Lumina does); see
        :func:`~chameleon_ft.vq.preprocess.prepare_image`. ``rng`` draws a random crop instead of the centre."""
        if not isinstance(img, Image.Image):
            raise ImageTokenizerError(f"preprocess: expected a PIL image, got {type(img).__name__}")
        bucket = self.bucket if bucket is None else bucket
        if bucket and not self.buckets:
            raise ImageTokenizerError(f"bucket mode needs image_size a multiple of {BUCKET_PATCH}, got {self.image_size}")
        return pil_to_tensor(prepare_image(img, image_size=self.image_size, buckets=bucket, rng=rng))

    def _check_tensor(self, t: torch.Tensor, i: int, bucket: bool) -> None:
        c, ds = self.vqgan.config.in_channels, self.downsample
        if t.dim() != 3 or t.shape[0] != c:
            raise ImageTokenizerError(f"image {i}: expected a [{c}, H, W] tensor, got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise ImageTokenizerError(f"image {i}: expected float pixels in [-1, 1], got dtype {t.dtype} (use pil_to_tensor)")
        h, w = t.shape[1:]
        if not bucket and (h, w) != (self.image_size, self.image_size):
            raise ImageTokenizerError(f"image {i}: size {h}x{w}, expected {self.image_size}x{self.image_size} (use preprocess)")
        if h % ds or w % ds or h == 0 or w == 0:
            raise ImageTokenizerError(f"image {i}: size {h}x{w} is not a positive multiple of {ds}")
        if t.numel() and (t.min() < -1.001 or t.max() > 1.001):
            raise ImageTokenizerError(
                f"image {i}: pixel range [{float(t.min()):.3g}, {float(t.max()):.3g}] is outside [-1, 1] (use pil_to_tensor)"
            )

    # --- encode / decode --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image | torch.Tensor], bucket: bool | None = None,
               rngs: Sequence | None = None) -> list[torch.Tensor]:
        """Code grids ``[h, w]`` (CPU LongTensors), one per image, in input order.

        PIL images are preprocessed (``rngs[i]``: a random crop for image ``i``); tensors must already be
        ``[3, H, W]`` float in [-1, 1] (the square size unless in bucket mode). Images of equal size are
        batched together, on the VQGAN's device.
        """
        if isinstance(images, (Image.Image, torch.Tensor)):
            images = [images]
        bucket = self.bucket if bucket is None else bucket
        tensors = []
        for i, img in enumerate(images):
            if isinstance(img, Image.Image):
                t = self.preprocess(img, bucket=bucket, rng=rngs[i] if rngs is not None else None)
            elif isinstance(img, torch.Tensor):
                t = img
                self._check_tensor(t, i, bucket)
            else:
                raise ImageTokenizerError(f"image {i}: expected a PIL image or a tensor, got {type(img).__name__}")
            tensors.append(t)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(tensors)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                batch = torch.stack([tensors[i] for i in chunk]).to(self.device)
                try:
                    codes = self.vqgan.encode(batch).cpu()
                except VQGANError as e:
                    raise ImageTokenizerError(str(e)) from e
                for i, c in zip(chunk, codes):
                    out[i] = c.clone()
        return out

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | Sequence[torch.Tensor]) -> list[Image.Image]:
        """RGB images of code grids ``[B, h, w]`` (or one ``[h, w]``, or a list of ``[h, w]``)."""
        if isinstance(codes, torch.Tensor):
            if codes.dim() == 2:
                codes = codes.unsqueeze(0)
            if codes.dim() != 3:
                raise ImageTokenizerError(f"decode: expected codes [B, h, w], got shape {list(codes.shape)}")
            grids = list(codes)
        else:
            grids = [torch.as_tensor(c) for c in codes]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, g in enumerate(grids):
            if g.dim() != 2:
                raise ImageTokenizerError(f"decode: code grid {i} has shape {list(g.shape)}, expected [h, w]")
            groups.setdefault(tuple(g.shape), []).append(i)
        out: list[Image.Image | None] = [None] * len(grids)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                try:
                    pixels = self.vqgan.decode(torch.stack([grids[i] for i in chunk]).to(self.device))
                except VQGANError as e:
                    raise ImageTokenizerError(str(e)) from e
                for i, p in zip(chunk, pixels):
                    out[i] = tensor_to_pil(p)
        return out


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((x.float() - y.float()) / 2).pow(2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def reconstruction_quality(tokenizer: ImageTokenizer, images: Sequence[Image.Image]) -> dict[str, float] | None:
    """How well the VQGAN reconstructs ``images`` (encode then decode): mean PSNR, and the mean PSNR of each
    image's own mean colour (a flat image) for scale; None when the VQGAN cannot decode."""
    if not images or not tokenizer.vqgan.has_decoder:
        return None
    originals = [tokenizer.preprocess(im) for im in images]
    decoded = tokenizer.decode(tokenizer.encode(list(originals)))
    vq = [psnr(x, pil_to_tensor(y)) for x, y in zip(originals, decoded)]
    flat = [psnr(x, x.mean(dim=(1, 2), keepdim=True).expand_as(x)) for x in originals]
    return {"images": float(len(images)), "psnr": sum(vq) / len(vq), "min_psnr": min(vq),
            "flat_color_psnr": sum(flat) / len(flat)}
