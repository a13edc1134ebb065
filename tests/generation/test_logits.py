import math
import random

import numpy as np
import pytest
import torch

from chameleon_ft.generation.logits import (
    ClassifierFreeGuidanceLogitsProcessor,
    GenerationConfigError,
    ImageGridLogitsProcessor,
    ImageTopKLogitsProcessor,
    LockstepSamplingLogitsProcessor,
    image_generation_processors,
    open_image_offset,
    restrict_to_image_codes,
)
from chameleon_ft.model.tokens import NAMES, ChameleonTokens, image_token_name

NUM_CODES = 12


def make_tokens(seed: int = 0) -> ChameleonTokens:
    """Handmade vocabulary with shuffled ids, so nothing can rely on 7B's numbers."""
    names = list(NAMES.values()) + [f"<reserved{n:05d}>" for n in range(8800, 8811)]
    names += [f"word{i}" for i in range(20)] + [image_token_name(c) for c in range(NUM_CODES)]
    ids = list(range(len(names)))
    random.Random(seed).shuffle(ids)
    return ChameleonTokens.from_vocab(dict(zip(names, ids)))


TOK = make_tokens()
V = TOK.vocab_size
IMAGE_IDS = set(TOK.image_token_ids.tolist())


def allowed(scores: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).squeeze(1).tolist()) for row in scores]


def rollout(proc, prompt: torch.Tensor, steps: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = prompt.clone()
    for _ in range(steps):
        scores = proc(ids, torch.randn(ids.shape[0], V, generator=gen))
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    return ids


def lumina_expected_kinds(h: int, w: int) -> list:
    """Independent spelling of the Lumina layout after boi: sH, sW, h x (w codes + row_end), eoi."""
    kinds = ["sH", "sW"]
    for _ in range(h):
        kinds += ["code"] * w + ["row_end"]
    return kinds + ["eoi"]


def test_size_and_grid_tokens_step_by_step_lumina():
    h, w = 2, 4
    proc = ImageGridLogitsProcessor(TOK, prompt_len=3, height_tokens=h, width_tokens=w, layout="lumina")
    # 16 px per code: 32 px -> <reserved08801>, 64 px -> <reserved08802>.
    sH, sW = TOK.vocab["<reserved08801>"], TOK.vocab["<reserved08802>"]
    prompt = torch.tensor([[TOK.bos, TOK.vocab["word3"], TOK.vocab["word5"]]])
    ids = prompt
    gen = torch.Generator().manual_seed(1)
    expected = [{TOK.boi}, {sH}, {sW}]
    for kind in lumina_expected_kinds(h, w)[2:]:
        expected.append({"code": IMAGE_IDS, "row_end": {TOK.row_end}, "eoi": {TOK.eoi}}[kind])
    expected += [{TOK.eot}, {TOK.eot}]
    for want in expected:
        scores = proc(ids, torch.randn(1, V, generator=gen))
        assert allowed(scores) == [want]
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)


@pytest.mark.parametrize("h,w", [(2, 4), (4, 2), (1, 1), (3, 5)])
def test_greedy_rollout_of_random_logits_is_exact_lumina_layout(h, w):
    pixel = (32 * h, 32 * w)  # any pixel size: size tokens must follow it, not the grid
    proc = ImageGridLogitsProcessor(TOK, 2, h, w, "lumina", pixel_size=pixel)
    prompt = torch.tensor([[TOK.bos, TOK.vocab["word1"]]] * 3)
    n = h * (w + 1) + 4
    out = rollout(proc, prompt, n + 1, seed=h * 10 + w)
    for row in out[:, 2:].tolist():
        assert row[0] == TOK.boi
        assert row[1] == TOK.vocab[f"<reserved{8800 + pixel[0] // 32:05d}>"]
        assert row[2] == TOK.vocab[f"<reserved{8800 + pixel[1] // 32:05d}>"]
        body = np.array(row[3 : 3 + h * (w + 1)]).reshape(h, w + 1)
        assert all(t in IMAGE_IDS for t in body[:, :w].ravel())
        assert (body[:, w] == TOK.row_end).all()
        assert row[n - 1] == TOK.eoi and row[n] == TOK.eot
    assert len(out[0]) - 2 == n + 1


