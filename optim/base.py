"""MatrixOptimizer: the stateful shell every matrixopt optimizer shares.

A rule is two things (see ARCHITECTURE.md):

- its **state declaration**, :meth:`MatrixOptimizer._state`: name → :class:`State` (global
  shape, dtype policy, sharded like the param or whole per matrix, initial value);
- its **update**, :meth:`MatrixOptimizer._update`: one bucket of same-shape matrices, with
  the state already created from the declaration, calling the rule's functional form (a
  plain function over lists of tensors, like torch's ``adamw()``) and doing every
  whole-matrix computation through the ``matrix_map`` it is handed.

This shell does everything around a rule:

- param groups of tensors, (name, tensor) pairs or dicts, with every hyperparameter
  overridable per group and validated up front (``ValueError`` naming the argument);
- routing: a param goes to the matrix rule when its group says ``matrix=True``, or when the
  key is absent and ``p.ndim >= 2``; else to the fallback (:mod:`matrixopt.fallback`, AdamW
  unless the optimizer is given another);
- matrix views: 2-D (m, n) as is; 3-D (E, m, n) as E independent matrices (stacked MoE
  experts); N-D with N ≥ 4 as conv kernels (out, in·k₁·k₂…); 1-D with ``matrix=True`` as a
  single row (1, n);
- batching: a rule receives all params of a group whose matrices share (m, n, dtype,
  device), so it can stack them and orthogonalize / project them in one launch;
- the non-finite policy: a param whose gradient holds NaN/Inf is not touched (weights and
  state stay bit-identical), ``nonfinite_skips`` counts it and one warning names it; with
  ``nonfinite="raise"`` a ``FloatingPointError`` names it before anything is updated;
- state from the declarations: created on a param's first step, checked on load (shapes,
  naming the param), cast on load to the declared dtype, placed for
  ``torch.distributed.checkpoint`` (sharded state as DTensors like the param), counted by
  :meth:`state_bytes`;
- distribution (:mod:`matrixopt.distributed`): FSDP2's DTensor params are updated through
  their local shards, with whole-matrix work on owner ranks; with
  ``distributed="replicated"`` (DDP) the ranks split the matrix work and share the results.
"""
import functools
import math
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import MutableMapping
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

# Out, Rows, Whole: the matrix-map argument types rules import from here.
from .distributed import (MODES, MatrixWork, Out, Rows, Whole, agree_finite, check_placement,  # noqa: F401
                          dtensor_like, shard_sizes)
from .precision import PRECISIONS, SCALE_SUFFIX, stored, working, write_back
from .validation import betas_in_unit_interval, choice, real

# -- matrix views ----------------------------------------------------------------------------

def matrix_shape(t: Tensor, blocks: int | None = None) -> tuple[int, int, int]:
    """(B, m, n): how ``t`` is seen as a batch of B matrices of m×n (see module docstring);
    with ``blocks`` = k, each matrix's rows split into k equal blocks, each its own matrix
    (packed q/k/v or gate/up weights, LSTM gates)."""
    if t.ndim == 0:
        return 1, 1, 1
    if t.ndim == 1:
        return 1, 1, t.shape[0]
    if t.ndim == 2:
        B, m, n = 1, t.shape[0], t.shape[1]
    elif t.ndim == 3:
        B, m, n = t.shape
    else:
        return 1, t.shape[0], math.prod(t.shape[1:])
    k = blocks or 1
    return B * k, m // k, n


def sharded_axis(t: Tensor) -> int:
    """The axis of ``t``'s (B, m, n) view that holds t's dim 0, the one FSDP2 splits."""
    return {1: 2, 3: 0}.get(t.ndim, 1)


def as_matrices(t: Tensor, blocks: int | None = None) -> Tensor:
    """``t`` viewed (or, if not viewable, copied) as (B, m, n) (see :func:`matrix_shape`)."""
    return t.reshape(matrix_shape(t, blocks))


