"""ROOT: outlier suppression, per-shape NS coefficients, and the optimizer built on them."""
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import matrixopt
from matrixopt.ns_fit import LLAMA_WIDTHS, llama_shapes, ns_deviation, spectrum_floor
from matrixopt.orthogonalize import (MAX_PEAK, MUON_COEFFICIENTS, ROOT_RELEASED_COEFFICIENTS, orthogonalize,
                                     root_coefficients, shipped_table)
from matrixopt.root import abs_quantile
from helpers import bf16_steps, digits_losses, with_spectrum

# -- the outlier threshold -----------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.integers(1, 40), st.floats(0.0, 1.0, exclude_min=True),
       st.sampled_from([torch.float32, torch.float64]))
def test_quantile_matches_torch_quantile(B, m, n, q, dtype):
    X = torch.randn(B, m, n, dtype=dtype, generator=torch.Generator().manual_seed(m * n))
    want = torch.quantile(X.abs().flatten(1), q, dim=1)
    torch.testing.assert_close(abs_quantile(X, q), want)


def ns_reference(X, triple, steps=5):
    """Frobenius-normalized NS in float64 on the wide orientation."""
    X = X.double()
    tall = X.shape[-2] > X.shape[-1]
    X = X.mT if tall else X
    X = X / X.norm(dim=(-2, -1), keepdim=True)
    a, b, c = triple
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_steps_match_float64_reference(shape, nesterov):
    """Two ROOT steps against the definition, with ε from torch.quantile and soft-thresholding."""
    torch.manual_seed(0)
    m, n = shape
    lr, wd, mu, q = 0.02, 0.1, 0.9, 0.8
    W = torch.randn(m, n, dtype=torch.float64)
    p = nn.Parameter(W.float())
    opt = matrixopt.ROOT([p], lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd,
                         threshold_quantile=q, ns_dtype=torch.float32)
    triple = root_coefficients(m, n)
    buf = torch.zeros_like(W)
    for _ in range(2):
        G = torch.randn(m, n, dtype=torch.float64) * torch.rand(m, 1, dtype=torch.float64)
        G[0, 0] = 50.0  # an outlier
        p.grad = G.float()
        opt.step()
        buf = mu * buf + (1 - mu) * G
        M = (1 - mu) * G + mu * buf if nesterov else buf
        eps = torch.quantile(M.abs().flatten(), q)
        clipped = M - M.sign() * (M.abs() - eps).clamp_min(0)
        W = W * (1 - lr * wd) - lr * 0.5 * max(m, n) ** 0.5 * ns_reference(clipped, triple)
    torch.testing.assert_close(p.data.double(), W, atol=2e-5, rtol=0)


def test_without_threshold_it_is_muon():
    torch.manual_seed(0)
    W, G = torch.randn(2, 16, 24), torch.randn(2, 16, 24)
    ps = [nn.Parameter(W.clone()) for _ in range(2)]
    root = matrixopt.ROOT([ps[0]], threshold_quantile=None, ns_coefficients="muon", lr=0.1)
    muon = matrixopt.Muon([ps[1]], ns_coefficients="muon", lr=0.1)
    for p, opt in zip(ps, (root, muon)):
        p.grad = G.clone()
        opt.step()
    assert torch.equal(ps[0], ps[1])


def test_threshold_changes_the_step():
    torch.manual_seed(0)
    W, G = torch.randn(16, 24), torch.randn(16, 24)
    G[3, 5] = 100.0
    ps = [nn.Parameter(W.clone()) for _ in range(2)]
    for p, q in zip(ps, (0.9, None)):
        p.grad = G.clone()
        matrixopt.ROOT([p], threshold_quantile=q, lr=0.1).step()
    assert (ps[0] - ps[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name,value", [("threshold_quantile", 0.0), ("threshold_quantile", 1.5),
                                        ("threshold_quantile", "0.9"), ("ns_coefficients", "autox"),
                                        ("ns_steps", 0), ("momentum", 1.0)])
def test_invalid_hyperparameters(name, value):
    with pytest.raises(ValueError, match=name):
        matrixopt.ROOT([nn.Parameter(torch.zeros(4, 4))], **{name: value})


def test_bf16_params():
    bf16_steps(matrixopt.ROOT)


