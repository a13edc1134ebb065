"""One handle per base checkpoint directory: its config, tokens, tokenizer, q/k layout and VQGAN, each read once.

Training, pre-tokenization, evaluation and generation all take a :class:`CheckpointAssets` instead of a
path, so ``config.json``'s vocabulary is parsed once per process (not once per consumer) and every
consumer agrees on what the checkpoint is.
"""

from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path

import torch

from chameleon_ft.errors import CheckpointError
from chameleon_ft.model.checkpoint import (
    detect_qk_layout,
    iter_tensors,
    load_config,
    load_model,
    load_tokenizer,
    tensor_shapes,
    weight_files,
)
from chameleon_ft.model.tokens import ChameleonTokens
from chameleon_ft.vq.vqgan import META_CKPT, TOKENIZER_SUBDIR, VQ_PREFIX, load_vqgan

_checksums: dict[tuple, str] = {}


def file_checksum(path: str | Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _checksums:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _checksums[key] = h.hexdigest()
    return _checksums[key]


class CheckpointAssets:
    """A local Hugging Face-format Chameleon directory and what is read from it (lazily, once).

    Use :meth:`open` to share one handle per directory in a process.
    """

    _open: dict[tuple, CheckpointAssets] = {}

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path}: no config.json there; point model.path at a local Chameleon "
                                  "checkpoint directory (Hugging Face format)")
        self._vqgans: dict[str, torch.nn.Module] = {}

    @classmethod
    def open(cls, path: str | Path) -> CheckpointAssets:
        """The shared handle of ``path`` (a new one if its ``config.json`` changed since)."""
        p = Path(path).expanduser().resolve()
        cfg = p / "config.json"
        key = (str(p), cfg.stat().st_mtime_ns if cfg.is_file() else None)
        if key not in cls._open:
            cls._open[key] = cls(p)
        return cls._open[key]

    def __repr__(self) -> str:
        return f"CheckpointAssets({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @cached_property
    def config(self):
        """The ``ChameleonConfig`` (special-token ids corrected from the vocabulary)."""
        return load_config(self.path)

    @cached_property
    def tokens(self) -> ChameleonTokens:
        """Every special and image token id, resolved by name."""
        return ChameleonTokens.from_checkpoint(self.path)

    @cached_property
    def tokenizer(self):
        """The text tokenizer (``tokenizer.json``)."""
        return load_tokenizer(self.path)

    @cached_property
    def qk_layout(self) -> str:
        """``grouped`` (Lumina-mGPT) or ``expanded`` (transformers' conversion), from the tensor shapes."""
        shapes = {k: v for k, v in tensor_shapes(self.path).items() if not k.startswith(VQ_PREFIX)}
        return detect_qk_layout(shapes, self.config)

    @property
    def default_image_layout(self) -> str:
        """The image-token layout a checkpoint of this family was trained on: Lumina-mGPT's for grouped."""
        return "lumina" if self.qk_layout == "grouped" else "chameleon"

    def image_layout(self, setting: str = "auto") -> str:
        """``setting`` (``data.image_layout``), with ``auto`` resolved to :attr:`default_image_layout`."""
        return self.default_image_layout if setting == "auto" else setting

    @cached_property
    def vq_resolution(self) -> int:
        """The VQGAN's native image side in pixels (512 for Chameleon, 64 for the tiny checkpoint)."""
        vq = getattr(self.config, "vq_config", None)
        res = getattr(vq, "resolution", None) if vq is not None and not isinstance(vq, dict) else (vq or {}).get("resolution")
        return int(res) if res else int(self.vqgan("cpu").config.resolution)

    def vqgan(self, device: str | torch.device = "cpu"):
        """The VQGAN on ``device`` (loaded on first use per device)."""
        key = str(torch.device(device))
        if key not in self._vqgans:
            self._vqgans[key] = load_vqgan(self.path, device=device)
        return self._vqgans[key]

    @cached_property
    def tokenizer_checksum(self) -> str:
        return file_checksum(self.path / "tokenizer.json")

    @cached_property
    def vq_checksum(self) -> str:
        """Checksum of the VQ weights the encoder uses: Meta's ``vqgan.ckpt`` if present, else the
        ``model.vqmodel.*`` tensors of the Hugging Face weights."""
        ckpt = self.path / TOKENIZER_SUBDIR / META_CKPT
        if ckpt.exists():
            return file_checksum(ckpt)
        h = hashlib.sha256()
        names = sorted(n for n in weight_files(self.path) if n.startswith(VQ_PREFIX))
        for name, t in sorted(iter_tensors(self.path, names)):
            h.update(name.encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def load_model(self, **kwargs):
        """:func:`chameleon_ft.model.checkpoint.load_model` of this directory."""
        return load_model(self.path, **kwargs)


def as_assets(checkpoint: CheckpointAssets | str | os.PathLike) -> CheckpointAssets:
    """``checkpoint`` itself, or the shared handle of a checkpoint directory path."""
    return checkpoint if isinstance(checkpoint, CheckpointAssets) else CheckpointAssets.open(checkpoint)
