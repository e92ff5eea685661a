"""CIFAR-10 from the standard *binary* release (no pickle), with fixed splits.

Where the files are looked for, given a data directory ``D`` from ``--data-dir`` or
else the ``L2O_DATA`` environment variable (first match wins):

    D/cifar10/cifar-10-batches-bin/   D/cifar-10-batches-bin/   D/cifar10/

each holding ``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin``
(``batches.meta.txt``, the class names, is read when present).  A record is 3,073
bytes: one label byte, then the 1,024 red, 1,024 green and 1,024 blue values of a
32 x 32 image, row-major.  The number of records is counted from each file's size,
so the full release (10,000 per file) and a subset of it read the same way; a file
whose size is not a multiple of 3,073 bytes (cut short) is an error naming it.
Nothing is downloaded unless asked: :func:`download` (``--download``) fetches the
official archive and unpacks the binary files.

Splits (which images each use of the ``cifar10-cnn`` task sees):

==========  ============================================  ==============================
split       images                                        used by
==========  ============================================  ==============================
``train``   the training files, all but the last 1/6       meta-training problems
``val``     the last 1/6 of the training files             meta-validation
``test``    ``test_batch.bin``                             compare, study, benchmarks
==========  ============================================  ==============================

(With the full release: 41,667 / 8,333 / 10,000 images.)  Images are float32
``[N, 3, 32, 32]`` in [0, 1] (pixels / 255, no mean subtraction, as the official
code); labels are int64 in 0..9.  Loaded arrays are cached per process.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import torch
from torch import Tensor

from ..errors import L2OError

ENV = "L2O_DATA"
RECORD = 3073
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
SUBDIRS = ("cifar10/cifar-10-batches-bin", "cifar-10-batches-bin", "cifar10")
SPLITS = ("train", "val", "test")
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
HOW_TO_GET = (
    f"pass --data-dir DIR (or set {ENV}=DIR) to a directory holding the CIFAR-10 binary release "
    f"as DIR/cifar10/cifar-10-batches-bin/{{{','.join(TRAIN_FILES)},{TEST_FILE}}}, "
    "or add --download to fetch it"
)

_CACHE: dict[tuple, dict] = {}


def parse_records(data: bytes, where: str = "<bytes>") -> tuple[Tensor, Tensor]:
    """(images uint8 ``[N, 3, 32, 32]``, labels int64 ``[N]``) of binary-release bytes."""
    if len(data) == 0 or len(data) % RECORD:
        n, rest = divmod(len(data), RECORD)
        raise L2OError(
            f"{where}: not a CIFAR-10 binary batch: {len(data)} bytes is not a whole number of "
            f"{RECORD}-byte records ({n} records and {rest} bytes left over; truncated or not "
            "this format)"
        )
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, RECORD)
    labels = raw[:, 0].long()
    if int(labels.max()) > 9:
        bad = int((labels > 9).nonzero()[0, 0])
        raise L2OError(
            f"{where}: record {bad} has label {int(labels[bad])}; CIFAR-10 labels are 0..9"
        )
    return raw[:, 1:].reshape(-1, 3, 32, 32).clone(), labels


def read_batch(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Read one ``*.bin`` file of the binary release."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise L2OError(f"{path}: cannot read CIFAR-10 file: {e.strerror or e}") from None
    return parse_records(data, str(path))


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    value = explicit if explicit not in (None, "") else os.environ.get(ENV)
    if not value:
        raise L2OError(f"no data directory for CIFAR-10: {HOW_TO_GET}")
    return Path(value).expanduser()


def find_dir(directory: str | os.PathLike | None = None) -> Path:
    """The folder holding the six ``.bin`` files under a data directory."""
    root = data_dir(directory)
    if not root.is_dir():
        raise L2OError(f"CIFAR-10 data directory not found: {root}; {HOW_TO_GET}")
    names = (*TRAIN_FILES, TEST_FILE)
    for sub in SUBDIRS:
        base = root / sub
        present = [n for n in names if (base / n).is_file()]
        if present and len(present) < len(names):
            missing = [n for n in names if n not in present]
            raise L2OError(f"CIFAR-10 files missing in {base}: {', '.join(missing)}; {HOW_TO_GET}")
        if present:
            return base
    raise L2OError(
        f"no CIFAR-10 binary files in {root} (looked in "
        f"{', '.join(str(root / s) for s in SUBDIRS)}); {HOW_TO_GET}"
    )


def class_names(directory: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The 10 class names (``batches.meta.txt`` when present, else the standard ones)."""
    meta = find_dir(directory) / "batches.meta.txt"
    if meta.is_file():
        names = tuple(line.strip() for line in meta.read_text().splitlines() if line.strip())
        if len(names) == 10:
            return names
    return CLASSES


def load(directory: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """``train_images`` float32 ``[N, 3, 32, 32]`` in [0, 1], ``train_labels``, ``test_*``."""
    base = find_dir(directory)
    key = (str(base.resolve()),)
    if key in _CACHE:
        return _CACHE[key]
    parts = [read_batch(base / n) for n in TRAIN_FILES]
    test_x, test_y = read_batch(base / TEST_FILE)
    out = {
        "train_images": torch.cat([p[0] for p in parts]).float().div_(255.0),
        "train_labels": torch.cat([p[1] for p in parts]),
        "test_images": test_x.float().div_(255.0),
        "test_labels": test_y,
    }
    _CACHE[key] = out
    return out


def split(name: str, directory: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """(images ``[N, 3, 32, 32]``, labels ``[N]``) of split ``train``, ``val`` or ``test``."""
    if name not in SPLITS:
        raise L2OError(f"CIFAR-10 split must be one of {SPLITS}, got {name!r}")
    d = load(directory)
    if name == "test":
        return d["test_images"], d["test_labels"]
    x, y = d["train_images"], d["train_labels"]
    n = max(1, (x.shape[0] * 5) // 6)
    return (x[:n], y[:n]) if name == "train" else (x[n:], y[n:])


def download(directory: str | os.PathLike | None = None, log=print) -> Path:
    """Fetch the official binary archive and unpack it into ``directory/cifar10`` (md5 checked)."""
    import urllib.request

    root = data_dir(directory) / "cifar10"
    target = root / "cifar-10-batches-bin"
    if all((target / n).is_file() for n in (*TRAIN_FILES, TEST_FILE)):
        return target
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-binary.tar.gz"
    if not archive.is_file() or hashlib.md5(archive.read_bytes()).hexdigest() != MD5:
        log(f"downloading {URL}")
        try:
            with urllib.request.urlopen(URL, timeout=120) as r:
                blob = r.read()
        except OSError as e:
            raise L2OError(f"could not download {URL}: {e}") from None
        digest = hashlib.md5(blob).hexdigest()
        if digest != MD5:
            raise L2OError(f"{URL}: md5 {digest} != {MD5}")
        tmp = archive.with_suffix(".part")
        tmp.write_bytes(blob)
        tmp.replace(archive)
    with tarfile.open(archive, "r:gz") as tar:
        members = [
            m for m in tar.getmembers() if m.isfile() and m.name.startswith("cifar-10-batches-bin/")
        ]
        tar.extractall(root, members=members, filter="data")
    return target
