"""Packed training loaders in both layouts: whole samples (image spans intact), and the documents
layout (``sdpa_documents``) trains like the dense mask."""

from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from chameleon_ft.config.store import compose
from chameleon_ft.data.image_layout import image_spans
from chameleon_ft.data.pipeline import tokenized_split
from chameleon_ft.model.assets import CheckpointAssets
from chameleon_ft.training.dataloading import build_dataloaders
from chameleon_ft.training.train import train
from tests.training.test_fsdp import step_losses


def packed_cfg(tmp_path, attn: str, *extra: str):
    cfg = compose(["recipe=debug", f"model.attn_implementation={attn}", "data.packing=true", "data.max_length=256",
                   "data.batch_size=2", "data.max_samples=24", f"data.cache_dir={tmp_path / 'cache'}",
                   "trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
                   "logger.tensorboard=false", "trainer.val_check_interval=null", "eval.max_samples=2",
                   "peft.dropout=0.0", "optim.lr=1e-3", "optim.warmup_steps=1", *extra])
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_documents"])
def test_packed_loaders_keep_every_sample_and_image_span_whole(tiny_grouped, tmp_path, attn):
    cfg = packed_cfg(tmp_path, attn)
    cfg.model.path = str(tiny_grouped)
    assets = CheckpointAssets.open(tiny_grouped)
    train_loader, _ = build_dataloaders(cfg, assets, world_size=1, rank=0)
    ds = tokenized_split(cfg.data, assets, "train", progress=False)
    expected = Counter(tuple(x) for x in ds["input_ids"])
    spans_seen, samples_per_row, seen = 0, [], Counter()
    for batch in train_loader:
        assert ("attention_mask" in batch) == (attn == "sdpa")
        ids, owner = batch["input_ids"], batch["sample_index"]
        for r in range(ids.shape[0]):
            for start, end in image_spans(ids[r].tolist(), assets.tokens):
                span_owner = owner[r, start:end]
                assert (span_owner == span_owner[0]).all() and span_owner[0] >= 0, (start, end)
                spans_seen += 1
            samples_per_row.append(len(owner[r][owner[r] >= 0].unique()))
        for k in owner[owner >= 0].unique().tolist():
            seen[tuple(ids[owner == k].tolist())] += 1
    assert seen == expected  # every sample once, whole
    assert spans_seen == sum(len(image_spans(list(x), assets.tokens)) for x in ds["input_ids"]) > 0
    assert max(samples_per_row) > 2  # the rows (or the one documents row) really hold several samples


def test_documents_layout_trains_like_the_dense_mask(tiny_grouped, tmp_path):
    runs = {}
    for attn in ("sdpa", "sdpa_documents"):
        cfg = packed_cfg(tmp_path, attn, "trainer.max_steps=3")
        cfg.model.path = str(tiny_grouped)
        runs[attn] = tmp_path / attn
        train(cfg, runs[attn])
    dense, docs = step_losses(runs["sdpa"]), step_losses(runs["sdpa_documents"])
    assert sorted(dense) == sorted(docs) == [0, 1, 2]
    for step in dense:
        assert docs[step] == pytest.approx(dense[step], rel=1e-5), step
    from safetensors.torch import load_file

    a = load_file(runs["sdpa"] / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["sdpa_documents"] / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
