"""Training FLOPs of a Chameleon step by the standard formulas (6N, 8N with recomputation, plus attention).

``N`` counts the parameters that take part in matrix multiplies: every linear layer of the decoder and
``lm_head``. Embedding lookups and norms do no matmul work and are left out, as in the PaLM/Megatron
accounting. Per token of a sequence of length ``s`` with ``L`` layers and width ``h``:

- forward: ``2 N`` for the linears, plus ``4 L s h`` for attention (``Q K^T`` and ``A V`` over the full
  ``s x s`` square; causal kernels skip half, the convention still counts it);
- backward: twice the forward;
- activation checkpointing recomputes each decoder layer's forward once more (``lm_head`` is not
  inside a checkpointed layer, so it stays at 6 per parameter).

These are *model* FLOPs, the numerator of MFU. They count weight gradients for every matrix even when
the base is frozen (LoRA), which is the convention MFU figures are quoted in; the FLOPs a LoRA step
really executes are lower and are counted separately with ``torch.utils.flop_counter``.
"""

from __future__ import annotations


def matmul_params(config) -> dict[str, int]:
    """Parameters in matrix multiplies: ``{"decoder": ..., "lm_head": ...}`` for a ``ChameleonConfig``."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = h // config.num_attention_heads
    kv = (config.num_key_value_heads or config.num_attention_heads) * head_dim
    per_layer = h * h * 2 + h * kv * 2 + h * i * 3  # q, o; k, v; gate, up, down
    return {"decoder": config.num_hidden_layers * per_layer, "lm_head": config.vocab_size * h}


def attention_flops_per_token(config, seq: int) -> int:
    """Forward attention-score FLOPs per token (``Q K^T`` and ``A V``), all layers."""
    return 4 * config.num_hidden_layers * seq * config.hidden_size


def training_flops_per_token(config, seq: int, *, recompute: bool) -> int:
    """Model FLOPs per trained token of one forward + backward (see the module docstring)."""
    n = matmul_params(config)
    passes = 4 if recompute else 3  # forward, backward (2x), and the recomputed forward
    return 2 * passes * n["decoder"] + 6 * n["lm_head"] + passes * attention_flops_per_token(config, seq)


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    # torch's counter registers addmm but not the in-place addmm_ (the fused loss accumulates its
    # lm_head weight gradient with it).
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_flops(fn) -> tuple[int, object]:
    """Run ``fn()`` under ``torch.utils.flop_counter.FlopCounterMode``; return ``(FLOPs, fn's result)``.

    This is the executed count (matmuls, convolutions and fused attention kernels as dispatched), an
    independent check of :func:`training_flops_per_token`.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flops}) as counter:
        result = fn()
    return counter.get_total_flops(), result
