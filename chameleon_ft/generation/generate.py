"""Generation with a fine-tuned Chameleon: text answers / captions and text-to-image.

- :func:`load_for_generation` loads a base checkpoint plus an adapter (LoRA merged in memory, image-row
  deltas added), or a merged checkpoint.
- :func:`generate_text` answers a batch of prompts (left padding, KV cache; greedy or seeded sampling).
- :func:`generate_images` draws images with classifier-free guidance batched as ``[cond; uncond]``, the
  grid constraint, image top-k and temperature (:mod:`chameleon_ft.generation.logits`), and decodes the
  codes with the VQGAN.
- :func:`run` is the whole command: JSONL in, JSONL (+ PNG files) out.

Prompts follow the Lumina-mGPT chat template: ``<s>`` + user content + ``<reserved08706>``; the answer is
generated after it and ends with ``<reserved08706>``. Images in the user content sit where the text has
``<|image|>``, or before the text when it has no marker.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from chameleon_ft.data.image_layout import LAYOUTS, ids_to_image, image_to_ids
from chameleon_ft.data.sample import DEFAULT_T2I_TEMPLATE
from chameleon_ft.generation.logits import LockstepSamplingLogitsProcessor, image_generation_processors
from chameleon_ft.model.checkpoint import load_model, load_tokenizer
from chameleon_ft.model.tokens import ChameleonTokens

log = logging.getLogger(__name__)

IMAGE_MARKER = "<|image|>"
PIXELS_PER_CODE = 16
OUTPUTS_FILE = "outputs.jsonl"


class GenerationError(ValueError):
    """Bad generation input: unreadable JSONL record, missing image, impossible image size, ..."""


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``auto`` picks CUDA + bfloat16 when a GPU is present, else CPU + float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in names:
        dt = names[dtype]
    else:
        raise GenerationError(f"dtype={dtype!r}: choose auto or one of {sorted(names)}")
    return dev, dt


def load_for_generation(checkpoint: str | Path, adapter: str | Path | None = None, *,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Our model from ``checkpoint`` with ``adapter``'s LoRA merged in and its image-row deltas added.

    The LoRA is loaded with stock ``PeftModel.from_pretrained`` and merged (``merge_and_unload``), so
    decoding runs at base-model speed. Image logits stay masked unless a mode turns masking off.
    """
    from chameleon_ft.export.adapter import apply_image_rows, read_adapter

    model = load_model(checkpoint, dtype=dtype, device=device)
    if adapter is not None:
        files = read_adapter(adapter)
        if files.config is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        if files.image_rows is not None:
            apply_image_rows(model, files.image_rows)
        model.adapter_dir = str(adapter)
    return model.eval()


@contextlib.contextmanager
def image_logits_unmasked(model):
    """Temporarily turn off the image-token logit masking (needed to generate image tokens)."""
    old = getattr(model.config, "mask_image_logits", None)
    model.config.mask_image_logits = False
    try:
        yield model
    finally:
        model.config.mask_image_logits = old


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
def user_turn_ids(tokens: ChameleonTokens, tokenizer, text: str,
                  images: Sequence[Sequence[int]] = ()) -> list[int]:
    """``<s>`` + user content + end-of-turn, the prompt the assistant answer follows.

    ``images`` are the token spans of the images (e.g. from :func:`image_to_ids`); they replace the
    ``<|image|>`` markers of ``text`` in order, or go before the text when it has none.
    """
    parts = text.split(IMAGE_MARKER)
    n_markers = len(parts) - 1
    if n_markers and n_markers != len(images):
        raise GenerationError(f"prompt has {n_markers} {IMAGE_MARKER} markers but {len(images)} images")
    ids = [tokens.bos]
    if not n_markers:
        for span in images:
            ids += list(span)
        parts = [text]
    for i, part in enumerate(parts):
        if i > 0:
            ids += list(images[i - 1])
        if part:
            ids += tokenizer.encode(part, add_special_tokens=False)
    return ids + [tokens.eot]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every row right-aligned (left padding)."""
    if not rows:
        raise GenerationError("nothing to generate: empty batch")
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
                  top_k: int = 10, seed: int = 0) -> list[dict]:
    """Answer each prompt (token ids from :func:`user_turn_ids`) in one left-padded batch.

    Greedy when ``do_sample`` is False; otherwise top-k + temperature sampling from a generator seeded with
    ``seed`` (the global RNG is not touched, so the same seed gives the same tokens). Returns per prompt
    ``{"text", "token_ids"}``, the answer cut at the first end-of-turn / ``</s>``.
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
                    logits_processor=chain, eos_token_id=[tokens.eot, tokens.eos], pad_token_id=tokens.pad)
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
@dataclass
class ImageRequest:
    prompt: str
    width: int = 512
    height: int = 512


