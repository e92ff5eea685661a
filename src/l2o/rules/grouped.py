"""Different update rules for different parameter tensors, chosen by name pattern.

    rule = GroupedRule([
        ("*conv*.weight", CoordinatewiseLSTM()),   # conv kernels: one LSTM
        ("*.bias",        Adam(lr=0.01)),          # biases: a fixed Adam
        ("*",             CoordinatewiseLSTM()),   # everything else: another LSTM
    ])

This is the mechanism of the paper's CIFAR experiment (one LSTM for the
convolutional layers, one for the fully connected ones).  A :class:`GroupedRule`
is itself an update rule, so the unroll engine, the meta-trainer, ``compare`` and
:class:`l2o.optim.LearnedOptimizer` use it like any other.

Routing.  Patterns are :func:`fnmatch.fnmatchcase` patterns on the parameter
names of the problem's :class:`~l2o.tasks.base.ParamLayout` (``named_parameters``
names for a :class:`~l2o.tasks.ModuleTask`).  Each tensor goes to the *first*
pattern that matches it, so every tensor is driven by exactly one sub-rule; a
tensor no pattern matches is an :class:`~l2o.errors.L2OError` naming the tensor
and the patterns (end the list with ``"*"`` to catch the rest).  A pattern that
matches no tensor of a layout is only a warning: a rule trained on a network with
convolutions may legitimately be applied to one without.

Binding.  The flat vector carries no names, so the rule must see the layout
before it runs: :meth:`GroupedRule.bind` (called by :func:`l2o.meta.unroll.start`)
turns the layout into index sets, one per group.  Plans are kept per number of
coordinates, so one rule can drive problems of different sizes; binding a second,
different layout with the same number of coordinates replaces the first.

Per group, the coordinates are gathered as contiguous slices when the group's
tensors are adjacent in the layout, else with one ``index_select``; the new
parameters are put back with one ``cat`` (and one ``index_select`` by the inverse
permutation when groups interleave).  No Python loop runs over tensors or
coordinates inside ``step``, only over the few groups.  The state of group ``i``
is the sub-rule's state with keys prefixed ``"g{i}."`` (``"g0.h0"``), and learned
sub-rules are registered as ``groups.g{i}`` so their weights are meta-parameters
saved in artifacts and checkpoints.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from ..errors import L2OError
from .base import State
from .classic import CLASSIC_RULES


@dataclass
class _Plan:
    """Where each group's coordinates sit in the flat vector of one layout."""

    sizes: list[int]  # coordinates per group, group order
    index: list[Tensor | None]  # per group: LongTensor of flat positions, None if contiguous
    starts: list[int]  # per group: first flat position (valid when contiguous)
    inverse: Tensor | None  # undoes the group-order concatenation; None if already in order
    cache: dict  # device -> (index list, inverse) on that device


def _describe_sub(rule) -> dict:
    if hasattr(rule, "describe"):
        return rule.describe()
    if getattr(rule, "name", None) in CLASSIC_RULES and hasattr(rule, "hparams"):
        return {"rule": rule.name, "config": dict(rule.hparams)}
    raise ValueError(
        f"GroupedRule: cannot describe sub-rule {rule!r} (no describe() and not a classic rule)"
    )


