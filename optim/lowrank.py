r"""LowRankAdamW: Adam in a low-rank subspace of each gradient, given by a projector.

Per matrix W (m×n) with gradient G at step t (from 0):

.. math::
    L = \mathrm{project}(G), \quad M \leftarrow \beta_1 M + (1-\beta_1) L, \quad
    V \leftarrow \beta_2 V + (1-\beta_2) L^2, \\
    W \leftarrow W (1 - \eta\lambda) - \eta\, s\,
        \frac{\sqrt{1-\beta_2^{t+1}}}{1-\beta_1^{t+1}}\,
        \mathrm{project\_back}\Big(\frac{M}{\sqrt{V} + \epsilon}\Big)

with the subspace picked anew from G every ``update_proj_gap`` steps. The projector
(:mod:`matrixopt.projectors`: SVD for GaLoreAdamW, DCT columns for DCTAdamW) is the only
thing that differs between the rules; this class is the whole rule, and GaLoreAdamW and
DCTAdamW are configurations of it.

Passes over memory of a step between refreshes (a bandwidth model; G, W: m×n, L, M, V and the
step S: the low-rank gradient's size ℓ = r·max(m, n) for a one-sided projection, a fraction
r/min(m, n) of G's), for a matrix in a bucket of its own (``unbatched_elements``) and fp32 or
fp64 weights:

======================  ===============================================================
G                       1 read: the projection L = project(G), one matmul
L                       1 write (the matmul), 2 reads (the non-finite check ΣL, Adam)
M, V                    1 read and 1 write each: torch's fused Adam kernel (lowrank_adam)
S                       1 write (zeros) + 1 read and write (Adam), 1 read (the back-projection)
W                       1 read and 1 write: W ← (1 − ηλ)W − η·s·project_back(S) is one matmul
                        accumulating into W (``add_back``); decay costs no pass of its own
bases                   read by the two matmuls (m·r or n·r)
======================  ===============================================================

so the full-size traffic is one read of G and one read and write of W, as plain SGD's.
Stacked (small) matrices are copied into a stack once more each way, and their update is
added through a (B, m, n) temporary; a refresh step also reads G for the new bases.
"""
import functools
import math
from typing import Callable

import torch
from torch import Tensor

from matrixopt.kernels import host

from .batching import LOWRANK
from .matrices import local_matrices, matrix_shape, whole_projections
from .ops import Out, Rows, Whole, apply_update, stacked_call
from .optimizer import MatrixOptimizer
from .plan import Bucket, param_blocks
from .precision import MOMENT, SECOND_MOMENT
from .projectors import REFRESHED, SVD_FAILED, ZERO_GRADIENT, stored_shape, work_dtype
from .protocols import Projector
from .report import warn_once
from .seeding import bucket_seeds
from .state import AT_LEAST_FP32, State, counter
from .validation import compute_dtype, integer, rank_spec, real
from .weights import DEFAULT_MASTER_WEIGHTS


def lowrank_adam(exp_avgs, exp_avg_sqs, lows, steps, betas, eps) -> list[torch.Tensor]:
    r"""Adam on low-rank gradients as galore-torch does it, over lists of tensors.

    Updates the moments M, V in place and returns the steps to project back,

    .. math::
        M \leftarrow \beta_1 M + (1-\beta_1) L, \quad V \leftarrow \beta_2 V + (1-\beta_2) L^2, \quad
        S = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \frac{M}{\sqrt{V} + \epsilon}

    (ε on the uncorrected √V; ``steps``: each t, already incremented). One pass over L, M, V
    and S: torch's fused Adam kernel, whose ε sits on the corrected √V̂ = √V/√(1-β₂ᵗ), run
    with ε/√(1-β₂ᵗ) (the same S, up to rounding) and lr -1 on S = 0. The kernel takes dense
    tensors: a strided L (DCT's left side) is made contiguous first.
    """
    beta1, beta2 = betas
    out = [torch.zeros(m.shape, dtype=m.dtype, device=m.device) for m in exp_avgs]
    for t in sorted(set(steps)):
        which = [i for i, s in enumerate(steps) if s == t]
        step = torch.full((), float(t), device=exp_avgs[which[0]].device)
        torch._fused_adam_([out[i] for i in which], [lows[i].contiguous() for i in which], [exp_avgs[i] for i in which],
                           [exp_avg_sqs[i] for i in which], [], [step] * len(which), lr=-1.0, beta1=beta1,
                           beta2=beta2, weight_decay=0.0, eps=eps / math.sqrt(1 - beta2 ** t), amsgrad=False,
                           maximize=False)
    return out


