"""Building the embedded tiny Chameleon checkpoint, in exactly the on-disk layout of a real one.

It is a real model directory -- ``config.json`` with ``vocabulary_map`` and ``vq_config``, sharded
safetensors with an index, ``tokenizer.json`` with Chameleon's special-token names (at ids that
differ from 7B's), and Meta's ``tokenizer/vqgan.yaml`` + ``vqgan.ckpt`` with encoder and decoder --
so tests and default recipes exercise the same loading code as a 7B checkpoint. The VQGAN's codebook
and decoder are fitted to the bundled digits' train split so that image tokens carry information;
held-out (val/test) digits never reach the base. The language model is randomly initialised: a short
pretraining on the train images was tried and made the fine-tuned recipes worse (captioning exact match
0.525 against 0.654 without it) while tripling the build time, so the base stays untrained. The build
runs on one thread, so that the same seed gives the same weights on any machine.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ChameleonConfig

from chameleon_ft.model.checkpoint import save_state_dict
from chameleon_ft.model.modeling import ChameleonFTForCausalLM
from chameleon_ft.model.tokens import NAMES, SIZE_TOKEN_BASE, ChameleonTokens, image_token_name
from chameleon_ft.vq.vqgan import VQGAN, VQGANConfig, VQGANError, save_meta_vqgan, vq_config_dict, vqgan_hf_state_dict

# Bump when the tiny checkpoint's contents change, so stale caches are rebuilt.
TINY_VERSION = 10
MAX_SIZE_TOKENS = 33  # <reserved08800> .. <reserved08832>: sides up to 1024 px

TINY_MODEL = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    model_parallel_size=2,  # 2 groups of 2 heads, so grouping is real
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    swin_norm=False,
)
TINY_VQ = dict(
    embed_dim=32, n_embed=256, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32,
    ch_mult=[1, 1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[], dropout=0.0, double_z=False,
)
IMAGE_SIZE = 64  # 16x downsampling -> 4x4 codes per image
VQGAN_DECODER_STEPS = 300  # ceiling (classifier on val reconstructions): 0.45 at 150 steps, 0.71 at 400
# Text the tiny BPE is trained on: the bundled recipes' prompts plus plain English.
_CORPUS = [
    "What digit is this? Is it even? Is it odd? Is it greater than five? Is it less than five? yes no",
    "a handwritten digit zero one two three four five six seven eight nine 0 1 2 3 4 5 6 7 8 9",
    "Describe the image. Write a caption for this image. Answer the question with a single word.",
    "Generate an image of 64x64 according to the following prompt:\nDraw the digit 7",
    "The quick brown fox jumps over the lazy dog. A photo of a cat sitting on a table next to a cup.",
    "There are two people in the picture, and the sky is blue. What color is the car? How many?",
]


def special_token_names() -> list[str]:
    names = ["<pad>", "<s>", "</s>", "<unk>"]  # order differs from 7B on purpose
    names += [NAMES[k] for k in ("boi", "eoi", "eot", "image_placeholder", "row_end")]
    names += [f"<reserved{SIZE_TOKEN_BASE + i:05d}>" for i in range(MAX_SIZE_TOKENS)]
    return names


def build_tokenizer_json(num_codes: int) -> str:
    """A byte-level BPE ``tokenizer.json`` with Chameleon's special tokens and ``IMGIMG`` codes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = special_token_names()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + 768, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    from chameleon_ft.tasks import get_task

    templates = [get_task(t).prompt_template for t in ("captioning", "vqa", "text_to_image")]
    corpus = _CORPUS + templates + ["Is this digit even? Is this digit greater than five?"]
    tok.train_from_iterator(corpus * 8, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    # Image codes live in the BPE vocabulary itself (as in the real one), after the text tokens.
    start = max(vocab.values()) + 1
    for code in range(num_codes):
        vocab[image_token_name(code)] = start + code
    return json.dumps(data, ensure_ascii=False)


def train_digit_images(size: int = IMAGE_SIZE) -> torch.Tensor:
    """The digits TRAIN split's scans as ``[N, 3, size, size]`` in [-1, 1], rendered as the digits data
    renders them: the only images the tiny base ever sees (its VQGAN is fitted to them)."""
    from chameleon_ft.data.formats.digits import load_scans, render_digit, split_indices
    from chameleon_ft.vq.preprocess import pil_to_tensor

    scans, _ = load_scans()
    return torch.stack([pil_to_tensor(render_digit(scans[i], size)) for i in split_indices("train")])


def _init_lm_weights(model: ChameleonFTForCausalLM, seed: int) -> None:
    # Fill every tensor from one generator in name order: independent of module init order.
    gen = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))  # distinct per group
            elif name.endswith(("q_norm.bias", "k_norm.bias")):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def codebook_image_rows_(model: ChameleonFTForCausalLM, codebook: torch.Tensor, tokens: ChameleonTokens,
                         seed: int) -> None:
    """Image-token rows of ``embed_tokens`` and ``lm_head`` from the VQ codebook, through a fixed random
    projection scaled to the other rows' std.

    A pretrained Chameleon's image-token embeddings put codes that look alike close together; random rows
    make every code a stranger, and a short fine-tune then spends itself learning 256 lookups. Codebook
    geometry gives the tiny base that prior for free (no pretraining, nothing held out is involved: the
    codebook is fitted on the train split).
    """
    gen = torch.Generator().manual_seed(seed + 1234)
    ids = tokens.image_token_ids
    codes = tokens.ids_to_codes(ids)
    centred = codebook.float() - codebook.float().mean(0)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.lm_head.weight):
            rows = centred @ torch.randn(centred.shape[1], weight.shape[1], generator=gen)
            weight[ids] = (rows / rows.std() * weight.std())[codes].to(weight.dtype)


