"""Canonical conversations -> token ids and labels, with images VQ-encoded into the same stream.

Real image-token ids (begin-image, size tokens, codes, row ends, end-image) are written into
``input_ids``, and into ``labels`` where the image is a target. (Transformers' processor inserts
placeholder tokens instead and swaps embeddings inside forward, so the real ids never reach ``labels``.)
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

import torch

from chameleon_ft.data.errors import BadSampleError
from chameleon_ft.data.image_layout import image_to_ids
from chameleon_ft.data.sample import Conversation
from chameleon_ft.data.template import Piece, TokenizedTurn, get_template
from chameleon_ft.model.loss import IGNORE_INDEX
from chameleon_ft.model.tokens import ChameleonTokens
from chameleon_ft.tasks import get_task, task_names


@dataclass
class EncoderOptions:
    layout: str = "lumina"  # chameleon | lumina
    image_size: int = 512
    buckets: bool = False  # Lumina aspect-ratio buckets (lumina layout) instead of a centre crop
    label_mask: str = "assistant"
    template: str = "lumina"
    max_length: int = 4096
    unconditional: bool = False  # also build the classifier-free-guidance form (text-to-image)
    random_crop: bool = False  # Lumina's random crop (inside the bucket) instead of the centre, seeded per sample
    seed: int = 0


class ConversationEncoder:
    """Tokenize canonical records in batches; images are encoded together on the VQGAN's device.

    ``vqgan`` is the VQGAN or a function that loads it, called on the first image (text-only use, such as
    generating from a text prompt, never loads it).
    """

    def __init__(self, text_tokenizer, tokens: ChameleonTokens, vqgan, options: EncoderOptions):
        self.text_tokenizer, self.tokens, self.opt = text_tokenizer, tokens, options
        self._vqgan = vqgan
        self.template = get_template(options.template, tokens)

    @property
    def vqgan(self):
        if callable(self._vqgan) and not isinstance(self._vqgan, torch.nn.Module):
            self._vqgan = self._vqgan()
        return self._vqgan

    # -- images ------------------------------------------------------------------------------------
    @property
    def image_tokenizer(self):
        """Preprocessing (Meta's square crop or Lumina's buckets) and batched VQ encoding of PIL images."""
        if getattr(self, "_image_tokenizer", None) is None:
            from chameleon_ft.vq.image_tokenizer import ImageTokenizer

            self._image_tokenizer = ImageTokenizer(self.vqgan, image_size=self.opt.image_size, bucket=self.opt.buckets)
        return self._image_tokenizer

    def encode_images(self, images: list, rngs: list | None = None) -> list[torch.Tensor]:
        """VQ codes ``[h, w]`` for PIL images, batched by size (``rngs[i]``: a random crop for image ``i``)."""
        return self.image_tokenizer.encode(images, rngs=rngs)

    def _crop_rngs(self, conv: Conversation) -> list:
        """Per image of ``conv``: its random-crop generator (seeded by the sample, fixed across epochs since
        images are VQ-encoded once into the cache), or None for the centre crop."""
        if not self.opt.random_crop:
            return [None] * len(conv.images)
        out = []
        for k in range(len(conv.images)):
            digest = hashlib.blake2b(f"{self.opt.seed}:{conv.source}:{conv.index}:{k}".encode(), digest_size=8)
            out.append(random.Random(int.from_bytes(digest.digest(), "little")))
        return out

    # -- samples -----------------------------------------------------------------------------------
    def _text_ids(self, text: str) -> list[int]:
        return self.text_tokenizer(text, add_special_tokens=False)["input_ids"]

    def _open_and_encode(self, convs: list[Conversation], *, samples: bool = True,
                         ) -> list[list[torch.Tensor] | BadSampleError]:
        """Per conversation: the VQ codes of its images (encoded together, batched by size), or its error.

        ``samples``: these are training samples, which must carry an image when their task needs one.
        """
        opened: list[list | BadSampleError] = []
        for conv in convs:
            try:
                if samples and conv.task in task_names() and get_task(conv.task).needs_image and not conv.images:
                    raise BadSampleError(conv.source, conv.index, "text_only", f"a {conv.task} sample needs an image")
                opened.append([ref.open(conv.source, conv.index) for ref in conv.images])
            except BadSampleError as err:
                opened.append(err)
        flat = [im for imgs in opened if not isinstance(imgs, BadSampleError) for im in imgs]
        rngs = [r for conv, imgs in zip(convs, opened) if not isinstance(imgs, BadSampleError)
                for r in self._crop_rngs(conv)]
        codes_flat = iter(self.encode_images(flat, rngs) if flat else [])
        return [imgs if isinstance(imgs, BadSampleError) else [next(codes_flat) for _ in imgs] for imgs in opened]

    def encode_batch(self, records: list[dict]) -> list[dict | BadSampleError]:
        """Encode canonical records; a bad one yields its :class:`BadSampleError` instead of a sample."""
        convs = [Conversation.from_record(rec) for rec in records]
        results: list[dict | BadSampleError] = []
        for conv, codes in zip(convs, self._open_and_encode(convs), strict=True):
            try:
                results.append(codes if isinstance(codes, BadSampleError) else self._encode_one(conv, codes))
            except BadSampleError as err:
                results.append(err)
        return results

    def encode_prompts(self, convs: list[Conversation]) -> list[list[int]]:
        """The generation prompt of each conversation (its turns, then the assistant's turn opens): exactly
        the ``prompt_ids`` a training sample with these turns has. Raises the first sample's error."""
        out = []
        for conv, codes in zip(convs, self._open_and_encode(convs, samples=False), strict=True):
            if isinstance(codes, BadSampleError):
                raise codes
            turns, _ = self._tokenized_turns(conv, codes)
            out.append(self.template.prompt(turns))
        return out

    def _image_piece(self, codes: torch.Tensor) -> Piece:
        h, w = codes.shape
        ds = self.vqgan.config.downsample
        return Piece(image_to_ids(codes, self.tokens, self.opt.layout, pixel_size=(h * ds, w * ds)), is_image=True)

    def _tokenized_turns(self, conv: Conversation, codes: list[torch.Tensor]) -> tuple[list[TokenizedTurn], list[Piece]]:
        """The turns as token pieces, and the image pieces of assistant turns."""
        it = iter(codes)
        turns, image_pieces = [], []
        meta = conv.meta
        for turn in conv.turns:
            pieces = []
            for seg in turn.segments:
                if seg.image is not None:
                    piece = self._image_piece(next(it))
                    pieces.append(piece)
                    if turn.role == "assistant":
                        image_pieces.append(piece)
                else:
                    text = seg.text
                    # Prompts that name the image size (text-to-image) are re-rendered for the size actually used.
                    if turn.role == "user" and "prompt_template" in meta and "prompt" in meta and codes:
                        h, w = codes[-1].shape
                        ds = self.vqgan.config.downsample
                        text = meta["prompt_template"].format(prompt=meta["prompt"], width=w * ds, height=h * ds)
                    if text:
                        pieces.append(Piece(self._text_ids(text)))
            turns.append(TokenizedTurn(turn.role, pieces))
        return turns, image_pieces

    def _encode_one(self, conv: Conversation, codes: list[torch.Tensor]) -> dict:
        turns, image_pieces = self._tokenized_turns(conv, codes)
        enc = self.template.encode(turns, self.opt.label_mask)
        if len(enc.input_ids) > self.opt.max_length:
            raise BadSampleError(conv.source, conv.index, "too_long",
                                 f"{len(enc.input_ids)} tokens > max_length={self.opt.max_length} "
                                 "(image spans are never cut)")
        if all(x == IGNORE_INDEX for x in enc.labels):
            raise BadSampleError(conv.source, conv.index, "no_trainable_tokens",
                                 f"label_mask={self.opt.label_mask!r} selects no token of this sample")
        last = next((t for t in reversed(conv.turns) if t.role == "assistant"), None)
        out = {
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            "prompt_ids": enc.input_ids[: enc.prompt_len],
            "target": last.text if last is not None else "",
            "task": conv.task,
            "meta": json.dumps(conv.meta, ensure_ascii=False, sort_keys=True),
            "source": conv.source,
            "index": conv.index,
            "uncond_input_ids": [],
            "uncond_labels": [],
        }
        if self.opt.unconditional and image_pieces:
            unc = self.template.unconditional(image_pieces[-1].ids)
            out["uncond_input_ids"], out["uncond_labels"] = unc.input_ids, unc.labels
        return out
