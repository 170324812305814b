"""The orthonormal DCT-II: a shared basis, and the transform by matmul or by FFT.

C is the k×k orthonormal DCT-II matrix, ``C[i, j] = sqrt(2/k)·cos(π·i·(2j+1)/(2k))`` with row
0 scaled by sqrt(1/2), so ``C @ x == scipy.fft.dct(x, norm="ortho")``. Its transpose Q = Cᵀ
holds the basis vectors as columns, and ``x @ Q`` is the DCT of every row of x.

:func:`dct` transforms along the last dim either as ``x @ Q`` (one matmul against the cached
basis, k² multiply-adds per row) or through an FFT of length k (Makhoul 1980: reorder the
row, FFT, rotate by a twiddle factor; O(k log k) per row). :func:`dct` picks the FFT from
``FFT_MIN_SIZE[device type]`` on, measured as where it gets faster than the matmul.
:func:`dct_scores` adds the per-column norms DCT-AdamW ranks frequencies by, and
:func:`top_indices` the deterministic batched top-r.
"""
import functools
import math

import torch
from torch import Tensor

from . import host

# Smallest k at which the FFT path is used by default, per device type. Measured with
# `python -m benchmarks.dct` (1024×k fp32, torch 2.13, 2 CPU cores shared with other jobs,
# so single timings are noisy; six runs): up to k = 384 neither path wins consistently
# (matmul/FFT time 0.3x to 4x), from k = 512 the FFT wins in every run (1.2x to 19x at 512,
# 1.7x to 6x at 1024, 7x to 16x at 4096). Prime k use a slower FFT (Bluestein): at 257 the
# matmul was 1.3x to 4x faster. CUDA has no entry, so it keeps the matmul (tensor cores)
# until a GPU measurement says where the FFT wins; add it here.
FFT_MIN_SIZE = {"cpu": 512}
METHODS = ("auto", "matmul", "fft")


def _canonical(device) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def dct_basis(k: int, device=None, dtype: torch.dtype = torch.float32, *, transposed: bool = False) -> Tensor:
    """Q = Cᵀ (k×k): column j is the j-th orthonormal DCT-II basis vector; with
    ``transposed``, C itself (row j is that vector). C is stored contiguous and Q is its
    transposed view, one storage for both: a gather of rows of C is a contiguous copy, 3×
    faster on a CPU than the same gather of the columns of a contiguous Q, and a product
    with Q reads C through the transposed view (on a CPU bit for bit the product with a
    contiguous Q).

    Built in float64 and cast, and cached per (k, device, dtype): every layer of the same
    size shares it, so callers must not modify it (``dct_basis.cache_clear()`` frees the
    cache).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"Invalid k: {k!r}; expected an integer >= 1")
    if transposed:
        return _rows(k, _canonical(device), dtype)
    return _basis(k, _canonical(device), dtype)


@host.cached
def _basis(k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return _rows(k, device, dtype).mT


@host.cached
def _rows(k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    i = torch.arange(k, dtype=torch.int64)[:, None]
    j = torch.arange(k, dtype=torch.int64)[None, :]
    # cos is 4k-periodic in i·(2j+1) (in units of π/2k): reducing the integer first keeps
    # the float64 argument small, so large k loses no accuracy.
    angle = (i * (2 * j + 1) % (4 * k)).double() * (math.pi / (2 * k))
    C = torch.cos(angle) * math.sqrt(2 / k)
    C[0] *= math.sqrt(0.5)
    return C.to(device=device, dtype=dtype)


def _clear_caches() -> None:
    _basis.cache_clear()
    _rows.cache_clear()


dct_basis.cache_clear = _clear_caches


def dct_matmul(x: Tensor) -> Tensor:
    """DCT-II (orthonormal) along the last dim as ``x @ dct_basis(k)``."""
    return x @ dct_basis(x.shape[-1], x.device, x.dtype)


def dct_fft(x: Tensor) -> Tensor:
    """DCT-II (orthonormal) along the last dim through one real FFT of length k (Makhoul).

    With v = (x₀, x₂, x₄, …, x₅, x₃, x₁) (even entries, then odd ones reversed) and
    V = FFT(v), the DCT is X_j = Re(w_j·V_j) with w_j = s_j·e^{-iπj/2k} (s_j the orthonormal
    scale). ``rfft`` gives Z_j = w_j·V_j for j ≤ k/2 only; the other half follows from
    V_{k-j} = conj(V_j) (v is real) as X_{k-j} = -Im(Z_j).
    """
    k = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    Z = torch.fft.rfft(v, dim=-1) * _twiddle(k, x.device, x.dtype)
    return torch.cat([Z.real, -Z.imag[..., 1:k - k // 2].flip(-1)], dim=-1)


@functools.lru_cache(maxsize=None)
def _twiddle(k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """w_j = s_j·e^{-iπj/2k} for j = 0…k//2, s_0 = sqrt(1/k), s_j = sqrt(2/k)."""
    j = torch.arange(k // 2 + 1, dtype=torch.float64)
    scale = torch.full_like(j, math.sqrt(2 / k))
    scale[0] = math.sqrt(1 / k)
    return torch.polar(scale, -math.pi * j / (2 * k)).to(device=device, dtype=dtype.to_complex())


def use_fft(k: int, device) -> bool:
    """Whether :func:`dct` with method="auto" takes the FFT path for size k on ``device``."""
    threshold = FFT_MIN_SIZE.get(_canonical(device).type)
    return threshold is not None and k >= threshold


def dct(x: Tensor, method: str = "auto") -> Tensor:
    """DCT-II (orthonormal) of x along the last dim: ``scipy.fft.dct(x, norm="ortho")``.

    ``method``: "matmul", "fft" or "auto" (the FFT from ``FFT_MIN_SIZE`` on, see
    :func:`use_fft`). Computes in x's dtype (float32 or float64).
    """
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r}; expected one of {METHODS}")
    if method == "auto":
        method = "fft" if use_fft(x.shape[-1], x.device) else "matmul"
    return dct_fft(x) if method == "fft" else dct_matmul(x)


def dct_scores(x: Tensor, norm: int = 1, method: str = "auto") -> tuple[Tensor, Tensor]:
    """S = DCT of every row of x (B, m, k), and each column's score ‖S[:, j]‖_norm (B, k)."""
    S = dct(x, method)
    return S, torch.linalg.vector_norm(S, ord=norm, dim=-2)


def top_indices(scores: Tensor, r: int) -> Tensor:
    """The indices of the r largest scores along the last dim, in ascending order.

    Ties go to the lower index: a stable descending sort keeps equal scores in index order,
    so the selection is deterministic (``torch.topk`` does not promise an order for ties).
    """
    chosen = scores.sort(dim=-1, descending=True, stable=True).indices[..., :r]
    return chosen.sort(dim=-1).values
