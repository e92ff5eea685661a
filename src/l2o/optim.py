"""A trained update rule as a ``torch.optim.Optimizer`` for any training loop.

    opt = l2o.optim.LearnedOptimizer(model.parameters(), rule=l2o.load("pretrained/mnist"))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        sched.step()

Every param group has ``lr`` (a multiplier on the rule's update, default 1.0, so
schedulers and warm-up work) and ``weight_decay`` (decoupled, default 0):
``p <- p (1 - lr weight_decay) + lr u`` where ``u`` is the rule's update.

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

import bisect
import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .layout import ParamLayout
from .rules.base import missing_rule_method
from .rules.grouped import GroupedRule

__all__ = ["LearnedOptimizer"]


def _rule_tag(rule) -> str:
    return str(getattr(rule, "name", type(rule).__name__))


def _check_rule(rule, where: str) -> None:
    if rule is None:
        raise ValueError(
            f"{where}: no update rule given; pass rule=l2o.load(...) or a rule from l2o.rules"
        )
    if (missing := missing_rule_method(rule)) is not None:
        raise ValueError(f"{where}: {rule!r} is not an update rule (it has no {missing}() method)")


def _check_number(value, what: str, where: str) -> float:
    """``value`` as a float: a finite number >= 0 (a Python number or a one-element tensor)."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        number = None
    if isinstance(value, bool) or number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"{where}: {what}, got {value!r}")
    return number


_LR = "lr must be a finite number >= 0 (a multiplier on the rule's update; 1.0 = as trained)"
_WD = "weight_decay must be a finite number >= 0 (decoupled: p <- p * (1 - lr * weight_decay))"


