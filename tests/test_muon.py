"""Muon against its references: torch.optim.Muon, torch.optim.AdamW, the Polar Express paper."""
import math
import re
import warnings

import pytest
import torch

import matrixopt
from matrixopt.muon import update_scale
from matrixopt.orthogonalize import MUON_COEFFICIENTS, ns_schedule, orthogonalize

SHAPES = {"tall": (24, 10), "wide": (10, 24), "square": (16, 16)}


def least_squares_run(make_opt, shape, steps, dtype=torch.float32, seed=0):
    """Weights after ``steps`` steps of ``make_opt([W])`` on ‖X Wᵀ - Y‖² (a real trajectory)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    W = torch.nn.Parameter(torch.randn(m, n, generator=g).to(dtype))
    X, Y = torch.randn(32, n, generator=g), torch.randn(32, m, generator=g)
    opt = make_opt([W])
    history = [W.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        ((X.to(dtype) @ W.T - Y.to(dtype)).square().mean()).backward()
        opt.step()
        history.append(W.detach().clone())
    return history


HYPER = dict(lr=0.02, momentum=0.9, weight_decay=0.05)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("nesterov", [True, False])
def test_tracks_torch_muon(shape, nesterov):
    """fp32 NS (our CPU default) stays within bf16 rounding of torch.optim.Muon's bf16 NS."""
    ref = least_squares_run(lambda p: torch.optim.Muon(p, nesterov=nesterov, **HYPER), shape, 20)
    ours = least_squares_run(lambda p: matrixopt.Muon(
        p, nesterov=nesterov, lr_scaling="original", ns_coefficients="muon", **HYPER), shape, 20)
    moved = (ref[-1] - ref[0]).abs().max()
    for r, o in zip(ref, ours):
        # Each step's update has entries ~lr·s/sqrt(n); bf16 NS perturbs them by ~1%.
        assert (r - o).abs().max() <= 0.02 * moved
    assert moved > 0.1


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_with_bf16_ns(shape, nesterov):
    """With NS in bf16, as torch.optim.Muon runs it, the trajectories agree (to fp32 rounding)."""
    ref = least_squares_run(lambda p: torch.optim.Muon(p, nesterov=nesterov, **HYPER), shape, 20)
    ours = least_squares_run(lambda p: matrixopt.Muon(
        p, nesterov=nesterov, lr_scaling="original", ns_coefficients="muon",
        ns_dtype=torch.bfloat16, **HYPER), shape, 20)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)  # measured: bit-identical on x86 CPU


@pytest.mark.parametrize("shape", [(64, 16), (16, 100), (36, 36)], ids=["tall", "wide", "square"])
def test_match_adamw_scaling(shape):
    """"match_adamw" differs from torch.optim.Muon, by exactly the ratio of update_scale."""
    m, n = shape
    kwargs = dict(lr=0.02, weight_decay=0.0, ns_coefficients="muon")
    orig = least_squares_run(lambda p: matrixopt.Muon(p, lr_scaling="original", **kwargs), shape, 1)
    match = least_squares_run(lambda p: matrixopt.Muon(p, lr_scaling="match_adamw", **kwargs), shape, 1)
    ratio = update_scale(m, n, "match_adamw") / update_scale(m, n, "original")
    assert abs(ratio - 1) > 0.15
    torch.testing.assert_close(match[1] - match[0], ratio * (orig[1] - orig[0]), rtol=1e-4, atol=1e-6)
    # and the update has RMS 0.5·lr (a little less: NS leaves singular values under 1)
    rms = (match[1] - match[0]).square().mean().sqrt() / kwargs["lr"]
    assert 0.3 < rms < 0.51


def test_update_scale_definitions():
    assert update_scale(64, 16, "match_adamw") == pytest.approx(0.5 * 8)
    assert update_scale(16, 64, "match_adamw") == pytest.approx(0.5 * 8)
    assert update_scale(64, 16, "original") == pytest.approx(2.0)
    assert update_scale(16, 64, "original") == 1.0
    assert update_scale(16, 64, "spectral") == pytest.approx(0.5)
    assert update_scale(16, 64, "none") == 1.0


