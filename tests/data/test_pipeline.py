"""The pre-tokenization cache (``tokenized_split``), bad input through it, CFG dropout and packed loaders.

Every test keeps its cache under ``tmp_path`` (``data.cache_dir``), so nothing depends on a shared cache.
"""

import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from chameleon_ft.data import pipeline
from chameleon_ft.data.config import DataConfig
from chameleon_ft.data.errors import BadSampleError, BadSamplePolicy
from chameleon_ft.data.pipeline import TrainingSamples, cache_key, tokenized_split
from chameleon_ft.data.tokenize import ConversationEncoder

QUESTION = "What digit is this?"


def digits_cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(**{"format": "digits", "task": "vqa", "image_size": 64, "max_samples": 10,
                         "cache_dir": str(tmp_path / "cache"), **kw})


def cache_dirs(cfg) -> list[str]:
    root = Path(cfg.cache_dir)
    return sorted(p.name for p in root.iterdir() if (p / "DONE.json").exists()) if root.exists() else []


def rows(ds: datasets.Dataset) -> list[dict]:
    return ds.to_list()


# --- images of every kind ---------------------------------------------------------------------------------
def base_image(seed=0, size=64) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.full((size, size, 3), 255, dtype=np.uint8)
    arr[8:40, 16:48] = rng.integers(0, 120, size=(32, 32, 3))
    return Image.fromarray(arr)


