import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from chameleon_ft.vq.vqgan import VQGAN, VQGANConfig, save_meta_vqgan, vq_config_dict, vqgan_hf_state_dict

# 5 levels -> 16x downsampling like the real VQGAN, but 32 channels and attention at 4 px so the
# attention blocks of encoder and decoder are exercised too.
TINY = dict(embed_dim=8, n_embed=64, z_channels=32, resolution=32, ch=32, ch_mult=[1, 1, 1, 1, 2],
            num_res_blocks=1, attn_resolutions=[4])


def tiny_config(**over) -> VQGANConfig:
    return VQGANConfig(**{**TINY, **over})


def make_vqgan(seed: int = 0, **over) -> VQGAN:
    torch.manual_seed(seed)
    v = VQGAN(tiny_config(**over))
    # Spread the codebook so random latents hit many different codes.
    with torch.no_grad():
        v.quantize.embedding.weight.normal_(0, 0.5)
    return v


def blob_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Dark discs of random position/radius/colour on white: ``[n, 3, size, size]`` in [-1, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.ones((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        cy, cx = rng.uniform(size * 0.2, size * 0.8, 2)
        r = rng.uniform(size * 0.15, size * 0.35)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        out[i][:, mask] = rng.uniform(-1, 0.2, 3)[:, None]
    return torch.from_numpy(out)


def write_hf_checkpoint(vqgan: VQGAN, path, sharded: bool = True) -> None:
    """A minimal HF-format directory: config.json with vq_config, VQ tensors plus one LM tensor."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "chameleon", "vq_config": vq_config_dict(vqgan.config)}))
    tensors = vqgan_hf_state_dict(vqgan)
    tensors["model.embed_tokens.weight"] = torch.randn(10, 4)
    if not sharded:
        save_file(tensors, str(path / "model.safetensors"))
        return
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(path / fname))
        weight_map.update({k: fname for k in keys})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def vqgan() -> VQGAN:
    return make_vqgan()


@pytest.fixture
def checkpoint_dir(tmp_path, vqgan):
    """A checkpoint dir with both Meta tokenizer files and HF weights of the same VQGAN."""
    write_hf_checkpoint(vqgan, tmp_path / "ckpt")
    save_meta_vqgan(vqgan, tmp_path / "ckpt" / "tokenizer")
    return tmp_path / "ckpt"
