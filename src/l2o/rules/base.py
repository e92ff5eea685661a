"""The one idea of the library: an optimizer is an update rule.

    state = rule.init(theta, layout)
    theta, state = rule.step(theta, grad, loss, state, layout)

``theta`` and ``grad`` are *flat* 1-D tensors holding every coordinate of every
parameter tensor of the optimizee.  Working on one flat vector is what makes every
rule, hand-designed or learned, process all coordinates as one batch with no
Python loop over tensors or coordinates.

``layout`` (a :class:`l2o.layout.ParamLayout`) says what the vector is made of:
the tensors (names, shapes) and the independent problem instances optimized
together.  ``None`` means one instance, one tensor.  A rule declares
``coordinatewise = True`` when each coordinate's update depends on that
coordinate alone (the L2L LSTM, Adam); such a rule may ignore the layout.  A rule
that couples coordinates (``coordinatewise = False``: a global average, a
gradient norm, a memory) must couple them per instance, through the reductions
of :mod:`l2o.layout`, never across the instances of a meta-batch.

``loss`` is the optimizee's current loss: one value per instance (``[P]``), a
scalar, or ``None`` when the caller has none; rules with ``needs_loss = True``
(the Meta-Learner LSTM) require it and give each coordinate its instance's loss.  ``state`` is a plain ``dict[str, Tensor]`` owned by the caller (the unroll
engine, the evaluation harness or the ``torch.optim`` adapter), never stored on
the rule, so one rule can drive many problems at once.

Rules are pure and differentiable: ``step`` uses out-of-place operations only, so
gradients flow from the new parameters back to the rule's own weights (learned
rules are ``nn.Module``s whose parameters are the meta-parameters) and, when the
caller keeps the graph, back through ``grad`` (second-order meta-gradients).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Protocol, runtime_checkable

from torch import Tensor

from ..layout import ParamLayout

State = dict[str, Tensor]


class ConfigDict:
    """Mixin of the learned rules' frozen dataclass configs: to and from plain JSON dicts.

    ``to_dict`` turns tuple fields (``layers``, per-layer counts, gate biases) into
    lists.  ``from_dict`` rejects keys the config does not have, naming them, unless
    the class sets ``ignore_unknown_keys = True`` (configs built from a shared
    ``[rule]`` table that also holds other rules' keys, such as ``preset`` or ``p``).
    """

    ignore_unknown_keys = False  # a plain class attribute, not a dataclass field

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown and not cls.ignore_unknown_keys:
            raise ValueError(
                f"unknown {cls.__name__} keys {sorted(unknown)}; expected {sorted(known)}"
            )
        return cls(**{k: v for k, v in d.items() if k in known})


@runtime_checkable
class UpdateRule(Protocol):
    """Protocol every update rule implements."""

    name: str
    needs_loss: bool
    coordinatewise: bool

    def init(self, theta: Tensor, layout: ParamLayout | None = None) -> State:
        """Fresh per-coordinate state for the flat parameter vector ``theta``."""
        ...

    def step(
        self,
        theta: Tensor,
        grad: Tensor,
        loss: Tensor | None,
        state: State,
        layout: ParamLayout | None = None,
    ) -> tuple[Tensor, State]:
        """One optimization step: returns (new flat parameters, new state)."""
        ...


def missing_rule_method(rule: object) -> str | None:
    """The first of ``init`` / ``step`` that ``rule`` lacks (None: it is an update rule).

    The one structural check used wherever user code hands us a rule (GroupedRule,
    LearnedOptimizer, ``train.init_from``), so they all accept and reject the same objects.
    """
    for attr in ("init", "step"):
        if not callable(getattr(rule, attr, None)):
            return attr
    return None


def is_learned(rule: object) -> bool:
    """True for rules with meta-parameters (``nn.Module`` rules with parameters)."""
    params = getattr(rule, "parameters", None)
    return params is not None and any(True for _ in params())
