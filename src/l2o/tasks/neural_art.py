"""Neural Art: style transfer as an optimizee (L2L section 3.5, Gatys et al. 2016).

``neural-art``: the parameters theta are the pixels of an image ``[3, size, size]``;
the objective is

    f(theta) = content_weight * L_content(c, theta) + style_weight * L_style(s, theta)
               + tv_weight * L_TV(theta)

with ``L_content`` the mean squared difference of the content layer's features of theta
and of the content image c, ``L_style`` the sum over the style layers of the mean squared
difference of Gram matrices (G = F F^T / (H W)), ``L_TV`` the mean squared difference of
neighbouring pixels.  One style per task (``style=`` a name under
``D/neural-art/style/`` or a JPEG/PNG path, center-cropped and resized to ``size``);
the content image of the problem with seed ``k`` is image ``k % N`` of the split's
content set (:mod:`l2o.data.neural_art`), and ``init=noise`` starts from
0.5 + 0.1 N(0, 1) pixels seeded by ``k`` (``init=content``: the content image).

Features (``features=``):

* ``random`` (default): a fixed, seeded multi-scale convolutional network with random
  filters (Ustyuzhaninov et al. 2017; He et al. 2016): four stages of a 3 x 3 convolution
  + ReLU (32, 64, 96, 128 filters, He-normal weights from seed 0), 2 x 2 average pooling
  between stages; style layers: every stage's output, content layer: the third.  The
  size must be a multiple of 8.
* ``vgg19:PATH``: torchvision's VGG-19 ``features`` up to ``conv5_1`` (names conv1_1 ..
  conv5_1; state-dict keys ``features.N.weight`` / ``features.N.bias`` as torchvision
  writes them, or ``conv1_1.weight`` ...), weights from a local ``.safetensors`` or
  ``.pth`` file (read with ``weights_only=True``); content layer conv4_2, style layers
  conv1_1, conv2_1, conv3_1, conv4_1, conv5_1; ImageNet mean/std input normalization;
  max pooling replaced by average pooling (as Gatys et al. suggest).  The size must be a
  multiple of 16.

P instances share the feature network and run as one batch of P images: the layout is
``image: [P, 3, size, size]`` and the losses are ``[P]``.  Content sets: meta-training
uses ``split=train``, validation ``val``, compare / benchmarks ``test`` (default ``split=``
empty = by use, as ``mnist-mlp``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from ..data import neural_art as data
from ..errors import L2OError
from .base import ParamLayout, Problem, Task, generator

#: torchvision vgg19().features: (index, name, in, out) of the convolutions up to conv5_1
VGG19_CONVS = (
    (0, "conv1_1", 3, 64),
    (2, "conv1_2", 64, 64),
    (5, "conv2_1", 64, 128),
    (7, "conv2_2", 128, 128),
    (10, "conv3_1", 128, 256),
    (12, "conv3_2", 256, 256),
    (14, "conv3_3", 256, 256),
    (16, "conv3_4", 256, 256),
    (19, "conv4_1", 256, 512),
    (21, "conv4_2", 512, 512),
    (23, "conv4_3", 512, 512),
    (25, "conv4_4", 512, 512),
    (28, "conv5_1", 512, 512),
)
VGG_CONTENT = "conv4_2"
VGG_STYLE = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_CHANNELS = (32, 64, 96, 128)
#: Default objective weights.  Why style 300: with the random features a style weight of 10
#: left the pictures as the content photo with a slight tint, and the objective was solved in
#: ~30 steps (every optimizer then sat on the same floor); at 300 the result is visibly in
#: the painting's colours and texture and the loss still falls over all 128 steps
#: (docs/results/neural_art.md shows both).
CONTENT_WEIGHT, STYLE_WEIGHT, TV_WEIGHT = 10.0, 300.0, 1.0


class FeatureNet:
    """A chain of 3 x 3 convolutions + ReLU with 2 x 2 average pooling where ``pool_after``.

    ``__call__(x)`` returns ``{name: activation}`` of the layers in ``keep``.
    """

    def __init__(self, convs, pool_after, content, style, multiple, mean=None, std=None):
        self.convs = convs  # [(name, weight, bias)]
        self.pool_after, self.content, self.style = set(pool_after), content, tuple(style)
        self.multiple = multiple
        self.mean = None if mean is None else torch.tensor(mean).view(1, 3, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(1, 3, 1, 1)
        keep = {content, *style}
        last = max(i for i, (n, _, _) in enumerate(convs) if n in keep)
        self.convs = convs[: last + 1]

    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        if self.mean is not None:
            x = (x - self.mean.to(x)) / self.std.to(x)
        out, keep = {}, {self.content, *self.style}
        for name, w, b in self.convs:
            x = torch.relu(F.conv2d(x, w, b, padding=1))
            if name in keep:
                out[name] = x
            if name in self.pool_after:
                x = F.avg_pool2d(x, 2)
        return out


def random_features(seed: int = 0) -> FeatureNet:
    g = generator(seed)
    convs, c_in = [], 3
    for k, c in enumerate(RANDOM_CHANNELS, 1):
        w = torch.randn(c, c_in, 3, 3, generator=g) * (2.0 / (c_in * 9)) ** 0.5
        convs.append((f"conv{k}", w, torch.zeros(c)))
        c_in = c
    names = [n for n, _, _ in convs]
    return FeatureNet(convs, names[:-1], "conv3", names, multiple=8)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise L2OError(
            f"VGG-19 weights file not found: {path} (expected a .safetensors or torchvision .pth "
            "state dict of vgg19)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise L2OError(
            f"cannot read VGG-19 weights {path}: {msg} (expected a .safetensors or a .pth "
            "state dict readable with weights_only=True)"
        ) from None
    if not isinstance(sd, dict):
        raise L2OError(f"VGG-19 weights {path}: expected a state dict, got {type(sd).__name__}")
    return sd


def vgg19_features(path: str | os.PathLike) -> FeatureNet:
    """VGG-19's convolutions up to conv5_1 from a local state dict (see module docstring)."""
    path = Path(path).expanduser()
    sd = _read_state_dict(path)
    convs = []
    for idx, name, c_in, c_out in VGG19_CONVS:
        tensors = []
        for part, shape in (("weight", (c_out, c_in, 3, 3)), ("bias", (c_out,))):
            keys = (f"features.{idx}.{part}", f"{name}.{part}")
            key = next((k for k in keys if k in sd), None)
            if key is None:
                raise L2OError(
                    f"VGG-19 weights {path}: missing {keys[0]} (or {keys[1]}); expected "
                    f"torchvision vgg19 names features.N.weight/bias for conv1_1..conv5_1"
                )
            t = sd[key]
            if tuple(t.shape) != shape:
                raise L2OError(
                    f"VGG-19 weights {path}: {key} ({name}) has shape {tuple(t.shape)}, "
                    f"expected {shape}"
                )
            tensors.append(t.float().contiguous())
        convs.append((name, *tensors))
    pools = ("conv1_2", "conv2_2", "conv3_4", "conv4_4")
    return FeatureNet(convs, pools, VGG_CONTENT, VGG_STYLE, 16, IMAGENET_MEAN, IMAGENET_STD)


