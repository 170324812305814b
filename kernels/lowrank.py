r"""Batched low-rank SVD by warm-started subspace iteration, for refreshing projectors.

For one matrix A (a×b) and p = r + oversample, start from Q = orth([Q_init, AΩ]) (the
previous basis, if any, filled up to p columns by the randomized range finder, Ω Gaussian
b×(p - c)), then run ``iters`` passes:

.. math::
    Q_2 &= \mathrm{orth}(A^\top Q), \quad Q R = A Q_2 \qquad \text{(one pass, repeated)} \\
    R &= \tilde U S \tilde V^\top \qquad \text{(SVD of the small } p\times p \text{ core)} \\
    A &\approx A Q_2 Q_2^\top = (Q \tilde U)\, S\, (Q_2 \tilde V)^\top,
    \ \text{keep the top } r.

Each pass multiplies the basis by AAᵀ, so the angle between the computed and the true
top-r subspace shrinks by about (σ_{p+1}/σ_r)² per pass (cold: tan θ ~ (σ_{p+1}/σ_r)^(2·iters+1)).
A gradient's top subspace drifts slowly between refreshes, so starting from the previous
basis (``init``), already at a small angle, needs one pass where a cold start needs two.

Orthonormalization ``orth`` is Cholesky-QR2: twice ``W = YᵀY; W = LLᵀ; Y ← Y L⁻ᵀ`` in
fp32 (fp64 for fp64 input). A shift of ``eps·tr(W)`` on the first Gram keeps rounding from
making it indefinite. Cholesky-QR is accurate while cond(Y) ≲ eps^(-1/2); a batch entry
whose Cholesky fails, or whose second Gram has a small pivot (Y numerically rank-deficient:
zero or low-rank input, a sketch wider than the rank), is redone with Householder QR
(``torch.linalg.qr``), which returns an orthonormal basis whatever the rank.

Rayleigh-Ritz needs the SVD of the p×p core R. ``torch.linalg.svd`` of it is the slow step
on a GPU (cuSOLVER's Jacobi SVD), so the core goes through ``eigh(RRᵀ) = Ũ S² Ũᵀ`` for the
left vectors and a Cholesky-QR of ŨᵀR's rows (= S_i ṽ_iᵀ) for the right ones: on an H200,
20 ms → 6.7 ms for one 520×520 core and 316 ms → 88 ms for 16 of them
(``python -m benchmarks.lowrank``). Squaring R costs accuracy only in singular vectors with
σ_i ≲ √eps·σ_1 (never the top ones a projector keeps), and both U and Vh stay orthonormal
for any input, rank-deficient ones included.

Backends: both resolve to this PyTorch implementation. Every step is a GEMM (``AᵀQ``,
``AQ₂``, the Grams) or a small batched factorization (Cholesky, triangular solve, p×p
eigh) that cuBLAS/cuSOLVER run through torch. Profiled on an H200 (4096×11008, r = 512,
one warm pass: 12 ms), the GEMMs take ~2.5 ms and the factorizations the rest, so a fused
Triton sketch/Gram kernel could save at most the Gram GEMMs (~0.4 ms); none is written.
Each orthonormalization checks its batch for fallback entries on the host (one sync).
"""
import torch

from ._dispatch import choose_backend

# Second-round Cholesky pivots below this (squared) mean the sketch lost rank: the
# orthogonality error of Cholesky-QR grows like eps·cond(W), cond(W) ≈ 1/pivot².
_MIN_PIVOT2 = 0.1


def _orth(Y):
    """Q, R with Y = QR, QᵀQ = I for a stack Y (B, a, p), a ≥ p: Cholesky-QR2, Householder fallback."""
    eps = torch.finfo(Y.dtype).eps
    eye = torch.eye(Y.size(-1), dtype=Y.dtype, device=Y.device)
    W = Y.mT @ Y
    W = W + eps * W.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None] * eye
    L1, info1 = torch.linalg.cholesky_ex(W)
    Q = torch.linalg.solve_triangular(L1.mT, Y, upper=True, left=False)
    L2, info2 = torch.linalg.cholesky_ex(Q.mT @ Q)
    Q = torch.linalg.solve_triangular(L2.mT, Q, upper=True, left=False)
    R = L2.mT @ L1.mT
    ok = (info1 == 0) & (info2 == 0) & (L2.diagonal(dim1=-2, dim2=-1).square().amin(-1) > _MIN_PIVOT2)
    ok &= Q.isfinite().all(-1).all(-1) & R.isfinite().all(-1).all(-1)
    bad = ~ok
    if bad.any():
        Q[bad], R[bad] = torch.linalg.qr(Y[bad])
    return Q, R


