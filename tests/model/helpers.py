"""Small random Chameleon configs for model tests that do not need the tiny checkpoint."""

import torch
from transformers import ChameleonConfig

from chameleon_ft.model.tokens import NAMES, image_token_name


def small_vocab(num_codes: int = 16, text: int = 40) -> dict[str, int]:
    names = list(NAMES.values()) + [f"<reserved{8800 + i:05d}>" for i in range(4)]
    names += [f"t{i}" for i in range(text)] + [image_token_name(c) for c in range(num_codes)]
    return {n: i for i, n in enumerate(names)}


def small_config(heads=4, kv_heads=4, groups=2, layers=2, hidden=64, swin=False, **kw) -> ChameleonConfig:
    vocab = small_vocab()
    cfg = ChameleonConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, model_parallel_size=groups, swin_norm=swin,
        vocabulary_map=vocab, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
        vq_config=dict(resolution=32, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                       num_embeddings=16, embed_dim=8, latent_channels=8),
        **kw,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def randomize_(model, seed=0):
    """Random weights everywhere, including distinct q/k-norm groups (init leaves them at 1/0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if "norm" in _ else 0.05) + (1.0 if _.endswith("norm.weight") else 0.0))
    return model
