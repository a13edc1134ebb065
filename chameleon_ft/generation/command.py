"""``python -m chameleon_ft.generate``: JSONL of requests in, JSONL (+ PNG files) out.

Text mode writes ``outputs.jsonl`` with ``{"index", "prompt", "image", "output", "num_tokens", "seed"}``;
image mode writes ``NNNNN.png`` (index of the request) and ``outputs.jsonl`` with
``{"index", "prompt", "file", "width", "height", "num_tokens", "seed", "cfg_scale", "sampler",
"forward_passes"}`` (the forwards of the request's batch); interleaved mode writes ``NNNNN_K.png`` (image K
of answer NNNNN), ``outputs.jsonl`` with ``{"index", "prompt", "segments", "finished", "num_tokens", "seed",
"forward_passes"}`` -- segments in order, ``{"type": "text", "text"}`` or ``{"type": "image", "file",
"width", "height"}``; ``finished`` false when the text budget ran out before end-of-turn -- and
``outputs.md``, the answers as Markdown with their images inline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from chameleon_ft.data.errors import BadSampleError
from chameleon_ft.data.jsonfile import json_record_rows, record_from_row
from chameleon_ft.data.sample import ImageRef
from chameleon_ft.errors import ConfigError
from chameleon_ft.generation.generate import (
    IMAGE_SAMPLERS,
    SAMPLERS,
    GenerationError,
    Generator,
    generate_images,
    generate_interleaved,
    generate_text,
    image_grid,
    settings_with,
    trained_settings,
)

OUTPUTS_FILE = "outputs.jsonl"
MARKDOWN_FILE = "outputs.md"
MODES = ("text", "image", "interleaved")


def read_jsonl(path: str | Path, required: Sequence[str] = ("prompt",)) -> list[dict]:
    """The requests of a JSON-lines (or JSON array) file; errors name the file, the record and the reason."""
    path = Path(path)
    if not path.exists():
        raise GenerationError(f"{path}: input file not found")
    records = []
    for row in json_record_rows(str(path)):
        if row["_error"]:
            raise BadSampleError.from_dict(json.loads(row["_error"]))
        rec = record_from_row(row, str(path))
        for key in required:
            if not isinstance(rec.get(key), str):
                raise BadSampleError(str(path), int(row["_row"]), "missing_field",
                                     f"missing string field {key!r}; the record has {sorted(rec)}")
        records.append(rec)
    if not records:
        raise GenerationError(f"{path}: no records")
    return records


def _batches(items: list, size: int):
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + size]


def load_generator(cfg) -> Generator:
    """The model of ``cfg`` (``model``, ``adapter``) with its trained settings, overridden where ``cfg`` says."""
    from chameleon_ft.tiny import resolve_checkpoint

    assets = resolve_checkpoint(cfg.model)
    settings = trained_settings(assets, cfg.adapter)
    overrides = {"task": cfg.task, "prompt_template": cfg.prompt_template, "image_layout": cfg.image_layout,
                 "image_size": cfg.image_size}
    settings = settings_with(settings, overrides, str(cfg.adapter or assets.path))
    return Generator(assets, cfg.adapter, settings=settings, device=cfg.device, dtype=cfg.dtype)


def _request_images(rec: dict, root: Path, where: str) -> list[ImageRef]:
    images = rec.get("image") or []
    refs = []
    for p in [images] if isinstance(images, str) else list(images):
        path = Path(p) if Path(p).is_absolute() else root / p
        if not path.exists():
            raise GenerationError(f"{where}: image {path} not found")
        refs.append(ImageRef(path=str(path)))
    return refs


def run_text(cfg, gen: Generator) -> list[dict]:
    """Answers / captions for every request of ``cfg.input``."""
    records = read_jsonl(cfg.input)
    root = Path(cfg.image_root) if cfg.image_root else Path(cfg.input).parent
    requests = [{"prompt": r["prompt"], "images": (refs := _request_images(r, root, f"{cfg.input}: record {i + 1}")),
                 "image": refs[0] if refs else None} for i, r in enumerate(records)]
    lines = []
    for b, batch in enumerate(_batches(list(range(len(records))), cfg.batch_size)):
        prompts = gen.prompt_ids([requests[i] for i in batch], source=str(cfg.input))
        outs = generate_text(gen.model, gen.tokens, gen.assets.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                             do_sample=cfg.do_sample, temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed + b)
        for i, o in zip(batch, outs):
            lines.append({"index": i, "prompt": records[i]["prompt"], "image": records[i].get("image"),
                          "output": o["text"], "num_tokens": len(o["token_ids"]), "seed": cfg.seed + b})
    return lines


def _request_sizes(cfg, records: list[dict]) -> list[tuple[int, int]]:
    """``(width, height)`` of each request (its own or the config's), checked to be a valid image size."""
    sizes = []
    for i, r in enumerate(records):
        width, height = r.get("width", cfg.width), r.get("height", cfg.height)
        if not (isinstance(width, int) and isinstance(height, int)):
            raise GenerationError(f"{cfg.input}: record {i + 1}: width/height must be integers, "
                                  f"got {width!r}x{height!r}")
        try:
            image_grid(width, height)
        except ConfigError as e:
            raise GenerationError(f"{cfg.input}: record {i + 1}: {e}") from e
        sizes.append((width, height))
    return sizes


def run_image(cfg, gen: Generator, out_dir: Path) -> list[dict]:
    """One PNG per request of ``cfg.input``, batched by image size."""
    records = read_jsonl(cfg.input)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(_request_sizes(cfg, records)):
        by_size.setdefault(size, []).append(i)
    lines, b = [], 0
    for (width, height), idx in sorted(by_size.items()):
        for batch in _batches(idx, cfg.batch_size):
            seed = cfg.seed + b
            prompts = gen.prompt_ids([{"prompt": records[i]["prompt"], "width": width, "height": height}
                                      for i in batch], source=str(cfg.input))
            outs = generate_images(gen.model, gen.tokens, prompts, width=width, height=height,
                                   layout=gen.settings.image_layout, cfg_scale=cfg.cfg_scale,
                                   image_top_k=cfg.image_top_k, temperature=cfg.image_temperature, seed=seed,
                                   sampler=cfg.sampler, sjd_window=cfg.sjd_window, compile=cfg.compile)
            for i, o in zip(batch, outs):
                fname = f"{i:05d}.png"
                gen.decode_image(o["codes"]).save(out_dir / fname)
                lines.append({"index": i, "prompt": records[i]["prompt"], "file": fname, "width": width,
                              "height": height, "num_tokens": len(o["token_ids"]), "seed": seed,
                              "cfg_scale": cfg.cfg_scale, "sampler": cfg.sampler,
                              "forward_passes": o["forward_passes"]})
            b += 1
    return lines


def run_interleaved(cfg, gen: Generator, out_dir: Path) -> list[dict]:
    """One interleaved answer per request of ``cfg.input`` (text, images as PNG files, text), one at a time;
    also writes :data:`MARKDOWN_FILE`."""
    records = read_jsonl(cfg.input)
    lines = []
    for i, ((width, height), rec) in enumerate(zip(_request_sizes(cfg, records), records)):
        seed = cfg.seed + i
        prompt = gen.prompt_ids([{"prompt": rec["prompt"]}], source=str(cfg.input))[0]
        answer = generate_interleaved(
            gen.model, gen.tokens, prompt, width=width, height=height, layout=gen.settings.image_layout,
            cfg_scale=cfg.cfg_scale, image_top_k=cfg.image_top_k, image_temperature=cfg.image_temperature,
            max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, temperature=cfg.temperature,
            top_k=cfg.top_k, max_images=cfg.max_images, sampler=cfg.sampler, sjd_window=cfg.sjd_window,
            compile=cfg.compile, seed=seed)
        segments, n_images = [], 0
        for seg in answer.segments:
            if seg["type"] == "text":
                text = gen.assets.tokenizer.decode(seg["token_ids"], skip_special_tokens=True)
                segments.append({"type": "text", "text": text.strip()})
            else:
                fname = f"{i:05d}_{n_images}.png"
                gen.decode_image(seg["codes"]).save(out_dir / fname)
                segments.append({"type": "image", "file": fname, "width": width, "height": height})
                n_images += 1
        lines.append({"index": i, "prompt": rec["prompt"], "segments": segments, "finished": answer.finished,
                      "num_tokens": len(answer.token_ids), "seed": seed, "forward_passes": answer.forward_passes})
    (out_dir / MARKDOWN_FILE).write_text(interleaved_markdown(lines, cfg.max_new_tokens))
    return lines


def interleaved_markdown(lines: list[dict], max_new_tokens: int) -> str:
    """The answers as Markdown: each prompt as a heading, then its text and images in order."""
    out = ["# Interleaved answers", ""]
    for line in lines:
        out += [f"## {line['index'] + 1}. {line['prompt']}", ""]
        for seg in line["segments"]:
            if seg["type"] == "text":
                out += [seg["text"] or "*(empty text)*", ""]
            else:
                out += [f"![{seg['width']}x{seg['height']} image]({seg['file']})", ""]
        if not line["finished"]:
            out += [f"*(unfinished: max_new_tokens={max_new_tokens} text tokens reached before end-of-turn)*", ""]
    return "\n".join(out)


def run(cfg) -> Path:
    """The whole command: read ``cfg.input``, write ``cfg.output``; returns the outputs file."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r}: choose one of {MODES}")
    if cfg.input is None:
        raise ConfigError("input=PATH (a JSONL file of prompts) is required")
    samplers = IMAGE_SAMPLERS if cfg.mode == "image" else SAMPLERS
    if cfg.mode != "text" and cfg.sampler not in samplers:
        raise ConfigError(f"sampler={cfg.sampler!r}: mode={cfg.mode} takes one of {samplers}")
    if cfg.compile and cfg.sampler == "hf":
        raise ConfigError("compile=true compiles the static-cache decode step: use sampler=plain or sampler=sjd")
    gen = load_generator(cfg)
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    runners = {"text": lambda: run_text(cfg, gen), "image": lambda: run_image(cfg, gen, out_dir),
               "interleaved": lambda: run_interleaved(cfg, gen, out_dir)}
    lines = runners[cfg.mode]()
    lines.sort(key=lambda r: r["index"])
    path = out_dir / OUTPUTS_FILE
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    return path
