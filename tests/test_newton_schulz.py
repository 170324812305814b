"""Triton Newton-Schulz kernels (run by the interpreter on CPU) against float64 references
and the PyTorch twin. The interpreter uses 32×32 tiles, so sizes 33..70 span several tiles
and end in partial ones."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import matrixopt
from matrixopt.kernels import newton_schulz, newton_schulz_torch
from matrixopt.kernels.newton_schulz_triton import ax_plus_bx, ba_plus_ca2, newton_schulz_triton, xxt
from matrixopt.orthogonalize import ns_schedule

pytestmark = pytest.mark.triton

# Relative Frobenius error allowed against a float64 reference that starts from the same
# (rounded) inputs: one rounding of the output, plus fp32 accumulation.
KERNEL_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3}
# Triton path against the PyTorch twin after a whole NS run (the bounds).
TWIN_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
STACKS = [(1, 32, 32), (2, 37, 45), (3, 70, 33), (1, 5, 70)]


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", STACKS)
def test_xxt_is_symmetric_product_written_everywhere(shape, dtype):
    X = torch.randn(shape, dtype=dtype)
    A = xxt(X, out=poisoned((shape[0], shape[1], shape[1]), dtype))
    assert not A.isnan().any()
    assert torch.equal(A, A.mT)
    assert rel_err(A, X.double() @ X.double().mT) <= KERNEL_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", STACKS)
def test_ba_plus_ca2_is_symmetric_and_fused(shape, dtype):
    b, c = -4.775, 2.0315
    X = torch.randn(shape, dtype=torch.float64)
    A = (X @ X.mT / shape[2]).to(dtype)  # symmetric, bit for bit
    B = ba_plus_ca2(A, b, c, out=poisoned(A.shape, dtype))
    assert not B.isnan().any()
    assert torch.equal(B, B.mT)
    A64 = A.double()
    assert rel_err(B, b * A64 + c * A64 @ A64) <= KERNEL_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", STACKS)
def test_ax_plus_bx(shape, dtype):
    a = 3.4445
    X = torch.randn(shape, dtype=dtype)
    B = torch.randn(shape[0], shape[1], shape[1], dtype=dtype) / shape[1] ** 0.5
    out = ax_plus_bx(X, B, a, out=poisoned(shape, dtype))
    assert not out.isnan().any()
    assert rel_err(out, a * X.double() + B.double() @ X.double()) <= KERNEL_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("schedule", ["muon", "polar_express"])
@pytest.mark.parametrize("shape", [(37, 45), (45, 37), (2, 32, 64), (3, 70, 21)])
def test_matches_twin(shape, schedule, dtype):
    """m < n and m > n (transposed internally), batched and not, partial tiles."""
    coefficients = ns_schedule(schedule, 5)
    X = torch.randn(shape, dtype=dtype)
    ours = newton_schulz(X, coefficients, backend="triton")
    twin = newton_schulz_torch(X, coefficients)
    assert ours.shape == X.shape and ours.dtype == dtype
    assert rel_err(ours, twin.double()) <= TWIN_TOL[dtype]


@settings(max_examples=6, deadline=None)
@given(batch=st.sampled_from([(), (1,), (2,)]), m=st.integers(1, 48), n=st.integers(1, 48),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_matches_twin_any_shape(batch, m, n, dtype):
    coefficients = ns_schedule("polar_express", 2)
    X = torch.randn(*batch, m, n, dtype=dtype)
    ours = newton_schulz_triton(X, coefficients)
    assert rel_err(ours, newton_schulz_torch(X, coefficients).double()) <= TWIN_TOL[dtype]


def polynomial_map(coefficients, s):
    """The scalar NS iteration on (normalized) singular values, in float64."""
    for a, b, c in coefficients:
        s = a * s + b * s**3 + c * s**5
    return s


def geometric_spectrum(m, n, batch=1, cond=30.0, seed=0):
    """U diag(s) Vᵀ with singular values decaying geometrically over `cond` (as gradients'
    spectra do), in float64; returns the matrices and their SVD factors."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(batch, m, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(batch, n, k, generator=gen, dtype=torch.float64)).Q
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64).expand(batch, k)
    return U @ torch.diag_embed(s) @ V.mT, U, s, V


