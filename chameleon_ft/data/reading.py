"""Reading a split: a data format's raw rows -> a ``datasets.Dataset`` of canonical records (:mod:`.sample`).

The format (:mod:`chameleon_ft.data.formats`) loads one raw row per input record, with its original
position ``_row``; rows are converted with ``Dataset.map`` into canonical fields and then into a sample by
the task (:mod:`chameleon_ft.tasks`). Every error names the input file, the record index and a reason
(:class:`~chameleon_ft.data.errors.BadSampleError`), and the :class:`~chameleon_ft.data.errors.BadSamplePolicy`
raises it or counts and drops the sample.

Splits: ``train`` reads ``path``, ``val`` ``val_path``, ``test`` ``test_path`` (formats may differ, see
theirs). Without a val source and with ``val_fraction > 0``, a fixed fraction of train is held out
(:func:`~chameleon_ft.data.splits.holdout_indices`) and removed from train.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import datasets

from chameleon_ft.data.config import check_data_config
from chameleon_ft.data.errors import BadSampleError, BadSamplePolicy, DataConfigError, EmptySplitError
from chameleon_ft.data.formats import RowContext, get_format
from chameleon_ft.data.sample import RECORD_FEATURES, Conversation, validate_conversation
from chameleon_ft.data.splits import canonical_split, holdout_indices
from chameleon_ft.tasks import SampleContext, build_sample, get_task, infer_task

_OUT_FEATURES = datasets.Features({**RECORD_FEATURES, "_error": datasets.Value("string")})


def sample_task(data_cfg) -> str:
    """The task the samples of ``data_cfg`` are built for: ``data.task``, or ``auto`` (inferred per record).

    A format made for fixed tasks needs one: ``auto`` is then its only task, or an error.
    """
    fmt = get_format(data_cfg.format)
    task = str(data_cfg.task)
    if task == "auto" and fmt.tasks is not None:
        if len(fmt.tasks) != 1:
            raise DataConfigError(f"data.format={fmt.name} makes samples for {list(fmt.tasks)}: set data.task "
                                  "(a recipe sets it from its task)")
        task = fmt.tasks[0]
    return task


def row_to_conversation(row: dict, ctx: RowContext) -> Conversation:
    """One raw row -> a validated sample (raises :class:`BadSampleError`)."""
    if row.get("_error"):
        raise BadSampleError.from_dict(json.loads(row["_error"]))
    index = int(row["_row"])
    fields = get_format(ctx.format).fields(row, ctx)
    name = ctx.task if ctx.task != "auto" else infer_task(fields)
    sctx = SampleContext(file=ctx.file, index=index, prompt_template=ctx.prompt_template, image_size=ctx.image_size,
                         rules=ctx.rules)
    if name is None:
        keys = fields.get("_keys") or sorted(k for k, v in fields.items() if v is not None and not k.startswith("_"))
        raise BadSampleError(ctx.file, index, "missing_field",
                             f"cannot tell the task: the record has {keys} and none of the key fields "
                             "(conversations, question, caption, prompt); set data.task or map data.columns")
    task = get_task(name)
    conv = validate_conversation(build_sample(task, fields, sctx))
    if task.needs_image and not conv.images:
        raise BadSampleError(ctx.file, index, "text_only", f"task {task.name} needs an image; the record has none")
    return conv


def _convert_row(row: dict, ctx: RowContext, skip: bool) -> dict:
    """datasets.map function: a raw row -> a canonical record plus ``_error`` (JSON of a BadSampleError)."""
    try:
        return row_to_conversation(row, ctx).to_record() | {"_error": ""}
    except BadSampleError as err:
        if not skip:
            raise
        return {"turns": [], "task": "", "meta_json": "", "source": ctx.file, "index": int(row["_row"]),
                "_error": json.dumps(err.to_dict())}


def convert_raw(raw: datasets.Dataset, ctx: RowContext, policy: BadSamplePolicy, num_proc: int = 0) -> datasets.Dataset:
    """Map a raw dataset (with ``_row``) to canonical records, applying ``policy`` to bad samples.

    Recomputed every time (``load_from_cache_file=False``): whether an image exists is checked anew.
    """
    out = raw.map(_convert_row, fn_kwargs={"ctx": ctx, "skip": policy.skip}, remove_columns=raw.column_names,
                  features=_OUT_FEATURES, num_proc=num_proc or None, load_from_cache_file=False,
                  desc=f"reading {ctx.file}")
    errors = out["_error"]
    bad = [i for i, e in enumerate(errors) if e]
    for i in bad:
        policy.handle(BadSampleError.from_dict(json.loads(errors[i])))
    if bad:
        bad_set = set(bad)
        out = out.select([i for i in range(len(out)) if i not in bad_set])
    return out.remove_columns("_error")


def read_conversations(cfg, split: str = "train", policy: BadSamplePolicy | None = None) -> datasets.Dataset:
    """The ``split`` (``train``/``val``/``test``; ``validation`` accepted) of ``cfg`` (a :class:`DataConfig`
    or its DictConfig) as a ``datasets.Dataset`` of canonical records (:data:`RECORD_FEATURES`).

    Bad samples go through ``policy`` (default: a new one from ``cfg.on_bad_sample``); skipped ones are
    counted there and logged. Raises :class:`DataConfigError` for a configuration problem,
    :class:`DataFormatError` for an unusable file, :class:`BadSampleError` under ``raise``, and
    :class:`EmptySplitError` when no usable sample is left (an empty file, or every record skipped).
    """
    check_data_config(cfg)
    split = canonical_split(split)
    policy = policy or BadSamplePolicy(cfg.on_bad_sample)
    fmt = get_format(cfg.format)
    task = sample_task(cfg)
    inputs = fmt.split_inputs(cfg, split)
    raw = fmt.raw(cfg, split, inputs, task)
    if fmt.split_holdout(cfg, split, inputs):
        held = holdout_indices(len(raw), float(cfg.val_fraction), int(cfg.seed))
        if split == "val":
            raw = raw.select(held)
        else:
            held_set = set(held)
            raw = raw.select([i for i in range(len(raw)) if i not in held_set])
    if cfg.max_samples:
        raw = raw.select(range(min(len(raw), int(cfg.max_samples))))
    ctx = fmt.context(cfg, split, inputs)
    ctx = replace(ctx, task=task)
    if len(raw) == 0:
        raise EmptySplitError.for_split(ctx.file, split, 0, {})
    skipped_before = dict(policy.counts)
    out = convert_raw(raw, ctx, policy, num_proc=int(cfg.num_workers))
    policy.log_summary(f"{fmt.name} {split} ({ctx.file})")
    if len(out) == 0:
        raise EmptySplitError.for_split(ctx.file, split, len(raw), dict(policy.counts - Counter(skipped_before)))
    return out


def conversations(ds: datasets.Dataset):
    """Iterate a dataset of canonical records as :class:`Conversation` objects."""
    for rec in ds:
        yield Conversation.from_record(rec)
