"""Omniglot (Lake et al., Science 2015) as a :class:`~l2o.data.episodes.ClassDataset`.

Reads the standard layout ``<split>/<Alphabet>/<characterNN>/<id>_<drawer>.png``
(105 x 105, 1-bit) either from a folder ``<root>/<split>/`` or straight from the
official zip ``<root>/<split>.zip`` (no extraction). Works for the two "minimal"
background splits (``images_background_small1``/``images_background_small2``) and
for the full ``images_background``/``images_evaluation``. torchvision's
``<root>/omniglot-py/`` folder is also searched.

Pixel convention: the raw PNGs are black ink (0) on white (255). With
``invert=True`` (the default, as in MAML, torchmeta and learn2learn) images are
``1 - pixel/255``: **ink = 1, background = 0**. With ``invert=False`` they are
``pixel/255``: ink = 0, background = 1. Resizing uses PIL ``LANCZOS`` (as learn2learn)
on the grayscale image, so resized strokes have antialiased values in between.

Class names are ``"<Alphabet>/<characterNN>"`` (plus ``"/rot90"``, ``"/rot180"``,
``"/rot270"`` for rotated copies). Splits that share a class name (Greek and Latin are
in both minimal splits, with the same characters) are deduplicated by that name: the
first split listed wins and the later copy is skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from l2o.data.episodes import ClassDataset
from l2o.data.images import decode_square
from l2o.errors import L2OError

__all__ = [
    "MINIMAL_SPLITS",
    "apply_split",
    "alphabet_of",
    "load_omniglot",
    "load_split",
    "save_split",
    "split_by_alphabet",
    "split_by_character",
]

MINIMAL_SPLITS = ("images_background_small1", "images_background_small2")
PARTS = ("train", "val", "test")
_CACHE_VERSION = 1
_RESAMPLE = "LANCZOS"
_ALPHABET_DRAWS = 64  # seeded greedy draws; the one closest to the targets wins

#: Seconds the last non-cached :func:`load_omniglot` call spent decoding PNGs.
last_decode_seconds: float | None = None


# ----------------------------------------------------------------------------- sources


def _listing(path: Path, limit: int = 20) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "(empty)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _find_split(root: Path, split: str) -> Path:
    """The folder or zip holding ``split`` under ``root``."""
    for base in (root, root / "omniglot-py"):
        if (base / split).is_dir():
            return base / split
        if (base / f"{split}.zip").is_file():
            return base / f"{split}.zip"
    raise L2OError(
        f"Omniglot split {split!r} not found under {root}: looked for {root / split}/ and "
        f"{root / (split + '.zip')}; found: {_listing(root)}"
    )


def _entries_from_dir(split_dir: Path) -> dict[str, list[tuple[str, Path]]]:
    """``{"Alphabet/characterNN": [(file name, path), ...]}`` of one split folder."""
    out: dict[str, list[tuple[str, Path]]] = {}
    for alpha in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        for char in sorted(p for p in alpha.iterdir() if p.is_dir()):
            files = sorted(f for f in char.iterdir() if f.suffix.lower() == ".png")
            if files:
                out[f"{alpha.name}/{char.name}"] = [(f.name, f) for f in files]
    return out


def _entries_from_zip(zf: zipfile.ZipFile) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for name in zf.namelist():
        parts = name.split("/")
        if len(parts) < 3 or not parts[-1].lower().endswith(".png") or "__MACOSX" in parts:
            continue
        out.setdefault(f"{parts[-3]}/{parts[-2]}", []).append((parts[-1], name))
    return {k: sorted(v) for k, v in sorted(out.items())}


def _fingerprint(src: Path) -> str:
    """Cheap identity of a split source for the cache key."""
    if src.is_file():
        st = src.stat()
        return f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    n = size = mtime = 0
    for dirpath, _, files in os.walk(src):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            n += 1
            size += st.st_size
            mtime = max(mtime, st.st_mtime_ns)
    return f"{src.resolve()}:{n}:{size}:{mtime}"


def _decode(data: bytes | Path, image_size: int, what: str) -> np.ndarray:
    return decode_square(data, image_size, "L", "LANCZOS", f"Omniglot image {what}")


def _read_raw(
    root: Path, splits: Sequence[str], image_size: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decoded uint8 ``[N, 1, S, S]`` (raw convention: ink 0, paper 255), labels, names."""
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    names: list[str] = []
    for split in splits:
        src = _find_split(root, split)
        zf = None
        try:
            if src.is_file():
                try:
                    zf = zipfile.ZipFile(src)
                except (zipfile.BadZipFile, OSError) as e:
                    raise L2OError(f"cannot read Omniglot zip {src}: {e}") from e
                entries = _entries_from_zip(zf)
            else:
                entries = _entries_from_dir(src)
            if not entries:
                raise L2OError(
                    f"no <Alphabet>/<character>/*.png images in Omniglot split {src}; "
                    f"found: {_listing(src) if src.is_dir() else 'no such entries in the zip'}"
                )
            seen = set(names)
            for cname, files in entries.items():
                if cname in seen:  # e.g. Greek/Latin in both minimal splits
                    continue
                label = len(names)
                names.append(cname)
                for fname, ref in files:
                    if zf is not None:
                        data: bytes | Path = zf.read(ref)
                    else:
                        data = ref
                    arrays.append(_decode(data, image_size, f"{src}:{cname}/{fname}"))
                    labels.append(label)
        finally:
            if zf is not None:
                zf.close()
    images = np.stack(arrays)[:, None] if arrays else np.zeros((0, 1, image_size, image_size))
    return images.astype(np.uint8), np.asarray(labels, dtype=np.int64), names


