"""Pre-tokenization cache: read a split, VQ-encode every image once, store ids and labels as Arrow.

The cache directory is keyed on the data config, the split, the input files' size and mtime, the
checkpoint's tokenizer and VQ weights (checksums) and this pipeline's version, so a change to any of them
builds a new cache. The image files a cache was built from are stamped too (size, mtime) and checked
on every reuse: an image replaced in place rebuilds the cache. So a stale cache is never reused. It is
written in shards of at most a minute of encoding (configurable), each saved to a temporary directory and
renamed when complete, so a run killed at any moment resumes with the shards it finished, losing at most
one shard's work, and building twice gives the same result. A file lock
lets only one process (e.g. one rank of a multi-GPU run) build or check a cache at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path

import datasets
import torch
from omegaconf import DictConfig, OmegaConf

from chameleon_ft.adapter.files import SampleSettings
from chameleon_ft.data.errors import BadSampleError, BadSamplePolicy, DataConfigError, EmptySplitError
from chameleon_ft.data.formats import get_format
from chameleon_ft.data.reading import read_conversations, sample_task
from chameleon_ft.data.splits import canonical_split
from chameleon_ft.data.tokenize import ConversationEncoder, EncoderOptions
from chameleon_ft.model.assets import CheckpointAssets, as_assets
from chameleon_ft.paths import cache_root as default_cache_root
from chameleon_ft.tasks import LABEL_MASKS, get_task

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1
_reported: set[str] = set()  # caches already announced in this process
IMAGE_STAMPS = "image_stamps.json"
# Keys of DataConfig that do not change the tokenized samples (loader and collator settings).
NOT_IN_KEY = {"batch_size", "eval_batch_size", "num_workers", "packing", "cfg_dropout", "cache_dir",
              "pretokenize_shard_size", "pretokenize_shard_seconds"}
FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "prompt_ids": datasets.List(datasets.Value("int32")),
    "uncond_input_ids": datasets.List(datasets.Value("int32")),
    "uncond_labels": datasets.List(datasets.Value("int32")),
    "target": datasets.Value("string"),
    "task": datasets.Value("string"),
    "meta": datasets.Value("string"),
    "source": datasets.Value("string"),
    "index": datasets.Value("int64"),
})


def with_checkpoint_defaults(data_cfg, assets: CheckpointAssets | str | Path):
    """``data_cfg`` with what defaults to the checkpoint filled in: ``image_size`` (None: the VQGAN's own
    resolution). Returns the same kind of object (a DictConfig or a DataConfig); idempotent."""
    if data_cfg.image_size is not None:
        return data_cfg
    size = as_assets(assets).vq_resolution
    if isinstance(data_cfg, DictConfig):
        out = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
        out.image_size = size
        return out
    return replace(data_cfg, image_size=size)


def label_mask(data_cfg) -> str:
    """``data.label_mask``, or the default of the samples' task (``assistant`` when it is inferred per record)."""
    mask = data_cfg.label_mask
    if mask is None:
        task = sample_task(data_cfg)
        mask = get_task(task).label_mask if task != "auto" else "assistant"
    if mask not in LABEL_MASKS:
        raise DataConfigError(f"data.label_mask={mask!r}; choose one of {LABEL_MASKS}")
    return mask


def sample_settings(data_cfg, assets: CheckpointAssets, task: str) -> SampleSettings:
    """The settings that shaped a run's samples, as saved beside its adapter or model."""
    data_cfg = with_checkpoint_defaults(data_cfg, assets)
    return SampleSettings(
        task=task,
        prompt_template=get_task(task).template(data_cfg.prompt_template),
        image_layout=assets.image_layout(data_cfg.image_layout),
        image_size=int(data_cfg.image_size),
        image_buckets=bool(data_cfg.image_buckets),
        label_mask=label_mask(data_cfg),
        max_length=int(data_cfg.max_length),
    )


