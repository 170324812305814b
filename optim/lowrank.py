r"""LowRankAdamW: the skeleton GaLoreAdamW and DCTAdamW share, Adam in a low-rank subspace.

Per matrix W (m×n) with gradient G at step t (from 0), both rules are

.. math::
    L = \mathrm{project}(G), \quad M \leftarrow \beta_1 M + (1-\beta_1) L, \quad
    V \leftarrow \beta_2 V + (1-\beta_2) L^2, \\
    W \leftarrow W (1 - \eta\lambda) - \eta\, s\,
        \frac{\sqrt{1-\beta_2^{t+1}}}{1-\beta_1^{t+1}}\,
        \mathrm{project\_back}\Big(\frac{M}{\sqrt{V} + \epsilon}\Big)

with the subspace picked anew every ``update_proj_gap`` steps; they differ only in the
projector (:mod:`matrixopt.projectors`) and how it is refreshed. This base keeps the moments
and their state shapes, runs the Adam step (:func:`~matrixopt.projectors.lowrank_adam`) and
the update; a subclass gives its projector, its refresh and its projections.
"""
from .base import (MatrixOptimizer, apply_update, as_matrices, compute_dtype, integer, matrix_shape, rank_spec,
                   real, stacked_call)
from .distributed import local_matrices
from .projectors import lowrank_adam, stored_shape, work_dtype


