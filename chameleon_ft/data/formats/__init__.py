"""The data-format registry: one module per input format, each a :class:`Format`.

A format turns one split of its input files into *raw rows* (one per input record, with the record's
position ``_row``), and each raw row into *canonical fields* (``image``, ``question``, ``caption``,
``conversations``, ...; images resolved) that a task (:mod:`chameleon_ft.tasks`) builds a sample from.
It declares the files a split reads (:meth:`Format.split_inputs`): the reader reads exactly those, and the
pre-tokenization cache stamps exactly those, so a new path field cannot be forgotten by the cache.

Adding a format is one module in this package that calls :func:`register_format` (modules are
discovered automatically) plus one YAML in ``conf/data/``.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import datasets

from chameleon_ft.data.conversation import MarkerRules
from chameleon_ft.data.errors import BadSampleError, DataConfigError, DataFormatError
from chameleon_ft.data.sample import ImageRef
from chameleon_ft.registry import Registry

# Canonical flat-record fields a column mapping may rename (data.columns.<field>=<column>).
CANONICAL_FIELDS = ("image", "images", "caption", "references", "question", "answer", "answers", "prompt",
                    "conversations", "system", "id")
CHAMELEON_IMAGE_SIZE = 512
SPLIT_PATH_KEYS = {"train": "path", "val": "val_path", "test": "test_path"}
SPLIT_ROOT_KEYS = {"train": "image_root", "val": "val_image_root", "test": "test_image_root"}


@dataclass(frozen=True)
class SplitInputs:
    """The files one split reads (role -> path) and whether the split is a holdout of the train source."""

    files: dict[str, str]
    holdout: bool = False


@dataclass(frozen=True)
class RowContext:
    """What converting one raw row needs (plain values: it crosses process boundaries in ``datasets.map``)."""

    format: str
    task: str  # data.task: "auto" or a task name
    file: str  # the input file named in errors
    image_root: str
    columns: dict[str, str] = field(default_factory=dict)
    prompt_template: str | None = None
    image_size: int = 512
    rules: MarkerRules = field(default_factory=MarkerRules)
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific settings
    allow_outside_root: bool = False  # data.allow_outside_root

    def resolve_image(self, value: Any, index: int) -> ImageRef:
        """One image of record ``index`` (see :func:`resolve_image`), under this split's root and policy."""
        return resolve_image(value, self.image_root, self.file, index, allow_outside_root=self.allow_outside_root)

    def resolve_images(self, value: Any, index: int) -> list[ImageRef]:
        """A record's image field, one path or a list (see :func:`resolve_images`)."""
        return resolve_images(value, self.image_root, self.file, index, allow_outside_root=self.allow_outside_root)