# -- per-shape coefficients ------------------------------------------------------------------


def test_llama_shapes():
    # ff as LLaMA rounds 8d/3 up to a multiple of 256; GQA k/v with n_kv_heads = n_heads/4.
    assert llama_shapes(512) == [(512, 512), (512, 1536), (128, 512)]
    assert llama_shapes(4096) == [(4096, 4096), (4096, 11008), (1024, 4096)]


# ROOT's per-shape 5-step triples as released with the paper (He et al. 2025, arXiv 2511.20626).
RELEASED = {
    (2048, 2048): (3.4916, -4.8224, 2.1095),
    (2048, 3072): (3.4509, -4.5790, 1.9325),
    (2048, 8192): (2.9794, -3.6674, 1.6207),
    (2048, 16384): (3.1943, -3.8221, 1.5322),
}


def composed_peak(triple, steps=5):
    """max over σ in [0, 1] of p^steps(σ), p(x) = ax + bx³ + cx⁵, on 200,001 points (numpy)."""
    a, b, c = triple
    x = np.linspace(0.0, 1.0, 200_001)
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return float(x.max())


def composed_deviation(triple, lo, steps=5):
    """max over σ in [lo, 1] of |p^steps(σ) - 1| (numpy, 20,001 log-spaced points)."""
    a, b, c = triple
    x = np.geomspace(lo, 1.0, 20_001)
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return float(np.abs(x - 1).max())


def test_auto_takes_the_released_triples_unless_they_overshoot():
    """The released triples (written out above from the paper) are what "auto" gives for their
    shapes, in both orientations, except the square one: after 5 steps it lifts some σ in
    [0, 1] above 3, so "auto" gives another triple there, one that stays under MAX_PEAK."""
    assert ROOT_RELEASED_COEFFICIENTS == RELEASED
    for (k, K), triple in RELEASED.items():
        if (k, K) == (2048, 2048):
            assert composed_peak(triple) > 3
            assert root_coefficients(k, K) != triple and composed_peak(root_coefficients(k, K)) <= MAX_PEAK
        else:
            assert composed_peak(triple) <= MAX_PEAK
            assert root_coefficients(k, K) == triple == root_coefficients(K, k)


def test_shipped_table_covers_the_llama_shapes_and_never_overshoots():
    """Every LLaMA shape of the shipped widths has a triple (so no fit runs for them at step
    time), and no triple "auto" can pick lifts any σ in [0, 1] above MAX_PEAK after 5 steps
    (the composed polynomial evaluated here with numpy)."""
    table = shipped_table()
    assert {(min(s), max(s)) for d in LLAMA_WIDTHS for s in llama_shapes(d)} <= set(table)
    assert len(table) == 15
    for shape in [*RELEASED, *table]:
        assert composed_peak(root_coefficients(*shape)) <= MAX_PEAK, shape
        assert composed_peak(root_coefficients(*shape[::-1])) <= MAX_PEAK, shape


def test_auto_never_overshoots_on_a_matrix():
    """The released 2048×2048 triple maps a matrix with σ₁ ≈ 0.56 (after normalization) to
    σ₁ > 3; "auto"'s triple for that shape keeps it below MAX_PEAK."""
    U, V = (torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))[0] for _ in range(2))
    sigma = torch.full((64,), ((1 - 0.56**2) / 63) ** 0.5, dtype=torch.float64)
    sigma[0] = 0.56  # Frobenius norm 1: NS sees σ₁ = 0.56
    X = (U * sigma) @ V.T
    assert torch.linalg.svdvals(ns_reference(X, RELEASED[(2048, 2048)]))[0].item() > 3
    assert torch.linalg.svdvals(ns_reference(X, root_coefficients(2048, 2048)))[0].item() < MAX_PEAK


def test_other_step_counts_get_their_own_fit():
    """A 4-step triple is fitted for 4 steps: run 4 steps it keeps [floor, 1] in a tighter
    band than the 5-step triple run 4 steps (and than Muon's)."""
    shape = (512, 1536)
    four, five = root_coefficients(*shape, 4), root_coefficients(*shape)
    floor = spectrum_floor(*shape)
    assert four != five
    assert composed_deviation(four, floor, 4) < 0.5 * composed_deviation(five, floor, 4)
    assert composed_deviation(four, floor, 4) < composed_deviation(MUON_COEFFICIENTS, floor, 4)
    assert composed_peak(four, 4) <= MAX_PEAK


