"""ARO: the rotation (shifted Cholesky QR and its fallback), the update, and training."""
import functools

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import matrixopt
from matrixopt.aro import ORTHOGONALITY_TOL, base_map, orthogonal_factor
from helpers import bf16_steps, digits_losses


def orthogonality_error(Q):
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return (Q.mT @ Q - eye).abs().amax().item()


def positive_diagonal_q(C):
    """scipy's Householder Q in float64, column signs fixed so that R has a positive diagonal."""
    Q, R = scipy.linalg.qr(C.double().numpy())
    return torch.from_numpy(Q * np.sign(np.diag(R)))


# -- the orthogonal factor -----------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 5), st.integers(1, 24), st.integers(0, 1000))
def test_cholesky_qr_matches_householder(B, k, seed):
    C = torch.randn(B, k, k, generator=torch.Generator().manual_seed(seed)) + 3 * torch.eye(k)
    Q = orthogonal_factor(C)
    for c, q in zip(C, Q):
        torch.testing.assert_close(q.double(), positive_diagonal_q(c), atol=1e-4, rtol=0)


def hard_matrices(k=16):
    """Rank-deficient, badly scaled, zero and non-finite-producing C, and one easy C."""
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(k, 2, generator=g) @ torch.randn(2, k, generator=g)
    graded = torch.randn(k, k, generator=g) * torch.logspace(-18, 18, k)[:, None]
    return torch.stack([low_rank, graded, torch.zeros(k, k), 1e30 * torch.randn(k, k, generator=g),
                        1e-30 * torch.randn(k, k, generator=g), torch.randn(k, k, generator=g)])


def test_hard_inputs_fall_back_and_stay_orthogonal():
    C = hard_matrices()
    Q = orthogonal_factor(C)
    assert Q.isfinite().all()
    for q in Q:
        assert orthogonality_error(q) < 1e-5
    # Each entry of the batch is handled as it would be alone.
    for c, q in zip(C, Q):
        torch.testing.assert_close(orthogonal_factor(c[None])[0], q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kappa", [1e4, 1e5, 1e6])
def test_ill_conditioned_c_stays_on_cholesky_qr(kappa, monkeypatch):
    """C with κ up to 1e6 and a flat spectrum (like the C of a square momentum, κ ~ 1e5)
    needs no Householder QR (CholeskyQR2 alone sent κ ≥ 1e5 to it): a third Cholesky pass
    makes Q orthogonal to the accepted tolerance."""
    g = torch.Generator().manual_seed(0)
    k = 128
    U, V = (torch.linalg.qr(torch.randn(4, k, k, dtype=torch.float64, generator=g))[0] for _ in range(2))
    C = ((U * torch.linspace(1, 1 / kappa, k, dtype=torch.float64)) @ V.mT).float()
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: pytest.fail("fell back to Householder"))
    Q = orthogonal_factor(C)
    assert max(orthogonality_error(q) for q in Q) < ORTHOGONALITY_TOL
    R = Q.mT.double() @ C.double()  # upper triangular when Q is C's Q factor
    assert R.tril(-1).abs().max().item() < 1e-4 * R.abs().max().item()


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_rank_deficient_and_badly_scaled_momenta(scale):
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(24, 40, generator=g))
    opt = matrixopt.ARO([p], lr=0.01)
    for step in range(4):
        low_rank = torch.randn(24, 2, generator=g) @ torch.randn(2, 40, generator=g)
        low_rank[:, :10] = 0  # dead inputs
        p.grad = scale * low_rank * torch.logspace(-6, 6, 24)[:, None]
        opt.step()
        R = opt.state[p]["rotation"][0]
        assert orthogonality_error(R) < 1e-5
        assert p.isfinite().all()


# -- the update ------------------------------------------------------------------------------