def as_stacks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Low-rank state (stored (·, ·), or (B, ·, ·) for a 3-D param) as (B, ·, ·) views."""
    return [t.view(-1, *t.shape[-2:]) for t in tensors]


def bases_of(proj: Projector, state) -> dict:
    """A param's bases per key, as (B, ...) stacks (a 2-D param may store them without B)."""
    return {key: state[key].view(-1, *shape) for key, shape in proj.basis_dims.items()}


def projected(fn: Callable, proj: Projector, tensors: list, bucket: Bucket, which, back: bool = False) -> list:
    """``fn(X, *bases)`` — a projection, or with ``back`` its back-projection — for the tensor
    in ``tensors`` of each of the bucket's entries ``which``.

    A right projection G·V (and L·Vᵀ back) maps each block of G's rows to the same rows of the
    result, so under FSDP2 each rank projects its own shards: one batched call for the
    bucket, unless FSDP2 left the params' shards with different row counts. A left one UᵀG
    sums over G's rows, so the owner of the whole matrix computes it, through ``matrix_map``.
    """
    per_param = [bases_of(proj, bucket.states[i]) for i in which]
    bases = [[b[key] for b in per_param] for key in proj.keys]
    if proj.whole_low():
        if back:   # rows of the param, in the matmuls' dtype
            out = Out((proj.m, proj.n), proj.dtype or tensors[0].dtype)
        else:      # whole low-rank values, in the state's dtype (the bases')
            out = Out(proj.low_dims, work_dtype(tensors[0].dtype), whole=True)
        (result,) = bucket.matrix_map(fn, [(Whole if back else Rows)(tensors), *map(Whole, bases)], [out],
                                      entries=which)
        return result
    if bucket.sharded:   # a sharded expert stack's rows: this rank's experts' bases
        params = [bucket.params[i] for i in which]
        bases = [[local_matrices(p, b) for p, b in zip(params, key_bases)] for key_bases in bases]
        if len({x.shape[1:] for x in tensors}) > 1:
            return [fn(x, *b) for x, *b in zip(tensors, *bases)]
    (result,) = stacked_call(fn, tensors, *bases)
    return result


def project_into(lows: list, which: list[int], proj: Projector, bucket: Bucket) -> None:
    """lows[i] ← project(G_i) for the bucket's entries ``which``, as one batch."""
    if which:
        for i, low in zip(which, projected(proj.project, proj, [bucket.grads[i] for i in which], bucket, which)):
            lows[i] = low


def back_projections(proj: Projector, steps: list, bucket: Bucket) -> list:
    """The full-size back-projections project_back(S) of the bucket's low-rank steps S."""
    return projected(proj.project_back, proj, steps, bucket, range(len(bucket.params)), back=True)


def _refresh_stack(proj: Projector, warm: bool, G, *stacks):
    """``proj.refresh`` as a function of stacks: G, the previous bases (``proj.keys``
    order), and the sketch seeds last if the projector is randomized."""
    if proj.randomized:
        *stacks, seeds = stacks
        return proj.refresh(G, *stacks, seeds=seeds, warm=warm)
    return proj.refresh(G, *stacks, warm=warm)