_NETS: dict[str, FeatureNet] = {}


def build_features(spec: str) -> FeatureNet:
    """``random`` or ``vgg19:PATH`` (cached per spec)."""
    if spec not in _NETS:
        if spec == "random":
            _NETS[spec] = random_features(0)
        elif spec.startswith("vgg19:") and len(spec) > 6:
            _NETS[spec] = vgg19_features(spec[6:])
        else:
            raise L2OError(f"neural-art: features= takes 'random' or 'vgg19:PATH', got {spec!r}")
    return _NETS[spec]


def gram(f: Tensor) -> Tensor:
    """``[N, C, C]`` Gram matrices of ``[N, C, H, W]`` features, divided by H W."""
    n, c, h, w = f.shape
    x = f.reshape(n, c, h * w)
    return torch.bmm(x, x.transpose(1, 2)) / (h * w)


class NeuralArtProblem(Problem):
    def __init__(self, task: NeuralArt, content: Tensor, theta0: Tensor, content_feat: Tensor):
        self.task, self.content, self.theta0 = task, content, theta0
        self.content_feat = content_feat
        self.num_instances = P = content.shape[0]
        self.layout = ParamLayout(("image",), ((P, 3, task.size, task.size),), P)
        self.style_grams = task.style_grams

    def init(self) -> Tensor:
        return self.theta0.reshape(-1).clone()

    def to(self, device) -> NeuralArtProblem:
        raise L2OError("neural-art runs on the CPU only")

    def loss(self, theta: Tensor, t: int) -> Tensor:
        task = self.task
        x = theta.view(self.num_instances, 3, task.size, task.size)
        feats = task.net(x)
        content = (feats[task.net.content] - self.content_feat).pow(2).mean((1, 2, 3))
        style = sum(
            (gram(feats[n]) - g).pow(2).mean((1, 2))
            for n, g in zip(task.net.style, self.style_grams, strict=True)
        )
        tv = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).mean((1, 2, 3)) + (
            x[:, :, :, 1:] - x[:, :, :, :-1]
        ).pow(2).mean((1, 2, 3))
        return task.content_weight * content + task.style_weight * style + task.tv_weight * tv


