"""Chameleon's VQGAN image tokenizer: model, checkpoint IO, preprocessing and the batched tokenizer."""

from chameleon_ft.vq.image_tokenizer import ImageTokenizer, ImageTokenizerError
from chameleon_ft.vq.preprocess import (
    center_crop_resize,
    choose_bucket,
    lumina_buckets,
    pil_to_tensor,
    prepare_image,
    resize_to_bucket,
    tensor_to_pil,
    to_rgb_on_white,
)
from chameleon_ft.vq.vqgan import (
    VQGAN,
    VQGANConfig,
    VQGANError,
    VQGANLoadError,
    load_hf_vqgan,
    load_meta_vqgan,
    load_vqgan,
    save_meta_vqgan,
    vq_config_dict,
    vqgan_hf_state_dict,
)

__all__ = [
    "ImageTokenizer", "ImageTokenizerError", "VQGAN", "VQGANConfig", "VQGANError", "VQGANLoadError",
    "center_crop_resize", "choose_bucket", "load_hf_vqgan", "load_meta_vqgan", "load_vqgan",
    "lumina_buckets", "pil_to_tensor", "prepare_image", "resize_to_bucket", "save_meta_vqgan", "tensor_to_pil", "to_rgb_on_white",
    "vq_config_dict", "vqgan_hf_state_dict",
]
