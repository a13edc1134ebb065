import numpy as np
import pytest
import torch
from PIL import Image

from chameleon_ft.vq.image_tokenizer import ImageTokenizer, ImageTokenizerError
from chameleon_ft.vq.preprocess import center_crop_resize, pil_to_tensor, to_rgb_on_white
from chameleon_ft.vq.vqgan import load_hf_vqgan


def _img(w, h, seed, mode="RGB"):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    return Image.fromarray(arr, mode)


def test_square_encode_matches_per_image_reference(vqgan):
    tok = ImageTokenizer(vqgan, image_size=32, batch_size=2)
    images = [_img(40, 30, 0), _img(32, 32, 1, "RGBA"), _img(50, 90, 2), _img(33, 33, 3), _img(64, 64, 4)]
    codes = tok.encode(images)
    assert len(codes) == 5 and all(c.shape == (2, 2) and c.dtype == torch.long for c in codes)
    for img, c in zip(images, codes):
        ref = vqgan.encode(pil_to_tensor(center_crop_resize(to_rgb_on_white(img), 32))[None])[0]
        assert torch.equal(c, ref)


def test_bucket_mode_groups_sizes_and_keeps_order(vqgan):
    tok = ImageTokenizer(vqgan, image_size=64, batch_size=3, bucket=True)
    assert tok.buckets == [(128, 32), (96, 32), (64, 32), (64, 64), (32, 64), (32, 96), (32, 128)]
    images = [_img(200, 50, 0), _img(60, 60, 1), _img(50, 200, 2), _img(210, 50, 3), _img(64, 64, 4)]
    codes = tok.encode(images)
    assert [tuple(c.shape) for c in codes] == [(2, 8), (4, 4), (8, 2), (2, 8), (4, 4)]
    for img, c in zip(images, codes):
        assert torch.equal(c, vqgan.encode(tok.preprocess(img)[None])[0])
    # preprocess's bucket flag overrides the tokenizer default
    assert tok.preprocess(images[0], bucket=False).shape == (3, 64, 64)
    assert tok.preprocess(images[0]).shape == (3, 32, 128)


def test_encode_accepts_preprocessed_tensors_and_rejects_bad_ones(vqgan):
    tok = ImageTokenizer(vqgan, image_size=32)
    t = tok.preprocess(_img(32, 32, 0))
    assert torch.equal(tok.encode([t])[0], tok.encode([_img(32, 32, 0)])[0])
    bad = {
        "size 48x32, expected 32x32": torch.zeros(3, 48, 32),
        r"expected a \[3, H, W\] tensor": torch.zeros(1, 32, 32),
        "dtype torch.uint8": torch.zeros(3, 32, 32, dtype=torch.uint8),
        r"outside \[-1, 1\]": torch.full((3, 32, 32), 200.0),
        "expected a PIL image or a tensor": "image.png",
    }
    for msg, item in bad.items():
        with pytest.raises(ImageTokenizerError, match=msg):
            tok.encode([t, item])
    with pytest.raises(ImageTokenizerError, match="not a positive multiple of 16"):
        ImageTokenizer(vqgan, image_size=32, bucket=True).encode([torch.zeros(3, 40, 32)])


def test_decode_to_images(vqgan):
    tok = ImageTokenizer(vqgan, image_size=32, batch_size=2)
    codes = torch.randint(0, 64, (3, 2, 3))
    images = tok.decode(codes)
    assert [im.size for im in images] == [(48, 32)] * 3 and all(im.mode == "RGB" for im in images)
    ref = vqgan.decode(codes)
    for im, r in zip(images, ref):
        expected = ((r.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(np.asarray(im), expected)
    mixed = tok.decode([torch.zeros(2, 2, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)])
    assert [im.size for im in mixed] == [(32, 32), (64, 16)]
    with pytest.raises(ImageTokenizerError, match=r"\[0, 64\)"):
        tok.decode(torch.full((1, 2, 2), 99))


def test_hf_tokenizer_cannot_decode(checkpoint_dir):
    tok = ImageTokenizer(load_hf_vqgan(checkpoint_dir))
    assert tok.image_size == 32
    assert tok.encode([_img(32, 32, 0)])[0].shape == (2, 2)
    with pytest.raises(ImageTokenizerError, match="no decoder"):
        tok.decode(torch.zeros(1, 2, 2, dtype=torch.long))


def test_from_checkpoint_encodes_as_the_loaded_vqgan(checkpoint_dir, tmp_path, vqgan):
    tok = ImageTokenizer.from_checkpoint(checkpoint_dir)
    img = _img(40, 32, 5)
    assert torch.equal(tok.encode([img])[0], ImageTokenizer(vqgan).encode([img])[0])
