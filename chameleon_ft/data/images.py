"""Opening the images records name: fully decoded, with errors that name the record."""

from __future__ import annotations

import io
import os

from PIL import Image, UnidentifiedImageError

from chameleon_ft.data.errors import BadSampleError


def open_image(src: str | bytes | os.PathLike, file: str = "<memory>", index: int = -1) -> Image.Image:
    """Open and fully decode an image (``img.load()``), so truncated or corrupt files fail here.

    Raises :class:`BadSampleError` ``missing_image`` or ``bad_image`` naming ``file`` and ``index``. The
    mode is left as is; conversion to RGB on white happens in :mod:`chameleon_ft.vq.preprocess`.
    """
    what = "in-memory image" if isinstance(src, (bytes, bytearray)) else str(src)
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
        img.load()
    except FileNotFoundError:
        raise BadSampleError(file, index, "missing_image", f"{what} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadSampleError(file, index, "bad_image", f"{what}: {type(e).__name__}: {e}") from None
    return img
