"""lowrank_svd against exact SVDs (scipy / float64) on matrices with gradient-like spectra."""
import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings, strategies as st

from matrixopt.kernels import lowrank_svd
from matrixopt.kernels import lowrank as lowrank_module
from helpers import power_law, with_spectrum

SHAPES = {"tall": (1, 120, 50), "wide": (1, 50, 120), "square": (1, 80, 80), "batched": (3, 60, 90)}


def low_rank_plus_noise(batch, m, n, seed, signal_rank=10, noise=0.3):
    sigma = torch.zeros(min(m, n), dtype=torch.float64)
    sigma[:signal_rank] = torch.linspace(1, 0.3, signal_rank, dtype=torch.float64)
    G = with_spectrum(batch, m, n, sigma, seed)
    E = torch.randn(batch, m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return G + noise * E * sigma.norm() / (m * n) ** 0.5


SPECTRA = {"power_law": power_law, "low_rank_noise": low_rank_plus_noise}


def exact_singular_values(G):
    return np.stack([scipy.linalg.svdvals(g) for g in G.double().reshape(-1, *G.shape[-2:]).numpy()])


def captured_energy(U, G):
    """Per matrix ‖U_rᵀG‖²_F / Σ_{i≤r} σ_i² (σ from scipy, float64)."""
    r = U.shape[-1]
    G = G.double().reshape(-1, *G.shape[-2:])
    top = np.square(exact_singular_values(G)[:, :r]).sum(-1)
    return (U.double().reshape(-1, G.shape[-2], r).mT @ G).square().sum((-2, -1)).numpy() / top


def assert_orthonormal(X, tol):
    """Columns of X (..., d, r) orthonormal to ``tol``."""
    eye = torch.eye(X.shape[-1], dtype=torch.float64)
    assert (X.double().mT @ X.double() - eye).abs().max().item() <= tol


def drift(G, seed, step=0.05):
    """The next step's gradient: singular vectors and values of G perturbed by ~``step``."""
    g = torch.Generator().manual_seed(seed)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    U = U + step * torch.randn(U.shape, dtype=U.dtype, generator=g) / U.shape[-2] ** 0.5
    Vh = Vh + step * torch.randn(Vh.shape, dtype=Vh.dtype, generator=g) / Vh.shape[-1] ** 0.5
    S = S * (1 + step * torch.randn(S.shape, dtype=S.dtype, generator=g))
    return (U * S[..., None, :]) @ Vh


def smaller_side(U, Vh):
    """The basis a GaLore projector keeps and ``init`` takes: U if m ≤ n, else V."""
    return U if U.shape[-2] <= Vh.shape[-1] else Vh.mT


def wide(G):
    """G oriented so that its left side is the smaller one (where ``smaller_side`` lives)."""
    return G if G.shape[-2] <= G.shape[-1] else G.mT


@pytest.fixture
def fast_path_only(monkeypatch):
    """The accuracy a test asserts is the Cholesky-QR path's: no entry may be redone robustly."""
    def robust(*args):
        raise AssertionError("an entry left the fast path")

    monkeypatch.setattr(lowrank_module, "_robust", robust)


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("shape", SHAPES)
def test_cold_start_captures_99_percent_and_matches_top_singular_values(spectrum, shape, fast_path_only):
    G = SPECTRA[spectrum](*SHAPES[shape], seed=0)
    U, S, Vh = lowrank_svd(G.float(), 12, generator=torch.Generator().manual_seed(1))
    assert U.shape == (*G.shape[:-1], 12) and S.shape == (G.shape[0], 12) and Vh.shape == (G.shape[0], 12, G.shape[-1])
    assert captured_energy(U, G).min() >= 0.99
    sigma = exact_singular_values(G)
    # The leading values converge fastest (error ~ (σ_{p+1}/σ_i)^(4·passes)); the last few of r
    # sit where the spectrum is flat and converge slowest.
    np.testing.assert_allclose(S[:, :6].numpy(), sigma[:, :6], rtol=1e-3)
    np.testing.assert_allclose(S.numpy(), sigma[:, :12], rtol=0.1)
    assert (S <= torch.from_numpy(sigma[:, :12]).float() * (1 + 1e-5)).all(), "Ritz values exceed σ_i"


@pytest.mark.parametrize("shape", SHAPES)
def test_warm_start_one_pass_tracks_a_drifting_gradient(shape, fast_path_only):
    """GaLore-style refreshes: each from the previous basis, one pass, ≥ 99% energy."""
    G = power_law(*SHAPES[shape], seed=2)
    generator = torch.Generator().manual_seed(3)
    U, S, Vh = lowrank_svd(G.float(), 12, iters=3, generator=generator)
    for step in range(4):
        G = drift(G, seed=10 + step)
        basis = smaller_side(U, Vh)
        stale = captured_energy(basis, wide(G))  # the pass, not the stale basis, restores the energy
        U, S, Vh = lowrank_svd(G.float(), 12, init=basis, iters=1, generator=generator)
        energy = captured_energy(smaller_side(U, Vh), wide(G))
        assert energy.min() >= 0.99
        assert (energy > stale).all()


def test_warm_start_beats_cold_start_at_one_pass(fast_path_only):
    G0 = power_law(2, 64, 160, seed=4, alpha=0.7)
    G1 = drift(G0, seed=5)
    U0 = torch.linalg.svd(G0)[0][..., :16].float()
    warm = lowrank_svd(G1.float(), 16, init=U0, iters=1, generator=torch.Generator().manual_seed(0))[0]
    cold = lowrank_svd(G1.float(), 16, iters=1, generator=torch.Generator().manual_seed(0))[0]
    warm, cold = captured_energy(warm, G1), captured_energy(cold, G1)
    assert (1 - warm < 0.5 * (1 - cold)).all() and warm.min() >= 0.99


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), m=st.integers(2, 48), n=st.integers(2, 48), rank=st.integers(1, 52),
       iters=st.integers(1, 3), seed=st.integers(0, 2**16), use_init=st.booleans())
