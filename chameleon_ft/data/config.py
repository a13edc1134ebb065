"""``DataConfig``: the ``data`` group of the experiment config (a Hydra structured config).

Only OmegaConf-friendly types are used, so a typo in a key or a wrong type fails at compose time.
Choices held in plain strings are checked by :func:`check_data_config` against the format and task
registries, with a message listing the valid choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from chameleon_ft.data.errors import POLICIES, DataConfigError

IMAGE_LAYOUTS = ("auto", "chameleon", "lumina")


@dataclass
class ColumnsConfig:
    """Column names of flat records (``jsonl``, ``hf_dataset``) and conversation files, per canonical field.

    Unset fields use their own name, e.g. ``data.columns.question=q`` reads the question from column ``q``.
    """

    image: Optional[str] = None
    images: Optional[str] = None
    caption: Optional[str] = None
    references: Optional[str] = None
    question: Optional[str] = None
    answer: Optional[str] = None
    answers: Optional[str] = None
    prompt: Optional[str] = None
    conversations: Optional[str] = None  # sharegpt: LLaMA-Factory's `messages` column
    system: Optional[str] = None  # sharegpt: a column holding the system prompt (read only when mapped)
    id: Optional[str] = None


@dataclass
class ShareGPTTagsConfig:
    """LLaMA-Factory's ``tags`` of a ShareGPT data set (``data.format=sharegpt``): the message keys holding the
    role and the content, and the role values. All unset: ``role``/``from``, ``content``/``value``,
    ``user``/``human``, ``assistant``/``gpt`` and ``system`` are recognised; any one set: LLaMA-Factory's
    rule, every unset tag takes its default (from, value, human, gpt, system, observation, function_call).
    """

    role_tag: Optional[str] = None
    content_tag: Optional[str] = None
    user_tag: Optional[str] = None
    assistant_tag: Optional[str] = None
    system_tag: Optional[str] = None
    observation_tag: Optional[str] = None
    function_tag: Optional[str] = None


@dataclass
class DataConfig:
    """Where the data is, how it is read, and how samples are built.

    Paths per split: ``path`` (train), ``val_path``, ``test_path``; for ``vqav2`` these are the questions
    files and ``annotations_path``/``val_annotations_path``/``test_annotations_path`` the answers; for
    ``coco_captions`` they are the caption annotation files. ``image_root`` (and optional per-split
    ``val_image_root``/``test_image_root``) is the directory relative image paths are resolved against;
    when unset, the directory of the annotation file. For ``hf_dataset``, ``path`` is a ``save_to_disk``
    directory, a parquet/json/csv/arrow file (or glob), or an image folder (with ``metadata.jsonl``).
    """

    # -- source ---------------------------------------------------------------------------------------
    format: str = "digits"  # a registered data format (chameleon_ft.data.formats)
    path: Optional[str] = None
    val_path: Optional[str] = None
    test_path: Optional[str] = None
    annotations_path: Optional[str] = None  # vqav2 answers for `path`
    val_annotations_path: Optional[str] = None
    test_annotations_path: Optional[str] = None
    image_root: Optional[str] = None
    val_image_root: Optional[str] = None
    test_image_root: Optional[str] = None
    # Image paths (relative or absolute) must lie under the split's image root; true lifts the check.
    allow_outside_root: bool = False
    # vqav2 file naming; fields {split} (the questions file's data_subtype, e.g. train2014) and {image_id}
    image_template: Optional[str] = None
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # sharegpt: a LLaMA-Factory dataset_info.json and the entry to read (its file_name, columns and tags;
    # data.path, data.columns and data.tags set here take precedence). Images resolve against its directory.
    dataset_info: Optional[str] = None
    dataset_name: Optional[str] = None
    tags: ShareGPTTagsConfig = field(default_factory=ShareGPTTagsConfig)
    # The task of each sample: a registered task, or auto (the run's task for formats made for fixed tasks;
    # inferred per record from its fields for the open formats).
    task: str = "auto"
    # Instruction text. captioning: the instruction; vqa: a template with {question}; text_to_image: a
    # template with {prompt}, {width}, {height}. None: the built-in default of the task.
    prompt_template: Optional[str] = None
    image_marker: Optional[str] = None  # None: the format's own ("<image>" llava, "<|image|>" lumina)
    on_bad_sample: str = "raise"  # raise | skip (skips are counted, logged and reported)
    val_fraction: float = 0.0  # hold out this fraction of train as val when there is no val source
    max_samples: Optional[int] = None  # cap per split (taken before conversion; for quick runs)
    seed: int = 0
    num_workers: int = 0  # processes for datasets.map (0: in-process)
    cache_dir: Optional[str] = None  # datasets cache (None: the datasets default)
    # Pre-tokenization is saved in shards of at most this many records or seconds of encoding; a killed
    # build resumes after its last finished shard (so it loses at most about this many seconds).
    pretokenize_shard_size: int = 512
    pretokenize_shard_seconds: float = 60.0

    # -- samples and tokenization ------------------------------------------------------------------------
    max_length: int = 2048
    packing: bool = False
    # Target side in pixels (multiple of 16; 32 for the lumina layout). None: the checkpoint's VQGAN
    # resolution (512 for Chameleon, 64 for the tiny checkpoint).
    image_size: Optional[int] = None
    image_layout: str = "auto"  # auto | chameleon | lumina (auto: from the checkpoint)
    image_buckets: bool = False  # Lumina aspect-ratio buckets instead of a centre-cropped square
    # Lumina's augmentation: a random crop (inside the bucket) instead of the centre; one per sample, seeded
    # by data.seed and the record, fixed across epochs (images are VQ-encoded once into the cache).
    random_crop: bool = False
    label_mask: Optional[str] = None  # assistant | image | all (None: the task's default)
    cfg_dropout: float = 0.0  # text_to_image: probability of dropping the prompt (classifier-free guidance)

    # -- loaders -----------------------------------------------------------------------------------------
    batch_size: int = 8
    eval_batch_size: int = 8


def _get(cfg: Any, key: str, default=None):
    return getattr(cfg, key, default) if not isinstance(cfg, dict) else cfg.get(key, default)


def check_data_config(cfg: Any) -> None:
    """Raise :class:`DataConfigError` naming the key and the valid choices for an invalid value."""
    from chameleon_ft.data.formats import get_format
    from chameleon_ft.tasks import LABEL_MASKS, get_task, task_names

    fmt = get_format(_get(cfg, "format"))
    _check_format_keys(cfg, fmt)
    task = _get(cfg, "task")
    if task != "auto":
        get_task(task)
        if fmt.tasks is not None and task not in fmt.tasks:
            raise DataConfigError(f"data.format={fmt.name} produces {list(fmt.tasks)} samples, not {task!r}")
    checks = (("task", ("auto", *task_names())), ("on_bad_sample", POLICIES), ("image_layout", IMAGE_LAYOUTS),
              ("label_mask", (None, *LABEL_MASKS)))
    for key, choices in checks:
        value = _get(cfg, key)
        if value not in choices:
            raise DataConfigError(f"data.{key}={value!r} is not valid; choose one of {choices}")
    vf = float(_get(cfg, "val_fraction", 0.0))
    if not 0.0 <= vf < 1.0:
        raise DataConfigError(f"data.val_fraction={vf} must be in [0, 1)")
    cd = float(_get(cfg, "cfg_dropout", 0.0))
    if not 0.0 <= cd <= 1.0:
        raise DataConfigError(f"data.cfg_dropout={cd} must be in [0, 1]")
    ms = _get(cfg, "max_samples")
    if ms is not None and int(ms) < 1:
        raise DataConfigError(f"data.max_samples={ms} must be >= 1 (or null)")
    size = _get(cfg, "image_size")
    if size is not None and int(size) < 16:
        raise DataConfigError(f"data.image_size={size} is too small")


def _set_keys(cfg: Any, key: str) -> list[str]:
    """``data.<key>`` as set (not None), or its set sub-keys for a nested group such as ``tags``."""
    value = _get(cfg, key)
    if value is None:
        return []
    if hasattr(value, "items") or hasattr(value, "__dataclass_fields__"):
        items = value.items() if hasattr(value, "items") else vars(value).items()
        return [f"{key}.{k}" for k, v in items if v is not None]
    return [key]


def _check_format_keys(cfg: Any, fmt) -> None:
    """A key only one format reads (its ``own_keys``) may not be set for another format; then the format's
    own checks (:meth:`Format.check_config`)."""
    from chameleon_ft.data.formats import FORMATS

    for other in FORMATS.values():
        if other is fmt:
            continue
        for key in other.own_keys:
            if key not in fmt.own_keys and _set_keys(cfg, key):
                raise DataConfigError(f"data.{_set_keys(cfg, key)[0]} is read by data.format={other.name} only, "
                                      f"not {fmt.name}")
    fmt.check_config(cfg)
