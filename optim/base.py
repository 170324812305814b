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
- :meth:`state_bytes` for memory tables;
- distribution (:mod:`matrixopt.distributed`): FSDP2's DTensor params are updated through
  their local shards, with whole-matrix work (:meth:`_matrix_map`) on owner ranks; with
  ``distributed="replicated"`` (DDP) the ranks split the matrix work and share the results.
"""
import functools
import math
import warnings
from collections import defaultdict
from typing import Any, Callable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from .distributed import (MODES, MatrixWork, agree_finite, check_placement, dtensor_like, group_of,
                          local_tensor)

# -- hyperparameter validation -------------------------------------------------------------
# A validator takes (name, value) and raises ValueError naming the argument and its range.
Validator = Callable[[str, Any], None]


def real(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
         hi_open: bool = False) -> Validator:
    """A real number in [lo, hi] (open ends as asked; an infinite end is always open)."""
    lo_open, hi_open = lo_open or lo == -math.inf, hi_open or hi == math.inf
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


def compute_dtype(name, value):
    """None (the rule's default) or a floating dtype a rule runs its matrix products in."""
    choice(None, torch.float64, torch.float32, torch.bfloat16, torch.float16)(name, value)


def betas_in_unit_interval(name, value):
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"Invalid {name}: {value!r}; expected a pair (beta1, beta2)")
    for i, b in enumerate(value):
        real(0.0, 1.0, hi_open=True)(f"{name}[{i}]", b)


def rank_spec(name, value):
    """An int >= 1, or a fraction in (0, 1] of min(m, n)."""
    if isinstance(value, float):
        ok = 0.0 < value <= 1.0
    else:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= 1 or a fraction in (0, 1]")


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


def matmul_in(A: Tensor, B: Tensor, dtype: torch.dtype | None) -> Tensor:
    """A @ B with both operands in ``dtype`` (a rule's ``compute_dtype``; None: their
    promoted dtype)."""
    dtype = dtype or torch.promote_types(A.dtype, B.dtype)
    return A.to(dtype) @ B.to(dtype)


def stacked_call(fn: Callable, *lists: list[Tensor]):
    """``fn`` on the concatenations along dim 0 of ``lists`` (each one (B_i, ...) tensor per
    param), its stack (or tuple of stacks) split back per param."""
    sizes = [t.shape[0] for t in lists[0]]
    out = fn(*(torch.cat(ts) if len(ts) > 1 else ts[0] for ts in lists))
    if isinstance(out, tuple):
        return tuple(list(o.split(sizes)) for o in out)
    return list(out.split(sizes))


def decay_weights(weights, *, lr: float, weight_decay: float):
    """Decoupled weight decay W ← W·(1 - lr·weight_decay); no pass over the weights when the
    factor is 1 (as torch.optim.AdamW)."""
    if lr * weight_decay:
        torch._foreach_mul_(weights, 1 - lr * weight_decay)


