"""Low-rank gradient projectors: the subspace a GaLore-style optimizer keeps its moments in.

:class:`SVDProjector` (GaLore) and :class:`DCTProjector` (DCT-AdamW) implement
:class:`matrixopt.protocols.Projector`, which :class:`~matrixopt.LowRankAdamW` runs; an
``add_back(W, L, *bases, alpha, beta)`` (W ← βW + α·project_back(L) in place, one matmul
into W) is optional: a rule whose update is not W's plain sum with the back-projection, as
CoSOAdamW's, does without it.
"""
import torch
from torch import Tensor

from matrixopt import kernels
from matrixopt.kernels import host

from .ops import Out, matmul_in
from .state import AT_LEAST_FP32, State
from .precision import BASIS


PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
# What SVDProjector.refresh did with each matrix.
REFRESHED, ZERO_GRADIENT, SVD_FAILED = 0, 1, 2


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of low-rank state and projections for params of ``dtype``: fp32, or fp64."""
    return torch.promote_types(dtype, torch.float32)


def stored_shape(shape, batched: bool) -> tuple:
    """How low-rank state of matrix-view shape (B, ·, ·) is stored: B is kept for ``batched``
    params only (3-D expert stacks, params split into blocks), so a 2-D weight's right-side
    moments are (m, r), like the weight in dim 0 (and sharded like it under FSDP2)."""
    return tuple(shape) if batched else tuple(shape[1:])


def whole_low(left: bool, m: int, whole_projections: bool) -> bool:
    """Whether a projector with a projection summing over rows (``left``) of m-row matrices,
    of a param whose pieces need every projection whole or not (``whole_projections``, see
    :func:`~matrixopt.matrices.whole_projections`), keeps its low-rank values whole per
    matrix (see :meth:`SVDProjector.whole_low`)."""
    return left or m == 1 or whole_projections


def _sides(proj_type: str, m: int, n: int) -> tuple[str, ...]:
    """Which side(s) of an m×n gradient ``proj_type`` projects (galore-torch's convention)."""
    if proj_type == "std":
        return ("right",) if m >= n else ("left",)
    if proj_type == "reverse_std":
        return ("left",) if m >= n else ("right",)
    return ("left", "right") if proj_type == "full" else (proj_type,)


class SVDProjector:
    r"""GaLore's projector (Zhao et al. 2024): the top-r singular subspace of the gradient.

    For a gradient G (m×n) with SVD G = U S Vᵀ, the bases are U_r = U[:, :r] ("left", kept as
    state ``proj_left`` of shape (B, m, r)) and V_r = V[:, :r] ("right", ``proj_right``,
    (B, n, r)), both with orthonormal columns:

    .. math::
        \text{left: } L = U_r^\top G \ (r×n), \quad
        \text{right: } L = G V_r \ (m×r), \quad
        \text{full: } L = U_r^\top G V_r \ (r×r)

    and ``project_back`` is the transpose map (U_r L, L V_rᵀ, U_r L V_rᵀ). ``proj_type``
    picks the side as galore-torch does: "std" the smaller side (right when m ≥ n),
    "reverse_std" the larger, "left"/"right"/"full" as named. ``rank`` must already be
    capped at min(m, n).

    Projections multiply in ``dtype`` (None: the bases' dtype); ``project`` returns the
    bases' dtype (the moments'), ``project_back`` the matmul's. bf16 operands (fp32
    accumulation inside the matmul) run on tensor cores at ~2e-3 relative error, fp32 ones
    at ~2e-7 (``python -m benchmarks.projection``).

    :meth:`refresh` recomputes the bases from a stack of gradients, in the bases' dtype
    (fp32, or fp64): ``svd="exact"`` takes them from ``torch.linalg.svd`` (galore-torch's
    refresh), ``svd="randomized"`` from :func:`matrixopt.kernels.lowrank_svd`, warm-started
    from the previous basis (the left one for "full") or cold with ``warm=False``. A batch
    entry whose gradient is all zeros, or whose new basis is not finite, keeps its previous
    basis, and so does the whole batch when the SVD raises ``LinAlgError``
    (non-convergence); ``refresh`` reports what it did with each entry. Before the first
    refresh the bases are :meth:`initial` ones, the first r coordinate axes (an identity
    slice): that is what a failed first refresh leaves in place.
    """

    def __init__(self, proj_type: str, rank: int, m: int, n: int, svd: str = "randomized",
                 dtype: torch.dtype | None = None):
        sides = _sides(proj_type, m, n)
        self.left, self.right = "left" in sides, "right" in sides
        self.rank, self.m, self.n, self.svd, self.dtype = rank, m, n, svd, dtype
        self.keys = tuple(f"proj_{side}" for side in sides)
        self.basis_dims = {key: (m if key == "proj_left" else n, rank) for key in self.keys}
        self.low_dims = (rank if self.left else m, rank if self.right else n)
        self.randomized = svd == "randomized"

    refresh_gives_low = False
    whole_projections = False   # set by the rule for params whose pieces need it (matrices.whole_projections)

    def whole_low(self) -> bool:
        """Whether the low-rank gradient and moments are whole per matrix, rather than having
        G's rows (and being sharded like them under FSDP2).

        A left projection UᵀG sums over G's rows, so it is whole. So is anything of a single
        row (m == 1): a 1-D param's (1, n) view is split on its columns by FSDP2, so even its
        right projection G·V sums over the split axis. For a 2-D (1, n) or 3-D (E, 1, n) param
        either layout would be exact; whole is the one that needs only the projector, and it
        is what GaLore's right-projected (1, n) rows (``proj_type="reverse_std"``) have always
        stored. DCT projects a single row on its left side unless n == 1 too, so for DCT this
        differs from "left side only" just for 1×1 matrices. And so is every projection of a
        param whose columns are split across ranks (tensor-parallel ``Shard(1)``), where G·V
        sums over ranks too, or which is a DTensor in row blocks (``whole_projections``).
        """
        return whole_low(self.left, self.m, self.whole_projections)

    def low_shape(self, batch: int) -> tuple[int, int, int]:
        """Shape of the projected gradient of a (batch, m, n) stack."""
        return batch, self.rank if self.left else self.m, self.rank if self.right else self.n

    def basis(self, batch: int, batched: bool) -> dict[str, State]:
        """State ``proj_left`` (B, m, r) and/or ``proj_right`` (B, n, r) (B kept for every
        param), starting as identity slices (the first r coordinate axes) until a refresh
        succeeds."""
        return {key: State((batch, *dims), AT_LEAST_FP32, init=_identity_slices, role=BASIS)
                for key, dims in self.basis_dims.items()}

    def refresh_outputs(self, dtype: torch.dtype) -> list[Out]:
        return [*(Out(dims, dtype, whole=True) for dims in self.basis_dims.values()),
                Out((), torch.int8, whole=True)]

    def project(self, G: torch.Tensor, *bases: torch.Tensor) -> torch.Tensor:
        """Low-rank gradient of G (B, m, n), in the bases' dtype; ``bases`` in ``keys`` order."""
        L = G
        if self.left:
            L = matmul_in(bases[0].mT, L, self.dtype)
        if self.right:
            L = matmul_in(L, bases[-1], self.dtype)
        return L.to(bases[0].dtype)

    def project_back(self, L: torch.Tensor, *bases: torch.Tensor) -> torch.Tensor:
        """Map a low-rank step L back to (B, m, n), in the matmuls' dtype (the update is
        added to the weights as it is: a bf16 one needs no fp32 copy)."""
        if self.left:
            L = matmul_in(bases[0], L, self.dtype)
        if self.right:
            L = matmul_in(L, bases[-1].mT, self.dtype)
        return L

    def add_back(self, W: torch.Tensor, L: torch.Tensor, *bases: torch.Tensor, alpha: float, beta: float) -> None:
        """W ← βW + α·project_back(L) in place, the last matmul accumulating into W (whose
        dtype the matmuls then use): no (B, m, n) temporary, one pass over W."""
        bases = [b.to(W.dtype) for b in bases]
        L = L.to(W.dtype)
        if self.right:
            left = bases[0] @ L if self.left else L
            W.baddbmm_(left, bases[-1].mT, beta=beta, alpha=alpha)
        else:
            W.baddbmm_(bases[0], L, beta=beta, alpha=alpha)

    def transition(self, old, new) -> dict[str, torch.Tensor]:
        """Change of basis R = P_newᵀ P_old (B, r, r) per side, for carrying low-rank state."""
        return {key: new[key].mT @ old[key] for key in self.keys}

    def carry(self, M: torch.Tensor, V: torch.Tensor, R) -> tuple[torch.Tensor, torch.Tensor]:
        """The moments in the new basis: M ← R M (left), M Rᵀ (right); V likewise with the
        entries of R squared (how a second moment of independent coordinates transforms)."""
        for key in self.keys:
            Rk, R2 = R[key], R[key].square()
            M, V = (Rk @ M, R2 @ V) if key == "proj_left" else (M @ Rk.mT, V @ R2.mT)
        return M, V

    def refresh(self, G: torch.Tensor, *previous: torch.Tensor, seeds=None, warm: bool = True) -> tuple[torch.Tensor, ...]:
        """New bases for the stack G (B, m, n), in the order of ``self.keys``, then a (B,) int8
        status per entry: ``REFRESHED``, or why it kept ``previous`` (``ZERO_GRADIENT``,
        ``SVD_FAILED``: no convergence or a non-finite basis). ``seeds`` (B,) seed one
        generator per matrix for the randomized sketch; ``warm=False`` starts it cold."""
        zero = G.flatten(1).abs().amax(dim=1) == 0
        status = torch.where(zero, ZERO_GRADIENT, REFRESHED).to(torch.int8)
        generators = None if seeds is None else [torch.Generator(G.device).manual_seed(seed) for seed in
                                                 host.read(seeds, Tensor.tolist, [0] * len(seeds))]
        try:
            fresh = self._bases(G.to(previous[0].dtype), previous if warm else None, generators)
        except torch.linalg.LinAlgError:
            return (*previous, status.masked_fill(~zero, SVD_FAILED))
        finite = torch.stack([P.isfinite().flatten(1).all(dim=1) for P in fresh]).all(dim=0)
        status = status.masked_fill(~zero & ~finite, SVD_FAILED)
        keep = (status == REFRESHED)[:, None, None]
        return (*(torch.where(keep, P, old) for P, old in zip(fresh, previous)), status)

    def _bases(self, G, previous, generator):
        r, init = self.rank, previous[0] if previous else None
        # Gradients' subspaces drift slowly: from the previous basis one pass of subspace
        # iteration captures ≥ 99% of the energy (tests/test_lowrank.py); cold starts take two.
        iters = 1 if init is not None else 2
        if self.svd == "exact":
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        elif self.left:
            U, _, Vh = kernels.lowrank_svd(G, r, init=init, iters=iters, generator=generator)
        else:
            # Transposed, so the kept right basis is the left one of Gᵀ (lowrank_svd reads
            # a square init as left).
            V, _, Uh = kernels.lowrank_svd(G.mT, r, init=init, iters=iters, generator=generator)
            U, Vh = Uh.mT, V.mT
        found = {"proj_left": U[..., :r], "proj_right": Vh[..., :r, :].mT}
        return [found[key] for key in self.keys]


def _identity_slices(shape, dtype, device) -> torch.Tensor:
    """A stack (B, m, r) of the first r coordinate axes of m."""
    batch, m, r = shape
    return torch.eye(m, r, device=device, dtype=dtype).expand(batch, m, r).contiguous()


class DCTProjector:
    r"""DCT-AdamW's projector (Modoranu et al. 2025): r columns of the shared DCT-II basis.

    With k = min(m, n) and Q = :func:`matrixopt.kernels.dct_basis` (k) (columns = DCT-II
    basis vectors), the smaller side is projected. For m ≥ n (right side):

    .. math::
        S = G Q, \quad \mathrm{score}_j = \lVert S_{:, j} \rVert_p, \quad
        L = G\, Q_{:, I} \ (m×r), \quad \mathrm{project\_back}(L) = L\, Q_{:, I}^\top

    with I the r best-scoring columns; for m < n the same on the left (S = QᵀG, rows scored,
    L = Q_{:,I}ᵀ G of r×n, back Q_{:,I} L). The only state is I, r int32 indices per matrix
    (state ``indices``, (B, r)), kept in ascending order: the moments' columns then follow
    the frequencies, and a refresh that keeps the same set leaves them aligned. Ties in
    the scores go to the lower index (:func:`matrixopt.kernels.top_indices`).

    :meth:`refresh` scores a whole stack at once (one batched matmul or FFT, see
    :func:`matrixopt.kernels.dct_scores`) and returns the low-rank gradient S[:, I] with the
    indices, so a refresh step needs no second matmul. Work is in fp32 (fp64 for fp64
    gradients); ``project`` and ``project_back`` multiply in ``dtype`` when it is given
    (as :class:`SVDProjector` does).
    """

    keys = ("indices",)
    randomized = False
    refresh_gives_low = True

    whole_projections = False   # as SVDProjector's

    def __init__(self, rank: int, m: int, n: int, score_norm: int = 1, method: str = "auto",
                 dtype: torch.dtype | None = None):
        self.rank, self.m, self.n = rank, m, n
        self.left, self.k = m < n, min(m, n)
        self.basis_dims = {"indices": (rank,)}
        self.low_dims = (rank, n) if self.left else (m, rank)
        self.score_norm, self.method, self.dtype = score_norm, method, dtype

    def whole_low(self) -> bool:
        """As :meth:`SVDProjector.whole_low`: a left projection, a single row, ``whole_projections``."""
        return whole_low(self.left, self.m, self.whole_projections)

    def low_shape(self, batch: int) -> tuple[int, int, int]:
        """Shape of the projected gradient of a (batch, m, n) stack."""
        return (batch, self.rank, self.n) if self.left else (batch, self.m, self.rank)

    def basis(self, batch: int, batched: bool) -> dict[str, State]:
        """State ``indices``: r int32 per matrix, (B, r) for a batched param, (r,) otherwise."""
        return {"indices": State(stored_shape((batch, self.rank), batched), torch.int32)}

    def refresh_outputs(self, dtype: torch.dtype) -> list[Out]:
        return [Out((self.rank,), torch.int32, whole=True), Out((), torch.int8, whole=True),
                Out(self.low_dims, dtype, whole=self.whole_low())]

    def shared_basis(self, device, dtype: torch.dtype) -> torch.Tensor:
        """The shared Q (k×k) these projections use."""
        return kernels.dct_basis(self.k, device, dtype)

    def _tall(self, X: torch.Tensor) -> torch.Tensor:
        # The left side is the right side of the transpose: work on (B, max(m,n), ·) views.
        return X.mT if self.left else X

    def shared_rows(self, device, dtype: torch.dtype) -> torch.Tensor:
        """Qᵀ (k×k, contiguous, shared like Q), whose rows the projections gather."""
        return kernels.dct_basis(self.k, device, dtype, transposed=True)

    def _columns(self, indices, device, dtype) -> torch.Tensor:
        """C = Q[:, I] for each matrix of the stack, (B, k, r): one gather of rows of Qᵀ."""
        rows = self.shared_rows(device, dtype).index_select(0, indices.reshape(-1).long())
        return rows.view(*indices.shape, self.k).mT

    def project(self, G: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Low-rank gradient of G (B, m, n) for the (B, r) ``indices``: CᵀG (left) or G·C."""
        work = work_dtype(G.dtype)
        C = self._columns(indices, G.device, work)
        return (matmul_in(C.mT, G, self.dtype) if self.left else matmul_in(G, C, self.dtype)).to(work)

    def project_back(self, L: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Map a low-rank step L back to (B, m, n), in the matmul's dtype: C·L or L·Cᵀ."""
        C = self._columns(indices, L.device, L.dtype)
        return matmul_in(C, L, self.dtype) if self.left else matmul_in(L, C.mT, self.dtype)

    def add_back(self, W: torch.Tensor, L: torch.Tensor, indices: torch.Tensor, *, alpha: float, beta: float) -> None:
        """W ← βW + α·project_back(L) in place, the matmul accumulating into W (whose dtype it
        then uses)."""
        C, L = self._columns(indices, W.device, W.dtype), L.to(W.dtype)
        if self.left:
            W.baddbmm_(C, L, beta=beta, alpha=alpha)
        else:
            W.baddbmm_(L, C.mT, beta=beta, alpha=alpha)

    def refresh(self, G: torch.Tensor, *previous, seeds=None, warm=True):
        """New ``indices`` (B, r) int32 for the stack G (B, m, n), a (B,) status (always
        ``REFRESHED``: a DCT selection cannot fail) and the low-rank gradient S[:, I], so a
        refresh step needs no second matmul."""
        X = self._tall(G.to(work_dtype(G.dtype)))
        S, scores = kernels.dct_scores(X, self.score_norm, self.method)
        indices = kernels.top_indices(scores, self.rank)
        low = S.gather(-1, indices[:, None, :].expand(-1, S.shape[-2], -1))
        status = torch.full((G.shape[0],), REFRESHED, dtype=torch.int8, device=G.device)
        return indices.int(), status, self._tall(low)

    def transition(self, old, new) -> dict[str, torch.Tensor]:
        """The old and the new indices (B, r): all :meth:`carry` needs."""
        return {"old": old["indices"], "new": new["indices"]}

    def carry(self, M: torch.Tensor, V: torch.Tensor, transition) -> tuple[torch.Tensor, torch.Tensor]:
        """The moments (columns for the old indices) expressed for the new indices.

        This is L·R with R = Q[:, old]ᵀ Q[:, new] (Rᵀ·L on the left side). Q is orthogonal,
        so R is exactly the 0/1 matrix matching equal indices: an index kept keeps its
        column, a new one starts at zero. Computed as that gather, without rounding, and the
        same for both moments.
        """
        old, new = transition["old"].long(), transition["new"].long()
        at = torch.searchsorted(old, new).clamp_max(old.shape[-1] - 1)  # old is ascending
        kept = old.gather(-1, at) == new

        def moved(L):
            X = self._tall(L)
            return self._tall(X.gather(-1, at[:, None, :].expand(-1, X.shape[-2], -1)) * kept[:, None, :])

        return moved(M), moved(V)