class LearnedOptimizer(torch.optim.Optimizer):
    r"""Runs an update rule (learned or hand-designed) as a ``torch.optim`` optimizer.

    .. code-block:: text

        input: params theta, rule R (state = R.init, theta, state = R.step), closure f (optional)
        for each call of step(closure) or step(loss=L):
            1. loss <- f() under torch.enable_grad()        (if a closure is given; else L)
            2. for each parameter group (its own rule R_g, lr, weight_decay wd):
            3.     P <- the group's parameters whose .grad is not None
                        (split by device/dtype, and for a GroupedRule by name pattern)
            4.     theta <- cat(p.flatten() for p in P);  g <- cat(p.grad.flatten() for p in P)
            5.     s <- cat(state[p] for p in P)         (R_g.init(p) for a parameter seen first)
            6.     theta', s' <- R_g.step(theta, g, loss, s)     under torch.no_grad()
            7.     u <- theta' - theta;  p <- p (1 - lr wd) + lr u[rows of p]
                   state[p] <- s'[rows of p]                              for p in P
            return loss

    With ``lr = 1`` and ``wd = 0`` step 7 is ``p.copy_(theta')``: the rule's own
    step, bit for bit.  Rules with an in-place update (``rule.update_(g, s)``:
    :class:`~l2o.rules.CoordinatewiseLSTM`) skip steps 4 and 6's copies: the state is
    overwritten in place, ``chunk_size`` coordinates at a time.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs
            (``model.named_parameters()``) or of parameter-group dicts.  A group
            dict may set its own ``"rule"``, ``"lr"`` and ``"weight_decay"``.
        rule: the update rule of every group that does not set one: a learned
            rule (``l2o.load(...)``, a :class:`~l2o.rules.CoordinatewiseLSTM`,
            a :class:`~l2o.rules.GroupedRule`) or a classic one
            (``l2o.rules.Adam(lr=1e-3)``).
        lr: multiplier on the rule's update (default 1.0: the rule as trained);
            what ``torch.optim.lr_scheduler`` schedules.
        weight_decay: decoupled weight decay (AdamW's form, scaled by ``lr``).
        chunk_size: coordinates gathered and updated at a time by rules with an
            in-place update: the gathered gradients and the update take 8 bytes per
            chunk coordinate whatever the model's size (``None``: a whole batch at once).
            The default (2^20: at most 8 MiB of temporaries) lets the LSTM's compiled
            step share a chunk between threads (it needs 131,072 coordinates a thread).
        state_dtype: dtype of the per-coordinate state of rules with an in-place
            update, e.g. ``torch.bfloat16`` to halve the LSTM's hidden state (the
            math still runs in the parameters' dtype).  Other rules ignore it.
        compile: run the step of rules that offer it (the coordinatewise LSTM)
            through ``torch.compile``: the fused path for CUDA, where the elementwise
            work of each layer becomes one generated kernel instead of one kernel per
            op.  The first step compiles (tens of seconds).  On CPU leave it off: the
            default compiled C++ step is faster there.  Other rules ignore it.

    Behaviour worth knowing:

    * **Schedulers** change ``group["lr"]`` and so scale the update.  ``OneCycleLR``
      needs ``cycle_momentum=False`` (there is no momentum to cycle).
    * **Mixed precision.** ``GradScaler.step(opt)`` unscales the gradients before
      the rule sees them and skips ``step()`` when they hold inf/NaN (torch's
      default path for optimizers; the rule's state is then untouched).

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
      As in ``torch.optim``, ``state_dict()`` holds references to the live
      state (updated in place by later steps): ``torch.save`` it or
      ``copy.deepcopy`` it to keep a snapshot.  ``load_state_dict`` copies.

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

    def __init__(
        self,
        params: Iterable[Any],
        rule: Any = None,
        *,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        chunk_size: int | None = 1 << 20,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
    ):
        where = "LearnedOptimizer"
        _check_number(lr, _LR, where)
        _check_number(weight_decay, _WD, where)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
        ):
            raise ValueError(
                f"{where}: chunk_size must be a positive int or None, got {chunk_size!r}"
            )
        if state_dtype is not None and not (
            isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point
        ):
            raise ValueError(
                f"{where}: state_dtype must be a floating torch.dtype (e.g. torch.bfloat16) or "
                f"None, got {state_dtype!r}"
            )
        if torch.is_tensor(params):
            raise TypeError(
                f"{where}: params must be an iterable of tensors, of (name, tensor) pairs or of "
                "param-group dicts (e.g. model.parameters()), got a single tensor; wrap it in a list"
            )
        if not isinstance(compile, bool):
            raise ValueError(f"{where}: compile must be True or False, got {compile!r}")
        self.chunk_size = chunk_size
        self.state_dtype = state_dtype
        self.compile = compile
        self._rule_copies: dict[tuple, tuple[Any, nn.Module]] = {}
        self._kinds: dict[int, tuple[Any, dict[str, bool]]] = {}
        super().__init__(params, {"rule": rule, "lr": lr, "weight_decay": weight_decay})

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
        _check_number(group["lr"], _LR, where)
        _check_number(group["weight_decay"], _WD, where)
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
        # torch.optim keeps the caller's tensors when device and dtype match; the state
        # is updated in place, so it must not alias the dict it came from.
        for p, st in self.state.items():
            self.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}

    # -- step ------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """Perform one optimization step (see the class docstring).

        Args:
            closure: re-evaluates the model and returns the loss.
            loss: the loss of the current gradients, for rules that read it
                (``needs_loss``), when there is no closure (``opt.step(loss=loss)``,
                also through ``GradScaler.step(opt, loss=loss)``).

        A rule that ``needs_loss`` requires one of the two.  Returns the loss.
        """
        if closure is not None and loss is not None:
            raise ValueError("LearnedOptimizer.step: pass a closure or loss=, not both")
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
                        "call opt.step(loss=loss) after backward, or opt.step(closure) with a closure "
                        "that computes the loss (after zero_grad and backward) and returns it"
                    )
                lr, wd = float(group["lr"]), float(group["weight_decay"])
                for sub_rule, params in self._buckets(group):
                    for batch in self._split_by_shared_state(sub_rule, params):
                        self._step_batch(sub_rule, batch, rule_loss, lr, wd)
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

    def _step_batch(
        self, rule, params: list[Tensor], loss: Tensor | None, lr: float, wd: float
    ) -> None:
        device, dtype = params[0].device, params[0].dtype
        run_rule = self._rule_on(rule, device, dtype)
        kinds = self._state_kinds(rule)
        # In place and in chunks only for coordinatewise rules: a chunk is not the whole batch.
        if (
            callable(getattr(run_rule, "update_", None))
            and getattr(run_rule, "coordinatewise", False)
            and all(kinds.values())
        ):
            self._step_in_place(run_rule, params, kinds, lr, wd)
            return
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
        if lr != 1.0 or wd != 0.0:
            update = new_theta - theta
            for p, u in zip(params, update.split(sizes), strict=True):
                _apply(p, u.view_as(p), lr, wd)
        else:
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

    def _step_in_place(
        self, rule, params: list[Tensor], kinds: dict[str, bool], lr: float, wd: float
    ) -> None:
        """A rule with ``update_(grad, state) -> update`` that overwrites its (all
        per-coordinate) state: no copy of the parameters or of the state, the
        gradients gathered ``chunk_size`` coordinates at a time."""
        device, dtype = params[0].device, params[0].dtype
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        if not self.state[params[0]]:
            state = rule.init(torch.empty(total, device=device, dtype=dtype))
        else:
            state = self._gather_state(params, kinds, sizes)
        if self.state_dtype is not None:
            state = {
                k: v.to(self.state_dtype) if v.is_floating_point() else v for k, v in state.items()
            }
        if state:  # each parameter's rows, views of the batch's state (found again next step)
            views = {k: v.split(sizes) for k, v in state.items()}
            for j, p in enumerate(params):
                self.state[p] = {k: views[k][j] for k in views}
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        if total == 0:
            return
        chunk = min(self.chunk_size or total, total)
        options = (
            {"compiled": True} if self.compile and getattr(rule, "compilable_step", False) else {}
        )
        buf = torch.empty(chunk, device=device, dtype=dtype)
        # Parameters that are not contiguous are updated through a contiguous copy.
        flat = [p.view(-1) if p.is_contiguous() else p.detach().flatten().clone() for p in params]
        for a in range(0, total, chunk):
            b = min(a + chunk, total)
            pieces = []  # (param index, first, last) coordinates of the param in [a, b)
            j = bisect.bisect_right(starts, a) - 1
            while j < len(params) and starts[j] < b:
                lo, hi = max(a, starts[j]) - starts[j], min(b, starts[j + 1]) - starts[j]
                if hi > lo:
                    pieces.append((j, lo, hi))
                j += 1
            grads = [params[j].grad.detach().reshape(-1)[lo:hi] for j, lo, hi in pieces]
            g = buf[: b - a]
            if len(grads) == 1 and grads[0].dtype == dtype:
                g = grads[0]
            else:
                torch.cat([x.to(dtype) for x in grads], out=g)
            update = rule.update_(g, {k: v[a:b] for k, v in state.items()}, **options)
            pos = 0
            for j, lo, hi in pieces:
                _apply(flat[j][lo:hi], update[pos : pos + hi - lo], lr, wd)
                pos += hi - lo
        for p, f in zip(params, flat, strict=True):
            if not p.is_contiguous():
                p.copy_(f.view(p.shape))


def _apply(p: Tensor, update: Tensor, lr: float, wd: float) -> None:
    """``p <- p (1 - lr wd) + lr update`` in place (``p + update`` exactly when lr = 1, wd = 0)."""
    if wd != 0.0:
        p.mul_(1.0 - lr * wd)
    if lr == 1.0:
        p.add_(update)
    else:
        p.add_(update, alpha=lr)


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