class Format:
    """Base class of a data format; subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    description: ClassVar[str]
    tasks: ClassVar[tuple[str, ...] | None] = None  # the tasks it can produce; None: any
    rules: ClassVar[MarkerRules] = MarkerRules()
    # The image scorer (chameleon_ft.evaluation.image_scorers) that judges generated images of this data.
    image_scorer: ClassVar[str | None] = None
    own_keys: ClassVar[tuple[str, ...]] = ()  # data.* keys only this format reads (others refuse them set)

    def check_config(self, cfg) -> None:
        """Format-specific checks of ``data.*`` at compose time (default: none)."""

    # -- which files a split reads ------------------------------------------------------------------------
    def split_inputs(self, cfg, split: str) -> SplitInputs:
        """Default: ``path`` / ``val_path`` / ``test_path``; without a val source and with
        ``val_fraction > 0``, val (and train) are the two parts of a holdout of ``path``."""
        source = getattr(cfg, SPLIT_PATH_KEYS[split])
        holdout_wanted = getattr(cfg, "val_path") is None and float(cfg.val_fraction) > 0
        if split == "train":
            if source is None:
                raise DataConfigError(f"data.format={self.name}: set data.path")
            return SplitInputs({"path": _expand(source)}, holdout=holdout_wanted)
        if source is None and split == "val" and holdout_wanted:
            return SplitInputs({"path": _expand(cfg.path)}, holdout=True)
        if source is None:
            hint = " or data.val_fraction" if split == "val" else ""
            raise DataConfigError(f"data.format={self.name}: no source for split {split!r}; "
                                  f"set data.{SPLIT_PATH_KEYS[split]}{hint}")
        return SplitInputs({"path": _expand(source)})

    def split_holdout(self, cfg, split: str, inputs: SplitInputs) -> bool:
        """Whether the rows read for ``split`` are cut by the holdout (default: as ``split_inputs`` said)."""
        return inputs.holdout

    def fingerprint(self, cfg, split: str) -> list:
        """What identifies the split's input data for the cache key: size and mtime of every input file."""
        return [[role, *path_stamps(path)] for role, path in sorted(self.split_inputs(cfg, split).files.items())]

    # -- reading ------------------------------------------------------------------------------------------
    def raw(self, cfg, split: str, inputs: SplitInputs, task: str) -> datasets.Dataset:
        """One row per input record, with its position ``_row`` (and ``_error`` for unreadable records)."""
        raise NotImplementedError(f"format {self.name} does not define raw()")

    def context(self, cfg, split: str, inputs: SplitInputs) -> RowContext:
        """The settings converting a row of this split needs."""
        main = inputs.files.get("path", "")
        return RowContext(format=self.name, task=str(cfg.task), file=main,
                          image_root=image_root(cfg, split, _base_dir(main)), columns=column_map(cfg.columns),
                          prompt_template=cfg.prompt_template,
                          # Unresolved (read without a checkpoint): Chameleon's own resolution.
                          image_size=int(cfg.image_size or CHAMELEON_IMAGE_SIZE),
                          rules=replace(self.rules, marker=cfg.image_marker or self.rules.marker),
                          allow_outside_root=bool(getattr(cfg, "allow_outside_root", False)))

    def fields(self, row: dict, ctx: RowContext) -> dict:
        """Canonical fields of one raw row (images resolved against ``ctx.image_root``)."""
        raise NotImplementedError(f"format {self.name} does not define fields()")


FORMATS: Registry[Format] = Registry("data format", "data.format", DataConfigError)


def register_format(cls: type[Format]) -> type[Format]:
    """Class decorator: add an instance of ``cls`` to the registry under ``cls.name``."""
    FORMATS.register(cls.name, cls())
    return cls


def format_names() -> list[str]:
    """Every registered format, sorted."""
    return FORMATS.names()


def get_format(name: str) -> Format:
    """The registered format ``name``; raises :class:`DataConfigError` listing the valid names."""
    return FORMATS.get(name)


# --- helpers for format modules ----------------------------------------------------------------------------
def _expand(path) -> str:
    return os.path.expanduser(str(path))


def _base_dir(path: str) -> str:
    if not path:
        return os.getcwd()
    return path if Path(path).is_dir() else os.path.dirname(os.path.abspath(path))


def image_root(cfg, split: str, base_dir: str) -> str:
    """The split's image root, else ``data.image_root``, else ``base_dir`` (the annotation file's directory)."""
    root = getattr(cfg, SPLIT_ROOT_KEYS[split]) or cfg.image_root
    return os.path.abspath(os.path.expanduser(root)) if root else base_dir


def column_map(columns) -> dict[str, str]:
    """``data.columns`` as ``{canonical field: column}`` (unset fields left out); unknown fields are refused."""
    if columns is None:
        return {}
    items = columns.items() if hasattr(columns, "items") else vars(columns).items()
    out = {str(k): str(v) for k, v in items if v is not None}
    unknown = set(out) - set(CANONICAL_FIELDS)
    if unknown:
        raise DataConfigError(f"data.columns has unknown fields {sorted(unknown)}; known: {list(CANONICAL_FIELDS)}")
    return out


def mapped(record: dict, columns: dict[str, str]) -> dict:
    """The canonical fields of a flat record under a column mapping (fields not mapped use their own name)."""
    return {f: record.get(columns.get(f, f)) for f in CANONICAL_FIELDS}


