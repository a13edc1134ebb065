"""Interleaved answers: text until the model opens an image, a grid-constrained guided image, text again.

One answer runs this state machine (:class:`InterleavedSampler`)::

    TEXT  --begin-image-->  IMAGE  (size tokens, rows, row ends and end-image forced by the grid;
                                    codes drawn with classifier-free guidance, plain or SJD)
    IMAGE --end-image---->  TEXT
    TEXT  --end-of-turn or </s>--> END (finished)
    TEXT  --max_new_tokens text tokens drawn--> END (unfinished)

In TEXT, tokens that only exist inside an image (codes, end-image, row end, size tokens) and padding
are banned, and so is begin-image once ``max_images`` images are drawn; text is greedy or top-k
sampled. The unconditional branch of an image is the image alone, as Lumina-mGPT's (and as
training's classifier-free-guidance dropout builds it): its row idles during text and restarts empty
at each begin-image.

The sampler drives any object with :class:`~chameleon_ft.generation.kv_cache.CachedDecoder`'s
interface (``rows``, ``device``, ``prefill``, ``forward``, ``commit``, ``restart``, ``logits``,
``head_rows``, ``forward_passes``), so its transitions can be tested with hand-made logits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from chameleon_ft.data.image_layout import ids_to_image
from chameleon_ft.errors import ConfigError
from chameleon_ft.generation.image_sampler import ImageGrid, ImageSampling, sample_image
from chameleon_ft.generation.logits import NEG_INF, top_k_filter
from chameleon_ft.model.tokens import SIZE_TOKEN_BASE, ChameleonTokens

_RESERVED = re.compile(r"<reserved(\d{5})>")


@dataclass(frozen=True)
class TextSampling:
    """How the text of an interleaved answer is drawn; ``max_new_tokens`` counts text tokens only."""

    max_new_tokens: int = 64
    sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_k: int = 10

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.top_k < 1 or self.temperature <= 0:
            raise ConfigError(f"text sampling needs max_new_tokens >= 1, top_k >= 1 and temperature > 0, got {self}")


@dataclass
class InterleavedAnswer:
    """Segments in order -- ``{"type": "text", "token_ids"}`` or ``{"type": "image", "token_ids", "codes"}``
    (image token ids from begin-image to end-image) -- whether the answer ended with end-of-turn, and the
    forward passes it took."""

    segments: list[dict] = field(default_factory=list)
    finished: bool = False
    forward_passes: int = 0

    @property
    def token_ids(self) -> list[int]:
        return [t for s in self.segments for t in s["token_ids"]]


def image_only_ids(tokens: ChameleonTokens) -> torch.Tensor:
    """Ids that only exist inside an image: codes, end-image, row end and the size tokens."""
    sizes = [i for name, i in tokens.vocab.items()
             if (m := _RESERVED.fullmatch(name)) and int(m.group(1)) >= SIZE_TOKEN_BASE]
    return torch.tensor(sorted({*tokens.image_token_ids.tolist(), tokens.eoi, tokens.row_end, *sizes}))


class InterleavedSampler:
    """Draws one interleaved answer; see the module docstring for the states and transitions."""

    def __init__(self, tokens: ChameleonTokens, grid: ImageGrid, image: ImageSampling, text: TextSampling,
                 max_images: int = 1):
        if max_images < 0:
            raise ConfigError(f"max_images={max_images} must be >= 0")
        self.tokens, self.grid, self.image, self.text, self.max_images = tokens, grid, image, text, int(max_images)
        self.banned_in_text = torch.cat([image_only_ids(tokens), torch.tensor([tokens.pad, tokens.bos])])
        self.stop = (tokens.eot, tokens.eos)

    def capacity(self, prompt_len: int) -> int:
        """KV-cache slots an answer can need after a prompt of ``prompt_len`` tokens."""
        return prompt_len + self.text.max_new_tokens + self.max_images * (self.grid.length + 1) + self.image.window + 2

    def text_scores(self, logits: torch.Tensor, images_drawn: int) -> torch.Tensor:
        """``logits`` ``[V]`` with what TEXT forbids set to ``-inf`` (begin-image too once the images are drawn)."""
        scores = logits.float().clone()
        scores[self.banned_in_text.to(scores.device)] = NEG_INF
        if images_drawn >= self.max_images:
            scores[self.tokens.boi] = NEG_INF
        return scores

    def _next_text_token(self, logits: torch.Tensor, images_drawn: int, generator: torch.Generator) -> int:
        scores = self.text_scores(logits, images_drawn)
        if not self.text.sample:
            return int(scores.argmax())
        scores = top_k_filter(scores / self.text.temperature, self.text.top_k)
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))

    def run(self, decoder, prompt: list[int], generator: torch.Generator) -> InterleavedAnswer:
        """One answer to ``prompt`` (token ids ending where the assistant's turn starts).

        ``decoder`` has one row, or two with guidance (``[cond, uncond]``), and room for
        :meth:`capacity` slots.
        """
        n_rows = 2 if self.image.guidance_scale is not None else 1
        if decoder.rows != n_rows:
            raise ConfigError(f"an interleaved answer needs {n_rows} decoder rows, got {decoder.rows}")
        device = decoder.device
        ids = torch.full((n_rows, len(prompt)), self.tokens.pad, dtype=torch.long)
        ids[0] = torch.as_tensor(prompt, dtype=torch.long)
        mask = torch.zeros_like(ids)
        mask[0] = 1  # the unconditional row starts empty
        hidden = decoder.prefill(ids, mask)[0]
        cond_only = torch.arange(n_rows, device=device) == 0
        answer, text, n_text, n_images = InterleavedAnswer(), [], 0, 0
        while True:
            token = self._next_text_token(decoder.logits(hidden[None, None])[0, 0], n_images, generator)
            if token in self.stop:
                answer.finished = True
                break
            if token == self.tokens.boi:
                if text:
                    answer.segments.append({"type": "text", "token_ids": text})
                    text = []
                decoder.restart(~cond_only)  # a fresh unconditional context: the image alone
                pending = torch.full((1,), token, dtype=torch.long, device=device)
                span = [token] + sample_image(decoder, 0, self.grid, self.image, generator, pending=pending)[0].tolist()
                codes, _ = ids_to_image(span, self.tokens, self.grid.layout, grid=(self.grid.h, self.grid.w))
                answer.segments.append({"type": "image", "token_ids": span, "codes": codes})
                n_images += 1
                token = span[-1]  # end-image, still to be fed: the text goes on after it
            else:
                text.append(token)
                n_text += 1
                if n_text >= self.text.max_new_tokens:
                    break  # the text budget is spent: an unfinished answer
            fed = torch.full((n_rows, 1), self.tokens.pad, dtype=torch.long, device=device)
            fed[0, 0] = token
            hidden = decoder.forward(fed, real=cond_only)[0, -1]
            decoder.commit(cond_only.long())
        if text:
            answer.segments.append({"type": "text", "token_ids": text})
        answer.forward_passes = decoder.forward_passes
        return answer