def test_triplets_are_orthonormal_sorted_and_paired(batch, m, n, rank, iters, seed, use_init):
    generator = torch.Generator().manual_seed(seed)
    G = torch.randn(batch, m, n, generator=generator)
    init = torch.randn(batch, min(m, n), rank, generator=generator) if use_init else None
    U, S, Vh = lowrank_svd(G, rank, init=init, iters=iters, generator=generator)
    r = min(rank, m, n)
    assert U.shape == (batch, m, r) and S.shape == (batch, r) and Vh.shape == (batch, r, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert_orthonormal(U, 1e-5)
    assert_orthonormal(Vh.mT, 1e-5)
    assert (S >= 0).all() and (S[:, :-1] >= S[:, 1:]).all()
    scale = G.double().norm(dim=(-2, -1))[:, None, None]
    # Ritz triplets: UᵀGV = diag(S), and no Ritz value exceeds the true σ_i.
    core = U.double().mT @ G.double() @ Vh.double().mT
    assert ((core - torch.diag_embed(S.double())).abs() <= 1e-5 * scale).all()
    sigma = torch.from_numpy(exact_singular_values(G)[:, :r])
    assert (S.double() <= sigma * (1 + 1e-5) + 1e-6 * scale[:, 0]).all()


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), m=st.integers(2, 120), n=st.integers(2, 120), rank=st.integers(1, 40),
       iters=st.integers(1, 3), alpha=st.floats(0, 4), zero_tail=st.booleans(), warm=st.booleans(),
       seed=st.integers(0, 2**16))
def test_orthonormal_whatever_the_spectrum(batch, m, n, rank, iters, alpha, zero_tail, warm, seed):
    """σ_i = i^-α, optionally exactly 0 past i = 3: fast spectra and lost rank reach the robust path."""
    k = min(m, n)
    sigma = torch.arange(1, k + 1, dtype=torch.float64) ** -alpha
    if zero_tail:
        sigma[3:] = 0
    G = with_spectrum(batch, m, n, sigma, seed)
    init = smaller_side(*torch.linalg.svd(drift(G, seed), full_matrices=False)[::2])[..., :rank] if warm else None
    U, S, Vh = lowrank_svd(G.float(), rank, init=None if init is None else init.float(), iters=iters,
                           generator=torch.Generator().manual_seed(seed))
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    assert_orthonormal(U, 1e-5)
    assert_orthonormal(Vh.mT, 1e-5)
    assert (S >= 0).all() and (S[:, :-1] >= S[:, 1:]).all()
    assert (S[:, 0].double() <= sigma[0] * (1 + 1e-5)).all()


