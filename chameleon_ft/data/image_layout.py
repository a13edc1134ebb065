"""How an image's VQ codes sit in the token stream, per checkpoint family.

- ``chameleon``: ``<racm3:break>`` + h*w codes + ``<eoss>``;
- ``lumina``: ``<racm3:break>``, size token of H, size token of W, then h rows of w codes each followed by
  the row-end token, then ``<eoss>`` -- (h)(w + 1) + 4 tokens.
"""

from __future__ import annotations

import torch

from chameleon_ft.errors import DataError
from chameleon_ft.model.tokens import ChameleonTokens

LAYOUTS = ("chameleon", "lumina")


class ImageLayoutError(DataError):
    """A token span is not a well-formed image in the expected layout."""


def image_span_length(h: int, w: int, layout: str) -> int:
    """Number of tokens an ``h x w`` code grid takes, delimiters included."""
    if layout == "chameleon":
        return h * w + 2
    if layout == "lumina":
        return h * (w + 1) + 4
    raise ImageLayoutError(f"unknown image layout {layout!r}; choose one of {LAYOUTS}")


def image_to_ids(codes: torch.Tensor, tokens: ChameleonTokens, layout: str,
                 pixel_size: tuple[int, int] | None = None) -> list[int]:
    """Token ids of one image given its VQ codes ``[h, w]``.

    ``pixel_size`` ``(H, W)`` feeds Lumina's size tokens; it defaults to 16 px per code.
    """
    if codes.dim() != 2:
        raise ImageLayoutError(f"codes must be [h, w], got shape {list(codes.shape)}")
    h, w = codes.shape
    ids = tokens.codes_to_ids(codes.cpu())
    if layout == "chameleon":
        return [tokens.boi, *ids.reshape(-1).tolist(), tokens.eoi]
    if layout == "lumina":
        H, W = pixel_size or (16 * h, 16 * w)
        rows = torch.cat([ids, torch.full((h, 1), tokens.row_end)], dim=1)
        return [tokens.boi, tokens.size_token(H), tokens.size_token(W), *rows.reshape(-1).tolist(), tokens.eoi]
    raise ImageLayoutError(f"unknown image layout {layout!r}; choose one of {LAYOUTS}")


def ids_to_image(ids: list[int] | torch.Tensor, tokens: ChameleonTokens, layout: str,
                 grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """Parse one image span (starting at begin-image) back to codes ``[h, w]``.

    Returns ``(codes, (H, W))`` for Lumina (pixel size from the size tokens) and ``(codes, None)`` for
    Chameleon, where ``grid`` (h, w) is required. Raises :class:`ImageLayoutError` on malformed spans.
    """
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    if not ids or ids[0] != tokens.boi:
        raise ImageLayoutError("image span does not start with the begin-image token")
    if layout == "chameleon":
        if grid is None:
            raise ImageLayoutError("the chameleon layout needs the code grid (h, w)")
        h, w = grid
        body = ids[1 : 1 + h * w]
        if len(ids) < h * w + 2 or ids[1 + h * w] != tokens.eoi:
            raise ImageLayoutError(f"expected {h * w} codes then end-image")
        return tokens.ids_to_codes(torch.tensor(body)).reshape(h, w), None
    if layout != "lumina":
        raise ImageLayoutError(f"unknown image layout {layout!r}; choose one of {LAYOUTS}")
    if len(ids) < 3:
        raise ImageLayoutError("image span too short for size tokens")
    H, W = tokens.size_from_token(ids[1]), tokens.size_from_token(ids[2])
    if grid is None:
        grid = (H // 16, W // 16)
    h, w = grid
    need = image_span_length(h, w, "lumina")
    if len(ids) < need:
        raise ImageLayoutError(f"image span has {len(ids)} tokens, a {h}x{w} grid needs {need}")
    rows = torch.tensor(ids[3 : 3 + h * (w + 1)]).reshape(h, w + 1)
    if not bool((rows[:, -1] == tokens.row_end).all()):
        raise ImageLayoutError("a row does not end with the row-end token")
    if ids[need - 1] != tokens.eoi:
        raise ImageLayoutError("image span does not end with the end-image token")
    return tokens.ids_to_codes(rows[:, :-1]), (H, W)


def image_spans(ids: list[int], tokens: ChameleonTokens) -> list[tuple[int, int]]:
    """``(start, end)`` index pairs (end exclusive) of every begin-image ... end-image span."""
    spans, start = [], None
    for i, t in enumerate(ids):
        if t == tokens.boi:
            start = i
        elif t == tokens.eoi and start is not None:
            spans.append((start, i + 1))
            start = None
    return spans
