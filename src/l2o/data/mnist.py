"""MNIST from the standard IDX files (gzip-compressed or raw), with fixed splits.

Where the files are looked for (first match wins), given a data directory ``D``
from ``--data-dir`` or else the ``L2O_DATA`` environment variable:

    D/mnist/   D/MNIST/raw/   D/

each holding ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]`` (torchvision's
``MNIST/raw`` folder works as is).  Nothing is downloaded unless asked:
``l2o meta-train --download`` / :func:`download` fetch the four files from the
usual mirrors and check their md5.

Splits (which images each use of the ``mnist-mlp`` task sees):

==========  ======================================  =====================================
split       images                                  used by
==========  ======================================  =====================================
``train``   MNIST-train images 0..49,999             meta-training problems
``val``     MNIST-train images 50,000..59,999        meta-validation (best checkpoint)
``test``    MNIST t10k, all 10,000                   compare, study, benchmarks, tuning
==========  ======================================  =====================================

So the optimizees an optimizer is evaluated on are trained on images that
meta-training never saw (not even for validation).  Images are float32 in
[0, 1], flattened to 784; labels are int64.

Loaded arrays are cached per process (keyed by the resolved file path), so
building many tasks is cheap.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

from ..errors import L2OError

ENV = "L2O_DATA"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: md5 of the *uncompressed* IDX bytes and the expected (count, rows, cols)
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
SPLITS = ("train", "val", "test")
TRAIN_SIZE = 50_000  # MNIST-train images [0, 50000) -> "train", the rest -> "val"
SUBDIRS = ("mnist", "MNIST/raw", ".")
HOW_TO_GET = (
    f"pass --data-dir DIR (or set {ENV}=DIR) to a directory holding the four MNIST IDX files "
    f"as DIR/mnist/{{{','.join(FILES.values())}}}.gz (or uncompressed, or in DIR/MNIST/raw/ "
    "or DIR/ itself), or add --download to fetch them"
)

# IDX element types: code -> (struct format, bytes, torch dtype)
_IDX_TYPES = {
    0x08: (">B", 1, torch.uint8),
    0x09: (">b", 1, torch.int8),
    0x0B: (">h", 2, torch.int16),
    0x0C: (">i", 4, torch.int32),
    0x0D: (">f", 4, torch.float32),
    0x0E: (">d", 8, torch.float64),
}

_CACHE: dict[tuple, object] = {}


# -- reading ---------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise L2OError(f"{path}: cannot read MNIST file: {e.strerror or e}") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise L2OError(
                f"{path}: corrupt gzip file ({e}); delete it and fetch it again"
            ) from None
    return raw


def parse_idx(data: bytes, where: str = "<bytes>") -> Tensor:
    """Decode IDX bytes into a tensor, checking the magic number, dims and size."""
    if len(data) < 4:
        raise L2OError(f"{where}: not an IDX file (only {len(data)} bytes)")
    zero, code, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or code not in _IDX_TYPES or not 1 <= ndim <= 4:
        raise L2OError(f"{where}: not an IDX file (bad magic number 0x{data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise L2OError(f"{where}: truncated IDX header ({len(data)} bytes, expected {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    fmt, size, dtype = _IDX_TYPES[code]
    count = 1
    for d in dims:
        count *= d
    expected = header + count * size
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise L2OError(
            f"{where}: IDX file {what}: {len(data)} bytes, expected {expected} for dims {list(dims)}"
        )
    body = data[header:]
    if size == 1:
        t = torch.frombuffer(bytearray(body), dtype=dtype)
    else:
        import numpy as np

        t = torch.from_numpy(np.frombuffer(body, dtype=np.dtype(fmt)).astype(np.dtype(fmt[1:])))
    return t.reshape(dims)


def read_idx(path: str | os.PathLike) -> Tensor:
    """Read one IDX file (``.gz`` or raw)."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