@pytest.mark.parametrize("schedule", ["muon", "polar_express"])
def test_fp32_result_is_the_polynomial_of_the_singular_values(schedule):
    """In exact arithmetic NS maps X = U S Vᵀ to U p(S/‖X‖_F) Vᵀ."""
    coefficients = ns_schedule(schedule, 5)
    X, U, s, V = geometric_spectrum(40, 56, batch=2)
    expected = U @ torch.diag_embed(polynomial_map(coefficients, s / X.norm(dim=(-2, -1))[:, None])) @ V.mT
    assert rel_err(newton_schulz_triton(X.float(), coefficients), expected) <= 1e-4


@pytest.mark.parametrize("schedule", ["muon", "polar_express"])
def test_bf16_singular_values_stay_in_the_schedule_band(schedule):
    """The band is the polynomial map's range over the input's normalized spectrum."""
    coefficients = ns_schedule(schedule, 5)
    X, _, s, _ = geometric_spectrum(48, 64, cond=30.0)
    s = s[0] / X.norm()
    grid = torch.linspace(s.min().item(), s.max().item(), 10_000, dtype=torch.float64)
    image = polynomial_map(coefficients, grid)
    sv = torch.linalg.svdvals(newton_schulz_triton(X.bfloat16(), coefficients).double())
    slack = 0.02  # bf16 rounding of A, B and X at every step
    assert image.min() - slack <= sv.min() and sv.max() <= image.max() + slack


def test_muon_step_uses_triton_and_matches_torch(monkeypatch):
    weights = [torch.randn(24, 40), torch.randn(40, 24), torch.randn(2, 16, 16)]
    grads = [torch.randn_like(w) for w in weights]

    def step(kernels):
        monkeypatch.setenv("MATRIXOPT_KERNELS", kernels)
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        matrixopt.Muon(params, lr=0.02).step()
        return params

    for ours, twin in zip(step("triton"), step("torch")):
        torch.testing.assert_close(ours, twin, rtol=1e-5, atol=1e-6)


def test_dispatch_and_dtypes():
    coefficients = ns_schedule("muon", 1)
    X = torch.randn(3, 20, 12)
    torch.testing.assert_close(newton_schulz(X, coefficients, backend="triton", out_dtype=torch.float64),
                               newton_schulz_torch(X, coefficients).double(), rtol=1e-5, atol=1e-6)
    X64 = X.double()  # no fp64 kernel: the twin runs
    assert torch.equal(newton_schulz(X64, coefficients, backend="triton"), newton_schulz_torch(X64, coefficients))
    empty = torch.empty(0, 4, 6)
    assert newton_schulz_triton(empty, coefficients).shape == empty.shape


def test_kernel_argument_errors():
    X = torch.randn(2, 8, 12)
    with pytest.raises(ValueError, match="out must be"):
        xxt(X, out=torch.empty(2, 8, 9))
    with pytest.raises(ValueError, match="stack of matrices"):
        xxt(X[0])
    with pytest.raises(TypeError, match="dtype"):
        xxt(X.double())
    with pytest.raises(ValueError, match="square"):
        ba_plus_ca2(X, 1.0, 1.0)
    with pytest.raises(ValueError, match="B must be"):
        ax_plus_bx(X, torch.randn(2, 12, 12), 1.0)