def _plain(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if is_dataclass(cfg):
        return asdict(cfg)
    return dict(cfg)


def record_image_paths(records: datasets.Dataset) -> list[str]:
    """Paths of the image files that canonical ``records`` refer to (in-memory images have none)."""
    return [seg["image_path"] for turns in records["turns"] for turn in turns for seg in turn["segments"]
            if seg["image_path"]]


def image_stamps(paths) -> dict[str, list[int] | None]:
    """``{path: [size, mtime_ns]}`` for each distinct path; ``None`` for one that cannot be read."""
    out: dict[str, list[int] | None] = {}
    for p in sorted(set(paths)):
        try:
            st = os.stat(p)
            out[p] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[p] = None
    return out


def changed_images(stamps_file: Path) -> list[str]:
    """Images whose size or mtime differ from ``stamps_file`` (a cache without the file counts as changed)."""
    if not stamps_file.exists():
        return [f"{stamps_file.name} missing"]
    old = json.loads(stamps_file.read_text())
    now = image_stamps(old)
    return [p for p in old if now[p] != old[p]]


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def cache_key(data_cfg, assets: CheckpointAssets | str | Path, split: str) -> str:
    """Hex key of everything the tokenized ``split`` depends on: the data config, the format's fingerprint
    of its input files, the tokenizer, the VQ weights and the image layout."""
    assets = as_assets(assets)
    data_cfg = with_checkpoint_defaults(data_cfg, assets)
    data = _plain(data_cfg)
    parts = {
        "version": PIPELINE_VERSION,
        "split": split,
        "data": {k: v for k, v in sorted(data.items()) if k not in NOT_IN_KEY},
        "task": sample_task(data_cfg),
        "label_mask": label_mask(data_cfg),
        "inputs": get_format(data_cfg.format).fingerprint(data_cfg, split),
        "tokenizer": assets.tokenizer_checksum,
        "vq": assets.vq_checksum,
        "layout": assets.image_layout(data_cfg.image_layout),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_root(data_cfg) -> Path:
    """Where pre-tokenized splits go: ``data.cache_dir`` or ``<cache root>/pretokenized``."""
    return Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else default_cache_root() / "pretokenized"


def cache_summary(data_cfg, assets: CheckpointAssets | str | Path, split: str) -> dict:
    """What the finished cache of ``split`` recorded (shards, skipped samples, VQ reconstruction); {} if none."""
    assets = as_assets(assets)
    data_cfg = with_checkpoint_defaults(data_cfg, assets)
    done = split_cache_dir(data_cfg, assets, canonical_split(split)) / "DONE.json"
    return json.loads(done.read_text()) if done.is_file() else {}


def split_cache_dir(data_cfg, assets: CheckpointAssets, split: str) -> Path:
    """The cache directory of one split of ``data_cfg`` (completed with the checkpoint's defaults)."""
    return cache_root(data_cfg) / f"{data_cfg.format}-{split}-{cache_key(data_cfg, assets, split)}"


def build_encoder(data_cfg, assets: CheckpointAssets | str | Path, device=None) -> ConversationEncoder:
    """Text tokenizer + VQGAN encoder of the checkpoint, configured from ``data_cfg``."""
    assets = as_assets(assets)
    data_cfg = with_checkpoint_defaults(data_cfg, assets)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts = EncoderOptions(
        layout=assets.image_layout(data_cfg.image_layout),
        image_size=int(data_cfg.image_size),
        buckets=bool(data_cfg.image_buckets),
        label_mask=label_mask(data_cfg),
        max_length=int(data_cfg.max_length),
        unconditional=True,  # cheap to store; lets cfg_dropout change without rebuilding the cache
        random_crop=bool(data_cfg.random_crop),
        seed=int(data_cfg.seed),
    )
    return ConversationEncoder(assets.tokenizer, assets.tokens, assets.vqgan(device), opts)


def empty_samples() -> datasets.Dataset:
    """A tokenized split without rows (``Dataset.from_list([])`` cannot know the columns)."""
    return datasets.Dataset.from_dict({k: [] for k in FEATURES}, features=FEATURES)


def tokenized_split(data_cfg, assets: CheckpointAssets | str | Path, split: str, *, run_dir: str | Path | None = None,
                    shard_size: int | None = None, shard_seconds: float | None = None, device=None,
                    progress: bool = True) -> datasets.Dataset:
    """The tokenized ``split``, from the cache or built into it first.

    Columns: ``input_ids``, ``labels`` (-100 = not trained), ``prompt_ids`` (the sequence before the last
    assistant turn), ``target`` (its text), ``uncond_input_ids``/``uncond_labels`` (text-to-image
    classifier-free-guidance form), ``task``, ``meta`` (JSON), ``source``, ``index``. Bad samples follow
    ``data_cfg.on_bad_sample``; skipped ones are reported in ``<run_dir>/bad_samples_<split>.json``. A split
    with no usable sample raises :class:`EmptySplitError`.

    The build is saved in shards of at most ``shard_size`` records (``data.pretokenize_shard_size``) or
    ``shard_seconds`` of encoding (``data.pretokenize_shard_seconds``), whichever comes first: a killed
    build resumes after its last finished shard.
    """
    from filelock import FileLock

    split = canonical_split(split)
    assets = as_assets(assets)
    data_cfg = with_checkpoint_defaults(data_cfg, assets)
    shard_size = int(shard_size if shard_size is not None else getattr(data_cfg, "pretokenize_shard_size", 512))
    shard_seconds = float(shard_seconds if shard_seconds is not None
                          else getattr(data_cfg, "pretokenize_shard_seconds", 60.0))
    if shard_size < 1 or shard_seconds < 0:
        raise DataConfigError(f"data.pretokenize_shard_size={shard_size} must be >= 1 and "
                              f"data.pretokenize_shard_seconds={shard_seconds} >= 0")
    root = split_cache_dir(data_cfg, assets, split)
    done = root / "DONE.json"
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if done.exists():
            changed = changed_images(root / IMAGE_STAMPS)
            if changed:
                log.warning("%s %s: %d image file(s) changed since the cache %s was built (e.g. %s); rebuilding it",
                            data_cfg.format, split, len(changed), root, ", ".join(changed[:3]))
                shutil.rmtree(root)
        if not done.exists():
            _build(data_cfg, assets, split, root, ShardLimits(shard_size, shard_seconds), device, progress)
    summary = json.loads(done.read_text())
    shards = [datasets.load_from_disk(str(root / "shards" / s)) for s in summary["shards"]]
    ds = datasets.concatenate_datasets(shards) if shards else empty_samples()
    report = summary["bad_samples"]
    if report["total_skipped"]:
        log.warning("%s %s: %d sample(s) were skipped when the cache was built (%s); report: %s",
                    data_cfg.format, split, report["total_skipped"], report["counts"], root / "bad_samples.json")
        if run_dir is not None:
            dst = Path(run_dir) / f"bad_samples_{split}.json"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / "bad_samples.json", dst)
    if len(ds) == 0:
        raise EmptySplitError.for_split(summary.get("file", data_cfg.format), split, summary.get("records_read", 0),
                                        report["counts"], root / "bad_samples.json")
    if str(root) not in _reported:  # training's loaders and the evaluators ask for the same split
        _reported.add(str(root))
        log.info("%s %s: %d tokenized samples from %s", data_cfg.format, split, len(ds), root)
    return ds


@dataclass(frozen=True)
class ShardLimits:
    """A shard is closed after ``records`` records or ``seconds`` of encoding, whichever comes first."""

    records: int = 512
    seconds: float = 60.0


# Records encoded per call: the image tokenizer's own batch, and the granularity of the time limit.
ENCODE_BATCH = 32


def _finished_shards(shards_dir: Path) -> list[dict]:
    """Stats of the shards an earlier (killed) build finished, in order; each covers records
    ``[start, end)`` right after the previous one. Anything after the first gap is removed."""
    found, expect = [], 0
    while True:
        name = f"{len(found):05d}"
        stats_file = shards_dir / f"{name}.json"
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        has_data = (shards_dir / name).is_dir() or stats.get("samples") == 0
        if not has_data or stats.get("start") != expect:
            break
        found.append({**stats, "name": name})
        expect = stats["end"]
    for p in shards_dir.iterdir():  # a shard published without its stats, or one of an older layout
        if p.name.split(".")[0] in {s["name"] for s in found}:
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return found


def _save_shard(shards_dir: Path, name: str, samples: list[dict], stats: dict) -> None:
    """Publish one shard: data to a temporary directory renamed into place, then its stats. A shard whose
    every record was bad has stats only (datasets cannot load a saved dataset without rows)."""
    if samples:
        tmp = shards_dir / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        quiet = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # one bar for the whole build, not one per shard
        try:
            datasets.Dataset.from_list(samples, features=FEATURES).save_to_disk(str(tmp))
        finally:
            if quiet:
                datasets.enable_progress_bars()
        os.replace(tmp, shards_dir / name)
    stats_tmp = shards_dir / f"{name}.json.tmp"
    stats_tmp.write_text(json.dumps(stats))
    os.replace(stats_tmp, shards_dir / f"{name}.json")


def _build(data_cfg, assets: CheckpointAssets, split, root: Path, limits: ShardLimits, device, progress: bool) -> None:
    from tqdm.auto import tqdm

    policy = BadSamplePolicy(data_cfg.on_bad_sample)
    records = read_conversations(data_cfg, split, policy)
    read = len(records) + policy.total
    encoder = build_encoder(data_cfg, assets, device)
    shards_dir = root / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    # Stamped before encoding: an image changed during the build is caught at the next reuse.
    _write_json_atomic(root / IMAGE_STAMPS, image_stamps(record_image_paths(records)))
    bar = tqdm(total=len(records), desc=f"pre-tokenizing {data_cfg.format} {split}", disable=not progress)
    finished = _finished_shards(shards_dir)
    for stats in finished:  # kept from an earlier (killed) run
        for err in stats["errors"]:
            policy.handle(BadSampleError.from_dict(err))
    names = [s["name"] for s in finished]
    with_rows = [s["name"] for s in finished if s["samples"]]
    start = finished[-1]["end"] if finished else 0
    bar.update(start)
    while start < len(records):
        samples, errors, end = [], [], start
        began = time.monotonic()
        while end < len(records) and end - start < limits.records and (
                end == start or time.monotonic() - began < limits.seconds):
            batch = range(end, min(len(records), end + ENCODE_BATCH, start + limits.records))
            for out in encoder.encode_batch([records[i] for i in batch]):
                if isinstance(out, BadSampleError):
                    policy.handle(out)  # raises under on_bad_sample=raise
                    errors.append(out.to_dict())
                else:
                    samples.append(out)
            end = batch.stop
            bar.update(len(batch))
        name = f"{len(names):05d}"
        _save_shard(shards_dir, name, samples, {"start": start, "end": end, "samples": len(samples), "errors": errors})
        names.append(name)
        if samples:
            with_rows.append(name)
        start = end
    bar.close()
    policy.write_report(root / "bad_samples.json")
    policy.log_summary(f"{data_cfg.format} {split}")
    quality = check_reconstruction(encoder, records, f"{data_cfg.format} {split}")
    fmt = get_format(data_cfg.format)
    file = fmt.context(data_cfg, split, fmt.split_inputs(data_cfg, split)).file
    tmp = root / "DONE.json.tmp"
    tmp.write_text(json.dumps({"shards": with_rows, "bad_samples": policy.to_dict(), "records_read": read, "file": file,
                               "vq_reconstruction": quality}))
    os.replace(tmp, root / "DONE.json")


# Images checked for reconstruction, and how much better than a flat mean-colour image the VQGAN must do.
RECONSTRUCTION_IMAGES = 16
POOR_RECONSTRUCTION_DB = 2.0


def check_reconstruction(encoder: ConversationEncoder, records: datasets.Dataset, what: str) -> dict | None:
    """Encode and decode the first images of ``records`` with the checkpoint's VQGAN; log the PSNR and warn
    when it is poor (images unlike the VQGAN's training data: the model then sees noise, not the pictures)."""
    from chameleon_ft.data.images import open_image
    from chameleon_ft.vq.image_tokenizer import reconstruction_quality

    images = []
    for path in record_image_paths(records)[: RECONSTRUCTION_IMAGES * 2]:
        try:
            images.append(open_image(path))
        except BadSampleError:
            continue
        if len(images) == RECONSTRUCTION_IMAGES:
            break
    quality = reconstruction_quality(encoder.image_tokenizer, images)
    if quality is None:
        return None
    line = (f"{what}: the VQGAN reconstructs {int(quality['images'])} images at {quality['psnr']:.1f} dB PSNR "
            f"(worst {quality['min_psnr']:.1f} dB; each image's flat mean colour: {quality['flat_color_psnr']:.1f} dB)")
    if quality["psnr"] < quality["flat_color_psnr"] + POOR_RECONSTRUCTION_DB:
        log.warning("%s. That is poor: the image tokens barely carry these pictures. Is this the checkpoint "
                    "these images need (e.g. the tiny checkpoint only knows handwritten digits)?", line)
    else:
        log.info(line)
    return quality


class TrainingSamples(torch.utils.data.Dataset):
    """Samples for the loader: ``input_ids`` and ``labels``, with seeded classifier-free-guidance dropout.

    With probability ``cfg_dropout`` a text-to-image sample is replaced by its unconditional form. The
    draw depends only on ``(seed, epoch, index)``, so runs -- and resumed runs -- are reproducible.
    """

    def __init__(self, ds: datasets.Dataset, cfg_dropout: float = 0.0, seed: int = 0):
        cols = ["input_ids", "labels", "uncond_input_ids", "uncond_labels"]
        self.ds = ds.with_format(None, columns=cols)
        self.cfg_dropout, self.seed, self.epoch = float(cfg_dropout), int(seed), 0
        self.lengths = [len(x) for x in self.ds["input_ids"]]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ds)

    def drops_condition(self, index: int) -> bool:
        if self.cfg_dropout <= 0:
            return False
        h = hashlib.blake2b(f"{self.seed}:{self.epoch}:{index}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2**64 < self.cfg_dropout

    def __getitem__(self, index: int) -> dict:
        row = self.ds[int(index)]
        if row["uncond_input_ids"] and self.drops_condition(index):
            return {"input_ids": row["uncond_input_ids"], "labels": row["uncond_labels"]}
        return {"input_ids": row["input_ids"], "labels": row["labels"]}
