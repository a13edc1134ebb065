"""The Lumina-mGPT chat template and its label masks, against hand-built expected sequences.

A small vocabulary with ids unlike the 7B ones is used, so nothing passes by matching hard-coded numbers.
"""

import pytest
import torch

from chameleon_ft.data.image_layout import image_to_ids
from chameleon_ft.data.template import LABEL_MASKS, LuminaTemplate, Piece, TokenizedTurn, get_template
from chameleon_ft.model.tokens import ChameleonTokens, image_token_name

X = -100
BOS, PAD, EOS, BOI, EOI, EOT, PLACEHOLDER, ROW_END = 1, 0, 2, 30, 31, 32, 33, 34
SIZE_BASE = 40  # <reserved08800> -> 40, <reserved08801> -> 41, ...
CODE_BASE = 100  # VQ code c -> 100 + c


def make_tokens() -> ChameleonTokens:
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<racm3:break>": BOI, "<eoss>": EOI, "<reserved08706>": EOT,
             "<image>": PLACEHOLDER, "<reserved08799>": ROW_END, "hello": 3, "world": 4}
    vocab.update({f"<reserved{8800 + n:05d}>": SIZE_BASE + n for n in range(8)})
    vocab.update({image_token_name(c): CODE_BASE + c for c in range(16)})
    return ChameleonTokens.from_vocab(vocab)


TOKENS = make_tokens()
TEMPLATE = LuminaTemplate(TOKENS)

# A 2x2 code grid of a 32x32 image in the Lumina layout, written out by hand:
# begin-image, size H (32 px -> <reserved08801>), size W, row 0 codes, row end, row 1 codes, row end, end-image.
CODES = torch.tensor([[3, 0], [15, 7]])
IMAGE = [BOI, SIZE_BASE + 1, SIZE_BASE + 1, CODE_BASE + 3, CODE_BASE + 0, ROW_END, CODE_BASE + 15, CODE_BASE + 7,
         ROW_END, EOI]


def test_hand_built_image_span_matches_layout():
    assert image_to_ids(CODES, TOKENS, "lumina", pixel_size=(32, 32)) == IMAGE


def text_chat():
    return [TokenizedTurn("user", [Piece([3, 4, 3])]), TokenizedTurn("assistant", [Piece([4, 4])])]


def test_lumina_layout_user_assistant():
    enc = TEMPLATE.encode(text_chat(), "assistant")
    # <s> + user content + <reserved08706> + assistant content + <reserved08706>; no role strings
    assert enc.input_ids == [BOS, 3, 4, 3, EOT, 4, 4, EOT]
    assert enc.labels == [X, X, X, X, X, 4, 4, EOT]
    assert enc.prompt_len == 5
    assert enc.input_ids[: enc.prompt_len] == [BOS, 3, 4, 3, EOT]


@pytest.mark.parametrize("mask", ["assistant"])
def test_assistant_masks_learn_reply_and_its_end_of_turn(mask):
    assert TEMPLATE.encode(text_chat(), mask).labels == [X, X, X, X, X, 4, 4, EOT]


def test_all_mask_learns_everything_after_bos():
    enc = TEMPLATE.encode(text_chat(), "all")
    assert enc.labels == [X, 3, 4, 3, EOT, 4, 4, EOT]


def test_image_mask_without_assistant_image_learns_nothing():
    assert TEMPLATE.encode(text_chat(), "image").labels == [X] * 8


def test_image_in_assistant_turn_is_learned_in_full():
    turns = [TokenizedTurn("user", [Piece([3])]),
             TokenizedTurn("assistant", [Piece([4]), Piece(list(IMAGE), is_image=True)])]
    enc = TEMPLATE.encode(turns, "assistant")
    assert enc.input_ids == [BOS, 3, EOT, 4, *IMAGE, EOT]
    assert enc.labels == [X, X, X, 4, *IMAGE, EOT]
    # label_mask=image: the whole image span (begin-image .. end-image) and the end of the turn that drew
    # it (Lumina-mGPT learns it; without it a model never closes its turn after drawing), not the text
    assert TEMPLATE.encode(turns, "image").labels == [X, X, X, X, *IMAGE, EOT]
    assert TEMPLATE.encode(turns, "all").labels == [X, 3, EOT, 4, *IMAGE, EOT]
    assert enc.prompt_len == 3


def test_image_in_prompt_is_not_learned():
    turns = [TokenizedTurn("user", [Piece(list(IMAGE), is_image=True), Piece([3, 3])]),
             TokenizedTurn("assistant", [Piece([4])])]
    enc = TEMPLATE.encode(turns, "assistant")
    assert enc.input_ids == [BOS, *IMAGE, 3, 3, EOT, 4, EOT]
    assert enc.labels == [X] * (1 + len(IMAGE) + 3) + [4, EOT]
    assert TEMPLATE.encode(turns, "image").labels == [X] * len(enc.input_ids)
    assert TEMPLATE.encode(turns, "all").labels == [X, *IMAGE, 3, 3, EOT, 4, EOT]


def test_multi_turn_and_system_turn():
    turns = [TokenizedTurn("system", [Piece([3])]), TokenizedTurn("user", [Piece([4])]),
             TokenizedTurn("assistant", [Piece([3, 3])]), TokenizedTurn("user", [Piece([4, 4])]),
             TokenizedTurn("assistant", [Piece([3])])]
    enc = TEMPLATE.encode(turns, "assistant")
    assert enc.input_ids == [BOS, 3, EOT, 4, EOT, 3, 3, EOT, 4, 4, EOT, 3, EOT]
    # every assistant turn is learned; system and user turns are not
    assert enc.labels == [X, X, X, X, X, 3, 3, EOT, X, X, X, 3, EOT]
    # the prompt is everything before the *last* assistant turn
    assert enc.prompt_len == 11
    assert TEMPLATE.prompt(turns[:4]) == enc.input_ids[:11]


def test_unconditional_form_is_the_image_span_alone():
    unc = TEMPLATE.unconditional(IMAGE)
    assert unc.input_ids == IMAGE and unc.labels == IMAGE and unc.prompt_len == 0


def test_unknown_mask_and_template_are_refused_with_choices():
    with pytest.raises(ValueError, match="label_mask='prompt'.*assistant"):
        TEMPLATE.encode(text_chat(), "prompt")
    with pytest.raises(ValueError, match="unknown chat template 'llama'.*lumina"):
        get_template("llama", TOKENS)
    assert isinstance(get_template("lumina", TOKENS), LuminaTemplate)
    assert set(LABEL_MASKS) == {"assistant", "image", "all"}
