"""ARO: adaptively rotated optimization for hidden-layer matrices."""
import functools
import math
from typing import Callable

import torch

from matrixopt.kernels import host

from .ops import MATCH_ADAMW_RMS, Out, Rows, Whole, apply_update, default_compute_dtype, local_map, matmul_in
from .optimizer import MatrixOptimizer
from .state import State
from .precision import MOMENT
from .validation import choice, compute_dtype, integer, real
from .weights import DEFAULT_MASTER_WEIGHTS

BASE_MAPS = ("sinkhorn", "row_norm", "sign")
ROTATE_SIDES = ("smaller", "rows", "cols")
#: Shift of the Cholesky QR relative to ‖C‖²_F.
CHOLESKY_SHIFT = 1e-7
#: Largest estimated ‖QᵀQ - I‖ accepted from Cholesky QR before falling back to Householder.
ORTHOGONALITY_TOL = 1e-3


def _significant(size: torch.Tensor) -> torch.Tensor:
    """Where ``size`` (norms of slices of one matrix) is above rounding level.

    A rotated momentum RᵀM has rows that are zero up to rounding wherever M is rank-deficient
    (dead inputs, the larger side of a rectangular M); normalizing those would blow rounding
    noise up to full-size junk directions, so slices below sqrt(u) of the largest count as 0.
    """
    floor = size.amax(dim=(-2, -1), keepdim=True) * torch.finfo(size.dtype).eps ** 0.5
    return size > floor


def _normalize(X: torch.Tensor, dim: int, target: float) -> torch.Tensor:
    """X with each slice along ``dim`` rescaled to Euclidean norm ``target`` (see _significant)."""
    norm = X.norm(dim=dim, keepdim=True)
    # The factor is formed on the (small) norms, so X is read once and written once: the
    # Sinkhorn map runs this 2·sinkhorn_iters times, twice a step, over every momentum.
    return X * torch.where(_significant(norm), target / norm, 0.0)


def base_map(X: torch.Tensor, kind: str, sinkhorn_iters: int = 5) -> torch.Tensor:
    """f(X) for a stack X (B, k, l) whose rows are the rotated side.

    "row_norm": rows to norm sqrt(l). "sinkhorn": ``sinkhorn_iters`` rounds of rows to norm
    sqrt(l), then columns to norm sqrt(k). "sign": sign(X). None of these commutes with
    rotations of the rows, which is what gives the rotation its effect. Rows, columns and
    entries at rounding level of the largest are mapped to 0.
    """
    k, l = X.shape[-2:]
    if kind == "sign":
        return torch.where(_significant(X.abs()), X.sign(), 0.0)
    if kind == "row_norm":
        return _normalize(X, -1, math.sqrt(l))
    for _ in range(sinkhorn_iters):
        X = _normalize(_normalize(X, -1, math.sqrt(l)), -2, math.sqrt(k))
    return X


def _cholesky_qr(C: torch.Tensor, shift: float):
    """Q = C·L⁻ᵀ with L the Cholesky factor of CᵀC + shift·‖C‖²_F·I; also L and success."""
    P = C.mT @ C
    if shift:
        trace = P.diagonal(dim1=-2, dim2=-1).sum(-1)  # = ‖C‖²_F
        P = P + (shift * trace)[:, None, None] * torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
    L, info = torch.linalg.cholesky_ex(P)
    Q = torch.linalg.solve_triangular(L.mT, C, upper=True, left=False)
    return Q, L, (info == 0) & Q.isfinite().all(-1).all(-1)


def _orthogonal_enough(L: torch.Tensor) -> torch.Tensor:
    """Whether Q = Y·L⁻ᵀ from a Cholesky-QR pass is orthogonal: it is to about κ(Y)²·u,
    and diag(L) bounds κ(Y) from below."""
    d = L.diagonal(dim1=-2, dim2=-1).abs()
    return (d.amax(-1) / d.amin(-1)).square() * torch.finfo(L.dtype).eps < ORTHOGONALITY_TOL


def orthogonal_factor(C: torch.Tensor, method: str = "shifted_cholesky") -> torch.Tensor:
    """The orthogonal factor Q of C = QR for a stack C (B, k, k), batched.

    "householder": ``torch.linalg.qr``. "shifted_cholesky": shifted Cholesky QR
    (P = CᵀC + s·I, s = 1e-7·‖C‖²_F, Cholesky, triangular solve), then one unshifted
    Cholesky QR pass (CholeskyQR2), which restores the orthogonality the shift costs.
    Where C is ill-conditioned enough that this is not yet orthogonal (the C of a square
    momentum has κ ~ 1e5: a third of a LLaMA layer set's matrices), a third pass finishes
    the job (shifted CholeskyQR3, Fukaya et al. 2020). Entries where a Cholesky fails,
    produces non-finite values, or that are still not orthogonal (C numerically
    rank-deficient) fall back to Householder.
    """
    if method == "householder":
        return torch.linalg.qr(C).Q
    Q1, _, ok1 = _cholesky_qr(C, CHOLESKY_SHIFT)
    Q, L, ok2 = _cholesky_qr(Q1, 0.0)
    ok = ok1 & ok2
    done = ok & _orthogonal_enough(L)
    # On fake tensors (a memory simulation) the third pass is taken, the costlier way.
    if host.read(done, lambda done: bool(done.all()), False):
        return Q
    again = ok & ~done
    if host.read(again, lambda again: bool(again.any()), True):
        # The whole stack (no gather of the entries): each matrix's pass is its own.
        Q3, L3, ok3 = _cholesky_qr(Q, 0.0)
        fixed = again & ok3 & _orthogonal_enough(L3)
        Q = torch.where(fixed[:, None, None], Q3, Q)
        done = done | fixed
    if not host.read(done, lambda done: bool(done.all()), True):
        Q[~done] = torch.linalg.qr(C[~done]).Q
    return Q