class NeuralArt(Task):
    """Style transfer of content images (options in the module docstring)."""

    name = "neural-art"

    def __init__(
        self,
        size: int = 64,
        style: str = "starry_night",
        content_weight: float = CONTENT_WEIGHT,
        style_weight: float = STYLE_WEIGHT,
        tv_weight: float = TV_WEIGHT,
        features: str = "random",
        init: str = "noise",
        split: str = "",
        data_dir: str = "",
    ):
        self.features = features
        self.net = build_features(features)
        m = self.net.multiple
        if size < 16 or size % m:
            raise L2OError(
                f"neural-art: size must be >= 16 and a multiple of {m} for features={features}, "
                f"got {size}"
            )
        if init not in ("noise", "content"):
            raise L2OError(f"neural-art: init must be 'noise' or 'content', got {init!r}")
        if split not in ("",) + data.SPLITS:
            raise L2OError(
                f"neural-art: split must be one of {data.SPLITS} or empty, got {split!r}"
            )
        for key, v in (
            ("content_weight", content_weight),
            ("style_weight", style_weight),
            ("tv_weight", tv_weight),
        ):
            if not v >= 0:
                raise L2OError(f"neural-art: {key} must be >= 0, got {v}")
        self.size, self.style, self.init = int(size), style, init
        self.content_weight, self.style_weight = float(content_weight), float(style_weight)
        self.tv_weight, self.split, self.data_dir = float(tv_weight), split, data_dir
        self.style_file = data.style_path(style, data_dir or None)
        self.style_image = data.read_image(self.style_file, self.size)
        with torch.no_grad():
            f = self.net(self.style_image[None])
            self.style_grams = [gram(f[n]) for n in self.net.style]
        self.max_batch = max(1, min(32, (64 * 64 * 32) // (self.size * self.size)))
        self._images: Tensor | None = None

    @property
    def effective_split(self) -> str:
        return self.split or "test"

    def images(self) -> Tensor:
        if self._images is None:
            self._images = data.content_set(self.effective_split, self.size, self.data_dir or None)
        return self._images

    def for_role(self, role: str) -> NeuralArt:
        if self.split or role not in ("train", "val"):
            return self
        other = copy.copy(self)
        other.split, other._images = role, None
        return other

    def describe(self) -> dict:
        return {
            "task": self.name,
            "size": self.size,
            "style": str(self.style_file.name),
            "content_weight": self.content_weight,
            "style_weight": self.style_weight,
            "tv_weight": self.tv_weight,
            "features": self.features,
            "init": self.init,
            "split": self.effective_split,
        }

    def problem(self, content: Tensor, seeds: Sequence[int]) -> NeuralArtProblem:
        """A problem on given content images ``[P, 3, size, size]`` (init from ``seeds``)."""
        if self.init == "content":
            theta0 = content.clone()
        else:
            s = self.size
            theta0 = torch.stack(
                [0.5 + 0.1 * torch.randn(3, s, s, generator=generator(k)) for k in seeds]
            )
        with torch.no_grad():
            cf = self.net(content)[self.net.content]
        return NeuralArtProblem(self, content, theta0, cf)

    def sample(self, seeds: Sequence[int]) -> NeuralArtProblem:
        if not 1 <= len(seeds) <= self.max_batch:
            raise ValueError(f"{self.name} batches 1..{self.max_batch} problems, got {len(seeds)}")
        imgs = self.images()
        idx = torch.tensor([int(k) % imgs.shape[0] for k in seeds])
        return self.problem(imgs[idx], seeds)
