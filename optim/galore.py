"""GaLoreAdamW: Adam with its moments kept in a low-rank projection of each gradient."""
from .matrices import resolve_rank
from .lowrank import LowRankAdamW
from .projectors import PROJ_TYPES, SVDProjector
from .validation import choice
from .weights import DEFAULT_MASTER_WEIGHTS


class GaLoreAdamW(LowRankAdamW):
    r"""GaLore (Zhao et al. 2024): AdamW on the gradient projected onto its top singular subspace.

    For a matrix W (m×n) with gradient G at step t (counted from 0), lr η, weight decay λ:

    .. math::
        P &\leftarrow \mathrm{top}_r\,\mathrm{SVD}(G) \quad \text{if } t \bmod T = 0 \\
        L &= \mathrm{project}_P(G) \quad (G V_r,\ U_r^\top G \text{ or } U_r^\top G V_r) \\
        M &\leftarrow \beta_1 M + (1-\beta_1) L, \qquad V \leftarrow \beta_2 V + (1-\beta_2) L^2 \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, s\,
            \frac{\sqrt{1-\beta_2^{t+1}}}{1-\beta_1^{t+1}}\,
            \mathrm{project\_back}_P\!\Big(\frac{M}{\sqrt{V} + \epsilon}\Big)

    with T = ``update_proj_gap`` and s = ``scale``. The Adam details are galore-torch 1.0's
    (ε added to the un-corrected √V, bias corrections folded into the step size), so with
    ``svd="exact"``, ``reproject_states=False`` and no weight decay this reproduces
    galore-torch's ``GaLoreAdamW`` with ``scale=0.25`` (galore-torch's default); weight decay here is applied before the update, as in
    ``torch.optim.AdamW`` (galore-torch applies it after). Moments, bases and projections
    are fp32 (fp64 for fp64 params); see :class:`~matrixopt.projectors.SVDProjector` for the
    projection sides (``proj_type``) and how a refresh that fails (an all-zero gradient, or
    an SVD that does not converge) keeps the previous basis — such a param is named in one
    warning per cause, so an all-zero gradient does not silence a later SVD failure; none
    at lr 0, the zero-gradient step ``torch.distributed.checkpoint`` runs to build state.

    ``reproject_states=True`` carries the moments into the new basis on refresh, where
    galore-torch reuses them as they are (its issue #54). With R = P_newᵀ P_old,
    M ← R M (left side; M Rᵀ on the right, both for "full") and V ← (R∘R) V — the second
    moment of a linear map of independent coordinates, which stays non-negative, leaves V
    unchanged when the basis is, and follows sign flips and reorderings of singular vectors.
    Directions new to the subspace start with (near) zero moments, like fresh Adam state.

    This is :class:`~matrixopt.lowrank.LowRankAdamW` with an
    :class:`~matrixopt.projectors.SVDProjector`.

    Args (the others, and the AdamW fallback for params that are not matrices, as for
    :class:`~matrixopt.lowrank.LowRankAdamW`: params, lr, betas, weight_decay, rank (default
    128), proj_dtype, nonfinite, fallback):
        eps: ε (default 1e-6, galore-torch's).
        update_proj_gap: T, steps between projector refreshes (default 200).
        scale: s, the factor on the projected-back step (default None: √(min(m, n)/r) per
            matrix, so AdamW's lr carries over; galore-torch's is 0.25, which shrinks the
            update to ~1/6 of AdamW's at rank d/4 — pass ``scale=0.25`` for parity).
        proj_type: "std" (default), "reverse_std", "left", "right" or "full".
        svd: "randomized" (default; :func:`matrixopt.kernels.lowrank_svd`, warm-started from
            the previous basis) or "exact" (``torch.linalg.svd`` in fp32, as galore-torch).
        reproject_states: carry the moments into the new basis on refresh (default False).
        seed: seed of the randomized refresh: the sketch of each matrix at each refresh is
            drawn from a generator seeded by (seed, the param's place in the optimizer, the
            matrix's index in a 3-D param, the refresh count), so it depends on nothing else
            (not on which matrices are refreshed together) and a resumed run draws the same
            (:func:`~matrixopt.seeding.sketch_seeds`).
        distributed: None (default; FSDP2's DTensor params are detected by themselves) or
            "replicated" (DDP): refreshes are split over the ranks of ``process_group``
            (default: the default group). Both reproduce the single-process run, with
            ``svd="randomized"`` too. Under FSDP2 the right projection G·V_r runs on each
            rank's row shard and its moments are sharded like the param; the left (and
            "full") projection U_rᵀ·G sums over rows, so it and its back-projection run on the
            owner of the whole gradient, and those moments (r×n) are whole on every rank, as
            are the bases. See :mod:`matrixopt.distributed`.
        state_precision: "fp32" (default), "bf16" or "int8": the moments (and the
            fallback's) in bf16 or int8 codes, the bases P in bf16 at both (orthonormal and
            recomputed each refresh: 2⁻⁹ relative error in a projection), see
            :mod:`matrixopt.precision`.
        master_weights: "stochastic" (default), "nearest", "int8" or "int16": how bf16 (fp16)
            params are stored after an update, see :mod:`matrixopt.weights`.
    """

    hyperparameters = {
        **LowRankAdamW.hyperparameters,
        "proj_type": choice(*PROJ_TYPES),
        "svd": choice("exact", "randomized"),
        "reproject_states": choice(True, False),
    }

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=128,
                 update_proj_gap=200, scale=None, proj_type="std", svd="randomized",
                 reproject_states=False, nonfinite="skip", seed=0, proj_dtype=None, *, fallback=None,
                 distributed=None, process_group=None, state_precision="fp32", master_weights=DEFAULT_MASTER_WEIGHTS):
        super().__init__(params, svd_projector, ("rank", "proj_type", "svd", "proj_dtype"), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_dtype=proj_dtype,
                         nonfinite=nonfinite, carry_moments="reproject_states", fallback=fallback,
                         distributed=distributed, process_group=process_group, state_precision=state_precision,
                         master_weights=master_weights,
                         proj_type=proj_type, svd=svd, reproject_states=reproject_states, seed=seed)


def svd_projector(m: int, n: int, *, rank, proj_type, svd, proj_dtype) -> SVDProjector:
    """The SVD projector of m×n matrices for a group's settings."""
    return SVDProjector(proj_type, resolve_rank(rank, m, n), m, n, svd, proj_dtype)