def test_fit_is_fast_and_cached_per_process():
    start = time.perf_counter()
    triple = root_coefficients(40, 56)
    assert time.perf_counter() - start < 5.0
    start = time.perf_counter()
    assert root_coefficients(56, 40) is triple
    assert time.perf_counter() - start < 0.01


def spectrum_matrix(shape, kind, seed=0):
    """A float64 matrix of ``shape`` with one of the two spectra the fit is made for: a
    Gaussian matrix's (Marchenko-Pastur) or the power law σ_i = i^(-1/2) with random singular
    vectors."""
    m, n = shape
    if kind == "gaussian":
        return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return with_spectrum(1, m, n, torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -0.5, seed)[0]


def band_above_tail(O, tail=0.05):
    """max |σ - 1| over O's singular values (svdvals, float64) from their ``tail`` quantile
    up (numpy's linear quantile: the smallest ceil(tail·(k - 1)) of k are left out)."""
    sigma = torch.linalg.svdvals(O.double())
    return (sigma[:len(sigma) - math.ceil(tail * (len(sigma) - 1))] - 1).abs().max().item()


def band_of_inputs_above_tail(X, O, tail=0.05):
    """max |σ_i(O) - 1| over X's singular directions whose σ_i(X) is at least the ``tail``
    quantile of X's spectrum. σ_i(O) is read along X's own singular vectors, u_iᵀ O v_i;
    that O holds nothing else (is diagonal in that basis) is checked against svdvals(O)."""
    U, sigma, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    gains = (U.mT @ O.double() @ Vh.mT).diagonal()
    measured = torch.linalg.svdvals(O.double())
    torch.testing.assert_close(gains.abs().sort(descending=True).values, measured, rtol=0, atol=1e-9)
    kept = sigma >= torch.quantile(sigma, tail)
    return (gains[kept] - 1).abs().max().item()


#: The shipped shapes small enough for float64 NS and SVDs here (a few seconds in all).
SMALL_SHIPPED = [(128, 512), (192, 768), (256, 1024), (512, 512), (512, 1536), (512, 2048), (768, 768)]
#: For square shapes the table's floor (spectrum_floor: the 5% quantile of one sampled
#: 256-row Gaussian spectrum) sits ~7% above the 5% quantile measured on Gaussian matrices
#: of the shape (512²: 3.76e-3 against 3.3e-3 to 3.65e-3 over seeds; 768²: 3.07e-3 against
#: 2.81e-3 to 2.94e-3), so ~6% of their singular values fall below it, and the steep part of
#: the polynomial there puts the top 95% at 0.17-0.18 from 1 rather than the 0.10-0.12 the
#: fit states (still well inside Muon's 0.31).
SQUARE_FLOOR_TOO_HIGH = pytest.mark.xfail(
    strict=True, reason="spectrum_floor overestimates the 5% quantile of square Gaussian spectra")


@pytest.mark.parametrize("kind", ["gaussian", "power"])
@pytest.mark.parametrize("shape", SMALL_SHIPPED, ids=[f"{m}x{n}" for m, n in SMALL_SHIPPED])
def test_shipped_triple_keeps_real_spectra_in_the_stated_band(request, shape, kind):
    """The fit states that every normalized singular value of a momentum-like matrix of the
    shape, bar its smallest 5%, ends within its objective (max |p⁵(σ) - 1| over
    [spectrum_floor, 1], evaluated here with numpy) of 1. Measured: 5 NS steps (float64) on
    a matrix with that spectrum, read along its singular vectors (and checked against
    svdvals); and that band is tighter than the one Muon's triple gives the same matrix."""
    if kind == "gaussian" and shape[0] == shape[1]:
        request.applymarker(SQUARE_FLOOR_TOO_HIGH)
    triple = shipped_table()[shape]
    stated = composed_deviation(triple, spectrum_floor(*shape))
    assert stated < 0.5 * composed_deviation(MUON_COEFFICIENTS, spectrum_floor(*shape))
    X = spectrum_matrix(shape, kind)
    ours = band_of_inputs_above_tail(X, ns_reference(X, triple))
    muon = band_of_inputs_above_tail(X, ns_reference(X, MUON_COEFFICIENTS))
    assert ours < 0.7 * muon, (ours, muon)
    assert ours <= stated * 1.05 + 1e-3, (ours, stated)