@pytest.mark.parametrize("shape, rank", [((40, 25), 25), ((25, 40), 100), ((2, 3, 16, 16), 16)])
def test_rank_at_least_min_dim_is_the_exact_svd(shape, rank):
    G = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    k = min(shape[-2:])
    U, S, Vh = lowrank_svd(G, rank)
    assert U.shape == (*shape[:-1], k) and S.shape == (*shape[:-2], k) and Vh.shape == (*shape[:-2], k, shape[-1])
    np.testing.assert_allclose(S.reshape(-1, k).numpy(), exact_singular_values(G), rtol=1e-12)
    torch.testing.assert_close((U * S[..., None, :]) @ Vh, G, rtol=0, atol=1e-12)


@pytest.mark.parametrize("use_init", [False, True])
def test_zero_matrix_gives_zero_values_and_orthonormal_bases(use_init):
    G = torch.zeros(2, 30, 50)
    init = torch.randn(2, 30, 6) if use_init else None
    U, S, Vh = lowrank_svd(G, 6, init=init)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert (S == 0).all()
    assert_orthonormal(U, 1e-6)
    assert_orthonormal(Vh.mT, 1e-6)


def test_rank_deficient_and_mixed_batch():
    """A rank-3 matrix asked for 8 triplets, next to a zero and a full-rank one in one batch."""
    g = torch.Generator().manual_seed(7)
    G = torch.stack([torch.randn(40, 3, generator=g) @ torch.randn(3, 70, generator=g),
                     torch.zeros(40, 70), torch.randn(40, 70, generator=g)])
    U, S, Vh = lowrank_svd(G, 8, generator=g)
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    assert_orthonormal(U, 1e-5)
    assert_orthonormal(Vh.mT, 1e-5)
    sigma = exact_singular_values(G)
    np.testing.assert_allclose(S[0, :3].numpy(), sigma[0, :3], rtol=1e-4)
    assert (S[0, 3:] <= 1e-5 * S[0, 0]).all() and (S[1] == 0).all()
    torch.testing.assert_close((U[0] * S[0]) @ Vh[0], G[0], rtol=0, atol=1e-4)
    assert captured_energy(U[2:], G[2:]).min() >= 0.9


def test_deterministic_given_the_generator():
    G = power_law(2, 50, 90, seed=8).float()
    first = lowrank_svd(G, 10, generator=torch.Generator().manual_seed(42))
    again = lowrank_svd(G, 10, generator=torch.Generator().manual_seed(42))
    other = lowrank_svd(G, 10, generator=torch.Generator().manual_seed(43))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_one_generator_per_matrix_makes_each_result_independent_of_its_batch():
    G = power_law(3, 50, 90, seed=8).float()
    seeds = [5, 6, 7]
    together = lowrank_svd(G, 10, generator=[torch.Generator().manual_seed(s) for s in seeds])
    for b, s in enumerate(seeds):
        alone = lowrank_svd(G[b:b + 1], 10, generator=[torch.Generator().manual_seed(s)])
        for x, y in zip(together, alone):   # equal up to rounding; another seed moves them by O(1)
            torch.testing.assert_close(x[b:b + 1], y, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one per matrix"):
        lowrank_svd(G, 10, generator=[torch.Generator()])


def test_leading_dims_are_flattened_batches():
    G = torch.randn(2, 3, 30, 20, generator=torch.Generator().manual_seed(9))
    U, S, Vh = lowrank_svd(G, 5, generator=torch.Generator().manual_seed(0))
    flat = lowrank_svd(G.reshape(6, 30, 20), 5, generator=torch.Generator().manual_seed(0))
    assert U.shape == (2, 3, 30, 5) and S.shape == (2, 3, 5) and Vh.shape == (2, 3, 5, 20)
    for a, b in zip((U, S, Vh), flat):
        assert torch.equal(a.reshape(b.shape), b)


def test_init_side_and_width(fast_path_only):
    G = power_law(1, 90, 40, seed=10)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    for init in (U[..., :12], Vh[..., :12, :].mT, U[..., :3], Vh[..., :30, :].mT):  # left, right, narrow, wide
        Ur, _, Vhr = lowrank_svd(G.float(), 12, init=init.float(), iters=1, generator=torch.Generator().manual_seed(0))
        assert captured_energy(Ur, G).min() >= 0.99
        assert_orthonormal(Vhr.mT, 1e-5)
    with pytest.raises(ValueError, match="init"):
        lowrank_svd(G.float(), 12, init=torch.randn(1, 50, 12))
    with pytest.raises(ValueError, match="init"):
        lowrank_svd(G.float(), 12, init=torch.randn(2, 90, 12))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype, fast_path_only):
    G = power_law(2, 48, 64, seed=11)
    U, S, Vh = lowrank_svd(G.to(dtype), 8, generator=torch.Generator().manual_seed(0))
    assert U.dtype == S.dtype == Vh.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-2  # half-precision rounding of the outputs
    assert_orthonormal(U, tol)
    assert_orthonormal(Vh.mT, tol)
    assert captured_energy(U, G).min() >= 0.99