# -- the AdamW fallback -------------------------------------------------------------------------

def adamw_pair(dtype, steps=20, **kw):
    """(ours, torch.optim.AdamW) on the same 1-D params and gradients, as lists of weights."""
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(7, generator=g), torch.randn(1, generator=g), torch.randn(33, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in init] for _ in range(steps)]
    ours = [torch.nn.Parameter(t.to(dtype)) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt = matrixopt.Muon(ours, **kw)
    ref_opt = torch.optim.AdamW(ref, **kw)
    for step_grads in grads:
        if dtype != torch.float32:
            # Reference for low-precision params: torch's fp32 AdamW from our rounded weights,
            # so each step compares one update, not accumulated rounding.
            for r, o in zip(ref, ours):
                r.data.copy_(o.float())
        for p, q, gr in zip(ours, ref, step_grads):
            p.grad, q.grad = gr.to(dtype), gr.to(dtype).float()
        opt.step()
        ref_opt.step()
        yield ours, ref, opt


def test_fallback_matches_torch_adamw():
    kw = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for ours, ref, _ in adamw_pair(torch.float32, **kw):
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r, rtol=0, atol=1e-6)


def test_fallback_bf16_params():
    """bf16 params: fp32 moments, and each step is torch's fp32 AdamW step rounded to bf16."""
    kw = dict(lr=0.01, weight_decay=0.1)
    for ours, ref, opt in adamw_pair(torch.bfloat16, **kw):
        for o, r in zip(ours, ref):
            assert o.dtype == torch.bfloat16
            # the same fp32 value up to rounding, so at most one bf16 ulp apart
            torch.testing.assert_close(o, r.to(torch.bfloat16), rtol=2**-7, atol=1e-6)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in ours)


# -- validation ---------------------------------------------------------------------------------

INVALID = [
    ("lr", -1e-3), ("lr", float("nan")), ("lr", float("inf")), ("momentum", 1.0), ("momentum", -0.1),
    ("ns_steps", 0), ("ns_steps", 2.5), ("ns_coefficients", "newton"),
    ("ns_coefficients", [(3.0, -4.0, 2.0)] * 2), ("ns_coefficients", (1.0, 2.0)),
    ("ns_coefficients", (3.0, float("nan"), 2.0)), ("ns_coefficients", [(3.0, -4.0, float("inf"))] * 5),
    ("lr_scaling", "adamw"), ("betas", (1.0, 0.9)), ("betas", (0.9, -0.1)), ("betas", 0.9),
    ("eps", 0.0), ("eps", -1e-8), ("weight_decay", -0.1), ("weight_decay", float("inf")),
    ("nonfinite", "ignore"),
    ("nesterov", "yes"), ("ns_dtype", torch.int32),
]


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_hyperparameter_at_construction(name, value):
    W = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=re.escape(name)):
        matrixopt.Muon([W], **{name: value})


@pytest.mark.parametrize("name,value", INVALID + [("matrix", 1), ("matrix", "yes")],
                         ids=[f"{n}={v!r}" for n, v in INVALID] + ["matrix=1", "matrix='yes'"])
def test_invalid_hyperparameter_in_param_group(name, value):
    W, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=re.escape(name)):
        matrixopt.Muon([{"params": [W]}, {"params": [b], name: value}])
    opt = matrixopt.Muon([W])
    with pytest.raises(ValueError, match=re.escape(name)):
        opt.add_param_group({"params": [b], name: value})
    assert len(opt.param_groups) == 1


def test_error_states_the_valid_range():
    with pytest.raises(ValueError, match=r"momentum.*\[0\.0, 1\.0\)"):
        matrixopt.Muon([torch.nn.Parameter(torch.randn(2, 2))], momentum=1.0)


# -- NS coefficient schedules ---------------------------------------------------------------------

