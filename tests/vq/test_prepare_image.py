"""prepare_image against plain-PIL re-implementations of the two reference orders.

Meta's tokenizer (``chameleon/inference/image_tokenizer.py``) whitens transparency, then resizes the
shortest side (LANCZOS) and centre-crops. Lumina-mGPT's item processor crops to its bucket (BOX
halvings, BICUBIC cover, crop) on the image as decoded, and its image processor whitens afterwards.
"""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from chameleon_ft.vq.preprocess import (
    choose_bucket,
    lumina_buckets,
    pil_to_tensor,
    prepare_image,
    resize_to_bucket,
    to_rgb_on_white,
)


def whiten(img: Image.Image) -> Image.Image:
    """The reference ``blend_rgba``: RGB as is; otherwise RGBA, blended onto white if any alpha < 255."""
    if img.mode == "RGB":
        return img
    rgba = np.array(img.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return img.convert("RGB")
    a = rgba[:, :, 3:] / 255.0
    return Image.fromarray(((1 - a) * 255 + a * rgba[:, :, :3]).astype("uint8"), "RGB")


def lumina_resize(img: Image.Image, bucket):
    """Lumina's shrink-then-cover resize, before the crop."""
    bw, bh = bucket
    while img.size[0] >= 2 * bw and img.size[1] >= 2 * bh:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = max(bw / img.size[0], bh / img.size[1])
    return img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)


def lumina_reference(img: Image.Image, bucket) -> np.ndarray:
    """Crop the bucket's centre of the image as decoded, then whiten."""
    img = lumina_resize(img, bucket)
    left, top = (img.size[0] - bucket[0]) // 2, (img.size[1] - bucket[1]) // 2
    return np.asarray(whiten(img.crop((left, top, left + bucket[0], top + bucket[1]))))


def meta_reference(img: Image.Image, size: int) -> np.ndarray:
    """Whiten, then LANCZOS shortest side to ``size`` and centre crop."""
    img = whiten(img)
    scale = size / min(img.size)
    img = img.resize((round(scale * img.size[0]), round(scale * img.size[1])), Image.LANCZOS)
    x0, y0 = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((x0, y0, x0 + size, y0 + size)))


