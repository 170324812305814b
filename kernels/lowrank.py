r"""Batched low-rank SVD by warm-started subspace iteration, for refreshing projectors.

For one matrix A (a×b) and p = r + oversample, start from the sketch [Q_init, AΩ] (the
previous basis, if any, filled up to p columns by the randomized range finder, Ω Gaussian
b×(p - c)), Q = orth₁(sketch), then run ``iters`` passes:

.. math::
    Q_2 &= \mathrm{orth}(A^\top Q), \quad Y = A Q_2, \quad Q = \mathrm{orth}_1(Y)
        \ \text{(not after the last pass)} \\
    Y &= \tilde U S \tilde V^\top: \quad \mathrm{eigh}(Y^\top Y) = \tilde V S^2 \tilde V^\top, \quad
        \tilde U S = \mathrm{QR}(Y \tilde V) \qquad \text{(Rayleigh-Ritz)} \\
    A &\approx A Q_2 Q_2^\top = \tilde U\, S\, (Q_2 \tilde V)^\top, \ \text{keep the top } r.

Each pass multiplies the basis by AAᵀ, so the angle between the computed and the true
top-r subspace shrinks by about (σ_{p+1}/σ_r)² per pass (cold: tan θ ~ (σ_{p+1}/σ_r)^(2·iters+1)).
A gradient's top subspace drifts slowly between refreshes, so starting from the previous
basis (``init``), already at a small angle, needs one pass where a cold start needs two.

Orthonormalization is shifted Cholesky-QR in fp32 (fp64 for fp64 input): ``W = YᵀY
+ eps·tr(YᵀY)·I = LLᵀ; Y ← Y L⁻ᵀ``. One round leaves ‖QᵀQ - I‖ ≈ eps·cond(Y)², a second
makes it eps. The intermediate bases (``orth₁``: the sketch's, and the left one between passes)
only have to be well conditioned, so they get one round; the two returned (Q₂, and Ũ from
the Rayleigh-Ritz step) get two. Measured on CPU in fp32 (σ_i = 1/i, 1024×2816 and 2048×5632
at r = 128, 1024×1024 and 2048×5632 at r = 512, cold and warm): one-round intermediates give
the same captured energy to 5 digits as two-round ones, while one round for Q₂ or Ũ leaves
‖QᵀQ - I‖ = 3e-3 (r = 128) to 8e-2 (r = 512) against 3e-7 to 4e-6 with two.

Rayleigh-Ritz squares Y (eigh of YᵀY), like the previous design's eigh of the p×p RRᵀ: it
costs accuracy only in the pairs with σ_i ≲ √eps·σ_1 (never the top ones a projector keeps),
and U, Vh stay orthonormal (Ũ by Cholesky-QR2, Ṽ from eigh). It replaces torch.linalg.svd of
the core, the slow step on a GPU (cuSOLVER's Jacobi SVD: 20 ms for one 520×520 core on an
H200 against 6.7 ms for the previous eigh route).

Failures are collected, not checked as they happen: every Cholesky's ``info``, the last
rounds' pivots (a squared pivot < 0.1 means the round's input was far from orthonormal:
for two rounds, cond(Y) ≳ eps^(-1/2) ≈ 3e3 in fp32), and Y's finiteness give per-entry flags
that are read on the host once, at the end. The entries that failed anywhere are redone
from the same sketch (same Ω), first with three rounds for the returned bases (shifted
CholeskyQR3: good to cond(Y) ~ 1e6 in fp32, which steep spectra need — σ_i = i^-2 at
p = 136 has σ₁/σ_p = 2e4 and used to send every entry to Householder — and rank-deficient
G whose extra directions are rounding noise), then, for what still fails (G = 0,
non-finite), with Householder QR (``torch.linalg.qr``) for every orthonormalization and
``torch.linalg.svd`` of the p×p core, which are right whatever the rank. Every entry keeps
the bits of the first path that succeeded for it; a retry costs one more host sync.

Launches per call (``python -m benchmarks.lowrank``, aten op counts): a warm refresh (iters = 1)
runs 5 Cholesky + 5 triangular solves + 1 eigh and syncs with the host twice (our check and
torch.linalg.eigh's own info check, or, for a core small enough to be diagonalized on the
host, its copy there), a cold one (iters = 2) 7 + 7 + 1 and 2; the previous
design ran 8 + 8 + 1 with 5 syncs, and 12 + 12 + 1 with 7. On an H200 that design spent
3.4 ms of a 3.8 ms warm refresh of 2048×5632 at r = 128 in such small factorizations.

There is one implementation, in PyTorch, on every device. Every step is a GEMM (``AᵀQ``,
``AQ₂``, the Grams) or a small batched factorization (Cholesky, triangular solve, p×p
eigh) that cuBLAS/cuSOLVER run through torch. Profiled on an H200 (previous design,
4096×11008, r = 512, one warm pass: 12 ms), the GEMMs take ~2.5 ms and the factorizations
the rest, so a fused Triton sketch/Gram kernel could save at most the Gram GEMMs (~0.4 ms);
none is written.
"""
import torch