def write_images(folder: Path) -> dict[str, str]:
    """Good, broken and converted images; returns name -> file name (relative to ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = base_image()
    base.save(folder / "good.png")
    (folder / "not_an_image.png").write_bytes(b"this is a text file, not a PNG\n" * 10)
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    # RGBA: transparent background (black under alpha 0) over an opaque patch -> composited on white
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[8:40, 16:48, :3] = np.asarray(base)[8:40, 16:48]
    rgba[8:40, 16:48, 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    base.save(folder / "rgba_ref.png")  # what the RGBA image is on white
    pal = base.convert("P")
    pal.save(folder / "palette.png")
    pal.convert("RGB").save(folder / "palette_ref.png")
    gray = base.convert("L")
    gray.save(folder / "gray.png")
    gray.convert("RGB").save(folder / "gray_ref.png")
    return {p.stem: p.name for p in folder.iterdir()}


def vqa(image, question=QUESTION, answer="1") -> dict:
    rec = {"question": question, "answer": answer}
    if image is not None:
        rec["image"] = image
    return rec


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


BAD = {  # kind -> (record, reason)
    "undecodable": (vqa("not_an_image.png"), "bad_image"),
    "truncated": (vqa("truncated.png"), "bad_image"),
    "missing": (vqa("does_not_exist.png"), "missing_image"),
    "text_only": (vqa(None), "text_only"),
    "too_long": (vqa("good.png", question="Is it even? " * 30), "too_long"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_sample_raises_naming_file_record_and_reason(tiny_grouped, tmp_path, kind):
    write_images(tmp_path)
    record, reason = BAD[kind]
    path = write_jsonl(tmp_path / "train.jsonl", [vqa("good.png"), record])
    cfg = DataConfig(format="jsonl", path=path, image_size=64, max_length=80, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(BadSampleError) as info:
        tokenized_split(cfg, tiny_grouped, "train", progress=False)
    err = info.value
    assert (err.file, err.record, err.reason) == (path, 1, reason)
    assert str(err).startswith(f"{path}: record 1: {reason}")
    assert not cache_dirs(cfg)  # nothing half-built is published


def test_skip_counts_reports_and_keeps_converted_images(tiny_grouped, tmp_path):
    write_images(tmp_path)
    records = [vqa("good.png")] + [BAD[k][0] for k in sorted(BAD)] + [
        vqa("rgba.png"), vqa("palette.png"), vqa("gray.png"),
        vqa("rgba_ref.png"), vqa("palette_ref.png"), vqa("gray_ref.png")]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = DataConfig(format="jsonl", path=path, image_size=64, max_length=80, on_bad_sample="skip",
                     cache_dir=str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    ds = tokenized_split(cfg, tiny_grouped, "train", run_dir=run_dir, progress=False)
    # records 1..5 are the bad ones (sorted kinds: missing, text_only, too_long, truncated, undecodable)
    assert ds["index"] == [0, 6, 7, 8, 9, 10, 11]
    assert set(ds["source"]) == {path}
    report = BadSamplePolicy.read_report(run_dir / "bad_samples_train.json")
    assert report["total_skipped"] == 5
    assert report["counts"] == {"bad_image": 2, "missing_image": 1, "text_only": 1, "too_long": 1}
    examples = {(e["record"], r) for r, ex in report["examples"].items() for e in ex}
    assert examples == {(1, "missing_image"), (2, "text_only"), (3, "too_long"), (4, "bad_image"),
                        (5, "bad_image")}
    assert all(e["file"] == path for ex in report["examples"].values() for e in ex)
    assert set(report["reasons"]) == set(report["counts"])
    # RGBA (composited on white), palette and grayscale images give the tokens of their RGB equivalents
    by_index = dict(zip(ds["index"], ds["input_ids"]))
    assert by_index[6] == by_index[9] and by_index[7] == by_index[10] and by_index[8] == by_index[11]
    assert by_index[6] == by_index[0]  # the RGBA patch over transparent = the original on white
    assert by_index[8] != by_index[0]
    # a cache hit still hands the report to a new run
    tokenized_split(cfg, tiny_grouped, "train", run_dir=tmp_path / "run2", progress=False)
    assert BadSamplePolicy.read_report(tmp_path / "run2" / "bad_samples_train.json") == report


def test_no_trainable_tokens(tiny_grouped, tmp_path):
    write_images(tmp_path)
    # label_mask=image learns only images of assistant turns: the VQA record has none, text-to-image has one
    path = write_jsonl(tmp_path / "mixed.jsonl", [vqa("good.png"), {"prompt": "a square", "image": "good.png"}])
    kw = dict(format="jsonl", path=path, image_size=64, label_mask="image")
    with pytest.raises(BadSampleError) as info:
        tokenized_split(DataConfig(**kw, cache_dir=str(tmp_path / "c1")), tiny_grouped, "train", progress=False)
    assert (info.value.file, info.value.record, info.value.reason) == (path, 0, "no_trainable_tokens")
    assert "label_mask='image'" in str(info.value)
    ds = tokenized_split(DataConfig(**kw, on_bad_sample="skip", cache_dir=str(tmp_path / "c2")), tiny_grouped,
                         "train", run_dir=tmp_path / "run", progress=False)
    assert ds["index"] == [1] and ds["task"] == ["text_to_image"]
    assert BadSamplePolicy.read_report(tmp_path / "run" / "bad_samples_train.json")["counts"] == {
        "no_trainable_tokens": 1}


# --- cache --------------------------------------------------------------------------------------------------
def count_encodes(monkeypatch, fail_on_call: int | None = None) -> list[list[int]]:
    """Wrap ``ConversationEncoder.encode_batch``; returns the record indices of each call.
    ``fail_on_call`` (1-based) raises there, as a kill in the middle of a build would stop it."""
    calls: list[list[int]] = []
    real = ConversationEncoder.encode_batch

    def wrapper(self, records):
        calls.append([r["index"] for r in records])
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise KeyboardInterrupt("killed")
        return real(self, records)

    monkeypatch.setattr(ConversationEncoder, "encode_batch", wrapper)
    return calls


def test_second_call_is_a_cache_hit(tiny_grouped, tmp_path, monkeypatch):
    cfg = digits_cfg(tmp_path)
    calls = count_encodes(monkeypatch)
    first = tokenized_split(cfg, tiny_grouped, "train", progress=False)
    assert len(first) == 10 and len(calls) == 1
    monkeypatch.setattr(pipeline, "build_encoder", lambda *a, **k: pytest.fail("cache hit must not load the VQGAN"))
    again = tokenized_split(cfg, tiny_grouped, "train", progress=False)
    assert len(calls) == 1
    assert rows(again) == rows(first)
    # loader/collator settings share the cache
    for change in (dict(batch_size=3), dict(eval_batch_size=5), dict(packing=True), dict(cfg_dropout=0.5),
                   dict(num_workers=2)):
        again = tokenized_split(digits_cfg(tmp_path, **change), tiny_grouped, "train", progress=False)
        assert rows(again) == rows(first), change
    assert len(calls) == 1 and len(cache_dirs(cfg)) == 1


def test_changes_that_matter_make_a_new_cache(tiny_grouped, tmp_path):
    cfg = digits_cfg(tmp_path, max_samples=4)
    a = tokenized_split(cfg, tiny_grouped, "train", progress=False)
    b = tokenized_split(digits_cfg(tmp_path, max_samples=4, image_size=32), tiny_grouped, "train", progress=False)
    assert len(cache_dirs(cfg)) == 2
    # 64 px: 4x4 codes -> 4 * 5 + 4 image tokens; 32 px: 2x2 -> 10
    assert [len(x) - len(y) for x, y in zip(a["input_ids"], b["input_ids"])] == [24 - 10] * 4
    c = tokenized_split(digits_cfg(tmp_path, max_samples=4, label_mask="all"), tiny_grouped, "train", progress=False)
    assert c["input_ids"] == a["input_ids"] and c["labels"] != a["labels"]
    assert len(cache_dirs(cfg)) == 3


def test_image_replaced_in_place_rebuilds_the_cache(tiny_grouped, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    base_image(0).save(folder / "a.png")
    base_image(1).save(folder / "b.png")
    path = write_jsonl(tmp_path / "train.jsonl", [vqa("a.png"), vqa("b.png")])

    def cfg(cache):
        return DataConfig(format="jsonl", path=path, image_root=str(folder), image_size=64, max_length=80,
                          cache_dir=str(tmp_path / cache))

    calls = count_encodes(monkeypatch)
    first = rows(tokenized_split(cfg("cache"), tiny_grouped, "train", progress=False))
    assert len(calls) == 1
    tokenized_split(cfg("cache"), tiny_grouped, "train", progress=False)
    assert len(calls) == 1  # unchanged images: a cache hit
    # Same path, new pixels (and a different mtime even on a coarse-clock filesystem).
    base_image(7).save(folder / "a.png")
    st = os.stat(folder / "a.png")
    os.utime(folder / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    with caplog.at_level("WARNING", logger="chameleon_ft.data.pipeline"):
        again = rows(tokenized_split(cfg("cache"), tiny_grouped, "train", progress=False))
    assert len(calls) == 2
    assert "1 image file(s) changed" in caplog.text and "a.png" in caplog.text
    fresh = rows(tokenized_split(cfg("fresh_cache"), tiny_grouped, "train", progress=False))
    assert again == fresh
    assert again[0]["input_ids"] != first[0]["input_ids"] and again[1] == first[1]
    assert len(cache_dirs(cfg("cache"))) == 1  # rebuilt in place, not beside the stale one


def test_cache_key_covers_config_inputs_tokenizer_and_vq_weights(tiny_grouped, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [vqa("x.png")])
    base = DataConfig(format="jsonl", path=path, val_path=path, image_size=64)
    key = cache_key(base, tiny_grouped, "train")
    assert cache_key(base, tiny_grouped, "train") == key
    assert cache_key(base, tiny_grouped, "val") != key
    same = [dict(batch_size=1), dict(eval_batch_size=1), dict(packing=True), dict(cfg_dropout=0.3),
            dict(num_workers=4), dict(cache_dir=str(tmp_path / "elsewhere"))]
    for change in same:
        assert cache_key(DataConfig(**{**vars(base), **change}), tiny_grouped, "train") == key, change
    differ = [dict(image_size=32), dict(label_mask="all"), dict(max_length=100), dict(image_layout="chameleon"),
              dict(image_buckets=True), dict(prompt_template="{question}?"), dict(max_samples=3),
              dict(on_bad_sample="skip"), dict(seed=1)]
    keys = {cache_key(DataConfig(**{**vars(base), **change}), tiny_grouped, "train") for change in differ}
    assert len(keys) == len(differ) and key not in keys
    # OmegaConf (what Hydra passes) and the dataclass give the same key
    assert cache_key(OmegaConf.structured(base), tiny_grouped, "train") == key
    # the input file changed
    os.utime(base.path, ns=(1, 1))
    assert cache_key(base, tiny_grouped, "train") != key
    key = cache_key(base, tiny_grouped, "train")

    def variant(name: str) -> Path:
        """A copy of the checkpoint whose files are links to the original, but for ``name``."""
        out = tmp_path / f"ckpt-{name.replace('/', '_')}"
        shutil.copytree(tiny_grouped, out, copy_function=os.symlink)
        (out / name).unlink()
        shutil.copyfile(tiny_grouped / name, out / name)
        return out

    assert cache_key(base, variant("config.json"), "train") == key  # the links themselves change nothing
    tok = variant("tokenizer.json")
    (tok / "tokenizer.json").write_text(json.dumps(json.loads((tok / "tokenizer.json").read_text()), indent=1))
    assert cache_key(base, tok, "train") != key
    vq = variant("tokenizer/vqgan.ckpt")
    ckpt = torch.load(vq / "tokenizer" / "vqgan.ckpt", weights_only=True)
    ckpt["state_dict"]["quantize.embedding.weight"][0, 0] += 1.0
    torch.save(ckpt, vq / "tokenizer" / "vqgan.ckpt")
    assert cache_key(base, vq, "train") != key


def test_resumes_after_a_kill_and_matches_an_uninterrupted_build(tiny_grouped, tmp_path, monkeypatch):
    cfg = digits_cfg(tmp_path)
    with monkeypatch.context() as m:
        calls = count_encodes(m, fail_on_call=2)
        with pytest.raises(KeyboardInterrupt):
            tokenized_split(cfg, tiny_grouped, "train", shard_size=4, progress=False)
    assert not cache_dirs(cfg)
    first_shard = calls[0]
    calls = count_encodes(monkeypatch)
    resumed = tokenized_split(cfg, tiny_grouped, "train", shard_size=4, progress=False)
    # shard 0 was kept; only shards 1 and 2 were encoded again
    assert len(calls) == 2 and first_shard not in calls
    assert sorted(first_shard + calls[0] + calls[1]) == sorted(resumed["index"])
    whole = tokenized_split(digits_cfg(tmp_path / "b"), tiny_grouped, "train", shard_size=4, progress=False)
    assert rows(resumed) == rows(whole)
    # idempotent: a fresh build (and shard size) gives identical rows
    again = tokenized_split(digits_cfg(tmp_path / "c"), tiny_grouped, "train", shard_size=512, progress=False)
    assert rows(again) == rows(whole)


def test_resumes_after_a_kill_between_shard_data_and_its_stats(tiny_grouped, tmp_path, monkeypatch):
    cfg = digits_cfg(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(os.path.join("shards", "00001.json")):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(pipeline.os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            tokenized_split(cfg, tiny_grouped, "train", shard_size=4, progress=False)
    resumed = tokenized_split(cfg, tiny_grouped, "train", shard_size=4, progress=False)
    whole = tokenized_split(digits_cfg(tmp_path / "b"), tiny_grouped, "train", shard_size=4, progress=False)
    assert rows(resumed) == rows(whole)


# --- classifier-free guidance dropout -----------------------------------------------------------------------
def t2i_rows(n: int) -> datasets.Dataset:
    recs = [{"input_ids": [1, 7, 7, 6, 4, 9, 5, 6], "labels": [-100, -100, -100, -100, 4, 9, 5, 6],
             "uncond_input_ids": [4, 9, 5], "uncond_labels": [4, 9, 5], "extra": i} for i in range(n)]
    return datasets.Dataset.from_list(recs)


def dropped(samples: TrainingSamples) -> list[int]:
    return [i for i in range(len(samples)) if samples[i]["input_ids"] == [4, 9, 5]]


def test_cfg_dropout_is_seeded_reproducible_and_per_epoch():
    ds = t2i_rows(4000)
    a = TrainingSamples(ds, cfg_dropout=0.3, seed=7)
    d0 = dropped(a)
    assert abs(len(d0) / 4000 - 0.3) < 0.03  # 4 standard deviations
    assert dropped(TrainingSamples(ds, cfg_dropout=0.3, seed=7)) == d0
    assert dropped(TrainingSamples(ds, cfg_dropout=0.3, seed=8)) != d0
    a.set_epoch(1)
    d1 = dropped(a)
    assert d1 != d0 and abs(len(d1) / 4000 - 0.3) < 0.03
    b = TrainingSamples(ds, cfg_dropout=0.3, seed=7)
    b.set_epoch(1)
    assert dropped(b) == d1
    # dropped samples are the unconditional form: input and labels both the image span
    assert a[d1[0]] == {"input_ids": [4, 9, 5], "labels": [4, 9, 5]}
    kept = next(i for i in range(4000) if i not in set(d1))
    assert a[kept] == {"input_ids": [1, 7, 7, 6, 4, 9, 5, 6], "labels": [-100, -100, -100, -100, 4, 9, 5, 6]}
    assert dropped(TrainingSamples(ds, cfg_dropout=0.0)) == []
    assert len(dropped(TrainingSamples(ds, cfg_dropout=1.0))) == 4000
    assert a.lengths == [8] * 4000


def test_cfg_dropout_never_touches_samples_without_an_uncond_form():
    ds = datasets.Dataset.from_list([{"input_ids": [1, 2, 6], "labels": [-100, 2, 6], "uncond_input_ids": [],
                                      "uncond_labels": []}] * 50)
    samples = TrainingSamples(ds, cfg_dropout=1.0)
    assert all(samples[i]["input_ids"] == [1, 2, 6] for i in range(50))


def test_real_text_to_image_uncond_form_is_the_image_span(tiny_grouped, tmp_path):
    ds = tokenized_split(digits_cfg(tmp_path, task="text_to_image", max_samples=4), tiny_grouped, "train", progress=False)
    vocab = json.loads((tiny_grouped / "config.json").read_text())["vocabulary_map"]
    boi, eoi = vocab["<racm3:break>"], vocab["<eoss>"]
    for row in ds:
        ids = row["input_ids"]
        span = ids[ids.index(boi) : ids.index(eoi) + 1]
        assert row["uncond_input_ids"] == span and row["uncond_labels"] == span
        assert len(span) == 24
    samples = TrainingSamples(ds, cfg_dropout=1.0)
    assert samples[0] == {"input_ids": ds[0]["uncond_input_ids"], "labels": ds[0]["uncond_labels"]}


# --- packing through the training loaders --------------------------------------------------------------------
def test_packed_loader_has_4d_masks_and_every_sample_once_per_epoch(tiny_grouped, tmp_path):
    from chameleon_ft.training.dataloading import build_dataloaders

    data = digits_cfg(tmp_path, max_samples=12, packing=True, max_length=128, batch_size=2, eval_batch_size=4)
    cfg = OmegaConf.create({"data": OmegaConf.structured(data), "seed": 3})
    train, val = build_dataloaders(cfg, str(tiny_grouped), world_size=1, rank=0)
    ds = tokenized_split(data, tiny_grouped, "train", progress=False)
    expected = Counter(tuple(x) for x in ds["input_ids"])
    assert max(len(x) for x in ds["input_ids"]) * 2 <= 128  # so rows really hold several samples
    epochs = []
    for epoch in range(2):
        seen: Counter = Counter()
        order = []
        for batch in train:
            mask, si = batch["attention_mask"], batch["sample_index"]
            B, T = batch["input_ids"].shape
            assert mask.shape == (B, 1, T, T) and mask.dtype == torch.bool
            for r in range(B):
                s = si[r]
                same = (s[:, None] == s[None, :]) & (s[:, None] >= 0)
                want = (same & torch.ones(T, T, dtype=torch.bool).tril()) | torch.diag(s < 0)
                assert torch.equal(mask[r, 0], want)
                for k in s[s >= 0].unique().tolist():
                    pos = (s == k).nonzero().flatten()
                    assert torch.equal(batch["position_ids"][r, pos], torch.arange(len(pos)))
                    ids = tuple(batch["input_ids"][r, pos].tolist())
                    seen[ids] += 1
                    order.append(ids)
                n_real = int((s >= 0).sum())  # packed samples first, padding only at the end of the row
                assert n_real > 0 and (s[:n_real] >= 0).all() and (s[n_real:] < 0).all()
            assert any(len(si[r][si[r] >= 0].unique()) > 1 for r in range(B))
        assert seen == expected
        epochs.append(order)
    assert epochs[0] != epochs[1]  # reshuffled per epoch, still each sample once
    for batch in val:  # validation is not packed
        assert batch["attention_mask"].dim() == 2


def test_image_size_defaults_to_the_checkpoints_vq_resolution(tiny_grouped, tmp_path):
    from chameleon_ft.config.store import compose
    from chameleon_ft.data.pipeline import with_checkpoint_defaults

    user = compose(["recipe=vqa", "data=llava", f"data.path={tmp_path / 'train.json'}"]).data
    assert user.image_size is None  # nothing says 512 for a checkpoint whose VQGAN is 64 px
    assert with_checkpoint_defaults(user, tiny_grouped).image_size == 64
    assert with_checkpoint_defaults(OmegaConf.merge(user, {"image_size": 128}), tiny_grouped).image_size == 128
    assert with_checkpoint_defaults(DataConfig(format="jsonl"), tiny_grouped).image_size == 64


def test_poor_vq_reconstruction_is_reported(tiny_grouped, tmp_path, caplog):
    """Colour noise on the digits-fitted tiny VQGAN comes back as something else: say so; digits do not warn."""
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    path = write_jsonl(tmp_path / "photos.jsonl", [vqa(f"{i}.png") for i in range(4)])
    with caplog.at_level("INFO"):
        tokenized_split(DataConfig(format="jsonl", path=path, image_size=64, cache_dir=str(tmp_path / "c")),
                        tiny_grouped, "train", progress=False)
        tokenized_split(digits_cfg(tmp_path, max_samples=8), tiny_grouped, "train", progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "reconstructs" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("jsonl train: the VQGAN reconstructs 4 images at")
    assert any("digits train: the VQGAN reconstructs 8 images" in r.getMessage() and r.levelname == "INFO"
               for r in caplog.records)
    from chameleon_ft.data.pipeline import cache_summary

    quality = cache_summary(digits_cfg(tmp_path, max_samples=8), tiny_grouped, "train")["vq_reconstruction"]
    assert quality["psnr"] > quality["flat_color_psnr"] + 2