def rgba_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colours under a patchy alpha: opaque, transparent and half-transparent regions, sharp edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], axis=-1)
    alpha = rng.choice([0, 70, 160, 255], size=(h // 5 + 1, w // 5 + 1)).repeat(5, 0).repeat(5, 1)[:h, :w]
    return Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA")


def composite_first(img: Image.Image, bucket) -> np.ndarray:
    return np.asarray(resize_to_bucket(to_rgb_on_white(img), bucket))


@pytest.mark.parametrize("size, image_size", [((200, 90), 96), ((400, 170), 64), ((61, 100), 64)])
def test_rgba_bucket_path_crops_then_whitens_like_lumina(size, image_size):
    img = rgba_image(*size)
    bucket = choose_bucket(*size, lumina_buckets(image_size))
    out = prepare_image(img, image_size=image_size, buckets=True)
    assert out.mode == "RGB" and out.size == bucket
    ref = lumina_reference(img, bucket)
    assert np.array_equal(np.asarray(out), ref)
    # the order matters: whitening first gives other pixels (resampling premultiplies alpha)
    assert not np.array_equal(composite_first(img, bucket), ref)


def test_rgba_codes_depend_on_the_order(vqgan):
    img = rgba_image(200, 90)
    bucket = choose_bucket(200, 90, lumina_buckets(96))
    ref = Image.fromarray(lumina_reference(img, bucket))
    with torch.no_grad():
        ours = vqgan.encode(pil_to_tensor(prepare_image(img, image_size=96, buckets=True))[None])
        lumina = vqgan.encode(pil_to_tensor(ref)[None])
        whitened_first = vqgan.encode(pil_to_tensor(Image.fromarray(composite_first(img, bucket)))[None])
    assert torch.equal(ours, lumina)
    assert (ours != whitened_first).sum() >= 3


def test_rgba_centre_path_whitens_then_crops_like_meta():
    img = rgba_image(90, 57, seed=1)
    out = prepare_image(img, image_size=32)
    assert out.size == (32, 32)
    assert np.array_equal(np.asarray(out), meta_reference(img, 32))
    # Meta's order differs from Lumina's: crop-then-whiten with Meta's filter gives other pixels
    scale = 32 / 57
    shrunk = img.resize((round(90 * scale), 32), Image.LANCZOS).crop((13, 0, 45, 32))
    assert not np.array_equal(np.asarray(whiten(shrunk)), np.asarray(out))


def test_la_bucket_path_like_lumina():
    rgba = np.asarray(rgba_image(150, 60, seed=2))
    la = Image.fromarray(np.dstack([rgba[:, :, 0], rgba[:, :, 3]]), "LA")
    bucket = choose_bucket(150, 60, lumina_buckets(64))
    out = prepare_image(la, image_size=64, buckets=True)
    assert np.array_equal(np.asarray(out), lumina_reference(la, bucket))
    assert not np.array_equal(composite_first(la, bucket), np.asarray(out))
    assert np.array_equal(np.asarray(prepare_image(la, image_size=32)), meta_reference(la, 32))


def palette_image(w: int, h: int) -> Image.Image:
    """Four-colour stripes and blocks; index 1 transparent via ``info["transparency"]``."""
    yy, xx = np.mgrid[:h, :w]
    idx = ((xx // 7) + 2 * ((yy // 5) % 2)) % 4
    img = Image.fromarray(idx.astype(np.uint8), "P")
    img.putpalette([220, 30, 30, 0, 0, 0, 30, 200, 30, 20, 20, 230] + [0] * (252 * 3))
    img.info["transparency"] = 1
    return img


def test_palette_with_transparency_bucket_path_like_lumina():
    img = palette_image(170, 75)
    bucket = choose_bucket(170, 75, lumina_buckets(64))
    out = prepare_image(img, image_size=64, buckets=True)
    ref = lumina_reference(img, bucket)
    assert np.array_equal(np.asarray(out), ref)
    # Pillow resamples palette images with NEAREST: only the four colours and white survive
    assert {tuple(p) for p in ref.reshape(-1, 3)} <= {(220, 30, 30), (255, 255, 255), (30, 200, 30), (20, 20, 230)}
    assert not np.array_equal(composite_first(img, bucket), ref)
    assert np.array_equal(np.asarray(prepare_image(img, image_size=32)), meta_reference(img, 32))


def test_per_index_palette_alpha_bucket_path_like_lumina():
    img = palette_image(120, 50)
    img.info["transparency"] = bytes([255, 0, 128, 255])  # per-index alpha (PNG tRNS of a palette)
    bucket = choose_bucket(120, 50, lumina_buckets(64))
    assert np.array_equal(np.asarray(prepare_image(img, image_size=64, buckets=True)), lumina_reference(img, bucket))


def test_opaque_rgb_same_in_both_orders():
    rng = np.random.default_rng(4)
    img = Image.fromarray(rng.integers(0, 256, (70, 130, 3), dtype=np.uint8), "RGB")
    bucket = choose_bucket(130, 70, lumina_buckets(64))
    assert np.array_equal(np.asarray(prepare_image(img, image_size=64, buckets=True)), lumina_reference(img, bucket))
    assert np.array_equal(np.asarray(prepare_image(img, image_size=48)), meta_reference(img, 48))


def test_colour_key_is_whitened_before_resizing():
    # documented deviation: a keyed RGB colour is whitened first (Lumina would ignore the key)
    arr = np.zeros((40, 100, 3), dtype=np.uint8)
    arr[:, 50:] = [9, 9, 9]
    img = Image.fromarray(arr, "RGB")
    img.info["transparency"] = (9, 9, 9)
    bucket = choose_bucket(100, 40, lumina_buckets(64))
    out = prepare_image(img, image_size=64, buckets=True)
    assert np.array_equal(np.asarray(out), np.asarray(resize_to_bucket(to_rgb_on_white(img), bucket)))
    assert np.asarray(out)[:, -1].min() == 255


def offset_of(crop: np.ndarray, full: np.ndarray) -> tuple[int, int]:
    """The unique (left, top) where ``crop`` sits inside ``full``."""
    h, w = crop.shape[:2]
    hits = [(x, y) for y in range(full.shape[0] - h + 1) for x in range(full.shape[1] - w + 1)
            if np.array_equal(full[y : y + h, x : x + w], crop)]
    assert len(hits) == 1, hits
    return hits[0]


def test_random_crop_is_seeded_and_inside_the_bucket():
    rng = np.random.default_rng(5)
    img = Image.fromarray(rng.integers(0, 256, (60, 200, 3), dtype=np.uint8), "RGB")  # distinct pixels
    bucket = choose_bucket(200, 60, lumina_buckets(64))
    full = np.asarray(lumina_resize(img, bucket))
    slack = (full.shape[1] - bucket[0], full.shape[0] - bucket[1])
    assert slack == (11, 0)  # covering fits one side exactly; the slack is along the other

    centre = np.asarray(prepare_image(img, image_size=64, buckets=True))
    assert offset_of(centre, full) == (slack[0] // 2, slack[1] // 2)

    offsets = set()
    for seed in range(40):
        a = prepare_image(img, image_size=64, buckets=True, rng=seed)
        b = prepare_image(img, image_size=64, buckets=True, rng=random.Random(seed))
        assert a.size == bucket and np.array_equal(np.asarray(a), np.asarray(b))  # an int seeds a Random
        x, y = offset_of(np.asarray(a), full)
        assert 0 <= x <= slack[0] and 0 <= y <= slack[1]
        expected = random.Random(seed)  # Lumina's draw: left, then top, randint inclusive
        assert (x, y) == (expected.randint(0, slack[0]), expected.randint(0, slack[1]))
        offsets.add((x, y))
    assert len({x for x, _ in offsets}) > 5


def test_random_crop_applies_to_the_square_path_and_transparency_still_follows_the_order():
    img = rgba_image(160, 60, seed=6)
    bucket = choose_bucket(160, 60, lumina_buckets(64))
    full = lumina_resize(img, bucket)
    gen = random.Random(11)
    x, y = gen.randint(0, full.width - bucket[0]), gen.randint(0, full.height - bucket[1])
    ref = whiten(full.crop((x, y, x + bucket[0], y + bucket[1])))
    assert np.array_equal(np.asarray(prepare_image(img, image_size=64, buckets=True, rng=11)), np.asarray(ref))

    sq = prepare_image(img, image_size=32, rng=3)
    wide = whiten(img).resize((round(160 * 32 / 60), 32), Image.LANCZOS)
    gen = random.Random(3)
    x, y = gen.randint(0, wide.width - 32), gen.randint(0, 0)
    assert np.array_equal(np.asarray(sq), np.asarray(wide.crop((x, y, x + 32, y + 32))))


def test_bad_rng_refused():
    img = Image.new("RGB", (40, 40))
    with pytest.raises(TypeError, match="rng must be"):
        prepare_image(img, image_size=32, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng must be"):
        prepare_image(img, image_size=32, rng=True)
