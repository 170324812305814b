"""Helpers shared by several test files (test files do not import each other).

Data: scikit-learn's digits, matrices with a prescribed spectrum. Runs: a few bf16 steps of
an optimizer, a digits MLP trained by one.
"""
import torch
from torch import nn

import matrixopt


# -- data ---------------------------------------------------------------------------------------

def digits():
    """scikit-learn's 8×8 digits scaled to [0, 1]: (X_train, y_train, X_test, y_test), a fixed
    split of 1400 training and 397 test images."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    train, test = order[:1400], order[1400:]
    return X[train], y[train], X[test], y[test]


def with_spectrum(batch, m, n, sigma, seed):
    """float64 (batch, m, n) matrices with singular values ``sigma`` and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(batch, m, k, dtype=torch.float64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(batch, n, k, dtype=torch.float64, generator=g))[0]
    return (U * sigma) @ V.mT


def power_law(batch, m, n, seed, alpha=1.0):
    """float64 (batch, m, n) matrices with singular values σ_i = i^-alpha (a gradient's spectrum)."""
    return with_spectrum(batch, m, n, torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -alpha, seed)


# -- runs ---------------------------------------------------------------------------------------

def bf16_steps(cls, steps=3):
    """A bf16 param after ``steps`` steps of ``cls`` (the param and the optimizer); asserts it
    kept its dtype, stayed finite and moved."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(24, 40, dtype=torch.bfloat16))
    before = p.detach().clone()
    opt = cls([p], lr=0.01)
    for _ in range(steps):
        p.grad = torch.randn_like(p)
        opt.step()
    assert p.dtype == torch.bfloat16 and p.isfinite().all() and not torch.equal(p, before)
    return p, opt


def digits_losses(cls, steps=200):
    """Train-set loss of a 64-64-64-10 digits MLP before and after ``steps`` minibatch steps
    of ``cls`` (over :func:`matrixopt.param_groups`, lr 0.01, weight decay 0.01)."""
    Xtr, ytr, _, _ = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = cls(matrixopt.param_groups(model), lr=0.01, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        start = loss_fn(model(Xtr), ytr).item()
    for _ in range(steps):
        idx = torch.randint(0, len(ytr), (64,), generator=g)
        opt.zero_grad()
        loss_fn(model(Xtr[idx]), ytr[idx]).backward()
        opt.step()
    with torch.no_grad():
        return start, loss_fn(model(Xtr), ytr).item()
