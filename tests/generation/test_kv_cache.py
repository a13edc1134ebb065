"""The static KV cache against the model without any cache: rows at different lengths, windows, rejections."""

import pytest
import torch

from chameleon_ft.errors import ConfigError
from chameleon_ft.generation.generate import left_pad
from chameleon_ft.generation.kv_cache import CachedDecoder
from chameleon_ft.model.checkpoint import load_model
from tests.export.helpers import write_small_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt = write_small_checkpoint(tmp_path_factory.mktemp("kv") / "ckpt", layout="grouped", seed=5)
    return load_model(ckpt).eval()


def reference_hidden(model, ids: list[int]) -> torch.Tensor:
    """Final hidden states of one unpadded sequence, no cache."""
    with torch.no_grad():
        return model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_windows_with_per_row_commits_match_uncached_forward(model, attn):
    model.config._attn_implementation = attn
    try:
        prompts = [[3, 9, 11, 20, 7], [5, 8], [12, 13, 14]]
        ids, mask = left_pad(prompts, pad_id=1)
        dec = CachedDecoder(model, rows=3, capacity=24)
        dec.prefill(ids, mask)
        kept = [list(p) for p in prompts]
        gen = torch.Generator().manual_seed(0)
        # Windows of 1..4 tokens; each row keeps a different number of them (0 = all rejected).
        for q, commits in [(3, [3, 1, 0]), (1, [1, 1, 1]), (4, [2, 0, 4]), (2, [0, 2, 1])]:
            window = torch.randint(20, 40, (3, q), generator=gen)
            hidden = dec.forward(window)
            for r in range(3):
                want = reference_hidden(model, kept[r] + window[r].tolist())[-q:]
                torch.testing.assert_close(hidden[r], want, atol=1e-5, rtol=1e-4)
            dec.commit(torch.tensor(commits))
            for r in range(3):
                kept[r] += window[r, : commits[r]].tolist()
        assert dec.lengths.tolist() == [ids.shape[1] + len(k) - len(p) for k, p in zip(kept, prompts)]
        assert dec.forward_passes == 5  # the prefill and four windows
    finally:
        model.config._attn_implementation = "sdpa"


def test_an_all_padding_row_starts_empty_and_idle_tokens_are_invisible(model):
    ids, mask = left_pad([[3, 9, 11], []], pad_id=1)
    dec = CachedDecoder(model, rows=2, capacity=12)
    dec.prefill(ids, mask)
    # Row 1 idles (its token is not real, not committed) while row 0 decodes; then row 1 starts at position 0.
    dec.forward(torch.tensor([[21], [30]]), real=torch.tensor([True, False]))
    dec.commit(torch.tensor([1, 0]))
    hidden = dec.forward(torch.tensor([[22, 23], [24, 25]]))
    torch.testing.assert_close(hidden[0], reference_hidden(model, [3, 9, 11, 21, 22, 23])[-2:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hidden[1], reference_hidden(model, [24, 25]), atol=1e-5, rtol=1e-4)


def test_a_full_cache_is_a_clear_error(model):
    dec = CachedDecoder(model, rows=1, capacity=4)
    dec.prefill(torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="KV cache of 4 slots is full"):
        dec.forward(torch.tensor([[6, 7]]))
