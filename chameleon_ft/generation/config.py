"""Typed config of ``python -m chameleon_ft.generate`` (Hydra structured config ``generate``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class GenerateConfig:
    """What to load, what to read, how to decode. Override on the command line as ``key=value``.

    ``task``, ``prompt_template``, ``image_layout`` and ``image_size`` default to what the adapter (or
    merged model) was trained with (its ``chameleon_ft.json``); setting one that differs warns.
    """

    mode: str = "text"  # text (answers / captions) | image (text-to-image) | interleaved (text, image, text)
    # Base or merged checkpoint directory; None: the embedded tiny checkpoint.
    model: Optional[str] = None
    adapter: Optional[str] = None  # adapter directory written by training (<run dir>/adapter)
    # JSONL of {"prompt": str, "image": path?} (text) or {"prompt": str, "width"?: int, "height"?: int} (image,
    # interleaved)
    input: Optional[str] = None
    output: str = "generations"  # directory: outputs.jsonl (+ PNG files; + outputs.md for interleaved)
    image_root: Optional[str] = None  # relative image paths in the input are resolved against this
    task: Optional[str] = None  # how a request's prompt becomes the user turn (vqa: its question template...)
    prompt_template: Optional[str] = None
    image_layout: Optional[str] = None  # lumina | chameleon: token layout of images (prompt and output)
    image_size: Optional[int] = None  # side input images are encoded at
    batch_size: int = 4  # requests per batch (interleaved mode answers one request at a time)
    seed: int = 0
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Text answers / captions (and the text of interleaved answers).
    max_new_tokens: int = 64  # interleaved: text tokens of an answer, images not counted
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_k: int = 10
    # Images (image and interleaved modes).
    width: int = 512
    height: int = 512
    cfg_scale: float = 3.0  # classifier-free guidance; <= 1 disables the unconditional branch
    image_top_k: int = 2000
    image_temperature: float = 1.0
    # plain: static KV cache, one forward per token | sjd: speculative Jacobi decoding, same distribution,
    # several tokens per forward | hf: transformers' generate (the reference; image mode only)
    sampler: str = "plain"
    sjd_window: int = 16  # tokens per forward with sampler=sjd (Lumina-mGPT 2.0's window)
    compile: bool = False  # torch.compile the static-cache decode step (CUDA graphs on a GPU)
    # Interleaved.
    max_images: int = 1  # images an answer may open