def path_stamps(path: str) -> list:
    """``[path, size, mtime_ns]`` of a file, or of every file under a directory (sorted); ``[path, None]`` if absent."""
    p = Path(path)
    if p.is_dir():
        out: list = [str(p.resolve())]
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            st = f.stat()
            out.append([str(f.relative_to(p)), st.st_size, st.st_mtime_ns])
        return out
    if p.exists():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    return [str(p), None]


def resolve_image(value: Any, root: str, file: str, index: int, *, allow_outside_root: bool = False) -> ImageRef:
    """A path (relative to ``root``), encoded bytes, or a datasets Image dict ``{"bytes", "path"}``, checked to
    be a readable file. A path outside ``root`` (absolute, or escaping it with ``..``) is refused unless
    ``allow_outside_root``: a record must not pull in arbitrary files of the machine."""
    if isinstance(value, ImageRef):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return ImageRef(data=bytes(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)) and value:
        return ImageRef(data=bytes(value))
    if not isinstance(value, str) or not value.strip():
        raise BadSampleError(file, index, "bad_record", f"image must be a non-empty path, got {value!r}")
    path = os.path.normpath(os.path.join(root, os.path.expanduser(value)))
    if not allow_outside_root and not _inside(path, root):
        raise BadSampleError(file, index, "outside_root", f"image {value!r} is {path}, outside the image root {root}; "
                             "set data.image_root to a folder that holds it, or data.allow_outside_root=true")
    _check_image_file(path, root, file, index)
    return ImageRef(path=path)


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` lies under ``root``, by the names alone (a symlink inside the root is the user's choice)."""
    root = os.path.abspath(root)
    return os.path.commonpath([root, os.path.abspath(path)]) == root


def _check_image_file(path: str, root: str, file: str, index: int) -> None:
    """A regular file; a missing file, a dangling link and a symlink loop are told apart."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        detail = (f"{path} is a symlink to {os.readlink(path)}, which does not exist" if os.path.islink(path)
                  else f"{path} does not exist (image_root={root})")
        raise BadSampleError(file, index, "missing_image", detail) from None
    except OSError as e:
        what = "is a symlink loop" if e.errno == errno.ELOOP else f"cannot be read ({e.strerror})"
        raise BadSampleError(file, index, "bad_image", f"{path} {what}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadSampleError(file, index, "bad_image", f"{path} is not a file")


def resolve_images(value: Any, root: str, file: str, index: int, *, allow_outside_root: bool = False) -> list[ImageRef]:
    """A record's image field (one path or a list) as resolved images."""
    if value is None:
        return []
    if isinstance(value, (str, dict, bytes, ImageRef)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise BadSampleError(file, index, "bad_record",
                             f"image must be a path or a list of paths, got {type(value).__name__}")
    return [resolve_image(v, root, file, index, allow_outside_root=allow_outside_root) for v in value if v is not None]


def flat_fields(rec: dict, ctx: RowContext, index: int) -> dict:
    """Canonical fields of a flat record (jsonl, hf_dataset) after the column mapping, images resolved."""
    fields = mapped(rec, ctx.columns)
    images = fields["images"] if fields["images"] is not None else fields["image"]
    refs = ctx.resolve_images(images, index)
    fields["image"] = refs[0] if refs else None
    fields["images"] = refs
    # Keys the record really has, for errors that name what is there.
    fields["_keys"] = sorted(k for k in rec if not k.startswith("_"))
    return fields


def dataset_from_generator(gen, gen_kwargs: dict, features: datasets.Features, cache_dir: str | None) -> datasets.Dataset:
    """``Dataset.from_generator``, re-raising our own errors instead of datasets' generic wrapper; a generator
    that yields nothing (an empty file) gives an empty dataset (datasets itself refuses to build one)."""
    try:
        return datasets.Dataset.from_generator(gen, gen_kwargs=gen_kwargs, features=features, cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, (DataFormatError, BadSampleError)):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
    except ValueError:
        if next(iter(gen(**gen_kwargs)), None) is not None:
            raise
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features)


JSON_ROW_FEATURES = datasets.Features({"_row": datasets.Value("int64"), "raw": datasets.Value("string"),
                                       "_error": datasets.Value("string")})


Registry.discover(__name__, __path__)
