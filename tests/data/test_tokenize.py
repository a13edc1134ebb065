"""ConversationEncoder on the tiny checkpoint: real image-token ids in inputs and labels, prompts, layouts.

Expected image spans are assembled here from the checkpoint's vocabulary *by token name* and the VQGAN's
codes, independently of :mod:`chameleon_ft.data.image_layout`.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from chameleon_ft.data.config import DataConfig
from chameleon_ft.data.errors import BadSampleError
from chameleon_ft.data.pipeline import build_encoder, label_mask
from chameleon_ft.data.sample import ImageRef
from chameleon_ft.data.tokenize import ConversationEncoder, EncoderOptions
from chameleon_ft.model.assets import CheckpointAssets
from chameleon_ft.model.checkpoint import load_tokenizer
from chameleon_ft.model.tokens import image_token_code
from chameleon_ft.tasks import SampleContext, get_task
from chameleon_ft.vq.preprocess import center_crop_resize, pil_to_tensor, resize_to_bucket
from chameleon_ft.vq.vqgan import load_vqgan

X = -100


@pytest.fixture(scope="module")
def vocab(tiny_grouped):
    return json.loads((tiny_grouped / "config.json").read_text())["vocabulary_map"]


@pytest.fixture(scope="module")
def code_id(vocab):
    return {image_token_code(name): i for name, i in vocab.items() if name.startswith("IMGIMG")}


@pytest.fixture(scope="module")
def vqgan(tiny_grouped):
    return load_vqgan(tiny_grouped, device="cpu")


@pytest.fixture(scope="module")
def text_tok(tiny_grouped):
    return load_tokenizer(tiny_grouped)


def encoder(ckpt, **data):
    """The encoder ``build_encoder`` makes for these data options (checkpoint parts loaded once)."""
    cfg = DataConfig(**{"format": "jsonl", "image_size": 64, **data})
    assets = CheckpointAssets.open(ckpt)
    opts = EncoderOptions(layout=assets.image_layout(cfg.image_layout), image_size=cfg.image_size,
                          buckets=cfg.image_buckets, label_mask=label_mask(cfg), max_length=cfg.max_length,
                          unconditional=True)
    return ConversationEncoder(assets.tokenizer, assets.tokens, assets.vqgan("cpu"), opts)


def t2i(prompt, path, *, width, height, source="", index=-1):
    fields = {"prompt": prompt, "image": ImageRef(path=path), "width": width, "height": height}
    return get_task("text_to_image").conversation(fields, SampleContext(source, index))


def vqa(path, question, answer, *, source="", index=-1):
    fields = {"image": ImageRef(path=path), "question": question, "answer": answer}
    return get_task("vqa").conversation(fields, SampleContext(source, index))


def test_build_encoder_reads_the_data_config(tiny_grouped):
    cfg = DataConfig(format="jsonl", image_size=32, image_buckets=True, label_mask="image", max_length=77)
    assets = CheckpointAssets.open(tiny_grouped)
    enc = build_encoder(cfg, assets, device="cpu")
    # the tiny checkpoint has grouped q/k norm, so "auto" picks Lumina-mGPT's layout
    assert enc.opt == EncoderOptions(layout="lumina", image_size=32, buckets=True, label_mask="image", max_length=77,
                                     unconditional=True)
    assert build_encoder(DataConfig(format="jsonl", image_layout="chameleon"), assets, device="cpu").opt.layout == "chameleon"


def digit_png(path, size=(64, 64), seed=0):
    """A dark-on-white blob image (what the tiny VQGAN was fitted on)."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.full((h, w, 3), 255, dtype=np.uint8)
    y0, x0 = rng.integers(0, h // 3), rng.integers(0, w // 3)
    arr[y0 : y0 + h // 2, x0 : x0 + w // 2] = rng.integers(0, 80)
    Image.fromarray(arr).save(path)
    return str(path)


def lumina_span(vocab, code_id, codes, H, W):
    ids = [vocab["<racm3:break>"], vocab[f"<reserved{8800 + H // 32:05d}>"], vocab[f"<reserved{8800 + W // 32:05d}>"]]
    for row in codes.tolist():
        ids += [code_id[c] for c in row] + [vocab["<reserved08799>"]]
    return ids + [vocab["<eoss>"]]


def codes_of(vqgan, img):
    return vqgan.encode(pil_to_tensor(img).unsqueeze(0))[0]


def test_text_to_image_has_real_image_ids_in_inputs_and_labels(tiny_grouped, tmp_path, vocab, code_id, vqgan,
                                                               text_tok):
    path = digit_png(tmp_path / "a.png")
    conv = t2i("Draw the digit 7", path, width=64, height=64, index=3, source="t2i.jsonl")
    enc = encoder(tiny_grouped, image_layout="lumina")
    [out] = enc.encode_batch([conv.to_record()])
    codes = codes_of(vqgan, center_crop_resize(Image.open(path).convert("RGB"), 64))
    assert codes.shape == (4, 4)
    span = lumina_span(vocab, code_id, codes, 64, 64)
    assert len(span) == 4 * 5 + 4
    prompt = text_tok("Generate an image of 64x64 according to the following prompt:\nDraw the digit 7",
                      add_special_tokens=False)["input_ids"]
    eot = vocab["<reserved08706>"]
    assert out["input_ids"] == [vocab["<s>"], *prompt, eot, *span, eot]
    assert out["labels"] == [X] * (len(prompt) + 2) + span + [eot]
    assert vocab["<image>"] not in out["input_ids"]
    assert out["prompt_ids"] == [vocab["<s>"], *prompt, eot]
    # classifier-free guidance form: the image span alone, learned in full
    assert out["uncond_input_ids"] == span and out["uncond_labels"] == span
    assert (out["task"], out["source"], out["index"]) == ("text_to_image", "t2i.jsonl", 3)
    # label_mask=image: the image span and the end-of-turn that closes the drawing (as Lumina-mGPT learns it)
    [img_only] = encoder(tiny_grouped, image_layout="lumina", label_mask="image").encode_batch([conv.to_record()])
    assert img_only["labels"] == [X] * (len(prompt) + 2) + span + [eot]


def test_text_to_image_prompt_is_rerendered_with_actual_size(tiny_grouped, tmp_path, text_tok):
    path = digit_png(tmp_path / "a.png", size=(100, 100))
    # the reader wrote 512x512 into the prompt; the image is encoded at 64 px
    conv = t2i("a cat", path, width=512, height=512)
    [out] = encoder(tiny_grouped, image_layout="lumina").encode_batch([conv.to_record()])
    text = text_tok.decode(out["prompt_ids"][1:-1])
    assert text == "Generate an image of 64x64 according to the following prompt:\na cat"


def test_vqa_prompt_ends_right_before_the_answer(tiny_grouped, tmp_path, vocab, code_id, vqgan, text_tok):
    path = digit_png(tmp_path / "q.png", size=(80, 64))
    conv = vqa(path, "What digit is this?", "7")
    [out] = encoder(tiny_grouped, image_layout="lumina").encode_batch([conv.to_record()])
    eot = vocab["<reserved08706>"]
    answer = text_tok("7", add_special_tokens=False)["input_ids"]
    n = len(out["prompt_ids"])
    assert out["input_ids"][:n] == out["prompt_ids"]
    assert out["prompt_ids"][-1] == eot
    assert out["input_ids"][n:] == answer + [eot]
    # the image sits in the prompt: real ids in input_ids, -100 in labels
    codes = codes_of(vqgan, center_crop_resize(Image.open(path).convert("RGB"), 64))
    span = lumina_span(vocab, code_id, codes, 64, 64)
    assert out["input_ids"][1 : 1 + len(span)] == span
    assert out["labels"] == [X] * n + answer + [eot]
    assert out["target"] == "7" and out["uncond_input_ids"] == []


def test_bucket_layout_uses_the_chosen_bucket_size(tiny_grouped, tmp_path, vocab, code_id, vqgan, text_tok):
    path = digit_png(tmp_path / "wide.png", size=(128, 40))
    conv = t2i("wide", path, width=64, height=64)
    [out] = encoder(tiny_grouped, image_layout="lumina", image_buckets=True).encode_batch([conv.to_record()])
    # buckets for a 64-px budget (4 patches of 32 px); a 128x40 image keeps the most in 96x32:
    # 128x32 keeps 32/40 = 0.8, 96x32 keeps (96/128)/(32/40) = 0.9375, 64x64 keeps 0.3125
    codes = codes_of(vqgan, resize_to_bucket(Image.open(path).convert("RGB"), (96, 32)))
    assert codes.shape == (2, 6)
    span = lumina_span(vocab, code_id, codes, 32, 96)
    eot = vocab["<reserved08706>"]
    assert out["input_ids"][-len(span) - 1 :] == span + [eot]
    # begin-image, height 32 px (<reserved08801>), width 96 px (<reserved08803>)
    assert span[:3] == [vocab["<racm3:break>"], vocab["<reserved08801>"], vocab["<reserved08803>"]]
    assert out["labels"][-len(span) - 1 :] == span + [eot]
    assert text_tok.decode(out["prompt_ids"][1:-1]).startswith("Generate an image of 96x32 ")


def test_chameleon_layout_is_boi_codes_eoi(tiny_grouped, tmp_path, vocab, code_id, vqgan):
    path = digit_png(tmp_path / "c.png")
    conv = vqa(path, "What digit is this?", "3")
    [out] = encoder(tiny_grouped, image_layout="chameleon").encode_batch([conv.to_record()])
    codes = codes_of(vqgan, Image.open(path).convert("RGB"))
    span = [vocab["<racm3:break>"], *[code_id[c] for c in codes.reshape(-1).tolist()], vocab["<eoss>"]]
    assert len(span) == 16 + 2
    assert out["input_ids"][: 1 + len(span)] == [vocab["<s>"], *span]
    assert vocab["<reserved08799>"] not in out["input_ids"]


def test_bad_samples_come_back_as_errors_in_place(tiny_grouped, tmp_path):
    good = vqa(digit_png(tmp_path / "g.png"), "What digit is this?", "1", source="f.jsonl", index=0).to_record()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    bad = vqa(str(broken), "What digit is this?", "2", source="f.jsonl", index=1).to_record()
    long_q = vqa(digit_png(tmp_path / "l.png"), "Is it even? " * 40, "no", source="f.jsonl", index=2).to_record()
    outs = encoder(tiny_grouped, image_layout="lumina", max_length=64).encode_batch([good, bad, long_q])
    assert isinstance(outs[0], dict) and outs[0]["index"] == 0
    assert isinstance(outs[1], BadSampleError) and (outs[1].file, outs[1].record, outs[1].reason) == (
        "f.jsonl", 1, "bad_image")
    assert str(broken) in str(outs[1])
    assert isinstance(outs[2], BadSampleError) and outs[2].reason == "too_long" and outs[2].record == 2
    assert "max_length=64" in str(outs[2])


def test_images_are_encoded_in_one_batch_per_size(tiny_grouped, tmp_path, monkeypatch):
    enc = encoder(tiny_grouped, image_layout="lumina")
    recs = [vqa(digit_png(tmp_path / f"{i}.png", seed=i), "What digit is this?", "1", index=i).to_record()
            for i in range(3)]
    calls = []
    real = enc.vqgan.encode

    def counting(pixels):
        calls.append(pixels.shape[0])
        return real(pixels)

    monkeypatch.setattr(enc.vqgan, "encode", counting)  # the VQGAN is shared per process: undo after the test
    batched = enc.encode_batch(recs)
    assert calls == [3]
    one_by_one = [enc.encode_batch([r])[0] for r in recs]
    assert [b["input_ids"] for b in batched] == [o["input_ids"] for o in one_by_one]
    assert len({tuple(b["input_ids"]) for b in batched}) > 1  # different images, different tokens
    assert torch.is_tensor(enc.encode_images([Image.open(tmp_path / "0.png")])[0])
