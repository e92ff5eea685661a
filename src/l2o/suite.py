"""A fixed suite of 8 models *outside* the meta-training family, for measuring transfer.

The meta-training family (issue 18) is MLPs of various widths/activations, small CNNs
with/without BN, logistic regression and autoencoders on MNIST / CIFAR-10 / Omniglot.
None of the models here is one of those:

==================  =====================================================  ==============
name                model                                                   data
==================  =====================================================  ==============
``resnet-cifar``    ResNet-style CNN, 2 residual blocks, 16 ch, BN          CIFAR-10
``char-lstm``       character LSTM LM (embedding 32, hidden 64)             Python stdlib
``char-gru``        character GRU LM (embedding 16, hidden 64)         Python stdlib
``transformer-sort`` 2-layer transformer (d=32, 2 heads), sort 10 digits     synthetic
``mlp-deep``        ReLU MLP 784-64-64-64-10                             MNIST
``cnn-l2``          CNN, loss + 1e-4 * sum of squared weights               MNIST
``resmlp-regress``  deep tanh residual MLP (6 blocks), MSE regression       synthetic
``dwsep-cifar``     depthwise-separable conv net, GELU + GroupNorm(1)       CIFAR-10
==================  =====================================================  ==============

Every model is a :class:`Problem`: ``build(seed)`` a freshly initialized module (a
pure function of the seed), ``batch(seed, step)`` the minibatch of that step (a pure
function of ``(seed, step)``), ``loss(model, batch)`` the training loss (with any
penalty) and ``evaluate(model)`` the held-out loss and accuracy (``None`` where
accuracy means nothing).  Held-out data: CIFAR-10 ``test_batch.bin`` (first 1,000),
MNIST t10k (first 2,000), other stdlib files than those trained on, and fixed
sequences / points drawn from a seed no training batch uses.

The character models read the ``.py`` files directly in the running interpreter's
``sysconfig.get_paths()["stdlib"]`` (sorted by name; every 8th file is held out;
bytes > 127 map to 0), so their text depends on the Python version (recorded).

``make(name, data_dir=None, synthetic=False)``: with ``synthetic=True`` the dataset
models get random tensors of the right shapes instead of MNIST / CIFAR-10 (for tests
without the data).
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["NAMES", "Problem", "make", "needs_data", "stdlib_text"]

NAMES = (
    "resnet-cifar",
    "char-lstm",
    "char-gru",
    "transformer-sort",
    "mlp-deep",
    "cnn-l2",
    "resmlp-regress",
    "dwsep-cifar",
)
# which dataset each model reads (None: nothing outside the interpreter)
_DATA = {
    "resnet-cifar": "cifar10",
    "dwsep-cifar": "cifar10",
    "mlp-deep": "mnist",
    "cnn-l2": "mnist",
}


def needs_data(name: str) -> str | None:
    """``"mnist"``, ``"cifar10"`` or ``None``: the dataset model ``name`` reads."""
    return _DATA.get(name)


def _gen(seed: int, step: int, salt: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7_919 + salt * 104_729) % (2**63 - 1))
    return g


@dataclass
class Problem:
    name: str
    description: str
    data: str
    build_fn: Callable[[], nn.Module]
    batch: Callable[[int, int], tuple[Tensor, Tensor]]
    loss: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]
    eval_fn: Callable[[nn.Module], dict]
    info: dict = field(default_factory=dict)

    def build(self, seed: int) -> nn.Module:
        """The model, initialized from ``seed`` (the global RNG is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build_fn()
        return model

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        """``{"loss": float, "accuracy": float | None}`` on the held-out data (eval mode)."""
        was = model.training
        model.eval()
        try:
            return self.eval_fn(model)
        finally:
            model.train(was)


# ----------------------------------------------------------------------------- data


def _classification(x_train, y_train, x_test, y_test, batch_size, salt):
    def batch(seed, step):
        i = torch.randint(0, x_train.shape[0], (batch_size,), generator=_gen(seed, step, salt))
        return x_train[i], y_train[i]

    def evaluate(model):
        logits = torch.cat([model(x) for x in x_test.split(500)])
        return {
            "loss": float(F.cross_entropy(logits, y_test)),
            "accuracy": float((logits.argmax(1) == y_test).float().mean()),
        }

    return batch, evaluate


def _synthetic_images(shape, n_train=512, n_test=256):
    g = _gen(12345, 0)
    return (
        torch.rand((n_train, *shape), generator=g),
        torch.randint(0, 10, (n_train,), generator=g),
        torch.rand((n_test, *shape), generator=g),
        torch.randint(0, 10, (n_test,), generator=g),
    )


def _mnist(data_dir, synthetic):
    if synthetic:
        return _synthetic_images((784,))
    from .data import mnist

    d = mnist.load(data_dir)
    return d["train_images"], d["train_labels"], d["test_images"][:2000], d["test_labels"][:2000]


def _cifar(data_dir, synthetic):
    if synthetic:
        return _synthetic_images((3, 32, 32))
    from .data import cifar10

    d = cifar10.load(data_dir)
    return d["train_images"], d["train_labels"], d["test_images"][:1000], d["test_labels"][:1000]


_TEXT: dict[str, tuple[Tensor, Tensor, list[str]]] = {}


def stdlib_text(
    max_train: int = 2_000_000, max_test: int = 200_000
) -> tuple[Tensor, Tensor, list[str]]:
    """(train bytes, held-out bytes, file names) from the interpreter's stdlib ``*.py`` files.

    Files directly in the stdlib folder, sorted by name; file ``i`` is held out when
    ``i % 8 == 7``.  Bytes are int64 in 0..127 (anything else -> 0)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    key = f"{root}:{max_train}:{max_test}"
    if key not in _TEXT:
        files = sorted(p for p in root.glob("*.py") if p.is_file())
        train, test = bytearray(), bytearray()
        for i, p in enumerate(files):
            dst, cap = (test, max_test) if i % 8 == 7 else (train, max_train)
            if len(dst) < cap:
                dst += p.read_bytes()[: cap - len(dst)]
        if len(train) < 10_000 or len(test) < 2_000:
            raise RuntimeError(f"too little Python source under {root} for the character models")

        def t(b):
            x = torch.frombuffer(b, dtype=torch.uint8).long()
            return torch.where(x < 128, x, torch.zeros_like(x))

        _TEXT[key] = (t(train), t(test), [p.name for p in files])
    return _TEXT[key]


# ----------------------------------------------------------------------------- models


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


def _resnet():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),  # 16 x 16
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AvgPool2d(2),  # 8 x 8
        _Block(16),
        _Block(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def _dwsep():
    def sep(cin, cout, stride):
        return [
            nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin),
            nn.Conv2d(cin, cout, 1),
            nn.GroupNorm(1, cout),  # LayerNorm over (C, H, W)
            nn.GELU(),
        ]

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),  # 16 x 16
        nn.GELU(),
        *sep(16, 32, 2),  # 8 x 8
        *sep(32, 64, 2),  # 4 x 4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


class _CharLM(nn.Module):
    def __init__(self, cell, emb, hidden, layers):
        super().__init__()
        self.emb = nn.Embedding(128, emb)
        self.rnn = cell(emb, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, 128)

    def forward(self, x):
        return self.out(self.rnn(self.emb(x))[0])


class _Sorter(nn.Module):
    def __init__(self, length=10, d=32, heads=2, layers=2):
        super().__init__()
        self.emb = nn.Embedding(10, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, 10)

    def forward(self, x):
        return self.out(self.enc(self.emb(x) + self.pos))


class _ResMLP(nn.Module):
    def __init__(self, d_in=8, width=32, blocks=6):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = h + torch.tanh(b(h))
        return self.out(h).squeeze(-1)


def _ce(model, b):
    return F.cross_entropy(model(b[0]), b[1])


def _seq_ce(model, b):
    return F.cross_entropy(model(b[0]).flatten(0, 1), b[1].flatten())


# ----------------------------------------------------------------------------- the suite


def make(name: str, data_dir=None, synthetic: bool = False) -> Problem:
    """Suite model ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"unknown suite model {name!r}; one of {', '.join(NAMES)}")
    if name in ("resnet-cifar", "dwsep-cifar"):
        xtr, ytr, xte, yte = _cifar(data_dir, synthetic)
        batch, ev = _classification(xtr, ytr, xte, yte, 32, salt=1 if name == "resnet-cifar" else 8)
        build = _resnet if name == "resnet-cifar" else _dwsep
        desc = (
            "ResNet-style CNN: stride-2 conv 16 ch + BN + avg-pool, 2 residual blocks (BN), batch 32"
            if name == "resnet-cifar"
            else "depthwise-separable conv net 16-32-64 ch, GELU, GroupNorm(1) (LayerNorm), batch 32"
        )
        data = "CIFAR-10 train files (held out: first 1,000 of test_batch.bin)"
        return Problem(name, desc, "synthetic" if synthetic else data, build, batch, _ce, ev)
    if name == "mlp-deep":
        xtr, ytr, xte, yte = _mnist(data_dir, synthetic)
        batch, ev = _classification(xtr, ytr, xte, yte, 128, salt=5)

        def build():
            return nn.Sequential(
                nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10),
            )  # fmt: skip

        data = "MNIST train (held out: first 2,000 of t10k)"
        return Problem(name, "ReLU MLP 784-64-64-64-10, batch 128", "synthetic" if synthetic else data,
                       build, batch, _ce, ev)  # fmt: skip
    if name == "cnn-l2":
        xtr, ytr, xte, yte = _mnist(data_dir, synthetic)
        batch, ev0 = _classification(xtr, ytr, xte, yte, 64, salt=6)

        def build():
            return nn.Sequential(
                nn.Unflatten(1, (1, 28, 28)),
                nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.ReLU(),  # 14 x 14
                nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),  # 7 x 7
                nn.Flatten(), nn.Linear(16 * 49, 10),
            )  # fmt: skip

        def l2(model):
            return sum(p.pow(2).sum() for n, p in model.named_parameters() if n.endswith("weight"))

        def loss(model, b):
            return F.cross_entropy(model(b[0]), b[1]) + 1e-4 * l2(model)

        def ev(model):
            out = ev0(model)
            out["loss"] += 1e-4 * float(l2(model))  # the objective: data loss + penalty
            return out

        data = "MNIST train (held out: first 2,000 of t10k)"
        desc = "CNN conv5x5/2 8ch - conv3x3/2 16ch - linear, loss = CE + 1e-4 * sum w^2, batch 64"
        return Problem(name, desc, "synthetic" if synthetic else data, build, batch, loss, ev)
    if name in ("char-lstm", "char-gru"):
        train, test, files = stdlib_text()
        seq, bs = 64, 32
        salt = 2 if name == "char-lstm" else 3

        def batch(seed, step):
            i = torch.randint(0, train.numel() - seq - 1, (bs,), generator=_gen(seed, step, salt))
            w = train[i[:, None] + torch.arange(seq + 1)]
            return w[:, :-1], w[:, 1:]

        starts = torch.linspace(0, test.numel() - seq - 2, 128).long()
        held = test[starts[:, None] + torch.arange(seq + 1)]

        def ev(model):
            logits = model(held[:, :-1])
            y = held[:, 1:]
            return {
                "loss": float(F.cross_entropy(logits.flatten(0, 1), y.flatten())),
                "accuracy": float((logits.argmax(-1) == y).float().mean()),
            }

        if name == "char-lstm":
            build = lambda: _CharLM(nn.LSTM, 32, 64, 1)  # noqa: E731
            desc = "character LSTM LM: embedding 32, LSTM 64, seq 64, batch 32, 128-byte vocabulary"
        else:
            build = lambda: _CharLM(nn.GRU, 16, 64, 1)  # noqa: E731
            desc = "character GRU LM: embedding 16, GRU 64, seq 64, batch 32"
        data = (
            f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))} stdlib *.py "
            f"({len(files)} files; {train.numel():,} train / {test.numel():,} held-out bytes)"
        )
        return Problem(name, desc, data, build, batch, _seq_ce, ev)
    if name == "transformer-sort":
        length, bs = 10, 64

        def draw(g, n):
            x = torch.randint(0, 10, (n, length), generator=g)
            return x, x.sort(dim=1).values

        def batch(seed, step):
            return draw(_gen(seed, step, 4), bs)

        held = draw(_gen(987_654, 0, 4), 1000)

        def ev(model):
            logits = model(held[0])
            return {
                "loss": float(F.cross_entropy(logits.flatten(0, 1), held[1].flatten())),
                "accuracy": float((logits.argmax(-1) == held[1]).float().mean()),
            }

        desc = "2-layer transformer encoder (d=32, 2 heads, ff 64, no dropout): sort 10 digits, batch 64"
        return Problem(name, desc, "synthetic digit sequences", _Sorter, batch, _seq_ce, ev)
    # resmlp-regress: y = f(x), a fixed random smooth function of 8 inputs, + no noise
    g = _gen(424_242, 0, 7)
    w1, w2 = torch.randn(8, 16, generator=g), torch.randn(16, generator=g) / 4.0

    def target(x):
        return torch.sin(x @ w1 * 1.5) @ w2 + 0.5 * (x[:, 0] * x[:, 1])

    def batch(seed, step):
        x = torch.randn(128, 8, generator=_gen(seed, step, 7))
        return x, target(x)

    hx = torch.randn(2000, 8, generator=_gen(987_654, 0, 7))
    held = (hx, target(hx))

    def ev(model):
        return {"loss": float(F.mse_loss(model(held[0]), held[1])), "accuracy": None}

    desc = (
        "residual tanh MLP 8-32, 6 blocks h + tanh(W h), MSE on a fixed smooth function, batch 128"
    )
    return Problem(name, desc, "synthetic x ~ N(0, I_8)", _ResMLP, batch,
                   lambda m, b: F.mse_loss(m(b[0]), b[1]), ev)  # fmt: skip


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":  # sizes and a step's time
    import time

    torch.set_num_threads(1)
    for nm in NAMES:
        pr = make(nm, synthetic=needs_data(nm) is not None and False)
        m = pr.build(0)
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        t = time.perf_counter()
        for s in range(20):
            opt.zero_grad()
            pr.loss(m, pr.batch(0, s)).backward()
            opt.step()
        print(nm, n_params(m), f"{(time.perf_counter() - t) / 20 * 1000:.1f} ms", pr.evaluate(m))
