"""miniImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 split) as a ClassDataset.

Three on-disk formats are read (``format="auto"`` tries them in this order):

* ``"csv"`` -- Ravi & Larochelle: ``root/{train,val,test}.csv`` (header
  ``filename,label``) with the images in ``root/images/<filename>`` or in
  ``root/images.zip``.
* ``"folders"`` -- class folders ``root/<split>/<wnid>/*.jpg`` (also .jpeg/.png).
* ``"pickle"`` -- Ren et al.'s caches ``root/mini-imagenet-cache-<split>.pkl`` (the val
  file may be named ``-val.pkl`` or ``-validation.pkl``), a dict with ``image_data``
  (uint8 N x 84 x 84 x 3) and ``class_dict`` ({wnid: [indices]}).

Pickles are untrusted: they are read with a restricted unpickler that only resolves
the globals needed to rebuild numpy arrays (see :data:`ALLOWED_PICKLE_GLOBALS`); any
other global (``os.system``, ``builtins.eval``, ...) raises :class:`L2OError` before
anything is called.

Images are converted to RGB, resized to ``image_size x image_size`` with PIL BILINEAR
(aspect ratio not kept, like the official code; images already of that size are not
touched) and divided by 255: float32 ``[N, 3, S, S]`` in ``[0, 1]``, no normalisation.
Classes are the sorted wnids; images of a class keep file/index order.
"""

from __future__ import annotations

import csv
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from l2o.data.episodes import ClassDataset
from l2o.data.images import decode_square
from l2o.errors import L2OError

__all__ = ["ALLOWED_PICKLE_GLOBALS", "FORMATS", "load_miniimagenet", "safe_load_pickle"]

FORMATS = ("csv", "folders", "pickle")
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

#: ``(module, name)`` globals a miniImageNet pickle may reference: numpy array and dtype
#: reconstruction (numpy 1.x and 2.x module names, pickle protocols 2-5), and
#: ``_codecs.encode``, which protocol-2 pickles written by Python 3 use for bytes.
ALLOWED_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # latin1: Python 2 pickles of numpy arrays
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_PICKLE_GLOBALS:
            if module.startswith("numpy.core.") and hasattr(np, "_core"):
                module = "numpy._core." + module[len("numpy.core.") :]  # numpy 2: no warning
            return super().find_class(module, name)
        raise L2OError(
            f"refusing to load pickle {self._path}: it references {module}.{name}, which is "
            "not a numpy array global (untrusted pickles may only hold arrays, dicts and lists)"
        )

    def persistent_load(self, pid):
        raise L2OError(f"refusing to load pickle {self._path}: it uses persistent ids")