def image_grid(width: int, height: int) -> tuple[int, int]:
    """Code grid ``(h, w)`` for an image of ``width x height`` pixels (16 px per code, sides multiple of 32)."""
    for side in (width, height):
        if side <= 0 or side % 32:
            raise GenerationError(f"image size {width}x{height}: each side must be a positive multiple of 32 px")
    return height // PIXELS_PER_CODE, width // PIXELS_PER_CODE


def image_prefix(tokens: ChameleonTokens, width: int, height: int, layout: str) -> list[int]:
    """The open image the prompt ends with: ``boi sH sW`` (lumina) or ``boi`` (chameleon)."""
    if layout == "lumina":
        return [tokens.boi, tokens.size_token(height), tokens.size_token(width)]
    if layout == "chameleon":
        return [tokens.boi]
    raise GenerationError(f"unknown image layout {layout!r}; choose one of {LAYOUTS}")


def t2i_prompt_ids(tokens: ChameleonTokens, tokenizer, prompt: str, width: int, height: int,
                   layout: str = "lumina") -> tuple[list[int], list[int]]:
    """``(cond, uncond)`` ids: the user turn asking for the image then the open image, and the open image alone."""
    text = DEFAULT_T2I_TEMPLATE.format(width=width, height=height, prompt=prompt)  # as in training data
    prefix = image_prefix(tokens, width, height, layout)
    return user_turn_ids(tokens, tokenizer, text) + prefix, list(prefix)


