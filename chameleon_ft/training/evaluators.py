"""Task metrics computed at every validation, as the task (:mod:`chameleon_ft.tasks`) defines them.

- text tasks: answers generated greedily from each held-out prompt, scored by the task (``val/acc`` and
  ``val/exact_match`` for VQA; ``val/bleu4``, ``val/cider``, ``val/exact_match`` for captioning);
- image tasks: teacher-forced ``val/image_token_accuracy`` and ``val/image_perplexity``; the content metrics of
  the data's image scorers (``val/image_match`` and its ``val/image_match_ceiling`` for the digits,
  ``val/clip_score`` with ``eval.clip_model``) on one image drawn from every held-out prompt (the run's own
  template; see :mod:`chameleon_ft.evaluation.image_scores`); and a grid of the first images, saved under
  ``<run_dir>/samples/`` and logged to TensorBoard.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from chameleon_ft.adapter import base_model
from chameleon_ft.model.assets import CheckpointAssets
from chameleon_ft.tasks import get_task

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "val_predictions.jsonl"


class TaskEvaluator:
    """``fn(module) -> {"val/...": value}`` for :attr:`ChameleonLitModule.evaluators`."""

    def __init__(self, cfg, assets: CheckpointAssets, run_dir: Path):
        from chameleon_ft.data.pipeline import tokenized_split

        self.task, self.cfg, self.run_dir, self.assets = get_task(cfg.task), cfg, Path(run_dir), assets
        self.layout = assets.image_layout(cfg.data.image_layout)
        ds = tokenized_split(cfg.data, assets, "val", run_dir=run_dir)
        n = len(ds) if cfg.eval.max_samples is None else min(len(ds), int(cfg.eval.max_samples))
        self.rows = [ds[i] for i in range(n)]
        self.image_scoring = None  # built at the first validation, on the model's device
        self.ceilings: dict[str, float] | None = None

    def __call__(self, module) -> dict[str, float]:
        """The task's metrics over the held-out rows. Under several processes each rank takes a share of the
        rows, padded to the same count and decoded in lockstep (FSDP needs every rank in every forward
        pass), and the metric is computed once over every rank's predictions."""
        from chameleon_ft.evaluation.evaluate import evaluate_predictions, metric_options, teacher_forced_metrics
        from chameleon_ft.generation.generate import generate_text

        if not self.rows:
            return {}
        model = base_model(module.model)
        bs = int(self.cfg.data.eval_batch_size)
        world, rank = module.trainer.world_size, module.trainer.global_rank
        mine, counted = rank_share(self.rows, rank, world)
        out: dict[str, float] = {}
        tokens = self.assets.tokens
        if self.task.output == "text" and self.task.score is not None:
            preds = []
            for s in range(0, len(mine), bs):
                preds += [o["text"] for o in generate_text(model, tokens, self.assets.tokenizer,
                                                           [r["prompt_ids"] for r in mine[s : s + bs]],
                                                           max_new_tokens=int(self.cfg.eval.max_new_tokens),
                                                           lockstep=world > 1)]
            preds = gather_in_order(preds[:counted], world)
            if rank == 0:
                self._write_predictions(preds)
            metrics = evaluate_predictions(self.task.name, preds, [r["meta"] for r in self.rows],
                                           [r["target"] for r in self.rows], **metric_options(self.cfg.eval))
            out.update({f"val/{k}": v for k, v in metrics.items()})
        if self.task.output == "image":
            tf = teacher_forced_metrics(model, tokens, mine, batch_size=bs, counted=counted,
                                        sum_over_ranks=module._sum_over_ranks if world > 1 else None)
            out.update({f"val/{k}": tf[k] for k in ("image_token_accuracy", "image_perplexity") if k in tf})
            out.update({f"val/{k}": v for k, v in self._images(module, model).items()})
        return out

    def _write_predictions(self, preds: list[str]) -> None:
        """The last validation's answers beside the run's metrics (``val_predictions.jsonl``)."""
        lines = [json.dumps({"prediction": p, "target": r["target"], "meta": json.loads(r["meta"])}, ensure_ascii=False)
                 for p, r in zip(preds, self.rows)]
        (self.run_dir / PREDICTIONS_FILE).write_text("".join(line + "\n" for line in lines))

    def _images(self, module, model) -> dict[str, float]:
        """Images drawn from the held-out prompts (every row when the data has image scorers, else the sample
        grid's), scored; every rank draws its share (lockstep), rank 0 saves the grid of its first ones."""
        from chameleon_ft.evaluation.image_scores import ImageScoring, mean_scores

        device = next(model.parameters()).device
        if self.image_scoring is None:
            self.image_scoring = ImageScoring.build(self.cfg.data, self.cfg.eval, self.assets, seed=int(self.cfg.seed),
                                                    device=device)
        scoring, n_grid = self.image_scoring, int(self.cfg.eval.image_samples)
        rows = self.rows if scoring.scorers else self.rows[:n_grid]
        if not rows:
            return {}
        world, rank = module.trainer.world_size, module.trainer.global_rank
        mine, counted = rank_share(rows, rank, world)
        images = scoring.draw(model, [r["prompt_ids"] for r in mine], int(self.cfg.data.eval_batch_size))
        metas = [json.loads(r["meta"]) for r in mine[:counted]]
        scores = {k: gather_in_order(v, world) for k, v in scoring.score(images[:counted], metas).items()}
        if self.ceilings is None:  # the VQGAN is frozen: what its tokens allow is measured once
            self.ceilings = scoring.ceilings(rows, [json.loads(r["meta"]) for r in rows])
        if rank == 0 and n_grid > 0:
            self._save_grid(module, images[: min(n_grid, counted)])
        return {**mean_scores(scores), **self.ceilings}

    def _save_grid(self, module, images) -> None:
        grid = image_grid_of(images)
        out = self.run_dir / "samples" / f"step-{module.global_step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        for lg in module.loggers:
            exp = getattr(lg, "experiment", None)
            if hasattr(exp, "add_image"):
                import numpy as np

                exp.add_image("val/samples", np.asarray(grid), module.global_step, dataformats="HWC")


def rank_share(rows: list, rank: int, world: int) -> tuple[list, int]:
    """Rank ``rank``'s rows (``rows[rank::world]``) padded with copies of the first row to the count every rank
    has, and how many of them are real."""
    mine = rows[rank::world]
    size = -(-len(rows) // world)
    return mine + [rows[0]] * (size - len(mine)), len(mine)


def gather_in_order(mine: list, world: int) -> list:
    """Every rank's ``rows[rank::world]`` results back in the rows' order (a collective when ``world > 1``)."""
    if world == 1:
        return list(mine)
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    out = []
    for i in range(max(len(p) for p in parts)):
        out += [p[i] for p in parts if i < len(p)]
    return out


def image_grid_of(images, cols: int = 4):
    """Images pasted into one grid, ``cols`` per row."""
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (w * min(cols, len(images)), h * rows), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def build_evaluators(cfg, assets: CheckpointAssets, run_dir: Path) -> list:
    """The validation evaluators of ``cfg.task`` (none for a task without generated metrics or images)."""
    task = get_task(cfg.task)
    if task.output == "text" and task.score is None:
        return []
    return [TaskEvaluator(cfg, assets, run_dir)]
