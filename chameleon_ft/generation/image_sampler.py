"""Image tokens from a :class:`~chameleon_ft.generation.kv_cache.CachedDecoder`: plain sampling and speculative
Jacobi decoding (SJD), with batched classifier-free guidance and the grid constraint.

**Distribution.** Every token of an open image is either forced by the layout (size tokens, row ends,
end-image: :meth:`ImageGridLogitsProcessor.forced_token`) or an image code drawn from

    softmax(top_k(g * (log_softmax(cond) - log_softmax(uncond)) + log_softmax(uncond)) / temperature)

over the image codes -- the distribution of the Hugging Face ``generate`` chain of
:func:`~chameleon_ft.generation.logits.image_generation_processors`. Only the image-code rows of the LM
head are multiplied (the grid gives every other id ``-inf`` there); normalising over the codes instead of
the whole vocabulary shifts each branch's log-probabilities by a constant, which the guidance mix and the
softmax cancel, so the distribution is the same.

**Speculative Jacobi decoding** (Teng et al., 2024, "Accelerating Auto-regressive Text-to-Image
Generation with Training-free Speculative Jacobi Decoding"; Lumina-mGPT 2.0 uses it with a window of 16
and random initial drafts). Each forward feeds a window: the last accepted token and ``window - 1`` draft
tokens, each drawn from a known draft distribution ``q``. The forward gives the target distribution
``p`` at every window position. Drafts are verified in order as in speculative sampling: draft ``x`` is
accepted with probability ``min(1, p(x) / q(x))``; the first rejected one is replaced by a draw from
``normalise(max(0, p - q))``; when all are accepted, one more token is drawn from ``p`` at the end of the
window. So each forward yields between 1 and ``window`` tokens, and every token has exactly the plain
sampler's distribution given the tokens before it. Drafts for the next window are the current forward's
own draws at the positions after the accepted ones (the Jacobi iteration, ``q = p`` of this forward),
then uniformly random image codes (``q`` = the point mass at the drawn code, which makes verification
exact whatever the draw). Forced tokens are drafted as themselves and always accepted. With
``window=1`` this is plain sampling: one forward per token. Greedy decoding (``sample=False``, ``p`` the
point mass at the argmax) gives exactly the greedy tokens for every window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chameleon_ft.data.image_layout import image_span_length
from chameleon_ft.errors import ConfigError
from chameleon_ft.generation.kv_cache import CachedDecoder
from chameleon_ft.generation.logits import ImageGridLogitsProcessor, guided_log_probs, top_k_filter
from chameleon_ft.model.tokens import ChameleonTokens

SAMPLERS = ("plain", "sjd")
DEFAULT_WINDOW = 16  # Lumina-mGPT 2.0's SJD window (max_num_new_tokens)


def sampler_window(sampler: str, window: int = DEFAULT_WINDOW) -> int:
    """Tokens fed per forward for ``sampler``: 1 for plain, ``window`` for SJD."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler={sampler!r}: choose one of {SAMPLERS}")
    if sampler == "sjd" and int(window) < 2:
        raise ConfigError(f"sjd_window={window}: speculative Jacobi decoding needs a window of at least 2")
    return 1 if sampler == "plain" else int(window)


@dataclass(frozen=True)
class ImageSampling:
    """How image codes are drawn. ``guidance_scale`` None: no unconditional branch."""

    guidance_scale: float | None = 3.0
    top_k: int = 2000
    temperature: float = 1.0
    sample: bool = True  # False: greedy
    window: int = 1  # 1: plain sampling; > 1: speculative Jacobi decoding

    def __post_init__(self):
        if self.top_k < 1 or self.temperature <= 0 or self.window < 1:
            raise ConfigError(f"image sampling needs top_k >= 1, temperature > 0 and window >= 1, got {self}")