def test_schedule_forms():
    assert ns_schedule("muon", 3) == [MUON_COEFFICIENTS] * 3
    assert ns_schedule((1.5, -0.5, 0.0), 2) == [(1.5, -0.5, 0.0)] * 2
    triples = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    assert ns_schedule(triples, 2) == triples
    assert len(ns_schedule("polar_express", 9)) == 9


@pytest.mark.parametrize("coefficients", ["muon", MUON_COEFFICIENTS, [MUON_COEFFICIENTS] * 5])
def test_schedule_forms_give_the_same_steps(coefficients):
    named = least_squares_run(lambda p: matrixopt.Muon(p, ns_coefficients="muon"), (12, 8), 3)
    other = least_squares_run(lambda p: matrixopt.Muon(p, ns_coefficients=coefficients), (12, 8), 3)
    for a, b in zip(named, other):
        assert torch.equal(a, b)


# Amsel et al. 2025 (arXiv 2505.16932), Algorithm 1: the raw degree-5 polynomials.
PAPER_RAW = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]


def paper_coefficients(steps):
    """Algorithm 1's schedule: the 1.01 safety on all but the last polynomial, which repeats."""
    safe = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in PAPER_RAW[:-1]] + [PAPER_RAW[-1]]
    return safe[:steps] + [safe[-1]] * max(0, steps - len(safe))