def test_prompt_ending_with_boi_and_sizes_continues_the_grid():
    h, w = 2, 2
    proc = ImageGridLogitsProcessor(TOK, 4, h, w, "lumina")
    sz = TOK.size_token(32)
    prompt = torch.tensor([[TOK.vocab["word2"], TOK.boi, sz, sz]])
    out = rollout(proc, prompt, h * (w + 1) + 1)[0, 4:].tolist()
    assert [t in IMAGE_IDS for t in out] == [True, True, False, True, True, False, False]
    assert out[2] == out[5] == TOK.row_end and out[6] == TOK.eoi


def test_chameleon_layout_and_closed_prompt_image():
    h, w = 2, 3
    # The prompt holds a finished image: the generated one must start a new image.
    prompt = torch.tensor([[TOK.boi, int(TOK.code_to_id[0]), TOK.eoi, TOK.vocab["word0"]]])
    proc = ImageGridLogitsProcessor(TOK, 4, h, w, "chameleon")
    out = rollout(proc, prompt, h * w + 3)[0, 4:].tolist()
    assert out[0] == TOK.boi
    assert all(t in IMAGE_IDS for t in out[1 : 1 + h * w])
    assert out[1 + h * w] == TOK.eoi and out[2 + h * w] == TOK.eot
    assert proc.image_length == h * w + 2


def test_batch_rows_at_different_positions_left_padded():
    h, w = 2, 2
    proc = ImageGridLogitsProcessor(TOK, 4, h, w, "lumina")
    sz = TOK.size_token(32)
    c = int(TOK.code_to_id[5])
    ids = torch.tensor([
        [TOK.pad, TOK.pad, TOK.pad, TOK.vocab["word1"]],  # before the image -> boi
        [TOK.pad, TOK.boi, sz, sz],                       # first code
        [sz, sz, c, c],                                   # no boi in the row -> boi
    ])
    got = allowed(proc(ids, torch.zeros(3, V)))
    assert got == [{TOK.boi}, IMAGE_IDS, {TOK.boi}]
    # Row end after w codes, eoi after the last row, each row judged on its own.
    row_a = [TOK.boi, sz, sz, c, c]
    row_b = [TOK.boi, sz, sz, c, c, TOK.row_end, c, c, TOK.row_end]
    row_c = [TOK.pad] * 5 + [TOK.boi, sz, sz, c]
    ids = torch.tensor([[TOK.pad] * 4 + row_a, row_b, row_c])
    proc = ImageGridLogitsProcessor(TOK, 0, h, w, "lumina")
    assert allowed(proc(ids, torch.zeros(3, V))) == [{TOK.row_end}, {TOK.eoi}, IMAGE_IDS]


def test_open_image_offset():
    ids = torch.tensor([[TOK.boi, 7, 7, TOK.eoi, 9], [9, TOK.boi, 7, 7, 7], [9, 9, 9, 9, TOK.boi]])
    assert open_image_offset(ids, TOK).tolist() == [-1, 3, 0]


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(GenerationConfigError, match="layout"):
        ImageGridLogitsProcessor(TOK, 0, 2, 2, "dalle")
    with pytest.raises(GenerationConfigError, match="1x1"):
        ImageGridLogitsProcessor(TOK, 0, 0, 2)
    proc = ImageGridLogitsProcessor(TOK, 5, 2, 2)
    with pytest.raises(GenerationConfigError, match="prompt_len"):
        proc(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, V))
    with pytest.raises(GenerationConfigError, match="columns"):
        proc(torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 3))
    with pytest.raises(GenerationConfigError, match="even"):
        ClassifierFreeGuidanceLogitsProcessor(3.0)(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, V))


def test_restrict_to_image_codes():
    s = restrict_to_image_codes(torch.randn(2, V), TOK)
    assert allowed(s) == [IMAGE_IDS, IMAGE_IDS]


