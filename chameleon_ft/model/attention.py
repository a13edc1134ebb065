"""Attention implementations, and packed documents without a dense ``T x T`` mask.

A packed batch reaches the model in one of two layouts (:class:`chameleon_ft.data.collator.ConversationCollator`):

- rows: ``[B, T]`` rows of several samples with a boolean block-diagonal mask ``[B, 1, T, T]``
  (``sdpa``; exact, but the mask is O(T^2) and rules out SDPA's flash kernel);
- documents: every sample of the batch concatenated into one row ``[1, N]`` with position ids that
  restart at each sample and no mask at all. The document boundaries are where the position ids
  restart; each implementation turns them into its own O(N) description:

  - ``sdpa_documents`` (registered here): one causal SDPA call per document, no mask, so SDPA may use
    its fused kernels (flash on CUDA and CPU);
  - ``flash_attention_2``: flash-attn's varlen kernel with ``cu_seq_lens`` (transformers' padding-free
    path);
  - ``flex_attention``: a FlexAttention ``BlockMask`` that transformers builds from the restarting
    position ids (block tables of ``(N/128)^2`` entries, no dense mask);
  - ``eager``: transformers builds a float mask from the position ids (dense; for reference only).

``auto`` picks ``flash_attention_2`` on CUDA when flash-attn is installed, else ``sdpa_documents``.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from chameleon_ft.errors import ConfigError, DataError

SDPA_DOCUMENTS = "sdpa_documents"
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"
# Implementations that take the documents layout (position ids restarting, no mask).
DOCUMENT_IMPLEMENTATIONS = (SDPA_DOCUMENTS, "flash_attention_2", "flex_attention", "eager")
# Implementations whose attention function reads the boundaries from ``cu_seq_lens_*`` keyword arguments.
_CU_SEQLENS_IMPLEMENTATIONS = (SDPA_DOCUMENTS, "flash_attention_2")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", *DOCUMENT_IMPLEMENTATIONS)


def flash_attn_available() -> bool:
    """flash-attn is importable and a CUDA device is present."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(name: str, device_type: str = "cpu") -> str:
    """The implementation ``name`` stands for on ``device_type`` (``auto`` -> the best one available).

    Raises :class:`ConfigError` for an unknown name, and for ``flash_attention_2`` without flash-attn or CUDA.
    """
    name = str(name)
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"model.attn_implementation={name!r}: unknown; use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "auto":
        return "flash_attention_2" if device_type == "cuda" and flash_attn_available() else SDPA_DOCUMENTS
    if name == "flash_attention_2" and not (device_type == "cuda" and flash_attn_available()):
        raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA device and the flash-attn package "
                          "(pip install flash-attn); sdpa_documents needs neither")
    register_sdpa_documents()
    return name


def takes_documents(name: str) -> bool:
    """Whether a resolved implementation takes packed batches in the documents layout."""
    return name in DOCUMENT_IMPLEMENTATIONS


def check_trainable(name: str, device_type: str) -> None:
    """Refuse an implementation that cannot run backward on ``device_type`` (before any data is read)."""
    if name == "flex_attention" and device_type == "cpu":
        raise ConfigError(f"model.attn_implementation=flex_attention cannot train on CPU: torch {torch.__version__} "
                          "has no FlexAttention backward on CPU; use sdpa_documents (or auto)")


# ---------------------------------------------------------------------------------------------
# Document boundaries
# ---------------------------------------------------------------------------------------------
def restarts(position_ids: torch.Tensor) -> bool:
    """Whether the position ids of a row restart somewhere (several documents in it)."""
    return position_ids.shape[-1] > 1 and bool((position_ids[..., 1:] - position_ids[..., :-1] != 1).any())


def document_kwargs(position_ids: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """``cu_seq_lens_q/k`` and ``max_length_q/k`` (flash-attn's varlen arguments) of a ``[1, N]`` row whose
    position ids restart at every document."""
    if position_ids.shape[0] != 1:
        raise DataError(f"packed documents must be one row [1, N] (the collator's flatten=True); got position ids "
                        f"of shape {list(position_ids.shape)} without an attention mask")
    pos = position_ids.reshape(-1)
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=pos.device), pos[1:] - pos[:-1] != 1])
    cu = torch.cat([starts.nonzero().reshape(-1), torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())  # flash-attn takes the maximum as a Python int
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def attention_kwargs(implementation: str, position_ids: torch.Tensor | None, attention_mask, past_key_values,
                     given: dict) -> dict:
    """Extra keyword arguments for the decoder when a packed documents row reaches ``implementation``."""
    if (implementation not in _CU_SEQLENS_IMPLEMENTATIONS or position_ids is None or attention_mask is not None
            or past_key_values is not None or "cu_seq_lens_q" in given or not restarts(position_ids)):
        return {}
    return document_kwargs(position_ids)


# ---------------------------------------------------------------------------------------------
# sdpa_documents
# ---------------------------------------------------------------------------------------------
def sdpa_documents_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                           max_length_k=None, **kwargs):
    """transformers attention function: with ``cu_seq_lens_q`` (a packed ``[1, N]`` row), one causal
    SDPA call per document; otherwise exactly transformers' ``sdpa`` (unpacked batches are unchanged).

    ``query``/``key``/``value`` are ``[B, heads, N, head_dim]``; returns ``([B, N, heads, head_dim], None)``.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask is not None:
        raise DataError("sdpa_documents: a packed row (cu_seq_lens_q) takes no attention mask")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=q.shape[2] > 1)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _sdpa_documents_mask(*args, attention_mask=None, **kwargs):
    """Mask for ``sdpa_documents``: sdpa's own when there is a padding mask; none for a packed row (the
    documents come from ``cu_seq_lens``, so the dense mask transformers would derive is never built)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_sdpa_documents() -> None:
    """Make ``sdpa_documents`` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if SDPA_DOCUMENTS not in AttentionInterface._global_mapping:
        AttentionInterface.register(SDPA_DOCUMENTS, sdpa_documents_forward)
        AttentionMaskInterface.register(SDPA_DOCUMENTS, _sdpa_documents_mask)
