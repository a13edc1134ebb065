"""Evaluate a checkpoint (+ adapter) on a tokenized split: the task's metrics, written as JSON.

- text tasks (``vqa``, ``captioning``, ``chat``): answers generated greedily from ``prompt_ids`` and scored
  by the task (VQAv2 accuracy; BLEU-4, CIDEr-D; exact match);
- image tasks (``text_to_image``): teacher-forced on the held-out (prompt, image) pairs: image-token
  accuracy (argmax over the image codes at every code position of the target image) and image perplexity;
  and, where the data has image scorers, the content of one image drawn from every prompt (``image_match``
  and ``image_match_ceiling`` for the digits, ``clip_score`` with ``eval.clip_model``; see
  :mod:`chameleon_ft.evaluation.image_scores`);
- every task: teacher-forced ``loss`` / ``perplexity`` over all target tokens.

The split comes from :func:`chameleon_ft.data.pipeline.tokenized_split` (columns ``input_ids``, ``labels``,
``prompt_ids``, ``target``, ``meta``); :func:`evaluate_predictions` is the metric core on plain lists.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from chameleon_ft.errors import DataError
from chameleon_ft.evaluation.metrics import MetricInputError
from chameleon_ft.model.loss import IGNORE_INDEX
from chameleon_ft.model.modeling import image_logits_unmasked
from chameleon_ft.model.tokens import ChameleonTokens
from chameleon_ft.tasks import get_task


class EvaluationError(DataError):
    """The split, its metadata or the task cannot be evaluated."""


def _meta(meta) -> dict:
    if isinstance(meta, dict):
        return meta
    if not meta:
        return {}
    try:
        return json.loads(meta)
    except json.JSONDecodeError as e:
        raise EvaluationError(f"sample meta is not JSON ({e.msg}): {meta[:80]!r}") from e


def evaluate_predictions(task: str, preds: Sequence[str], metas: Sequence[dict | str],
                         targets: Sequence[str] | None = None, **options) -> dict[str, float]:
    """Metrics of generated ``preds`` against each sample's references, scored by the task.

    The references are ``meta[task.reference_key]`` (VQA ``answers``, caption ``references``), else the
    sample's ``target`` text. ``options``: metric settings (``vqa_normalization``, ``caption_tokenizer``).
    """
    t = get_task(task)
    if t.score is None:
        raise EvaluationError(f"task {task!r} has no generation metrics")
    if len(preds) != len(metas) or (targets is not None and len(targets) != len(preds)):
        raise EvaluationError(f"{len(preds)} predictions, {len(metas)} metas, "
                              f"{len(targets) if targets is not None else '-'} targets: they must align")
    metas = [_meta(m) for m in metas]
    targets = list(targets) if targets is not None else [None] * len(preds)
    refs = []
    for i, (m, target) in enumerate(zip(metas, targets)):
        r = m.get(t.reference_key) if t.reference_key else None
        if r is None:
            if target is None:
                raise EvaluationError(f"sample {i}: meta has no {t.reference_key or 'reference'!r} and no target was given")
            r = [target]
        refs.append([r] if isinstance(r, str) else list(r))
    try:
        return t.score(preds, refs, **options)
    except MetricInputError as e:
        raise EvaluationError(str(e)) from e


def _pad_right(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    L = max(len(r) for r in rows)
    out = torch.full((len(rows), L), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def teacher_forced_metrics(model, tokens: ChameleonTokens, samples: Sequence[dict], *, batch_size: int = 4,
                           counted: int | None = None, sum_over_ranks=None) -> dict[str, float]:
    """``loss``/``perplexity`` over all target tokens and, where targets hold image codes,
    ``image_token_accuracy`` (argmax over image codes == target code) and ``image_perplexity``
    (full-vocabulary cross-entropy on the code targets), with image logits unmasked.

    Distributed use: each rank passes its share of the samples, padded to the same count (so every rank
    runs the same forward passes, as FSDP needs), ``counted`` = how many of them are real, and
    ``sum_over_ranks(tensor) -> tensor`` to add the sums of every rank.
    """
    device = next(model.parameters()).device
    image_ids = tokens.image_token_ids.to(device)
    is_image = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    is_image[image_ids] = True
    sums = torch.zeros(5, dtype=torch.float64)  # ce, n, image ce, image n, image hits
    counted = len(samples) if counted is None else counted
    masked = image_ids if getattr(model.config, "mask_image_logits", True) else None
    with image_logits_unmasked(model), torch.no_grad():
        for s in range(0, len(samples), batch_size):
            chunk = samples[s : s + batch_size]
            ids = _pad_right([x["input_ids"] for x in chunk], tokens.pad).to(device)
            labels = _pad_right([x["labels"] for x in chunk], IGNORE_INDEX).to(device)
            labels[max(0, counted - s):] = IGNORE_INDEX  # padding rows of a rank's share count for nothing
            mask = _pad_right([[1] * len(x["input_ids"]) for x in chunk], 0).to(device)
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            h, y = hidden[:, :-1], labels[:, 1:]
            sel = y != IGNORE_INDEX
            logits = model.lm_head(h[sel]).float()
            y = y[sel]
            # The loss sees the logits the model was trained with (image logits masked if it masks them);
            # image-token accuracy below ranks the image codes themselves.
            scored = logits.clone()
            if masked is not None:
                scored[:, masked] = float("-inf")
            ce = torch.nn.functional.cross_entropy(scored, y, reduction="none")
            img = is_image[y]
            hits = (image_ids[logits[img][:, image_ids].argmax(-1)] == y[img]).sum() if img.any() else 0
            sums += torch.tensor([float(ce.sum()), y.numel(), float(ce[img].sum()), int(img.sum()), int(hits)],
                                 dtype=torch.float64)
    if sum_over_ranks is not None:
        sums = sum_over_ranks(sums)
    ce_sum, n, img_ce, img_n, img_hit = sums.tolist()
    if not n:
        raise EvaluationError("no target tokens in the split (all labels are -100)")
    out = {"loss": ce_sum / n, "perplexity": math.exp(min(ce_sum / n, 50.0))}
    if img_n:
        out.update(image_token_accuracy=img_hit / img_n, image_perplexity=math.exp(min(img_ce / img_n, 50.0)))
    return out


def metric_options(eval_cfg) -> dict:
    """The metric settings of the ``eval`` config group, as keyword arguments of the task scorers."""
    return {"vqa_normalization": str(eval_cfg.vqa_normalization), "caption_tokenizer": str(eval_cfg.caption_tokenizer)}


def metric_settings(options: dict) -> dict:
    """What the metrics were computed with, for the report (the caption tokenizer that really runs)."""
    from chameleon_ft.evaluation.metrics import resolve_caption_tokenizer

    return {"vqa_normalization": options["vqa_normalization"],
            "caption_tokenizer": resolve_caption_tokenizer(options["caption_tokenizer"])}


def evaluate_split(model, tokens: ChameleonTokens, tokenizer, samples, task: str, *, batch_size: int = 4,
                   max_new_tokens: int = 16, max_samples: int | None = None, options: dict | None = None,
                   image_scoring=None) -> tuple[dict[str, float], list[dict]]:
    """Metrics for ``task`` on ``samples`` (a tokenized split or a list of its rows) and the predictions.

    ``image_scoring`` (an :class:`~chameleon_ft.evaluation.image_scores.ImageScoring`): for an image task,
    draw an image from every row's prompt and score it (each row's scores are its prediction record)."""
    from chameleon_ft.generation.generate import generate_text

    t = get_task(task)
    rows = [samples[i] for i in range(len(samples) if max_samples is None else min(max_samples, len(samples)))]
    if not rows:
        raise EvaluationError("the split is empty")
    metrics = teacher_forced_metrics(model, tokens, rows, batch_size=batch_size)
    predictions = []
    if t.output == "text" and t.score is not None:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            outs = generate_text(model, tokens, tokenizer, [r["prompt_ids"] for r in chunk],
                                 max_new_tokens=max_new_tokens)
            predictions += [{"prediction": o["text"], "target": r.get("target"), "meta": r.get("meta")}
                            for o, r in zip(outs, chunk)]
        metrics.update(evaluate_predictions(task, [p["prediction"] for p in predictions],
                                            [r.get("meta") for r in rows], [r.get("target") for r in rows],
                                            **(options or {})))
    if t.output == "image" and image_scoring is not None and image_scoring.scorers:
        from chameleon_ft.evaluation.image_scores import mean_scores

        metas = [_meta(r.get("meta")) for r in rows]
        scores = image_scoring.score(image_scoring.draw(model, [r["prompt_ids"] for r in rows], batch_size), metas)
        metrics.update(mean_scores(scores))
        metrics.update(image_scoring.ceilings(rows, metas))
        predictions = [{"scores": {k: v[i] for k, v in scores.items()}, "meta": m} for i, m in enumerate(metas)]
    metrics["num_samples"] = len(rows)
    return metrics, predictions


def data_config_as_trained(data_cfg, settings, explicit: set[str]):
    """``data_cfg`` with the settings the model was trained with (prompt template, image layout and size,
    buckets, label mask), except keys the user set explicitly (``explicit``: ``data.<key>`` names), which
    win with a warning when they differ."""
    import logging

    from omegaconf import OmegaConf

    log = logging.getLogger(__name__)
    data = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
    if settings is None:
        return data
    for key in ("prompt_template", "image_layout", "image_size", "image_buckets", "label_mask"):
        trained = getattr(settings, key)
        if f"data.{key}" in explicit:
            if data[key] != trained:
                log.warning("data.%s=%r differs from the %r the model was trained with: prompts or image tokens "
                            "then differ from training", key, data[key], trained)
            continue
        data[key] = trained
    return data


def evaluate(cfg, *, adapter: str | None = None, split: str = "val", output: str | Path | None = None,
             explicit: set[str] = frozenset()) -> tuple[dict[str, float], Path]:
    """Load ``cfg.model`` (+ ``adapter``), tokenize ``split`` of ``cfg.data`` as the model was trained
    (:func:`data_config_as_trained`), write the metrics JSON to ``output`` (default: ``eval-<split>.json``
    in the adapter's run directory, else in the current directory) with the predictions beside it as
    ``<output stem>.predictions.jsonl``. Returns the metrics and the path written."""
    from chameleon_ft.data.pipeline import tokenized_split, with_checkpoint_defaults
    from chameleon_ft.generation.generate import Generator, trained_settings
    from chameleon_ft.tiny import resolve_checkpoint

    assets = resolve_checkpoint(cfg.model.path, cfg.model.tiny_layout)
    settings = trained_settings(assets, adapter) if adapter is not None or (assets.path / "chameleon_ft.json").exists() else None
    data = with_checkpoint_defaults(data_config_as_trained(cfg.data, settings, explicit), assets)
    dtype = "auto" if cfg.model.dtype == "auto" else cfg.model.dtype
    gen = Generator(assets, adapter, settings=settings or trained_settings(assets), dtype=dtype)
    rows = tokenized_split(data, assets, split)
    options = metric_options(cfg.eval)
    image_scoring = None
    if get_task(cfg.task).output == "image":
        from chameleon_ft.evaluation.image_scores import ImageScoring

        image_scoring = ImageScoring.build(data, cfg.eval, assets, seed=int(cfg.seed), device=gen.device)
    metrics, preds = evaluate_split(gen.model, assets.tokens, assets.tokenizer, rows, cfg.task,
                                    batch_size=int(data.eval_batch_size or 4),
                                    max_new_tokens=int(cfg.eval.max_new_tokens), max_samples=cfg.eval.max_samples,
                                    options=options, image_scoring=image_scoring)
    if output is None:
        output = (Path(adapter).parent if adapter is not None else Path.cwd()) / f"eval-{split}.json"
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"task": cfg.task, "split": split, "checkpoint": str(assets.path), "adapter": adapter, "metrics": metrics,
              "metric_settings": metric_settings(options)}
    output.write_text(json.dumps(record, indent=2))
    if preds:
        output.with_name(output.stem + ".predictions.jsonl").write_text(
            "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    return metrics, output
