"""Evaluate a checkpoint (+ adapter) on a tokenized split: the task's metrics, written as JSON.

- ``vqa``: answers generated greedily from ``prompt_ids``; VQAv2 accuracy and exact match.
- ``captioning``: captions generated greedily; BLEU-4 and CIDEr-D.
- ``text_to_image``: teacher-forced on the held-out (prompt, image) pairs: image-token accuracy (argmax over
  the image codes at every code position of the target image) and image-token perplexity.
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

from chameleon_ft.evaluation.metrics import MetricInputError, caption_metrics, exact_match, vqa_accuracy
from chameleon_ft.model.loss import IGNORE_INDEX
from chameleon_ft.model.tokens import ChameleonTokens

GENERATION_TASKS = ("vqa", "captioning", "chat")
TASKS = GENERATION_TASKS + ("text_to_image",)


class EvaluationError(ValueError):
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
                         targets: Sequence[str] | None = None) -> dict[str, float]:
    """Metrics of generated ``preds`` against each sample's references.

    ``vqa``: ``meta["answers"]`` (human answers; else ``[target]``) -> ``vqa_accuracy``, ``exact_match``.
    ``captioning``: ``meta["references"]`` (else ``[target]``) -> ``bleu4``, ``cider``, ``exact_match``.
    ``chat``: ``exact_match`` against ``target``.
    """
    if task not in GENERATION_TASKS:
        raise EvaluationError(f"task {task!r} has no generation metrics; choose one of {GENERATION_TASKS}")
    if len(preds) != len(metas) or (targets is not None and len(targets) != len(preds)):
        raise EvaluationError(f"{len(preds)} predictions, {len(metas)} metas, "
                              f"{len(targets) if targets is not None else '-'} targets: they must align")
    metas = [_meta(m) for m in metas]
    targets = list(targets) if targets is not None else [None] * len(preds)

    def refs(key: str) -> list[list[str]]:
        out = []
        for i, (m, t) in enumerate(zip(metas, targets)):
            r = m.get(key)
            if r is None:
                if t is None:
                    raise EvaluationError(f"sample {i}: meta has no {key!r} and no target was given")
                r = [t]
            out.append([r] if isinstance(r, str) else list(r))
        return out

    try:
        if task == "vqa":
            answers = refs("answers")
            return {"vqa_accuracy": vqa_accuracy(preds, answers), "exact_match": exact_match(preds, answers)}
        if task == "captioning":
            references = refs("references")
            return {**caption_metrics(preds, references), "exact_match": exact_match(preds, references)}
        if any(t is None for t in targets):
            raise EvaluationError("chat: exact match needs the targets")
        return {"exact_match": exact_match(preds, targets)}
    except MetricInputError as e:
        raise EvaluationError(str(e)) from e


def _pad_right(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    L = max(len(r) for r in rows)
    out = torch.full((len(rows), L), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def teacher_forced_metrics(model, tokens: ChameleonTokens, samples: Sequence[dict], *,
                           batch_size: int = 4) -> dict[str, float]:
    """``loss``/``perplexity`` over all target tokens and, where targets hold image codes,
    ``image_token_accuracy`` (argmax over image codes == target code) and ``image_perplexity``
    (full-vocabulary cross-entropy on the code targets), with image logits unmasked."""
    from chameleon_ft.generation.generate import image_logits_unmasked

    device = next(model.parameters()).device
    image_ids = tokens.image_token_ids.to(device)
    is_image = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    is_image[image_ids] = True
    ce_sum = n = img_ce = img_n = img_hit = 0.0
    masked = image_ids if getattr(model.config, "mask_image_logits", True) else None
    with image_logits_unmasked(model), torch.no_grad():
        for s in range(0, len(samples), batch_size):
            chunk = samples[s : s + batch_size]
            ids = _pad_right([x["input_ids"] for x in chunk], tokens.pad).to(device)
            labels = _pad_right([x["labels"] for x in chunk], IGNORE_INDEX).to(device)
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
            ce_sum += float(ce.sum())
            n += y.numel()
            img = is_image[y]
            if img.any():
                img_ce += float(ce[img].sum())
                img_n += int(img.sum())
                pred = image_ids[logits[img][:, image_ids].argmax(-1)]
                img_hit += int((pred == y[img]).sum())
    if not n:
        raise EvaluationError("no target tokens in the split (all labels are -100)")
    out = {"loss": ce_sum / n, "perplexity": math.exp(min(ce_sum / n, 50.0))}
    if img_n:
        out.update(image_token_accuracy=img_hit / img_n, image_perplexity=math.exp(min(img_ce / img_n, 50.0)))
    return out


def evaluate_split(model, tokens: ChameleonTokens, tokenizer, samples, task: str, *, batch_size: int = 4,
                   max_new_tokens: int = 16, max_samples: int | None = None) -> tuple[dict[str, float], list[dict]]:
    """Metrics for ``task`` on ``samples`` (a tokenized split or a list of its rows) and the predictions."""
    from chameleon_ft.generation.generate import generate_text

    if task not in TASKS:
        raise EvaluationError(f"task {task!r}: choose one of {TASKS}")
    rows = [samples[i] for i in range(len(samples) if max_samples is None else min(max_samples, len(samples)))]
    if not rows:
        raise EvaluationError("the split is empty")
    metrics = teacher_forced_metrics(model, tokens, rows, batch_size=batch_size)
    predictions = []
    if task in GENERATION_TASKS:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            outs = generate_text(model, tokens, tokenizer, [r["prompt_ids"] for r in chunk],
                                 max_new_tokens=max_new_tokens)
            predictions += [{"prediction": o["text"], "target": r.get("target"), "meta": r.get("meta")}
                            for o, r in zip(outs, chunk)]
        metrics.update(evaluate_predictions(task, [p["prediction"] for p in predictions],
                                            [r.get("meta") for r in rows], [r.get("target") for r in rows]))
    metrics["num_samples"] = len(rows)
    return metrics, predictions


def evaluate(cfg, *, adapter: str | None = None, split: str = "validation", output: str | Path = "metrics.json",
             checkpoint: str | None = None) -> dict[str, float]:
    """Load ``cfg.model`` (+ ``adapter``), tokenize ``split`` of ``cfg.data``, write metrics JSON to ``output``
    (predictions beside it as ``<output stem>.predictions.jsonl``)."""
    from chameleon_ft.data.pipeline import tokenized_split
    from chameleon_ft.generation.generate import load_for_generation, resolve_device_dtype
    from chameleon_ft.model.checkpoint import load_tokenizer

    checkpoint = checkpoint or cfg.model.path
    if checkpoint is None:
        from chameleon_ft.tiny import tiny_checkpoint

        checkpoint = str(tiny_checkpoint(cfg.model.get("tiny_layout", "grouped")))
    device, dtype = resolve_device_dtype("auto", "auto" if cfg.model.dtype == "auto" else cfg.model.dtype)
    model = load_for_generation(checkpoint, adapter, dtype=dtype, device=device)
    tokens = ChameleonTokens.from_checkpoint(checkpoint)
    data = tokenized_split(cfg.data, str(checkpoint), split)
    metrics, preds = evaluate_split(model, tokens, load_tokenizer(checkpoint), data, cfg.task,
                                    batch_size=int(cfg.data.get("eval_batch_size", 4) or 4),
                                    max_new_tokens=int(cfg.eval.max_new_tokens), max_samples=cfg.eval.max_samples)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"task": cfg.task, "split": split, "checkpoint": str(checkpoint), "adapter": adapter, "metrics": metrics}
    output.write_text(json.dumps(record, indent=2))
    if preds:
        output.with_name(output.stem + ".predictions.jsonl").write_text(
            "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m chameleon_ft.evaluate [--adapter DIR] [--split NAME] [--output FILE] recipe=NAME [overrides]``.

    Flags are read with argparse; everything else is a Hydra override composed exactly like training
    (the recipe chooses task and data; ``model.path=`` the checkpoint, base or merged).
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m chameleon_ft.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=None, help="adapter directory (PEFT LoRA and/or image rows)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--output", default="metrics.json")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from chameleon_ft.config.store import ConfigKeyError, compose

    try:
        cfg = compose(overrides)
        metrics = evaluate(cfg, adapter=args.adapter, split=args.split, output=args.output)
    except (ConfigKeyError, EvaluationError, ValueError) as e:
        print(f"evaluate failed: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0