def rotate(M: torch.Tensor, R: torch.Tensor, *, base: str, sinkhorn_iters: int, qr: str,
           matmul_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One ARO rotation for a stack of momenta M (B, k, l) and rotations R (B, k, k):
    R' = Q(QR(M·f(RᵀM)ᵀ)) and U = R'·f(R'ᵀM); returns (U, R')."""
    f = functools.partial(base_map, kind=base, sinkhorn_iters=sinkhorn_iters)
    Mc = M.to(matmul_dtype)  # cast once: it is in three of the four products

    def mm(A, B):
        return matmul_in(A, B, matmul_dtype).to(M.dtype)

    R = orthogonal_factor(mm(Mc, f(mm(R.mT, Mc)).mT), qr)
    return mm(R, f(mm(R.mT, Mc))), R


def _rotated_update(M, R, *, rows: bool, rms: float | None, **rotation):
    """(U, R') for a stack of momenta (B, m, n): the rotation acts on M's rows, or on its
    columns (through Mᵀ); U rescaled to RMS ``rms`` unless it is None."""
    U, R = rotate(M if rows else M.mT, R, **rotation)
    U = U if rows else U.mT
    if rms is not None:
        norm = U.norm(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(U.dtype).tiny)
        U = U / norm * (rms * math.sqrt(U.shape[-2] * U.shape[-1]))
    return U, R


def aro(weights, grads, momenta, rotations, *, lr: float, momentum: float, weight_decay: float,
        rows: bool, rms: float | None, base: str, sinkhorn_iters: int, qr: str, matmul_dtype: torch.dtype,
        shape: tuple[int, int] | None = None, matrix_map: Callable = local_map) -> None:
    r"""One ARO step over lists of same-shape (B, m, n) weights, gradients and fp32 momenta,
    and the (B, k, k) rotations (updated in place); see :class:`ARO` for the math. Under
    FSDP2 the weights, gradients and momenta are local rows and ``shape`` is the whole
    matrices' (m, n).

    Passes over memory per step (each m×n; the shell's non-finite check reads G once more
    before): G 1 read; M 1 read and write (momentum), then the rotation's four products
    with M (RᵀM twice, M·f(·)ᵀ, R·f(·)) and f's passes over RᵀM (compute-bound); U 1 write, 2
    reads (its norm, the update); W 1 read and write, one more when λ > 0 (the decay)."""
    torch._foreach_lerp_(momenta, [g.float() for g in grads], 1 - momentum)
    m, n = shape or momenta[0].shape[1:]
    k = rotations[0].shape[-1]
    step = functools.partial(_rotated_update, rows=rows, rms=rms, base=base, sinkhorn_iters=sinkhorn_iters,
                             qr=qr, matmul_dtype=matmul_dtype)
    updates, new_rotations = matrix_map(step, [Rows(momenta), Whole(rotations)],
                                        [Out((m, n), torch.float32), Out((k, k), torch.float32, whole=True)])
    for R, new in zip(rotations, new_rotations):
        R.copy_(new)
    apply_update(weights, updates, lr=lr, weight_decay=weight_decay, scale=1.0)


class ARO(MatrixOptimizer):
    r"""ARO (arXiv 2602.09006): momentum through a base map f in an adaptively rotated basis.

    For a matrix W (m×n) with gradient G, momentum β, lr η, weight decay λ, and an
    orthogonal rotation R (k×k, starts as I) acting on the rows (k = m):

    .. math::
        M &\leftarrow \beta M + (1-\beta) G \\
        C &= M\, f(R_{\text{prev}}^\top M)^\top, \qquad R = \mathrm{Q\ factor\ of\ QR}(C) \\
        U &= R\, f(R^\top M) \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, \rho\, U \sqrt{mn} / \lVert U \rVert_F

    f is a base map that does not commute with rotations (see :func:`base_map`): sinkhorn
    (default), row_norm or sign. The rotation chases the basis in which f of the momentum
    best aligns with the momentum. Acting on the columns means doing the above with Mᵀ.
    QR is :func:`orthogonal_factor` (shifted Cholesky QR, Householder fallback). Same-shape
    matrices are rotated as one batch (:func:`aro`). The momentum (sharded like the param) and
    R (whole per matrix) are kept in fp32, and so are f
    and the QR; the four products with M (RᵀM twice, M·f(·)ᵀ, R·f(·)) take their operands
    in ``matmul_dtype`` with fp32 results: bf16 on a GPU puts them on tensor cores (C's
    rounding only picks a slightly different rotation, which the QR keeps orthogonal).

    Args:
        params: tensors, (name, tensor) pairs or param-group dicts (every argument below
            can be overridden per group; ``matrix=True/False`` forces the routing).
        lr: learning rate (default 1e-3).
        momentum: β in [0, 1) (default 0.95).
        weight_decay: decoupled weight decay λ (default 0.1).
        base: f, "sinkhorn" (default), "row_norm" or "sign".
        sinkhorn_iters: rounds of the sinkhorn map (default 5).
        rotate_side: "smaller" (default: rows if m ≤ n else columns, so R is
            min(m, n)²), "rows" or "cols".
        qr: "shifted_cholesky" (default) or "householder" (``torch.linalg.qr`` always).
        lr_scaling: "match_adamw" (default: the update has RMS ρ = 0.5,
            :data:`~matrixopt.ops.MATCH_ADAMW_RMS`, so
            AdamW's lr and weight decay carry over; Muon's ρ: U's spectral norm is ~1.2×
            an orthogonalized update's of the same RMS, but ARO's best lr measured the same as
            Muon's on every corpus tried) or "none" (U as is; f already gives entries of
            RMS ≈ 1 and R preserves it).
        matmul_dtype: operand dtype of the products with M (default: bf16 on CUDA, fp32
            elsewhere, like Muon's ``ns_dtype``).
        betas, eps: the AdamW fallback's (defaults (0.9, 0.95), 1e-8).
        nonfinite: "skip" (default) or "raise" on NaN/Inf gradients.
        fallback, distributed, process_group: as for :class:`~matrixopt.Muon`.
        state_precision: "fp32" (default), "bf16" or "int8": how the momentum and the
            fallback's moments are stored (:mod:`matrixopt.precision`). The rotation R stays
            fp32 at every precision: it is the warm start of the next QR and the basis f
            acts in, and in bf16 it would be orthogonal only to 2⁻⁸.
        master_weights: "stochastic" (default), "nearest", "int8" or "int16": how bf16 (fp16)
            params are stored after an update, see :mod:`matrixopt.weights`.
    """

    hyperparameters = {
        "momentum": real(0.0, 1.0, hi_open=True),
        "base": choice(*BASE_MAPS),
        "sinkhorn_iters": integer(1, 100),
        "rotate_side": choice(*ROTATE_SIDES),
        "qr": choice("shifted_cholesky", "householder"),
        "lr_scaling": choice("match_adamw", "none"),
        "matmul_dtype": compute_dtype,
    }

    def __init__(self, params, lr=1e-3, momentum=0.95, weight_decay=0.1, base="sinkhorn",
                 sinkhorn_iters=5, rotate_side="smaller", qr="shifted_cholesky",
                 lr_scaling="match_adamw", betas=(0.9, 0.95), eps=1e-8, nonfinite="skip",
                 matmul_dtype=None, *, fallback=None, distributed=None, process_group=None, state_precision="fp32",
                 master_weights=DEFAULT_MASTER_WEIGHTS):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, base=base,
                        sinkhorn_iters=sinkhorn_iters, rotate_side=rotate_side, qr=qr,
                        lr_scaling=lr_scaling, betas=betas, eps=eps, nonfinite=nonfinite,
                        matmul_dtype=matmul_dtype)
        super().__init__(params, defaults, fallback=fallback, distributed=distributed,
                         process_group=process_group, state_precision=state_precision, master_weights=master_weights)

    @staticmethod
    def _rotates_rows(group, m: int, n: int) -> bool:
        side = group["rotate_side"]
        return side == "rows" or (side == "smaller" and m <= n)

    def _state(self, p, group):
        B, m, n = self._shape(group, p)
        k = m if self._rotates_rows(group, m, n) else n
        # B per param: a bucket mixes 2-D params with 3-D expert stacks of the same m, n.
        return {"momentum_buffer": State(tuple(p.shape), torch.float32, sharded=True, role=MOMENT),
                "rotation": State((B, k, k), torch.float32, init=_identities)}

    def _update(self, group, bucket):
        m, n = bucket.shape
        aro(bucket.weights, bucket.grads, [s["momentum_buffer"].view_as(w) for s, w in zip(bucket.states, bucket.weights)],
            [s["rotation"] for s in bucket.states],
            lr=float(group["lr"]), momentum=group["momentum"], weight_decay=group["weight_decay"],
            rows=self._rotates_rows(group, m, n), rms=MATCH_ADAMW_RMS if group["lr_scaling"] == "match_adamw" else None,
            base=group["base"], sinkhorn_iters=group["sinkhorn_iters"], qr=group["qr"],
            matmul_dtype=group["matmul_dtype"] or default_compute_dtype(bucket.weights[0].device), shape=(m, n),
            matrix_map=bucket.matrix_map)


def _identities(shape, dtype, device) -> torch.Tensor:
    """A stack of identity matrices of ``shape`` (B, k, k)."""
    return torch.eye(shape[-1], dtype=dtype, device=device).repeat(shape[0], 1, 1)
