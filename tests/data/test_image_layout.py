import pytest
import torch

from chameleon_ft.data.image_layout import ImageLayoutError, ids_to_image, image_span_length, image_spans, image_to_ids
from chameleon_ft.model.tokens import ChameleonTokens
from tests.model.helpers import small_vocab


@pytest.fixture()
def tokens():
    return ChameleonTokens.from_vocab(small_vocab(num_codes=16))


def test_lumina_layout_matches_facts(tokens):
    codes = torch.arange(12).reshape(3, 4) % 16
    ids = image_to_ids(codes, tokens, "lumina", pixel_size=(96, 64))
    v = tokens.vocab
    assert ids[:3] == [tokens.boi, v["<reserved08803>"], v["<reserved08802>"]]  # H then W, in 32 px units
    assert len(ids) == image_span_length(3, 4, "lumina") == 3 * 5 + 4
    assert ids[-1] == tokens.eoi
    assert [ids[3 + 5 * r + 4] for r in range(3)] == [tokens.row_end] * 3
    back, size = ids_to_image(ids, tokens, "lumina", grid=(3, 4))
    assert torch.equal(back, codes) and size == (96, 64)


def test_facts_lengths_at_real_resolutions():
    assert image_span_length(32, 32, "lumina") == 1060
    assert image_span_length(48, 48, "lumina") == 2356
    assert image_span_length(32, 32, "chameleon") == 1026


def test_chameleon_layout_round_trip(tokens):
    codes = torch.randint(0, 16, (2, 2))
    ids = image_to_ids(codes, tokens, "chameleon")
    assert len(ids) == 6 and ids[0] == tokens.boi and ids[-1] == tokens.eoi
    assert ids[1:5] == tokens.codes_to_ids(codes).reshape(-1).tolist()
    assert torch.equal(ids_to_image(ids, tokens, "chameleon", grid=(2, 2))[0], codes)


def test_malformed_spans_are_refused(tokens):
    ids = image_to_ids(torch.zeros(2, 2, dtype=torch.long), tokens, "lumina", pixel_size=(32, 32))
    broken = list(ids)
    broken[5] = tokens.eot  # a row end replaced
    with pytest.raises(ImageLayoutError, match="row-end"):
        ids_to_image(broken, tokens, "lumina", grid=(2, 2))
    with pytest.raises(ImageLayoutError, match="too short|needs"):
        ids_to_image(ids[:6], tokens, "lumina", grid=(2, 2))
    assert image_spans([7, *ids, 8, *ids], tokens) == [(1, 1 + len(ids)), (2 + len(ids), 2 + 2 * len(ids))]