from . import host

# Second-round Cholesky pivots below this (squared) mean the input lost rank: the
# orthogonality error of Cholesky-QR grows like eps·cond(W), cond(W) ≈ 1/pivot².
_MIN_PIVOT2 = 0.1

#: On a GPU, a stack of Rayleigh-Ritz cores (p = rank + oversample) is diagonalized on the
#: host when the host's work, batch·p³, is at most one eigh of this size. cuSOLVER's
#: eigensolvers are latency-bound at such sizes: on an H200 the whole Rayleigh-Ritz step of
#: one p = 136 core took 3.4 ms (benchmarks/results/lowrank-h200-*), while LAPACK's eigh of
#: 136×136 takes 0.67 ms on one core of this repo's 2-core CPU (2.9 ms at 264, 14 ms at 520,
#: growing like p³). Larger stacks stay on the device, whose batched solvers may win there.
#: The copy to the host replaces the host sync eigh's own info check makes anyway.
#: `python -m benchmarks.lowrank` times the refreshes this rule sends to the host both ways,
#: and the eigh alone on device and host.
HOST_EIGH_MAX_P = 256


def _cholqr(Y, rounds):
    """Shifted Cholesky-QR of a stack Y (B, a, p), a ≥ p, in ``rounds`` rounds.

    Returns Q = Y R⁻¹, the diagonal of the upper triangular R, and per-entry success flags,
    without reading anything back to the host. The first round's shift lets its Cholesky
    through whatever cond(Y) is and leaves cond(Q) ≲ √eps·cond(Y) (when that is > 1); each
    further round takes the orthogonality error from eps·cond(Q)² to about eps. So one
    round gives a well-conditioned basis for cond(Y) ≲ 1/eps, two an orthonormal one for
    cond(Y) ≲ eps^(-1/2) (~3e3 in fp32), three for cond(Y) ≲ ~1e6 in fp32 (shifted
    CholeskyQR3, Fukaya et al. 2020). Flags: every Cholesky succeeded and, with more than
    one round, the last round's pivots show its input was nearly orthonormal (else Y had
    lost numerical rank for this many rounds).
    """
    eps = torch.finfo(Y.dtype).eps
    Q, diag, ok = Y, 1.0, torch.ones(Y.shape[0], dtype=torch.bool, device=Y.device)
    for i in range(rounds):
        W = Q.mT @ Q
        if i == 0:
            # The shift keeps rounding from making W indefinite; Y = QR holds whatever it is.
            W.diagonal(dim1=-2, dim2=-1).add_(eps * W.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True))
        L, info = torch.linalg.cholesky_ex(W)
        Q = torch.linalg.solve_triangular(L.mT, Q, upper=True, left=False)
        pivots = L.diagonal(dim1=-2, dim2=-1)
        diag, ok = diag * pivots, ok & (info == 0)  # diag(R) = product of the rounds' diag(Lᵀ)
    if rounds > 1:
        ok = ok & (pivots.square().amin(-1) > _MIN_PIVOT2)
    return Q, diag, ok


def eigh_on_host(batch: int, p: int) -> bool:
    """Whether a GPU stack of ``batch`` p×p cores is diagonalized on the host (``HOST_EIGH_MAX_P``)."""
    return batch * p**3 <= HOST_EIGH_MAX_P**3


def _eigenvectors(W):
    """Eigenvectors of the symmetric p×p stack W (ascending eigenvalues), on the host for a
    small stack on a GPU (see :func:`eigh_on_host`)."""
    if W.is_cuda and eigh_on_host(W.size(0), W.size(-1)):
        return torch.linalg.eigh(W.cpu()).eigenvectors.to(W.device)
    return torch.linalg.eigh(W).eigenvectors