class LowRankAdamW(MatrixOptimizer):
    """Adam on each matrix's gradient projected to a rank-r subspace (see the module docstring).

    Params that are not matrices (see :class:`~matrixopt.base.MatrixOptimizer`) get AdamW
    with ``betas`` and ``eps`` and the group's lr and weight decay.

    Args shared by the subclasses:
        params: tensors, (name, tensor) pairs or param-group dicts (every argument can be
            overridden per group; ``matrix=True/False`` forces the routing).
        lr: learning rate (default 1e-3).
        betas: (β₁, β₂) (default (0.9, 0.999)).
        weight_decay: decoupled weight decay λ (default 0).
        rank: r, an int or a fraction of min(m, n); capped at min(m, n) (default 128).
        proj_dtype: dtype of the projection matmuls' operands (G with the subspace's basis,
            the step with it); None (default) keeps the state's fp32. ``torch.bfloat16``
            runs them on a GPU's tensor cores with fp32 accumulation, at ~2e-3 relative
            error of the projected gradient against ~1.5e-7 for fp32 (``python -m
            benchmarks.projection``), far below the noise of a stochastic gradient; moments
            and bases stay fp32. TF32 is not offered: it is a process-wide torch setting.
        nonfinite: "skip" (default) or "raise" on NaN/Inf gradients.

    A subclass implements :meth:`_projector`, :meth:`_project` (which refreshes the
    subspace of the matrices due) and :meth:`_project_back`, and may add per-matrix basis
    state (:meth:`_initial_bases`, :meth:`_basis_shapes`).
    """

    supports_fsdp = True
    hyperparameters = {"rank": rank_spec, "update_proj_gap": integer(1), "scale": real(0.0),
                       "proj_dtype": compute_dtype}
    #: A bucket's projection stacks its gradients and its back-projected steps (full size);
    #: these optimizers exist to save memory, so a bucket is about one large matrix (2^22
    #: elements: one 2048², or 64 of 256²), where batching stops paying on a GPU anyway.
    #: (At 2^26, 24 matrices of 2048×1024 made 360 MB of temporaries for 120 MB of state.)
    max_bucket_elements = 1 << 22

    def __init__(self, params, lr, betas, eps, weight_decay, rank, update_proj_gap, scale, *,
                 distributed, process_group, **rule):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, **rule)
        super().__init__(params, defaults, distributed=distributed, process_group=process_group)

    # -- what a subclass gives ---------------------------------------------------------------
    @staticmethod
    def _projector(group, p):
        """The projector of p's matrices (all params of a bucket share it)."""
        raise NotImplementedError

    def _initial_bases(self, proj, batch, device, dtype) -> dict:
        """Basis state a param starts with, besides its moments (none by default)."""
        return {}

    def _basis_shapes(self, p, proj) -> dict:
        """Shapes of p's basis state (checked on load); kept whole on every rank."""
        return {}

    def _project(self, group, proj, params, grads, due):
        """The low-rank gradients of ``grads``, after refreshing the subspace of
        ``params[i]`` for i in ``due``."""
        raise NotImplementedError

    def _project_back(self, proj, params, steps):
        """The low-rank ``steps`` mapped back to the params' (B, m, n) views."""
        raise NotImplementedError

    # -- the shared rule ---------------------------------------------------------------------
    @staticmethod
    def _whole_low(proj) -> bool:
        """Whether the low-rank gradient and moments are whole per matrix, rather than
        having G's rows (and being sharded like them under FSDP2).

        A left projection UᵀG sums over G's rows, so it is whole. So is anything of a single
        row (m == 1): a 1-D param's (1, n) view is split on its columns by FSDP2, so even its
        right projection G·V sums over the split axis. For a 2-D (1, n) or 3-D (E, 1, n) param
        either layout would be exact; whole is the one that needs only the projector, and it
        is what GaLore's right-projected (1, n) rows (``proj_type="reverse_std"``) have always
        stored. DCT projects a single row on its left side unless n == 1 too, so for DCT this
        rule differs from "left side only" just for 1×1 matrices.
        """
        return proj.left or proj.m == 1

    def _matrix_state_shapes(self, p, group):
        proj = self._projector(group, p)
        low = stored_shape(p, proj.low_shape(matrix_shape(p)[0]))
        return {"exp_avg": low, "exp_avg_sq": low, **self._basis_shapes(p, proj)}

    def _sharded_state_shapes(self, p, group):
        if not self.is_matrix(group, p):
            return super()._sharded_state_shapes(p, group)
        # The bases are whole on every rank, even where their shape happens to equal p's.
        if self._whole_low(self._projector(group, p)):
            return {}
        low = self._matrix_state_shapes(p, group)["exp_avg"]
        return {"exp_avg": low, "exp_avg_sq": low}

    def _update_matrices(self, group, params, weights, grads):
        proj = self._projector(group, params[0])
        whole = self._whole_low(proj)
        states = [self.state[p] for p in params]
        dtype = work_dtype(weights[0].dtype)
        for p, w, s in zip(params, weights, states):
            if not s:
                batch = matrix_shape(p)[0]
                # Right side: the moments have the gradient's rows, so they live where its
                # rows do (local shards under FSDP2).
                low = stored_shape(p, proj.low_shape(batch) if whole else (*w.shape[:2], proj.rank))
                s.update(step=0, exp_avg=w.new_zeros(low, dtype=dtype), exp_avg_sq=w.new_zeros(low, dtype=dtype),
                         **self._initial_bases(proj, batch, w.device, dtype))
        due = [i for i, s in enumerate(states) if s["step"] % group["update_proj_gap"] == 0]
        lows = self._project(group, proj, params, grads, due)
        exp_avgs = [as_matrices(s["exp_avg"]) for s in states]
        exp_avg_sqs = [as_matrices(s["exp_avg_sq"]) for s in states]
        steps = lowrank_adam(exp_avgs, exp_avg_sqs, lows, states, group["betas"], group["eps"])
        apply_update(weights, self._project_back(proj, params, steps), lr=group["lr"],
                     weight_decay=group["weight_decay"], scale=group["scale"])

    # -- helpers -----------------------------------------------------------------------------
    def _bases(self, proj, state) -> dict:
        """A param's basis state per key, as (B, ...) (a 2-D param may store it without B)."""
        return {key: state[key].view(-1, *shape[1:]) for key, shape in proj.basis_shapes(1).items()}

    def _projected(self, fn, proj, tensors, params, *, back: bool):
        """``fn(X, bases)`` — a projection, or with ``back`` its back-projection — for each
        param's tensor in ``tensors``.

        A right projection G·V (and L·Vᵀ back) maps each block of G's rows to the same rows of
        the result, so under FSDP2 each rank projects its own shards; a left one UᵀG sums over
        G's rows, so the owner of the whole matrix computes it (see :meth:`_project_on_owners`).
        """
        if self._whole_low(proj):
            return self._project_on_owners(fn, proj, tensors, params, whole_in=back, whole_out=not back)
        return self._project_locally(fn, proj, tensors, params)

    def _project_locally(self, fn, proj, tensors, params):
        """``fn(X, bases)`` on each param's local rows: one batched call for the bucket,
        unless FSDP2 left the params' shards with different row counts."""
        bases = [self._local_entries(proj, p, self._bases(proj, self.state[p])) for p in params]
        if len({x.shape[1:] for x in tensors}) > 1:
            return [fn(x, b) for x, b in zip(tensors, bases)]
        return stacked_call(self._with_bases(fn, proj), tensors, *([b[key] for b in bases] for key in proj.keys))

    @staticmethod
    def _with_bases(fn, proj):
        """``fn(X, bases)`` as a function of X and the bases' stacks in ``proj.keys`` order."""
        return lambda X, *stacks: fn(X, dict(zip(proj.keys, stacks)))

    @staticmethod
    def _local_entries(proj, p, values) -> dict:
        """p's per-matrix ``values`` (its bases, or their transitions) for the matrices this
        rank holds rows of (see :func:`~matrixopt.distributed.local_matrices`)."""
        return {key: local_matrices(p, values[key]) for key in proj.keys}

    def _project_on_owners(self, fn, proj, tensors, params, *, whole_in: bool, whole_out: bool):
        """``fn(X, bases)`` (a projection or its back-projection) per param, through
        :meth:`_matrix_map`: the owner of each whole matrix computes it. ``whole_in`` /
        ``whole_out``: whether ``tensors`` / the results are low-rank values kept whole (else
        they have the param's rows); the bases are whole."""
        bases = [self._bases(proj, self.state[p]) for p in params]
        basis_args = tuple(range(1, 1 + len(proj.keys)))
        return self._matrix_map(self._with_bases(fn, proj), tensors,
                                *([b[key] for b in bases] for key in proj.keys),
                                whole_inputs=(*((0,) if whole_in else ()), *basis_args),
                                whole_outputs=(0,) if whole_out else ())