@pytest.mark.parametrize("kind", ["gaussian", "power"])
@pytest.mark.parametrize("shape", [(512, 1536), (1536, 512)], ids=["wide", "tall"])
def test_auto_update_has_a_tighter_band_than_muons(shape, kind):
    """One ROOT step from W = 0 (no momentum, lr 1, no scaling: the update is NS(clip(G))):
    with "auto" its singular values, bar the smallest 5%, lie within 0.03 of 1; with Muon's
    triple, same clipping, the band is 0.24-0.31 wide; and no singular value exceeds 1.05."""
    G = spectrum_matrix(shape, kind).float()

    def update(**kw):
        W = nn.Parameter(torch.zeros(shape))
        W.grad = G.clone()
        matrixopt.ROOT([W], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0, lr_scaling="none",
                       ns_dtype=torch.float32, **kw).step()
        return -W.detach()

    auto, muon = update(), update(ns_coefficients="muon")
    assert band_above_tail(auto) < 0.03 < 0.2 < band_above_tail(muon)
    assert torch.linalg.svdvals(auto.double()).max().item() < 1.05


@pytest.mark.parametrize("shape", list(ROOT_RELEASED_COEFFICIENTS))
def test_fit_beats_released_and_muon_triples_on_its_objective(shape):
    """The fit does not reproduce the released triples; on the stated objective it is better.

    The objective is the worst |p⁵(σ) - 1| over σ in [spectrum_floor, 1]. The released
    square triple maps σ ≈ 0.56 far above 1 (p(x) exceeds the band that p⁵ brings back to 1),
    and the rectangular ones leave a wider band than needed for their well-conditioned shapes.
    """
    sigma = np.geomspace(spectrum_floor(*shape), 1.0, 2000)
    fitted = matrixopt.fit_ns_coefficients(*shape)
    ours = ns_deviation(fitted, sigma)
    assert ours < 0.9 * ns_deviation(ROOT_RELEASED_COEFFICIENTS[shape], sigma)
    assert ours < 0.9 * ns_deviation(MUON_COEFFICIENTS, sigma)


def gradient_like(shape, kind, seed):
    """A matrix U diag(σ) Vᵀ with a Gaussian matrix's or a power-law spectrum, and U, V, σ."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    if kind == "gaussian":
        sigma = torch.linalg.svdvals(torch.randn(m, n, generator=g, dtype=torch.float64))
    else:
        sigma = torch.arange(1, k + 1, dtype=torch.float64) ** -0.5
    return U @ torch.diag(sigma) @ V.T, U, V, sigma / sigma.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 512), (512, 128), (512, 512)])
def test_fitted_triple_orthogonalizes_more_accurately_than_muons(shape, dtype):
    """max |σ_i(O) - 1| after 5 steps over the singular directions σ_i ≥ spectrum_floor.

    σ_i(O) is read as u_iᵀ O v_i along X's own singular vectors (in exact arithmetic the
    singular values of O are p⁵(σ_i) along them); the directions below the floor, which no
    5-step quintic lifts to 1, are left out as in the fit.
    """
    floor = spectrum_floor(*shape)
    fitted = root_coefficients(*shape)
    errors = {}
    for name, triple in [("fitted", fitted), ("muon", MUON_COEFFICIENTS)]:
        worst = 0.0
        for seed, kind in enumerate(["gaussian", "power"]):
            X, U, V, sigma = gradient_like(shape, kind, seed)
            O = orthogonalize(X[None].to(dtype), [triple] * 5)[0].double()
            gains = (U.T @ O @ V).diagonal()
            worst = max(worst, (gains[sigma >= floor] - 1).abs().max().item())
        errors[name] = worst
    assert errors["fitted"] < 0.7 * errors["muon"], errors


# -- training --------------------------------------------------------------------------------


def test_mlp_on_digits():
    start, end = digits_losses(matrixopt.ROOT)
    assert end < 0.1 * start
