"""GaLoreAdamW: Adam with its moments kept in a low-rank projection of each gradient."""
import numpy as np
import torch

from .base import as_matrices, choice, integer, matrix_shape, resolve_rank
from .lowrank import LowRankAdamW
from .projectors import PROJ_TYPES, SVD_FAILED, ZERO_GRADIENT, SVDProjector


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
    galore-torch's ``GaLoreAdamW``; weight decay here is applied before the update, as in
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

    Args (the others, and the AdamW fallback for params that are not matrices, as for
    :class:`~matrixopt.lowrank.LowRankAdamW`: params, lr, betas, weight_decay, rank (default
    128), proj_dtype, nonfinite):
        eps: ε (default 1e-6, galore-torch's).
        update_proj_gap: T, steps between projector refreshes (default 200).
        scale: s, the factor on the projected-back step (default 0.25).
        proj_type: "std" (default), "reverse_std", "left", "right" or "full".
        svd: "randomized" (default; :func:`matrixopt.kernels.lowrank_svd`, warm-started from
            the previous basis) or "exact" (``torch.linalg.svd`` in fp32, as galore-torch).
        reproject_states: carry the moments into the new basis on refresh (default False).
        seed: seed of the randomized refresh: the sketch of each matrix at each refresh is
            drawn from a generator seeded by (seed, the param's place in the optimizer, the
            matrix's index in a 3-D param, the refresh count), so it depends on nothing else
            (not on which matrices are refreshed together) and a resumed run draws the same.
        distributed: None (default; FSDP2's DTensor params are detected by themselves) or
            "replicated" (DDP): refreshes are split over the ranks of ``process_group``
            (default: the default group). Both reproduce the single-process run, with
            ``svd="randomized"`` too. Under FSDP2 the right projection G·V_r runs on each
            rank's row shard and its moments are sharded like the param; the left (and
            "full") projection U_rᵀ·G sums over rows, so it and its back-projection run on the
            owner of the whole gradient, and those moments (r×n) are whole on every rank, as
            are the bases. See :mod:`matrixopt.distributed`.
    """

    hyperparameters = {
        **LowRankAdamW.hyperparameters,
        "proj_type": choice(*PROJ_TYPES),
        "svd": choice("exact", "randomized"),
        "reproject_states": choice(True, False),
        "seed": integer(0),
    }

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=128,
                 update_proj_gap=200, scale=0.25, proj_type="std", svd="randomized",
                 reproject_states=False, nonfinite="skip", seed=0, proj_dtype=None, *, distributed=None,
                 process_group=None):
        self._refresh_warned: dict[int, set[str]] = {ZERO_GRADIENT: set(), SVD_FAILED: set()}
        super().__init__(params, lr, betas, eps, weight_decay, rank, update_proj_gap, scale,
                         proj_type=proj_type, svd=svd, reproject_states=reproject_states,
                         nonfinite=nonfinite, seed=seed, proj_dtype=proj_dtype, distributed=distributed,
                         process_group=process_group)

    def __getstate__(self):
        return {**super().__getstate__(), "_refresh_warned": self._refresh_warned}

    @staticmethod
    def _projector(group, p) -> SVDProjector:
        _, m, n = matrix_shape(p)
        return SVDProjector(group["proj_type"], resolve_rank(group["rank"], m, n), m, n, group["svd"],
                            group["proj_dtype"])

    def _initial_bases(self, proj, batch, device, dtype):
        return proj.initial(batch, device, dtype)

    def _basis_shapes(self, p, proj):
        return proj.basis_shapes(matrix_shape(p)[0])

    def _project(self, group, proj, params, grads, due):
        if due:
            self._refresh(group, proj, [params[i] for i in due], [grads[i] for i in due])
        return self._projected(proj.project, proj, grads, params, back=False)

    def _project_back(self, proj, params, steps):
        return self._projected(proj.project_back, proj, steps, params, back=True)

    def _refresh(self, group, proj, params, grads):
        """New bases for ``params`` from their gradients, as one batch per shape."""
        states = [self.state[p] for p in params]
        index = {id(q): i for i, q in enumerate(group["params"])}
        places = [index[id(p)] for p in params]  # in the group: the sketches' seeds and the warnings name them
        old = [{key: s[key] for key in proj.keys} for s in states]
        # A cold start at a param's first refresh: its identity-slice basis is no estimate.
        warm = all(s["step"] > 0 for s in states)

        def refresh(G, seeds, *previous):
            # Only the randomized SVD draws a sketch.
            generators = None if proj.svd == "exact" else [torch.Generator(G.device).manual_seed(seed)
                                                           for seed in seeds.tolist()]
            return proj.refresh(G, *previous, warm=warm, generator=generators)

        *bases, status = self._matrix_map(refresh, grads, self._sketch_seeds(group, params, places),
                                      *([o[key] for o in old] for key in proj.keys),
                                      whole_inputs=tuple(range(1, 2 + len(proj.keys))),
                                      whole_outputs=tuple(range(1 + len(proj.keys))))
        whole = self._whole_low(proj)
        for i, (p, s) in enumerate(zip(params, states)):
            new = dict(zip(proj.keys, (b[i] for b in bases)))
            if group["reproject_states"]:
                # R is whole, so the carry is local: R·M on whole moments, M·Rᵀ on row shards.
                R = proj.transition(old[i], new)
                R = R if whole else self._local_entries(proj, p, R)
                for key in ("exp_avg", "exp_avg_sq"):
                    moment = as_matrices(s[key])
                    moment.copy_(proj.carry(moment, R, squared=key == "exp_avg_sq"))
            # In place, so each param keeps its own storage (not a view of the batch).
            for key, basis in new.items():
                s[key].copy_(basis)
        # Per param, the worst thing that happened to one of its matrices.
        worst = torch.stack([s.amax() for s in status]).tolist()
        causes = [(SVD_FAILED, "the SVD did not converge or was not finite")]
        if group["lr"] != 0:  # lr 0 with zero gradients: torch.distributed.checkpoint building state
            causes.append((ZERO_GRADIENT, "its gradient is all zeros"))
        for cause, what in causes:
            kept = [self._param_name(group, i) for i, w in zip(places, worst) if w == cause]
            if kept:
                # depth 4: _refresh ← _project ← _update_matrices ← _step_bucket ← step.
                self._warn_once(self._refresh_warned[cause], kept,
                                f"GaLore kept the previous projector of {{}}: {what} at its refresh "
                                "(warned once per param)", depth=4)

    def _sketch_seeds(self, group, params, places) -> list[torch.Tensor]:
        """Per param (at ``places`` in the group), a (B,) seed for each matrix's randomized
        sketch at this refresh.

        A function of (``seed``, the param's place in the optimizer, the matrix, the refresh
        count) only, so every split of the refreshes (one batch, DDP shares, FSDP2 owners)
        and every resumed run draws the same numbers for a matrix.
        """
        g = self._group_index(group)
        seeds = []
        for p, place in zip(params, places):
            count = self.state[p]["step"] // group["update_proj_gap"]
            keys = [(g, place, j, count) for j in range(matrix_shape(p)[0])]
            seeds.append(torch.tensor([int(np.random.SeedSequence(group["seed"], spawn_key=key).generate_state(1)[0])
                                       for key in keys], dtype=torch.int64))
        return seeds