def block_sizes(name: str, value, p: Tensor) -> list[int] | None:
    """A group's ``blocks`` for ``p`` as row sizes (None: not split); ValueError naming the
    param unless they split the rows of a 2-D or 3-D, non-DTensor matrix (unequal sizes: of a
    2-D one)."""
    if value is None:
        return None
    sizes = value
    if isinstance(value, int) and not isinstance(value, bool):
        sizes = [p.shape[-2] // value] * value if p.ndim in (2, 3) and value >= 1 else [0]
    ok = (isinstance(sizes, (list, tuple)) and sizes and p.ndim in (2, 3) and not isinstance(p, DTensor)
          and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
          and sum(sizes) == p.shape[-2] and (len(set(sizes)) == 1 or p.ndim == 2))
    if not ok:
        raise ValueError(f"Invalid blocks for {name}: {value!r}; expected a count k or row sizes splitting "
                         f"the rows of a 2-D (unequal sizes) or 3-D (equal ones), non-DTensor param of "
                         f"shape {tuple(p.shape)}")
    return list(sizes)


class BlockState(MutableMapping):
    """Block ``b``'s view of a param's state dict, whose entries for it are named ``<key>.<b>``
    (params split into blocks of unequal sizes keep a state per block)."""

    def __init__(self, state: dict, b: int):
        self._state, self._suffix = state, f".{b}"

    def __getitem__(self, key):
        return self._state[key + self._suffix]

    def __setitem__(self, key, value):
        self._state[key + self._suffix] = value

    def __delitem__(self, key):
        del self._state[key + self._suffix]

    def __iter__(self):
        return (k[:-len(self._suffix)] for k in list(self._state) if k.endswith(self._suffix))

    def __len__(self):
        return sum(1 for _ in self)


class RowState(MutableMapping):
    """Rows ``rows`` (a slice of dim 0) of a param's state dict, for an element-wise update
    of those rows alone (``declared``: the state as stored). An entry declared sharded (dim 0
    the param's) is read as the view of its rows and written into them; every other entry is
    a counter (a Python int), read from a copy taken at construction — the state as it was
    before the step — so that every row chunk advances it from the same value, and stored
    back by :meth:`commit`."""

    def __init__(self, state: dict, declared: dict, rows: slice):
        self._state, self.rows = state, rows
        self._rows = {key for key, spec in declared.items() if spec.sharded and spec.shape}
        self._counters = {key: value for key, value in state.items() if key not in self._rows}

    @staticmethod
    def splits(declared: dict) -> bool:
        """Whether a state so declared can be viewed by rows: every entry sharded or a counter."""
        return all(spec.shape is None or (spec.sharded and spec.shape) for spec in declared.values())

    def __getitem__(self, key):
        return self._state[key][self.rows] if key in self._rows else self._counters[key]

    def __setitem__(self, key, value):
        if key in self._rows:
            self._state[key][self.rows] = value
        else:
            self._counters[key] = value

    def __delitem__(self, key):
        raise TypeError("a fallback does not delete its declared state")

    def __iter__(self):
        return iter(self._state)

    def __len__(self):
        return len(self._state)

    def commit(self) -> None:
        self._state.update(self._counters)


def local(t: Tensor) -> Tensor:
    """The rank's shard of a DTensor; a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def rows_of(t: Tensor, rows: slice | None) -> Tensor:
    """Rows ``rows`` of t (None: all of t)."""
    return t if rows is None else t[rows]


def local_matrices(p: Tensor, values: Tensor) -> Tensor:
    """The entries of per-matrix values ``values`` (B, ...) (kept whole on every rank) for the
    matrices this rank holds rows of: a sharded 3-D param's own experts, else all B."""
    if not isinstance(p, DTensor) or sharded_axis(p) != 0:
        return values
    sizes = shard_sizes(p.shape[0], p.device_mesh.size())
    rank = p.device_mesh.get_local_rank()
    return values.narrow(0, sum(sizes[:rank]), sizes[rank])


def group_of(params, replicated_group):
    """The process group the matrix work of ``params`` spans (a DTensor's mesh, else the
    replicated group), or None (single process)."""
    for p in params:
        if isinstance(p, DTensor):
            return p.device_mesh.get_group()
    return replicated_group


def resolve_rank(rank: int | float, m: int, n: int) -> int:
    """``rank`` as an int (a float is a fraction of min(m, n)), capped at min(m, n)."""
    k = min(m, n)
    r = max(1, round(rank * k)) if isinstance(rank, float) else rank
    return min(r, k)


# -- shared mechanics of the rules -------------------------------------------------------------

def matmul_in(A: Tensor, B: Tensor, dtype: torch.dtype | None) -> Tensor:
    """A @ B with both operands in ``dtype`` (a rule's ``compute_dtype``; None: their
    promoted dtype)."""
    dtype = dtype or torch.promote_types(A.dtype, B.dtype)
    return A.to(dtype) @ B.to(dtype)


def stacked_call(fn: Callable, *lists: list[Tensor]) -> tuple[list[Tensor], ...]:
    """``fn`` on the concatenations along dim 0 of ``lists`` (each one (B_i, ...) tensor per
    param); each of its outputs (one stack or a tuple of stacks) split back per param."""
    sizes = [t.shape[0] for t in lists[0]]
    out = fn(*(torch.cat(ts) if len(ts) > 1 else ts[0] for ts in lists))
    return tuple(list(o.split(sizes)) for o in (out if isinstance(out, tuple) else (out,)))


def local_map(fn: Callable, inputs, outputs, entries=None) -> tuple[list[Tensor], ...]:
    """The single-process ``matrix_map``: ``fn`` once on the stacks of ``inputs`` (whichever
    of the bucket's ``entries`` they hold)."""
    return stacked_call(fn, *(inp.tensors for inp in inputs))


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


#: The update RMS of lr_scaling="match_adamw" (Muon, ROOT, ARO): at AdamW's tuned lr these
#: rules then match or beat AdamW. Not AdamW's own update RMS (0.21-0.26 in our runs, the 0.2
#: of Moonshot's rule): AdamW's tuned lr is set by its step's spectral norm, 4-6x that of an
#: orthogonalized step of the same RMS, so at that lr an RMS of 0.2 moves every direction too
#: little. Measured on `train --quick` at widths 64 and 128 and 200 and 600 steps: the worst
#: loss vs AdamW at AdamW's lr was 1.042 at 0.2, 1.000 at 0.3, 0.945 at 0.5, 0.994 at 0.8
#: (benchmarks/results/lr-study/summary-2026-12-01.md; `python -m benchmarks update_rms`).
MATCH_ADAMW_RMS = 0.5


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """Matrix products' operand dtype when a rule is not told: bf16 on GPUs (tensor cores),
    fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# -- declared state --------------------------------------------------------------------------

#: State dtype policies besides a fixed dtype: the param's own, or at least fp32 (fp64 for
#: fp64 params).
PARAM_DTYPE, AT_LEAST_FP32 = "param", "at_least_fp32"


class State(NamedTuple):
    """One entry of a param's optimizer state, as a rule declares it.

    ``shape``: the global shape as stored (``None``: a Python int counter, e.g. Adam's step).
    ``dtype``: a torch dtype, :data:`PARAM_DTYPE` or :data:`AT_LEAST_FP32`.
    ``sharded``: element-wise state split like the param on dim 0 under FSDP2 (its dim 0 is
    the param's); else whole per matrix, identical on every rank.
    ``init``: ``init(shape, dtype, device)`` gives the initial value (None: zeros).
    ``role``: what the state is, for ``state_precision`` (:mod:`matrixopt.precision`):
    ``"moment"`` (a signed moment: a momentum, Adam's M), ``"second_moment"`` (a
    non-negative one: Adam's V), ``"basis"`` (a projection basis); None (default): kept in
    ``dtype`` at every precision.
    """
    shape: tuple | None
    dtype: torch.dtype | str = PARAM_DTYPE
    sharded: bool = False
    init: Callable | None = None
    role: str | None = None

    def dtype_for(self, p: Tensor) -> torch.dtype:
        if self.dtype == PARAM_DTYPE:
            return p.dtype
        if self.dtype == AT_LEAST_FP32:
            return torch.promote_types(p.dtype, torch.float32)
        return self.dtype

    def create(self, p: Tensor):
        """The initial value for param ``p`` (its local rows, for sharded state)."""
        if self.shape is None:
            return 0
        shard = local(p)
        shape = (shard.shape[0], *self.shape[1:]) if self.sharded and self.shape else tuple(self.shape)
        dtype = self.dtype_for(p)
        if self.init is None:
            return torch.zeros(shape, dtype=dtype, device=shard.device)
        return self.init(shape, dtype, shard.device)


def precision_of(group: dict) -> str:
    """A group's ``state_precision`` (groups of checkpoints older than it have none: fp32)."""
    return group.get("state_precision", "fp32")


def counter() -> State:
    """A step counter (a Python int, starting at 0)."""
    return State(None)


class Bucket(NamedTuple):
    """What a rule's :meth:`~MatrixOptimizer._update` gets: one bucket of same-shape matrices.

    ``params``: the parameters (keys of the optimizer's state; DTensors under FSDP2).
    ``weights``, ``grads``: their (B_i, m, n) views (of the local shards), to update in place.
    ``states``: their state dicts, created from the rule's declaration.
    ``shape``: the whole matrices' (m, n). ``sharded``: whether the params are FSDP2 DTensors.
    ``matrix_map``: runs whole-matrix work (see :meth:`MatrixOptimizer._update`).
    ``blocks``: per entry, None (all of the param's matrices) or b (block b of a param split
    into blocks of unequal sizes; then ``params`` repeats the param and ``states`` is the
    block's).
    ``stack``: whether the bucket's matrices are small enough to be stacked with others
    (:attr:`MatrixOptimizer.unbatched_elements`); a larger one has a bucket of its own.
    ``prepared``: per entry, what the rule's :meth:`~MatrixOptimizer._prepare` computed before
    the non-finite check (None: nothing).
    """
    params: list
    weights: list
    grads: list
    states: list | None
    shape: tuple
    sharded: bool
    matrix_map: Callable
    blocks: list
    stack: bool = True
    prepared: list | None = None


# -- warnings --------------------------------------------------------------------------------

_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__],
                                                                                       torch))


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside matrixopt and
    torch (whose wrappers — no_grad, the step hooks, GradScaler — call ``step``): the
    user's call of ``step()``, however many frames lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


# -- the optimizer shell ---------------------------------------------------------------------

SHARED_HYPERPARAMETERS = {
    "lr": real(0.0),
    "weight_decay": real(0.0),
    "betas": betas_in_unit_interval,
    "eps": real(0.0, lo_open=True),
    "nonfinite": choice("skip", "raise"),
    "state_precision": choice(*PRECISIONS),
}


class MatrixOptimizer(torch.optim.Optimizer):
    """Base class: a matrix rule for matrices, a fallback (AdamW) for the rest.

    A subclass sets ``hyperparameters`` (name → validator, beyond the shared lr,
    weight_decay, betas, eps, nonfinite), declares its state in :meth:`_state` and
    implements :meth:`_update`. ``fallback`` (default :class:`matrixopt.fallback.AdamW`) is
    the rule for params that are not matrices: any object with ``hyperparameters`` (name →
    validator), ``state(p, group)`` (name → :class:`State`) and ``update(group, weights,
    grads, states)`` (the params' local shards, their gradients and their state).
    """

    #: Elements of one bucket of same-shape matrices, at most: a step stacks (copies) a
    #: bucket a few times over, so this bounds its temporaries, while batching pays only for
    #: small matrices (on an H200 a 5-step NS of one 2048² matrix runs at the rate of 16
    #: stacked ones; 32 stacked 1024² ones run 7× faster than one by one): 2^25 elements
    #: batch 32 matrices of 1024², 8 of 2048².
    max_bucket_elements = 1 << 25
    #: Per device type, the matrix size (elements) from which a matrix gets a bucket of its
    #: own: stacking copies every matrix of a bucket, which pays only while the batched
    #: kernel saves more than the copy costs (and a bucket's element-wise temporaries — the
    #: Nesterov inputs, the updates — live together: one matrix's, alone). On a CPU (one
    #: thread, 8 same-shape matrices, the batching table of `python -m benchmarks step
    #: --quick`, benchmarks/results/step-cpu2-2026-12-01.md) one Muon matrix per bucket takes
    #: 1.1-1.6× the stacked time up to 128×512, about the same at 256² and 512² (0.95-0.96×),
    #: and less at 512×1376 (0.88×). On a GPU batching pays for Newton-Schulz up to 2048²
    #: (32 stacked 1024² ones run 7× faster than one by one on an H200): no CUDA entry.
    unbatched_elements = {"cpu": 1 << 18}
    #: At a lower ``state_precision``, the most elements the fallback updates in one call
    #: (:meth:`_step_fallback`), so the fp32 working copies of their moments take a few MB
    #: where a whole head's (8192×768) took 50 MB.
    fallback_chunk_elements = 1 << 20

    hyperparameters: dict = {}

    def __init__(self, params, defaults: dict, *, fallback=None, distributed: str | None = None,
                 process_group=None, state_precision: str = "fp32"):
        choice(*MODES)("distributed", distributed)
        choice(*PRECISIONS)("state_precision", state_precision)
        if state_precision != "fp32":   # groups without the key are fp32: their state dicts stay as they were
            defaults = {"state_precision": state_precision, **defaults}
        if fallback is None:
            from .fallback import AdamW   # the default; it builds on this module, hence imported here

            fallback = AdamW()
        self.fallback = fallback
        self.nonfinite_skips = 0
        self._nonfinite_warned: set[str] = set()
        # Replicated params (DDP): with distributed="replicated" or a process_group, matrix
        # work is split over process_group's ranks (None: the default group).
        self._replicated = distributed == "replicated" or process_group is not None
        self._process_group = process_group
        super().__init__(params, defaults)

    def __getstate__(self):
        # Everything but torch.optim's hook registries, which __setstate__ recreates.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    # -- construction ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except (ValueError, TypeError, NotImplementedError):
            self.param_groups.pop()
            raise

    def _validators(self) -> dict:
        """Every hyperparameter this optimizer takes (the shared ones, the fallback's and the
        rule's) → its validator."""
        return {**SHARED_HYPERPARAMETERS, **self.fallback.hyperparameters, **self.hyperparameters}

    def _validate_group(self, group: dict) -> None:
        for name, check in self._validators().items():
            if name in group:
                check(name, group[name])
        if "matrix" in group:
            choice(None, True, False)("matrix", group["matrix"])
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters: "
                                 f"{self._param_name(group, i)} is {p.dtype}")
            check_placement(p, self._param_name(group, i))
            if group.get("blocks") is not None and self.is_matrix(group, p):
                block_sizes(self._param_name(group, i), group["blocks"], p)

    # -- naming and routing --------------------------------------------------------------------
    def _param_name(self, group: dict, index: int) -> str:
        names = group.get("param_names")
        if names:
            return names[index]
        p = group["params"][index]
        return f"param_groups[{self._group_index(group)}]['params'][{index}] (shape {tuple(p.shape)})"

    @staticmethod
    def _places(group: dict, params: list[Tensor]) -> list[int]:
        """The params' indices in ``group``."""
        index = {id(q): i for i, q in enumerate(group["params"])}
        return [index[id(p)] for p in params]

    def _group_index(self, group: dict) -> int:
        """``group``'s index in param_groups (len(param_groups) if it is not there yet)."""
        # By identity: list.index would compare the groups' dicts, and with them their tensors.
        return next((gi for gi, other in enumerate(self.param_groups) if other is group), len(self.param_groups))

    @staticmethod
    def is_matrix(group: dict, p: Tensor) -> bool:
        """Whether ``p`` goes to the matrix rule (else to the fallback)."""
        flag = group.get("matrix")
        return p.ndim >= 2 if flag is None else bool(flag)

    # -- what a rule gives ---------------------------------------------------------------------
    def _state(self, p: Tensor, group: dict) -> dict[str, State]:
        """The matrix rule's state of ``p``: name → :class:`State`."""
        raise NotImplementedError

    def _update(self, group: dict, bucket: Bucket) -> None:
        """Apply the matrix rule to one :class:`Bucket` of same-shape matrices (same m, n,
        dtype and device): update ``bucket.weights`` in place and the state in
        ``bucket.states``.

        ``bucket.matrix_map(fn, inputs, outputs, entries=None)`` runs ``fn`` on whole
        matrices, batched: every computation that needs a whole matrix (orthogonalization,
        QR, refreshes) goes through it. ``inputs`` are :class:`Rows` (per param, pieces of
        its matrix view) and :class:`Whole` (per-matrix values kept whole on every rank),
        one per bucket entry, or one per entry of ``entries`` (indices into the bucket, in
        order) when the work is for some of them; ``fn`` takes one stack per input and
        returns one stack per ``outputs`` entry (:class:`Out`: the per-matrix shape, dtype
        and layout). It returns a tuple with one per-param list per output. Single-process it
        is :func:`local_map`; distributed, the owner ranks compute
        (:mod:`matrixopt.distributed`).
        """
        raise NotImplementedError

    @staticmethod
    def _block_sizes(group: dict, p: Tensor) -> list[int] | None:
        blocks = group.get("blocks")
        return None if blocks is None else block_sizes("blocks", blocks, p)

    def _blocks(self, group: dict, p: Tensor) -> int | None:
        """How many equal row blocks ``group`` splits p's matrices into (None: not split, or
        into blocks of unequal sizes, which are matrices of their own: :meth:`_unequal`)."""
        sizes = self._block_sizes(group, p)
        return len(sizes) if sizes and len(set(sizes)) == 1 else None

    def _unequal(self, group: dict, p: Tensor) -> list[int] | None:
        """The row sizes of p's blocks when they differ (None otherwise)."""
        sizes = self._block_sizes(group, p)
        return sizes if sizes and len(set(sizes)) > 1 else None

    def _shape(self, group: dict, p: Tensor) -> tuple[int, int, int]:
        """p's (B, m, n) matrix view in ``group`` (its equal ``blocks`` applied)."""
        return matrix_shape(p, self._blocks(group, p))

    def _declared(self, p: Tensor, group: dict) -> dict[str, State]:
        """p's state as stored: the rule's (or the fallback's) declaration at the group's
        ``state_precision`` (:func:`matrixopt.precision.stored`)."""
        return stored(self._rule_state(p, group), precision_of(group), counter())

    def _rule_state(self, p: Tensor, group: dict) -> dict[str, State]:
        """p's state as the rule (or the fallback) declares it and sees it in its update."""
        if not self.is_matrix(group, p):
            return self.fallback.state(p, group)
        sizes = self._unequal(group, p)
        if sizes is None:
            return self._state(p, group)
        # One matrix per block, its state named "<key>.<b>" (whole: blocked params are not sharded).
        plain = {**group, "blocks": None}
        return {f"{key}.{b}": spec._replace(sharded=False)
                for b, rows in enumerate(sizes) for key, spec in self._state(p.detach()[:rows], plain).items()}

    # -- the step ------------------------------------------------------------------------------
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        ``lr`` may be a float or a one-element Tensor (read as ``float(lr)`` each step, so
        a scheduler may change it in place). Every check that can fail (gradients' layout
        and shape, non-finite gradients with ``nonfinite="raise"``) runs before any param or
        state changes. Params with no elements are left alone (nothing to update).

        The step declines ``torch.compile`` (``torch.compiler.disable``): it runs eagerly
        inside a compiled region, with eager's results, rather than being traced per
        bucket and shape and recompiled every step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_params([(group, range(len(group["params"]))) for group in self.param_groups])
        return loss

    def _step_params(self, selection: list[tuple[dict, range | list[int]]]) -> None:
        """The step of the params ``selection`` names, as (group, indices in its params)
        pairs: those with a gradient and elements go the whole way of :meth:`step` (checks,
        non-finite policy, buckets, state, the rules) and no other param is touched.
        :meth:`step` passes every param; :func:`matrixopt.step_in_backward` one whose
        gradient is final."""
        loads = {}   # process group -> FLOPs of matrix work per rank, this step
        # Check every group before updating any, so that an error leaves all params untouched.
        work = []
        for group, candidates in selection:
            indices = [i for i in candidates if group["params"][i].grad is not None and group["params"][i].numel()]
            if indices and isinstance(group["lr"], Tensor) and group["lr"].numel() != 1:  # set after construction
                raise ValueError("Invalid lr: a Tensor lr must have one element")
            for i in indices:
                self._check_grad(group, i)
            if indices:
                work.append((group, indices))
        # Two passes: first every bucket's _prepare (the rule's work on the gradients that changes
        # nothing) and the non-finite check on what it read, then the updates.
        plans = [self._plan(group, indices, loads) for group, indices in work]
        verdicts = [self._finite(group, indices, checked) for (group, indices), (_, _, checked) in zip(work, plans)]
        for (group, indices), (buckets, fallback, _), finite in zip(work, plans, verdicts):
            if not all(finite.values()):
                kept = {id(group["params"][i]) for i in indices if finite[i]}
                buckets = [self._keep(group, bucket, kept, loads) for bucket in buckets]
                fallback = [i for i in fallback if finite[i]]
            for bucket in buckets:
                if bucket is not None:
                    self._step_bucket(group, bucket)
            if fallback:
                self._step_fallback(group, [group["params"][i] for i in fallback])

    def _plan(self, group: dict, indices: list[int], loads: dict):
        """A group's buckets of matrices (prepared where every param has state), its fallback
        params' indices and, per param index, the tensors its non-finite check reads."""
        matrices, fallback = [], []
        for i in indices:
            p = group["params"][i]
            if self.is_matrix(group, p):
                matrices.append(p)
            else:
                fallback.append(i)
        checked = {i: [local(group["params"][i].grad)] for i in fallback}
        buckets = []
        for items in self._buckets(group, matrices):
            bucket = self._bucket(group, items, loads)
            tensors = bucket.grads
            # State is created only once the check has passed (an error leaves none behind).
            if all(self.state.get(p) for p in bucket.params):
                # Working views dequantize an entry only when read (_prepare reads bases, not
                # moments) and are dropped here: _step_bucket makes the update's own.
                views = self._item_states(group, items, self._working(group, bucket.params))
                tensors, prepared = self._prepare(group, bucket._replace(states=views))
                bucket = bucket._replace(prepared=prepared)
            for i, t in zip(self._places(group, bucket.params), tensors):
                checked.setdefault(i, []).append(t)
            buckets.append(bucket)
        return buckets, fallback, checked

    def _prepare(self, group: dict, bucket: Bucket) -> tuple[list[Tensor], list | None]:
        """The rule's first pass over a bucket, before the non-finite check: per entry the
        tensor the check reads (it must hold a NaN/Inf exactly when the gradient does), and
        per entry what the rule computed to get it, passed on as ``bucket.prepared`` (None:
        nothing). It must change no param and no state. The default checks the gradients
        themselves; a low-rank rule checks the projected gradient it computes anyway
        (:class:`~matrixopt.lowrank.LowRankAdamW`), a fraction of the reads."""
        return bucket.grads, None

    def _step_fallback(self, group: dict, params: list[Tensor]) -> None:
        """The fallback's update of ``params``: in one call at fp32; at a lower
        ``state_precision`` in chunks of at most ``fallback_chunk_elements`` elements, so the
        fp32 working copies of their state stay that size: whole params together, and a
        larger param, if the fallback is ``elementwise``, in chunks of its rows (each call
        sees those rows of its weights, gradient and sharded state, and its counters as they
        were before the step). The update is element-wise, the int8 blocks lie inside rows
        and the bf16 rounding is seeded per element: the chunks change nothing else."""
        states = self._states(group, params)
        if precision_of(group) == "fp32":
            calls = [list(zip(params, states))]
        else:
            calls = self._fallback_chunks(group, params, states)
        for pieces in calls:
            chunk = [p for p, _ in pieces]
            views = self._working(group, chunk, [s for _, s in pieces])
            rows = [s.rows if isinstance(s, RowState) else None for _, s in pieces]
            self.fallback.update(group, [rows_of(local(p), r) for p, r in zip(chunk, rows)],
                                 [rows_of(local(p.grad), r) for p, r in zip(chunk, rows)], views)
            self._write_back(group, chunk, views, [0 if r is None else r.start for r in rows])
            for _, s in pieces:
                if isinstance(s, RowState):
                    s.commit()

    def _fallback_chunks(self, group: dict, params: list[Tensor], states: list[dict]) -> list[list[tuple]]:
        """:meth:`_step_fallback`'s calls at a lower precision: lists of (param, state) of at
        most ``fallback_chunk_elements`` elements in all, and for each larger param whose rows
        the fallback may update alone, one call per chunk of its rows, (param,
        :class:`RowState`). Row states are made before any call, so each copies the
        counters as they were before the step."""
        limit, elementwise = self.fallback_chunk_elements, getattr(self.fallback, "elementwise", False)
        calls, size = [[]], 0
        for p, state in zip(params, states):
            shard = local(p)
            declared = self._declared(p, group)
            if shard.numel() > limit and shard.dim() and elementwise and RowState.splits(declared):
                # Chunks of a multiple of 64 entries: the fused kernels' vector loops split a
                # tensor into 64-byte units, so chunk edges fall where the whole tensor's do
                # (rows of an odd length: chunks of 64 rows, beyond the limit if they are long).
                row = math.prod(shard.shape[1:])
                unit = 64 // math.gcd(row, 64)
                step = max(unit, limit // row // unit * unit)
                calls += [[(p, RowState(state, declared, slice(r, r + step)))]
                          for r in range(0, shard.shape[0], step)]
                calls.append([])
                size = 0
                continue
            if calls[-1] and size + shard.numel() > limit:
                calls.append([])
                size = 0
            calls[-1].append((p, state))
            size += shard.numel()
        return [pieces for pieces in calls if pieces]

    def _states(self, group: dict, params: list[Tensor]) -> list[dict]:
        """The params' state, created from the declarations on a param's first step."""
        states = []
        for p in params:
            state = self.state[p]
            if not state:
                state.update({key: spec.create(p) for key, spec in self._declared(p, group).items()})
            states.append(state)
        return states

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

    def _finite(self, group: dict, indices: list[int], checked: dict[int, list[Tensor]]) -> dict[int, bool]:
        """Whether each param's checked tensors (:meth:`_plan`) are all finite; applies the
        group's non-finite policy to those that are not."""
        params = group["params"]
        # One device sync for the whole group rather than one per param (a group may span
        # devices, so the flags meet on the first param's), and one fused reduction rather
        # than isfinite's four ops per tensor: Σt in fp32 (or fp64) is NaN or inf exactly when
        # t holds a NaN or inf (+inf and -inf sum to NaN), or sums past 3e38. (A plain sum
        # reduces 3.6× faster than Σ|t| on a CPU; not the 2-norm, as fast: Σt² overflows from
        # |t| ~ 1e19, and a scale-invariant rule (ARO, Muon) steps on 1e30 fine.)
        owners = [i for i in indices for _ in checked[i]]
        tensors = [t for i in indices for t in checked[i]]
        dtype = functools.reduce(torch.promote_types, {t.dtype for t in tensors}, torch.float32)
        device = tensors[0].device
        flags = torch.stack([t.sum(dtype=dtype).to(device) for t in tensors]).isfinite()
        process_group = group_of([params[i] for i in indices], self._replicated_group())
        if process_group is not None:  # every rank must skip the same params
            flags = agree_finite(flags, process_group)
        finite = dict.fromkeys(indices, True)
        for i, ok in zip(owners, flags.tolist()):
            finite[i] = finite[i] and ok
        bad = [i for i in indices if not finite[i]]
        if not bad:
            return finite
        names = [self._param_name(group, i) for i in bad]
        if group["nonfinite"] == "raise":
            raise FloatingPointError(f"Non-finite gradient in {', '.join(names)}")
        self.nonfinite_skips += len(bad)
        self._warn_once(self._nonfinite_warned, names,
                        "Non-finite gradient in {}: skipped this step, its weights and state left "
                        "unchanged (nonfinite='skip'; counted in nonfinite_skips; warned once per param)")
        return finite

    @staticmethod
    def _warn_once(seen: set[str], names: list[str], message: str) -> None:
        """One RuntimeWarning ``message`` (``{}``: the names) for the ``names`` not yet in
        ``seen``, which records them; it points at the caller of ``step()``."""
        new = [n for n in names if n not in seen]
        if new:
            seen.update(new)
            warnings.warn(message.format(", ".join(new)), RuntimeWarning, stacklevel=caller_stacklevel())

    def _buckets(self, group: dict, params: list[Tensor]) -> list[list[tuple[Tensor, int | None]]]:
        """Group the matrices of ``params`` that share (m, n, dtype, device, device mesh), in
        first-seen order, as items (param, block): block None for all of a param's matrices,
        b for block b of a param split into blocks of unequal sizes.

        A bucket holds at most ``max_bucket_elements`` elements (a single larger item makes
        a bucket of its own).
        """
        buckets = defaultdict(list)
        for p in params:
            key = (p.dtype, p.device, getattr(p, "device_mesh", None))
            sizes = self._unequal(group, p)
            if sizes is None:
                _, m, n = self._shape(group, p)
                buckets[(m, n, *key)].append(((p, None), p.numel()))
            else:
                for b, rows in enumerate(sizes):
                    buckets[(rows, p.shape[1], *key)].append(((p, b), rows * p.shape[1]))
        chunks = []
        for key, bucket in buckets.items():
            alone = not self._stacks(key[0], key[1], key[3])
            chunk, size = [], 0
            for item, numel in bucket:
                if chunk and (alone or size + numel > self.max_bucket_elements):
                    chunks.append(chunk)
                    chunk, size = [], 0
                chunk.append(item)
                size += numel
            chunks.append(chunk)
        return chunks

    def _views(self, group: dict, items: list, tensors: list[Tensor]) -> tuple[list[Tensor], list[tuple]]:
        """Each item's (B, m, n) matrix view of the corresponding tensor (a param's local
        shard or its gradient), and the items' whole (B, m, n) shapes."""
        views, shapes = [], []
        for (p, b), t in zip(items, tensors):
            if b is None:
                k = self._blocks(group, p)
                views.append(as_matrices(t, k))
                shapes.append(matrix_shape(p, k))
            else:
                sizes = self._unequal(group, p)
                start = sum(sizes[:b])
                views.append(t[start:start + sizes[b]].unsqueeze(0))
                shapes.append((1, sizes[b], p.shape[1]))
        return views, shapes

    def _item_states(self, group: dict, items: list, states: list | None = None) -> list:
        """Each item's state (``states``, one per item, or else its param's stored state), or
        a block's view of it (:class:`BlockState`)."""
        states = states or self._states(group, [p for p, _ in items])
        return [s if b is None else BlockState(s, b) for s, (_, b) in zip(states, items)]

    def _working(self, group: dict, params: list[Tensor], states: list | None = None) -> list:
        """The params' state (``states``, else their stored state) as their rule sees it: at
        fp32 the state itself; at a lower ``state_precision`` a
        :class:`~matrixopt.precision.Working` view with fp32 temporaries of what is stored in
        fewer bits (one per param, however often it repeats)."""
        states = states or self._states(group, params)
        precision = precision_of(group)
        if precision == "fp32":
            return states
        views = {}
        return [views.setdefault(id(p), working(s, self._rule_state(p, group), precision, local(p)))
                for p, s in zip(params, states)]

    def _write_back(self, group: dict, params: list[Tensor], states: list, first_rows: list[int] | None = None) -> None:
        """Store the temporaries of :meth:`_working`'s views (nothing to do at fp32); the
        stochastic rounding is seeded by each param's place (group, index) in the optimizer
        and offset by the global index of the view's first entry (``first_rows``: per param,
        the local row a view of rows starts at; a shard's rows start at its rank's)."""
        precision = precision_of(group)
        if precision == "fp32":
            return
        g, done = self._group_index(group), set()
        for p, place, view, row in zip(params, self._places(group, params), states, first_rows or [0] * len(params)):
            if id(p) in done:
                continue
            done.add(id(p))
            if isinstance(p, DTensor):
                row += sum(shard_sizes(p.shape[0], p.device_mesh.size())[:p.device_mesh.get_local_rank()])
            offsets = {key: row * math.prod(spec.shape[1:]) for key, spec in view.declared.items()
                       if row and spec.sharded and spec.shape}
            write_back(view, precision, (g, place), offsets)

    def _replicated_group(self):
        """The process group replicated params split their matrix work over, or None."""
        if not self._replicated:
            return None
        if not torch.distributed.is_initialized():
            raise RuntimeError(f"{type(self).__name__}(distributed='replicated') needs an "
                               "initialized process group (torch.distributed.init_process_group)")
        return self._process_group or torch.distributed.group.WORLD

    def _bucket(self, group: dict, items: list, loads: dict) -> Bucket:
        """The :class:`Bucket` of ``items``, without its states (:meth:`_item_states` adds them)."""
        # Sharded (DTensor) params are updated through their local shards.
        params = [p for p, _ in items]
        weights, shapes = self._views(group, items, [local(p) for p in params])
        grads, _ = self._views(group, items, [local(p.grad) for p in params])
        _, m, n = shapes[0]
        return Bucket(params, weights, grads, None, (m, n), isinstance(params[0], DTensor),
                      self._matrix_map(params, shapes, loads), [b for _, b in items],
                      self._stacks(m, n, weights[0].device))

    def _stacks(self, m: int, n: int, device: torch.device) -> bool:
        """Whether m×n matrices share stacks on ``device``; from ``unbatched_elements`` on,
        batching does not pay there and a matrix runs alone."""
        return m * n < self.unbatched_elements.get(device.type, 1 << 62)

    def _keep(self, group: dict, bucket: Bucket, kept: set[int], loads: dict) -> Bucket | None:
        """``bucket`` with only the params in ``kept`` (ids of those whose check passed; None
        if none is left)."""
        keep = [j for j, p in enumerate(bucket.params) if id(p) in kept]
        if len(keep) == len(bucket.params):
            return bucket
        if not keep:
            return None
        items = [(bucket.params[j], bucket.blocks[j]) for j in keep]
        prepared = bucket.prepared and [bucket.prepared[j] for j in keep]
        return self._bucket(group, items, loads)._replace(prepared=prepared)

    def _step_bucket(self, group: dict, bucket: Bucket) -> None:
        items = list(zip(bucket.params, bucket.blocks))
        states = self._working(group, bucket.params)
        bucket = bucket._replace(states=self._item_states(group, items, states))
        self._update(group, bucket)
        self._write_back(group, bucket.params, states)
        # as_matrices copies a param it cannot view (e.g. channels_last); write those back.
        for (p, b), w in zip(items, bucket.weights):
            t = local(p)
            if b is None and w.data_ptr() != t.data_ptr():
                t.copy_(w.reshape(t.shape))

    def _matrix_map(self, params: list[Tensor], shapes: list[tuple[int, int, int]], loads: dict) -> Callable:
        """The ``matrix_map`` of a bucket (see :meth:`_update`): :func:`local_map` in a
        single process, else the bucket's owner split (:class:`~matrixopt.distributed.MatrixWork`)."""
        process_group = group_of(params, self._replicated_group())
        if process_group is None:
            return local_map
        sharded = isinstance(params[0], DTensor)
        _, m, n = shapes[0]
        load = loads.setdefault(process_group, [0] * torch.distributed.get_world_size(process_group))

        def work(entries) -> MatrixWork:
            return MatrixWork([shapes[i][0] for i in entries],
                              [sharded_axis(params[i]) if sharded else None for i in entries],
                              [(params[i].shape[0], local(params[i]).shape[0]) for i in entries],
                              m * n * min(m, n), process_group, load)

        whole = work(range(len(params)))

        def matrix_map(fn, inputs, outputs, entries=None):
            # A subset (params whose refresh is due while others' is not, after a skipped
            # step) gets an owner split of its own, the same on every rank.
            if entries is None or list(entries) == list(range(len(params))):
                return whole.map(fn, inputs, outputs)
            return work(entries).map(fn, inputs, outputs)

        return matrix_map

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim's state dict; for a DTensor (FSDP2) param, the state declared sharded
        is a DTensor placed like the param, so ``torch.distributed.checkpoint`` saves its
        shards."""
        state_dict = super().state_dict()
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                if pid not in state_dict["state"] or not isinstance(p, DTensor):
                    continue
                declared = self._declared(p, group)
                state_dict["state"][pid] = {
                    k: dtensor_like(p, v, declared[k].shape) if k in declared and declared[k].sharded else v
                    for k, v in state_dict["state"][pid].items()}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict; rejects state saved for other shapes, naming the parameter.

        Each state tensor gets its declared dtype (:meth:`_state`; the fallback's moments
        are fp32, low-rank moments and rotations at least fp32, whatever the param's dtype)
        and the param's device, whatever it was saved with, so a checkpoint resumes on
        params of another dtype or device. DTensor state (from :meth:`state_dict` of a
        sharded run) is stored as its local shard. The shape check sees the state dict as
        the load_state_dict pre-hooks return it, and the post-hooks see (and may edit) the
        state as loaded. A param's saved state must hold every declared entry; a
        hyperparameter a saved group lacks (one added after it was saved) takes this
        optimizer's default.
        """
        loaded = []

        def check_shapes(optimizer, state_dict):
            loaded.extend(self._check_state_shapes(state_dict))

        def declared_dtypes(optimizer):
            # A hyperparameter of this optimizer the checkpoint predates takes its default
            # (not state_precision: a group saved without it is fp32, as its state).
            for group in self.param_groups:
                for key in self._validators().keys() & self.defaults.keys() - {"state_precision"}:
                    group.setdefault(key, self.defaults[key])
            # From the saved values, not torch.optim's copies cast to the param's dtype.
            for p, declared, saved_state in loaded:
                for key, value in saved_state.items():
                    if isinstance(value, Tensor):
                        dtype = declared[key].dtype_for(p) if key in declared else value.dtype
                        self.state[p][key] = local(value).to(device=local(p).device, dtype=dtype, copy=True)

        # Registered now: the check runs after every other pre-hook, the dtypes are set
        # before every other post-hook.
        handles = (self.register_load_state_dict_pre_hook(check_shapes),
                   self.register_load_state_dict_post_hook(declared_dtypes, prepend=True))
        try:
            super().load_state_dict(state_dict)
        finally:
            for handle in handles:
                handle.remove()

    def _check_state_shapes(self, state_dict: dict) -> list[tuple[Tensor, dict, dict]]:
        """(param, its declared state, its saved state) triples; ValueError naming the param
        if a saved state lacks a declared entry (int8 codes: their scales) or a tensor's
        shape differs from the declared one (int8 codes: or their dtype), or naming the
        hyperparameter if a saved group's is invalid. The declarations are at the saved
        group's ``state_precision``, which the load restores (as every saved hyperparameter)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"State dict has {len(saved_groups)} param groups, this optimizer "
                             f"has {len(self.param_groups)}")
        triples = []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"State dict's param group {gi} has {len(saved['params'])} "
                                 f"params, this optimizer's has {len(group['params'])}")
            self._validate_group({**saved, "params": group["params"]})
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                saved_state = state_dict["state"].get(pid, {})
                precision = precision_of(saved)
                declared = self._declared(p, {**group, "state_precision": precision})
                name = self._param_name(group, i)
                missing = sorted(set(declared) - set(saved_state)) if saved_state else []
                if missing:   # state is created whole: a checkpoint of an older rule, say
                    raise ValueError(f"State dict does not fit {name}: state {missing} missing "
                                     f"(state_precision={precision!r})")
                for key, value in saved_state.items():
                    if key not in declared:
                        raise ValueError(f"State dict does not fit {name}: state '{key}' is not one of "
                                         f"{sorted(declared)} (state_precision={precision!r})")
                    want = declared[key].shape
                    if isinstance(value, Tensor) and tuple(value.shape) != tuple(want or ()):
                        raise ValueError(
                            f"State dict does not fit {name}: state "
                            f"'{key}' has shape {tuple(value.shape)}, expected {tuple(want or ())}")
                    if key + SCALE_SUFFIX in declared:   # int8 codes
                        if not isinstance(value, Tensor) or value.dtype != declared[key].dtype:
                            raise ValueError(f"State dict does not fit {name}: state '{key}' is "
                                             f"{getattr(value, 'dtype', type(value).__name__)}, expected "
                                             f"{declared[key].dtype} codes (state_precision={precision!r})")
                triples.append((p, declared, saved_state))
        return triples

    def _shared_state_tensors(self) -> list[Tensor]:
        """State shared by many params (e.g. a DCT basis); counted once by state_bytes."""
        return []

    def state_bytes(self) -> int:
        """Bytes of optimizer state held on this rank (each storage counted once)."""
        seen, total = set(), 0
        tensors = [v for s in self.state.values() for v in s.values() if isinstance(v, Tensor)]
        for t in tensors + self._shared_state_tensors():
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total
