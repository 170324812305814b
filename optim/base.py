"""MatrixOptimizer: the mechanics every matrixopt optimizer shares.

A subclass states its matrix rule in :meth:`MatrixOptimizer._update_matrices`; this base
does everything around it:

- param groups of tensors, (name, tensor) pairs or dicts, with every hyperparameter
  overridable per group and validated up front (``ValueError`` naming the argument);
- routing: a param goes to the matrix rule when its group says ``matrix=True``, or when the
  key is absent and ``p.ndim >= 2``; else to the built-in AdamW fallback;
- matrix views: 2-D (m, n) as is; 3-D (E, m, n) as E independent matrices (stacked MoE
  experts); N-D with N ≥ 4 as conv kernels (out, in·k₁·k₂…); 1-D with ``matrix=True`` as a
  single row (1, n);
- batching: a rule receives all params of a group whose matrices share (m, n, dtype,
  device), so it can stack them and orthogonalize / project them in one launch;
- the non-finite policy: a param whose gradient holds NaN/Inf is not touched (weights and
  state stay bit-identical), ``nonfinite_skips`` counts it and one warning names it; with
  ``nonfinite="raise"`` a ``FloatingPointError`` names it before anything is updated;
- state dicts that hold only tensors and plain values, keep the state's own dtypes on load
  (fp32 moments for bf16 params), and reject state saved for other shapes;
- :meth:`state_bytes` for memory tables.
"""
import math
import warnings
from collections import defaultdict
from typing import Any, Callable

import torch
from torch import Tensor

# -- hyperparameter validation -------------------------------------------------------------
# A validator takes (name, value) and raises ValueError naming the argument and its range.
Validator = Callable[[str, Any], None]


def real(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
         hi_open: bool = False) -> Validator:
    """A real number in [lo, hi] (open ends as asked)."""
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def check(name, value):
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"Invalid {name}: a Tensor {name} must have one element")
            value = value.item()
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        if ok:
            ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            raise ValueError(f"Invalid {name}: {value!r}; expected a number in {interval}")

    return check


def integer(lo: int = 0, hi: int | None = None) -> Validator:
    def check(name, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ValueError(f"Invalid {name}: {value!r}; expected an integer {bound}")

    return check


def choice(*options) -> Validator:
    def check(name, value):
        if not any(value is o or (type(value) is type(o) and value == o) for o in options):
            raise ValueError(f"Invalid {name}: {value!r}; expected one of {options}")

    return check


def betas_in_unit_interval(name, value):
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"Invalid {name}: {value!r}; expected a pair (beta1, beta2)")
    for i, b in enumerate(value):
        real(0.0, 1.0, hi_open=True)(f"{name}[{i}]", b)


def rank_spec(name, value):
    """An int >= 1, or a fraction in (0, 1] of min(m, n)."""
    if isinstance(value, float):
        real(0.0, 1.0, lo_open=True)(name, value)
    else:
        integer(1)(name, value)


def resolve_rank(rank: int | float, m: int, n: int) -> int:
    """``rank`` as an int (a float is a fraction of min(m, n)), capped at min(m, n)."""
    k = min(m, n)
    r = max(1, round(rank * k)) if isinstance(rank, float) else rank
    return min(r, k)


# -- matrix views ----------------------------------------------------------------------------

def matrix_shape(t: Tensor) -> tuple[int, int, int]:
    """(B, m, n): how ``t`` is seen as a batch of B matrices of m×n (see module docstring)."""
    if t.ndim == 0:
        return 1, 1, 1
    if t.ndim == 1:
        return 1, 1, t.shape[0]
    if t.ndim == 2:
        return 1, t.shape[0], t.shape[1]
    if t.ndim == 3:
        return t.shape[0], t.shape[1], t.shape[2]
    return 1, t.shape[0], math.prod(t.shape[1:])


def as_matrices(t: Tensor) -> Tensor:
    """``t`` viewed (or, if not viewable, copied) as (B, m, n)."""
    return t.reshape(matrix_shape(t))


def apply_update(weights, updates, *, lr: float, weight_decay: float, scale: float):
    """W ← W·(1 - lr·weight_decay) - lr·scale·U for each W and its update U."""
    torch._foreach_mul_(weights, 1 - lr * weight_decay)
    torch._foreach_add_(weights, [u.to(w.dtype) for u, w in zip(updates, weights)], alpha=-lr * scale)


# -- the optimizer base ----------------------------------------------------------------------

