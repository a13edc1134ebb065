"""Static-cache image sampling (plain and speculative Jacobi decoding) against transformers' ``generate`` and
against the exact distribution of the model, enumerated.

SJD draws its random numbers differently from plain sampling, so with a seed the tokens differ; the
tests compare (1) greedy decoding token for token, and (2) the joint distribution of sampled images with
a chi-square goodness-of-fit test against the distribution computed exactly by full forward passes.
"""

import itertools
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from chameleon_ft.errors import ConfigError
from chameleon_ft.generation.generate import generate_images, image_prefix
from chameleon_ft.generation.logits import guided_log_probs
from chameleon_ft.model.checkpoint import load_model, load_tokenizer
from chameleon_ft.model.modeling import image_logits_unmasked
from chameleon_ft.model.tokens import ChameleonTokens
from tests.export.helpers import write_small_checkpoint

# The goodness-of-fit test rejects below this p-value. Seeds are fixed, so the outcome is deterministic; a
# correct sampler fails it with probability 1e-3 over seeds, and a sampler of another distribution (the
# power check below) is rejected at p < 1e-9.
P_VALUE = 1e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ckpt = write_small_checkpoint(tmp_path_factory.mktemp("sjd") / "ckpt", layout="grouped", seed=21)
    return load_model(ckpt).eval(), ChameleonTokens.from_checkpoint(ckpt), load_tokenizer(ckpt)


def prompt_ids(T, tok, text):
    return [T.bos, *tok.encode(text, add_special_tokens=False), T.eot]


@pytest.mark.parametrize("layout,width,height,cfg", [("lumina", 64, 64, 3.0), ("lumina", 64, 32, 2.0),
                                                     ("chameleon", 32, 32, None)])
def test_greedy_tokens_are_identical_for_every_sampler(setup, layout, width, height, cfg):
    model, T, tok = setup
    prompts = [prompt_ids(T, tok, t) for t in ("t1 t2 t3", "t4", "t5 t6 t7 t8 t9")]
    kw = dict(width=width, height=height, layout=layout, cfg_scale=cfg, image_top_k=8, sample=False)
    want = [r["token_ids"] for r in generate_images(model, T, prompts, sampler="hf", **kw)]
    n_new = len(want[0])
    for sampler, window in [("plain", 16), ("sjd", 2), ("sjd", 5), ("sjd", 16)]:
        out = generate_images(model, T, prompts, sampler=sampler, sjd_window=window, **kw)
        assert [r["token_ids"] for r in out] == want, (sampler, window)
        passes = out[0]["forward_passes"]
        assert passes == n_new if sampler == "plain" else passes <= n_new


def test_compiled_decode_step_gives_the_same_tokens(setup):
    model, T, tok = setup
    prompts = [prompt_ids(T, tok, "t1 t2 t3"), prompt_ids(T, tok, "t4")]
    kw = dict(width=64, height=64, cfg_scale=3.0, image_top_k=8, sample=False, sampler="sjd", sjd_window=4)
    eager = generate_images(model, T, prompts, **kw)
    compiled = generate_images(model, T, prompts, compile=True, **kw)
    assert [r["token_ids"] for r in compiled] == [r["token_ids"] for r in eager]


def test_unknown_sampler_and_bad_window_are_config_errors(setup):
    model, T, tok = setup
    with pytest.raises(ConfigError, match="sampler='beam'"):
        generate_images(model, T, [prompt_ids(T, tok, "t1")], width=32, height=32, sampler="beam")
    with pytest.raises(ConfigError, match="window of at least 2"):
        generate_images(model, T, [prompt_ids(T, tok, "t1")], width=32, height=32, sampler="sjd", sjd_window=1)


# --- the sampled distribution ------------------------------------------------------------------------------
G, TOP_K, TEMPERATURE = 3.0, 3, 0.8
N_SAMPLES = 3000


