"""Special tokens and the VQ-code <-> BPE-id map, resolved by *name* from a checkpoint's vocabulary.

Ids differ between checkpoints (and our tiny one deliberately differs from 7B), so nothing here
hard-codes a number: every id comes from the vocabulary that ships with the checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chameleon_ft.errors import CheckpointError
from chameleon_ft.model.json_file import read_json

IMAGE_TOKEN_PREFIX = "IMGIMG"
# Lumina-mGPT's size tokens are <reserved{8800 + pixels // 32}>; row end is <reserved08799>.
SIZE_TOKEN_BASE = 8800
SIZE_TOKEN_PIXELS = 32

NAMES = {
    "bos": "<s>",
    "pad": "<pad>",
    "eos": "</s>",
    "boi": "<racm3:break>",
    "eoi": "<eoss>",
    "eot": "<reserved08706>",
    "image_placeholder": "<image>",
    "row_end": "<reserved08799>",
}


class VocabularyError(CheckpointError):
    """A checkpoint's vocabulary lacks a token the toolkit needs, or is malformed."""


def image_token_code(name: str) -> int:
    """Decode an ``IMGIMG`` token name to its VQ code: letters A-J are digits 0-9, last char dropped."""
    body = name[len(IMAGE_TOKEN_PREFIX) : -1]
    if not body or any(not ("A" <= c <= "J") for c in body):
        raise VocabularyError(f"malformed image token name {name!r}")
    return int("".join(str(ord(c) - ord("A")) for c in body))


def image_token_name(code: int, suffix: str = "Z") -> str:
    """Inverse of :func:`image_token_code` (the suffix is whatever the vocabulary uses)."""
    return IMAGE_TOKEN_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + suffix


@dataclass(frozen=True)
class ChameleonTokens:
    """Every id the toolkit needs, looked up by name in a vocabulary (name -> id)."""

    vocab: dict[str, int] = field(repr=False)
    bos: int
    pad: int
    eos: int
    boi: int
    eoi: int
    eot: int
    image_placeholder: int
    row_end: int
    code_to_id: torch.Tensor = field(repr=False)  # [num_codes] LongTensor: VQ code -> BPE id
    vocab_size: int = 0

    @classmethod
    def from_vocab(cls, vocab: dict[str, int], source: str = "vocabulary") -> ChameleonTokens:
        """Resolve all special tokens and image tokens from ``vocab``; ``source`` names it in errors."""
        if not isinstance(vocab, dict) or not vocab:
            raise VocabularyError(f"{source}: the vocabulary is not a non-empty name -> id object")
        bad = [(k, v) for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            raise VocabularyError(f"{source}: token ids must be non-negative integers; {bad[0][0]!r} has {bad[0][1]!r}")
        ids = {}
        for key, name in NAMES.items():
            if name not in vocab:
                raise VocabularyError(f"{source}: token {name!r} ({key}) is missing from the vocabulary")
            ids[key] = int(vocab[name])
        codes = {}
        for name, idx in vocab.items():
            if name.startswith(IMAGE_TOKEN_PREFIX):
                try:
                    code = image_token_code(name)
                except VocabularyError as e:
                    raise VocabularyError(f"{source}: {e}") from None
                if code in codes:
                    raise VocabularyError(f"{source}: two image tokens map to VQ code {code}")
                codes[code] = int(idx)
        if not codes:
            raise VocabularyError(f"{source}: no {IMAGE_TOKEN_PREFIX}* image tokens in the vocabulary")
        n = max(codes) + 1
        if len(codes) != n:
            missing = sorted(set(range(n)) - set(codes))[:5]
            raise VocabularyError(f"{source}: image codes are not contiguous from 0; missing e.g. {missing}")
        code_to_id = torch.tensor([codes[c] for c in range(n)], dtype=torch.long)
        vocab_size = max(vocab.values()) + 1
        return cls(vocab=dict(vocab), code_to_id=code_to_id, vocab_size=vocab_size, **ids)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ChameleonTokens:
        """Read ``config.json``'s ``vocabulary_map`` of a Hugging Face-format checkpoint directory."""
        cfg_file = Path(path) / "config.json"
        if not cfg_file.exists():
            raise VocabularyError(f"{cfg_file}: not found; is {path} a Chameleon checkpoint directory?")
        cfg = read_json(cfg_file, VocabularyError)
        if not isinstance(cfg, dict):
            raise VocabularyError(f"{cfg_file}: not a JSON object")
        vocab = cfg.get("vocabulary_map")
        if not vocab:
            raise VocabularyError(f"{cfg_file}: has no 'vocabulary_map'")
        return cls.from_vocab(vocab, source=str(cfg_file))

    # --- image tokens -------------------------------------------------------------------------
    @property
    def num_codes(self) -> int:
        return int(self.code_to_id.numel())

    @property
    def image_token_ids(self) -> torch.Tensor:
        """Sorted BPE ids of all VQ image codes (the ids stock transformers masks)."""
        return torch.sort(self.code_to_id).values

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Map VQ codes (any shape) to BPE ids."""
        return self.code_to_id.to(codes.device)[codes.long()]

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Map BPE image-token ids back to VQ codes; raises on a non-image id."""
        lut = torch.full((self.vocab_size,), -1, dtype=torch.long)
        lut[self.code_to_id] = torch.arange(self.num_codes)
        codes = lut.to(ids.device)[ids.long()]
        if (codes < 0).any():
            bad = ids[codes < 0][:5].tolist()
            raise VocabularyError(f"ids {bad} are not image tokens")
        return codes

    def is_image_token(self, ids: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[self.code_to_id] = True
        return mask.to(ids.device)[ids.long()]

    # --- Lumina-mGPT size tokens ----------------------------------------------------------------
    def size_token(self, pixels: int) -> int:
        """Id of Lumina-mGPT's size token for a side of ``pixels`` (``<reserved{8800 + pixels // 32}>``)."""
        if pixels % SIZE_TOKEN_PIXELS:
            raise VocabularyError(f"image side {pixels} px is not a multiple of {SIZE_TOKEN_PIXELS}")
        name = f"<reserved{SIZE_TOKEN_BASE + pixels // SIZE_TOKEN_PIXELS:05d}>"
        if name not in self.vocab:
            raise VocabularyError(f"size token {name!r} for {pixels} px is not in the vocabulary")
        return int(self.vocab[name])

    def size_from_token(self, token_id: int) -> int:
        """Pixels encoded by a size token id (inverse of :meth:`size_token`)."""
        name = self._id_to_name().get(int(token_id), "")
        m = re.fullmatch(r"<reserved(\d{5})>", name)
        if not m or int(m.group(1)) < SIZE_TOKEN_BASE:
            raise VocabularyError(f"id {token_id} ({name!r}) is not a size token")
        return (int(m.group(1)) - SIZE_TOKEN_BASE) * SIZE_TOKEN_PIXELS

    def _id_to_name(self) -> dict[int, str]:
        return {v: k for k, v in self.vocab.items()}
