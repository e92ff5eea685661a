"""``family``: a broad family of small optimizees, one drawn per problem seed (issue 18).

    --task family
    --task family:members=mlp+cnn,datasets=mnist+synthetic,batches=32+128

Each seed draws (reproducibly, :meth:`Family.draw` / :meth:`Family.describe_seed`):

* a member: ``mlp`` (1-3 hidden layers of 16/32/64 units, sigmoid/tanh/relu/gelu),
  ``cnn`` (two stride-2 3x3 convolutions of 4-16 channels, mean pool, linear; with
  or without batch norm over batch statistics), ``logreg`` (one linear layer) or
  ``autoencoder`` (image -> 16/32 units -> image, MSE);
* a data set: ``mnist`` and ``omniglot`` (14x14 grey), ``cifar10`` (8x8 RGB) or
  ``synthetic`` (10 Gaussian class prototypes of 8x8 images, drawn from the seed);
  Omniglot problems classify 10 characters drawn from the role's classes;
* a batch size (``batches``) and an initial-scale factor, log-uniform in ``init_scales``
  (default ``0.5+2``: [0.5, 2]), on a 1/sqrt(fan-in) normal initialisation.

``members=`` may also name ``l2l-mnist``, not drawn by default: L2L's own MNIST optimizee
(784 -> 20 sigmoid -> 10 on 28x28 MNIST, batch 128, weights and biases N(0, 0.01^2)), for a
general rule that must keep the paper's task; it ignores ``datasets`` and ``batches``.

Models are small (about 1k-50k parameters) and evaluated functionally on the flat
parameter vector (hand-written ``F.linear`` / ``F.conv2d``), one problem per seed
(``max_batch = 1``).  Splits: meta-training (``for_role("train")``) uses MNIST /
CIFAR-10 ``train``, Omniglot characters with class index % 5 != 0; validation
(``"val"``) MNIST / CIFAR-10 ``val`` and the other Omniglot characters; any other
use (compare) ``test`` (Omniglot: the validation characters).  With the trainer's
separate seed streams for training and validation, validation tasks are disjoint
from training ones in both the drawn models and the data.  Separators are ``+``
because ``,`` separates the spec's keys.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from .base import ParamLayout, Problem, Task, generator, step_seed

MEMBERS = ("mlp", "cnn", "logreg", "autoencoder")
#: members a family can name but does not draw by default; ``l2l-mnist`` is L2L's own MNIST
#: optimizee (784 -> 20 sigmoid -> 10 on 28x28 MNIST, batch 128, every weight and bias
#: N(0, 0.01^2)), for a general rule that must keep the paper's task
EXTRA_MEMBERS = ("l2l-mnist",)
DATASETS = ("mnist", "cifar10", "omniglot", "synthetic")
ACTS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu}
ROLES = ("train", "val", "test")

_DATA_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


def _load(dataset: str, role: str, data_dir: str) -> tuple[Tensor, Tensor]:
    """Images ``[N, C, S, S]`` float in [0, 1] and labels of ``dataset`` for ``role`` (cached)."""
    key = (dataset, role, data_dir)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    if dataset in ("mnist", "mnist28"):
        from ..data import mnist

        x, y = mnist.split(role, data_dir or None)
        x = x.reshape(-1, 1, 28, 28).float()
        if dataset == "mnist":
            x = F.avg_pool2d(x, 2)  # 14x14
    elif dataset == "cifar10":
        from ..data import cifar10

        x, y = cifar10.split(role, data_dir or None)
        x = F.avg_pool2d(x.float(), 4)  # 8x8: keeps the RGB models small
    elif dataset == "omniglot":
        from ..data import mnist as _m
        from ..data.omniglot import load_omniglot

        root = _m.data_dir(data_dir or None) / "omniglot"
        ds = load_omniglot(root, image_size=14)
        # characters with class index % 5 == 0 are validation/test, the rest training
        keep = (ds.labels % 5 != 0) if role == "train" else (ds.labels % 5 == 0)
        x, y = ds.images[keep], ds.labels[keep]
    else:
        raise ValueError(f"family: unknown dataset {dataset!r}; known: {DATASETS}")
    if x.max() > 1.5:  # uint8-scaled sources
        x = x / 255.0
    _DATA_CACHE[key] = (x.contiguous(), y.long())
    return _DATA_CACHE[key]


def _split_names(value, what: str, known: Sequence[str]) -> tuple[str, ...]:
    names = tuple(value) if isinstance(value, list | tuple) else tuple(str(value).split("+"))
    names = tuple(n.strip() for n in names if n.strip())
    bad = [n for n in names if n not in known]
    if not names or bad:
        raise ValueError(f"family option {what}: unknown {bad or 'empty'}; choose from {known}")
    return names


class FamilyProblem(Problem):
    """One drawn optimizee (see :meth:`Family.draw`)."""

    num_instances = 1

    def __init__(self, task: Family, seed: int):
        self.task, self.seed = task, int(seed)
        self.spec = spec = task.draw(seed)
        g = generator(self.seed * 31 + 7)
        if spec["dataset"] == "synthetic":
            # 10 class prototypes of 1x8x8 images; samples = prototype + noise (from the seed)
            protos = torch.rand(10, 1, 8, 8, generator=g)
            y = torch.randint(10, (2048,), generator=g)
            x = (protos[y] + 0.3 * torch.randn(2048, 1, 8, 8, generator=g)).clamp(0, 1)
        else:
            x, y = _load(spec["dataset"], task.role, task.data_dir)
            if spec["dataset"] == "omniglot":  # 10 characters of this role, relabelled 0..9
                classes = torch.unique(y)
                pick = classes[torch.randperm(len(classes), generator=g)[:10]]
                mask = (y.unsqueeze(1) == pick.unsqueeze(0)).any(1)
                x, y = x[mask], (y[mask].unsqueeze(1) == pick.unsqueeze(0)).float().argmax(1)
        self.images, self.labels = x, y
        C, S = x.shape[1], x.shape[2]
        self.in_shape, D = (C, S, S), C * S * S
        names: list[str] = []
        shapes: list[tuple[int, ...]] = []

        def lin(name, i, o):
            names.extend([f"{name}.w", f"{name}.b"])
            shapes.extend([(o, i), (o,)])

        m = spec["member"]
        if m == "logreg":
            lin("fc0", D, 10)
        elif m in ("mlp", "l2l-mnist"):
            sizes = [D, *spec["hidden"], 10]
            for k in range(len(sizes) - 1):
                lin(f"fc{k}", sizes[k], sizes[k + 1])
        elif m == "autoencoder":
            lin("enc", D, spec["hidden"][0])
            lin("dec", spec["hidden"][0], D)
        else:  # cnn
            c1, c2 = spec["channels"]
            names += ["conv0.w", "conv0.b", "conv1.w", "conv1.b"]
            shapes += [(c1, C, 3, 3), (c1,), (c2, c1, 3, 3), (c2,)]
            if spec["batchnorm"]:
                names += ["bn0.g", "bn0.b", "bn1.g", "bn1.b"]
                shapes += [(c1,), (c1,), (c2,), (c2,)]
            lin("fc0", c2, 10)
        self.layout = ParamLayout(tuple(names), tuple(shapes))
        parts = []
        for n, s in zip(names, shapes, strict=True):
            if "init_std" in spec:  # l2l-mnist: every weight and bias N(0, init_std^2)
                parts.append(torch.randn(s, generator=g) * spec["init_std"])
            elif n.endswith(".g"):
                parts.append(torch.ones(s))
            elif len(s) == 1:
                parts.append(torch.zeros(s))
            else:
                fan_in = math.prod(s[1:])
                parts.append(torch.randn(s, generator=g) * spec["init_scale"] / math.sqrt(fan_in))
        self.theta0 = self.layout.flatten(parts)

    def init(self) -> Tensor:
        return self.theta0.clone()

    def loss(self, theta: Tensor, t: int) -> Tensor:
        spec = self.spec
        idx = torch.randint(
            self.images.shape[0], (spec["batch"],), generator=generator(step_seed(self.seed, t))
        )
        x, y = self.images[idx], self.labels[idx]
        p = self.layout.unflatten(theta)
        act = ACTS[spec["activation"]]
        m = spec["member"]
        if m == "cnn":
            h = F.conv2d(x, p["conv0.w"], p["conv0.b"], stride=2, padding=1)
            if spec["batchnorm"]:  # batch statistics, no running averages
                h = F.batch_norm(h, None, None, p["bn0.g"], p["bn0.b"], training=True)
            h = act(h)
            h = F.conv2d(h, p["conv1.w"], p["conv1.b"], stride=2, padding=1)
            if spec["batchnorm"]:
                h = F.batch_norm(h, None, None, p["bn1.g"], p["bn1.b"], training=True)
            h = act(h).mean((2, 3))
            return F.cross_entropy(F.linear(h, p["fc0.w"], p["fc0.b"]), y).reshape(1)
        h = x.reshape(x.shape[0], -1)
        if m == "autoencoder":
            z = act(F.linear(h, p["enc.w"], p["enc.b"]))
            rec = torch.sigmoid(F.linear(z, p["dec.w"], p["dec.b"]))
            return F.mse_loss(rec, h).reshape(1)
        layers = 1 if m == "logreg" else len(spec["hidden"]) + 1
        for k in range(layers):
            h = F.linear(h, p[f"fc{k}.w"], p[f"fc{k}.b"])
            if k < layers - 1:
                h = act(h)
        return F.cross_entropy(h, y).reshape(1)


class Family(Task):
    """Sampled small optimizees (module docstring)."""

    name = "family"
    max_batch = 1

    def __init__(
        self,
        members: str = "+".join(MEMBERS),
        datasets: str = "+".join(DATASETS),
        batches: str = "16+32+64+128",
        init_scales: str = "0.5+2",
        split: str = "",
        data_dir: str = "",
    ):
        self.members = _split_names(members, "members", MEMBERS + EXTRA_MEMBERS)
        self.datasets = _split_names(datasets, "datasets", DATASETS)
        try:
            self.batches = tuple(int(b) for b in str(batches).split("+"))
        except ValueError:
            raise ValueError(
                f"family option batches: expected sizes like 32+128, got {batches!r}"
            ) from None
        if not self.batches or any(b <= 0 for b in self.batches):
            raise ValueError(f"family option batches: sizes must be positive, got {batches!r}")
        try:
            lo, hi = (float(v) for v in str(init_scales).split("+"))
        except ValueError:
            raise ValueError(
                f"family option init_scales: expected LOW+HIGH like 0.5+2, got {init_scales!r}"
            ) from None
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(
                f"family option init_scales: need 0 < LOW <= HIGH (finite), got {init_scales!r}"
            )
        self.init_scales = (lo, hi)
        if split not in ("",) + ROLES:
            raise ValueError(
                f"family option split: one of {ROLES} (or empty: by use), got {split!r}"
            )
        self.split, self.data_dir = split, data_dir or os.environ.get("L2O_DATA", "")

    @property
    def role(self) -> str:
        return self.split or "test"

    def for_role(self, role: str) -> Family:
        """This family for meta-training (``"train"``) or validation (``"val"``): its data split."""
        if self.split or role not in ("train", "val"):
            return self
        other = copy.copy(self)
        other.split = role
        return other

    def draw(self, seed: int) -> dict:
        """What seed ``seed`` draws: a pure function of the seed and the family's options."""
        g = generator(int(seed) * 7 + 3)

        def pick(options):
            return options[int(torch.randint(len(options), (1,), generator=g))]

        # init scale log-uniform in [lo, hi], written around the geometric centre so the
        # default [0.5, 2] gives the same floats as before the option existed
        lo, hi = self.init_scales
        centre, half = math.log(math.sqrt(lo * hi)), math.log(hi / lo) / 2
        spec = {
            "member": pick(self.members),
            "dataset": pick(self.datasets),
            "batch": pick(self.batches),
            "activation": pick(tuple(ACTS)),
            "init_scale": float(
                math.exp(centre + half * (2 * float(torch.rand(1, generator=g)) - 1))
            ),
        }
        if spec["member"] == "l2l-mnist":  # fixed: the paper's MNIST task, nothing drawn
            spec.update(dataset="mnist28", batch=128, activation="sigmoid", hidden=[20])
            spec["init_std"] = 0.01
            del spec["init_scale"]
        elif spec["member"] == "mlp":
            depth = pick((1, 2, 3))
            spec["hidden"] = [pick((16, 32, 64)) for _ in range(depth)]
        elif spec["member"] == "autoencoder":
            spec["hidden"] = [pick((16, 32))]
        elif spec["member"] == "cnn":
            spec["channels"] = [pick((4, 8)), pick((8, 16))]
            spec["batchnorm"] = bool(pick((False, True)))
        return spec

    def describe_seed(self, seed: int) -> dict:
        return {"seed": int(seed), "split": self.role, **self.draw(seed)}

    def describe(self) -> dict:
        return {
            "task": self.name,
            "members": list(self.members),
            "datasets": list(self.datasets),
            "batches": list(self.batches),
            "init_scales": list(self.init_scales),
            "split": self.role,
        }

    def sample(self, seeds: Sequence[int]) -> FamilyProblem:
        if len(seeds) != 1:
            raise ValueError(f"{self.name} samples one problem per seed; got {len(seeds)} seeds")
        return FamilyProblem(self, int(seeds[0]))