def cfg_batch(conds: Sequence[Sequence[int]], unconds: Sequence[Sequence[int]] | None,
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One left-padded batch ``[cond_1..cond_B; uncond_1..uncond_B]`` (just the conds without guidance)."""
    rows = list(conds) + (list(unconds) if unconds is not None else [])
    return left_pad(rows, pad_id)


def generate_images(model, tokens: ChameleonTokens, tokenizer, requests: Sequence[ImageRequest], *,
                    layout: str = "lumina", cfg_scale: float | None = 3.0, image_top_k: int = 2000,
                    temperature: float = 1.0, seed: int = 0, sample: bool = True) -> list[dict]:
    """Generate one image per request, all of one size, in one batch; returns per request
    ``{"codes": [h, w] LongTensor, "token_ids": generated ids (image span from after the prefix)}``.

    With ``cfg_scale`` (not None and != 1) the batch doubles to ``[cond; uncond]`` and the two halves are
    mixed at every step, then one token per pair is drawn (seeded by ``seed``) for both halves.
    """
    if not requests:
        return []
    sizes = {(r.width, r.height) for r in requests}
    if len(sizes) != 1:
        raise GenerationError(f"one batch must share one image size, got {sorted(sizes)}")
    width, height = sizes.pop()
    h, w = image_grid(width, height)
    pairs = [t2i_prompt_ids(tokens, tokenizer, r.prompt, width, height, layout) for r in requests]
    guided = cfg_scale is not None and float(cfg_scale) != 1.0
    input_ids, mask = cfg_batch([c for c, _ in pairs], [u for _, u in pairs] if guided else None, tokens.pad)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    chain = image_generation_processors(
        tokens, input_ids.shape[1], h, w, layout=layout, guidance_scale=float(cfg_scale) if guided else None,
        image_top_k=image_top_k, temperature=temperature, sample=sample, generator=gen,
        pixel_size=(height, width))
    prefix = len(image_prefix(tokens, width, height, layout))
    n_new = (h * (w + 1) + 4 if layout == "lumina" else h * w + 2) - prefix
    with image_logits_unmasked(model):
        # No min_new_tokens: generate's own processors run before the chain and would change the branches'
        # normalisation; the grid already forbids ending early.
        new = _generate(model, input_ids, mask, max_new_tokens=n_new, do_sample=False,
                        logits_processor=chain, pad_token_id=tokens.pad, eos_token_id=tokens.eot)
    results = []
    for i, req in enumerate(requests):
        row = new[i].tolist()
        span = input_ids[i, -prefix:].tolist() + row
        codes, _ = ids_to_image(span, tokens, layout, grid=(h, w))
        results.append({"codes": codes, "token_ids": row})
    return results


def codes_to_pil(vqgan, codes: torch.Tensor):
    """Decode a ``[h, w]`` code grid to a PIL RGB image with the VQGAN."""
    from PIL import Image

    device = next(vqgan.parameters()).device if hasattr(vqgan, "parameters") else "cpu"
    with torch.no_grad():
        img = vqgan.decode(codes.reshape(1, *codes.shape).to(device))
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, (list, tuple)):
        img = img[0]
    if isinstance(img, Image.Image):
        return img
    t = img.detach().float().cpu()
    if t.dim() == 4:
        t = t[0]
    if t.dtype == torch.uint8 or t.max() > 1.5:
        arr = t.clamp(0, 255).to(torch.uint8)
    else:  # [-1, 1] -> uint8, as Meta's decode
        arr = ((t.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    if arr.shape[0] in (1, 3):
        arr = arr.permute(1, 2, 0)
    return Image.fromarray(arr.numpy().squeeze()).convert("RGB")


# ---------------------------------------------------------------------------------------------
# JSONL in, JSONL (+ PNG) out
# ---------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path, required: Sequence[str] = ("prompt",)) -> list[dict]:
    """Records of a JSONL file; errors name the file, the line and the reason."""
    path = Path(path)
    if not path.exists():
        raise GenerationError(f"{path}: input file not found")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerationError(f"{path}:{n}: invalid JSON ({e.msg})") from e
        if not isinstance(rec, dict):
            raise GenerationError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        for key in required:
            if not isinstance(rec.get(key), str):
                raise GenerationError(f"{path}:{n}: missing string field {key!r}")
        records.append(rec)
    if not records:
        raise GenerationError(f"{path}: no records")
    return records


def image_encoder(checkpoint: str | Path, tokens: ChameleonTokens, layout: str,
                  image_size: int | None = None) -> Callable[[str], list[int]]:
    """``path -> image token span`` using the checkpoint's VQGAN (:mod:`chameleon_ft.vq`)."""
    from chameleon_ft.vq import ImageTokenizer

    tok = ImageTokenizer.from_checkpoint(checkpoint, image_size=image_size)

    def encode(path: str) -> list[int]:
        codes = tok.encode_path(path) if hasattr(tok, "encode_path") else tok.encode(path)
        codes = torch.as_tensor(codes)
        if codes.dim() == 3:
            codes = codes[0]
        return image_to_ids(codes, tokens, layout)

    return encode


def _batches(items: list, size: int):
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + size]