class GroupedRule(nn.Module):
    """An update rule that routes each parameter tensor to a sub-rule by name pattern.

    Args:
        groups: ordered ``(pattern, rule)`` pairs; the first matching pattern wins.
            A rule may be learned (an ``nn.Module``, registered as a submodule) or
            classic (:class:`~l2o.rules.Adam` with a fixed ``lr``, ...).

    See the module docstring for routing, binding and the state layout.
    """

    name = "grouped"

    def __init__(self, groups: Sequence[tuple[str, object]]):
        super().__init__()
        groups = list(groups)
        if not groups:
            raise ValueError("GroupedRule needs at least one (pattern, rule) pair")
        self.patterns: list[str] = []
        self._subrules: list = []
        self.groups = nn.ModuleDict()
        for i, item in enumerate(groups):
            if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(
                    f"GroupedRule group {i}: expected a (pattern, rule) pair, got {item!r}"
                )
            pattern, rule = item
            if isinstance(rule, GroupedRule):
                raise ValueError(
                    f"GroupedRule group {i} ({pattern!r}): nested GroupedRules are not supported"
                )
            if not (hasattr(rule, "init") and hasattr(rule, "step")):
                raise ValueError(
                    f"GroupedRule group {i} ({pattern!r}): {rule!r} is not an update rule"
                )
            _describe_sub(rule)  # fail now, not when saving
            self.patterns.append(pattern)
            self._subrules.append(rule)
            if isinstance(rule, nn.Module):
                self.groups[f"g{i}"] = rule
        self._plans: dict[int, _Plan] = {}

    @property
    def rules(self) -> list:
        """The sub-rules, in group order."""
        return list(self._subrules)

    @property
    def needs_loss(self) -> bool:
        return any(getattr(r, "needs_loss", False) for r in self._subrules)

    # -- routing -------------------------------------------------------------------
    def route(self, names: Sequence[str], *, warn_unused: bool = True) -> list[int]:
        """Group index of every tensor name (first matching pattern wins).

        Raises :class:`L2OError` for a name no pattern matches; warns about
        patterns that match none of ``names``.
        """
        out = []
        for name in names:
            for i, pattern in enumerate(self.patterns):
                if fnmatchcase(name, pattern):
                    out.append(i)
                    break
            else:
                raise L2OError(
                    f"GroupedRule: parameter {name!r} matches none of the patterns {self.patterns}; "
                    "add a pattern for it (a final '*' catches every remaining tensor)"
                )
        if warn_unused:
            unused = [p for i, p in enumerate(self.patterns) if i not in set(out)]
            if unused:
                warnings.warn(
                    f"GroupedRule: patterns {unused} match no parameter", UserWarning, stacklevel=3
                )
        return out

    def bind(self, layout) -> GroupedRule:
        """Compute the index sets of ``layout`` (a :class:`ParamLayout`); returns ``self``."""
        route = self.route(layout.names)
        starts_t, pos = [], 0
        for size in layout.sizes:
            starts_t.append(pos)
            pos += size
        n = len(self.patterns)
        ranges: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        for g, s, size in zip(route, starts_t, layout.sizes, strict=True):
            if size:
                ranges[g].append((s, s + size))
        sizes, index, starts, order = [], [], [], []
        for rs in ranges:
            sizes.append(sum(b - a for a, b in rs))
            contiguous = all(rs[k][1] == rs[k + 1][0] for k in range(len(rs) - 1))
            starts.append(rs[0][0] if rs else 0)
            if contiguous:
                index.append(None)
            else:
                index.append(torch.cat([torch.arange(a, b) for a, b in rs]))
            order.extend(rs)
        in_order = all(order[k][1] == order[k + 1][0] for k in range(len(order) - 1)) and (
            not order or order[0][0] == 0
        )
        inverse = None
        if not in_order:
            perm = torch.cat([torch.arange(a, b) for a, b in order])
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel())
        self._plans[layout.numel] = _Plan(sizes, index, starts, inverse, {})
        return self

    def _plan(self, theta: Tensor) -> tuple[_Plan, list[Tensor | None], Tensor | None]:
        n = theta.numel()
        plan = self._plans.get(n)
        if plan is None:
            raise L2OError(
                f"GroupedRule has no layout with {n} coordinates: call rule.bind(layout) first "
                "(l2o.meta.unroll.start does this for a problem; LearnedOptimizer routes by parameter name)"
            )
        dev = theta.device
        if dev not in plan.cache:
            plan.cache[dev] = (
                [None if ix is None else ix.to(dev) for ix in plan.index],
                None if plan.inverse is None else plan.inverse.to(dev),
            )
        index, inverse = plan.cache[dev]
        return plan, index, inverse

    def _parts(self, x: Tensor, plan: _Plan, index: list[Tensor | None]) -> list[Tensor]:
        parts = []
        for size, start, ix in zip(plan.sizes, plan.starts, index, strict=True):
            parts.append(x.narrow(0, start, size) if ix is None else x.index_select(0, ix))
        return parts

    # -- update-rule interface ---------------------------------------------------------
    def init(self, theta: Tensor) -> State:
        plan, index, _ = self._plan(theta)
        state: State = {}
        for i, (rule, part) in enumerate(
            zip(self._subrules, self._parts(theta, plan, index), strict=True)
        ):
            for k, v in rule.init(part).items():
                state[f"g{i}.{k}"] = v
        return state

    def step(
        self, theta: Tensor, grad: Tensor, loss: Tensor | None, state: State
    ) -> tuple[Tensor, State]:
        plan, index, inverse = self._plan(theta)
        thetas, grads = self._parts(theta, plan, index), self._parts(grad, plan, index)
        new_parts, new_state = [], {}
        for i, rule in enumerate(self._subrules):
            prefix = f"g{i}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            new, sub = rule.step(thetas[i], grads[i], loss, sub)
            new_parts.append(new)
            new_state.update({prefix + k: v for k, v in sub.items()})
        new_theta = torch.cat(new_parts)
        if inverse is not None:
            new_theta = new_theta.index_select(0, inverse)
        return new_theta, new_state

    def describe(self) -> dict:
        return {
            "rule": self.name,
            "config": {
                "groups": [
                    {"pattern": p, **_describe_sub(r)}
                    for p, r in zip(self.patterns, self._subrules, strict=True)
                ]
            },
        }

    @classmethod
    def from_config(cls, config: dict) -> GroupedRule:
        """Rebuild from ``{"groups": [{"pattern": ..., "rule": name, "config": {...}}, ...]}``."""
        from . import build_learned_rule  # the registry imports this module

        unknown = set(config) - {"groups"}
        if unknown:
            raise ValueError(
                f"unknown grouped rule config keys {sorted(unknown)}; expected ['groups']"
            )
        groups = config.get("groups")
        if not isinstance(groups, list) or not groups:
            raise ValueError("grouped rule config needs a non-empty 'groups' list")
        pairs = []
        for i, g in enumerate(groups):
            if not isinstance(g, dict) or "pattern" not in g or "rule" not in g:
                raise ValueError(
                    f"grouped rule group {i}: expected {{'pattern', 'rule', 'config'}}, got {g!r}"
                )
            extra = set(g) - {"pattern", "rule", "config"}
            if extra:
                raise ValueError(f"grouped rule group {i}: unknown keys {sorted(extra)}")
            name, sub_cfg = g["rule"], dict(g.get("config") or {})
            if name == cls.name:
                raise ValueError(f"grouped rule group {i}: nested grouped rules are not supported")
            rule = (
                CLASSIC_RULES[name](**sub_cfg)
                if name in CLASSIC_RULES
                else build_learned_rule(name, sub_cfg)
            )
            pairs.append((g["pattern"], rule))
        return cls(pairs)

    def extra_repr(self) -> str:
        return ", ".join(
            f"{p!r}: {getattr(r, 'name', type(r).__name__)}"
            for p, r in zip(self.patterns, self._subrules, strict=True)
        )


