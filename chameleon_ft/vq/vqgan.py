"""Chameleon's VQGAN image tokenizer ("Make-a-Scene" style, taming-transformers layout).

Submodule names are exactly the keys of Meta's ``tokenizer/vqgan.ckpt`` (``encoder.*``, ``decoder.*``,
``quantize.embedding.weight``, ``quant_conv.*``, ``post_quant_conv.*``), so Meta's file loads with
strict key checking. The encoder is transformers' ``ChameleonVQVAEEncoder`` (same key names as
taming's); the decoder, which transformers does not ship, is taming's ``Decoder`` written here.

Two on-disk sources are read: Meta's ``tokenizer/vqgan.yaml`` + ``vqgan.ckpt`` (encoder *and*
decoder) and a Hugging Face checkpoint's ``config.json`` ``vq_config`` + ``model.vqmodel.*`` tensors
(the decoder was dropped by the conversion, so such a VQGAN can encode but not decode).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from chameleon_ft.errors import ChameleonFTError

VQ_PREFIX = "model.vqmodel."
META_YAML = "vqgan.yaml"
META_CKPT = "vqgan.ckpt"
TOKENIZER_SUBDIR = "tokenizer"
GROUPS = 32  # taming's Normalize(): GroupNorm(32, C, eps=1e-6)


class VQGANError(ChameleonFTError, ValueError):
    """Bad VQGAN configuration or bad input to :class:`VQGAN` (wrong shape, code out of range...)."""


class VQGANLoadError(VQGANError):
    """A VQGAN file is missing, unreadable, unsafe to unpickle, or does not match the model's keys."""


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclass
class VQGANConfig:
    """VQGAN hyperparameters under Meta's / taming's names; defaults are Chameleon's real VQGAN."""

    embed_dim: int = 256
    n_embed: int = 8192
    z_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    dropout: float = 0.0
    double_z: bool = False

    def __post_init__(self) -> None:
        self.ch_mult = [int(m) for m in self.ch_mult]
        self.attn_resolutions = [int(r) for r in (self.attn_resolutions or [])]
        if not self.ch_mult:
            raise VQGANError("VQGANConfig: ch_mult must not be empty")
        for name in ("embed_dim", "n_embed", "z_channels", "resolution", "in_channels", "out_ch", "ch", "num_res_blocks"):
            if int(getattr(self, name)) <= 0:
                raise VQGANError(f"VQGANConfig: {name} must be positive, got {getattr(self, name)}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % GROUPS]
        if bad:
            raise VQGANError(f"VQGANConfig: channel counts {bad} (ch * ch_mult) must be multiples of {GROUPS} for GroupNorm")
        if self.double_z:
            # A VQ model quantizes z directly; taming's quant_conv takes z_channels, so double_z cannot load.
            raise VQGANError("VQGANConfig: double_z=True is a KL-autoencoder setting; a VQGAN needs double_z=False")

    @property
    def downsample(self) -> int:
        """Pixels per code along each side (16 for Chameleon)."""
        return 2 ** (len(self.ch_mult) - 1)

    # --- Hugging Face (transformers ChameleonVQVAEConfig / config.json "vq_config") -------------
    @classmethod
    def from_hf_dict(cls, vq: dict, source: str = "vq_config") -> VQGANConfig:
        """From a ``config.json`` ``vq_config`` dict; missing keys take transformers' defaults."""
        if not isinstance(vq, dict):
            raise VQGANError(f"{source}: vq_config must be a JSON object, got {type(vq).__name__}")
        attn_type = vq.get("attn_type", "vanilla")
        if attn_type != "vanilla":
            raise VQGANError(f"{source}: attn_type={attn_type!r} is not supported (Chameleon's VQGAN uses 'vanilla')")
        d = cls()
        try:
            return cls(
                embed_dim=vq.get("embed_dim", d.embed_dim),
                n_embed=vq.get("num_embeddings", d.n_embed),
                z_channels=vq.get("latent_channels", d.z_channels),
                resolution=vq.get("resolution", d.resolution),
                in_channels=vq.get("in_channels", d.in_channels),
                out_ch=vq.get("in_channels", d.in_channels),  # HF has no out_ch: the decoder mirrors the input
                ch=vq.get("base_channels", d.ch),
                ch_mult=list(vq.get("channel_multiplier", d.ch_mult)),
                num_res_blocks=vq.get("num_res_blocks", d.num_res_blocks),
                attn_resolutions=list(vq.get("attn_resolutions") or []),
                dropout=vq.get("dropout", d.dropout),
                double_z=vq.get("double_latent", d.double_z),
            )
        except VQGANError as e:
            raise VQGANError(f"{source}: {e}") from e

    def to_hf_dict(self) -> dict:
        """The ``vq_config`` dict of a Hugging Face ``config.json``."""
        return {
            "embed_dim": self.embed_dim,
            "num_embeddings": self.n_embed,
            "latent_channels": self.z_channels,
            "resolution": self.resolution,
            "in_channels": self.in_channels,
            "base_channels": self.ch,
            "channel_multiplier": list(self.ch_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_resolutions": list(self.attn_resolutions),
            "dropout": self.dropout,
            "double_latent": self.double_z,
            "attn_type": "vanilla",
        }

    def to_hf_config(self):
        """A transformers ``ChameleonVQVAEConfig`` (used to build the encoder)."""
        from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig

        return ChameleonVQVAEConfig(**self.to_hf_dict())

    # --- Meta (taming vqgan.yaml) -------------------------------------------------------------
    @classmethod
    def from_meta_dict(cls, cfg: dict, source: str = META_YAML) -> VQGANConfig:
        """From a parsed taming ``vqgan.yaml``: ``model.params.{embed_dim, n_embed, ddconfig}``."""
        try:
            params = cfg["model"]["params"]
            dd = params["ddconfig"]
            kwargs = {"embed_dim": params["embed_dim"], "n_embed": params["n_embed"]}
        except (KeyError, TypeError) as e:
            raise VQGANError(f"{source}: not a taming VQGAN config (need model.params.embed_dim, n_embed, ddconfig): missing {e}") from e
        names = {f.name for f in fields(cls)} - set(kwargs)
        kwargs.update({k: v for k, v in dd.items() if k in names})
        try:
            return cls(**kwargs)
        except VQGANError as e:
            raise VQGANError(f"{source}: {e}") from e

    @classmethod
    def from_meta_yaml(cls, path: str | Path) -> VQGANConfig:
        """Read Meta's ``tokenizer/vqgan.yaml``."""
        path = Path(path)
        try:
            cfg = yaml.safe_load(path.read_text())
        except FileNotFoundError as e:
            raise VQGANLoadError(f"{path}: not found") from e
        except yaml.YAMLError as e:
            raise VQGANLoadError(f"{path}: invalid YAML ({e})") from e
        return cls.from_meta_dict(cfg, source=str(path))

    def to_meta_dict(self) -> dict:
        """The taming ``vqgan.yaml`` structure (only what inference needs)."""
        dd = asdict(self)
        params = {"embed_dim": dd.pop("embed_dim"), "n_embed": dd.pop("n_embed"), "ddconfig": dd}
        return {"model": {"target": "taming.models.vqgan.VQModel", "params": params}}


def vq_config_dict(cfg: VQGANConfig) -> dict:
    """``config.json``'s ``vq_config`` for ``cfg`` (see :meth:`VQGANConfig.to_hf_dict`)."""
    return cfg.to_hf_dict()


# ---------------------------------------------------------------------------------------------
# Modules (taming key names)
# ---------------------------------------------------------------------------------------------
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=GROUPS, num_channels=channels, eps=1e-6, affine=True)


class _ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # taming's default (conv_shortcut=False) is a 1x1 "network-in-network" shortcut.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class _AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # single head over all pixels, scale c**-0.5
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """taming-transformers' ``Decoder`` (no timestep embedding, vanilla attention)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.resolution // cfg.downsample
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = _ResnetBlock(block_in, block_in, cfg.dropout)
        self.mid.attn_1 = _AttnBlock(block_in)
        self.mid.block_2 = _ResnetBlock(block_in, block_in, cfg.dropout)
        levels = []
        for i_level in reversed(range(self.num_resolutions)):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(_ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    level.attn.append(_AttnBlock(block_in))
            if i_level != 0:
                level.upsample = _Upsample(block_in)
                curr_res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # indexed by level, as in taming's state dict
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Codebook(nn.Module):
    """Nearest-neighbour quantizer; only the ``embedding`` table is stored (``quantize.embedding.weight``)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def nearest(self, z: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Index of the closest codebook row for each row of ``z`` [N, D] (squared L2, fp32)."""
        e = self.embedding.weight.float()
        e2 = (e * e).sum(1)
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for s in range(0, z.shape[0], chunk):  # bounded memory: N x n_embed distances per chunk
            zc = z[s : s + chunk].float()
            # |z|^2 is constant per row, so argmin(|z|^2 + |e|^2 - 2 z.e) = argmin(|e|^2 - 2 z.e)
            out[s : s + chunk] = torch.argmin(e2 - 2 * zc @ e.t(), dim=1)
        return out


class VQGAN(nn.Module):
    """Chameleon's VQGAN: ``encode`` pixels in [-1, 1] to codes, ``decode`` codes back to pixels.

    ``with_decoder=False`` builds the encoder half only (what a Hugging Face checkpoint holds).
    The module is always in eval mode after construction; it is a frozen tokenizer.
    """

    def __init__(self, config: VQGANConfig, with_decoder: bool = True):
        super().__init__()
        from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAEEncoder

        self.config = config
        self.encoder = ChameleonVQVAEEncoder(config.to_hf_config())
        self.decoder = Decoder(config) if with_decoder else None
        self.quantize = _Codebook(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder_missing_reason = "" if with_decoder else "it was built without a decoder"
        self.eval()

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def _param(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """``quant_conv(encoder(x))``: [B, embed_dim, h, w]."""
        return self.quant_conv(self.encoder(pixels))

    def check_pixels(self, pixels: torch.Tensor) -> None:
        """Raise :class:`VQGANError` unless ``pixels`` is a float [B, in_channels, H, W] batch, H and W multiples of 16."""
        ds, c = self.config.downsample, self.config.in_channels
        if not isinstance(pixels, torch.Tensor):
            raise VQGANError(f"encode: expected a tensor, got {type(pixels).__name__}")
        if pixels.dim() != 4 or pixels.shape[1] != c:
            raise VQGANError(f"encode: expected pixels of shape [B, {c}, H, W], got {list(pixels.shape)}")
        if not pixels.is_floating_point():
            raise VQGANError(f"encode: expected float pixels in [-1, 1], got dtype {pixels.dtype}")
        h, w = pixels.shape[-2:]
        if h % ds or w % ds or h == 0 or w == 0:
            raise VQGANError(f"encode: image size {h}x{w} is not a positive multiple of the VQGAN's downsampling ({ds})")

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, H/16, W/16]`` (LongTensor, on the module's device) of ``pixels`` ``[B, 3, H, W]`` in [-1, 1]."""
        self.check_pixels(pixels)
        p = self._param()
        z = self._latents(pixels.to(device=p.device, dtype=p.dtype))
        b, d, h, w = z.shape
        codes = self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, d))
        return codes.view(b, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, 16h, 16w]`` clamped to [-1, 1] for codes ``[B, h, w]``."""
        if self.decoder is None:
            raise VQGANError(
                f"decode: this VQGAN has no decoder ({self.decoder_missing_reason}); Hugging Face "
                "checkpoints drop it -- use Meta's tokenizer/vqgan.ckpt (load_meta_vqgan / load_vqgan) to decode"
            )
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
            shape = list(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise VQGANError(f"decode: expected codes of shape [B, h, w], got {shape}")
        if codes.is_floating_point() or codes.dtype == torch.bool:
            raise VQGANError(f"decode: expected integer codes, got dtype {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.n_embed):
            raise VQGANError(
                f"decode: codes must be in [0, {self.config.n_embed}), got range [{int(codes.min())}, {int(codes.max())}]"
            )
        emb = self.quantize.embedding(codes.to(self._param().device).long())  # [B, h, w, D]
        x = self.decoder(self.post_quant_conv(emb.permute(0, 3, 1, 2).contiguous()))
        return x.clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Loading (strict) and saving
# ---------------------------------------------------------------------------------------------
def _load_strict(vqgan: VQGAN, state: dict[str, torch.Tensor], source: str) -> None:
    expected = vqgan.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}" + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}" + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
        raise VQGANLoadError(f"{source}: VQGAN weights do not match the config: " + "; ".join(parts))
    for k, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise VQGANLoadError(f"{source}: {k} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(expected[k].shape):
            raise VQGANLoadError(f"{source}: {k} has shape {list(t.shape)}, the config expects {list(expected[k].shape)}")
    vqgan.load_state_dict(state, strict=True)


def _finish(vqgan: VQGAN, device, dtype) -> VQGAN:
    vqgan = vqgan.to(dtype=dtype)
    if device is not None:
        vqgan = vqgan.to(device)
    return vqgan.eval()


def load_meta_vqgan(tokenizer_dir: str | Path, *, device=None, dtype: torch.dtype = torch.float32) -> VQGAN:
    """Load Meta's ``vqgan.yaml`` + ``vqgan.ckpt`` (Lightning ``{"state_dict": ...}``) with strict keys."""
    tokenizer_dir = Path(tokenizer_dir)
    cfg = VQGANConfig.from_meta_yaml(tokenizer_dir / META_YAML)
    ckpt = tokenizer_dir / META_CKPT
    if not ckpt.is_file():
        raise VQGANLoadError(f"{ckpt}: not found")
    try:
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VQGANLoadError(
            f"{ckpt}: cannot be loaded safely with torch.load(weights_only=True) -- it holds objects other than "
            f"tensors and plain containers, or is corrupt ({first})"
        ) from e
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise VQGANLoadError(f"{ckpt}: expected a Lightning-style {{'state_dict': ...}} checkpoint")
    with torch.device("meta"):
        vqgan = VQGAN(cfg)
    vqgan = vqgan.to_empty(device="cpu")
    _load_strict(vqgan, dict(obj["state_dict"]), str(ckpt))
    return _finish(vqgan, device, dtype)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise VQGANLoadError(f"{path}: not found") from e
    except json.JSONDecodeError as e:
        raise VQGANLoadError(f"{path}: invalid JSON ({e.msg})") from e