def refresh_bases(proj: Projector, bucket: Bucket, due: list[int], *, seeds: list | None, carry: bool) -> tuple[list, list]:
    """New bases for the bucket's entries ``due`` from their gradients, as one batch, copied
    into their state (``seeds``: per entry, for a randomized projector); with ``carry`` the
    moments are carried into them (``proj.transition``, ``proj.carry``). Returns the
    low-rank gradients where the projector's refresh gives them (else Nones) and, per entry,
    the (B,) status of its matrices."""
    grads = [bucket.grads[i] for i in due]
    states = [bucket.states[i] for i in due]
    old = [bases_of(proj, s) for s in states]
    inputs = [Rows(grads), *(Whole([o[key] for o in old]) for key in proj.keys)]
    if proj.randomized:
        inputs.append(Whole(seeds))
    # A cold start at a param's first refresh: its identity-slice basis is no estimate.
    warm = all(s["step"] > 0 for s in states)
    outputs = proj.refresh_outputs(work_dtype(grads[0].dtype))
    results = bucket.matrix_map(functools.partial(_refresh_stack, proj, warm), inputs, outputs, entries=due)
    bases, status = results[:len(proj.keys)], results[len(proj.keys)]
    lows = results[-1] if proj.refresh_gives_low else [None] * len(due)
    for i, (j, s) in enumerate(zip(due, states)):
        new = dict(zip(proj.keys, (b[i] for b in bases)))
        if carry and s["step"] > 0:
            transition = proj.transition(old[i], new)
            if not proj.whole_low():   # the moments are this rank's rows: its experts' entries
                transition = {k: local_matrices(bucket.params[j], t) for k, t in transition.items()}
            M, V = as_stacks([s["exp_avg"], s["exp_avg_sq"]])
            new_M, new_V = proj.carry(M, V, transition)
            M.copy_(new_M)
            V.copy_(new_V)
        # In place, so each param keeps its own storage (not a view of the batch).
        for key, basis in new.items():
            old[i][key].copy_(basis)
    return lows, status


def adds_back(proj: Projector, bucket: Bucket) -> bool:
    """Whether each back-projected step can be added into its weight in place
    (``proj.add_back``): the matrix has a bucket of its own, the matmuls multiply in the
    weights' dtype, and the back-projection is local (a single process, or a right
    projection, whose rows are the weight's)."""
    if bucket.stack or (proj.dtype or bucket.states[0]["exp_avg"].dtype) != bucket.weights[0].dtype:
        return False
    return not proj.whole_low() or not bucket.distributed


def apply_lowrank(proj: Projector, bucket: Bucket, steps: list, *, lr: float, weight_decay: float, scale: float,
                  add_back: bool) -> None:
    """W ← W(1 − ηλ) − η·s·project_back(S) for the bucket's weights and low-rank steps S; with
    ``add_back`` (:func:`adds_back`) each weight by one matmul into it: no (B, m, n)
    temporary, no extra pass over the weights."""
    if add_back:
        for p, w, step, state in zip(bucket.params, bucket.weights, steps, bucket.states):
            bases = bases_of(proj, state)
            bases = [bases[key] if not bucket.sharded else local_matrices(p, bases[key]) for key in proj.keys]
            proj.add_back(w, step, *bases, alpha=-lr * scale, beta=1 - lr * weight_decay)
        return
    apply_update(bucket.weights, back_projections(proj, steps, bucket), lr=lr, weight_decay=weight_decay, scale=scale)


def _scale(name, value):
    """None (√(min(m, n)/r), see :class:`LowRankAdamW`) or a number ≥ 0."""
    if value is not None:
        real(0.0)(name, value)