SHARED_HYPERPARAMETERS: dict[str, Validator] = {
    "lr": real(0.0),
    "weight_decay": real(0.0),
    "betas": betas_in_unit_interval,
    "eps": real(0.0, lo_open=True),
    "nonfinite": choice("skip", "raise"),
}


class MatrixOptimizer(torch.optim.Optimizer):
    """Base class: a matrix rule for matrices, AdamW for the rest (see module docstring).

    Subclasses set ``hyperparameters`` (name → validator, beyond the shared lr,
    weight_decay, betas, eps, nonfinite) and implement :meth:`_update_matrices`. State
    that must have a fixed shape is declared in :meth:`_matrix_state_shapes`, so a state
    dict saved for other shapes is rejected on load.

    The fallback is AdamW exactly as ``torch.optim.AdamW`` (decoupled weight decay,
    bias-corrected moments, ``eps`` added outside the square root), with fp32 moments.
    """

    hyperparameters: dict[str, Validator] = {}

    def __init__(self, params, defaults: dict):
        self.nonfinite_skips = 0
        self._nonfinite_warned: set[str] = set()
        super().__init__(params, defaults)

    def __getstate__(self):
        # torch.optim's pickling keeps only defaults, state and param_groups.
        return {**super().__getstate__(), "nonfinite_skips": self.nonfinite_skips,
                "_nonfinite_warned": self._nonfinite_warned}

    # -- construction ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict) -> None:
        validators = {**SHARED_HYPERPARAMETERS, **self.hyperparameters}
        for name, check in validators.items():
            if name in group:
                check(name, group[name])
        if "matrix" in group:
            choice(None, True, False)("matrix", group["matrix"])
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters: "
                                 f"{self._param_name(group, i)} is {p.dtype}")

    # -- naming and routing --------------------------------------------------------------------
    def _param_name(self, group: dict, index: int) -> str:
        names = group.get("param_names")
        if names:
            return names[index]
        p = group["params"][index]
        return f"param_groups[{self.param_groups.index(group)}]['params'][{index}] (shape {tuple(p.shape)})"

    @staticmethod
    def is_matrix(group: dict, p: Tensor) -> bool:
        """Whether ``p`` goes to the matrix rule (else to the AdamW fallback)."""
        flag = group.get("matrix")
        return p.ndim >= 2 if flag is None else bool(flag)

    # -- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            indices = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            if not indices:
                continue
            for i in indices:
                self._check_grad(group, i)
            indices = self._drop_nonfinite(group, indices)
            matrices, fallback = [], []
            for i in indices:
                p = group["params"][i]
                (matrices if self.is_matrix(group, p) else fallback).append(p)
            for bucket in self._buckets(matrices):
                self._step_bucket(group, bucket)
            if fallback:
                self._adamw_fallback(group, fallback)
        return loss

    def _check_grad(self, group: dict, i: int) -> None:
        p = group["params"][i]
        if p.grad.is_sparse:
            raise TypeError(f"{type(self).__name__} does not support sparse gradients: "
                            f"{self._param_name(group, i)}")
        if p.grad.is_complex():
            raise TypeError(f"{type(self).__name__} does not support complex gradients: "
                            f"{self._param_name(group, i)}")
        if p.grad.shape != p.shape:
            raise ValueError(f"Gradient of {self._param_name(group, i)} has shape "
                             f"{tuple(p.grad.shape)}, expected {tuple(p.shape)}")

    def _drop_nonfinite(self, group: dict, indices: list[int]) -> list[int]:
        """Indices whose gradients are all finite; applies the group's non-finite policy."""
        params = group["params"]
        # One device sync for the whole group rather than one per param.
        finite = torch.stack([params[i].grad.isfinite().all() for i in indices]).tolist()
        if all(finite):
            return indices
        bad = [i for i, ok in zip(indices, finite) if not ok]
        names = [self._param_name(group, i) for i in bad]
        if group["nonfinite"] == "raise":
            raise FloatingPointError(f"Non-finite gradient in {', '.join(names)}")
        self.nonfinite_skips += len(bad)
        new = [n for n in names if n not in self._nonfinite_warned]
        if new:
            self._nonfinite_warned.update(new)
            warnings.warn(f"Non-finite gradient in {', '.join(new)}: skipped this step, its "
                          "weights and state left unchanged (nonfinite='skip'; counted in "
                          "nonfinite_skips; warned once per param)", RuntimeWarning, stacklevel=3)
        return [i for i, ok in zip(indices, finite) if ok]

    @staticmethod
    def _buckets(params: list[Tensor]) -> list[list[Tensor]]:
        """Group params whose matrices share (m, n, dtype, device), in first-seen order."""
        buckets = defaultdict(list)
        for p in params:
            _, m, n = matrix_shape(p)
            buckets[(m, n, p.dtype, p.device)].append(p)
        return list(buckets.values())

    def _step_bucket(self, group: dict, params: list[Tensor]) -> None:
        weights = [as_matrices(p) for p in params]
        grads = [as_matrices(p.grad) for p in params]
        self._update_matrices(group, params, weights, grads)
        # as_matrices copies a param it cannot view (e.g. channels_last); write those back.
        for p, w in zip(params, weights):
            if w.data_ptr() != p.data_ptr():
                p.copy_(w.reshape(p.shape))

    def _matrix_map(self, fn: Callable, *lists: list[Tensor]):
        """Apply ``fn`` to whole matrices, batched: the one place matrix work happens.

        Each of ``lists`` holds one (B_i, ·, ·) tensor per param of the bucket; ``fn`` takes
        their concatenations along dim 0 (one stack per list) and returns a stack, or a tuple
        of stacks, with the same leading dim. The result comes back split per param (a list,
        or a tuple of lists). Rules route every computation that needs a whole matrix
        (orthogonalization, QR, projector refresh, DCT scores) through here, so the
        distributed layer can run it on owner ranks instead of everywhere.
        """
        sizes = [t.shape[0] for t in lists[0]]
        out = fn(*(torch.cat(ts) if len(ts) > 1 else ts[0] for ts in lists))
        if isinstance(out, tuple):
            return tuple(list(o.split(sizes)) for o in out)
        return list(out.split(sizes))

    def _update_matrices(self, group: dict, params: list[Tensor], weights: list[Tensor],
                         grads: list[Tensor]) -> None:
        """Apply the matrix rule to one bucket.

        ``params`` are the parameters (keys of ``self.state``); ``weights`` and ``grads``
        are their (B, m, n) views, all with the same m, n, dtype and device. Update
        ``weights`` in place.
        """
        raise NotImplementedError

    # -- AdamW fallback ------------------------------------------------------------------------
    def _adamw_fallback(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        states = [self.state[p] for p in params]
        for p, s in zip(params, states):
            if not s:
                s["step"] = 0
                s["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                s["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            s["step"] += 1
        # Low-precision params are updated through an fp32 copy; .float() of an fp32 tensor
        # is the tensor itself, so fp32 params are updated in place.
        work = [p.float() for p in params]
        grads = [p.grad.float() for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(work, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        for w, m, v, s in zip(work, exp_avgs, exp_avg_sqs, states):
            step = s["step"]
            denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            w.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)

    # -- state -----------------------------------------------------------------------------------
    def _matrix_state_shapes(self, p: Tensor, group: dict) -> dict[str, tuple]:
        """Shapes the matrix rule's state must have for ``p`` (checked on load)."""
        return {}

    def _state_shapes(self, p: Tensor, group: dict) -> dict[str, tuple]:
        if self.is_matrix(group, p):
            return self._matrix_state_shapes(p, group)
        return {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict; rejects state saved for other shapes, naming the parameter.

        Unlike torch.optim, state tensors keep the dtype they were saved with (fp32 moments
        and rotations of bf16 params stay fp32); they move to the param's device.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"State dict has {len(saved_groups)} param groups, this optimizer "
                             f"has {len(self.param_groups)}")
        pairs = []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"State dict's param group {gi} has {len(saved['params'])} "
                                 f"params, this optimizer's has {len(group['params'])}")
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                saved_state = state_dict["state"].get(pid, {})
                expected = self._state_shapes(p, group)
                for key, value in saved_state.items():
                    if not isinstance(value, Tensor):
                        continue
                    current = self.state[p].get(key) if p in self.state else None
                    want = expected.get(key, tuple(current.shape) if isinstance(current, Tensor) else None)
                    if want is not None and tuple(value.shape) != tuple(want):
                        raise ValueError(
                            f"State dict does not fit {self._param_name(group, i)}: state "
                            f"'{key}' has shape {tuple(value.shape)}, expected {tuple(want)}")
                pairs.append((p, saved_state))
        super().load_state_dict(state_dict)
        for p, saved_state in pairs:
            for key, value in saved_state.items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def _shared_state_tensors(self) -> list[Tensor]:
        """State shared by many params (e.g. a DCT basis); counted once by state_bytes."""
        return []

    def state_bytes(self) -> int:
        """Bytes of optimizer state held (each storage counted once)."""
        seen, total = set(), 0
        tensors = [v for s in self.state.values() for v in s.values() if isinstance(v, Tensor)]
        for t in tensors + self._shared_state_tensors():
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total