def rayleigh_ritz(Y, rank, rounds):
    """Top-``rank`` SVD Y ≈ Ũ S Ṽᵀ of a stack Y (B, a, p), a ≥ p: (Ũ, S, Ṽ, per-entry success flags).

    The core of :func:`lowrank_svd` (Y = A·Q₂), in place of ``torch.linalg.svd``: eigh(YᵀY)
    gives Ṽ; the columns of YṼ are S_i·ũ_i, nearly orthogonal, so their Cholesky-QR
    (``rounds`` rounds, see the module docstring) returns Ũ and, as its R's diagonal, S. An
    entry whose flag is False (a Cholesky failed, or Y lost numerical rank for that many
    rounds) has factors not to be used: :func:`lowrank_svd` redoes it.
    """
    Vc = _eigenvectors(Y.mT @ Y).flip(-1)[..., :rank]
    U, S, ok = _cholqr(Y @ Vc, rounds)
    S, order = S.sort(dim=-1, descending=True)
    order = order[:, None, :]
    return U.gather(-1, order.expand_as(U)), S, Vc.gather(-1, order.expand_as(Vc)), ok


def _fast(A, sketch, iters, rank, rounds=2):
    """Subspace iteration from ``sketch`` by Cholesky-QR: (U, S, Vh, per-entry success flags).

    ``rounds``: Cholesky-QR rounds for the two bases that are returned (Q₂ and Ũ)."""
    Q, _, ok = _cholqr(sketch, rounds=1)
    for i in range(iters):
        # Intermediate bases only need to be well conditioned; the last right basis
        # Q₂ is returned (inside Vh), so it gets the full ``rounds``.
        last = i == iters - 1
        Q2, _, ok_right = _cholqr(A.mT @ Q, rounds=rounds if last else 1)
        Y = A @ Q2
        ok = ok & ok_right
        if not last:
            Q, _, ok_left = _cholqr(Y, rounds=1)
            ok = ok & ok_left
    # A failed entry is redone anyway; zeroing it keeps eigh (which raises on NaN) going.
    ok = ok & Y.isfinite().all(-1).all(-1)
    U, S, Vc, ok_core = rayleigh_ritz(torch.where(ok[:, None, None], Y, 0), rank, rounds)
    return U, S, Vc.mT @ Q2.mT, ok & ok_core


def _robust(A, sketch, iters, rank):
    """The same iteration with Householder QR and an SVD of the core: for any rank, any conditioning."""
    Q = torch.linalg.qr(sketch)[0]
    for _ in range(iters):
        Q2 = torch.linalg.qr(A.mT @ Q)[0]
        Q, R = torch.linalg.qr(A @ Q2)
    Uc, S, Vch = torch.linalg.svd(R)
    return Q @ Uc[..., :rank], S[..., :rank], Vch[..., :rank, :] @ Q2.mT


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= {minimum})")


def lowrank_svd(G, rank, *, init=None, iters=2, oversample=8, generator=None):
    """Top-``rank`` singular triplets of every matrix in G (shape (..., m, n)).

    Returns ``(U, S, Vh)`` with U (..., m, r), S (..., r) sorted descending, Vh (..., r, n),
    r = min(rank, m, n), in G's dtype (computed in fp32, or fp64 for fp64 input); U and Vh
    have orthonormal columns/rows. ``G ≈ U diag(S) Vh`` like ``torch.svd_lowrank``, but
    batched and warm-startable. For ``rank >= min(m, n)`` the result is the exact
    ``torch.linalg.svd``.

    Args:
        G: (..., m, n) real tensor; a non-finite matrix in it raises ``torch.linalg.LinAlgError``.
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
    """
    if G.ndim < 2 or G.is_complex():
        raise ValueError(f"lowrank_svd needs a real G of shape (..., m, n), got {tuple(G.shape)} {G.dtype}")
    _check_int("rank", rank, 1)
    _check_int("iters", iters, 1)
    _check_int("oversample", oversample, 0)
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
    sketch = torch.cat([Q, A @ omega], dim=-1)
    U, S, Vh, ok = _fast(A, sketch, iters, rank)
    # the one host sync, unless something failed
    failed = host.read(ok, lambda ok: (~ok).nonzero().squeeze(-1), ok.new_empty(0, dtype=torch.int64))
    if len(failed):
        # Redone from the same sketch (same Ω); the other entries keep their bits. A steep
        # spectrum (σ₁/σ_p ≳ 3e3) defeats two Cholesky-QR rounds but not three; what three
        # cannot do (a rank-deficient G) goes to Householder QR.
        U[failed], S[failed], Vh[failed], ok = _fast(A[failed], sketch[failed], iters, rank, rounds=3)
        failed = failed[~ok]
        if len(failed):
            U[failed], S[failed], Vh[failed] = _robust(A[failed], sketch[failed], iters, rank)
    if not left:
        U, Vh = Vh.mT, U.mT
    return (U.reshape(*batch, m, rank).to(G.dtype).contiguous(), S.reshape(*batch, rank).to(G.dtype),
            Vh.reshape(*batch, rank, n).to(G.dtype).contiguous())
