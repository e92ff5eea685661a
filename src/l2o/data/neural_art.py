"""Images for the Neural Art (style transfer) task: readers and disjoint content sets.

Any JPEG / PNG path is read with PIL (:func:`read_image`); an unreadable or missing
file is one :class:`~l2o.errors.L2OError` line naming it.  A *style* is a path, or a
name looked up as ``D/neural-art/style/NAME.{jpg,png}`` under the data directory ``D``
(``--data-dir`` / ``$L2O_DATA``), e.g. ``starry_night`` or ``the_scream``.

Content sets (split -> images), all disjoint:

==========  ==========================================================  ======================
split       images                                                      used by
==========  ==========================================================  ======================
``train``   CIFAR-10 ``train`` split (training files, first 5/6),       meta-training
            32 x 32 upsampled (bilinear) to the task's size
``val``     CIFAR-10 ``val`` split (training files, last 1/6), upsampled  validation, lr tuning
``test``    the photos in ``D/neural-art/content/`` (each one center       compare, benchmarks
            crop, then four corner crops of half its side), then the
            CIFAR-10 ``test_batch.bin`` images, upsampled
==========  ==========================================================  ======================

Content image ``k`` of a split is ``images[k % len(images)]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ..errors import L2OError
from . import cifar10

ENV = "L2O_DATA"
SPLITS = ("train", "val", "test")
EXTS = (".jpg", ".jpeg", ".png")


def _pil_open(path: Path):
    from PIL import Image

    if not path.is_file():
        raise L2OError(f"image file not found: {path} (expected a JPEG or PNG file)")
    try:
        im = Image.open(path)
        im.load()
        return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises several kinds
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise L2OError(f"cannot read image {path}: {msg} (expected a JPEG or PNG file)") from None


def read_image(
    path: str | os.PathLike, size: int | None = None, crop: tuple | None = None
) -> Tensor:
    """``[3, H, W]`` float32 in [0, 1]; with ``size`` the center square (or ``crop``
    = (left, top, side) in pixels) resized to ``size`` x ``size`` (Lanczos)."""
    from PIL import Image

    im = _pil_open(Path(path).expanduser())
    if size is not None:
        w, h = im.size
        if crop is None:
            side = min(w, h)
            crop = ((w - side) // 2, (h - side) // 2, side)
        left, top, side = crop
        im = im.crop((left, top, left + side, top + side))
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def write_image(image: Tensor, path: str | os.PathLike) -> None:
    """Save ``[3, H, W]`` in [0, 1] (clamped) as PNG / JPEG by the suffix."""
    from PIL import Image

    arr = (image.detach().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    try:
        Image.fromarray(arr).save(path)
    except (OSError, ValueError) as e:
        raise L2OError(f"cannot write image {path}: {e}") from None


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    value = explicit if explicit not in (None, "") else os.environ.get(ENV)
    if not value:
        raise L2OError(
            f"no data directory for neural-art: pass --data-dir DIR (or set {ENV}=DIR) holding "
            "DIR/neural-art/{style,content}/ and DIR/cifar10/cifar-10-batches-bin/"
        )
    return Path(value).expanduser()


def style_path(style: str, directory: str | os.PathLike | None = None) -> Path:
    """A style image: an existing path as given, else NAME under ``D/neural-art/style/``."""
    p = Path(style).expanduser()
    if p.suffix.lower() in EXTS or p.is_file():
        return p
    base = data_root(directory) / "neural-art" / "style"
    for ext in EXTS:
        if (base / f"{style}{ext}").is_file():
            return base / f"{style}{ext}"
    raise L2OError(
        f"style {style!r}: no file {base}/{style}.{{jpg,png}} (give a JPEG/PNG path or a name there)"
    )


def photo_crops(directory: str | os.PathLike | None, size: int) -> Tensor:
    """The content photos: per photo its center crop and four half-side corner crops."""
    base = data_root(directory) / "neural-art" / "content"
    if not base.is_dir():
        raise L2OError(f"neural-art content folder not found: {base}")
    files = sorted(p for p in base.iterdir() if p.suffix.lower() in EXTS)
    out = []
    for f in files:
        full = read_image(f)
        _, h, w = full.shape
        side, half = min(w, h), min(w, h) // 2
        crops = [((w - side) // 2, (h - side) // 2, side)]
        crops += [
            (0, 0, half),
            (w - half, 0, half),
            (0, h - half, half),
            (w - half, h - half, half),
        ]
        out += [read_image(f, size, c) for c in crops]
    return torch.stack(out) if out else torch.zeros(0, 3, size, size)


_CACHE: dict[tuple, Tensor] = {}


def content_set(split: str, size: int, directory: str | os.PathLike | None = None) -> Tensor:
    """Content images ``[N, 3, size, size]`` of ``split`` (table in the module docstring)."""
    if split not in SPLITS:
        raise L2OError(f"neural-art content split must be one of {SPLITS}, got {split!r}")
    root = str(data_root(directory))
    key = (root, split, size)
    if key not in _CACHE:
        cif = cifar10.split(split, root)[0]
        up = F.interpolate(cif, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        if split == "test":
            up = torch.cat([photo_crops(root, size), up])
        _CACHE[key] = up.contiguous()
    return _CACHE[key]
