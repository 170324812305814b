"""DCT basis, scores and DCTAdamW against scipy.fft and a float64 re-implementation of the rule."""
import io
import math

import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import matrixopt
from matrixopt import kernels
from matrixopt.kernels.dct import dct, dct_fft
from matrixopt.projectors import REFRESHED, DCTProjector

FAST = settings(max_examples=25, deadline=None)
DTYPES = {"float64": (torch.float64, 1e-12), "float32": (torch.float32, 1e-6)}


def ref_basis(k):
    """Q = Cᵀ from scipy: column j of C is the DCT of the j-th unit vector."""
    return scipy.fft.dct(np.eye(k), norm="ortho", axis=0).T


def ref_top(scores, r):
    """Top-r of each row of scores by (-score, index), returned ascending."""
    return np.stack([np.sort(np.lexsort((np.arange(len(s)), -s))[:r]) for s in scores])


# -- kernels/dct.py ------------------------------------------------------------------------

@FAST
@given(k=st.integers(1, 257), dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16))
@example(k=1, dtype="float32", seed=0)
@example(k=127, dtype="float32", seed=0)
@example(k=251, dtype="float64", seed=0)
@example(k=257, dtype="float32", seed=0)
@example(k=256, dtype="float64", seed=0)
def test_dct_basis_and_both_paths_match_scipy(k, dtype, seed):
    """Q orthonormal; x @ Q, the matmul and the FFT path all equal scipy's DCT-II.

    Errors are relative to each row's norm (the DCT keeps norms): 1e-12 in fp64, 1e-6 fp32.
    """
    torch_dtype, tol = DTYPES[dtype]
    Q = kernels.dct_basis(k, dtype=torch_dtype)
    torch.testing.assert_close(Q.T @ Q, torch.eye(k, dtype=torch_dtype), rtol=0, atol=tol * math.sqrt(k))
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(seed), dtype=torch_dtype)
    want = scipy.fft.dct(x.double().numpy(), norm="ortho", axis=-1)
    row_norms = np.linalg.norm(want, axis=-1, keepdims=True)
    for got in (x @ Q, dct(x, "matmul"), dct(x, "fft")):
        assert got.dtype == torch_dtype
        assert np.all(np.abs(got.double().numpy() - want) <= tol * row_norms)


def test_dct_basis_is_one_storage_for_q_and_its_transpose():
    """Q is the transposed view of the contiguous Qᵀ: the cache holds one k×k tensor per size."""
    Q, rows = kernels.dct_basis(40), kernels.dct_basis(40, transposed=True)
    assert rows.is_contiguous() and torch.equal(Q, rows.T)
    assert Q.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr()


def test_dct_basis_is_cached_per_size_device_dtype():
    assert kernels.dct_basis(48) is kernels.dct_basis(48, "cpu", torch.float32)
    assert kernels.dct_basis(48, dtype=torch.float64) is not kernels.dct_basis(48)
    assert kernels.dct_basis(48, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="k"):
        kernels.dct_basis(0)
    with pytest.raises(ValueError, match="method"):
        dct(torch.ones(3), "dst")


def test_dct_fft_batched_shapes():
    x = torch.randn(2, 3, 5, 24, dtype=torch.float64)
    torch.testing.assert_close(dct_fft(x), torch.from_numpy(scipy.fft.dct(x.numpy(), norm="ortho", axis=-1)))


@FAST
@given(data=st.data(), batch=st.integers(1, 3), k=st.integers(1, 12))
def test_top_indices_breaks_ties_toward_lower_index(data, batch, k):
    # Few distinct values, so ties are common.
    scores = np.array(data.draw(st.lists(st.integers(0, 3), min_size=batch * k, max_size=batch * k)),
                      dtype=np.float64).reshape(batch, k)
    r = data.draw(st.integers(1, k))
    got = kernels.top_indices(torch.from_numpy(scores), r)
    np.testing.assert_array_equal(got.numpy(), ref_top(scores, r))


# -- DCTProjector ----------------------------------------------------------------------------

SHAPES = {"tall": (3, 20, 9), "wide": (2, 7, 16)}


