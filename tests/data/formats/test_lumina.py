"""Lumina-format records give exactly the ids and labels of Lumina-mGPT's item processor.

Expected sequences are written out here from Lumina-mGPT's rules (the whole conversation is tokenized as
one string, markers replaced by image spans; "<|image|> " per image prepended to the first human turn when
no marker is given; assistant images and their end-of-turn learned) with the tiny checkpoint's tokenizer
and VQGAN, independently of the reader.
"""

import json

import numpy as np
import pytest
from PIL import Image

from chameleon_ft.data.config import DataConfig
from chameleon_ft.data.pipeline import tokenized_split
from chameleon_ft.model.assets import CheckpointAssets
from chameleon_ft.vq.preprocess import center_crop_resize, pil_to_tensor, prepare_image, to_rgb_on_white

X = -100


@pytest.fixture(scope="module")
def assets(tiny_grouped):
    return CheckpointAssets.open(tiny_grouped)


def blob(path, seed, size=(64, 64)):
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.full((h, w, 3), 255, dtype=np.uint8)
    arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(0, 90, 3)
    Image.fromarray(arr).save(path)
    return path


def span(assets, img):
    """Lumina's image tokens: <racm3:break> <size H> <size W>, rows of codes + row end, <eoss>."""
    v = assets.tokens.vocab
    codes = assets.vqgan("cpu").encode(pil_to_tensor(img).unsqueeze(0))[0]
    h, w = codes.shape
    ids = [v["<racm3:break>"], v[f"<reserved{8800 + h * 16 // 32:05d}>"], v[f"<reserved{8800 + w * 16 // 32:05d}>"]]
    code_id = assets.tokens.code_to_id
    for row in codes.tolist():
        ids += [int(code_id[c]) for c in row] + [v["<reserved08799>"]]
    return ids + [v["<eoss>"]]


def tok(assets, text):
    return assets.tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(assets, tmp_path, records, **data):
    tmp_path.mkdir(parents=True, exist_ok=True)
    f = tmp_path / "lumina.json"
    f.write_text(json.dumps(records))
    cfg = DataConfig(format="lumina", path=str(f), image_size=64, max_length=400, cache_dir=str(tmp_path / "c"),
                     **data)
    return tokenized_split(cfg, assets, "train", progress=False)


def square(path):
    return center_crop_resize(Image.open(path).convert("RGB"), 64)


def test_text_next_to_markers_is_kept_verbatim(assets, tmp_path):
    a, b = blob(tmp_path / "a.png", 1), blob(tmp_path / "b.png", 2)
    recs = [
        {"conversations": [{"from": "human", "value": "<|image|>\nWhat is this?"}, {"from": "gpt", "value": "A 7."}],
         "image": ["a.png"]},
        {"conversations": [{"from": "human", "value": "Compare <|image|> and <|image|> please"},
                           {"from": "gpt", "value": "Same."}], "image": ["a.png", "b.png"]},
        {"conversations": [{"from": "human", "value": "What is this? <|image|>"}, {"from": "gpt", "value": "No."}],
         "image": ["b.png"]},
    ]
    rows = encode(assets, tmp_path, recs, image_buckets=False)
    T = assets.tokens
    sa, sb = span(assets, square(a)), span(assets, square(b))
    want = [
        [T.bos, *sa, *tok(assets, "\nWhat is this?"), T.eot, *tok(assets, "A 7."), T.eot],
        [T.bos, *tok(assets, "Compare "), *sa, *tok(assets, " and "), *sb, *tok(assets, " please"), T.eot,
         *tok(assets, "Same."), T.eot],
        [T.bos, *tok(assets, "What is this? "), *sb, T.eot, *tok(assets, "No."), T.eot],
    ]
    assert rows["input_ids"] == want
    for row, ids in zip(rows, want):
        answer = len(ids) - ids[::-1].index(T.eot, 1)  # the assistant turn starts after the first end-of-turn
        assert row["labels"] == [X] * answer + ids[answer:]


def test_unmarked_images_go_first_each_followed_by_a_space(assets, tmp_path):
    a, b = blob(tmp_path / "a.png", 3), blob(tmp_path / "b.png", 4)
    recs = [
        {"conversations": [{"from": "human", "value": "Which digit?"}, {"from": "gpt", "value": "7"}], "image": "a.png"},
        {"conversations": [{"from": "human", "value": "Which differs?"}, {"from": "gpt", "value": "2"}],
         "image": ["a.png", "b.png"]},
    ]
    rows = encode(assets, tmp_path, recs, image_buckets=False)
    T = assets.tokens
    sa, sb = span(assets, square(a)), span(assets, square(b))
    assert rows[0]["input_ids"] == [T.bos, *sa, *tok(assets, " Which digit?"), T.eot, *tok(assets, "7"), T.eot]
    assert rows[1]["input_ids"] == [T.bos, *sa, *tok(assets, " "), *sb, *tok(assets, " Which differs?"), T.eot,
                                    *tok(assets, "2"), T.eot]


def test_drawn_image_and_its_end_of_turn_are_learned(assets, tmp_path):
    a = blob(tmp_path / "a.png", 5)
    recs = [{"conversations": [{"from": "human", "value": "Draw a seven."}, {"from": "gpt", "value": "<|image|>"}],
             "image": ["a.png"]}]
    T = assets.tokens
    sa = span(assets, square(a))
    prompt = [T.bos, *tok(assets, "Draw a seven."), T.eot]
    for mask in ("image", "assistant"):
        [row] = encode(assets, tmp_path / mask, recs, image_buckets=False, label_mask=mask, image_root=str(tmp_path))
        assert row["input_ids"] == prompt + sa + [T.eot]
        assert row["labels"] == [X] * len(prompt) + sa + [T.eot], mask


def palette_with_transparency(path, seed=4, size=(150, 110)):
    """A paletted image whose index 0 is transparent: blocks of ink and holes, not a multiple of the bucket."""
    rng = np.random.default_rng(seed)
    w, h = size
    idx = rng.integers(0, 4, (h // 10 + 1, w // 10 + 1)).repeat(10, 0).repeat(10, 1)[:h, :w].astype(np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette([255, 255, 255, 0, 0, 0, 40, 40, 40, 120, 120, 120] + [0] * (252 * 3))
    img.save(path, transparency=0)
    return path


def test_transparent_images_are_cropped_then_whitened_in_buckets(assets, tmp_path):
    a = palette_with_transparency(tmp_path / "a.png")
    recs = [{"conversations": [{"from": "human", "value": "<|image|>"}, {"from": "gpt", "value": "ok"}],
             "image": ["a.png"]}]
    [row] = encode(assets, tmp_path, recs, image_buckets=True)
    img = Image.open(a)
    reference = span(assets, prepare_image(img, image_size=64, buckets=True))  # resize/crop, then whiten
    whitened_first = span(assets, prepare_image(to_rgb_on_white(img), image_size=64, buckets=True))
    assert reference != whitened_first  # the order matters for this image
    assert row["input_ids"][1 : 1 + len(reference)] == reference


def test_the_lumina_data_option_buckets_images_by_default():
    from chameleon_ft.config.store import compose

    assert compose(["recipe=vqa", "data=lumina", "data.path=/d/train.json"]).data.image_buckets is True
