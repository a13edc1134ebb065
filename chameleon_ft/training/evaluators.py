"""Task metrics computed at every validation: generation-based for text tasks, image samples for t2i.

- ``vqa``: answers generated greedily from each held-out prompt -> ``val/acc`` (VQAv2 accuracy, exact
  match when fewer than ten answers) and ``val/exact_match``;
- ``captioning``: captions generated greedily -> ``val/bleu4``, ``val/cider``, ``val/exact_match``;
- ``text_to_image``: teacher-forced ``val/image_token_accuracy`` and ``val/image_perplexity``, and a grid of
  images generated for fixed prompts, decoded by the VQGAN, saved under ``<run_dir>/samples/`` and logged
  to TensorBoard.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _plain_model(module):
    """The Chameleon model under any PEFT wrapper (LoRA layers stay injected)."""
    model = module.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class TaskEvaluator:
    """``fn(module) -> {"val/...": value}`` for :attr:`ChameleonLitModule.evaluators`."""

    def __init__(self, cfg, checkpoint_dir: str, run_dir: Path, world_size: int = 1):
        from chameleon_ft.data.pipeline import resolve_image_layout, tokenized_split
        from chameleon_ft.model.checkpoint import load_tokenizer
        from chameleon_ft.model.tokens import ChameleonTokens

        self.task, self.cfg, self.run_dir = cfg.task, cfg, Path(run_dir)
        self.checkpoint_dir = checkpoint_dir
        self.tokens = ChameleonTokens.from_checkpoint(checkpoint_dir)
        self.tokenizer = load_tokenizer(checkpoint_dir)
        self.layout = resolve_image_layout(cfg.data, checkpoint_dir)
        ds = tokenized_split(cfg.data, checkpoint_dir, "val", run_dir=run_dir)
        n = len(ds) if cfg.eval.max_samples is None else min(len(ds), int(cfg.eval.max_samples))
        self.rows = [ds[i] for i in range(n)]
        # Generation under FSDP would need every rank to step in lockstep; evaluate the export instead.
        self.can_generate = world_size == 1
        if not self.can_generate:
            log.warning("generation metrics are computed only in single-process runs; run "
                        "`python -m chameleon_ft.evaluate --adapter <run_dir>/adapter recipe=...` after training")
        self._vqgan = None

    def __call__(self, module) -> dict[str, float]:
        from chameleon_ft.evaluation.evaluate import evaluate_predictions, teacher_forced_metrics
        from chameleon_ft.generation.generate import generate_text

        if not self.rows:
            return {}
        model = _plain_model(module)
        bs = int(self.cfg.data.eval_batch_size)
        out: dict[str, float] = {}
        if self.task in ("vqa", "captioning", "chat") and self.can_generate:
            preds = []
            for s in range(0, len(self.rows), bs):
                chunk = self.rows[s : s + bs]
                preds += [o["text"] for o in generate_text(model, self.tokens, self.tokenizer,
                                                           [r["prompt_ids"] for r in chunk],
                                                           max_new_tokens=int(self.cfg.eval.max_new_tokens))]
            metrics = evaluate_predictions(self.task, preds, [r["meta"] for r in self.rows],
                                           [r["target"] for r in self.rows])
            if "vqa_accuracy" in metrics:
                metrics["acc"] = metrics.pop("vqa_accuracy")
            out.update({f"val/{k}": v for k, v in metrics.items()})
        if self.task == "text_to_image":
            tf = teacher_forced_metrics(model, self.tokens, self.rows, batch_size=bs)
            out.update({f"val/{k}": tf[k] for k in ("image_token_accuracy", "image_perplexity") if k in tf})
            if self.can_generate and int(self.cfg.eval.image_samples) > 0:
                self._image_samples(module, model)
        return out

    def _image_samples(self, module, model) -> None:
        from chameleon_ft.generation.generate import ImageRequest, codes_to_pil, generate_images
        from chameleon_ft.vq.vqgan import load_vqgan

        if self._vqgan is None:
            self._vqgan = load_vqgan(self.checkpoint_dir, device=next(model.parameters()).device)
        size = int(self.cfg.data.image_size)
        prompts = [_sample_prompt(self.cfg, i) for i in range(int(self.cfg.eval.image_samples))]
        results = generate_images(model, self.tokens, self.tokenizer, [ImageRequest(p, size, size) for p in prompts],
                                  layout=self.layout, cfg_scale=float(self.cfg.eval.cfg_scale), seed=int(self.cfg.seed))
        images = [codes_to_pil(self._vqgan, r["codes"]) for r in results]
        grid = _grid(images)
        out = self.run_dir / "samples" / f"step-{module.global_step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        for lg in module.loggers:
            exp = getattr(lg, "experiment", None)
            if hasattr(exp, "add_image"):
                import numpy as np

                exp.add_image("val/samples", np.asarray(grid), module.global_step, dataformats="HWC")


def _sample_prompt(cfg, i: int) -> str:
    if cfg.data.name == "digits_t2i":
        return f"Draw the digit {i % 10}"
    return ["a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at dawn"][i % 4]


def _grid(images, cols: int = 4):
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (w * min(cols, len(images)), h * rows), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def build_evaluators(cfg, checkpoint_dir: str, run_dir: Path, world_size: int) -> list:
    """The validation evaluators of ``cfg.task`` (none for tasks without extra metrics)."""
    if cfg.task not in ("vqa", "captioning", "chat", "text_to_image"):
        return []
    return [TaskEvaluator(cfg, checkpoint_dir, run_dir, world_size)]