def run(cfg) -> Path:
    """The ``python -m chameleon_ft.generate`` command: read ``cfg.input``, write ``cfg.output``.

    Text mode writes ``outputs.jsonl`` with ``{"index", "prompt", "image", "output", "num_tokens", "seed"}``;
    image mode writes ``NNNNN.png`` (index of the prompt) and ``outputs.jsonl`` with
    ``{"index", "prompt", "file", "width", "height", "num_tokens", "seed", "cfg_scale"}``.
    """
    if cfg.mode not in ("text", "image"):
        raise GenerationError(f"mode={cfg.mode!r}: choose text or image")
    if cfg.input is None:
        raise GenerationError("input=PATH (a JSONL file of prompts) is required")
    if cfg.image_layout not in LAYOUTS:
        raise GenerationError(f"image_layout={cfg.image_layout!r}: choose one of {LAYOUTS}")
    checkpoint = cfg.model
    if checkpoint is None:
        from chameleon_ft.tiny import tiny_checkpoint

        checkpoint = tiny_checkpoint()
    records = read_jsonl(cfg.input)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    model = load_for_generation(checkpoint, cfg.adapter, dtype=dtype, device=device)
    tokens = ChameleonTokens.from_checkpoint(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    if cfg.mode == "text":
        encode = None
        root = Path(cfg.image_root) if cfg.image_root else Path(cfg.input).parent
        prompts = []
        for i, rec in enumerate(records):
            images = rec.get("image") or []
            images = [images] if isinstance(images, str) else list(images)
            spans = []
            for p in images:
                path = Path(p) if Path(p).is_absolute() else root / p
                if not path.exists():
                    raise GenerationError(f"{cfg.input}: record {i + 1}: image {path} not found")
                encode = encode or image_encoder(checkpoint, tokens, cfg.image_layout, cfg.image_size)
                spans.append(encode(str(path)))
            try:
                prompts.append(user_turn_ids(tokens, tokenizer, rec["prompt"], spans))
            except GenerationError as e:
                raise GenerationError(f"{cfg.input}: record {i + 1}: {e}") from e
        index = list(range(len(records)))
        for b, batch in enumerate(_batches(index, cfg.batch_size)):
            outs = generate_text(model, tokens, tokenizer, [prompts[i] for i in batch],
                                 max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                                 temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed + b)
            for i, o in zip(batch, outs):
                lines.append({"index": i, "prompt": records[i]["prompt"], "image": records[i].get("image"),
                              "output": o["text"], "num_tokens": len(o["token_ids"]), "seed": cfg.seed + b})
    else:
        reqs = []
        for i, r in enumerate(records):
            width, height = r.get("width", cfg.width), r.get("height", cfg.height)
            if not (isinstance(width, int) and isinstance(height, int)):
                raise GenerationError(f"{cfg.input}: record {i + 1}: width/height must be integers, got {width!r}x{height!r}")
            try:
                image_grid(width, height)
            except GenerationError as e:
                raise GenerationError(f"{cfg.input}: record {i + 1}: {e}") from e
            reqs.append(ImageRequest(r["prompt"], width, height))
        from chameleon_ft.vq import load_vqgan

        vqgan = load_vqgan(checkpoint)
        if hasattr(vqgan, "to"):
            vqgan = vqgan.to(device)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(reqs):
            by_size.setdefault((r.width, r.height), []).append(i)
        b = 0
        for _, idx in sorted(by_size.items()):
            for batch in _batches(idx, cfg.batch_size):
                seed = cfg.seed + b
                outs = generate_images(model, tokens, tokenizer, [reqs[i] for i in batch], layout=cfg.image_layout,
                                       cfg_scale=cfg.cfg_scale, image_top_k=cfg.image_top_k,
                                       temperature=cfg.image_temperature, seed=seed)
                for i, o in zip(batch, outs):
                    fname = f"{i:05d}.png"
                    codes_to_pil(vqgan, o["codes"]).save(out_dir / fname)
                    lines.append({"index": i, "prompt": reqs[i].prompt, "file": fname, "width": reqs[i].width,
                                  "height": reqs[i].height, "num_tokens": len(o["token_ids"]), "seed": seed,
                                  "cfg_scale": cfg.cfg_scale})
                b += 1
    lines.sort(key=lambda r: r["index"])
    path = out_dir / OUTPUTS_FILE
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    return path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
CONFIG_NAME = "generate_config"


def compose_generate_config(overrides: Sequence[str] = ()):
    """Compose :class:`GenerateConfig` with Hydra from ``key=value`` overrides (typed, unknown keys refused)."""
    from hydra import compose, initialize
    from hydra.core.config_store import ConfigStore
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from chameleon_ft.generation.config import GenerateConfig

    ConfigStore.instance().store(name=CONFIG_NAME, node=GenerateConfig)
    try:
        with initialize(version_base="1.3", config_path=None):
            cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except ConfigCompositionException as e:
        valid = ", ".join(sorted(OmegaConf.structured(GenerateConfig).keys()))
        raise GenerationError(f"{e.__cause__ or e}; valid keys: {valid}") from e
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m chameleon_ft.generate key=value ...`` (see :class:`GenerateConfig`)."""
    import sys

    from chameleon_ft.export.adapter import AdapterExportError
    from chameleon_ft.model.checkpoint import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        from omegaconf import OmegaConf

        from chameleon_ft.generation.config import GenerateConfig

        print(__doc__)
        print("Options (key=value):\n" + OmegaConf.to_yaml(OmegaConf.structured(GenerateConfig)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = compose_generate_config(argv)
        path = run(cfg)
    except (GenerationError, AdapterExportError, CheckpointError) as e:
        print(f"generate failed: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