def _hf_vq_files(checkpoint_dir: Path) -> dict[str, list[str]]:
    """``{shard file: [model.vqmodel.* names]}`` from the index, or from a single ``model.safetensors``."""
    index = checkpoint_dir / "model.safetensors.index.json"
    single = checkpoint_dir / "model.safetensors"
    by_file: dict[str, list[str]] = {}
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise VQGANLoadError(f"{index}: has no 'weight_map'")
        for name, fname in weight_map.items():
            if name.startswith(VQ_PREFIX):
                by_file.setdefault(fname, []).append(name)
        source = index
    elif single.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(single), framework="pt") as f:
                by_file[single.name] = [k for k in f.keys() if k.startswith(VQ_PREFIX)]
        except (SafetensorError, OSError) as e:
            raise VQGANLoadError(f"{single}: cannot read safetensors ({e})") from e
        source = single
    else:
        raise VQGANLoadError(f"{checkpoint_dir}: no model.safetensors.index.json or model.safetensors")
    if not any(by_file.values()):
        raise VQGANLoadError(f"{source}: no {VQ_PREFIX}* tensors (the VQGAN weights are missing)")
    return by_file


def load_hf_vqgan(checkpoint_dir: str | Path, *, device=None, dtype: torch.dtype = torch.float32) -> VQGAN:
    """Load the ``model.vqmodel.*`` tensors and ``vq_config`` of a Hugging Face-format checkpoint.

    Only the VQ tensors are read (``safetensors.safe_open``). The conversion drops the decoder, so the
    result decodes only if ``model.vqmodel.decoder.*`` tensors happen to be present.
    """
    from safetensors import SafetensorError, safe_open

    checkpoint_dir = Path(checkpoint_dir)
    cfg_file = checkpoint_dir / "config.json"
    vq = _read_json(cfg_file).get("vq_config")
    if vq is None:
        raise VQGANLoadError(f"{cfg_file}: has no 'vq_config'")
    cfg = VQGANConfig.from_hf_dict(vq, source=f"{cfg_file} vq_config")
    by_file = _hf_vq_files(checkpoint_dir)
    state: dict[str, torch.Tensor] = {}
    for fname, names in by_file.items():
        path = checkpoint_dir / fname
        try:
            with safe_open(str(path), framework="pt") as f:
                available = set(f.keys())
                for name in names:
                    if name not in available:
                        raise VQGANLoadError(f"{path}: tensor {name} listed in the index is not in the file")
                    state[name[len(VQ_PREFIX) :]] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise VQGANLoadError(f"{path}: cannot read safetensors ({e})") from e
    with_decoder = any(k.startswith("decoder.") for k in state)
    with torch.device("meta"):
        vqgan = VQGAN(cfg, with_decoder=with_decoder)
    vqgan = vqgan.to_empty(device="cpu")
    _load_strict(vqgan, state, f"{checkpoint_dir} ({VQ_PREFIX}* tensors)")
    if not with_decoder:
        vqgan.decoder_missing_reason = f"{checkpoint_dir} is a Hugging Face checkpoint, whose conversion dropped the VQ decoder"
    return _finish(vqgan, device, dtype)


