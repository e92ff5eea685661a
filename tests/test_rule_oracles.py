"""Every update rule against an oracle: a plain re-implementation, one coordinate at a time.

The existing oracle tests cover the classic rules (``tests/test_rules.py``, against
``torch.optim``), the L2L LSTM (``tests/test_lstm_fast.py``, against ``nn.LSTMCell``)
and GroupedRule (``tests/test_grouped.py``, against its sub-rules run alone).  This
table holds one oracle for *every* rule, RNNprop, the Meta-Learner LSTM and
GroupedRule included: Python floats, explicit loops over coordinates, the paper's
two-branch log/sign formula, ``math.tanh`` (the rules use 2 sigmoid(2z) - 1) and
``fnmatch`` routing, compared in float64 with the rule's ``init`` / ``step`` on random
inputs over several steps (so the state is checked through the later updates), with
and without autograd (the LSTM rules run different kernels in the two modes).

``test_every_registered_rule_has_an_oracle`` fails when a rule is added to
``CLASSIC_RULES`` / ``LEARNED_RULES`` without a row here.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from l2o.layout import ParamLayout
from l2o.rules import (
    BFGS,
    CLASSIC_RULES,
    LBFGS,
    LEARNED_RULES,
    LSTMGAC,
    NAG,
    NTMBFGS,
    NTMLBFGS,
    SGD,
    Adam,
    ClippedSGD,
    CoordinatewiseLSTM,
    GroupedRule,
    LSTMRuleConfig,
    MetaLearnerLSTM,
    RMSprop,
    RNNprop,
)
from l2o.rules.gac import LSTMGACConfig
from l2o.rules.ntm import NTMBFGSConfig, NTMLBFGSConfig
from l2o.rules.rnnprop import RNNpropConfig
from l2o.rules.transfer import BETAS as BETAS_MLP
from l2o.rules.transfer import AdamHD, MLPLOpt, MLPLOptConfig

F64 = torch.float64


# -- scalar building blocks --------------------------------------------------------------------
def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def log_sign(x: float, p: float) -> list[float]:
    """Andrychowicz et al. 2016, Appendix A, in its two-branch form."""
    if abs(x) >= math.exp(-p):
        return [math.log(abs(x)) / p, math.copysign(1.0, x)]
    return [-1.0, math.exp(p) * x]


def matvec(w: list[list[float]], x: list[float]) -> list[float]:
    return [sum(wr[k] * x[k] for k in range(len(x))) for wr in w]


def lstm_cell(x, h, c, w_ih, w_hh, bias):
    """One LSTM step of one coordinate, gates (i, f, g, o), one bias vector."""
    hidden = len(h)
    a, b = matvec(w_ih, x), matvec(w_hh, h)
    z = [bias[r] + a[r] + b[r] for r in range(4 * hidden)]
    new_h, new_c = [], []
    for j in range(hidden):
        i = sigmoid(z[j])
        f = sigmoid(z[hidden + j])
        g = math.tanh(z[2 * hidden + j])
        o = sigmoid(z[3 * hidden + j])
        cj = f * c[j] + i * g
        new_c.append(cj)
        new_h.append(o * math.tanh(cj))
    return new_h, new_c


def cells_of(module_cells) -> list[tuple]:
    return [(c.weight_ih.tolist(), c.weight_hh.tolist(), c.bias.tolist()) for c in module_cells]


# -- oracles: oracle(rule, n) has .step(theta, grad, loss) -> theta (lists of floats) -----------
class SGDOracle:
    def __init__(self, rule: SGD, n: int):
        self.lr = rule.lr

    def step(self, theta, grad, loss):
        return [t - self.lr * g for t, g in zip(theta, grad, strict=True)]


class NAGOracle:
    def __init__(self, rule: NAG, n: int):
        self.lr, self.mu, self.b = rule.lr, rule.momentum, [0.0] * n

    def step(self, theta, grad, loss):
        out = []
        for j, (t, g) in enumerate(zip(theta, grad, strict=True)):
            self.b[j] = self.mu * self.b[j] + g
            out.append(t - self.lr * (g + self.mu * self.b[j]))
        return out


class RMSpropOracle:
    def __init__(self, rule: RMSprop, n: int):
        self.rule, self.v = rule, [0.0] * n

    def step(self, theta, grad, loss):
        r, out = self.rule, []
        for j, (t, g) in enumerate(zip(theta, grad, strict=True)):
            self.v[j] = r.alpha * self.v[j] + (1 - r.alpha) * g * g
            out.append(t - r.lr * g / (math.sqrt(self.v[j]) + r.eps))
        return out


class AdamOracle:
    def __init__(self, rule: Adam, n: int):
        self.rule, self.m, self.v, self.t = rule, [0.0] * n, [0.0] * n, 0

    def step(self, theta, grad, loss):
        r, out = self.rule, []
        self.t += 1
        for j, (t, g) in enumerate(zip(theta, grad, strict=True)):
            self.m[j] = r.b1 * self.m[j] + (1 - r.b1) * g
            self.v[j] = r.b2 * self.v[j] + (1 - r.b2) * g * g
            m_hat = self.m[j] / (1 - r.b1**self.t)
            v_hat = self.v[j] / (1 - r.b2**self.t)
            out.append(t - r.lr * m_hat / (math.sqrt(v_hat) + r.eps))
        return out


class ClippedSGDOracle:
    """``clip_grad_norm_`` over all coordinates (one instance), then SGD."""

    def __init__(self, rule: ClippedSGD, n: int):
        self.rule = rule

    def step(self, theta, grad, loss):
        r = self.rule
        norm = math.sqrt(sum(g * g for g in grad))
        scale = min(1.0, r.max_norm / (norm + 1e-6))
        return [t - r.lr * g * scale for t, g in zip(theta, grad, strict=True)]


class LSTMOracle:
    def __init__(self, rule: CoordinatewiseLSTM, n: int):
        self.cfg = rule.config
        self.cells = cells_of(rule.cells)
        self.head_w = rule.head.weight.tolist()[0]
        self.head_b = rule.head.bias.tolist()[0]
        self.state = [
            [[[0.0] * (len(b) // 4), [0.0] * (len(b) // 4)] for _, _, b in self.cells]
            for _ in range(n)
        ]

    def features(self, g: float) -> list[float]:
        cfg = self.cfg
        if cfg.preprocessing == "logsign":
            return log_sign(g, cfg.p)
        if cfg.preprocessing == "scale":
            return [g * cfg.input_scale]
        return [g]

    def step(self, theta, grad, loss):
        out = []
        for j, (t, g) in enumerate(zip(theta, grad, strict=True)):
            x = self.features(g)
            for k, (w_ih, w_hh, b) in enumerate(self.cells):
                h, c = lstm_cell(x, *self.state[j][k], w_ih, w_hh, b)
                self.state[j][k] = [h, c]
                x = h
            y = self.head_b + sum(w * v for w, v in zip(self.head_w, x, strict=True))
            out.append(t + self.cfg.output_scale * y)
        return out


class RNNpropOracle:
    def __init__(self, rule: RNNprop, n: int):
        self.cfg = rule.config
        self.inp = None
        if rule.inp is not None:
            self.inp = (rule.inp.weight.tolist(), rule.inp.bias.tolist())
        self.cells = cells_of(rule.cells)
        self.head_w = rule.head.weight.tolist()[0]
        self.head_b = rule.head.bias.tolist()[0]
        self.t = 0
        self.m, self.v = [0.0] * n, [0.0] * n
        self.state = [
            [[[0.0] * (len(b) // 4), [0.0] * (len(b) // 4)] for _, _, b in self.cells]
            for _ in range(n)
        ]

    def step(self, theta, grad, loss):
        cfg, out = self.cfg, []
        self.t += 1
        for j, (t, g) in enumerate(zip(theta, grad, strict=True)):
            self.m[j] = cfg.beta1 * self.m[j] + (1 - cfg.beta1) * g
            self.v[j] = cfg.beta2 * self.v[j] + (1 - cfg.beta2) * g * g
            m_hat = self.m[j] / (1 - cfg.beta1**self.t)
            denom = math.sqrt(self.v[j] / (1 - cfg.beta2**self.t)) + cfg.eps
            x = [m_hat / denom, g / denom]
            if self.inp is not None:
                w, b = self.inp
                z = [b[r] + a for r, a in enumerate(matvec(w, x))]
                x = [v if v > 0 else math.expm1(v) for v in z]  # ELU(alpha = 1)
            for k, (w_ih, w_hh, bias) in enumerate(self.cells):
                h, c = lstm_cell(x, *self.state[j][k], w_ih, w_hh, bias)
                self.state[j][k] = [h, c]
                x = h
            y = self.head_b + sum(w * v for w, v in zip(self.head_w, x, strict=True))
            out.append(t + cfg.output_scale * math.tanh(y))
        return out


class MetaLearnerOracle:
    """Ravi & Larochelle's update, as the official code computes it (see the rule's docstring)."""

    def __init__(self, rule: MetaLearnerLSTM, n: int):
        self.p = rule.config.p
        self.hidden = hd = rule.config.hidden
        self.cell = (rule.weight_ih.tolist(), rule.weight_hh.tolist(), rule.bias.tolist())
        self.w_f, self.w_i = rule.w_f.tolist(), rule.w_i.tolist()
        self.b_f, self.b_i = rule.b_f.tolist(), rule.b_i.tolist()
        self.h = [[0.0] * hd for _ in range(n)]
        self.c = [[0.0] * hd for _ in range(n)]
        self.a_f, self.a_i = [0.0] * n, [0.0] * n

    def step(self, theta, grad, loss):
        hd, out = self.hidden, []
        for j, (t, g) in enumerate(zip(theta, grad, strict=True)):
            x = log_sign(loss, self.p) + log_sign(g, self.p)  # [loss log, loss sign, g log, g sign]
            h, c = lstm_cell(x, self.h[j], self.c[j], *self.cell)
            self.h[j], self.c[j] = h, c
            wf, wi = self.w_f, self.w_i
            a_f = sum(wf[k] * h[k] for k in range(hd)) + wf[hd] * t + wf[hd + 1] * self.a_f[j]
            a_i = sum(wi[k] * h[k] for k in range(hd)) + wi[hd] * t + wi[hd + 1] * self.a_i[j]
            self.a_f[j], self.a_i[j] = a_f + self.b_f, a_i + self.b_i
            out.append(sigmoid(self.a_f[j]) * t - sigmoid(self.a_i[j]) * g)
        return out


class GACControllerOracle:
    """LSTM+GAC layers over all coordinates: each layer per coordinate, then GAC columns averaged."""

    def __init__(self, module_cells, gac, n: int):
        self.cells = cells_of(module_cells)
        self.gac = list(gac)
        self.state = [
            [[[0.0] * (len(b) // 4), [0.0] * (len(b) // 4)] for _, _, b in self.cells]
            for _ in range(n)
        ]

    def run(self, xs: list[list[float]]) -> list[list[float]]:
        n = len(xs)
        for k, (w_ih, w_hh, b) in enumerate(self.cells):
            hs = []
            for j in range(n):
                h, c = lstm_cell(xs[j], *self.state[j][k], w_ih, w_hh, b)
                self.state[j][k][1] = c
                hs.append(h)
            hidden, g = len(b) // 4, self.gac[k]
            for col in range(hidden - g, hidden):  # the averaging cells
                mean = sum(hs[j][col] for j in range(n)) / n
                for j in range(n):
                    hs[j][col] = mean
            for j in range(n):
                self.state[j][k][0] = hs[j]
            xs = hs
        return xs


class LSTMGACOracle(LSTMOracle):
    def __init__(self, rule: LSTMGAC, n: int):
        super().__init__(rule, n)
        self.controller = GACControllerOracle(rule.cells, rule.gac, n)

    def step(self, theta, grad, loss):
        hs = self.controller.run([self.features(g) for g in grad])
        out = []
        for t, h in zip(theta, hs, strict=True):
            y = self.head_b + sum(w * v for w, v in zip(self.head_w, h, strict=True))
            out.append(t + self.cfg.output_scale * y)
        return out


class NTMOracle:
    """The NTM step with M as a Python n x n list (ntm-bfgs) or a list of write pairs (ntm-lbfgs)."""

    def __init__(self, rule, n: int):
        self.cfg = cfg = rule.config
        self.window = getattr(cfg, "window", None)
        self.controller = GACControllerOracle(rule.cells, rule.gac, n)
        self.head_w, self.head_b = rule.head.weight.tolist(), rule.head.bias.tolist()
        self.read = [[0.0] * cfg.read_heads for _ in range(n)]
        self.M = [[cfg.memory_init * (i == j) for j in range(n)] for i in range(n)]
        self.pairs: list[tuple[list[float], list[float]]] = []

    def step(self, theta, grad, loss):
        cfg, n = self.cfg, len(theta)
        R, W = cfg.read_heads, cfg.write_heads
        xs = []
        for j, g in enumerate(grad):
            f = log_sign(g, cfg.p) if cfg.preprocessing == "logsign" else [g * cfg.input_scale]
            xs.append(f + self.read[j])
        hs = self.controller.run(xs)
        outs = [[b + a for a, b in zip(matvec(self.head_w, h), self.head_b)] for h in hs]
        r = [[o[1 + k] for o in outs] for k in range(R)]
        a = [[o[1 + R + w] for o in outs] for w in range(W)]
        b = [[o[1 + R + W + w] for o in outs] for w in range(W)]
        if self.window is None:
            for w in range(W):
                for i in range(n):
                    for j in range(n):
                        self.M[i][j] += a[w][i] * b[w][j] / n
            reads = [matvec(self.M, r[k]) for k in range(R)]
        else:
            self.pairs = (self.pairs + list(zip(a, b)))[-self.window :]
            reads = []
            for k in range(R):
                rho = [cfg.memory_init * v for v in r[k]]
                for av, bv in self.pairs:
                    dot = sum(x * y for x, y in zip(bv, r[k])) / n
                    rho = [x + ai * dot for x, ai in zip(rho, av)]
                reads.append(rho)
        self.read = [[reads[k][j] for k in range(R)] for j in range(n)]
        return [
            t + cfg.output_scale * (outs[j][0] + sum(reads[k][j] for k in range(R)))
            for j, t in enumerate(theta)
        ]


class QuasiNewtonOracle:
    """BFGS / L-BFGS with the line search spread over steps (l2o.rules.bfgs), one instance."""

    def __init__(self, rule, n: int):
        self.rule, self.n, self.lbfgs = rule, n, isinstance(rule, LBFGS)
        self.x = self.g = self.d = None
        self.f = self.alpha = 0.0
        self.H = [[float(i == j) for j in range(n)] for i in range(n)]
        self.pairs: list[tuple[list[float], list[float]]] = []
        self.gamma = 1.0

    @staticmethod
    def dot(u, v):
        return sum(a * b for a, b in zip(u, v, strict=True))

    def direction(self, g):  # H g
        if not self.lbfgs:
            return matvec(self.H, g)
        q, alphas = list(g), []
        for s, y in reversed(self.pairs):
            a = self.dot(s, q) / self.dot(s, y)
            alphas.append(a)
            q = [qi - a * yi for qi, yi in zip(q, y)]
        r = [self.gamma * v for v in q]
        for (s, y), a in zip(self.pairs, reversed(alphas)):
            b = self.dot(y, r) / self.dot(s, y)
            r = [ri + si * (a - b) for ri, si in zip(r, s)]
        return r

    def step(self, theta, grad, loss):
        r = self.rule
        if self.x is None:
            accept, started = True, False
        else:
            started = True
            armijo = loss <= self.f + r.c1 * self.alpha * self.dot(self.g, self.d)
            accept = armijo or not r.line_search
        if accept:
            if started:
                s = [a - b for a, b in zip(theta, self.x)]
                y = [a - b for a, b in zip(grad, self.g)]
                sy = self.dot(s, y)
                if sy > 1e-10 * math.sqrt(self.dot(s, s) * self.dot(y, y)):
                    if self.lbfgs:
                        self.pairs = (self.pairs + [(s, y)])[-r.memory :]
                        self.gamma = sy / self.dot(y, y)
                    else:
                        if not self.pairs:  # first pair: H0 = (s.y / y.y) I
                            self.H = [[v * sy / self.dot(y, y) for v in row] for row in self.H]
                        self.pairs.append((s, y))
                        rho, n = 1.0 / sy, self.n
                        Hy = matvec(self.H, y)
                        yHy = self.dot(y, Hy)
                        self.H = [
                            [
                                self.H[i][j]
                                - rho * (s[i] * Hy[j] + Hy[i] * s[j])
                                + (rho * rho * yHy + rho) * s[i] * s[j]
                                for j in range(n)
                            ]
                            for i in range(n)
                        ]
            self.x, self.g, self.f = list(theta), list(grad), loss
            d = [-v for v in self.direction(self.g)]
            self.d = d if self.dot(self.g, d) < 0 else [-v for v in self.g]
            self.alpha = 1.0 if (started and r.line_search) else r.lr
        else:
            self.alpha *= r.backtrack
        return [x + self.alpha * d for x, d in zip(self.x, self.d)]


def tensor_instance_blocks(n: int, layout: ParamLayout | None) -> list[list[int]]:
    """The coordinates of each block that shares a tensor *and* an instance."""
    layout = layout if layout is not None else ParamLayout(("theta",), ((n,),))
    blocks, start = [], 0
    for size in layout.sizes:
        chunk = size // layout.instances
        for p in range(layout.instances):
            blocks.append(list(range(start + p * chunk, start + (p + 1) * chunk)))
        start += size
    return blocks


class HypergradientStepSizes:
    """Per block: s += rate * cos(g, previous update), clipped to +-bound (mlp-lopt's hd)."""

    def __init__(self, n: int, blocks, rate: float, bound: float):
        self.blocks, self.rate, self.bound = blocks, rate, bound
        self.u = [0.0] * n
        self.s = [0.0] * len(blocks)

    def log_steps(self, grad) -> list[float]:
        out = [0.0] * len(self.u)
        for b, block in enumerate(self.blocks):
            dot = sum(grad[j] * self.u[j] for j in block)
            norm = math.sqrt(sum(grad[j] ** 2 for j in block) * sum(self.u[j] ** 2 for j in block))
            cos = dot / norm if norm > 0 else 0.0
            self.s[b] = min(self.bound, max(-self.bound, self.s[b] + self.rate * cos))
            for j in block:
                out[j] = self.s[b]
        return out


class AdamHDOracle:
    """adam-hd: Adam (torch's bias correction) times exp(s) per block."""

    def __init__(self, rule, n: int, layout: ParamLayout | None = None):
        self.r, self.t = rule, 0
        self.m, self.v = [0.0] * n, [0.0] * n
        blocks = tensor_instance_blocks(n, layout)
        self.hd = HypergradientStepSizes(n, blocks, rule.hd, rule.hd_bound)

    def step(self, theta, grad, loss):
        self.t += 1
        t, out = self.t, []
        s = self.hd.log_steps(grad)
        for j, g in enumerate(grad):
            self.m[j] = 0.9 * self.m[j] + 0.1 * g
            self.v[j] = 0.999 * self.v[j] + 0.001 * g * g
            adam = (
                self.m[j]
                / (1 - 0.9**t)
                / (math.sqrt(self.v[j]) / math.sqrt(1 - 0.999**t) + self.r.eps)
            )
            step = self.r.lr * math.exp(s[j]) * adam
            self.hd.u[j] = step
            out.append(theta[j] - step)
        return out


class MLPLOptOracle:
    """mlp-lopt: Adam moments at three timescales, per-(tensor, instance) RMS, a ReLU MLP."""

    def __init__(self, rule, n: int, layout: ParamLayout | None = None):
        self.r, self.n, self.t = rule, n, 0
        self.v = [0.0] * n
        self.m = [[0.0] * n for _ in BETAS_MLP]
        self.blocks = tensor_instance_blocks(n, layout)
        self.layers = [(lin.weight.tolist(), lin.bias.tolist()) for lin in rule.hidden]
        self.head = (rule.head.weight.tolist(), rule.head.bias.tolist())
        self.log_lr = float(rule.log_lr.detach())
        c = rule.config
        rate = math.exp(float(rule.log_hd.detach())) if c.hd > 0 else 0.0
        self.hd = HypergradientStepSizes(n, self.blocks, rate, c.hd_bound) if c.hd > 0 else None

    def step(self, theta, grad, loss):
        c, b2 = self.r.config, 0.999
        self.t += 1
        t = self.t
        rms = [0.0] * self.n
        for block in self.blocks:
            value = math.sqrt(sum(theta[j] ** 2 for j in block) / len(block))
            for j in block:
                rms[j] = value
        out = []
        s = self.hd.log_steps(grad) if self.hd is not None else [0.0] * self.n
        for j in range(self.n):
            g = grad[j]
            self.v[j] = b2 * self.v[j] + (1 - b2) * g * g
            d = math.sqrt(self.v[j]) / math.sqrt(1 - b2**t) + c.eps
            x = []
            for i, b in enumerate(BETAS_MLP):
                self.m[i][j] = b * self.m[i][j] + (1 - b) * g
                x.append(self.m[i][j] / (1 - b**t) / d)
            adam = x[1]
            x += [g / d, theta[j] / (rms[j] + 1e-12)]
            x += [math.tanh(t / tau) for tau in (10.0, 100.0, 1000.0)]
            h = [min(10.0, max(-10.0, v)) for v in x]
            for w, bias in self.layers:
                h = [max(0.0, bk + a) for bk, a in zip(bias, matvec(w, h))]
            r, a = (bk + z for bk, z in zip(self.head[1], matvec(self.head[0], h)))
            scale = math.exp(self.log_lr + s[j] + c.mag * math.tanh(a))
            step = scale * (adam + c.residual * math.tanh(r))
            if self.hd is not None:
                self.hd.u[j] = step
            out.append(theta[j] - step)
        return out


ORACLE_OF: dict[type, type] = {
    SGD: SGDOracle,
    NAG: NAGOracle,
    RMSprop: RMSpropOracle,
    Adam: AdamOracle,
    ClippedSGD: ClippedSGDOracle,
    CoordinatewiseLSTM: LSTMOracle,
    RNNprop: RNNpropOracle,
    MetaLearnerLSTM: MetaLearnerOracle,
    LSTMGAC: LSTMGACOracle,
    NTMBFGS: NTMOracle,
    NTMLBFGS: NTMOracle,
    BFGS: QuasiNewtonOracle,
    LBFGS: QuasiNewtonOracle,
    MLPLOpt: MLPLOptOracle,
    AdamHD: AdamHDOracle,
}


def oracle_for(rule, n: int):
    return ORACLE_OF[type(rule)](rule, n)


class GroupedOracle:
    """First matching pattern (fnmatch) labels each tensor; each label's oracle gets its coordinates."""

    def __init__(self, rule: GroupedRule, layout: ParamLayout, patterns, subrules):
        self.groups: dict[int, list[int]] = {}
        start = 0
        for name, size in zip(layout.names, layout.sizes, strict=True):
            which = next(i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(name, p))
            self.groups.setdefault(which, []).extend(range(start, start + size))
            start += size
        self.oracles = {i: oracle_for(subrules[i], len(ix)) for i, ix in self.groups.items()}

    def step(self, theta, grad, loss):
        out = list(theta)
        for i, ix in self.groups.items():
            new = self.oracles[i].step([theta[j] for j in ix], [grad[j] for j in ix], loss)
            for j, v in zip(ix, new, strict=True):
                out[j] = v
        return out


# -- the table --------------------------------------------------------------------------------
GROUP_LAYOUT = ParamLayout(
    ("conv.weight", "conv.bias", "fc.weight", "fc.bias", "scale"),
    ((2, 3), (2,), (3, 2), (3,), ()),
)
GROUP_PATTERNS = ("conv.*", "*.bias", "fc.weight", "*")
# three problem instances batched: instance p owns row p of w and b[p]
INSTANCE_LAYOUT = ParamLayout(("w", "b"), ((3, 4), (3,)), instances=3)


def grouped_subrules():
    return [
        ClippedSGD(lr=0.3, max_norm=0.5),  # couples its own group's coordinates only
        Adam(lr=0.05),
        MetaLearnerLSTM(num_params=6, hidden=4),  # reads the loss through the grouped rule
        CoordinatewiseLSTM(LSTMRuleConfig(layers=(3,), p=5.0, output_scale=0.1)),
    ]


@dataclass
class Case:
    id: str
    make: Any  # () -> rule
    layout: ParamLayout | None = None  # only GroupedRule needs one (it routes tensors by name)


CASES = [
    Case("sgd", lambda: SGD(lr=0.1)),
    Case("nag", lambda: NAG(lr=0.05, momentum=0.8)),
    Case("rmsprop", lambda: RMSprop(lr=0.01, alpha=0.9)),
    Case("adam", lambda: Adam(lr=0.02, b1=0.8, b2=0.99)),
    Case("clipped-sgd-clips", lambda: ClippedSGD(lr=0.1, max_norm=0.5)),
    Case("clipped-sgd-no-clip", lambda: ClippedSGD(lr=0.1, max_norm=1e6)),
    Case("lstm-paper", lambda: CoordinatewiseLSTM(LSTMRuleConfig.from_preset("paper"))),
    Case("lstm-code", lambda: CoordinatewiseLSTM(LSTMRuleConfig.from_preset("code"))),
    Case(
        "lstm-scale-3-layers",
        lambda: CoordinatewiseLSTM(
            LSTMRuleConfig(layers=(5, 4, 3), preprocessing="scale", input_scale=0.5)
        ),
    ),
    Case(
        "lstm-linear-head",
        lambda: CoordinatewiseLSTM(
            LSTMRuleConfig(layers=(), preprocessing="none", output_scale=1.0)
        ),
    ),
    Case("rnnprop", lambda: RNNprop()),
    Case(
        "rnnprop-no-input-layer",
        lambda: RNNprop(RNNpropConfig(layers=(6,), input_layer=0, beta1=0.9, beta2=0.99)),
    ),
    Case("meta-lstm", lambda: MetaLearnerLSTM(num_params=23)),
    Case("meta-lstm-hidden-3", lambda: MetaLearnerLSTM(num_params=1, hidden=3, p=5.0)),
    Case("lstm-gac", lambda: LSTMGAC(LSTMGACConfig(layers=(5, 4), gac=(2, 1)))),
    Case(
        "lstm-gac-scale", lambda: LSTMGAC(LSTMGACConfig(layers=(3,), gac=3, preprocessing="scale"))
    ),
    Case("ntm-bfgs", lambda: NTMBFGS(NTMBFGSConfig(layers=(4, 3), gac=1, output_scale=0.01))),
    Case(
        "ntm-lbfgs",
        lambda: NTMLBFGS(
            NTMLBFGSConfig(layers=(4,), read_heads=2, write_heads=2, window=3, memory_init=0.5)
        ),
    ),
    Case("bfgs", lambda: BFGS(lr=0.3)),
    Case("bfgs-fixed-step", lambda: BFGS(lr=0.05, line_search=False)),
    Case("l-bfgs", lambda: LBFGS(lr=0.3, memory=2)),
    Case("mlp-lopt", lambda: MLPLOpt(MLPLOptConfig(layers=(5, 4), mag=2.0, residual=0.3))),
    Case("mlp-lopt-per-tensor", lambda: MLPLOpt(layers=(3,)), GROUP_LAYOUT),
    Case("mlp-lopt-per-instance", lambda: MLPLOpt(layers=(3,)), INSTANCE_LAYOUT),
    # hypergradient step sizes; rate 2 against bound 0.5: the clip is reached within 4 steps
    Case("mlp-lopt-hd", lambda: MLPLOpt(layers=(3,), hd=2.0, hd_bound=0.5), INSTANCE_LAYOUT),
    Case("adam-hd", lambda: AdamHD(lr=0.05, hd=2.0, hd_bound=0.5), GROUP_LAYOUT),
    Case(
        "grouped",
        lambda: GroupedRule(list(zip(GROUP_PATTERNS, grouped_subrules(), strict=True))),
        GROUP_LAYOUT,
    ),
]


def randomize(rule, seed: int) -> None:
    """Learned rules: every weight N(0, 0.5^2), so no gate saturates and every weight matters."""
    if isinstance(rule, nn.Module):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in rule.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def random_grad(n: int, g: torch.Generator) -> torch.Tensor:
    """Gradients over many decades, with exact zeros: both branches of log/sign."""
    grad = torch.randn(n, generator=g, dtype=F64) * 10.0 ** torch.randint(-7, 2, (n,), generator=g)
    grad[torch.randperm(n, generator=g)[:2]] = 0.0
    return grad


def build(case: Case):
    rule = case.make()
    if isinstance(rule, nn.Module):
        rule.double()
    randomize(rule, seed=3)
    if isinstance(rule, GroupedRule):
        oracle = GroupedOracle(rule, case.layout, GROUP_PATTERNS, rule.rules)
    elif isinstance(rule, (MLPLOpt, AdamHD)):
        n = case.layout.numel if case.layout is not None else 23
        oracle = ORACLE_OF[type(rule)](rule, n, case.layout)
    else:
        oracle = oracle_for(rule, 23)
    return rule, oracle


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "autograd"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule_matches_its_oracle(case, grad_mode):
    rule, oracle = build(case)
    n = case.layout.numel if case.layout is not None else 23
    extra = () if case.layout is None else (case.layout,)
    g = torch.Generator().manual_seed(7)
    theta = torch.randn(n, generator=g, dtype=F64)
    expected = theta.tolist()
    with torch.set_grad_enabled(grad_mode):
        state = rule.init(theta, *extra)
        for step in range(4):
            grad = random_grad(n, g)
            loss = torch.tensor(0.05 + 3.0 * float(torch.rand((), generator=g)), dtype=F64)
            theta, state = rule.step(theta, grad, loss, state, *extra)
            expected = oracle.step(expected, grad.tolist(), float(loss))
            assert theta.dtype == F64 and theta.shape == (n,)
            torch.testing.assert_close(
                theta.detach(),
                torch.tensor(expected, dtype=F64),
                rtol=1e-10,
                atol=1e-12,
                msg=lambda m, step=step: f"step {step + 1}: {m}",
            )


def test_every_registered_rule_has_an_oracle():
    covered = {type(c.make()) for c in CASES}
    registered = set(CLASSIC_RULES.values())
    registered |= {type(f(_minimal_config(name))) for name, f in LEARNED_RULES.items()}
    assert registered <= covered, f"rules without an oracle: {registered - covered}"
    assert set(ORACLE_OF) | {GroupedRule} == covered


def _minimal_config(name: str) -> dict:
    if name == "meta-lstm":
        return {"num_params": 1}
    if name == "grouped":
        return {"rules": {"a": {"rule": "sgd", "config": {"lr": 0.1}}}, "labels": [["*", "a"]]}
    return {}


def test_clipped_sgd_clips_each_instance_by_its_own_norm():
    """With a layout of P instances, each instance's gradient is clipped by its own norm."""
    rule = ClippedSGD(lr=0.5, max_norm=1.0)
    layout = ParamLayout(("w", "b"), ((3, 4), (3,)), instances=3)
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(layout.numel, generator=g, dtype=F64)
    grad = torch.randn(layout.numel, generator=g, dtype=F64)
    grad[:4] *= 0.01  # instance 0's weight row: a small norm, not clipped
    new, _ = rule.step(theta, grad, None, rule.init(theta, layout), layout)
    # instance p owns row p of w (coordinates 4p..4p+3) and b[p] (coordinate 12 + p)
    expected = theta.tolist()
    for p in range(3):
        ix = [4 * p + k for k in range(4)] + [12 + p]
        norm = math.sqrt(sum(float(grad[j]) ** 2 for j in ix))
        scale = min(1.0, 1.0 / (norm + 1e-6))
        for j in ix:
            expected[j] = float(theta[j]) - 0.5 * float(grad[j]) * scale
    torch.testing.assert_close(new, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-14)