def test_cholqr_one_round_conditions_two_rounds_orthonormalize_and_flag_rank_loss():
    """Against Householder QR in float64: cond(Y) = 1, 1e2, 1e3, then rank 4 of 10, then zero."""
    conditioned = [with_spectrum(1, 60, 10, torch.logspace(0, -e, 10, dtype=torch.float64), seed=e)[0]
                   for e in (0, 2, 3)]
    deficient = with_spectrum(1, 60, 10, torch.tensor([1.0] * 4 + [0.0] * 6, dtype=torch.float64), seed=4)[0]
    Y = torch.stack([*conditioned, deficient, torch.zeros(60, 10, dtype=torch.float64)]).float()
    Qh, Rh = torch.linalg.qr(Y[:3].double())
    eps = torch.finfo(torch.float32).eps
    Q1, _, ok1 = lowrank_module._cholqr(Y, rounds=1)
    assert ok1[:3].all() and not ok1[4]  # one round only checks that Cholesky ran
    for Q, cond in zip(Q1[:3].double(), (1.0, 1e2, 1e3)):  # well conditioned: ‖QᵀQ - I‖ ≲ eps·cond²
        assert_orthonormal(Q, 10 * eps * cond**2 + 1e-6)
    torch.testing.assert_close(Q1[:3].double() - Qh @ (Qh.mT @ Q1[:3].double()), torch.zeros(3, 60, 10,
                               dtype=torch.float64), rtol=0, atol=1e-5)  # same column space
    Q2, diag, ok2 = lowrank_module._cholqr(Y, rounds=2)
    assert ok2.tolist() == [True, True, True, False, False]
    assert_orthonormal(Q2[:3], 1e-5)
    torch.testing.assert_close(Q2[:3].double() @ Q2[:3].double().mT, Qh @ Qh.mT, rtol=0, atol=1e-5)
    torch.testing.assert_close(diag[:3].double(), Rh.diagonal(dim1=-2, dim2=-1).abs(), rtol=1e-4, atol=0)