# -- locating ----------------------------------------------------------------------------------
def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory: ``explicit`` (``--data-dir``), else ``$L2O_DATA``; error if neither."""
    value = explicit if explicit not in (None, "") else os.environ.get(ENV)
    if not value:
        raise L2OError(f"no data directory for MNIST: {HOW_TO_GET}")
    return Path(value).expanduser()


def find_files(directory: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the four IDX files (``.gz`` preferred to raw) under a data directory."""
    root = data_dir(directory)
    if not root.is_dir():
        raise L2OError(f"MNIST data directory not found: {root}; {HOW_TO_GET}")
    for sub in SUBDIRS:
        base = root / sub
        found = {}
        for key, stem in FILES.items():
            for name in (stem + ".gz", stem):
                if (base / name).is_file():
                    found[key] = base / name
                    break
        if found and len(found) < len(FILES):
            missing = [FILES[k] for k in FILES if k not in found]
            raise L2OError(
                f"MNIST files missing in {base}: {', '.join(m + '[.gz]' for m in missing)}; {HOW_TO_GET}"
            )
        if found:
            return found
    raise L2OError(
        f"no MNIST IDX files in {root} (looked in {', '.join(str(root / s) for s in SUBDIRS)}); "
        f"{HOW_TO_GET}"
    )


def load(directory: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """All of MNIST: ``train_images`` [60000, 784] float32 in [0, 1], ``train_labels``, ``test_*``."""
    files = find_files(directory)
    key = tuple(str(files[k].resolve()) for k in FILES)
    if key in _CACHE:
        return _CACHE[key]
    out: dict[str, Tensor] = {}
    for part in ("train", "test"):
        img_path, lab_path = files[f"{part}_images"], files[f"{part}_labels"]
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.dim() != 3 or images.dtype != torch.uint8:
            raise L2OError(
                f"{img_path}: expected uint8 images [N, rows, cols], got {images.dtype} {list(images.shape)}"
            )
        if labels.dim() != 1 or labels.dtype != torch.uint8:
            raise L2OError(
                f"{lab_path}: expected uint8 labels [N], got {labels.dtype} {list(labels.shape)}"
            )
        if images.shape[0] != labels.shape[0]:
            raise L2OError(
                f"{img_path} has {images.shape[0]} images but {lab_path} has {labels.shape[0]} labels"
            )
        if int(labels.max()) > 9:
            raise L2OError(f"{lab_path}: labels must be digits 0..9, found {int(labels.max())}")
        out[f"{part}_images"] = images.reshape(images.shape[0], -1).float().div_(255.0)
        out[f"{part}_labels"] = labels.long()
    _CACHE[key] = out
    return out


def split(name: str, directory: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """(images [N, 784], labels [N]) of split ``train``, ``val`` or ``test`` (module docstring)."""
    if name not in SPLITS:
        raise L2OError(f"MNIST split must be one of {SPLITS}, got {name!r}")
    d = load(directory)
    if name == "test":
        return d["test_images"], d["test_labels"]
    x, y = d["train_images"], d["train_labels"]
    # The full 60,000: 50,000 / 10,000.  Small (test-fixture) files: the same 5/6 : 1/6 proportions.
    n = TRAIN_SIZE if x.shape[0] >= 60_000 else max(1, (x.shape[0] * 5) // 6)
    return (x[:n], y[:n]) if name == "train" else (x[n:], y[n:])


# -- downloading ------------------------------------------------------------------------------
def download(directory: str | os.PathLike | None = None, log=print) -> Path:
    """Fetch the four IDX files into ``directory/mnist`` (skips files already valid)."""
    import urllib.request

    root = data_dir(directory) / "mnist"
    root.mkdir(parents=True, exist_ok=True)
    for stem, md5 in MD5.items():
        target = root / (stem + ".gz")
        if target.is_file():
            try:
                if hashlib.md5(_read_bytes(target)).hexdigest() == md5:
                    continue
            except L2OError:
                pass
        errors = []
        for mirror in MIRRORS:
            url = mirror + stem + ".gz"
            try:
                log(f"downloading {url}")
                with urllib.request.urlopen(url, timeout=60) as r:
                    blob = r.read()
            except OSError as e:
                errors.append(f"{url}: {e}")
                continue
            try:
                digest = hashlib.md5(gzip.decompress(blob)).hexdigest()
            except (OSError, EOFError) as e:
                errors.append(f"{url}: not a gzip file ({e})")
                continue
            if digest != md5:
                errors.append(f"{url}: md5 {digest} != {md5}")
                continue
            tmp = target.with_suffix(".gz.part")
            tmp.write_bytes(blob)
            tmp.replace(target)
            break
        else:
            raise L2OError(f"could not download {stem}.gz into {root}: " + "; ".join(errors))
    return root