def _log_softmax_np(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_cfg_matches_numpy_and_fills_both_halves():
    g = 3.5
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, V)).astype(np.float32)
    out = ClassifierFreeGuidanceLogitsProcessor(g)(torch.zeros(6, 4, dtype=torch.long), torch.from_numpy(logits))
    lc, lu = _log_softmax_np(logits[:3].astype(np.float64)), _log_softmax_np(logits[3:].astype(np.float64))
    ref = g * (lc - lu) + lu
    np.testing.assert_allclose(out[:3].numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[3:].numpy(), ref, rtol=1e-5, atol=1e-5)
    # Same distribution as mixing the raw logits (log-softmax only shifts each row by a constant).
    raw = g * (logits[:3] - logits[3:]) + logits[3:]
    np.testing.assert_allclose(torch.softmax(out[:3], -1).numpy(),
                               torch.softmax(torch.from_numpy(raw).double(), -1).numpy(), rtol=1e-4, atol=1e-7)


def test_cfg_keeps_banned_tokens_banned():
    s = torch.randn(2, V)
    s[0, 3] = -math.inf
    s[1, 4] = -math.inf
    out = ClassifierFreeGuidanceLogitsProcessor(2.0)(torch.zeros(2, 1, dtype=torch.long), s)
    assert not torch.isnan(out).any()
    assert torch.isneginf(out[:, 3]).all() and torch.isneginf(out[:, 4]).all()
    assert torch.isfinite(out[:, 5]).all()


def test_image_top_k_switches_on_grid_state():
    proc = ImageTopKLogitsProcessor(TOK, image_top_k=7, text_top_k=2)
    ids = torch.tensor([[TOK.vocab["word1"], TOK.boi, 5], [TOK.boi, 5, TOK.eoi]])
    s = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    out = proc(ids, s)
    for row, k in ((0, 7), (1, 2)):
        keep = set(torch.topk(s[row], k).indices.tolist())
        assert allowed(out[row : row + 1]) == [keep]
        torch.testing.assert_close(out[row, list(keep)], s[row, list(keep)])


def test_lockstep_sampling_pairs_and_distribution():
    gen = torch.Generator().manual_seed(0)
    proc = LockstepSamplingLogitsProcessor(paired=True, generator=gen)
    logits = torch.tensor([[0.0, math.log(3.0), -math.inf]] * 2)
    picks = []
    for _ in range(4000):
        out = proc(torch.zeros(2, 1, dtype=torch.long), logits)
        a, b = out.argmax(-1).tolist()
        assert a == b and out.isfinite().sum() == 2
        picks.append(a)
    assert 2 not in picks
    assert abs(picks.count(1) / len(picks) - 0.75) < 0.03  # p = 3 / (1 + 3)
    greedy = LockstepSamplingLogitsProcessor(paired=False, sample=False)(torch.zeros(2, 1, dtype=torch.long),
                                                                          torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    assert greedy.argmax(-1).tolist() == [1, 0]


def test_generate_with_cfg_chain_on_tiny_model_produces_lockstep_lumina_image():
    from chameleon_ft.model.modeling import ChameleonFTForCausalLM
    from tests.model.helpers import randomize_, small_config

    cfg = small_config(mask_image_logits=False)
    tokens = ChameleonTokens.from_vocab(cfg.vocabulary_map)
    model = randomize_(ChameleonFTForCausalLM(cfg)).eval()
    h, w = 2, 4
    sH, sW = tokens.size_token(16 * h), tokens.size_token(16 * w)
    text = [tokens.vocab[f"t{i}"] for i in (3, 8, 1)]
    cond = [tokens.bos, *text, tokens.boi, sH, sW]
    uncond = [tokens.pad] * 4 + [tokens.boi, sH, sW]
    ids = torch.tensor([cond, uncond])
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    chain = image_generation_processors(tokens, ids.shape[1], h, w, "lumina", guidance_scale=3.0,
                                        image_top_k=5, text_top_k=2, temperature=0.9,
                                        generator=torch.Generator().manual_seed(0))
    n_new = h * (w + 1) + 2
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, logits_processor=chain, do_sample=False,
                             max_new_tokens=n_new, eos_token_id=None, pad_token_id=tokens.pad)
    new = out[:, ids.shape[1]:]
    assert torch.equal(new[0], new[1])
    rows = new[0, : h * (w + 1)].reshape(h, w + 1)
    assert tokens.is_image_token(rows[:, :w]).all() and (rows[:, w] == tokens.row_end).all()
    assert new[0, -2].item() == tokens.eoi and new[0, -1].item() == tokens.eot