@pytest.mark.slow
def test_benchmark_runs_quick_on_cpu(tmp_path):
    """benchmarks/ns.py end to end at tiny sizes: its tables, ours beside the twin."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "benchmarks.ns", "--quick", "--out", str(tmp_path)], cwd=root,
                   env={**os.environ, "TRITON_INTERPRET": "1"}, check=True, capture_output=True)
    sections = json.loads(next(tmp_path.glob("ns-*.json")).read_text())["sections"]
    speed, accuracy, step = list(sections.values())[:3]
    for row in speed:
        assert row["ours ms"] > 0 and row["twin ms"] > 0
        assert row["ours vs twin (rel. diff)"] <= TWIN_TOL[torch.bfloat16]
    by_impl = {(r["shape"], r["schedule"], r["impl"]): r for r in accuracy}
    for (shape, schedule, impl), row in by_impl.items():
        twin = by_impl[shape, schedule, "twin"]
        # Gram carries A = XXᵀ for two bf16 steps between fresh ones: a little less accurate
        # (the table is there to say how much), never a different band.
        tol = 3e-2 if impl == "gram" else 1e-2
        assert row["‖O−UVᵀ‖/‖UVᵀ‖"] == pytest.approx(twin["‖O−UVᵀ‖/‖UVᵀ‖"], abs=tol)
        assert row["σ_min(O)"] == pytest.approx(twin["σ_min(O)"], abs=tol)
    assert {r["optimizer"] for r in step} >= {"torch.optim.AdamW", "matrixopt.Muon (twin)",
                                              "matrixopt.Muon (sym-blocks)", "matrixopt.Muon (minimax, 4 steps)",
                                              "matrixopt.Muon (sym-blocks, minimax, 4 steps)"}
    # The CPU sections: ours and the peers on the same matrices, same accuracy for our two methods.
    compare = next(rows for title, rows in sections.items() if title.startswith("NS, 5 Muon steps, fp32"))
    by_impl = {(r["shape"], r["impl"]): r for r in compare}
    for shape in {r["shape"] for r in compare}:
        standard, gram = by_impl[shape, "matrixopt standard"], by_impl[shape, "matrixopt gram"]
        assert gram["‖O−UVᵀ‖/‖UVᵀ‖"] == pytest.approx(standard["‖O−UVᵀ‖/‖UVᵀ‖"], abs=1e-4)
    assert {"torch.optim.Muon (bf16 inside)"} <= {r["impl"] for r in compare}
    restarts = next(rows for title, rows in sections.items() if "restarts" in title)
    assert all(r["σ_max(O)"] < 1.3 for r in restarts if r["impl"] != "gram, no restart")


@pytest.mark.parametrize("shape, block", [((3, 12, 40), 5), ((1, 40, 12), 4), ((2, 16, 16), 16), ((1, 17, 17), 8)])
def test_symmetric_blocks_candidate_equals_the_twin_in_float64(shape, block):
    """benchmarks/ns.py's block-triangle candidate computes the same products: equal to the twin
    in float64, with blocks that do and do not divide the side, and one block (no mirroring)."""
    from benchmarks.ns import symmetric_blocks_newton_schulz

    X = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    schedule = ns_schedule("polar_express", 5)
    torch.testing.assert_close(symmetric_blocks_newton_schulz(X, schedule, block=block),
                               newton_schulz_torch(X, schedule), rtol=0, atol=1e-10)


def test_minimax_candidate_schedule_keeps_its_band_in_one_step_fewer():
    """benchmarks/ns.py's 4-step schedule maps [3e-3, 1] into [0.79, 1.21] (Muon's five steps:
    [0.68, 1.20] from ~1.5e-3), where Polar Express's first four triples leave [0.44, 1.56]."""
    from benchmarks.ns import MINIMAX_STEPS_FLOOR, minimax_schedule

    steps, floor = MINIMAX_STEPS_FLOOR

    def band(schedule):  # NS acts on each singular value alone: run it on scalars
        x = torch.logspace(math.log10(floor), 0, 4001, dtype=torch.float64)
        for a, b, c in schedule:
            x = a * x + b * x**3 + c * x**5
        return x.min().item(), x.max().item()

    lo, hi = band(minimax_schedule(steps, floor))
    assert 0.79 < lo and hi < 1.21
    lo, hi = band(ns_schedule("polar_express", steps))
    assert lo < 0.5 and hi > 1.5