def test_failed_entries_are_redone_robustly_from_the_same_sketch_and_the_others_keep_their_bits(monkeypatch):
    g = torch.Generator().manual_seed(7)
    rank_3 = torch.randn(40, 3, generator=g) @ torch.randn(3, 70, generator=g)
    G = torch.stack([torch.randn(40, 70, generator=g), rank_3, power_law(1, 40, 70, seed=8)[0].float(),
                     torch.zeros(40, 70)])
    fast, householder, recorded, qr_batches = lowrank_module._fast, torch.linalg.qr, {}, []

    def recording_fast(A, sketch, iters, rank, rounds=2):
        out = fast(A, sketch, iters, rank, rounds)
        recorded[rounds] = sketch.clone(), out
        return tuple(t.clone() for t in out)

    def counting_qr(X):
        qr_batches.append(X.shape[0])
        return householder(X)

    monkeypatch.setattr(lowrank_module, "_fast", recording_fast)
    monkeypatch.setattr(torch.linalg, "qr", counting_qr)
    out = lowrank_svd(G, 8, iters=2, generator=[torch.Generator().manual_seed(s) for s in range(4)])
    sketch, (*two_rounds, ok) = recorded[2]
    assert ok.tolist() == [True, False, True, False]
    *three_rounds, ok = recorded[3][1]  # the retry of entries 1 and 3
    assert ok.tolist() == [True, False]  # three rounds orthonormalize rank 3 + rounding noise, not zero
    assert qr_batches == [1] * 5  # every orthonormalization of the zero matrix, and only it
    robust_out = lowrank_module._robust(G[[3]], sketch[[3]], 2, 8)
    for x, f, t, r in zip(out, two_rounds, three_rounds, robust_out):
        assert torch.equal(x[[0, 2]], f[[0, 2]]) and torch.equal(x[1], t[0]) and torch.equal(x[[3]], r)
    U, S, Vh = out
    assert_orthonormal(U[1], 1e-5) and assert_orthonormal(Vh[1].mT, 1e-5)
    torch.testing.assert_close((U[1] * S[1]) @ Vh[1], G[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("alpha", [2.0, 2.5])
def test_steep_spectra_take_a_third_cholesky_qr_round_not_householder(alpha, monkeypatch):
    """σ_i = i^-α with σ₁/σ_p ~ 1e4-1e5 (p = 20): two Cholesky-QR rounds flag it, three
    succeed, so no Householder QR; the result is orthonormal and captures the energy, and a
    gentle matrix in the same batch keeps the two-round result bit for bit."""
    G = torch.cat([power_law(2, 60, 150, seed=21, alpha=alpha), power_law(1, 60, 150, seed=22)]).float()
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: pytest.fail("fell back to Householder"))
    generators = lambda: [torch.Generator().manual_seed(s) for s in range(3)]
    for init, iters in ((None, 2), (torch.linalg.svd(G)[0][..., :12], 1)):
        U, S, Vh = lowrank_svd(G, 12, init=init, iters=iters, generator=generators())
        assert_orthonormal(U, 1e-5)
        assert_orthonormal(Vh.mT, 1e-5)
        assert captured_energy(U, G).min() >= 0.99
        alone = lowrank_svd(G[2:], 12, init=None if init is None else init[2:], iters=iters, generator=generators()[2:])
        assert all(torch.equal(x[2:], y) for x, y in zip((U, S, Vh), alone))


@pytest.mark.parametrize("batch, offset, on_host", [(1, 0, True), (1, 1, False), (8, -128, True), (9, -128, False)])
def test_small_cores_on_a_gpu_are_diagonalized_on_the_host(monkeypatch, batch, offset, on_host):
    """On a GPU tensor, a stack whose host work batch·p³ is at most HOST_EIGH_MAX_P³ goes
    through the host (one copy there), a larger one stays on the device; the eigenvectors are
    the same either way. (A CPU tensor posing as a CUDA one: the copies are no-ops here, the
    routing is what is checked.)"""
    p = lowrank_module.HOST_EIGH_MAX_P + offset
    Y = torch.randn(batch, p + 3, p, generator=torch.Generator().manual_seed(2))
    W = Y.mT @ Y
    copies, to_cpu = [], torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: copies.append(self.shape) or to_cpu(self))
    V = lowrank_module._eigenvectors(W)
    assert copies == ([W.shape] if on_host else [])
    torch.testing.assert_close(V.abs(), torch.linalg.eigh(W).eigenvectors.abs())


@pytest.mark.parametrize("core_rank", [12, 4])
def test_rayleigh_ritz_matches_scipy(core_rank):
    """The eigh route on Y (40×12): full-rank, and rank-deficient (flagged for the robust path)."""
    g = torch.Generator().manual_seed(13)
    Y = torch.randn(3, 40, core_rank, generator=g) @ torch.randn(3, core_rank, 12, generator=g)
    U, S, Vc, ok = lowrank_module.rayleigh_ritz(Y, 8, rounds=2)
    sigma = exact_singular_values(Y)[:, :8]
    if core_rank < 8:
        assert not ok.any()
        np.testing.assert_allclose(S[:, :core_rank].numpy(), sigma[:, :core_rank], rtol=0, atol=1e-5 * sigma.max())
        return
    assert ok.all()
    np.testing.assert_allclose(S.numpy(), sigma, rtol=0, atol=1e-5 * sigma.max())
    assert_orthonormal(U, 1e-5)
    assert_orthonormal(Vc, 1e-5)
    torch.testing.assert_close(U.mT @ Y @ Vc, torch.diag_embed(S), rtol=0, atol=1e-5 * sigma.max())


def test_bad_arguments_raise_naming_them():
    G = torch.randn(10, 12)
    for kwargs, name in [({"rank": 0}, "rank"), ({"rank": 2.0}, "rank"), ({"rank": True}, "rank"),
                         ({"rank": 2, "iters": 0}, "iters"), ({"rank": 2, "oversample": -1}, "oversample")]:
        with pytest.raises(ValueError, match=name):
            lowrank_svd(G, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        lowrank_svd(torch.randn(10), 2)
    G[3, 4] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError):
        lowrank_svd(G, 2)