@pytest.mark.parametrize("side", sorted(SHAPES))
@pytest.mark.parametrize("norm", [1, 2])
def test_refresh_selects_exact_top_r_of_scipy_scores(side, norm):
    B, m, n = SHAPES[side]
    k, r = min(m, n), 4
    G = torch.randn(B, m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    proj = DCTProjector(r, m, n, score_norm=norm)
    indices, status, low = proj.refresh(G)
    assert indices.dtype == torch.int32 and indices.shape == (B, r)
    assert status.tolist() == [REFRESHED] * B
    # scipy: DCT along the smaller side, one score per frequency.
    axis = -1 if m >= n else -2
    S = scipy.fft.dct(G.numpy(), norm="ortho", axis=axis)
    scores = np.linalg.norm(S, ord=norm, axis=-2 if m >= n else -1)
    want = ref_top(scores, r)
    np.testing.assert_array_equal(indices.numpy(), want)
    want_low = np.stack([S[b][:, want[b]] if m >= n else S[b][want[b], :] for b in range(B)])
    np.testing.assert_allclose(low.numpy(), want_low, rtol=1e-12, atol=1e-12)
    # Between refreshes the projection is G·Q[:, I] (Q[:, I]ᵀ·G); project_back its adjoint.
    np.testing.assert_allclose(proj.project(G, indices).numpy(), want_low, rtol=1e-12, atol=1e-12)
    Q = ref_basis(k)
    back = proj.project_back(torch.from_numpy(want_low), indices).numpy()
    for b in range(B):
        Qi = Q[:, want[b]]
        np.testing.assert_allclose(back[b], want_low[b] @ Qi.T if m >= n else Qi @ want_low[b],
                                   rtol=1e-12, atol=1e-12)


def test_refresh_of_a_zero_gradient_takes_the_lowest_indices():
    indices, _, _ = DCTProjector(3, 6, 5).refresh(torch.zeros(2, 6, 5))
    np.testing.assert_array_equal(indices.numpy(), [[0, 1, 2], [0, 1, 2]])


@pytest.mark.parametrize("side", sorted(SHAPES))
def test_matmul_and_fft_scores_select_the_same(side):
    B, m, n = SHAPES[side]
    G = torch.randn(B, m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = {method: DCTProjector(5, m, n, method=method).refresh(G) for method in ("matmul", "fft")}
    (indices, _, low), (fft_indices, _, fft_low) = results["matmul"], results["fft"]
    assert torch.equal(indices, fft_indices)
    torch.testing.assert_close(low, fft_low, rtol=0, atol=1e-12)
    # fp32: a selection may differ only where two scores tie to rounding.
    X = torch.randn(8, 256, 96, generator=torch.Generator().manual_seed(3))  # tall: 96 = k
    G32 = X if side == "tall" else X.mT
    for norm in (1, 2):
        picks = [DCTProjector(48, *G32.shape[1:], norm, method).refresh(G32)[0] for method in ("matmul", "fft")]
        scores = np.linalg.norm(scipy.fft.dct(X.double().numpy(), norm="ortho", axis=-1), ord=norm, axis=-2)
        for b in range(len(X)):
            cutoff = np.sort(scores[b])[-48]
            differ = set(picks[0][b].tolist()) ^ set(picks[1][b].tolist())
            assert all(abs(scores[b][j] - cutoff) <= 1e-5 * cutoff for j in differ)


# -- DCTAdamW against a float64 re-implementation ---------------------------------------------

def reference_dct_adamw(W, grads, *, rank, gap, rotate, lr, betas, eps, weight_decay, scale, norm):
    """DCT-AdamW for one matrix, in numpy float64, written out from the rule (the smaller side
    projected on the r best-scoring DCT-II columns, reselected every ``gap`` steps; Adam with
    galore-torch's ε and bias correction). Returns (W, #selection changes)."""
    W = W.copy()
    left = W.shape[0] < W.shape[1]
    k = min(W.shape)
    Q = ref_basis(k)
    I = M = V = None
    changes = 0
    for t, G in enumerate(grads):
        X = G.T if left else G  # the projected side is the columns of X
        if t % gap == 0:
            S = X @ Q
            scores = np.linalg.norm(S, ord=norm, axis=0)
            new = sorted(sorted(range(k), key=lambda j: (-scores[j], j))[:rank])
            if I is None:
                M = V = np.zeros((X.shape[0], rank))
            else:
                changes += new != I
                if rotate:
                    R = Q[:, I].T @ Q[:, new]
                    M, V = M @ R, np.abs(V @ R)
            I = new
            L = S[:, I]
        else:
            L = X @ Q[:, I]
        M = betas[0] * M + (1 - betas[0]) * L
        V = betas[1] * V + (1 - betas[1]) * L**2
        step_size = math.sqrt(1 - betas[1] ** (t + 1)) / (1 - betas[0] ** (t + 1))
        U = step_size * (M / (np.sqrt(V) + eps)) @ Q[:, I].T
        W = W * (1 - lr * weight_decay) - lr * scale * (U.T if left else U)
    return W, changes


SETTINGS = dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1, scale=0.5)


@pytest.mark.parametrize("gap", [1, 5])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("norm", [1, 2])
def test_dct_adamw_matches_float64_reference(gap, rotate, norm):
    rng = np.random.default_rng(0)
    # tall, wide, two more of the tall shape (one batch) and a 3-D stack of wide matrices.
    shapes = [(12, 8), (6, 10), (12, 8), (12, 8), (2, 5, 7)]
    weights = [rng.standard_normal(s) for s in shapes]
    # A fixed part plus noise: selections overlap between refreshes without being equal.
    trend = [rng.standard_normal(s) for s in shapes]
    grads = [[t + 0.7 * rng.standard_normal(t.shape) for t in trend] for _ in range(20)]
    params = [torch.tensor(w, requires_grad=True) for w in weights]
    opt = matrixopt.DCTAdamW(params, rank=3, update_proj_gap=gap, rotate_states=rotate,
                             score_norm=norm, **SETTINGS)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.from_numpy(g)
        opt.step()
    changes = 0
    for i, (p, w) in enumerate(zip(params, weights)):
        m, n = w.shape[-2:]
        for e, we in enumerate(w.reshape(-1, m, n)):
            want, c = reference_dct_adamw(we, [g[i].reshape(-1, m, n)[e] for g in grads],
                                          rank=3, gap=gap, rotate=rotate, norm=norm, **SETTINGS)
            changes += c
            np.testing.assert_allclose(p.detach().reshape(-1, m, n)[e].numpy(), want, rtol=1e-10, atol=1e-12)
    assert changes > 0  # the refreshes did move the selection (so rotation was exercised)


def test_fp32_and_bf16_params_keep_fp32_state_and_follow_the_reference():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 12))
    grads = [rng.standard_normal(w.shape) for _ in range(8)]
    want, _ = reference_dct_adamw(w, grads, rank=4, gap=3, rotate=True, norm=1, **SETTINGS)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        p = torch.tensor(w, dtype=dtype, requires_grad=True)
        opt = matrixopt.DCTAdamW([p], rank=4, update_proj_gap=3, rotate_states=True, **SETTINGS)
        for g in grads:
            p.grad = torch.tensor(g, dtype=dtype)
            opt.step()
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        np.testing.assert_allclose(p.detach().double().numpy(), want, rtol=tol, atol=tol)