def paper_polar_express(G, steps):
    """Algorithm 1 in float64: normalize by 1.01·‖G‖_F, then X ← aX + (bA + cA²)X."""
    X = G.double()
    if X.shape[0] > X.shape[1]:
        X = X.T
    X = X / (1.01 * X.norm())
    for a, b, c in paper_coefficients(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


@pytest.mark.parametrize("steps", [1, 5, 10])
def test_polar_express_coefficients(steps):
    """The paper's schedule with the 1.01 normalization folded into the first step."""
    expected = paper_coefficients(steps)
    a, b, c = expected[0]
    expected[0] = (a / 1.01, b / 1.01**3, c / 1.01**5)
    schedule = ns_schedule("polar_express", steps)
    assert len(schedule) == steps
    for got, want in zip(schedule, expected):
        assert got == pytest.approx(want, rel=1e-14)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
@pytest.mark.parametrize("steps", [5, 8])
def test_polar_express_output_matches_paper(shape, steps):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours = orthogonalize(G[None], ns_schedule("polar_express", steps))[0]   # G is float64: so is NS
    torch.testing.assert_close(ours.double(), paper_polar_express(G, steps), rtol=1e-5, atol=1e-6)
    # and its singular values are near 1 (the polar factor U Vᵀ has exactly 1)
    sv = torch.linalg.svdvals(ours.double())
    assert (sv - 1).abs().max() < (0.2 if steps == 5 else 0.01)


def test_default_is_polar_express():
    """The default schedule is Polar Express: identical steps to naming it."""
    default = least_squares_run(lambda p: matrixopt.Muon(p), (12, 8), 2)
    named = least_squares_run(lambda p: matrixopt.Muon(p, ns_coefficients="polar_express"), (12, 8), 2)
    assert all(torch.equal(a, b) for a, b in zip(default, named))
    muon = least_squares_run(lambda p: matrixopt.Muon(p, ns_coefficients="muon"), (12, 8), 2)
    assert not torch.equal(default[-1], muon[-1])


# -- routing and N-D params ------------------------------------------------------------------------

def torch_muon_step(matrices, grads, **kw):
    """One torch.optim.Muon step on 2-D copies; returns the updated matrices."""
    params = [torch.nn.Parameter(m.clone()) for m in matrices]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.optim.Muon(params, **kw).step()
    return [p.detach() for p in params]


AS_TORCH = dict(lr_scaling="original", ns_coefficients="muon", ns_dtype=torch.bfloat16)


@pytest.mark.parametrize("shape,as_2d", [
    ((3, 6, 4), lambda t: list(t)),                               # experts: each on its own
    ((5, 2, 3, 3), lambda t: [t.reshape(5, 18)]),                 # conv: (out, in·kh·kw)
])
def test_nd_params_as_matrices(shape, as_2d):
    g = torch.Generator().manual_seed(4)
    W = torch.nn.Parameter(torch.randn(shape, generator=g))
    W.grad = torch.randn(shape, generator=g)
    expected = torch_muon_step(as_2d(W.detach()), as_2d(W.grad), **HYPER)
    matrixopt.Muon([W], **HYPER, **AS_TORCH).step()
    for got, want in zip(as_2d(W.detach()), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_channels_last_conv_is_written_back():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(4, 3, 2, 2, generator=g)
    G = torch.randn(4, 3, 2, 2, generator=g)
    a = torch.nn.Parameter(W.clone())
    b = torch.nn.Parameter(W.clone().to(memory_format=torch.channels_last))
    for p in (a, b):
        p.grad = G.clone()
        matrixopt.Muon([p], lr=0.1).step()
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b) and not torch.equal(a, W)


def test_matrix_flag_routes():
    """matrix=False puts a matrix on AdamW; matrix=True puts a vector on Muon as a (1, n) row."""
    g = torch.Generator().manual_seed(6)
    W, v = torch.randn(6, 4, generator=g), torch.randn(8, generator=g)
    gW, gv = torch.randn(6, 4, generator=g), torch.randn(8, generator=g)
    pW, pv = torch.nn.Parameter(W.clone()), torch.nn.Parameter(v.clone())
    pW.grad, pv.grad = gW.clone(), gv.clone()
    matrixopt.Muon([{"params": [pW], "matrix": False}, {"params": [pv], "matrix": True}],
                   **HYPER, **AS_TORCH).step()
    rW = torch.nn.Parameter(W.clone())
    rW.grad = gW.clone()
    torch.optim.AdamW([rW], lr=HYPER["lr"], weight_decay=HYPER["weight_decay"], betas=(0.9, 0.95)).step()
    torch.testing.assert_close(pW, rW, rtol=0, atol=1e-6)
    (row,) = torch_muon_step([v[None]], [gv[None]], **HYPER)
    torch.testing.assert_close(pv.detach(), row[0], rtol=1e-5, atol=1e-6)


def test_same_shape_matrices_batched_like_separately():
    """A bucket of same-shape matrices steps each exactly as if it were alone."""
    g = torch.Generator().manual_seed(7)
    Ws = [torch.randn(5, 7, generator=g) for _ in range(3)]
    Gs = [torch.randn(5, 7, generator=g) for _ in range(3)]
    together = [torch.nn.Parameter(w.clone()) for w in Ws]
    for p, gr in zip(together, Gs):
        p.grad = gr.clone()
    matrixopt.Muon(together, **HYPER).step()
    for w, gr, p in zip(Ws, Gs, together):
        alone = torch.nn.Parameter(w.clone())
        alone.grad = gr.clone()
        matrixopt.Muon([alone], **HYPER).step()
        torch.testing.assert_close(p, alone, rtol=1e-6, atol=1e-7)


def test_buckets_are_capped_in_size(monkeypatch):
    """Same-shape matrices beyond max_bucket_elements go to further batches, same result."""
    import matrixopt.muon as muon

    g = torch.Generator().manual_seed(3)
    Ws = [torch.randn(5, 7, generator=g) for _ in range(5)]
    Gs = [torch.randn(5, 7, generator=g) for _ in range(5)]

    def run():
        ps = [torch.nn.Parameter(w.clone()) for w in Ws]
        for p, gr in zip(ps, Gs):
            p.grad = gr.clone()
        matrixopt.Muon(ps, **HYPER).step()
        return ps

    whole = run()
    batches = []
    orthogonalize = muon.orthogonalize
    monkeypatch.setattr(muon, "orthogonalize", lambda X, *a, **k: batches.append(X.shape[0]) or orthogonalize(X, *a, **k))
    monkeypatch.setattr(matrixopt.Muon, "max_bucket_elements", 2 * 35)
    capped = run()
    assert batches == [2, 2, 1]
    for a, b in zip(whole, capped):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_state_bytes_counts_momentum_and_fallback_moments():
    W, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))
    W.grad, b.grad = torch.randn(6, 4), torch.randn(4)
    opt = matrixopt.Muon([W, b])
    opt.step()
    assert opt.state_bytes() == 4 * (24 + 2 * 4)