def safe_load_pickle(path: str | Path):
    """Load an untrusted pickle that may only hold numpy arrays, dicts, lists and scalars."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except L2OError:
        raise
    except FileNotFoundError as e:
        raise L2OError(f"pickle {path} does not exist") from e
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... from corrupt data
        raise L2OError(f"cannot read pickle {path}: {type(e).__name__}: {e}") from e


def _to_chw_float(arrays: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(
        np.ascontiguousarray(np.stack(arrays) if isinstance(arrays, list) else arrays)
    )
    return x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()


def _decode(data: bytes | Path, image_size: int, what: str) -> np.ndarray:
    return decode_square(data, image_size, "RGB", "BILINEAR", f"miniImageNet image {what}")


def _resize_array(img: np.ndarray, image_size: int) -> np.ndarray:
    from PIL import Image

    if img.shape[0] == image_size and img.shape[1] == image_size:
        return img
    im = Image.fromarray(img).resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def _build(
    by_class: dict[str, list], load: Callable[[object], np.ndarray], where: Path
) -> ClassDataset:
    if not by_class:
        raise L2OError(f"no miniImageNet images found in {where}")
    names = sorted(by_class)
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for c, wnid in enumerate(names):
        for ref in by_class[wnid]:
            arrays.append(load(ref))
            labels.append(c)
    return ClassDataset(
        images=_to_chw_float(arrays),
        labels=torch.tensor(labels, dtype=torch.int64),
        class_names=names,
    )


# ----------------------------------------------------------------------------- formats


def _csv_path(root: Path, split: str) -> Path | None:
    p = root / f"{split}.csv"
    return p if p.is_file() else None


def _load_csv(root: Path, split: str, image_size: int) -> ClassDataset:
    path = root / f"{split}.csv"
    by_class: dict[str, list[str]] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
                raise L2OError(f"{path} must start with the header 'filename,label', got {header}")
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) < 2:
                    raise L2OError(f"{path}:{lineno}: expected 'filename,label', got {row}")
                by_class.setdefault(row[1].strip(), []).append(row[0].strip())
    except OSError as e:
        raise L2OError(f"cannot read {path}: {e}") from e

    images_dir = root / "images"
    images_zip = root / "images.zip"
    if images_dir.is_dir():

        def load(fname: object) -> np.ndarray:
            p = images_dir / str(fname)
            if not p.is_file():
                raise L2OError(f"image {p} listed in {path} does not exist")
            return _decode(p, image_size, str(p))

        return _build(by_class, load, path)
    if images_zip.is_file():
        try:
            zf = zipfile.ZipFile(images_zip)
        except (zipfile.BadZipFile, OSError) as e:
            raise L2OError(f"cannot read {images_zip}: {e}") from e
        with zf:
            members = {n.rsplit("/", 1)[-1]: n for n in zf.namelist() if not n.endswith("/")}

            def load_zip(fname: object) -> np.ndarray:
                name = members.get(str(fname))
                if name is None:
                    raise L2OError(f"image {fname} listed in {path} is not in {images_zip}")
                return _decode(zf.read(name), image_size, f"{images_zip}:{name}")

            return _build(by_class, load_zip, path)
    raise L2OError(f"{path} found but neither {images_dir}/ nor {images_zip} holds the images")


def _folder_path(root: Path, split: str) -> Path | None:
    names = [split, "validation", "valid"] if split == "val" else [split]
    for n in names:
        p = root / n
        if p.is_dir() and any(c.is_dir() for c in p.iterdir()):
            return p
    return None


def _load_folders(root: Path, split: str, image_size: int) -> ClassDataset:
    split_dir = _folder_path(root, split)
    if split_dir is None:
        raise L2OError(f"no class folders in {root / split}/")
    by_class = {
        d.name: sorted(f for f in d.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
        for d in split_dir.iterdir()
        if d.is_dir()
    }
    by_class = {k: v for k, v in by_class.items() if v}
    return _build(by_class, lambda p: _decode(p, image_size, str(p)), split_dir)


def _pickle_candidates(root: Path, split: str) -> list[Path]:
    names = [split, "validation"] if split == "val" else [split]
    return [root / f"mini-imagenet-cache-{n}.pkl" for n in names]


def _pickle_path(root: Path, split: str) -> Path | None:
    return next((p for p in _pickle_candidates(root, split) if p.is_file()), None)


def _load_pickle(root: Path, split: str, image_size: int) -> ClassDataset:
    path = _pickle_path(root, split)
    if path is None:
        raise L2OError(f"none of {[str(p) for p in _pickle_candidates(root, split)]} exists")
    doc = safe_load_pickle(path)
    if not isinstance(doc, dict) or "image_data" not in doc or "class_dict" not in doc:
        keys = sorted(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise L2OError(f"{path} must hold a dict with 'image_data' and 'class_dict', got {keys}")
    data, class_dict = doc["image_data"], doc["class_dict"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 4
        or data.shape[-1] != 3
    ):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise L2OError(f"{path}: 'image_data' must be a uint8 N x H x W x 3 array, got {desc}")
    if not isinstance(class_dict, dict):
        raise L2OError(f"{path}: 'class_dict' must be a dict {{wnid: [indices]}}")
    n = data.shape[0]
    by_class: dict[str, list[int]] = {}
    for wnid, idx in class_dict.items():
        try:
            ix = [int(i) for i in idx]
        except (TypeError, ValueError) as e:
            raise L2OError(f"{path}: class_dict[{wnid!r}] is not a list of indices") from e
        bad = [i for i in ix if not 0 <= i < n]
        if bad:
            raise L2OError(
                f"{path}: class_dict[{wnid!r}] has indices outside 0..{n - 1}: {bad[:3]}"
            )
        if ix:
            by_class[str(wnid)] = ix
    if data.shape[1:3] == (image_size, image_size):
        names = sorted(by_class)
        order = np.asarray([i for w in names for i in by_class[w]], dtype=np.int64)
        labels = [c for c, w in enumerate(names) for _ in by_class[w]]
        return ClassDataset(
            images=_to_chw_float(data[order]),
            labels=torch.tensor(labels, dtype=torch.int64),
            class_names=names,
        )
    return _build(by_class, lambda i: _resize_array(data[int(i)], image_size), path)


_DETECT = {"csv": _csv_path, "folders": _folder_path, "pickle": _pickle_path}
_LOAD = {"csv": _load_csv, "folders": _load_folders, "pickle": _load_pickle}


def load_miniimagenet(
    root: str | Path, split: str = "train", image_size: int = 84, format: str = "auto"
) -> ClassDataset:
    """Load one miniImageNet split as float32 ``[N, 3, image_size, image_size]`` in ``[0, 1]``.

    Args:
        root: folder holding one of the formats described in the module docstring.
        split: ``"train"``, ``"val"`` (or ``"validation"``) or ``"test"``.
        image_size: output side; BILINEAR resize, aspect ratio not kept.
        format: ``"auto"`` (csv, then folders, then pickle), ``"csv"``, ``"folders"`` or
            ``"pickle"``.

    Class names are wnids (e.g. ``"n01532829"``), sorted. Memory: the full train split is
    38,400 images, about 3.3 GB as float32 at 84 x 84.
    """
    root = Path(root).expanduser()
    if split not in _SPLITS:
        raise L2OError(f"miniImageNet split must be one of train, val, test; got {split!r}")
    split = _SPLITS[split]
    if format not in ("auto", *FORMATS):
        raise L2OError(
            f"miniImageNet format must be one of auto, {', '.join(FORMATS)}; got {format!r}"
        )
    if int(image_size) < 1:
        raise L2OError(f"image_size must be >= 1, got {image_size}")
    image_size = int(image_size)
    if not root.is_dir():
        raise L2OError(f"miniImageNet root {root} does not exist or is not a folder")
    formats = FORMATS if format == "auto" else (format,)
    for fmt in formats:
        if _DETECT[fmt](root, split) is not None:
            return _LOAD[fmt](root, split, image_size)
    looked = {
        "csv": f"{root / (split + '.csv')} (+ images/ or images.zip)",
        "folders": f"{root / split}/<wnid>/*.jpg",
        "pickle": " or ".join(str(p) for p in _pickle_candidates(root, split)),
    }
    try:
        found = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir()))
    except OSError:
        found = "(unreadable)"
    raise L2OError(
        f"no miniImageNet {split!r} split ({format}) in {root}: looked for "
        + "; ".join(looked[f] for f in formats)
        + f"; found: {found or '(empty)'}"
    )