def _core_svd(R, rank):
    """Top-``rank`` SVD of a stack of p×p cores R, (Ũ, S, Ṽ), via eigh (see the module docstring).

    eigh(RRᵀ) = Ũ S² Ũᵀ gives the left vectors; the rows of ŨᵀR are S_i·ṽ_iᵀ, so their
    QR gives Ṽ, with S as the diagonal of the triangular factor.
    """
    Uc = torch.linalg.eigh(R @ R.mT)[1].flip(-1)[..., :rank]
    Vc, T = _orth(R.mT @ Uc)
    S = T.diagonal(dim1=-2, dim2=-1)
    sign = torch.where(S < 0, -1.0, 1.0).to(S.dtype)  # a Householder fallback may flip columns
    S, order = (S * sign).sort(dim=-1, descending=True)
    order = order[:, None, :]
    return Uc.gather(-1, order.expand_as(Uc)), S, (Vc * sign[:, None, :]).gather(-1, order.expand_as(Vc))


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= {minimum})")


def lowrank_svd(G, rank, *, init=None, iters=2, oversample=8, generator=None, backend=None):
    """Top-``rank`` singular triplets of every matrix in G (shape (..., m, n)).

    Returns ``(U, S, Vh)`` with U (..., m, r), S (..., r) sorted descending, Vh (..., r, n),
    r = min(rank, m, n), in G's dtype (computed in fp32, or fp64 for fp64 input); U and Vh
    have orthonormal columns/rows. ``G ≈ U diag(S) Vh`` like ``torch.svd_lowrank``, but
    batched and warm-startable. For ``rank >= min(m, n)`` the result is the exact
    ``torch.linalg.svd``.

    Args:
        G: (..., m, n) real tensor.
        rank: number of triplets r ≥ 1.
        init: optional previous basis to warm-start from, (..., m, c) for the left singular
            vectors (the previous ``U``) or (..., n, c) for the right ones (the previous
            ``Vh.mT``); a square G takes it as left. Usually the smaller side — the one a
            GaLore projector keeps. It need not be orthonormal. The starting basis is its
            first min(c, p) columns plus G·Ω (Ω Gaussian) up to p = min(r + oversample, m, n)
            columns; without ``init`` it is G·Ω alone, on the smaller side.
        iters: subspace-iteration passes (≥ 1; each costs two GEMMs with G). With a warm
            start from a slowly drifting gradient one pass is enough; cold starts want 2+.
        oversample: extra sketch columns beyond r (≥ 0); they speed convergence.
        generator: ``torch.Generator`` on G's device that draws Ω (None:
            the global RNG), or a sequence of them, one per matrix of G's flattened batch,
            each drawing its own matrix's Ω (so a matrix's result does not depend on the
            batch it is computed in). Given the generators' states the result is deterministic.
        backend: None/"auto", "torch" or "triton" (validated; both run the PyTorch
            implementation, see the module docstring).
    """
    if G.ndim < 2 or G.is_complex():
        raise ValueError(f"lowrank_svd needs a real G of shape (..., m, n), got {tuple(G.shape)} {G.dtype}")
    _check_int("rank", rank, 1)
    _check_int("iters", iters, 1)
    _check_int("oversample", oversample, 0)
    choose_backend(G, backend)
    *batch, m, n = G.shape
    k = min(m, n)
    dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    A = G.reshape(-1, m, n).to(dtype)
    if rank >= k:
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return tuple(t.reshape(*batch, *t.shape[1:]).to(G.dtype) for t in (U, S, Vh))
    p = min(rank + oversample, k)

    if init is None:
        left, Q = m <= n, A.new_empty(A.size(0), k, 0)
    else:
        if init.ndim != G.ndim or tuple(init.shape[:-2]) != tuple(batch) or init.size(-2) not in (m, n):
            raise ValueError(f"init of shape {tuple(init.shape)} is no basis for G of shape {tuple(G.shape)}: "
                             f"expected (..., {m}, c) (left) or (..., {n}, c) (right)")
        left = init.size(-2) == m
        Q = init.reshape(A.size(0), init.size(-2), -1)[..., :p].to(dtype)
    if not left:
        A = A.mT
    # Random columns enter as A·Ω (the randomized range finder): already a half pass
    # towards the top subspace, for the price of a thin GEMM.
    size = (A.size(2), p - Q.size(-1))
    if isinstance(generator, (list, tuple)):
        if len(generator) != A.size(0):
            raise ValueError(f"{len(generator)} generators for {A.size(0)} matrices: pass one per matrix")
        omega = torch.stack([torch.randn(size, device=G.device, dtype=dtype, generator=g) for g in generator])
    else:
        omega = torch.randn(A.size(0), *size, device=G.device, dtype=dtype, generator=generator)
    Q = torch.cat([Q, A @ omega], dim=-1)
    Q, _ = _orth(Q)

    for _ in range(iters):
        Q2, _ = _orth(A.mT @ Q)
        Q, R = _orth(A @ Q2)
    Uc, S, Vc = _core_svd(R, rank)  # A Q₂Q₂ᵀ = Q R Q₂ᵀ: Rayleigh-Ritz on the core
    U, Vh = Q @ Uc, Vc.mT @ Q2.mT
    if not left:
        U, Vh = Vh.mT, U.mT
    return (U.reshape(*batch, m, rank).to(G.dtype).contiguous(), S.reshape(*batch, rank).to(G.dtype),
            Vh.reshape(*batch, rank, n).to(G.dtype).contiguous())