class ImageGrid:
    """The token layout of one image size: which token each offset after begin-image must be (or any code)."""

    def __init__(self, tokens: ChameleonTokens, h: int, w: int, layout: str, pixel_size: tuple[int, int]):
        self.tokens, self.h, self.w, self.layout = tokens, int(h), int(w), layout
        self.length = image_span_length(self.h, self.w, layout) - 1  # tokens after begin-image
        rule = ImageGridLogitsProcessor(tokens, 0, self.h, self.w, layout, pixel_size=pixel_size)
        offsets = torch.arange(self.length)
        self.forced = rule.forced_token(offsets, torch.zeros_like(offsets, dtype=torch.bool))  # -1: a code

    def first_code_offset(self) -> int:
        """Offset of the first image code (2 in Lumina's layout, after the size tokens; 0 in Chameleon's)."""
        return int(torch.nonzero(self.forced < 0)[0])


def _code_probs(logits: torch.Tensor, opts: ImageSampling) -> torch.Tensor:
    """``[B, L, C]`` sampling distributions over the image codes from the branches' code logits."""
    if opts.guidance_scale is not None:
        cond, uncond = logits.chunk(2, dim=0)
        scores = guided_log_probs(cond, uncond, opts.guidance_scale)
    else:
        scores = logits.float()
    scores = top_k_filter(scores, opts.top_k)
    if not opts.sample:
        return torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).float()
    return torch.softmax(scores / opts.temperature, dim=-1)


