"""Newton-Schulz orthogonalization: X -> approximately U Vᵀ for X = U S Vᵀ.

Each step applies the odd quintic p(X) = aX + b(XXᵀ)X + c(XXᵀ)²X, computed as
A = XXᵀ, B = bA + cA², X ← aX + BX on the wide orientation (m ≤ n), so A is the
small m×m side. The input is first divided by its Frobenius norm, which puts every
singular value in [0, 1], where the schedule's polynomials are designed to work.
"""
import torch

from ._dispatch import choose_backend


def newton_schulz_torch(X, coefficients, *, eps=1e-7, out_dtype=None):
    """PyTorch twin: batched matmuls in X's dtype (fp32 accumulation inside matmul)."""
    out_dtype = out_dtype or X.dtype
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    for a, b, c in coefficients:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if transposed:
        X = X.mT
    return X.reshape(shape).to(out_dtype)


def newton_schulz(X, coefficients, *, eps=1e-7, out_dtype=None, backend=None):
    """Orthogonalize every matrix of X (shape (..., m, n)) with one NS step per (a, b, c) triple.

    Computes in X's dtype; returns ``out_dtype`` (default X's dtype).
    ``backend``: None/"auto" (Triton on CUDA, else PyTorch), "torch" or "triton".
    """
    if X.ndim < 2:
        raise ValueError(f"newton_schulz needs X of shape (..., m, n), got {tuple(X.shape)}")
    coefficients = [tuple(float(v) for v in t) for t in coefficients]
    if choose_backend(X, backend) == "triton":
        from .newton_schulz_triton import newton_schulz_triton

        return newton_schulz_triton(X, coefficients, eps=eps, out_dtype=out_dtype)
    return newton_schulz_torch(X, coefficients, eps=eps, out_dtype=out_dtype)