def test_large_finite_half_gradients_are_not_taken_for_nonfinite():
    """The check sums g in fp32: an fp16 gradient whose sum passes fp16's 65504 is finite;
    +inf and -inf together (a sum that cancels to NaN) and a lone NaN are not."""
    W = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.float16))
    opt = matrixopt.Muon([{"params": [W], "matrix": False}])
    W.grad = torch.full((64, 64), 1000.0, dtype=torch.float16)  # Σg = 4.1e6
    opt.step()
    assert opt.nonfinite_skips == 0 and W.abs().sum() > 0
    before = W.detach().clone()
    for bad in ([float("inf"), -float("inf")], [float("nan"), 1.0]):
        W.grad = torch.ones(64, 64, dtype=torch.float16)
        W.grad[0, :2] = torch.tensor(bad, dtype=torch.float16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    assert opt.nonfinite_skips == 2 and torch.equal(W, before)


def test_ns_method_auto_runs_gram_for_rectangular_fp32_matrices_and_matches_standard():
    """Muon's default ns_method="auto" takes the Gram formulation where the kernel's measured
    CPU crossover says it is faster (a 128×512 fp32 momentum), never for a square one, and
    the step equals the standard formulation's (same polynomial, fp32 rounding apart)."""
    import importlib
    from unittest import mock

    ns_module = importlib.import_module("matrixopt.kernels.newton_schulz")   # the module, not the function

    runs = {}
    for method in ("auto", "standard"):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(128, 512) * 0.02), torch.nn.Parameter(torch.randn(64, 64) * 0.02)]
        opt = matrixopt.Muon(ps, lr=0.02, ns_method=method)
        with mock.patch.object(ns_module, "newton_schulz_gram", wraps=ns_module.newton_schulz_gram) as gram:
            for i in range(3):
                g = torch.Generator().manual_seed(i)
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
        runs[method] = ([p.detach().clone() for p in ps], [c.args[0].shape[-2:] for c in gram.call_args_list])
    assert runs["auto"][1] == [(128, 512)] * 3 and runs["standard"][1] == []
    for a, s in zip(runs["auto"][0], runs["standard"][0]):
        torch.testing.assert_close(a, s, rtol=1e-4, atol=1e-6)


def test_polar_express_4_holds_muons_five_step_band_in_four():
    """The named 4-step schedule, evaluated on scalars (NS acts on each singular value alone):
    σ ∈ [3e-3, 1] lands in [0.79, 1.21], where Muon's quintic needs five steps for [0.68, 1.21]
    from 1.5e-3 and Polar Express's first four triples leave [0.44, 1.56]."""
    def band(schedule, floor):
        x = torch.logspace(math.log10(floor), 0, 4001, dtype=torch.float64)
        for a, b, c in schedule:
            x = a * x + b * x**3 + c * x**5
        return x.min().item(), x.max().item()

    lo, hi = band(ns_schedule("polar_express_4", 4), 3e-3)
    assert 0.79 < lo and hi < 1.21
    lo, hi = band(ns_schedule("muon", 5), 1.5e-3)
    assert 0.6 < lo < 0.79 and hi < 1.21
    with pytest.raises(ValueError, match="4-step"):
        matrixopt.Muon([torch.nn.Parameter(torch.randn(4, 4))], ns_coefficients="polar_express_4")
    with pytest.raises(ValueError, match="ns_method"):
        matrixopt.Muon([torch.nn.Parameter(torch.randn(4, 4))], ns_method="fast")
