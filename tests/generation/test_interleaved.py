"""The interleaved sampler's state machine, driven by hand-made logits (a bigram table), no training.

:class:`BigramDecoder` has the decoder interface; its logits after a token are that token's row of a table
the test writes, so each test states what the "model" prefers at every step and checks which transition
the sampler takes: TEXT -> IMAGE on begin-image, the forced image layout, IMAGE -> TEXT on end-image,
END on end-of-turn or ``</s>``, the text budget, the bans in TEXT and the image count.
"""

import pytest
import torch

from chameleon_ft.errors import ConfigError
from chameleon_ft.generation.image_sampler import ImageGrid, ImageSampling
from chameleon_ft.generation.interleaved import InterleavedSampler, TextSampling, image_only_ids
from tests.generation.test_logits import make_tokens

T = make_tokens(3)
V = T.vocab_size
W = [T.vocab[f"word{i}"] for i in range(20)]
CODES = T.image_token_ids.tolist()
PROMPT = [T.bos, W[0], W[1], T.eot]


class BigramDecoder:
    """Logits after token ``x`` are ``table[x]``; records what each row committed, in order."""

    def __init__(self, table: torch.Tensor, rows: int):
        self.table, self.rows, self.device = table, rows, torch.device("cpu")
        self.forward_passes = 0
        self.committed: list[list[int]] = [[] for _ in range(rows)]
        self.prefilled: list[list[int]] = []
        self.last: torch.Tensor | None = None

    def _hidden(self, ids):
        return torch.nn.functional.one_hot(ids, V).float()

    def prefill(self, ids, mask):
        self.forward_passes += 1
        self.prefilled = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        self.committed = [list(p) for p in self.prefilled]
        return self._hidden(ids[:, -1])

    def forward(self, ids, real=None):
        self.forward_passes += 1
        self.last, self.real = ids, real
        return self._hidden(ids)

    def commit(self, n):
        n = n.tolist() if isinstance(n, torch.Tensor) else [n] * self.rows
        for r, k in enumerate(n):
            self.committed[r] += self.last[r, :k].tolist()

    def restart(self, rows):
        for r, again in enumerate(rows.tolist()):
            if again:
                self.committed[r] = list(self.prefilled[r])

    def logits(self, hidden):
        return hidden @ self.table

    def head_rows(self, ids):
        return self.table[:, ids].T


def table(prefer: dict[int, list[int]]) -> torch.Tensor:
    """Bigram logits: after token ``x`` the ids ``prefer[x]`` score 10, 9, 8, ... (in that order); after any
    other token (and below them) image code ``CODES[(x * 7) % n]`` scores 1, everything else 0."""
    t = torch.zeros(V, V)
    for x in range(V):
        t[x, CODES[(x * 7) % len(CODES)]] = 1.0
    for x, ids in prefer.items():
        for rank, y in enumerate(ids):
            t[x, y] = 10.0 - rank
    return t


def expected_image(h: int, w: int) -> list[int]:
    """The greedy image of :func:`table`'s default rule, spelled out: boi sH sW, rows of codes + row end, eoi."""
    span = [T.boi, T.size_token(32 * h), T.size_token(32 * w)]
    for _ in range(h):
        for _ in range(w):
            span.append(CODES[(span[-1] * 7) % len(CODES)])
        span.append(T.row_end)
    return span + [T.eoi]


def sampler(h=2, w=3, guidance=3.0, window=1, max_new_tokens=16, max_images=1):
    grid = ImageGrid(T, h, w, "lumina", pixel_size=(32 * h, 32 * w))  # any size: the size tokens follow it
    image = ImageSampling(guidance_scale=guidance, top_k=len(CODES), sample=False, window=window)
    return InterleavedSampler(T, grid, image, TextSampling(max_new_tokens=max_new_tokens), max_images=max_images)


def run(prefer, **kw):
    s = sampler(**kw)
    dec = BigramDecoder(table(prefer), rows=1 if kw.get("guidance", 3.0) is None else 2)
    return s.run(dec, PROMPT, torch.Generator().manual_seed(0)), dec


