"""DCTAdamW: Adam in a low-rank subspace picked from a fixed DCT basis (no SVD)."""
from .matrices import resolve_rank
from .plan import separate_parts
from .lowrank import LowRankAdamW
from .projectors import DCTProjector, work_dtype
from .validation import choice
from .weights import DEFAULT_MASTER_WEIGHTS


class DCTAdamW(LowRankAdamW):
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

    This is :class:`~matrixopt.lowrank.LowRankAdamW` with a
    :class:`~matrixopt.projectors.DCTProjector`.

    Args (the others, and the AdamW fallback for params that are not matrices, as for
    :class:`~matrixopt.lowrank.LowRankAdamW`: params, lr, betas, weight_decay, rank (default
    128), proj_dtype, nonfinite, fallback):
        eps: ε (default 1e-8).
        update_proj_gap: T, steps between refreshes of the selection (default 200).
        scale: s, the factor on the projected-back step (default None: √(min(m, n)/r) per
            matrix, so AdamW's lr carries over).
        score_norm: p, 1 (default) or 2: the norm scoring each DCT column.
        rotate_states: carry the moments into the new selection on refresh (default False).
        distributed: None (default; FSDP2's DTensor params are detected by themselves) or
            "replicated" (DDP): refreshes and projections are split over the ranks of
            ``process_group`` (default: the default group). See :mod:`matrixopt.distributed`.
        state_precision: "fp32" (default), "bf16" or "int8": the moments (and the
            fallback's) in bf16 or int8 codes (:mod:`matrixopt.precision`); the indices I
            stay int32 and the DCT basis, shared by every matrix of a size, fp32.
        master_weights: "stochastic" (default), "nearest", "int8" or "int16": how bf16 (fp16)
            params are stored after an update, see :mod:`matrixopt.weights`.
    """

    hyperparameters = {
        **LowRankAdamW.hyperparameters,
        "score_norm": choice(1, 2),
        "rotate_states": choice(True, False),
    }

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=128,
                 update_proj_gap=200, scale=None, score_norm=1, rotate_states=False, nonfinite="skip",
                 proj_dtype=None, *, fallback=None, distributed=None, process_group=None, state_precision="fp32",
                 master_weights=DEFAULT_MASTER_WEIGHTS):
        super().__init__(params, dct_projector, ("rank", "score_norm", "proj_dtype"), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_dtype=proj_dtype,
                         nonfinite=nonfinite, carry_moments="rotate_states", fallback=fallback,
                         distributed=distributed, process_group=process_group, state_precision=state_precision,
                         master_weights=master_weights,
                         score_norm=score_norm,
                         rotate_states=rotate_states)

    def _shared_state_tensors(self):
        """The DCT bases the matrices in state use (Q and the contiguous Qᵀ it is a view of), once
        per (size, device, dtype)."""
        bases = {}
        for group in self.param_groups:
            for p in group["params"]:
                if not (self.state.get(p) and self.is_matrix(group, p)):
                    continue
                separate = separate_parts(group, p)
                for m, n in [b.shape[-2:] for b in separate] if separate else [self._shape(group, p)[1:]]:
                    proj = self._projector(group, m, n)
                    bases[(proj.k, p.device, work_dtype(p.dtype))] = proj
        return [t for (_, device, dtype), proj in bases.items()
                for t in (proj.shared_basis(device, dtype), proj.shared_rows(device, dtype))]


def dct_projector(m: int, n: int, *, rank, score_norm, proj_dtype) -> DCTProjector:
    """The DCT projector of m×n matrices for a group's settings."""
    return DCTProjector(resolve_rank(rank, m, n), m, n, score_norm, dtype=proj_dtype)
