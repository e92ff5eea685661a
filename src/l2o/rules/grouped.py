"""Different update rules for different parameter tensors, composed by label.

    rule = GroupedRule(
        {"conv": CoordinatewiseLSTM(), "fc": CoordinatewiseLSTM()},
        labels=[("*conv*.weight", "conv"), ("*", "fc")],
    )
    rule = GroupedRule([("*conv*.weight", lstm_a), ("*", lstm_b)])   # shorthand: labels g0, g1

This is optax's ``multi_transform``: every parameter tensor gets a *label*, and
each label has its own rule.  It is the mechanism of the paper's CIFAR experiment
(one LSTM for the convolutional layers, one for the rest).  A :class:`GroupedRule`
is itself an update rule, so the unroll engine, the meta-trainer, ``compare`` and
:class:`l2o.optim.LearnedOptimizer` use it like any other.

Labels.  ``labels`` is an ordered list of ``(pattern, label)`` pairs:
:func:`fnmatch.fnmatchcase` patterns on the tensor names of the layout
(``named_parameters`` names for a :class:`~l2o.tasks.ModuleTask`); each tensor
takes the label of the *first* pattern that matches.  A tensor no pattern matches
is an :class:`~l2o.errors.L2OError` naming the tensor and the patterns (end the
list with ``"*"`` to catch the rest).  A label that gets no tensor of a layout is
only a warning: a rule trained on a network with convolutions may legitimately be
applied to one without.

Structure.  The rule reads the layout it is given at every call
(:mod:`l2o.layout`), so nothing has to be bound beforehand and one rule can drive
problems of any layouts; the index sets of a layout are computed once and cached
*by layout* (a hashable value), never by size.  Each sub-rule sees its own
sub-layout: its tensors, with the same problem instances, so a sub-rule that
couples coordinates couples them within its group and within each instance.

Per label, the coordinates are gathered as one contiguous slice when the label's
tensors are adjacent in the layout, else with one ``index_select``; the new
parameters are put back with one ``cat`` (and one ``index_select`` by the inverse
permutation when labels interleave).  No Python loop runs over tensors or
coordinates inside ``step``, only over the few labels.  The state of label ``L``
is the sub-rule's state with keys prefixed ``"L."`` (``"conv.h0"``), and learned
sub-rules are registered as ``groups.L`` so their weights are meta-parameters
saved in artifacts and checkpoints.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from ..errors import L2OError
from ..layout import ParamLayout
from .base import State, missing_rule_method
from .classic import CLASSIC_RULES


@dataclass
class _Plan:
    """Where each label's coordinates sit in the flat vector of one layout."""

    sizes: list[int]  # coordinates per label, label order
    index: list[Tensor | None]  # per label: LongTensor of flat positions, None if contiguous
    starts: list[int]  # per label: first flat position (valid when contiguous)
    inverse: Tensor | None  # undoes the label-order concatenation; None if already in order
    layouts: list[ParamLayout | None]  # per label: the sub-layout (None: no tensor)
    cache: dict  # device -> (index list, inverse) on that device


def _describe_sub(rule) -> dict:
    if hasattr(rule, "describe"):
        return rule.describe()
    if getattr(rule, "name", None) in CLASSIC_RULES and hasattr(rule, "hparams"):
        return {"rule": rule.name, "config": dict(rule.hparams)}
    raise ValueError(
        f"GroupedRule: cannot describe sub-rule {rule!r} (no describe() and not a classic rule)"
    )


def _check_label(label, where: str) -> str:
    if not isinstance(label, str) or not label or "." in label:
        raise ValueError(
            f"GroupedRule {where}: a label is a non-empty string without '.', got {label!r}"
        )
    return label