def row_norm_reference(W, G, lr, wd, beta, rows):
    """One ARO step from R = I with f = row_norm, written out from the update rule (momentum,
    R = Q of QR(M·f(M)ᵀ), U = R·f(RᵀM), rescaled to match_adamw's RMS), in float64 with
    scipy's QR."""
    W, G = W.double().numpy(), G.double().numpy()
    M = (1 - beta) * (G if rows else G.T)

    def f(X):  # rows at rounding level (rank-deficient RᵀM) are zero
        norm = np.linalg.norm(X, axis=1, keepdims=True)
        return np.where(norm > 1e-6 * norm.max(), X / norm * np.sqrt(X.shape[1]), 0.0)

    R = scipy.linalg.qr(M @ f(M).T)[0]
    U = R @ f(R.T @ M)
    U = U if rows else U.T
    m, n = W.shape
    return torch.from_numpy(W * (1 - lr * wd) - lr * 0.5 * U * np.sqrt(m * n) / np.linalg.norm(U)), R


@pytest.mark.parametrize("shape,side,rows", [((16, 40), "smaller", True), ((40, 16), "smaller", False),
                                             ((40, 16), "rows", True), ((16, 40), "cols", False)])
def test_row_norm_step_matches_closed_form(shape, side, rows):
    torch.manual_seed(0)
    W, G = torch.randn(*shape), torch.randn(*shape)
    p = nn.Parameter(W.clone())
    p.grad = G
    opt = matrixopt.ARO([p], lr=0.05, weight_decay=0.1, momentum=0.9, base="row_norm", rotate_side=side)
    opt.step()
    want, R_want = row_norm_reference(W, G, 0.05, 0.1, 0.9, rows)
    torch.testing.assert_close(p.data.double(), want, atol=1e-5, rtol=0)
    # R is determined up to the signs of its columns (which U does not depend on), and when
    # it rotates the larger side only on its first min(m, n) columns (C has that rank).
    r = min(shape)
    R = opt.state[p]["rotation"][0, :, :r].double()
    torch.testing.assert_close((R.T @ torch.from_numpy(R_want[:, :r])).abs(),
                               torch.eye(r, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("base", ["sinkhorn", "row_norm", "sign"])
def test_rotation_matters(base):
    """ARO's update is not its base map applied to the momentum (what R = I would give)."""
    torch.manual_seed(0)
    W, G = torch.randn(16, 40), torch.randn(16, 40) * torch.rand(16, 1)
    p = nn.Parameter(W.clone())
    p.grad = G
    matrixopt.ARO([p], lr=1.0, weight_decay=0.0, base=base).step()
    update = W - p.data
    unrotated = base_map(G[None], base)[0]
    unrotated = 0.5 * unrotated * (16 * 40) ** 0.5 / unrotated.norm()
    assert (update - unrotated).norm() > 0.1 * unrotated.norm()


def sinkhorn_reference(X, iters):
    """The Sinkhorn map as defined, in float64: rows to norm sqrt(l), then columns to
    sqrt(k); slices below sqrt(u_fp32) of the largest go to 0."""
    X = X.double()
    k, l = X.shape[-2:]
    floor = torch.finfo(torch.float32).eps ** 0.5

    def normalize(X, dim, target):
        norm = X.norm(dim=dim, keepdim=True)
        keep = norm > norm.amax(dim=(-2, -1), keepdim=True) * floor
        return torch.where(keep, X / norm * target, 0.0)

    for _ in range(iters):
        X = normalize(normalize(X, -1, l ** 0.5), -2, k ** 0.5)
    return X


@pytest.mark.parametrize("iters", [1, 5])
def test_sinkhorn_matches_the_definition(iters):
    """Against float64, with zero rows and columns and one at rounding level (all mapped to 0)."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(3, 12, 30, generator=g) * torch.rand(3, 12, 1, generator=g) * torch.rand(3, 1, 30, generator=g)
    X[0, 3] = 0
    X[1, :, 7] = 0
    X[2, 5] = 1e-6 * X[2, 5]
    Y = base_map(X, "sinkhorn", iters)
    torch.testing.assert_close(Y.double(), sinkhorn_reference(X, iters), atol=1e-5, rtol=1e-5)
    assert (Y[0, 3] == 0).all() and (Y[1, :, 7] == 0).all() and (Y[2, 5] == 0).all()


def test_sinkhorn_balances_rows_and_columns():
    X = torch.randn(3, 8, 20) * torch.rand(3, 8, 1)
    Y = base_map(X, "sinkhorn", 50)
    torch.testing.assert_close(Y.norm(dim=-1), torch.full((3, 8), 20**0.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(Y.norm(dim=-2), torch.full((3, 20), 8**0.5), atol=1e-4, rtol=0)


def test_same_shape_matrices_are_batched_like_single_ones():
    torch.manual_seed(0)
    shapes = [(12, 20), (12, 20), (2, 12, 20)]  # one bucket: two matrices and a 3-D stack
    Ws = [torch.randn(s) for s in shapes]
    Gs = [torch.randn(s) for s in shapes]
    Gs[1][:, 5:] = 0  # rank-deficient: falls back inside the batch
    together = [nn.Parameter(w.clone()) for w in Ws]
    alone = [nn.Parameter(w.clone()) for w in Ws]
    opts = [matrixopt.ARO(together, lr=0.1)] + [matrixopt.ARO([p], lr=0.1) for p in alone]
    for _ in range(3):
        for p, q, g in zip(together, alone, Gs):
            p.grad, q.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    for p, q in zip(together, alone):
        torch.testing.assert_close(p.data, q.data, atol=1e-6, rtol=0)


@pytest.mark.parametrize("side,k", [("smaller", 6), ("rows", 10), ("cols", 6)])
def test_state_shapes(side, k):
    p = nn.Parameter(torch.randn(3, 10, 6))
    p.grad = torch.randn_like(p)
    opt = matrixopt.ARO([p], rotate_side=side)
    opt.step()
    assert opt.state[p]["rotation"].shape == (3, k, k) and opt.state[p]["rotation"].dtype == torch.float32
    assert opt.state[p]["momentum_buffer"].shape == p.shape
    declared = opt._state(p, opt.param_groups[0])
    assert {key: (spec.shape, spec.dtype, spec.sharded) for key, spec in declared.items()} == {
        "momentum_buffer": ((3, 10, 6), torch.float32, True), "rotation": ((3, k, k), torch.float32, False)}


def test_bf16_params():
    p, opt = bf16_steps(matrixopt.ARO)
    assert opt.state[p]["momentum_buffer"].dtype == torch.float32
    assert orthogonality_error(opt.state[p]["rotation"][0]) < 1e-5


@pytest.mark.parametrize("name,value", [("base", "svd"), ("sinkhorn_iters", 0), ("rotate_side", "both"),
                                        ("qr", "cholesky"), ("lr_scaling", "original"), ("momentum", 1.0),
                                        ("matmul_dtype", "bf16")])
def test_invalid_hyperparameters(name, value):
    with pytest.raises(ValueError, match=name):
        matrixopt.ARO([nn.Parameter(torch.zeros(4, 4))], **{name: value})


def test_mlp_on_digits():
    start, end = digits_losses(matrixopt.ARO)
    assert end < 0.1 * start


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_bf16_matmuls_keep_rotation_orthogonal_and_update_close(shape):
    """With bf16 operands R is still orthogonal to fp32 rounding (the QR is fp32), and over 5
    steps the weights move within a few percent of the fp32 run (bf16's rounding, not more)."""
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) for _ in range(5)]
    moves, rotations = [], []
    for dtype in (torch.float32, torch.bfloat16):
        p = nn.Parameter(W0.clone())
        opt = matrixopt.ARO([p], lr=0.05, matmul_dtype=dtype)
        for G in grads:
            p.grad = G.clone()
            opt.step()
        moves.append(p.detach() - W0)
        rotations.append(opt.state[p]["rotation"][0])
    assert orthogonality_error(rotations[1]) < 1e-5
    assert 1e-4 < ((moves[1] - moves[0]).norm() / moves[0].norm()).item() < 5e-2


def test_mlp_on_digits_with_bf16_matmuls():
    start, end = digits_losses(functools.partial(matrixopt.ARO, matmul_dtype=torch.bfloat16))
    assert end < 0.1 * start
