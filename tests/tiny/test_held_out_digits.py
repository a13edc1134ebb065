"""Only TRAIN-split digits reach the tiny base (checked by image content), and the split is disjoint."""

import numpy as np
import torch
from sklearn.datasets import load_digits

from chameleon_ft.data.formats import digits
from chameleon_ft.tiny import build
from chameleon_ft.vq.preprocess import pil_to_tensor

SKL = load_digits()  # the independent reference: scans and labels straight from scikit-learn


def renders(split: str) -> torch.Tensor:
    """The split's scans rendered as model inputs, straight from scikit-learn's arrays."""
    return torch.stack([pil_to_tensor(digits.render_digit(SKL.images[i], 64)) for i in digits.split_indices(split)])


def test_a_build_shows_the_base_train_images_only(tmp_path, monkeypatch):
    """Every image the VQGAN is fitted to is a train image, all of them are, and none equals a val or test
    image -- compared by pixels, not by index."""
    seen = {}
    fit = build.fit_tiny_vqgan

    def spy_fit(vqgan, images, **kw):
        seen["fit"] = images.clone()
        return fit(vqgan, images, **{**kw, "decoder_steps": 2})

    monkeypatch.setattr(build, "fit_tiny_vqgan", spy_fit)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    build.build_tiny_checkpoint(tmp_path / "tiny")
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads  # the caller's state

    train, held_out = renders("train"), torch.cat([renders("val"), renders("test")])
    assert torch.equal(seen["fit"], train)
    flat = lambda t: {x.numpy().tobytes() for x in t}
    assert not flat(seen["fit"]) & flat(held_out)


def test_the_split_is_disjoint_by_image_content():
    parts = {s: digits.split_indices(s) for s in ("train", "val", "test")}
    scans = {s: {SKL.images[i].tobytes() for i in idx} for s, idx in parts.items()}
    assert not (scans["train"] & scans["val"]) and not (scans["train"] & scans["test"]) and not (scans["val"] & scans["test"])
    assert sum(len(v) for v in scans.values()) == 1797  # no scan repeats inside a split either
    rendered = {s: {digits.render_digit(SKL.images[i], 64).tobytes() for i in idx} for s, idx in parts.items()}
    assert not (rendered["train"] & (rendered["val"] | rendered["test"]))
    # and no held-out scan is a near copy of a train scan (values 0..16; the closest pair differs by > 8)
    train = SKL.images[parts["train"]].reshape(len(parts["train"]), -1)
    for s in ("val", "test"):
        held = SKL.images[parts[s]].reshape(len(parts[s]), -1)
        dist = np.sqrt(((held[:, None, :] - train[None, :, :]) ** 2).sum(-1))
        assert dist.min() > 4.0