def sample_image(decoder: CachedDecoder, start: int, grid: ImageGrid, opts: ImageSampling,
                 generator: torch.Generator, *, pending: torch.Tensor | None = None,
                 last_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Draw the rest of one open image per sample; returns ``[B, grid.length - start]`` token ids.

    The decoder's rows are the samples (``[cond; uncond]`` halves with guidance). Every row holds its
    sequence up to the token at offset ``start - 1`` of the image (``start = 0``: begin-image), given as
    either ``pending`` ``[B]``, that token's id, not yet fed (committed up to before it), or
    ``last_hidden`` ``[rows, H]``, the hidden state the decoder returned for it (committed through it, as
    after :meth:`CachedDecoder.prefill`; saves a forward). On return each row has committed everything but
    the last token, end-image, which is left pending for whatever follows.
    """
    if (pending is None) == (last_hidden is None):
        raise ConfigError("sample_image needs exactly one of pending and last_hidden")
    device = decoder.device
    guided = opts.guidance_scale is not None
    B = decoder.rows // 2 if guided else decoder.rows
    given = pending.shape[0] * (2 if guided else 1) if pending is not None else last_hidden.shape[0]
    if given != decoder.rows or (guided and decoder.rows % 2):
        raise ConfigError(f"decoder has {decoder.rows} rows for {given} rows of samples"
                          f"{' with guidance' if guided else ''}")
    L, C, n_total = opts.window, grid.tokens.num_codes, grid.length
    code_ids = grid.tokens.image_token_ids.to(device)  # code index -> token id
    head = decoder.head_rows(code_ids)
    forced_table = torch.cat([grid.forced, torch.full((L + 1,), grid.tokens.eoi)]).to(device)
    arangeL, rows_b = torch.arange(L, device=device), torch.arange(B, device=device)

    out = torch.full((B, n_total), -1, dtype=torch.long, device=device)
    cur = torch.full((B,), int(start), dtype=torch.long, device=device)  # offset of the next undecided token
    if last_hidden is not None:
        # The first token comes from the hidden state already computed (committed, so nothing is pending).
        first = int(forced_table[start])
        if first < 0:
            p0 = _code_probs(torch.nn.functional.linear(last_hidden[:, None], head), opts)[:, 0]
            first_ids = code_ids[torch.multinomial(p0, 1, generator=generator).squeeze(1)]
        else:
            first_ids = torch.full((B,), first, dtype=torch.long, device=device)
        out[:, start] = first_ids
        pending, cur = first_ids, cur + 1
    pending = pending.to(device).long()
    # Drafts for targets cur .. cur + L - 2: code index, and their draft distributions q ([.., L, C]; the
    # last target has no draft, q = 0 there, so the "residual" at the end of the window is p itself).
    draft_idx = torch.randint(C, (B, L - 1), device=device, generator=generator)
    q = torch.zeros(B, L, C, device=device)
    q[:, : L - 1].scatter_(2, draft_idx[..., None], 1.0)
    done = cur >= n_total
    while not bool(done.all()):
        targets = cur[:, None] + arangeL[None, :]  # [B, L] offsets
        forced = forced_table[targets.clamp(max=n_total + L)]
        draft_ids = torch.where(forced[:, : L - 1] >= 0, forced[:, : L - 1], code_ids[draft_idx])
        window = torch.cat([pending[:, None], draft_ids], dim=1)
        hidden = decoder.forward(torch.cat([window, window]) if guided else window)
        if bool((forced < 0).any()):
            p = _code_probs(torch.nn.functional.linear(hidden, head), opts)  # [B, L, C]
        else:  # every target is forced by the layout (a row end, end-image): no logits needed
            p = torch.full((B, L, C), 1.0 / C, device=device)

        # Verify the drafts in order: the accepted ones are the leading run of passes.
        if L > 1:
            u = torch.rand(B, L - 1, device=device, generator=generator)
            p_d = p[:, : L - 1].gather(2, draft_idx[..., None]).squeeze(2)
            q_d = q[:, : L - 1].gather(2, draft_idx[..., None]).squeeze(2)
            passed = (forced[:, : L - 1] >= 0) | (u * q_d < p_d)
            accepted = passed.long().cumprod(dim=1).sum(dim=1)
        else:
            accepted = torch.zeros(B, dtype=torch.long, device=device)
        remaining = n_total - cur
        accepted = torch.minimum(accepted, remaining)
        # One more token at target `accepted` (if the image is not complete): the residual draw after a
        # rejection, or the bonus draw from p when every draft passed; forced where the layout says so.
        p_a, q_a = p[rows_b, accepted], q[rows_b, accepted]
        residual = (p_a - q_a).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_a)
        extra_idx = torch.multinomial(residual, 1, generator=generator).squeeze(1)
        forced_a = forced[rows_b, accepted]
        extra = torch.where(forced_a >= 0, forced_a, code_ids[extra_idx])
        n = torch.where(accepted < remaining, accepted + 1, accepted)
        n = torch.where(done, torch.zeros_like(n), n)

        # This forward's tokens: the accepted drafts, then the extra token.
        new_tokens = torch.cat([draft_ids, extra[:, None]], dim=1)
        new_tokens[rows_b, accepted] = extra
        keep = arangeL[None, :] < n[:, None]
        out[rows_b[:, None].expand(-1, L)[keep], targets[keep]] = new_tokens[keep]
        decoder.commit(torch.cat([n, n]) if guided else n)
        last = new_tokens[rows_b, (n - 1).clamp(min=0)]
        pending = torch.where(n > 0, last, pending)
        cur = cur + n
        done = cur >= n_total

        if L > 1:
            # Next drafts: this forward's own draws where it looked ahead far enough (Jacobi), else random codes.
            src = accepted[:, None] + 1 + arangeL[None, : L - 1]
            stale = src <= L - 1
            p_src = p.gather(1, src.clamp(max=L - 1)[..., None].expand(-1, -1, C))
            jacobi = torch.multinomial(p_src.reshape(-1, C), 1, generator=generator).view(B, L - 1)
            fresh = torch.randint(C, (B, L - 1), device=device, generator=generator)
            draft_idx = torch.where(stale, jacobi, fresh)
            q = torch.zeros(B, L, C, device=device)
            q[:, : L - 1] = torch.where(stale[..., None], p_src,
                                        torch.zeros_like(p_src).scatter_(2, fresh[..., None], 1.0))
    return out[:, start:].cpu()
