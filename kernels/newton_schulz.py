"""Newton-Schulz orthogonalization: X -> approximately U Vᵀ for X = U S Vᵀ.

Each step applies the odd quintic p(X) = aX + b(XXᵀ)X + c(XXᵀ)²X, computed as
A = XXᵀ, B = bA + cA², X ← aX + BX on the wide orientation (m ≤ n), so A is the
small m×m side. The input is first divided by its Frobenius norm, which puts every
singular value in [0, 1], where the schedule's polynomials are designed to work.

The Triton kernels (symmetric XXᵀ and bA + cA², fused aX + BX, batched, autotuned) live
in :mod:`.newton_schulz_triton`, imported only when dispatch picks them, so this module
imports without triton.
"""
import torch

from ._dispatch import choose_backend

#: dtypes the Triton kernels take (tl.dot has no tensor-core fp64 path).
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: "auto" picks the Triton kernels only for matrices at least this large on the short side:
#: on an H200 they beat cuBLAS there (1.11-1.15x at 4096² to 8192² and 4096×11008) and lose
#: below it to launch overhead and tile imbalance (benchmarks/results/ns-h200-2026-11-28.md).
TRITON_MIN_SIDE = 4096


def _wide_unit_stack(X, eps):
    """X as a stack (B, m, n) in the wide orientation (m ≤ n, transposed if needed), each
    matrix divided by its Frobenius norm; and whether it was transposed."""
    X = X.reshape(-1, *X.shape[-2:])
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    return X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(eps), transposed


def _restore(X, transposed, shape, out_dtype):
    """Undo :func:`_wide_unit_stack`'s layout: X back to ``shape``, in ``out_dtype``."""
    return (X.mT if transposed else X).reshape(shape).to(out_dtype)


def newton_schulz_torch(X, coefficients, *, eps=1e-7, out_dtype=None):
    """PyTorch twin: batched matmuls in X's dtype (fp32 accumulation inside matmul)."""
    out_dtype = out_dtype or X.dtype
    shape = X.shape
    X, transposed = _wide_unit_stack(X, eps)
    for a, b, c in coefficients:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return _restore(X, transposed, shape, out_dtype)


def newton_schulz(X, coefficients, *, eps=1e-7, out_dtype=None, backend=None):
    """Orthogonalize every matrix of X (shape (..., m, n)) with one NS step per (a, b, c) triple.

    Computes in X's dtype; returns ``out_dtype`` (default X's dtype).
    ``backend``: None/"auto" (Triton on CUDA for matrices of at least TRITON_MIN_SIDE on
    the short side, else PyTorch), "torch" or "triton".
    The Triton kernels take bf16, fp16 and fp32; other dtypes (fp64) always run the twin.
    """
    if X.ndim < 2:
        raise ValueError(f"newton_schulz needs X of shape (..., m, n), got {tuple(X.shape)}")
    coefficients = [tuple(float(v) for v in t) for t in coefficients]
    large = min(X.shape[-2:]) >= TRITON_MIN_SIDE
    if choose_backend(X, backend, auto_triton=large) == "triton" and X.dtype in TRITON_DTYPES:
        from .newton_schulz_triton import newton_schulz_triton

        return newton_schulz_triton(X, coefficients, eps=eps, out_dtype=out_dtype)
    return newton_schulz_torch(X, coefficients, eps=eps, out_dtype=out_dtype)
