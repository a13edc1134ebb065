"""Language-model loss fused with the LM head, computed in token chunks.

Chameleon's vocabulary is 65,536: float32 logits for a 4,096-token sample are 1 GiB, and autograd would
keep them (plus their softmax) for backward. Here logits exist only one chunk at a time; the gradient
w.r.t. the hidden states (and the head weight, if it trains) is computed chunk by chunk during forward,
so backward is a scale by the incoming gradient. Only positions with a target are ever projected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class LossSums:
    """Sums over target tokens; divide by a (possibly global) token count to normalise."""

    loss_sum: torch.Tensor  # ce_sum + z_loss_weight * z_sum (differentiable)
    ce_sum: torch.Tensor  # detached
    z_sum: torch.Tensor  # detached; sum of logsumexp^2
    n_tokens: torch.Tensor  # long scalar
    token_ce: torch.Tensor  # [N] detached per-target-token cross-entropy, in target order
    token_index: torch.Tensor  # [N] flat indices (b * (T-1) + t) of the targets in the shifted grid


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, z_loss_weight, chunk_size, masked_ids):
        n = hidden.shape[0]
        need_w = weight.requires_grad
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
        z = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_size):
            h = hidden[s : s + chunk_size]
            t = targets[s : s + chunk_size]
            logits = (h @ weight.t()).float()
            if masked_ids is not None:
                logits[:, masked_ids] = float("-inf")  # a masked target then costs inf, as in stock
            lse = torch.logsumexp(logits, dim=-1)
            ce[s : s + chunk_size] = lse - logits.gather(1, t[:, None]).squeeze(1)
            z[s : s + chunk_size] = lse.square()
            if grad_h is None and grad_w is None:
                continue
            # d/dlogits of (ce + w * lse^2) = softmax * (1 + 2 w lse) - onehot; computed in the logits
            # buffer itself so only one chunk-sized float32 buffer is alive (masked ids give exp(-inf) = 0).
            probs = logits.sub_(lse[:, None]).exp_()
            probs.mul_((1.0 + 2.0 * z_loss_weight * lse)[:, None])
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            g = probs.to(weight.dtype)
            if grad_h is not None:
                grad_h[s : s + chunk_size] = g @ weight
            if grad_w is not None:
                grad_w.addmm_(g.t().float(), h.float())
            del logits, probs, g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ce_sum, z_sum = ce.sum(), z.sum()
        return ce_sum + z_loss_weight * z_sum, ce.detach(), z_sum.detach()

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def fused_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss_weight: float = 0.0,
    chunk_size: int = 1024,
    masked_ids: torch.Tensor | None = None,
) -> LossSums:
    """Next-token cross-entropy (+ z-loss) of ``hidden @ weight.T`` against ``labels``.

    ``hidden`` is ``[B, T, H]`` (final-norm output), ``labels`` ``[B, T]`` aligned with the inputs
    (shifted here, ``-100`` ignored). ``masked_ids`` are vocabulary ids whose logits are forced to the
    dtype minimum (stock Chameleon's image-token masking). Never materialises more than
    ``chunk_size x vocab`` float32 logits.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    index = (y != IGNORE_INDEX).nonzero().squeeze(1)
    h, y = h.index_select(0, index), y.index_select(0, index)
    if masked_ids is not None:
        masked_ids = masked_ids.to(hidden.device)
    loss_sum, token_ce, z_sum = _FusedLinearCrossEntropy.apply(h, weight, y, float(z_loss_weight), chunk_size, masked_ids)
    return LossSums(
        loss_sum=loss_sum,
        ce_sum=token_ce.sum(),
        z_sum=z_sum,
        n_tokens=torch.tensor(len(y), device=hidden.device),
        token_ce=token_ce,
        token_index=index,
    )
