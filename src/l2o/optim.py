"""A trained update rule as a ``torch.optim.Optimizer`` for any training loop.

    opt = l2o.optim.LearnedOptimizer(model.parameters(), rule=l2o.load("pretrained/mnist"))
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

Update rules work on one flat vector (:mod:`l2o.rules.base`); the adapter
gathers, per parameter group, the gradients of the parameters that have one
into a flat vector, runs the rule once on it (one batch, no loop over tensors
or coordinates) and writes the new values back into the parameters.

Its state lives in ``self.state`` the way ``torch.optim`` keeps it, per
parameter: the rule's per-coordinate state (the LSTM's ``h0``/``c0``... of shape
``[N, hidden]``, Adam's ``exp_avg``) is split along dim 0 so that ``state[p]``
holds that parameter's rows (``{"h0": [p.numel(), 20], ...}``), and entries
shared by all coordinates (Adam's ``step``) are stored with every parameter.
``state_dict()`` / ``load_state_dict()`` are therefore the standard ones and
round-trip exactly, through ``torch.save`` / ``torch.load(weights_only=True)``
too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .layout import ParamLayout
from .rules.grouped import GroupedRule

__all__ = ["LearnedOptimizer"]


def _rule_tag(rule) -> str:
    return str(getattr(rule, "name", type(rule).__name__))


def _check_rule(rule, where: str) -> None:
    if rule is None:
        raise ValueError(
            f"{where}: no update rule given; pass rule=l2o.load(...) or a rule from l2o.rules"
        )
    for attr in ("init", "step"):
        if not callable(getattr(rule, attr, None)):
            raise ValueError(f"{where}: {rule!r} is not an update rule (it has no {attr}() method)")


class LearnedOptimizer(torch.optim.Optimizer):
    r"""Runs an update rule (learned or hand-designed) as a ``torch.optim`` optimizer.

    .. code-block:: text

        input: params theta, rule R (state = R.init, theta, state = R.step), closure f (optional)
        for each call of step(closure):
            1. loss <- f() under torch.enable_grad()        (if a closure is given)
            2. for each parameter group (its own rule R_g):
            3.     P <- the group's parameters whose .grad is not None
                        (split by device/dtype, and for a GroupedRule by name pattern)
            4.     theta <- cat(p.flatten() for p in P);  g <- cat(p.grad.flatten() for p in P)
            5.     s <- cat(state[p] for p in P)         (R_g.init(p) for a parameter seen first)
            6.     theta', s' <- R_g.step(theta, g, loss, s)     under torch.no_grad()
            7.     p.copy_(theta'[rows of p]);  state[p] <- s'[rows of p]   for p in P
            return loss

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs
            (``model.named_parameters()``) or of parameter-group dicts.  A group
            dict may set its own ``"rule"``.
        rule: the update rule of every group that does not set one: a learned
            rule (``l2o.load(...)``, a :class:`~l2o.rules.CoordinatewiseLSTM`,
            a :class:`~l2o.rules.GroupedRule`) or a classic one
            (``l2o.rules.Adam(lr=1e-3)``).

    Behaviour worth knowing:

    * **Parameters without a gradient** (``p.grad is None``) are skipped: not
      updated, their state untouched, as in ``torch.optim``.  A parameter's
      state is created the first time it has a gradient.  Per-coordinate state
      (an LSTM's hidden state) is per parameter, so skipped parameters just
      resume later.  State shared by all coordinates of a batch (Adam's
      ``step``) is batched only between parameters whose shared entries are
      equal; parameters whose counters diverged (one was skipped) are stepped
      in separate batches, each with its own counter, which is exactly what
      ``torch.optim.Adam`` does per parameter.
    * **Devices and dtypes.** Parameters are batched per (device, dtype).  A
      learned rule whose weights are not on that device/dtype is run through a
      private copy moved there (made on first use, weights re-synced from the
      user's rule before every step, so training or reloading the rule is
      seen); the user's rule object is never moved or modified.
    * **Loss.** Rules with ``needs_loss`` receive the closure's loss; without a
      closure ``step()`` raises ``ValueError``.  Other rules get the loss too
      when there is one and ignore it.
    * **GroupedRule** routes tensors by name, so it needs names: pass
      ``model.named_parameters()``.  Each sub-rule runs on its own batch with its
      own state.
    * ``state_dict()["param_groups"][i]["rule"]`` is the rule's *name* (a
      string, so ``torch.load(weights_only=True)`` works); the rule objects are
      not saved: they belong to whoever built the optimizer, and
      ``load_state_dict`` keeps the current ones (after checking the names).

    Example::

        >>> model = torch.nn.Linear(10, 1)
        >>> opt = LearnedOptimizer(model.parameters(), rule=l2o.load("pretrained/quadratic"))
        >>> opt.zero_grad()
        >>> model(torch.randn(4, 10)).pow(2).mean().backward()
        >>> opt.step()

        Different rules per group, by name pattern or by explicit group:

        >>> grouped = l2o.rules.GroupedRule([("*.bias", l2o.rules.Adam(lr=1e-3)), ("*", rule)])
        >>> opt = LearnedOptimizer(model.named_parameters(), rule=grouped)
        >>> opt = LearnedOptimizer([{"params": model.weight}, {"params": model.bias, "rule": l2o.rules.SGD(0.1)}],
        ...                        rule=rule)
    """

    def __init__(self, params: Iterable[Any], rule: Any = None):
        self._rule_copies: dict[tuple, tuple[Any, nn.Module]] = {}
        self._kinds: dict[int, tuple[Any, dict[str, bool]]] = {}
        super().__init__(params, {"rule": rule})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()  # a rejected group must not stay half-added
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        where = f"LearnedOptimizer param group {len(self.param_groups) - 1}"
        _check_rule(group["rule"], where)
        for p in group["params"]:
            if not (p.is_floating_point() and not p.is_complex()):
                raise ValueError(
                    f"{where}: only real floating-point parameters are supported, got {p.dtype}"
                )
        if isinstance(group["rule"], GroupedRule):
            if "param_names" not in group:
                raise ValueError(
                    f"{where}: a GroupedRule routes tensors by name; pass model.named_parameters() "
                    "(or (name, tensor) pairs) instead of model.parameters()"
                )
            group["rule"].route(group["param_names"])  # every tensor routed, now

    # -- state_dict: rule objects stay with the caller -------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["param_groups"] = [{**g, "rule": _rule_tag(g["rule"])} for g in sd["param_groups"]]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rules = [g["rule"] for g in self.param_groups]
        saved = state_dict["param_groups"]
        if len(saved) != len(rules):
            raise ValueError(
                f"loaded state dict has {len(saved)} parameter groups, this optimizer has {len(rules)}"
            )
        for i, (g, rule) in enumerate(zip(saved, rules, strict=True)):
            tag = g.get("rule")
            if isinstance(tag, str) and tag != _rule_tag(rule):
                raise ValueError(
                    f"parameter group {i} was saved with rule {tag!r} but this optimizer uses {_rule_tag(rule)!r}"
                )
        # Pass names, not modules, so torch.optim does not deep-copy the rules; put them back after.
        tagged = [{**g, "rule": _rule_tag(r)} for g, r in zip(saved, rules, strict=True)]
        super().load_state_dict({**state_dict, "param_groups": tagged})
        for group, rule in zip(self.param_groups, rules, strict=True):
            group["rule"] = rule

    # -- step ------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (see the class docstring).

        Args:
            closure: re-evaluates the model and returns the loss; required when a
                group's rule ``needs_loss``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rule_loss = None
        if loss is not None:
            rule_loss = loss.detach() if torch.is_tensor(loss) else torch.tensor(float(loss))
        with torch.no_grad():
            for gi, group in enumerate(self.param_groups):
                rule = group["rule"]
                if getattr(rule, "needs_loss", False) and rule_loss is None:
                    raise ValueError(
                        f"LearnedOptimizer: the rule {_rule_tag(rule)!r} of param group {gi} needs the loss; "
                        "call opt.step(closure) with a closure that computes the loss (after zero_grad and "
                        "backward) and returns it"
                    )
                for sub_rule, params in self._buckets(group):
                    for batch in self._split_by_shared_state(sub_rule, params):
                        self._step_batch(sub_rule, batch, rule_loss)
        return loss

    def _buckets(self, group: dict) -> list[tuple[Any, list[Tensor]]]:
        """(rule, params with a grad) per sub-rule and (device, dtype), in parameter order."""
        rule = group["rule"]
        params = group["params"]
        if isinstance(rule, GroupedRule):
            route = rule.route(group["param_names"], warn_unused=False)
            subs = rule.rules
            rules = [subs[i] for i in route]
        else:
            route, rules = [0] * len(params), [rule] * len(params)
        buckets: dict[tuple, tuple[Any, list[Tensor]]] = {}
        for p, r, sub in zip(params, rules, route, strict=True):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LearnedOptimizer does not support sparse gradients")
            key = (sub, p.device, p.dtype)
            if key not in buckets:
                buckets[key] = (r, [])
            buckets[key][1].append(p)
        return list(buckets.values())

    def _state_kinds(self, rule) -> dict[str, bool]:
        """For each state key of ``rule``: True if per-coordinate (leading dim = #coordinates)."""
        cached = self._kinds.get(id(rule))
        if cached is not None and cached[0] is rule:
            return cached[1]
        try:
            a, b = (rule.init(torch.zeros(n, device="meta")) for n in (2, 3))
        except Exception:  # rules that cannot init on the meta device
            a, b = (rule.init(torch.zeros(n)) for n in (2, 3))
        kinds = {k: tuple(a[k].shape) != tuple(b[k].shape) for k in a}
        self._kinds[id(rule)] = (rule, kinds)
        return kinds

    def _split_by_shared_state(self, rule, params: list[Tensor]) -> list[list[Tensor]]:
        """Split ``params`` into batches whose shared (not per-coordinate) state is equal."""
        kinds = self._state_kinds(rule)
        shared = [k for k, per_coord in kinds.items() if not per_coord]
        fresh = [p for p in params if not self.state[p]]
        old = [p for p in params if self.state[p]]
        if not shared or len(old) <= 1:
            return [b for b in (fresh, old) if b]
        # One comparison (one device sync) for the common case: all counters equal.
        try:
            vals = torch.stack(
                [
                    torch.cat(
                        [
                            self.state[p][k].reshape(-1).to(old[0].device, torch.float64)
                            for k in shared
                        ]
                    )
                    for p in old
                ]
            )
            if bool((vals == vals[0]).all()):
                return [b for b in (fresh, old) if b]
        except RuntimeError:  # shapes differ between parameters: fall back to per-parameter keys
            pass
        groups: dict[bytes, list[Tensor]] = {}
        for p in old:
            key = b"".join(self.state[p][k].detach().cpu().numpy().tobytes() for k in shared)
            groups.setdefault(key, []).append(p)
        return [b for b in [fresh, *groups.values()] if b]

    def _rule_on(self, rule, device: torch.device, dtype: torch.dtype):
        """``rule`` itself when its weights already live on device/dtype, else a synced private copy."""
        if not isinstance(rule, nn.Module):
            return rule
        tensors = list(rule.parameters()) + list(rule.buffers())
        if all(
            t.device == device and (t.dtype == dtype or not t.is_floating_point()) for t in tensors
        ):
            return rule
        key = (id(rule), device, dtype)
        entry = self._rule_copies.get(key)
        if entry is None or entry[0] is not rule:
            entry = (rule, copy.deepcopy(rule).to(device=device, dtype=dtype))
            self._rule_copies[key] = entry
        moved = entry[1]
        for dst, src in zip(list(moved.parameters()) + list(moved.buffers()), tensors, strict=True):
            dst.copy_(src)
        return moved

    def _gather_state(
        self, params: list[Tensor], kinds: dict[str, bool], sizes: list[int]
    ) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        first = self.state[params[0]]
        for key in first:
            if not kinds.get(key, True):
                state[key] = first[key]
                continue
            views = [self.state[p][key] for p in params]
            base = _consecutive_base(views, sizes)
            state[key] = (
                base if base is not None else torch.cat([v.to(params[0].device) for v in views])
            )
        return state

    def _step_batch(self, rule, params: list[Tensor], loss: Tensor | None) -> None:
        device, dtype = params[0].device, params[0].dtype
        run_rule = self._rule_on(rule, device, dtype)
        kinds = self._state_kinds(rule)
        sizes = [p.numel() for p in params]
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        grad = torch.cat([p.grad.detach().reshape(-1).to(dtype) for p in params])
        # The batch is one instance; coupling rules (ClippedSGD) couple within it.
        layout = ParamLayout(
            tuple(f"p{i}" for i in range(len(params))), tuple(p.shape for p in params)
        )
        if not self.state[params[0]]:
            state = run_rule.init(theta, layout)
        else:
            state = self._gather_state(params, kinds, sizes)
        if loss is not None:
            loss = loss.to(device)
        new_theta, new_state = run_rule.step(theta, grad, loss, state, layout)
        for p, v in zip(params, new_theta.split(sizes), strict=True):
            p.copy_(v.view_as(p))
        per_coord = {
            k: v.split(sizes)
            for k, v in new_state.items()
            if kinds.get(k, v.dim() > 0 and v.shape[0] == theta.numel())
        }
        for j, p in enumerate(params):
            self.state[p] = {
                k: (per_coord[k][j] if k in per_coord else v) for k, v in new_state.items()
            }


def _consecutive_base(views: list[Tensor], sizes: list[int]) -> Tensor | None:
    """The tensor ``views`` were split from, when they are exactly its consecutive rows.

    After a step, each parameter's state rows are views into the rule's output;
    finding that tensor again skips a copy of the whole state at the next step.
    """
    base = views[0]._base
    if base is None or not base.is_contiguous() or base.shape[0] != sum(sizes):
        return None
    row = base.stride(0) if base.dim() else 1
    offset = base.storage_offset()
    for v, n in zip(views, sizes, strict=True):
        if v._base is not base or v.shape[0] != n or v.storage_offset() != offset:
            return None
        offset += n * row
    return base