class LowRankAdamW(MatrixOptimizer):
    """Adam on each matrix's gradient projected to a rank-r subspace (see the module
    docstring), the projector given by ``make_projector(m, n, **settings)``, ``settings``
    being the group's values of ``projector_keys`` (one projector per shape and settings,
    made once).

    Params that are not matrices (see :class:`~matrixopt.MatrixOptimizer`) get the
    fallback, AdamW with ``betas`` and ``eps`` and the group's lr and weight decay.

    Args (GaLoreAdamW and DCTAdamW document their defaults):
        params: tensors, (name, tensor) pairs or param-group dicts (every argument can be
            overridden per group; ``matrix=True/False`` forces the routing).
        make_projector: ``(m, n, **settings) -> projector`` (see :mod:`matrixopt.projectors`).
        projector_keys: the group keys the projector depends on.
        lr, betas, eps, weight_decay: Adam's (ε on the uncorrected √V, as galore-torch).
        rank: r, an int or a fraction of min(m, n); capped at min(m, n).
        update_proj_gap: steps between refreshes of the subspace (at steps 0, T, 2T, …).
        scale: s, the factor on the projected-back step; None: √(min(m, n)/r) per matrix,
            which gives the projected-back step the RMS of the low-rank Adam step (an
            orthonormal back-projection keeps its Frobenius norm but spreads it over m·n
            entries instead of r·max(m, n)), so AdamW's lr carries over. galore-torch's
            convention is a constant 0.25.
        carry_moments: the group key (if any) that, when true, carries the moments into
            the new subspace on refresh (``projector.carry``); else they are reused as
            they are, as galore-torch does.
        proj_dtype: dtype of the projection matmuls' operands (G with the subspace's basis,
            the step with it); None keeps the state's fp32. ``torch.bfloat16`` runs them
            on a GPU's tensor cores with fp32 accumulation, at ~2e-3 relative error of the
            projected gradient against ~1.5e-7 for fp32 (``python -m
            benchmarks.projection``), far below the noise of a stochastic gradient; moments
            and bases stay fp32. TF32 is not offered: it is a process-wide torch setting.
        seed: seed of a randomized refresh (see :func:`~matrixopt.seeding.sketch_seeds`).
        nonfinite: "skip" or "raise" on NaN/Inf gradients.

    State per matrix param: ``step``, the moments ``exp_avg``/``exp_avg_sq`` (the low-rank
    gradient's shape, at least fp32; sharded like the param for a right projection, whole
    for a left one, see :meth:`~matrixopt.protocols.Projector.whole_low`) and the projector's bases (whole).
    ``state_precision`` ("fp32" default, "bf16", "int8"; every subclass takes it) stores the
    moments and the fallback's in bf16 or int8 codes, and the SVD bases in bf16 at both
    (:mod:`matrixopt.precision`); the math runs in fp32 either way. ``master_weights`` (every
    subclass takes it) stores bf16 params from fp32 working copies (:mod:`matrixopt.weights`).
    """

    hyperparameters = {"rank": rank_spec, "update_proj_gap": integer(1), "scale": _scale,
                       "proj_dtype": compute_dtype, "seed": integer(0)}
    #: A stacked bucket copies its gradients and back-projected steps into stacks (full size),
    #: and every bucket holds its low-rank gradients and steps; these optimizers exist to save
    #: memory, so a bucket is about one large matrix (2^22 elements: one 2048², or 64 of 256²),
    #: where batching stops paying on a GPU anyway.
    max_bucket_elements = 1 << 22
    #: Stack or not: measured for the projection and its back-projection into the weight
    #: (``add_back``, when a matrix runs alone), see :func:`matrixopt.batching.stack_limit`.
    stack_work = LOWRANK

    def __init__(self, params, make_projector: Callable, projector_keys: tuple[str, ...], *, lr, betas, eps,
                 weight_decay, rank, update_proj_gap, scale, proj_dtype, nonfinite, carry_moments: str | None = None,
                 fallback=None, distributed=None, process_group=None, state_precision="fp32",
                 master_weights=DEFAULT_MASTER_WEIGHTS, **rule):
        self._make_projector, self._projector_keys, self._projectors = make_projector, projector_keys, {}
        self._carry_key = carry_moments
        self._refresh_warned: dict[int, set[str]] = {ZERO_GRADIENT: set(), SVD_FAILED: set()}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj_dtype=proj_dtype,
                        nonfinite=nonfinite, **rule)
        super().__init__(params, defaults, fallback=fallback, distributed=distributed,
                         process_group=process_group, state_precision=state_precision, master_weights=master_weights)

    def _projector(self, group, m: int, n: int, whole: bool = False) -> Projector:
        """The projector of m×n matrices of ``group``; ``whole``: of a param whose pieces need
        every projection whole per matrix (:func:`~matrixopt.matrices.whole_projections`,
        ``Projector.whole_low``)."""
        settings = tuple(group[k] for k in self._projector_keys)
        key = (m, n, settings, whole)
        if key not in self._projectors:
            proj = self._make_projector(m, n, **dict(zip(self._projector_keys, settings)))
            proj.whole_projections = whole   # set before it is seen (lanes share the dict)
            self._projectors[key] = proj
        return self._projectors[key]

    def _bucket_projector(self, group, bucket) -> Projector:
        return self._projector(group, *bucket.shape, bucket.whole_projections)

    def _state(self, p, group):
        B, m, n = self._shape(group, p)
        proj = self._projector(group, m, n, whole_projections(p, B // matrix_shape(p)[0]))   # B // that: its blocks
        batched = p.ndim == 3 or param_blocks(group, p)[0] is not None
        low = stored_shape(proj.low_shape(B), batched)
        moment = State(low, AT_LEAST_FP32, sharded=not proj.whole_low(), role=MOMENT)
        return {"step": counter(), "exp_avg": moment, "exp_avg_sq": moment._replace(role=SECOND_MOMENT),
                **proj.basis(B, batched)}

    def _prepare(self, group, bucket):
        """The low-rank gradients L of the params not due for a refresh, projected before the
        non-finite check so that it reads L rather than G: a NaN or Inf in G reaches every
        column (or row) of L, and L is r/min(m, n) of G's size. A param due for a refresh
        is checked on G, which the refresh reads anyway. The prepared L of every low-rank
        bucket are held until the check has passed: the size of one moment in all."""
        lows = [None] * len(bucket.params)
        project_into(lows, [i for i, s in enumerate(bucket.states) if s["step"] % group["update_proj_gap"]],
                     self._bucket_projector(group, bucket), bucket)
        return [g if low is None else low for g, low in zip(bucket.grads, lows)], lows

    def _update(self, group, bucket):
        proj = self._bucket_projector(group, bucket)
        states = bucket.states
        lows = list(bucket.prepared or [None] * len(bucket.params))
        due = [i for i, s in enumerate(states) if s["step"] % group["update_proj_gap"] == 0]
        if due:
            seeds = bucket_seeds(bucket, due, [states[i]["step"] // group["update_proj_gap"] for i in due],
                                 seed=group["seed"]) if proj.randomized else None
            fresh, status = refresh_bases(proj, bucket, due, seeds=seeds,
                                    carry=bool(self._carry_key and group[self._carry_key]))
            for i, low in zip(due, fresh):
                lows[i] = low
            self._warn_refreshes(group, [bucket.places[i] for i in due], status)
        # Not prepared: state made this step.
        project_into(lows, [i for i, low in enumerate(lows) if low is None], proj, bucket)
        for s in states:
            s["step"] += 1
        steps = lowrank_adam(as_stacks([s["exp_avg"] for s in states]), as_stacks([s["exp_avg_sq"] for s in states]),
                             lows, [s["step"] for s in states], group["betas"], group["eps"])
        scale = math.sqrt(min(proj.m, proj.n) / proj.rank) if group["scale"] is None else group["scale"]
        self._apply(group, proj, bucket, steps, scale)

    def _apply(self, group, proj, bucket, steps, scale: float) -> None:
        """W ← W(1 − ηλ) − η·s·project_back(S) (:func:`apply_lowrank`)."""
        apply_lowrank(proj, bucket, steps, lr=float(group["lr"]), weight_decay=group["weight_decay"], scale=scale,
                      add_back=adds_back(proj, bucket))

    def _warn_refreshes(self, group, places, status) -> None:
        """One warning per cause naming the params a refresh left on their previous basis."""
        worst = torch.stack([s.amax() for s in status])   # per param, its worst matrix
        worst = host.read(worst, Tensor.tolist, [REFRESHED] * len(worst))
        if all(w == REFRESHED for w in worst):
            return
        causes = [(SVD_FAILED, "the SVD did not converge or was not finite")]
        if float(group["lr"]) != 0:  # lr 0 with zero gradients: torch.distributed.checkpoint building state
            causes.append((ZERO_GRADIENT, "its gradient is all zeros"))
        for cause, what in causes:
            kept = [self._param_name(group, i) for i, w in zip(places, worst) if w == cause]
            if kept:
                warn_once(self._refresh_warned[cause], kept,
                          f"{type(self).__name__} kept the previous projector of {{}}: {what} at its "
                          "refresh (warned once per param)")