def _cache_path(cache_dir: Path, root: Path, splits: Sequence[str], image_size: int) -> Path:
    key = json.dumps(
        {
            "v": _CACHE_VERSION,
            "resample": _RESAMPLE,
            "size": image_size,
            "sources": [_fingerprint(_find_split(root, s)) for s in splits],
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"omniglot-{image_size}px-{digest}.safetensors"


def _load_cached(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = json.loads(f.metadata()["class_names"])
            images = f.get_tensor("images").numpy()
            labels = f.get_tensor("labels").numpy()
        return images, labels, names
    except Exception:  # a stale or truncated cache is rebuilt, never fatal
        return None


def _save_cached(path: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(
        {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)},
        str(tmp),
        metadata={"class_names": json.dumps(names)},
    )
    os.replace(tmp, path)


def load_omniglot(
    root: str | Path,
    splits: Sequence[str] = MINIMAL_SPLITS,
    image_size: int = 28,
    invert: bool = True,
    rotations: bool = False,
    cache_dir: str | Path | None = None,
) -> ClassDataset:
    """Load Omniglot splits into one :class:`ClassDataset` of ``[N, 1, S, S]`` float32 images.

    Args:
        root: folder holding ``<split>/`` folders or ``<split>.zip`` files.
        splits: split names, e.g. the two minimal background splits (default), or
            ``("images_background",)`` / ``("images_evaluation",)``. Classes whose
            ``"Alphabet/characterNN"`` name was already read from an earlier split are
            skipped (dedupe by class name).
        image_size: side of the square output; resized with PIL LANCZOS (105 = no resize).
        invert: ``True`` gives ink = 1 on background 0 (MAML/torchmeta convention);
            ``False`` keeps the PNG convention, ink = 0 on background 1.
        rotations: append 90/180/270-degree rotated copies (counter-clockwise,
            ``torch.rot90``) as extra classes named ``"<name>/rot90"`` etc.: classes
            ``0..n-1`` are the originals, ``n..2n-1`` their rot90 copies, and so on.
        cache_dir: if given, the decoded uint8 images are stored there as safetensors
            (keyed by the sources' sizes/mtimes and ``image_size``) and reused.

    Classes are ordered by split, then alphabet, then character; images of a class by
    file name. Raises :class:`L2OError` naming the path when the root or a split is missing.
    """
    global last_decode_seconds
    root = Path(root).expanduser()
    if isinstance(splits, str):
        splits = (splits,)
    if not root.is_dir():
        parent = root.parent
        raise L2OError(
            f"Omniglot root {root} does not exist or is not a folder"
            + (f"; {parent} holds: {_listing(parent)}" if parent.is_dir() else "")
        )
    if int(image_size) < 1:
        raise L2OError(f"image_size must be >= 1, got {image_size}")
    image_size = int(image_size)

    cached = None
    cpath = None
    if cache_dir is not None:
        cpath = _cache_path(Path(cache_dir).expanduser(), root, splits, image_size)
        if cpath.is_file():
            cached = _load_cached(cpath)
    if cached is None:
        t0 = time.perf_counter()
        raw, labels, names = _read_raw(root, splits, image_size)
        last_decode_seconds = time.perf_counter() - t0
        if cpath is not None:
            _save_cached(cpath, raw, labels, names)
    else:
        raw, labels, names = cached

    x = torch.from_numpy(np.ascontiguousarray(raw)).to(torch.float32).div_(255.0)
    if invert:
        x = 1.0 - x
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    ds = ClassDataset(images=x.contiguous(), labels=y, class_names=list(names))
    return with_rotations(ds) if rotations else ds


def with_rotations(dataset: ClassDataset) -> ClassDataset:
    """``dataset`` plus its 90/180/270-degree rotated copies (counter-clockwise) as new classes.

    Classes ``0..n-1`` are the originals, ``n..2n-1`` their rot90 copies named
    ``"<name>/rot90"``, and so on (the augmentation of Santoro et al. 2016 and MAML).
    """
    x, y, names = dataset.images, dataset.labels, dataset.class_names
    n = len(names)
    xs, ys, all_names = [x], [y], list(names)
    for k in (1, 2, 3):
        xs.append(torch.rot90(x, k, dims=(2, 3)))
        ys.append(y + k * n)
        all_names += [f"{c}/rot{90 * k}" for c in names]
    return ClassDataset(
        images=torch.cat(xs).contiguous(), labels=torch.cat(ys), class_names=all_names
    )


# ----------------------------------------------------------------------------- splits


def alphabet_of(class_name: str) -> str:
    """``"Greek/character01/rot90"`` -> ``"Greek"``."""
    return class_name.split("/", 1)[0]


def _character_of(class_name: str) -> str:
    """``"Greek/character01/rot90"`` -> ``"Greek/character01"`` (rotations grouped)."""
    return "/".join(class_name.split("/")[:2])


def _fractions(fractions: Sequence[float] | Mapping[str, float]) -> list[float]:
    if isinstance(fractions, Mapping):
        unknown = set(fractions) - set(PARTS)
        if unknown:
            raise L2OError(f"split fractions have unknown parts {sorted(unknown)}; use {PARTS}")
        fr = [float(fractions.get(p, 0.0)) for p in PARTS]
    else:
        fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 or not math.isfinite(f) for f in fr) or sum(fr) <= 0:
        raise L2OError(
            f"split fractions must be three non-negative numbers (train, val, test), got {fractions}"
        )
    s = sum(fr)
    return [f / s for f in fr]


def apply_split(
    dataset: ClassDataset, split: Mapping[str, Sequence[str]]
) -> dict[str, ClassDataset]:
    """``{part: ClassDataset}`` from ``{part: [class names]}`` (e.g. from :func:`load_split`)."""
    index = {c: i for i, c in enumerate(dataset.class_names)}
    out: dict[str, ClassDataset] = {}
    used: set[str] = set()
    for part, names in split.items():
        missing = [c for c in names if c not in index]
        if missing:
            raise L2OError(
                f"split part {part!r} names {len(missing)} classes not in the data set, "
                f"e.g. {missing[:3]}"
            )
        dup = used.intersection(names)
        if dup:
            raise L2OError(f"classes in more than one split part, e.g. {sorted(dup)[:3]}")
        used.update(names)
        out[part] = dataset.subset([index[c] for c in names])
    return out


def split_by_alphabet(
    dataset: ClassDataset,
    fractions: Sequence[float] | Mapping[str, float] | Mapping[str, Sequence[str]] = (
        0.6,
        0.2,
        0.2,
    ),
    seed: int = 0,
    min_classes: int = 20,
) -> dict[str, ClassDataset]:
    """Split whole alphabets into ``{"train", "val", "test"}`` (no alphabet in two parts).

    ``fractions`` is either three class-count fractions (train, val, test), or an explicit
    ``{"train": [alphabets], "val": [...], "test": [...]}`` (alphabets not listed are
    dropped). With fractions, the target class count of a part is ``fraction * classes``;
    64 seeded random alphabet orders are each assigned greedily (every alphabet goes to the
    part furthest below its target), assignments leaving a part with a non-zero fraction
    under ``min_classes`` classes (default 20, so 20-way episodes work everywhere) are
    discarded, and the one closest to the targets (sum of absolute class-count errors;
    first drawn on ties) is returned. Within a part classes keep dataset order.
    """
    alphabets: dict[str, list[int]] = {}
    for i, c in enumerate(dataset.class_names):
        alphabets.setdefault(alphabet_of(c), []).append(i)

    if isinstance(fractions, Mapping) and any(
        not isinstance(v, (int, float)) for v in fractions.values()
    ):
        chosen: dict[str, list[str]] = {}
        seen: set[str] = set()
        for part, alist in fractions.items():
            if part not in PARTS:
                raise L2OError(f"unknown split part {part!r}; use {PARTS}")
            if isinstance(alist, str):
                alist = [alist]
            unknown = [a for a in alist if a not in alphabets]
            if unknown:
                raise L2OError(
                    f"alphabets {unknown} (part {part!r}) are not in the data set; "
                    f"it has {sorted(alphabets)}"
                )
            dup = seen.intersection(alist)
            if dup:
                raise L2OError(f"alphabets in more than one split part: {sorted(dup)}")
            seen.update(alist)
            chosen[part] = list(alist)
        return {
            p: dataset.subset(sorted(i for a in chosen.get(p, []) for i in alphabets[a]))
            for p in PARTS
        }

    fr = _fractions(fractions)  # type: ignore[arg-type]
    names = sorted(alphabets)
    total = dataset.num_classes()
    targets = [f * total for f in fr]
    g = torch.Generator().manual_seed(int(seed))
    need = max(int(min_classes), 1)
    best: tuple[float, list[list[str]]] | None = None
    for _ in range(_ALPHABET_DRAWS):
        order = [names[j] for j in torch.randperm(len(names), generator=g).tolist()]
        counts = [0, 0, 0]
        assign: list[list[str]] = [[], [], []]
        for a in order:
            # the active part furthest below its target (ties: train, val, test)
            k = max((k for k in range(3) if fr[k] > 0), key=lambda k: (targets[k] - counts[k], -k))
            assign[k].append(a)
            counts[k] += len(alphabets[a])
        if not all(fr[k] == 0 or counts[k] >= need for k in range(3)):
            continue
        cost = sum(abs(counts[k] - targets[k]) for k in range(3))
        if best is None or cost < best[0]:
            best = (cost, assign)
    if best is None:
        raise L2OError(
            f"cannot split {len(names)} alphabets ({total} classes) by fractions "
            f"{tuple(round(f, 3) for f in fr)} so that every part has >= {min_classes} classes; "
            "lower min_classes or pass explicit alphabet lists"
        )
    return {
        p: dataset.subset(sorted(i for a in best[1][k] for i in alphabets[a]))
        for k, p in enumerate(PARTS)
    }


def split_by_character(
    dataset: ClassDataset,
    fractions: Sequence[float] | Mapping[str, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> dict[str, ClassDataset]:
    """Split characters into ``{"train", "val", "test"}`` by a seeded shuffle.

    Rotated copies (``".../rot90"`` etc.) stay with their character, so no character
    leaks across parts. Part sizes are ``round(fraction * characters)`` (test gets the rest).
    """
    fr = _fractions(fractions)
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(dataset.class_names):
        groups.setdefault(_character_of(c), []).append(i)
    chars = sorted(groups)
    g = torch.Generator().manual_seed(int(seed))
    order = [chars[j] for j in torch.randperm(len(chars), generator=g).tolist()]
    n_train = round(fr[0] * len(chars))
    n_val = min(round(fr[1] * len(chars)), len(chars) - n_train)
    cuts = [order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]]
    return {
        p: dataset.subset(sorted(i for ch in cuts[k] for i in groups[ch]))
        for k, p in enumerate(PARTS)
    }


def save_split(split: Mapping[str, Sequence[str] | ClassDataset], path: str | Path) -> None:
    """Write ``{part: [class names]}`` (or ``{part: ClassDataset}``) as JSON.

    The file lists, per part, its alphabets, class count and class names.
    """
    doc = {}
    for part, v in split.items():
        names = list(v.class_names) if isinstance(v, ClassDataset) else [str(c) for c in v]
        doc[part] = {
            "alphabets": sorted({alphabet_of(c) for c in names}),
            "num_classes": len(names),
            "classes": names,
        }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def load_split(path: str | Path) -> dict[str, list[str]]:
    """Read a :func:`save_split` file back as ``{part: [class names]}``."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise L2OError(f"split file {path} does not exist") from e
    except (OSError, ValueError) as e:
        raise L2OError(f"cannot read split file {path}: {e}") from e
    if not isinstance(doc, dict):
        raise L2OError(f"split file {path} must hold a JSON object of parts")
    out: dict[str, list[str]] = {}
    for part, v in doc.items():
        names = v.get("classes") if isinstance(v, dict) else v
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            raise L2OError(f"split file {path}: part {part!r} has no list of class names")
        out[part] = names
    return out