def test_same_shape_matrices_refresh_as_one_batch(monkeypatch):
    calls = []
    original = kernels.dct_scores

    def spy(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(kernels, "dct_scores", spy)
    params = [torch.randn(9, 6, requires_grad=True) for _ in range(3)] + [torch.randn(4, 6, requires_grad=True)]
    opt = matrixopt.DCTAdamW(params, rank=2, update_proj_gap=2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    # Steps 0 and 2 refresh: one call for the three 9×6 (tall, stacked) and one for the 4×6.
    assert calls == [(3, 9, 6), (1, 6, 4)] * 2


def test_state_dict_round_trip_continues_identically():
    def run(steps, resume_at=None):
        torch.manual_seed(0)
        params = [torch.randn(10, 6, requires_grad=True), torch.randn(5, 8, requires_grad=True)]
        opt = matrixopt.DCTAdamW(params, rank=2, update_proj_gap=3, rotate_states=True)
        gen = torch.Generator().manual_seed(1)
        for t in range(steps):
            if t == resume_at:
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                opt = matrixopt.DCTAdamW(params, rank=2, update_proj_gap=3, rotate_states=True)
                opt.load_state_dict(torch.load(buffer, weights_only=True))
                assert opt.state[params[0]]["indices"].dtype == torch.int32
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params

    for a, b in zip(run(8), run(8, resume_at=4)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, name", [
    (dict(rank=0), "rank"), (dict(rank=1.5), "rank"), (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(score_norm=3), "score_norm"), (dict(rotate_states=1), "rotate_states"),
    (dict(scale=-1.0), "scale"), (dict(eps=0.0), "eps"), (dict(proj_dtype="bf16"), "proj_dtype"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        matrixopt.DCTAdamW([torch.zeros(3, 3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)], ids=["left", "right"])
def test_proj_dtype_sets_projection_precision(shape):
    """fp32 (default) projections match float64 to fp32 rounding, bf16 operands to bf16's
    (~1e-3); the low-rank gradient is fp32, the back-projected step in the matmul's dtype."""
    g = torch.Generator().manual_seed(2)
    G = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    indices = DCTProjector(12, *shape).refresh(G)[0]
    reference = DCTProjector(12, *shape)  # float64 in, float64 out
    want_low = reference.project(G, indices)
    want_back = reference.project_back(want_low, indices)
    rel = lambda x, y: ((x.double() - y).norm() / y.norm()).item()
    for dtype, bounds in ((None, (0, 1e-6)), (torch.bfloat16, (1e-4, 1e-2))):
        proj = DCTProjector(12, *shape, dtype=dtype)
        low, back = proj.project(G.float(), indices), proj.project_back(want_low.float(), indices)
        assert low.dtype == torch.float32 and back.dtype == (dtype or torch.float32)
        assert bounds[0] <= rel(low, want_low) < bounds[1] and bounds[0] <= rel(back, want_back) < bounds[1]


# -- memory ----------------------------------------------------------------------------------

def llama_matrices(hidden, ffn, layers):
    """(out, in) shapes of a LLaMA block stack's hidden matrices: q k v o, gate up, down."""
    return [(hidden, hidden)] * 4 * layers + [(ffn, hidden)] * 2 * layers + [(hidden, ffn)] * layers


def test_state_bytes_counts_moments_indices_and_each_basis_once():
    params = [torch.randn(10, 6, requires_grad=True), torch.randn(6, 14, requires_grad=True),
              torch.randn(3, 8, 6, requires_grad=True)]
    opt = matrixopt.DCTAdamW(params, rank=2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    moments = 2 * 4 * (10 * 2 + 2 * 14 + 3 * 8 * 2)
    indices = 4 * 2 * (1 + 1 + 3)
    bases = 4 * 6 * 6  # every matrix here has min(m, n) = 6: one shared basis, Q a view of Qᵀ
    assert opt.state_bytes() == moments + indices + bases


def test_state_at_quarter_rank_is_under_30_percent_of_adamw():
    # Measured on a small LLaMA-like stack (hidden 128, SwiGLU 344, 2 layers)...
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in llama_matrices(128, 344, 2)]
    for p in params:
        p.grad = torch.randn_like(p)
    adamw = torch.optim.AdamW(params)
    adamw.step()
    adamw_bytes = sum(t.untyped_storage().nbytes() for s in adamw.state.values() for t in s.values())
    dct_opt = matrixopt.DCTAdamW(params, rank=0.25)
    dct_opt.step()
    assert dct_opt.state_bytes() <= 0.30 * adamw_bytes
    # ...and counted from shapes for a LLaMA-7B-like one (hidden 4096, SwiGLU 11008, 32 layers).
    shapes = llama_matrices(4096, 11008, 32)
    adamw_7b = sum(2 * 4 * m * n for m, n in shapes)
    dct_7b = 4 * 4096 * 4096  # the one shared basis
    for m, n in shapes:
        proj = DCTProjector(min(m, n) // 4, m, n)
        dct_7b += 2 * 4 * math.prod(proj.low_shape(1)) + 4 * proj.rank
    assert dct_7b <= 0.30 * adamw_7b


# -- training --------------------------------------------------------------------------------

def test_trains_a_digits_mlp():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    train, test = slice(0, 1400), slice(1400, None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = matrixopt.DCTAdamW(matrixopt.param_groups(model), lr=1e-2, rank=32, update_proj_gap=20)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(X[train]), y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    accuracy = (model(X[test]).argmax(1) == y[test]).float().mean().item()
    assert losses[-1] < 0.05 * losses[0]
    assert accuracy > 0.85
