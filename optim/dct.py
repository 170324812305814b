"""DCTAdamW: Adam in a low-rank subspace picked from a fixed DCT basis (no SVD)."""
from .base import (MatrixOptimizer, apply_update, as_matrices, choice, integer, matrix_shape, rank_spec, real,
                   resolve_rank)
from .projectors import DCTProjector, lowrank_adam, stored_shape, work_dtype


class DCTAdamW(MatrixOptimizer):
    r"""DCT-AdamW (Modoranu et al. 2025, arXiv 2505.17967): GaLore with DCT columns for SVDs.

    For a matrix W (m×n, m ≥ n; the left side for m < n, see
    :class:`~matrixopt.projectors.DCTProjector`) with gradient G at step t (from 0), Q the
    orthonormal DCT-II basis of size n shared by every matrix of that size, lr η, weight
    decay λ:

    .. math::
        \text{if } t \bmod T = 0:\quad S &= G Q,\ \ I = \mathrm{top}_r\big(\lVert S_{:,j}\rVert_p\big),
            \ \ L = S_{:, I} \\
        \text{else}:\quad L &= G\, Q_{:, I} \\
        M &\leftarrow \beta_1 M + (1-\beta_1) L, \qquad V \leftarrow \beta_2 V + (1-\beta_2) L^2 \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, s\,
            \frac{\sqrt{1-\beta_2^{t+1}}}{1-\beta_1^{t+1}}\,
            \frac{M}{\sqrt{V} + \epsilon}\, Q_{:, I}^\top

    with T = ``update_proj_gap``, p = ``score_norm``, s = ``scale``. A refresh costs one
    batched matmul (or FFT, for large n) and a top-r for all same-shape matrices together
    (ties go to the lower index; I is kept in ascending order). The state of a 2-D param
    is M and V (m×r, or r×n on the left side; fp32, fp64 for fp64 params) and the r
    indices I (int32); a 3-D (E, m, n) param has a leading E on each. The Adam
    details follow :class:`~matrixopt.GaLoreAdamW` (galore-torch's ε and bias correction),
    so the two differ only in the subspace. ``rotate_states=True`` maps the moments into
    the new selection on refresh, M ← M R and V ← |V R| with R = Q[:, I_old]ᵀ Q[:, I_new]:
    since Q is orthogonal, a frequency kept keeps its moments and a new one starts at zero.
    Without it the moments are reused as they are (as galore-torch does): column a of M
    then belongs to the a-th smallest selected index, whichever frequency that now is.

    Params that are not matrices (see :class:`~matrixopt.base.MatrixOptimizer`) get AdamW
    with ``betas`` and ``eps`` and the group's lr and weight decay.

    Args:
        params: tensors, (name, tensor) pairs or param-group dicts (every argument below
            can be overridden per group; ``matrix=True/False`` forces the routing).
        lr: learning rate (default 1e-3).
        betas: (β₁, β₂) (default (0.9, 0.999)).
        eps: ε (default 1e-8).
        weight_decay: decoupled weight decay λ (default 0).
        rank: r, an int or a fraction of min(m, n); capped at min(m, n) (default 128).
        update_proj_gap: T, steps between refreshes of the selection (default 200).
        scale: s, the factor on the projected-back step (default 1).
        score_norm: p, 1 (default) or 2: the norm scoring each DCT column.
        rotate_states: carry the moments into the new selection on refresh (default False).
        nonfinite: "skip" (default) or "raise" on NaN/Inf gradients.
        distributed: None (default; FSDP2's DTensor params are detected by themselves) or
            "replicated" (DDP): refreshes and projections are split over the ranks of
            ``process_group`` (default: the default group). See :mod:`matrixopt.distributed`.
    """

    supports_fsdp = True
    hyperparameters = {
        "rank": rank_spec,
        "update_proj_gap": integer(1),
        "scale": real(0.0),
        "score_norm": choice(1, 2),
        "rotate_states": choice(True, False),
    }

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=128,
                 update_proj_gap=200, scale=1.0, score_norm=1, rotate_states=False, nonfinite="skip", *,
                 distributed=None, process_group=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, score_norm=score_norm,
                        rotate_states=rotate_states, nonfinite=nonfinite)
        super().__init__(params, defaults, distributed=distributed, process_group=process_group)

    @staticmethod
    def _projector(group, p) -> DCTProjector:
        _, m, n = matrix_shape(p)
        return DCTProjector(resolve_rank(group["rank"], m, n), m, n, group["score_norm"])

    def _matrix_state_shapes(self, p, group):
        batch = matrix_shape(p)[0]
        proj = self._projector(group, p)
        low = stored_shape(p, proj.low_shape(batch))
        return {"exp_avg": low, "exp_avg_sq": low, "indices": stored_shape(p, (batch, proj.rank))}

    def _sharded_state_shapes(self, p, group):
        if not self.is_matrix(group, p):
            return super()._sharded_state_shapes(p, group)
        # Only the right side's moments have p's rows; the indices and the left side's
        # moments are whole on every rank, even where their shape happens to equal p's.
        if p.ndim == 1 or self._projector(group, p).left:
            return {}
        low = self._matrix_state_shapes(p, group)["exp_avg"]
        return {"exp_avg": low, "exp_avg_sq": low}

    def _update_matrices(self, group, params, weights, grads):
        proj = self._projector(group, params[0])
        states = [self.state[p] for p in params]
        for p, w, s in zip(params, weights, states):
            if not s:
                # Right side: moments have the gradient's rows, so they live where its rows
                # do (local shards under FSDP2); left side: r×n, whole on every rank.
                low = proj.low_shape(matrix_shape(p)[0]) if proj.left else (*w.shape[:2], proj.rank)
                low, dtype = stored_shape(p, low), work_dtype(w.dtype)
                s.update(step=0, exp_avg=w.new_zeros(low, dtype=dtype), exp_avg_sq=w.new_zeros(low, dtype=dtype))
        exp_avgs = [as_matrices(s["exp_avg"]) for s in states]
        exp_avg_sqs = [as_matrices(s["exp_avg_sq"]) for s in states]
        # Which _matrix_map arguments are per-matrix values kept whole (see base._matrix_map).
        low_whole = (0,) if proj.left else ()

        lows = [None] * len(params)
        due = [i for i, s in enumerate(states) if s["step"] % group["update_proj_gap"] == 0]
        if due:
            fresh, fresh_lows = self._matrix_map(proj.refresh, [grads[i] for i in due],
                                                 whole_outputs=(0, *(i + 1 for i in low_whole)))
            fresh = dict(zip(due, fresh))
            # A param's first refresh has no moments to carry.
            moved = [i for i in due if group["rotate_states"] and "indices" in states[i]]
            if moved:
                moments_whole = (0, 1) if proj.left else ()
                carried = self._matrix_map(
                    lambda M, V, old, new: (proj.carry(M, old, new), proj.carry(V, old, new)),
                    [exp_avgs[i] for i in moved], [exp_avg_sqs[i] for i in moved],
                    [self._indices(states[i]) for i in moved], [fresh[i] for i in moved],
                    whole_inputs=(*moments_whole, 2, 3), whole_outputs=moments_whole)
                for i, M, V in zip(moved, *carried):
                    exp_avgs[i].copy_(M)
                    exp_avg_sqs[i].copy_(V)
            for i, low in zip(due, fresh_lows):
                # A copy, so each param owns its indices rather than a view of the batch.
                states[i]["indices"] = fresh[i].reshape(stored_shape(params[i], fresh[i].shape)).clone()
                lows[i] = low
        rest = [i for i in range(len(params)) if lows[i] is None]
        if rest:
            projected = self._matrix_map(lambda G, I: proj.project(G, {"indices": I}),
                                         [grads[i] for i in rest], [self._indices(states[i]) for i in rest],
                                         whole_inputs=(1,), whole_outputs=low_whole)
            for i, low in zip(rest, projected):
                lows[i] = low

        steps = lowrank_adam(exp_avgs, exp_avg_sqs, lows, states, group["betas"], group["eps"])
        updates = self._matrix_map(lambda L, I: proj.project_back(L, {"indices": I}),
                                   steps, [self._indices(s) for s in states], whole_inputs=(*low_whole, 1))
        apply_update(weights, updates, lr=group["lr"], weight_decay=group["weight_decay"],
                     scale=group["scale"])

    @staticmethod
    def _indices(state):
        """A param's selected indices as (B, r)."""
        return state["indices"].view(-1, state["indices"].shape[-1])

    def _shared_state_tensors(self):
        """The DCT bases the matrices in state use, once per (size, device, dtype)."""
        bases = {}
        for group in self.param_groups:
            for p in group["params"]:
                s = self.state.get(p, {})
                if "indices" in s:
                    proj = self._projector(group, p)
                    bases[(proj.k, p.device, s["exp_avg"].dtype)] = proj
        return [proj.basis(device, dtype) for (_, device, dtype), proj in bases.items()]
