"""Few-shot data: Omniglot and miniImageNet loaders, class splits, episode sampler."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from l2o.data import (
    ClassDataset,
    EpisodeSampler,
    apply_split,
    load_miniimagenet,
    load_omniglot,
    load_split,
    save_split,
    split_by_alphabet,
    split_by_character,
)
from l2o.data.miniimagenet import safe_load_pickle
from l2o.data.omniglot import alphabet_of, with_rotations
from l2o.errors import L2OError

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- fixtures

SPLIT1 = {"Alpha": 3, "Greek": 2, "Beta": 2}
SPLIT2 = {"Greek": 2, "Gamma": 4}
DRAWERS = 5


def _glyph(alpha: str, char: int, drawer: int) -> Image.Image:
    """A 105 x 105 1-bit PNG image: black ink (0) on white (1), like Omniglot."""
    im = Image.new("1", (105, 105), 1)
    d = ImageDraw.Draw(im)
    off = (sum(map(ord, alpha)) * 7 + char * 13 + drawer * 5) % 50
    d.rectangle([10 + off, 20, 40 + off, 30], fill=0)  # asymmetric: rotations differ
    d.rectangle([10 + off, 20, 20 + off, 80], fill=0)
    return im


def _omniglot_entries(split: str, spec: dict[str, int]):
    for alpha, n in spec.items():
        for c in range(1, n + 1):
            for dr in range(1, DRAWERS + 1):
                yield (
                    f"{split}/{alpha}/character{c:02d}/{1000 + c:04d}_{dr:02d}.png",
                    _glyph(alpha, c, dr),
                )


def _write_omniglot(root: Path, as_zip: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, spec in (("images_background_small1", SPLIT1), ("images_background_small2", SPLIT2)):
        if as_zip:
            with zipfile.ZipFile(root / f"{split}.zip", "w") as zf:
                zf.writestr(f"{split}/", "")
                for name, im in _omniglot_entries(split, spec):
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")
                    zf.writestr(name, buf.getvalue())
        else:
            for name, im in _omniglot_entries(split, spec):
                p = root / name
                p.parent.mkdir(parents=True, exist_ok=True)
                im.save(p)
    return root


@pytest.fixture(scope="module")
def omni_dirs(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("omniglot")
    return _write_omniglot(base / "folders", False), _write_omniglot(base / "zips", True)


NUM_CLASSES = 3 + 2 + 2 + 4  # Greek counted once


# ----------------------------------------------------------------------------- Omniglot


def test_omniglot_folder_and_zip_agree(omni_dirs):
    folders, zips = omni_dirs
    a = load_omniglot(folders)
    b = load_omniglot(zips)
    assert a.images.shape == (NUM_CLASSES * DRAWERS, 1, 28, 28)
    assert a.images.dtype == torch.float32 and a.labels.dtype == torch.int64
    assert a.class_names == b.class_names
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.num_classes() == NUM_CLASSES
    assert all(n == DRAWERS for n in a.class_counts())


def test_omniglot_dedupes_shared_classes(omni_dirs):
    ds = load_omniglot(omni_dirs[1])
    assert len(set(ds.class_names)) == len(ds.class_names)
    counts = Counter(alphabet_of(c) for c in ds.class_names)
    assert counts == {"Alpha": 3, "Greek": 2, "Beta": 2, "Gamma": 4}
    assert ds.class_names[0] == "Alpha/character01"
    only2 = load_omniglot(omni_dirs[1], splits=("images_background_small2",))
    assert only2.num_classes() == 6


def test_omniglot_invert_convention(omni_dirs):
    inv = load_omniglot(omni_dirs[0], image_size=105)
    raw = load_omniglot(omni_dirs[0], image_size=105, invert=False)
    assert torch.allclose(inv.images, 1 - raw.images)
    # background (corner) is 0 when inverted, ink (top-left of the first stroke) is 1
    assert inv.images[:, 0, 0, 0].max() == 0 and raw.images[:, 0, 0, 0].min() == 1
    img = inv.images[0, 0]
    assert img.max() == 1 and img.mean() < 0.5  # sparse ink on empty background
    assert inv.images.min() >= 0 and inv.images.max() <= 1


def test_omniglot_rotations(omni_dirs):
    ds = load_omniglot(omni_dirs[1], rotations=True)
    n = NUM_CLASSES
    assert ds.num_classes() == 4 * n
    assert ds.images.shape[0] == 4 * n * DRAWERS
    assert ds.class_names[n] == ds.class_names[0] + "/rot90"
    assert ds.class_names[3 * n] == ds.class_names[0] + "/rot270"
    base = ds.images[ds.indices_of(0)]
    assert torch.equal(ds.images[ds.indices_of(n)], torch.rot90(base, 1, dims=(2, 3)))
    assert torch.equal(ds.images[ds.indices_of(2 * n)], torch.rot90(base, 2, dims=(2, 3)))
    assert not torch.equal(ds.images[ds.indices_of(n)], base)


def test_with_rotations_augments_one_part_only(omni_dirs):
    ds = load_omniglot(omni_dirs[1])
    both = load_omniglot(omni_dirs[1], rotations=True)
    rotated = with_rotations(ds)
    assert rotated.class_names == both.class_names and torch.equal(rotated.images, both.images)
    parts = split_by_alphabet(ds, {"train": ["Alpha", "Gamma"], "val": ["Greek"], "test": ["Beta"]})
    train = with_rotations(parts["train"])  # what `--rotations` does: meta-train classes only
    assert train.num_classes() == 4 * parts["train"].num_classes()
    assert {alphabet_of(c) for c in train.class_names} == {"Alpha", "Gamma"}
    assert parts["val"].num_classes() == 2  # validation and test keep the original characters


def test_omniglot_cache(omni_dirs, tmp_path):
    a = load_omniglot(omni_dirs[1], cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    b = load_omniglot(omni_dirs[1], cache_dir=tmp_path / "cache", rotations=True)
    assert (
        torch.equal(b.images[: len(a)], a.images)
        and b.class_names[: a.num_classes()] == a.class_names
    )
    load_omniglot(omni_dirs[1], cache_dir=tmp_path / "cache", image_size=14)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # keyed by size


def test_omniglot_missing_paths(omni_dirs, tmp_path):
    with pytest.raises(L2OError, match="does not exist"):
        load_omniglot(tmp_path / "nope")
    with pytest.raises(L2OError, match=r"images_evaluation.*found: images_background_small1.zip"):
        load_omniglot(omni_dirs[1], splits=("images_evaluation",))


# ----------------------------------------------------------------------------- splits


def test_split_by_alphabet_seeded_and_disjoint(omni_dirs, tmp_path):
    ds = load_omniglot(omni_dirs[1])
    a = split_by_alphabet(ds, (0.5, 0.25, 0.25), seed=3, min_classes=2)
    b = split_by_alphabet(ds, (0.5, 0.25, 0.25), seed=3, min_classes=2)
    assert set(a) == {"train", "val", "test"}
    assert {k: v.class_names for k, v in a.items()} == {k: v.class_names for k, v in b.items()}
    alph = {k: {alphabet_of(c) for c in v.class_names} for k, v in a.items()}
    assert not (
        alph["train"] & alph["val"] or alph["train"] & alph["test"] or alph["val"] & alph["test"]
    )
    assert sum(v.num_classes() for v in a.values()) == ds.num_classes()
    assert all(v.num_classes() >= 2 for v in a.values())
    part = a["val"]  # relabelled 0..k-1, images follow their class
    assert part.labels.max() == part.num_classes() - 1
    c0 = ds.class_names.index(part.class_names[0])
    assert torch.equal(part.images[part.indices_of(0)], ds.images[ds.indices_of(c0)])

    save_split(a, tmp_path / "split.json")
    loaded = load_split(tmp_path / "split.json")
    assert loaded == {k: v.class_names for k, v in a.items()}
    again = apply_split(ds, loaded)
    assert all(torch.equal(again[k].images, a[k].images) for k in a)
    doc = json.loads((tmp_path / "split.json").read_text())
    assert doc["train"]["alphabets"] == sorted(alph["train"])

    with pytest.raises(L2OError, match="min_classes"):
        split_by_alphabet(ds, seed=0)  # 11 classes cannot give 3 parts of >= 20
    explicit = split_by_alphabet(
        ds, {"train": ["Alpha", "Gamma"], "val": ["Greek"], "test": ["Beta"]}
    )
    assert explicit["val"].class_names == ["Greek/character01", "Greek/character02"]
    with pytest.raises(L2OError, match="not in the data set"):
        split_by_alphabet(ds, {"train": ["Klingon"]})


def test_split_by_character_keeps_rotations_together(omni_dirs):
    ds = load_omniglot(omni_dirs[1], rotations=True)
    a = split_by_character(ds, (0.6, 0.2, 0.2), seed=1)
    b = split_by_character(ds, (0.6, 0.2, 0.2), seed=1)
    assert {k: v.class_names for k, v in a.items()} == {k: v.class_names for k, v in b.items()}
    chars = {k: {"/".join(c.split("/")[:2]) for c in v.class_names} for k, v in a.items()}
    assert [len(chars[k]) for k in ("train", "val", "test")] == [7, 2, 2]  # 11 characters
    assert not (chars["train"] & chars["val"] or chars["train"] & chars["test"])
    assert all(v.num_classes() == 4 * len(chars[k]) for k, v in a.items())
    others = [split_by_character(ds, seed=s)["train"].class_names for s in range(2, 6)]
    assert any(o != a["train"].class_names for o in others)


# ----------------------------------------------------------------------------- miniImageNet

WNIDS = ["n01532829", "n01558993", "n01704323"]
PER_CLASS = 4


def _mini_images(seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        w: [rng.integers(0, 256, (10, 12, 3), dtype=np.uint8) for _ in range(PER_CLASS)]
        for w in WNIDS
    }


def _write_csv_format(root: Path, as_zip: bool) -> None:
    root.mkdir(parents=True)
    imgs = _mini_images()
    rows = []
    files = {}
    for w, lst in imgs.items():
        for i, arr in enumerate(lst):
            fname = f"{w}{i:08d}.png"
            rows.append((fname, w))
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            files[fname] = buf.getvalue()
    with open(root / "train.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["filename", "label"])
        wr.writerows(rows)
    if as_zip:
        with zipfile.ZipFile(root / "images.zip", "w") as zf:
            for k, v in files.items():
                zf.writestr(f"images/{k}", v)
    else:
        (root / "images").mkdir()
        for k, v in files.items():
            (root / "images" / k).write_bytes(v)


def _write_folder_format(root: Path) -> None:
    for w, lst in _mini_images().items():
        (root / "train" / w).mkdir(parents=True)
        for i, arr in enumerate(lst):
            Image.fromarray(arr).save(root / "train" / w / f"{w}{i:08d}.png")
        # a JPEG also decodes (lossy; only the shape is checked)
    Image.fromarray(_mini_images(1)[WNIDS[0]][0]).save(root / "train" / WNIDS[0] / "z.jpg")


def _pickle_doc(size: int = 10) -> dict:
    rng = np.random.default_rng(5)
    n = len(WNIDS) * PER_CLASS
    data = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    # interleaved indices: class_dict order must be honoured
    return {
        "image_data": data,
        "class_dict": {w: list(range(c, n, len(WNIDS))) for c, w in enumerate(WNIDS)},
    }


def test_miniimagenet_csv_and_folders(tmp_path):
    _write_csv_format(tmp_path / "csv", as_zip=False)
    _write_csv_format(tmp_path / "csvzip", as_zip=True)
    _write_folder_format(tmp_path / "folders")
    a = load_miniimagenet(tmp_path / "csv", image_size=16)
    b = load_miniimagenet(tmp_path / "csvzip", image_size=16, format="csv")
    c = load_miniimagenet(tmp_path / "folders", image_size=16)
    assert a.images.shape == (len(WNIDS) * PER_CLASS, 3, 16, 16)
    assert a.class_names == WNIDS == b.class_names == c.class_names
    assert torch.equal(a.images, b.images)
    assert c.class_counts() == [PER_CLASS + 1, PER_CLASS, PER_CLASS]
    assert torch.equal(c.images[c.labels != 0], a.images[a.labels != 0])
    assert 0 <= a.images.min() and a.images.max() <= 1
    # native size: exactly pixel / 255, no resize
    full = load_miniimagenet(tmp_path / "csv", image_size=12, format="csv")
    assert full.images.shape[-2:] == (12, 12)
    d = load_miniimagenet(tmp_path / "csv")
    assert d.images.shape[-2:] == (84, 84)


def test_miniimagenet_pickle(tmp_path):
    doc = _pickle_doc(size=10)
    with open(tmp_path / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump(doc, f, protocol=4)
    with open(tmp_path / "mini-imagenet-cache-validation.pkl", "wb") as f:
        pickle.dump(doc, f, protocol=2)
    ds = load_miniimagenet(tmp_path, "train", image_size=10)
    assert ds.class_names == WNIDS
    want = (
        torch.from_numpy(doc["image_data"][doc["class_dict"][WNIDS[1]]]).permute(0, 3, 1, 2) / 255
    )
    assert torch.allclose(ds.images[ds.indices_of(1)], want)
    val = load_miniimagenet(tmp_path, "val", image_size=20, format="pickle")
    assert val.images.shape == (len(WNIDS) * PER_CLASS, 3, 20, 20)
    with pytest.raises(L2OError, match="mini-imagenet-cache-test.pkl"):
        load_miniimagenet(tmp_path, "test")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_miniimagenet_malicious_pickle_rejected(tmp_path):
    marker = tmp_path / "pwned"
    for proto in (0, 2, 4, 5):
        path = tmp_path / "mini-imagenet-cache-train.pkl"
        path.write_bytes(
            pickle.dumps({"image_data": _Evil(marker), "class_dict": {}}, protocol=proto)
        )
        with pytest.raises(L2OError, match=r"mini-imagenet-cache-train\.pkl.*system"):
            load_miniimagenet(tmp_path, "train")
        assert not marker.exists()
    path.write_bytes(pickle.dumps(_EvalEvil()))
    with pytest.raises(L2OError, match="eval"):
        safe_load_pickle(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(L2OError, match="cannot read pickle"):
        load_miniimagenet(tmp_path, "train")
    path.write_bytes(pickle.dumps({"image_data": [1, 2], "class_dict": {}}))
    with pytest.raises(L2OError, match="uint8"):
        load_miniimagenet(tmp_path, "train")


def test_miniimagenet_nothing_found(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(
        L2OError, match=r"looked for .*train\.csv.*mini-imagenet-cache-train\.pkl.*readme\.txt"
    ):
        load_miniimagenet(tmp_path)
    with pytest.raises(L2OError, match="split"):
        load_miniimagenet(tmp_path, split="dev")
    with pytest.raises(L2OError, match="does not exist"):
        load_miniimagenet(tmp_path / "missing")


# ----------------------------------------------------------------------------- sampler


def _toy(num_classes: int = 10, per_class: int = 20) -> ClassDataset:
    n = num_classes * per_class
    labels = torch.arange(n) % num_classes
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ClassDataset(
        images=images, labels=labels, class_names=[f"c{i}" for i in range(num_classes)]
    )


def test_sampler_shapes_labels_disjoint():
    ds = _toy()
    s = EpisodeSampler(ds, ways=5, shots=3, queries=4, seed=7)
    ep = s.episode(0)
    assert ep.support_x.shape == (15, 1, 2, 2) and ep.query_x.shape == (20, 1, 2, 2)
    assert ep.support_y.tolist() == [j for j in range(5) for _ in range(3)]
    assert ep.query_y.tolist() == [j for j in range(5) for _ in range(4)]
    assert len(set(ep.classes)) == 5
    sup_ids = ep.support_x[:, 0, 0, 0].long()
    qry_ids = ep.query_x[:, 0, 0, 0].long()  # image value = image index
    assert not set(sup_ids.tolist()) & set(qry_ids.tolist())
    assert torch.equal(ds.labels[sup_ids], torch.tensor(ep.classes)[ep.support_y])
    assert torch.equal(ds.labels[qry_ids], torch.tensor(ep.classes)[ep.query_y])


def test_sampler_reproducible_random_access():
    ds = _toy()
    s = EpisodeSampler(ds, ways=5, shots=1, queries=5, seed=1)
    eps = list(s.episodes(4))
    again = EpisodeSampler(ds, ways=5, shots=1, queries=5, seed=1)
    e2 = again.episode(2)  # out of order, fresh sampler
    assert torch.equal(e2.support_x, eps[2].support_x) and e2.classes == eps[2].classes
    assert list(s.episodes(2, start=2))[1].classes == eps[3].classes
    assert eps[0].classes != eps[1].classes or not torch.equal(eps[0].query_x, eps[1].query_x)
    other = EpisodeSampler(ds, ways=5, shots=1, queries=5, seed=2).episode(2)
    assert not torch.equal(other.support_x, e2.support_x)
    torch.manual_seed(0)
    g = torch.rand(3)
    torch.manual_seed(0)
    s.episode(9)
    assert torch.equal(torch.rand(3), g)  # global RNG untouched
    # class order varies: labels are not sorted by dataset class
    assert any(e.classes != sorted(e.classes) for e in s.episodes(10))


def test_sampler_errors():
    ds = _toy(num_classes=4, per_class=6)
    with pytest.raises(L2OError, match=r"ways=5.*4 classes"):
        EpisodeSampler(ds, ways=5, shots=1)
    with pytest.raises(L2OError, match=r"2 \+ 5 = 7.*6 images"):
        EpisodeSampler(ds, ways=2, shots=2, queries=5)
    EpisodeSampler(ds, ways=4, shots=1, queries=5)


# ----------------------------------------------------------------------------- real data


def _real_omniglot() -> Path | None:
    env = os.environ.get("L2O_DATA")
    for base in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (base / "omniglot" / "images_background_small1.zip").is_file():
            return base / "omniglot"
    return None


@pytest.mark.skipif(
    _real_omniglot() is None,
    reason="real Omniglot minimal splits not found ($L2O_DATA/omniglot or ../shared/data/omniglot)",
)
def test_real_omniglot_minimal(tmp_path):
    ds = load_omniglot(_real_omniglot())
    assert ds.num_classes() == 242
    assert set(ds.class_counts()) == {20}
    assert ds.images.shape == (4840, 1, 28, 28)
    assert ds.images[:, 0, 0, 0].max() == 0  # inverted: background 0
    counts = Counter(alphabet_of(c) for c in ds.class_names)
    assert counts == {
        "Balinese": 24,
        "Early_Aramaic": 22,
        "Greek": 24,
        "Korean": 40,
        "Latin": 26,
        "Japanese_(katakana)": 47,
        "Sanskrit": 42,
        "Tagalog": 17,
    }
    parts = split_by_alphabet(ds, seed=0)
    alph = {k: sorted({alphabet_of(c) for c in v.class_names}) for k, v in parts.items()}
    assert alph == {
        "train": ["Early_Aramaic", "Greek", "Korean", "Sanskrit", "Tagalog"],
        "val": ["Japanese_(katakana)"],
        "test": ["Balinese", "Latin"],
    }
    assert [parts[k].num_classes() for k in ("train", "val", "test")] == [145, 47, 50]
    for part in parts.values():
        ep = EpisodeSampler(part, ways=20, shots=5, queries=15).episode(0)
        assert ep.query_x.shape == (300, 1, 28, 28)
    save_split(parts, tmp_path / "omniglot_split.json")
    assert apply_split(ds, load_split(tmp_path / "omniglot_split.json"))["val"].num_classes() == 47