def load_vqgan(checkpoint_dir: str | Path, *, device=None, dtype: torch.dtype = torch.float32) -> VQGAN:
    """The checkpoint's VQGAN: Meta's ``tokenizer/vqgan.{yaml,ckpt}`` if present (with decoder), else HF weights."""
    checkpoint_dir = Path(checkpoint_dir)
    tok = checkpoint_dir / TOKENIZER_SUBDIR
    if (tok / META_YAML).is_file() and (tok / META_CKPT).is_file():
        return load_meta_vqgan(tok, device=device, dtype=dtype)
    if (checkpoint_dir / "config.json").is_file():
        return load_hf_vqgan(checkpoint_dir, device=device, dtype=dtype)
    raise VQGANLoadError(
        f"{checkpoint_dir}: no VQGAN found (looked for {TOKENIZER_SUBDIR}/{META_YAML} + {META_CKPT}, and config.json)"
    )


def _plain_state(vqgan: VQGAN, skip_decoder: bool) -> dict[str, torch.Tensor]:
    # Detached, contiguous CPU copies: no shared storage (safetensors) and plain tensors (weights_only).
    return {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in vqgan.state_dict().items()
        if not (skip_decoder and k.startswith("decoder."))
    }


def save_meta_vqgan(vqgan: VQGAN, tokenizer_dir: str | Path) -> Path:
    """Write Meta's ``vqgan.yaml`` + ``vqgan.ckpt`` (``{"state_dict": ...}``) into ``tokenizer_dir``."""
    if not vqgan.has_decoder:
        raise VQGANError(f"save_meta_vqgan: this VQGAN has no decoder ({vqgan.decoder_missing_reason}); Meta's format requires one")
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / META_YAML).write_text(yaml.safe_dump(vqgan.config.to_meta_dict(), sort_keys=False))
    # Write then rename, so a crash never leaves a half-written ckpt under the real name.
    fd, tmp = tempfile.mkstemp(dir=tokenizer_dir, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"state_dict": _plain_state(vqgan, skip_decoder=False)}, tmp)
        os.replace(tmp, tokenizer_dir / META_CKPT)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return tokenizer_dir


def vqgan_hf_state_dict(vqgan: VQGAN) -> dict[str, torch.Tensor]:
    """``model.vqmodel.*`` tensors as a Hugging Face checkpoint stores them (no decoder)."""
    return {VQ_PREFIX + k: v for k, v in _plain_state(vqgan, skip_decoder=True).items()}