class GroupedRule(nn.Module):
    """An update rule that gives each parameter tensor a label and each label a rule.

    Args:
        rules: ``{label: rule}``, or the shorthand: an ordered list of
            ``(pattern, rule)`` pairs (labels ``g0``, ``g1``, ...).  A rule may be
            learned (an ``nn.Module``, registered as a submodule) or classic
            (:class:`~l2o.rules.Adam` with a fixed ``lr``, ...).
        labels: ordered ``(pattern, label)`` pairs; the first matching pattern wins.
            Required with a dict of rules, not allowed with the shorthand.

    See the module docstring for labels, structure and the state layout.
    """

    name = "grouped"
    #: each sub-rule sees only its own tensors, so the composition couples coordinates
    #: exactly when one of its sub-rules does
    coordinatewise: bool

    def __init__(
        self,
        rules: Mapping[str, object] | Sequence[tuple[str, object]],
        labels: Sequence[tuple[str, str]] | None = None,
    ):
        super().__init__()
        if isinstance(rules, Mapping):
            if labels is None:
                raise ValueError(
                    "GroupedRule: with a dict of rules, pass labels=[(pattern, label), ...]"
                )
            rule_items = [(_check_label(k, "rules"), v) for k, v in rules.items()]
        else:
            if labels is not None:
                raise ValueError(
                    "GroupedRule: labels= goes with a dict of rules; the (pattern, rule) shorthand labels itself"
                )
            pairs = list(rules)
            for i, item in enumerate(pairs):
                if not (
                    isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)
                ):
                    raise ValueError(
                        f"GroupedRule group {i}: expected a (pattern, rule) pair, got {item!r}"
                    )
            rule_items = [(f"g{i}", r) for i, (_, r) in enumerate(pairs)]
            labels = [(p, f"g{i}") for i, (p, _) in enumerate(pairs)]
        if not rule_items:
            raise ValueError("GroupedRule needs at least one rule")
        labels = [tuple(x) for x in labels]
        if not labels:
            raise ValueError("GroupedRule needs at least one (pattern, label) pair")
        self.label_names: list[str] = [k for k, _ in rule_items]
        for i, item in enumerate(labels):
            if not (len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(
                    f"GroupedRule labels[{i}]: expected (pattern, label), got {item!r}"
                )
            if item[1] not in self.label_names:
                raise ValueError(
                    f"GroupedRule labels[{i}]: label {item[1]!r} has no rule; rules: {self.label_names}"
                )
        self.labels: list[tuple[str, str]] = labels
        self._subrules: list = []
        self.groups = nn.ModuleDict()
        for label, rule in rule_items:
            if isinstance(rule, GroupedRule):
                raise ValueError(
                    f"GroupedRule label {label!r}: nested GroupedRules are not supported"
                )
            if (missing := missing_rule_method(rule)) is not None:
                raise ValueError(
                    f"GroupedRule label {label!r}: {rule!r} is not an update rule "
                    f"(it has no {missing}() method)"
                )
            _describe_sub(rule)  # fail now, not when saving
            self._subrules.append(rule)
            if isinstance(rule, nn.Module):
                self.groups[label] = rule
        self.coordinatewise = all(getattr(r, "coordinatewise", False) for r in self._subrules)
        self._plans: dict[ParamLayout, _Plan] = {}

    @property
    def patterns(self) -> list[str]:
        return [p for p, _ in self.labels]

    @property
    def rules(self) -> list:
        """The sub-rules, in label order (``label_names``)."""
        return list(self._subrules)

    @property
    def needs_loss(self) -> bool:
        return any(getattr(r, "needs_loss", False) for r in self._subrules)

    # -- labels ----------------------------------------------------------------------
    def label_of(self, name: str) -> str:
        for pattern, label in self.labels:
            if fnmatchcase(name, pattern):
                return label
        raise L2OError(
            f"GroupedRule: parameter {name!r} matches none of the patterns {self.patterns}; "
            "add a pattern for it (a final '*' catches every remaining tensor)"
        )

    def route(self, names: Sequence[str], *, warn_unused: bool = True) -> list[int]:
        """Index (into :attr:`rules`) of the rule of every tensor name.

        Raises :class:`L2OError` for a name no pattern matches; warns about labels
        that get none of ``names``.
        """
        out = [self.label_names.index(self.label_of(n)) for n in names]
        if warn_unused:
            unused = [lb for i, lb in enumerate(self.label_names) if i not in set(out)]
            if unused:
                warnings.warn(
                    f"GroupedRule: labels {unused} (patterns "
                    f"{[p for p, lb in self.labels if lb in unused]}) match no parameter",
                    UserWarning,
                    stacklevel=3,
                )
        return out

    def _make_plan(self, layout: ParamLayout) -> _Plan:
        route = self.route(layout.names)
        n = len(self.label_names)
        ranges: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        members: list[list[str]] = [[] for _ in range(n)]
        pos = 0
        for g, name, size in zip(route, layout.names, layout.sizes, strict=True):
            members[g].append(name)
            if size:
                ranges[g].append((pos, pos + size))
            pos += size
        sizes, index, starts, order = [], [], [], []
        for rs in ranges:
            sizes.append(sum(b - a for a, b in rs))
            contiguous = all(rs[k][1] == rs[k + 1][0] for k in range(len(rs) - 1))
            starts.append(rs[0][0] if rs else 0)
            index.append(None if contiguous else torch.cat([torch.arange(a, b) for a, b in rs]))
            order.extend(rs)
        in_order = all(order[k][1] == order[k + 1][0] for k in range(len(order) - 1)) and (
            not order or order[0][0] == 0
        )
        inverse = None
        if not in_order:
            perm = torch.cat([torch.arange(a, b) for a, b in order])
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel())
        layouts = [layout.subset(m) if m else None for m in members]
        return _Plan(sizes, index, starts, inverse, layouts, {})

    def _plan(self, theta: Tensor, layout: ParamLayout | None):
        if layout is None:
            raise L2OError(
                "GroupedRule routes tensors by name, so it needs the layout: "
                "rule.init(theta, layout) / rule.step(theta, grad, loss, state, layout)"
            )
        if layout.numel != theta.numel():
            raise L2OError(
                f"GroupedRule: the layout has {layout.numel} coordinates, the parameters {theta.numel()}"
            )
        plan = self._plans.get(layout)
        if plan is None:
            plan = self._plans[layout] = self._make_plan(layout)
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
    def init(self, theta: Tensor, layout: ParamLayout | None = None) -> State:
        plan, index, _ = self._plan(theta, layout)
        state: State = {}
        for label, rule, part, sub in zip(
            self.label_names,
            self._subrules,
            self._parts(theta, plan, index),
            plan.layouts,
            strict=True,
        ):
            if sub is None:
                continue
            for k, v in rule.init(part, sub).items():
                state[f"{label}.{k}"] = v
        return state

    def step(
        self,
        theta: Tensor,
        grad: Tensor,
        loss: Tensor | None,
        state: State,
        layout: ParamLayout | None = None,
    ) -> tuple[Tensor, State]:
        plan, index, inverse = self._plan(theta, layout)
        thetas, grads = self._parts(theta, plan, index), self._parts(grad, plan, index)
        new_parts, new_state = [], {}
        for i, (label, rule) in enumerate(zip(self.label_names, self._subrules, strict=True)):
            if plan.layouts[i] is None:
                continue
            prefix = f"{label}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            new, sub = rule.step(thetas[i], grads[i], loss, sub, plan.layouts[i])
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
                "rules": {
                    label: _describe_sub(r)
                    for label, r in zip(self.label_names, self._subrules, strict=True)
                },
                "labels": [[p, lb] for p, lb in self.labels],
            },
        }

    @classmethod
    def from_config(cls, config: dict) -> GroupedRule:
        """Rebuild from ``{"rules": {label: {"rule", "config"}}, "labels": [[pattern, label], ...]}``.

        The older form ``{"groups": [{"pattern", "rule", "config"}, ...]}`` (labels g0, g1, ...)
        is read too.
        """
        from . import build_learned_rule  # the registry imports this module

        if "groups" in config:
            unknown = set(config) - {"groups"}
            if unknown:
                raise ValueError(
                    f"unknown grouped rule config keys {sorted(unknown)}; expected ['groups']"
                )
            groups = config.get("groups")
            if not isinstance(groups, list) or not groups:
                raise ValueError("grouped rule config needs a non-empty 'groups' list")
            rules, labels = {}, []
            for i, g in enumerate(groups):
                if not isinstance(g, dict) or "pattern" not in g or "rule" not in g:
                    raise ValueError(
                        f"grouped rule group {i}: expected {{'pattern', 'rule', 'config'}}, got {g!r}"
                    )
                extra = set(g) - {"pattern", "rule", "config", "label"}
                if extra:
                    raise ValueError(f"grouped rule group {i}: unknown keys {sorted(extra)}")
                label = g.get("label", f"g{i}")  # optional name (cifar10-cnn: conv, fc)
                if label not in rules:  # several patterns may share one label's rule
                    rules[label] = {k: v for k, v in g.items() if k != "label" and k != "pattern"}
                labels.append((g["pattern"], label))
            config = {"rules": rules, "labels": labels}
        unknown = set(config) - {"rules", "labels"}
        if unknown:
            raise ValueError(
                f"unknown grouped rule config keys {sorted(unknown)}; expected ['labels', 'rules']"
            )
        rules_cfg, labels = config.get("rules"), config.get("labels")
        if not isinstance(rules_cfg, dict) or not rules_cfg:
            raise ValueError("grouped rule config needs a non-empty 'rules' table")
        if not isinstance(labels, list) or not labels:
            raise ValueError("grouped rule config needs a non-empty 'labels' list")
        rules = {}
        for label, g in rules_cfg.items():
            if not isinstance(g, dict) or "rule" not in g:
                raise ValueError(
                    f"grouped rule {label!r}: expected {{'rule', 'config'}}, got {g!r}"
                )
            name, sub_cfg = g["rule"], dict(g.get("config") or {})
            if name == cls.name:
                raise ValueError(f"grouped rule {label!r}: nested grouped rules are not supported")
            rules[label] = (
                CLASSIC_RULES[name](**sub_cfg)
                if name in CLASSIC_RULES
                else build_learned_rule(name, sub_cfg)
            )
        return cls(rules, labels=[tuple(x) for x in labels])

    def extra_repr(self) -> str:
        return ", ".join(
            f"{p!r} -> {lb}: {getattr(self._subrules[self.label_names.index(lb)], 'name', '?')}"
            for p, lb in self.labels
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
    # [rule] holds every rule's keys; a group takes the ones its rule's config has
    import dataclasses

    from . import RULE_CONFIGS

    defaults = dict(defaults or {})
    if default_rule in RULE_CONFIGS:
        known = {f.name for f in dataclasses.fields(RULE_CONFIGS[default_rule])}
        defaults = {k: v for k, v in defaults.items() if k in known}
    entries = []
    for g in parsed:
        if isinstance(g, dict) and g.get("rule") == default_rule and "config" not in g:
            g = {**g, "config": dict(defaults)}
        entries.append(g)
    try:
        return GroupedRule.from_config({"groups": entries})
    except (ValueError, TypeError) as e:
        if isinstance(e, L2OError):
            raise
        raise L2OError(f"config key rule.groups: {e}") from None