def exact_distribution(model, T, prompt, guidance_scale) -> dict[tuple, float]:
    """P(every image) of a 32x32 Lumina image (2x2 codes), by full forward passes over every prefix.

    Independent of the samplers: full-vocabulary logits without cache, guidance on the whole vocabulary,
    then the grid (image codes only), top-k and temperature, as Lumina-mGPT's generation describes.
    """
    prefix = image_prefix(T, 32, 32, "lumina")
    layout = ["code", "code", T.row_end, "code", "code", T.row_end, T.eoi]
    codes = T.image_token_ids
    probs = {(): 1.0}
    with image_logits_unmasked(model):
        for kind in layout:
            if kind != "code":
                probs = {seq + (kind,): p for seq, p in probs.items()}
                continue
            seqs = list(probs)
            with torch.no_grad():
                cond = model(input_ids=torch.tensor([prompt + prefix + list(s) for s in seqs])).logits[:, -1]
                uncond = model(input_ids=torch.tensor([prefix + list(s) for s in seqs])).logits[:, -1]
            scores = guided_log_probs(cond, uncond, guidance_scale)[:, codes] if guidance_scale else cond[:, codes]
            top = scores.float().topk(TOP_K, dim=-1)
            dist = torch.softmax(top.values / TEMPERATURE, dim=-1)
            probs = {seq + (int(codes[i]),): probs[seq] * float(p)
                     for row, seq in enumerate(seqs) for i, p in zip(top.indices[row], dist[row])}
    return probs


def goodness_of_fit(samples: list[tuple], exact: dict[tuple, float]) -> float:
    """Chi-square p-value of the sampled images against ``exact`` (every sample must be a possible image)."""
    counts = Counter(samples)
    assert set(counts) <= set(exact), f"impossible images sampled: {sorted(set(counts) - set(exact))[:3]}"
    keys = sorted(exact)
    total = sum(exact.values())
    expected = [exact[k] / total * len(samples) for k in keys]
    return float(chisquare([counts.get(k, 0) for k in keys], expected).pvalue)


@pytest.fixture(scope="module")
def exact(setup):
    model, T, tok = setup
    prompt = prompt_ids(T, tok, "t1 t2 t3")
    return prompt, exact_distribution(model, T, prompt, G)


@pytest.mark.parametrize("sampler,window", [("plain", 16), ("sjd", 4)])
def test_sampled_images_follow_the_exact_distribution(setup, exact, sampler, window):
    model, T, _ = setup
    prompt, probs = exact
    assert len(probs) == TOP_K ** 4 and abs(sum(probs.values()) - 1) < 1e-5
    out = generate_images(model, T, [prompt] * N_SAMPLES, width=32, height=32, cfg_scale=G, image_top_k=TOP_K,
                          temperature=TEMPERATURE, seed=11, sampler=sampler, sjd_window=window)
    samples = [tuple(r["token_ids"]) for r in out]
    assert goodness_of_fit(samples, probs) > P_VALUE
    if sampler == "sjd":
        # Power check: the same test rejects images of the same support drawn at another temperature.
        hotter = generate_images(model, T, [prompt] * N_SAMPLES, width=32, height=32, cfg_scale=G, image_top_k=TOP_K,
                                 temperature=2 * TEMPERATURE, seed=11, sampler=sampler, sjd_window=window)
        assert goodness_of_fit([tuple(r["token_ids"]) for r in hotter], probs) < 1e-9

def test_every_image_of_the_support_is_reachable_by_sjd(setup, exact):
    """All 81 images have probability >= 0.3 %: with 3000 SJD samples each one shows up (misses would mean a
    path of the acceptance rule never taken, e.g. a draft that can never be rejected)."""
    model, T, _ = setup
    prompt, probs = exact
    assert min(probs.values()) * N_SAMPLES > 8
    out = generate_images(model, T, [prompt] * N_SAMPLES, width=32, height=32, cfg_scale=G, image_top_k=TOP_K,
                          temperature=TEMPERATURE, seed=12, sampler="sjd", sjd_window=3)
    assert set(tuple(r["token_ids"]) for r in out) == set(probs)
    assert set(itertools.chain.from_iterable(probs)) >= {T.row_end, T.eoi}