def apply_update(weights, updates, *, lr: float, weight_decay: float, scale: float):
    """W ← W·(1 - lr·weight_decay) - lr·scale·U for each W and its update U (U may have
    another dtype than W: it is converted element by element, never copied whole)."""
    decay_weights(weights, lr=lr, weight_decay=weight_decay)
    torch._foreach_add_(weights, updates, alpha=-lr * scale)


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

    #: Elements of one bucket of same-shape matrices, at most: a step stacks (copies) a
    #: bucket a few times over, so this bounds its temporaries, while batching pays only for
    #: small matrices (on an H200 a 5-step NS of one 2048² matrix runs at the rate of 16
    #: stacked ones; 32 stacked 1024² ones run 7× faster than one by one): 2^25 elements
    #: batch 32 matrices of 1024², 8 of 2048².
    max_bucket_elements = 1 << 25

    hyperparameters: dict[str, Validator] = {}
    #: Whether the matrix rule follows the sharded-params convention of _update_matrices, so
    #: FSDP2 (DTensor) params may go to it; a rule that does not gets a clear error instead.
    supports_fsdp: bool = False

    def __init__(self, params, defaults: dict, *, distributed: str | None = None, process_group=None):
        choice(*MODES)("distributed", distributed)
        self.nonfinite_skips = 0
        self._nonfinite_warned: set[str] = set()
        # Replicated params (DDP): with distributed="replicated" or a process_group, matrix
        # work is split over process_group's ranks (None: the default group).
        self._replicated = distributed == "replicated" or process_group is not None
        self._process_group = process_group
        self._work = None   # the current bucket's MatrixWork while a distributed step runs
        self._loads = {}    # process group -> FLOPs of matrix work per rank, this step
        super().__init__(params, defaults)

    def __getstate__(self):
        # torch.optim's pickling keeps only defaults, state and param_groups.
        return {**super().__getstate__(), "nonfinite_skips": self.nonfinite_skips,
                "_nonfinite_warned": self._nonfinite_warned, "_replicated": self._replicated,
                "_process_group": self._process_group, "_work": None, "_loads": {}}

    # -- construction ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except (ValueError, TypeError, NotImplementedError):
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
            check_placement(p, self._param_name(group, i))
            if isinstance(p, DTensor) and self.is_matrix(group, p) and not self.supports_fsdp:
                raise NotImplementedError(
                    f"{type(self).__name__} does not support FSDP2-sharded (DTensor) matrix params "
                    f"yet: {self._param_name(group, i)}; use distributed='replicated' with DDP")

    # -- naming and routing --------------------------------------------------------------------
    def _param_name(self, group: dict, index: int) -> str:
        names = group.get("param_names")
        if names:
            return names[index]
        p = group["params"][index]
        return f"param_groups[{self._group_index(group)}]['params'][{index}] (shape {tuple(p.shape)})"

    def _group_index(self, group: dict) -> int:
        """``group``'s index in param_groups (len(param_groups) if it is not there yet)."""
        # By identity: list.index would compare the groups' dicts, and with them their tensors.
        return next((gi for gi, other in enumerate(self.param_groups) if other is group), len(self.param_groups))

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
        self._loads = {}
        # Check every group before updating any, so that an error leaves all params untouched.
        work = []
        for group in self.param_groups:
            indices = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            for i in indices:
                self._check_grad(group, i)
            if indices:
                work.append((group, indices))
        for group, indices in work:
            indices[:] = self._drop_nonfinite(group, indices)
        for group, indices in work:
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
        # One device sync for the whole group rather than one per param (a group may span
        # devices, so the flags meet on the first param's), and one fused reduction rather
        # than isfinite's four ops per tensor: Σ|g| in fp32 (or fp64) is NaN or inf exactly when
        # g holds a NaN or inf, or sums past 3e38 (where Adam's g² has overflowed long before).
        grads = [local_tensor(params[i].grad) for i in indices]
        dtype = functools.reduce(torch.promote_types, {g.dtype for g in grads}, torch.float32)
        sums = torch._foreach_norm(grads, 1, dtype=dtype)
        finite = torch.stack([s.to(grads[0].device) for s in sums]).isfinite()
        process_group = group_of([params[i] for i in indices], self._replicated_group())
        if process_group is not None:  # every rank must skip the same params
            finite = agree_finite(finite, process_group)
        finite = finite.tolist()
        if all(finite):
            return indices
        bad = [i for i, ok in zip(indices, finite) if not ok]
        names = [self._param_name(group, i) for i in bad]
        if group["nonfinite"] == "raise":
            raise FloatingPointError(f"Non-finite gradient in {', '.join(names)}")
        self.nonfinite_skips += len(bad)
        self._warn_once(self._nonfinite_warned, names,
                        "Non-finite gradient in {}: skipped this step, its weights and state left "
                        "unchanged (nonfinite='skip'; counted in nonfinite_skips; warned once per param)",
                        depth=1)
        return [i for i, ok in zip(indices, finite) if ok]

    @staticmethod
    def _warn_once(seen: set[str], names: list[str], message: str, depth: int) -> None:
        """One RuntimeWarning ``message`` (``{}``: the names) for the ``names`` not yet in
        ``seen``, which records them. ``depth``: frames from the caller of this up to step()
        (1 when step() calls it), so the warning points at the caller of step() (past
        torch.optim's two wrappers of step)."""
        new = [n for n in names if n not in seen]
        if new:
            seen.update(new)
            warnings.warn(message.format(", ".join(new)), RuntimeWarning, stacklevel=depth + 5)

    def _buckets(self, params: list[Tensor]) -> list[list[Tensor]]:
        """Group params whose matrices share (m, n, dtype, device, device mesh), in first-seen order.

        A bucket holds at most ``max_bucket_elements`` elements (a single larger param makes
        a bucket of its own).
        """
        buckets = defaultdict(list)
        for p in params:
            _, m, n = matrix_shape(p)
            buckets[(m, n, p.dtype, p.device, getattr(p, "device_mesh", None))].append(p)
        chunks = []
        for bucket in buckets.values():
            chunk, size = [], 0
            for p in bucket:
                if chunk and size + p.numel() > self.max_bucket_elements:
                    chunks.append(chunk)
                    chunk, size = [], 0
                chunk.append(p)
                size += p.numel()
            chunks.append(chunk)
        return chunks

    def _replicated_group(self):
        """The process group replicated params split their matrix work over, or None."""
        if not self._replicated:
            return None
        if not torch.distributed.is_initialized():
            raise RuntimeError(f"{type(self).__name__}(distributed='replicated') needs an "
                               "initialized process group (torch.distributed.init_process_group)")
        return self._process_group or torch.distributed.group.WORLD

    def _step_bucket(self, group: dict, params: list[Tensor]) -> None:
        # Sharded (DTensor) params are updated through their local shards.
        shards = [local_tensor(p) for p in params]
        weights = [as_matrices(t) for t in shards]
        grads = [as_matrices(local_tensor(p.grad)) for p in params]
        process_group = group_of(params, self._replicated_group())
        if process_group is not None:
            load = self._loads.setdefault(process_group, [0] * torch.distributed.get_world_size(process_group))
            self._work = MatrixWork(params, [matrix_shape(p) for p in params], process_group, load)
        try:
            self._update_matrices(group, params, weights, grads)
        finally:
            self._work = None
        # as_matrices copies a param it cannot view (e.g. channels_last); write those back.
        for t, w in zip(shards, weights):
            if w.data_ptr() != t.data_ptr():
                t.copy_(w.reshape(t.shape))

    def _matrix_map(self, fn: Callable, *lists: list[Tensor], whole_inputs: tuple[int, ...] = (),
                    whole_outputs: tuple[int, ...] = ()):
        """Apply ``fn`` to whole matrices, batched: the one place matrix work happens.

        Each of ``lists`` holds one (B_i, ·, ·) tensor per param of the bucket; ``fn`` takes
        their concatenations along dim 0 (one stack per list) and returns a stack, or a tuple
        of stacks, with the same leading dim. The result comes back split per param (a list,
        or a tuple of lists). Rules route every computation that needs a whole matrix
        (orthogonalization, QR, projector refresh, DCT scores) through here, so the
        distributed layer can run it on owner ranks instead of everywhere.

        Under FSDP2 the inputs are by default pieces of the param's (B, m, n) view, sharded
        like the param, and so are the outputs. ``whole_inputs`` / ``whole_outputs`` list the
        indices of those that are per-matrix values of another shape (a rotation, a projector,
        indices), kept whole on every rank (see :mod:`matrixopt.distributed`).
        """
        if self._work is not None:
            return self._work.map(fn, lists, whole_inputs, whole_outputs)
        return stacked_call(fn, *lists)

    def _update_matrices(self, group: dict, params: list[Tensor], weights: list[Tensor],
                         grads: list[Tensor]) -> None:
        """Apply the matrix rule to one bucket.

        ``params`` are the parameters (keys of ``self.state``); ``weights`` and ``grads``
        are their (B, m, n) views, all with the same m, n, dtype and device. Update
        ``weights`` in place.

        Under FSDP2, ``params`` are DTensors and ``weights``/``grads`` views of the local
        shards: take m, n from ``matrix_shape(params[0])``, create state shaped like the
        param from ``local_tensor(p)``, and do whole-matrix work through :meth:`_matrix_map`.
        """
        raise NotImplementedError

    # -- AdamW fallback ------------------------------------------------------------------------
    def _adamw_fallback(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        states = [self.state[p] for p in params]
        shards = [local_tensor(p) for p in params]   # element-wise: sharded params stay local
        for t, s in zip(shards, states):
            if not s:
                s["step"] = 0
                s["exp_avg"] = torch.zeros_like(t, dtype=torch.float32)
                s["exp_avg_sq"] = torch.zeros_like(t, dtype=torch.float32)
            s["step"] += 1
        # Low-precision params are updated through an fp32 copy; .float() of an fp32 tensor
        # is the tensor itself, so fp32 params are updated in place.
        work = [t.float() for t in shards]
        grads = [local_tensor(p.grad).float() for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        decay_weights(work, lr=lr, weight_decay=wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [math.sqrt(1 - beta2 ** s["step"]) for s in states])
        torch._foreach_add_(denominators, eps)
        torch._foreach_addcdiv_(work, exp_avgs, denominators, [-lr / (1 - beta1 ** s["step"]) for s in states])
        for t, w in zip(shards, work):
            if w is not t:
                t.copy_(w)

    # -- state -----------------------------------------------------------------------------------
    def _matrix_state_shapes(self, p: Tensor, group: dict) -> dict[str, tuple]:
        """Shapes the matrix rule's state must have for ``p`` (checked on load)."""
        return {}

    def _state_shapes(self, p: Tensor, group: dict) -> dict[str, tuple]:
        if self.is_matrix(group, p):
            return self._matrix_state_shapes(p, group)
        return {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}

    def _sharded_state_shapes(self, p: Tensor, group: dict) -> dict[str, tuple]:
        """Global shapes of the state that FSDP2 shards like ``p`` (on dim 0): by default the
        state declared with p's shape; a rule adds state that has p's dim 0 but other trailing
        dims (low-rank moments with p's rows), and leaves out whole per-matrix state that can
        have p's shape by coincidence (ARO's (E, k, k) rotations of an (E, k, k) stack)."""
        return {k: shape for k, shape in self._state_shapes(p, group).items() if tuple(shape) == tuple(p.shape)}

    def state_dict(self) -> dict:
        """torch.optim's state dict; for a DTensor (FSDP2) param, the state sharded like the
        param (:meth:`_sharded_state_shapes`) is a DTensor placed like it, so
        ``torch.distributed.checkpoint`` saves its shards.
        """
        state_dict = super().state_dict()
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                if pid not in state_dict["state"] or not isinstance(p, DTensor):
                    continue
                sharded = self._sharded_state_shapes(p, group)
                state_dict["state"][pid] = {k: dtensor_like(p, v, sharded[k]) if k in sharded else v
                                            for k, v in state_dict["state"][pid].items()}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict; rejects state saved for other shapes, naming the parameter.

        Unlike torch.optim, state tensors keep the dtype they were saved with (fp32 moments
        and rotations of bf16 params stay fp32); they move to the param's device. DTensor
        state (from :meth:`state_dict` of a sharded run) is stored as its local shard.
        The shape check sees the state dict as the load_state_dict pre-hooks return it, and
        the post-hooks see (and may edit) the state as loaded, saved dtypes included.
        """
        loaded = []

        def check_shapes(optimizer, state_dict):
            loaded.extend(self._check_state_shapes(state_dict))

        def keep_saved_dtypes(optimizer):
            for p, saved_state in loaded:
                for key, value in saved_state.items():
                    if isinstance(value, Tensor):
                        self.state[p][key] = local_tensor(value).to(device=p.device, copy=True)

        # Registered now: the check runs after every other pre-hook, the dtypes are restored
        # before every other post-hook.
        handles = (self.register_load_state_dict_pre_hook(check_shapes),
                   self.register_load_state_dict_post_hook(keep_saved_dtypes, prepend=True))
        try:
            super().load_state_dict(state_dict)
        finally:
            for handle in handles:
                handle.remove()

    def _check_state_shapes(self, state_dict: dict) -> list[tuple[Tensor, dict]]:
        """(param, its saved state) pairs; ValueError naming the param if a shape differs, or
        naming the hyperparameter if a saved group's is invalid."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"State dict has {len(saved_groups)} param groups, this optimizer "
                             f"has {len(self.param_groups)}")
        pairs = []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"State dict's param group {gi} has {len(saved['params'])} "
                                 f"params, this optimizer's has {len(group['params'])}")
            self._validate_group({**saved, "params": group["params"]})
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
        return pairs

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
