"""The tiny base's pretraining: only TRAIN-split digits reach it (checked by image content), its documents,
and that it really learned to read digits it never saw."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from chameleon_ft.data.formats import digits
from chameleon_ft.data.image_layout import image_to_ids
from chameleon_ft.model.checkpoint import load_model, load_tokenizer
from chameleon_ft.model.tokens import ChameleonTokens
from chameleon_ft.tiny import build
from chameleon_ft.tiny.pretrain import PretrainSettings, lr_factor, pretraining_documents, pretraining_texts
from chameleon_ft.vq.preprocess import pil_to_tensor
from chameleon_ft.vq.vqgan import load_meta_vqgan

SKL = load_digits()  # the independent reference: scans and labels straight from scikit-learn


def renders(split: str) -> torch.Tensor:
    """The split's scans rendered as model inputs, straight from scikit-learn's arrays."""
    return torch.stack([pil_to_tensor(digits.render_digit(SKL.images[i], 64)) for i in digits.split_indices(split)])


def test_a_build_shows_the_base_train_images_only(tmp_path, monkeypatch):
    """Every image the VQGAN is fitted to and every image the model is pretrained on is a train image, all
    of them are, and none equals a val or test image -- compared by pixels, not by index."""
    seen = {}
    fit, pretrain = build.fit_tiny_vqgan, build.pretrain

    def spy_fit(vqgan, images, **kw):
        seen["fit"] = images.clone()
        return fit(vqgan, images, **{**kw, "decoder_steps": 2})

    def spy_pretrain(model, docs, pad, settings, seed=0):
        seen["docs"] = [list(d) for d in docs]
        return pretrain(model, docs, pad, PretrainSettings(steps=2, batch_size=4), seed=seed)

    monkeypatch.setattr(build, "fit_tiny_vqgan", spy_fit)
    monkeypatch.setattr(build, "pretrain", spy_pretrain)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    out = build.build_tiny_checkpoint(tmp_path / "tiny")
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads  # the caller's state

    train, held_out = renders("train"), torch.cat([renders("val"), renders("test")])
    assert torch.equal(seen["fit"], train)
    flat = lambda t: {x.numpy().tobytes() for x in t}
    assert not flat(seen["fit"]) & flat(held_out)

    # The pretraining documents hold exactly the train images' codes (image then text, text then image).
    vqgan, tokens = load_meta_vqgan(out / "tokenizer"), ChameleonTokens.from_checkpoint(out)
    with torch.no_grad():
        codes = vqgan.encode(train)
    expected = [image_to_ids(c, tokens, "lumina", pixel_size=(64, 64)) for c in codes]
    spans = [d[1 : 1 + len(expected[0])] for d in seen["docs"][0::2]]
    assert spans == expected
    assert [d[-1 - len(expected[0]) : -1] for d in seen["docs"][1::2]] == expected


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


def test_pretraining_documents_pair_each_image_with_its_digit_both_ways(tiny_grouped):
    tok, tokens = load_tokenizer(tiny_grouped), ChameleonTokens.from_checkpoint(tiny_grouped)
    codes = [torch.arange(16).reshape(4, 4), torch.arange(16, 32).reshape(4, 4)]
    docs = pretraining_documents(tok, tokens, codes, [7, 0], "lumina", 64)
    image7 = image_to_ids(codes[0], tokens, "lumina", pixel_size=(64, 64))
    text7 = tok.encode("A handwritten digit: 7 (seven).", add_special_tokens=False)
    assert docs[0] == [tokens.bos, *image7, *text7, tokens.eos]
    assert docs[1] == [tokens.bos, *text7, *image7, tokens.eos]
    assert len(docs) == 4 and tok.decode(docs[3][1 : 1 + len(text7)]).startswith("A handwritten digit: 0 (zero)")
    assert pretraining_texts()[3] == "A handwritten digit: 3 (three)."
    # the texts are none of the fine-tuning prompts: the recipes still have to learn their own format
    assert not any("Draw the digit" in t or "a handwritten digit " in t for t in pretraining_texts())


def test_learning_rate_warms_up_then_decays_to_its_floor():
    s = PretrainSettings(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, s) == pytest.approx(0.1) and lr_factor(9, s) == pytest.approx(1.0)
    assert lr_factor(10, s) == pytest.approx(1.0) and lr_factor(100, s) == pytest.approx(0.1)
    assert lr_factor(55, s) == pytest.approx(0.55)


def test_the_built_base_reads_digits_it_never_saw(tiny_grouped):
    """Pretraining generalises: given a VAL image, the base's most likely digit after "A handwritten digit:"
    is the right one far above chance (10%; the built base reads 54%, a linear probe of the codes 78%)."""
    tok, tokens = load_tokenizer(tiny_grouped), ChameleonTokens.from_checkpoint(tiny_grouped)
    model = load_model(tiny_grouped).eval()
    vqgan = load_meta_vqgan(tiny_grouped / "tokenizer")
    val = digits.split_indices("val")
    with torch.no_grad():
        codes = vqgan.encode(renders("val"))
    prefix = tok.encode("A handwritten digit:", add_special_tokens=False)
    digit_ids = [tok.encode(f" {d}", add_special_tokens=False) for d in range(10)]
    assert all(len(d) == 1 for d in digit_ids)
    rows = torch.tensor([[tokens.bos, *image_to_ids(c, tokens, "lumina", pixel_size=(64, 64)), *prefix] for c in codes])
    with torch.no_grad():
        logits = model(rows).logits[:, -1, [d[0] for d in digit_ids]]
    accuracy = (logits.argmax(-1).numpy() == SKL.target[val]).mean()
    assert accuracy >= 0.45, accuracy
