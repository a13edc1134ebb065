"""Chat templates: how already-tokenized turns become one sequence with labels.

Lumina-mGPT / Chameleon (``lumina``): ``<s>``, then each turn's content followed by the end-of-turn token
``<reserved08706>``, with no role strings. Templates are registered by name in :data:`TEMPLATES` so
others can be added.

Label masks decide which tokens are learned (everything else is -100):

- ``assistant``: assistant text, the assistant's end-of-turn token, and
  every image inside an assistant turn in full (begin-image, size tokens, codes, row ends, end-image);
- ``image``: the image spans of assistant turns in full (end-image included) and the end-of-turn token
  after an assistant turn that holds an image (text-to-image; Lumina-mGPT learns it too, and a model that
  never learns it does not close its turn after drawing);
- ``all``: every token after ``<s>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from chameleon_ft.model.loss import IGNORE_INDEX
from chameleon_ft.model.tokens import ChameleonTokens

LABEL_MASKS = ("assistant", "image", "all")


@dataclass
class Piece:
    """A run of token ids from one segment: text or one image span."""

    ids: list[int]
    is_image: bool = False


@dataclass
class TokenizedTurn:
    role: str
    pieces: list[Piece]


@dataclass
class Encoded:
    """A sample as ids/labels, plus the prompt (everything before the last assistant turn)."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # input_ids[:prompt_len] is the generation prompt for the last assistant turn


class LuminaTemplate:
    """``<s>`` + turn content + ``<reserved08706>`` per turn, no role strings."""

    name = "lumina"

    def __init__(self, tokens: ChameleonTokens):
        self.tokens = tokens

    def encode(self, turns: list[TokenizedTurn], label_mask: str = "assistant") -> Encoded:
        """Concatenate ``turns``; learn the tokens that ``label_mask`` selects."""
        if label_mask not in LABEL_MASKS:
            raise ValueError(f"label_mask={label_mask!r}; choose one of {LABEL_MASKS}")
        ids, labels = [self.tokens.bos], [IGNORE_INDEX]
        prompt_len = 0
        for turn in turns:
            assistant = turn.role == "assistant"
            if assistant:
                prompt_len = len(ids)
            for piece in turn.pieces:
                learn = label_mask == "all" or (assistant and (label_mask != "image" or piece.is_image))
                ids += piece.ids
                labels += piece.ids if learn else [IGNORE_INDEX] * len(piece.ids)
            drew = any(p.is_image for p in turn.pieces)
            learn_eot = label_mask == "all" or (assistant and (label_mask != "image" or drew))
            ids.append(self.tokens.eot)
            labels.append(self.tokens.eot if learn_eot else IGNORE_INDEX)
        return Encoded(ids, labels, prompt_len)

    def prompt(self, turns: list[TokenizedTurn]) -> list[int]:
        """Ids that prompt the model for an assistant reply after ``turns`` (no assistant content)."""
        return self.encode(turns, "all").input_ids

    def unconditional(self, image_ids: list[int]) -> Encoded:
        """Classifier-free-guidance form of a text-to-image sample: the image span alone, no text.

        Matches the unconditional branch at generation time, which starts at begin-image.
        """
        return Encoded(list(image_ids), list(image_ids), 0)


TEMPLATES = {"lumina": LuminaTemplate}


def get_template(name: str, tokens: ChameleonTokens):
    """Instantiate a registered template by name."""
    try:
        return TEMPLATES[name](tokens)
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}") from None
