import numpy as np
import pytest
import torch
from PIL import Image

from chameleon_ft.vq.preprocess import (
    center_crop_resize,
    choose_bucket,
    lumina_buckets,
    pil_to_tensor,
    resize_to_bucket,
    retained_fraction,
    tensor_to_pil,
    to_rgb_on_white,
)


def _blend_reference(rgba: np.ndarray) -> np.ndarray:
    """Per-pixel Python reference of Meta's whitening: (1 - a) * 255 + a * c, a = alpha / 255, truncated."""
    h, w, _ = rgba.shape
    out = np.zeros((h, w, 3), dtype=np.uint8)
    for y in range(h):
        for x in range(w):
            a = int(rgba[y, x, 3]) / 255.0
            for ch in range(3):
                out[y, x, ch] = int((1 - a) * 255 + a * int(rgba[y, x, ch]))
    return out


def test_rgba_composited_on_white():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    rgba[0, 0] = [10, 20, 30, 0]  # fully transparent -> white
    rgba[0, 1] = [10, 20, 30, 255]  # opaque -> unchanged
    out = to_rgb_on_white(Image.fromarray(rgba, "RGBA"))
    assert out.mode == "RGB"
    arr = np.asarray(out)
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[0, 1].tolist() == [10, 20, 30]
    assert np.array_equal(arr, _blend_reference(rgba))


def test_la_composited_on_white():
    la = np.array([[[0, 0], [0, 255], [100, 128]]], dtype=np.uint8)
    arr = np.asarray(to_rgb_on_white(Image.fromarray(la, "LA")))
    rgba = np.concatenate([np.repeat(la[:, :, :1], 3, axis=2), la[:, :, 1:]], axis=2)
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[0, 1].tolist() == [0, 0, 0]
    assert np.array_equal(arr, _blend_reference(rgba))


def test_palette_with_transparency_becomes_white():
    img = Image.new("P", (4, 2))
    img.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2, 1, 0, 0, 2, 2])
    img.info["transparency"] = 0
    arr = np.asarray(to_rgb_on_white(img))
    expected = {0: [255, 255, 255], 1: [200, 10, 10], 2: [10, 200, 10]}
    assert arr.reshape(-1, 3).tolist() == [expected[i] for i in [0, 1, 2, 1, 0, 0, 2, 2]]


def test_grayscale_palette_and_cmyk_become_rgb():
    gray = np.array([[0, 50, 255]], dtype=np.uint8)
    arr = np.asarray(to_rgb_on_white(Image.fromarray(gray, "L")))
    assert arr.tolist() == [[[0, 0, 0], [50, 50, 50], [255, 255, 255]]]
    p = Image.new("P", (1, 1))
    p.putpalette([7, 8, 9] + [0] * 765)
    assert np.asarray(to_rgb_on_white(p)).tolist() == [[[7, 8, 9]]]
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))  # no ink = white
    out = to_rgb_on_white(cmyk)
    assert out.mode == "RGB" and np.asarray(out).min() == 255
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb_on_white(rgb) is rgb


def test_pixel_scaling_and_round_trip():
    arr = np.array([[[0, 51, 255]]], dtype=np.uint8)
    t = pil_to_tensor(Image.fromarray(arr, "RGB"))
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([-1.0, 51 / 255 * 2 - 1, 1.0]))
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (9, 5, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(tensor_to_pil(pil_to_tensor(Image.fromarray(img)))), img)
    out = np.asarray(tensor_to_pil(torch.tensor([[[-3.0, 0.0, 3.0]]] * 3)))
    assert out[0, :, 0].tolist() == [0, 128, 255]  # clamped; 0 -> 127.5 rounds to 128


def test_center_crop_resize_matches_direct_computation():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (50, 100, 3), dtype=np.uint8))  # 100 wide, 50 tall
    out = center_crop_resize(img, 32)
    assert out.size == (32, 32)
    ref = img.resize((64, 32), Image.LANCZOS).crop((16, 0, 48, 32))
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    tall = Image.new("RGB", (20, 60))
    assert center_crop_resize(tall, 16).size == (16, 16)


def test_lumina_buckets_count_and_constraints():
    buckets = lumina_buckets(512)
    assert len(buckets) == 49 and len(set(buckets)) == 49
    for w, h in buckets:
        assert w % 32 == 0 and h % 32 == 0
        assert (w // 32) * (h // 32) <= 256 and max(w, h) <= 4 * min(w, h)
    assert (512, 512) in buckets and (1024, 256) in buckets and (256, 1024) in buckets
    assert (480, 480) not in buckets  # not on the staircase: it can still grow in both directions
    # independent reference: Lumina-mGPT's walk from (N, 1) towards (1, N)
    n, walk, wp, hp = 256, [], 256, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= 4:
            walk.append((wp * 32, hp * 32))
        if (hp + 1) * wp <= n:
            hp += 1
        else:
            wp -= 1
    assert buckets == walk
    assert len(lumina_buckets(768)) == 73


def test_choose_bucket_hand_computed_cases():
    buckets = lumina_buckets(512)
    assert choose_bucket(512, 512, buckets) == (512, 512)
    assert choose_bucket(300, 300, buckets) == (512, 512)
    assert choose_bucket(1000, 250, buckets) == (1024, 256)
    assert choose_bucket(250, 1000, buckets) == (256, 1024)
    # 3:2 image: the neighbours on the staircase are 19x13 patches (ratio 1.4615, keeps 1.4615 / 1.5
    # = 0.974) and 19x12 (ratio 1.5833, keeps 1.5 / 1.5833 = 0.947)
    assert (608, 416) in buckets and (608, 384) in buckets
    assert choose_bucket(600, 400, buckets) == (608, 416)
    assert retained_fraction(600, 400, (608, 416)) == pytest.approx((19 / 13) / 1.5)
    assert retained_fraction(600, 400, (608, 384)) == pytest.approx(1.5 / (19 / 12))
    # ties: equal loss goes to the larger area, then to the wider bucket
    assert choose_bucket(4, 4, [(32, 32), (64, 64), (64, 32)]) == (64, 64)
    assert choose_bucket(4, 4, [(64, 32), (32, 64)]) == (64, 32)  # equal loss and area: wider wins
    # 10:1 is beyond max_ratio: the most extreme bucket wins
    assert choose_bucket(2000, 200, buckets) == (1024, 256)


def test_resize_to_bucket_crops_the_centre():
    # 400x100: blue, with a red band in columns 150..250 -> the 512x512 crop of the centre is all red
    arr = np.zeros((100, 400, 3), dtype=np.uint8)
    arr[:, :, 2] = 255
    arr[:, 150:250] = [255, 0, 0]
    out = resize_to_bucket(Image.fromarray(arr), (512, 512))
    assert out.size == (512, 512)
    a = np.asarray(out).astype(int)
    assert (a[:, 8:-8, 0] > 240).all() and (a[:, 8:-8, 2] < 15).all()
    # a large image is shrunk (BOX halvings then BICUBIC) to exactly the bucket
    big = Image.fromarray(np.random.default_rng(3).integers(0, 256, (1500, 3000, 3), dtype=np.uint8))
    assert resize_to_bucket(big, (704, 352)).size == (704, 352)