SIZE_IDS = [T.size_token(32 * n) for n in range(1, 5)]
# After the prompt the table prefers tokens banned in text (a code, end-image, row end, a size token): the
# sampler must skip them and take W[2]; then begin-image; after the image W[3]; then end-of-turn.
STORY = {T.eot: [CODES[0], T.eoi, T.row_end, SIZE_IDS[0], T.pad, W[2]], W[2]: [T.boi],
         T.eoi: [T.boi, W[3]], W[3]: [T.eot]}


@pytest.mark.parametrize("guidance,window", [(3.0, 1), (3.0, 4), (None, 1), (None, 16)])
def test_text_then_image_then_text_then_end_of_turn(guidance, window):
    answer, dec = run(STORY, guidance=guidance, window=window)
    image = expected_image(2, 3)
    assert answer.finished
    assert [s["type"] for s in answer.segments] == ["text", "image", "text"]
    assert [s["token_ids"] for s in answer.segments] == [[W[2]], image, [W[3]]]
    assert answer.segments[1]["codes"].tolist() == [T.ids_to_codes(torch.tensor(image[3:6])).tolist(),
                                                    T.ids_to_codes(torch.tensor(image[7:10])).tolist()]
    # Every token was fed once, in order (end-of-turn is not fed: nothing follows it).
    assert dec.committed[0] == PROMPT + [W[2]] + image + [W[3]]
    if guidance is not None:  # the unconditional row saw the image alone (up to end-image, which nothing follows)
        assert dec.committed[1] == image[:-1]
    if window == 1:  # plain: prefill + one forward per token after it
        assert answer.forward_passes == 1 + len(image) + 2
    else:
        assert answer.forward_passes < 1 + len(image) + 2


def test_end_of_sequence_also_ends_the_answer():
    answer, _ = run({**STORY, W[3]: [T.eos]})
    assert answer.finished and answer.segments[-1]["token_ids"] == [W[3]]


@pytest.mark.parametrize("budget,finished,kinds", [(1, False, ["text"]), (2, False, ["text", "image", "text"]),
                                                   (3, True, ["text", "image", "text"])])
def test_the_text_budget_counts_text_tokens_only(budget, finished, kinds):
    answer, _ = run(STORY, max_new_tokens=budget)
    assert answer.finished is finished and [s["type"] for s in answer.segments] == kinds


def test_begin_image_is_banned_once_the_images_are_drawn():
    # After an image the table prefers another one; with max_images=2 it is drawn, with 1 it is not.
    two, dec = run(STORY, max_images=2)
    assert [s["type"] for s in two.segments] == ["text", "image", "image", "text"]
    assert dec.committed[1] == expected_image(2, 3)[:-1]  # the unconditional row restarted for the second image
    # With no image allowed, the second choice after W[2] is taken instead of begin-image.
    none, _ = run({**STORY, W[2]: [T.boi, W[3]]}, max_images=0)
    assert none.finished and [(s["type"], s["token_ids"]) for s in none.segments] == [("text", [W[2], W[3]])]


def test_text_scores_ban_exactly_the_image_only_tokens():
    s = sampler(max_images=1)
    scores = s.text_scores(torch.zeros(V), images_drawn=0)
    banned = set(torch.nonzero(torch.isneginf(scores)).squeeze(1).tolist())
    want = set(CODES) | {T.eoi, T.row_end, T.pad, T.bos} | {T.vocab[f"<reserved{n:05d}>"] for n in range(8800, 8811)}
    assert banned == want and set(image_only_ids(T).tolist()) == want - {T.pad, T.bos}
    assert torch.isneginf(s.text_scores(torch.zeros(V), images_drawn=1)[T.boi])


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="max_images"):
        sampler(max_images=-1)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        TextSampling(max_new_tokens=0)
    with pytest.raises(ConfigError, match="2 decoder rows"):
        sampler().run(BigramDecoder(table(STORY), rows=1), PROMPT, torch.Generator())
