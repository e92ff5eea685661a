"""One image file (a path or its bytes) decoded into a square ``uint8`` array.

Shared by the Omniglot and miniImageNet readers, which differ only in colour mode
and resampling filter; PIL is imported on first use.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from l2o.errors import L2OError


def decode_square(data: bytes | Path, size: int, mode: str, resample: str, what: str) -> np.ndarray:
    """``[size, size]`` (mode ``"L"``) or ``[size, size, 3]`` (``"RGB"``) array of ``data``.

    ``resample`` names a ``PIL.Image.Resampling`` filter (e.g. ``"LANCZOS"``), used only
    when the image is not already ``size`` x ``size``; an unreadable image raises
    :class:`L2OError` naming ``what``.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im = im.convert(mode)
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling[resample])
            return np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise L2OError(f"cannot decode {what}: {e}") from e