def fit_tiny_vqgan(
    vqgan: VQGAN,
    images: torch.Tensor,
    seed: int = 0,
    decoder_steps: int = 150,
    max_seconds: float = 60.0,
    *,
    batch_size: int = 12,
    lr: float = 2e-3,
    max_images: int = 512,
) -> dict[str, float]:
    """Make a randomly initialised VQGAN informative for ``images`` ``[N, 3, H, W]`` in [-1, 1].

    At most ``max_images`` images (a seeded choice) are used, to bound the time.

    1. Codebook: k-means (sklearn, ``random_state=seed``) over the ``quant_conv(encoder(x))``
       vectors, so nearby latents share codes and distinct content gets distinct codes.
    2. Decoder + ``post_quant_conv`` only: ``decoder_steps`` Adam steps of MSE between
       ``decode(encode(x))`` and ``x`` on seeded mini-batches. The encoder stays as initialised.

    Deterministic for a given seed and initial weights as long as ``max_seconds`` (a safety net
    that stops training early) is not reached. Global RNG state is left untouched. Returns
    ``{"steps", "seconds", "mse_before", "mse_after"}`` (MSE on up to 64 of the images).
    """
    from sklearn.cluster import KMeans

    if not vqgan.has_decoder:
        raise VQGANError("fit_tiny_vqgan: the VQGAN has no decoder to fit")
    vqgan.check_pixels(images)
    start = time.monotonic()
    device = vqgan._param().device
    images = images.to(device=device, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    if images.shape[0] > max_images:
        images = images[torch.from_numpy(np.sort(rng.choice(images.shape[0], max_images, replace=False))).to(device)]
    n = images.shape[0]
    probe = images[: min(n, 64)]

    def probe_mse() -> float:
        with torch.no_grad():
            return float(F.mse_loss(vqgan.decode(vqgan.encode(probe)), probe))

    # channels_last: ~2x faster CPU convolutions at these small channel counts.
    vqgan.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        vqgan.eval()
        with torch.no_grad():
            lat = torch.cat([vqgan._latents(images[i : i + 64]) for i in range(0, n, 64)])  # [N, D, h, w]
        d = lat.shape[1]
        vecs = lat.permute(0, 2, 3, 1).reshape(-1, d).cpu().double().numpy()
        mse_before = probe_mse()

        k = min(vqgan.config.n_embed, len(np.unique(vecs.round(6), axis=0)))
        km = KMeans(n_clusters=k, random_state=seed, n_init=1, max_iter=100).fit(vecs)
        centers = km.cluster_centers_
        if k < vqgan.config.n_embed:  # fewer distinct latents than codes: spare codes sit near used ones
            extra = centers[rng.integers(0, k, vqgan.config.n_embed - k)]
            centers = np.concatenate([centers, extra + 1e-3 * rng.standard_normal(extra.shape)])
        with torch.no_grad():
            vqgan.quantize.embedding.weight.copy_(torch.from_numpy(centers).to(vqgan._param()))

        # Quantized inputs to the trainable part are fixed once the codebook is set.
        with torch.no_grad():
            codes = torch.cat([vqgan.encode(images[i : i + 64]) for i in range(0, n, 64)])
            quant = vqgan.quantize.embedding(codes).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        params = list(vqgan.decoder.parameters()) + list(vqgan.post_quant_conv.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        # A constant rate: at 150 steps a cosine decay halves how many reconstructions stay legible.
        vqgan.decoder.train()
        steps = 0
        try:
            for steps in range(1, decoder_steps + 1):
                idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(device)
                out = vqgan.decoder(vqgan.post_quant_conv(quant[idx]))
                loss = F.mse_loss(out, images[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if time.monotonic() - start > max_seconds:
                    break
        finally:
            vqgan.eval()
            vqgan.to(memory_format=torch.contiguous_format)
            for p in vqgan.parameters():
                p.grad = None
    return {"steps": float(steps), "seconds": time.monotonic() - start, "mse_before": mse_before, "mse_after": probe_mse()}


def build_tiny_checkpoint(out_dir: str | Path, layout: str = "grouped", seed: int = 0) -> Path:
    """Write the tiny checkpoint to ``out_dir`` in q/k-norm ``layout``; the same seed gives the same model.

    The caller's global RNG state and thread count are left as they were: a run that builds the checkpoint
    on first use draws the same random numbers afterwards as one that finds it cached.
    """
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            return _build(Path(out_dir), layout, seed)
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: Path, layout: str, seed: int) -> Path:
    work = out_dir.with_name(out_dir.name + ".build")
    shutil.rmtree(work, ignore_errors=True)
    (work / "tokenizer").mkdir(parents=True)

    vq_cfg = VQGANConfig(**TINY_VQ)
    torch.manual_seed(seed)
    vqgan = VQGAN(vq_cfg)
    fit_tiny_vqgan(vqgan, train_digit_images(vq_cfg.resolution), seed=seed, decoder_steps=VQGAN_DECODER_STEPS, max_seconds=3600)  # no wall-clock cut: deterministic
    save_meta_vqgan(vqgan, work / "tokenizer")

    tok_json = build_tokenizer_json(vq_cfg.n_embed)
    (work / "tokenizer.json").write_text(tok_json)
    (work / "tokenizer" / "text_tokenizer.json").write_text(tok_json)
    vocab = json.loads(tok_json)["model"]["vocab"]
    (work / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": TINY_MODEL["max_position_embeddings"],
    }, indent=2))
    (work / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))

    config = ChameleonConfig(
        vocab_size=max(vocab.values()) + 1,
        vocabulary_map=vocab,
        vq_config=vq_config_dict(vq_cfg),
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
        **TINY_MODEL,
    )
    with torch.device("meta"):
        model = ChameleonFTForCausalLM(config)
    model = model.to_empty(device="cpu")
    _init_lm_weights(model, seed)
    codebook_image_rows_(model, vqgan.quantize.embedding.weight.detach(), ChameleonTokens.from_vocab(vocab), seed)
    tensors = dict(model.state_dict())
    tensors.update(vqgan_hf_state_dict(vqgan))
    # ~1 MB shards: the tiny model is sharded with an index, like a real one.
    save_state_dict(tensors, config, work / "weights", layout=layout, max_shard_bytes=4 * 2**20)
    for f in (work / "weights").iterdir():
        os.replace(f, work / f.name)
    (work / "weights").rmdir()
    cfg = json.loads((work / "config.json").read_text())
    cfg["tiny_checkpoint"] = {"version": TINY_VERSION, "seed": seed, "image_size": IMAGE_SIZE}
    (work / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(work, out_dir)
    return out_dir