def from_groups_json(
    groups: str, defaults: dict | None = None, default_rule: str = "lstm"
) -> GroupedRule:
    """Build a :class:`GroupedRule` from the meta-training config key ``rule.groups``.

    ``groups`` is a JSON list such as
    ``[{"pattern": "*conv*", "rule": "lstm"}, {"pattern": "*", "rule": "adam", "config": {"lr": 0.01}}]``.
    A group of rule ``default_rule`` (the config's ``rule.name``) without its own
    ``"config"`` takes ``defaults``: the ``[rule]`` section's keys (layers,
    preprocessing, ...), so every such group is an independent rule with the
    configured hyperparameters.
    """
    import json

    try:
        parsed = json.loads(groups)
    except json.JSONDecodeError as e:
        raise L2OError(
            f"config key rule.groups: invalid JSON ({e}); expected a list of "
            '{"pattern": ..., "rule": ..., "config": {...}} objects'
        ) from None
    if not isinstance(parsed, list) or not parsed:
        raise L2OError("config key rule.groups: expected a non-empty JSON list of groups")
    entries = []
    for g in parsed:
        if isinstance(g, dict) and g.get("rule") == default_rule and "config" not in g:
            g = {**g, "config": dict(defaults or {})}
        entries.append(g)
    try:
        return GroupedRule.from_config({"groups": entries})
    except (ValueError, TypeError) as e:
        if isinstance(e, L2OError):
            raise
        raise L2OError(f"config key rule.groups: {e}") from None
