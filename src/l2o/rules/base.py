"""The one idea of the library: an optimizer is an update rule.

    state = rule.init(theta)
    theta, state = rule.step(theta, grad, loss, state)

``theta`` and ``grad`` are *flat* 1-D tensors holding every coordinate of every
parameter tensor of the optimizee (see :class:`l2o.tasks.base.ParamLayout` for the
flat <-> named-tensor mapping).  Working on one flat vector is what makes every
rule, hand-designed or learned, process all coordinates as one batch with no
Python loop over tensors or coordinates.

``loss`` is the optimizee's current loss (a scalar tensor, or ``None`` when the
caller has none); rules with ``needs_loss = True`` (the Meta-Learner LSTM) require
it.  ``state`` is a plain ``dict[str, Tensor]`` owned by the caller (the unroll
engine, the evaluation harness or the ``torch.optim`` adapter), never stored on
the rule, so one rule can drive many problems at once.

Rules are pure and differentiable: ``step`` uses out-of-place operations only, so
gradients flow from the new parameters back to the rule's own weights (learned
rules are ``nn.Module``s whose parameters are the meta-parameters) and, when the
caller keeps the graph, back through ``grad`` (second-order meta-gradients).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

State = dict[str, Tensor]


@runtime_checkable
class UpdateRule(Protocol):
    """Protocol every update rule implements."""

    name: str
    needs_loss: bool

    def init(self, theta: Tensor) -> State:
        """Fresh per-coordinate state for the flat parameter vector ``theta``."""
        ...

    def step(
        self, theta: Tensor, grad: Tensor, loss: Tensor | None, state: State
    ) -> tuple[Tensor, State]:
        """One optimization step: returns (new flat parameters, new state)."""
        ...


def is_learned(rule: object) -> bool:
    """True for rules with meta-parameters (``nn.Module`` rules with parameters)."""
    params = getattr(rule, "parameters", None)
    return params is not None and any(True for _ in params())
