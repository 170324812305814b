"""Newton-Schulz orthogonalization: X -> approximately U Vᵀ for X = U S Vᵀ.

Each step applies the odd quintic p(X) = aX + b(XXᵀ)X + c(XXᵀ)²X. The input is first divided
by its Frobenius norm, which puts every singular value in [0, 1], where the schedule's
polynomials are designed to work, and turned to the wide orientation (m ≤ n), so the Gram
matrix A = XXᵀ is the small m×m side. Two formulations compute the same polynomial of X:

- "standard": A = XXᵀ, B = bA + cA², X ← aX + BX every step: 4m²n + 2m³ FLOPs a step.
- "gram" (:func:`newton_schulz_gram`): the step carried on A alone, for rectangular X.

The Triton kernels of the standard method (symmetric XXᵀ and bA + cA², fused aX + BX,
batched, autotuned) live in :mod:`.newton_schulz_triton`, imported only when dispatch picks
them, so this module imports without triton.
"""
import functools
import math
import os

import torch

from ._dispatch import choose_backend

#: dtypes the Triton kernels take (tl.dot has no tensor-core fp64 path).
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: "auto" picks the Triton kernels only for matrices at least this large on the short side:
#: on an H200 they beat cuBLAS there (1.11-1.15x at 4096² to 8192² and 4096×11008) and lose
#: below it to launch overhead and tile imbalance (benchmarks/results/ns-h200-2026-11-28.md).
TRITON_MIN_SIDE = 4096

METHODS = ("auto", "standard", "gram")

#: ``method="auto"``'s cost model: (device type, dtype) -> (aspect ratio max(m,n)/min(m,n),
#: short side) from which the Gram method is faster, measured by ``python -m benchmarks ns
#: --cpu`` (its "crossover" section: 5 Muon steps at short sides 128 and 512). A missing entry
#: or None means "standard" always: CUDA is not measured yet (its symmetric Triton/cuBLAS
#: products change the balance), so it stays on the standard method until a GPU run fills
#: these in. Square matrices never take Gram (its per-step m³ work is more than standard's).
GRAM_CROSSOVER = {
    # fp32: Gram/standard 0.96 at 128×224, 0.91 at 512×896; 1.05 and 0.99 at n/m = 1.5.
    ("cpu", torch.float32): (1.75, 128),  # benchmarks/results/ns-cpu2-2026-12-01.md
    # bf16 (2 restarts): 0.88 from 512×768 on; at short side 128 within noise of 1 up to n/m = 2.5.
    ("cpu", torch.bfloat16): (1.5, 512),  # benchmarks/results/ns-cpu2-2026-12-01.md
    ("cuda", torch.float32): None,  # placeholder: "standard" until measured on a GPU
    ("cuda", torch.bfloat16): None,  # placeholder: "standard" until measured on a GPU
}

#: Restart rule (see :func:`gram_restarts`): in bf16/fp16 a fresh Gram matrix every this
#: many steps (measured: 3-step segments already widen the band).
HALF_PRECISION_SEGMENT = 2
#: ... in wider dtypes, before the segment's gain at σ → 0, G = ∏|a| (a rounding error
#: u·‖A‖ in a zero eigenvalue of A grows like G² over the segment), would make u·G² exceed
#: this: G ≤ sqrt(GAIN_BUDGET / u), u the unit roundoff.
GAIN_BUDGET = 0.1


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


@functools.lru_cache(maxsize=512)
def gram_restarts(coefficients: tuple, dtype: torch.dtype) -> tuple[int, ...]:
    """The steps (0-based) before which :func:`newton_schulz_gram` forms X ← QX and recomputes
    A = XXᵀ from it, for a schedule (tuple of (a, b, c) triples) run in ``dtype``.

    bf16/fp16: every HALF_PRECISION_SEGMENT steps. Wider dtypes: before step k when the
    segment's gain at σ → 0, G = ∏|a_j| over its steps with k's, would exceed
    sqrt(GAIN_BUDGET / u), u the unit roundoff (fp32: 1295; fp64: 3e7).
    """
    if torch.finfo(dtype).bits <= 16:
        return tuple(range(HALF_PRECISION_SEGMENT, len(coefficients), HALF_PRECISION_SEGMENT))
    max_gain = math.sqrt(GAIN_BUDGET / (torch.finfo(dtype).eps / 2))
    restarts, gain = [], 1.0
    for k, (a, _, _) in enumerate(coefficients):
        if k and gain * abs(a) > max_gain:
            restarts.append(k)
            gain = 1.0
        gain *= abs(a)
    return tuple(restarts)


def newton_schulz_gram(X, coefficients, *, eps=1e-7, out_dtype=None, restarts=None):
    """Gram Newton-Schulz: the same polynomial of X as :func:`newton_schulz_torch`, computed
    on the m×m Gram matrix of the wide orientation (m ≤ n). Pure torch matmuls.

    A step's polynomial applied to X is X ← (aI + bA + cA²)X = P·X with A = XXᵀ. P is a
    polynomial in A, so it commutes with A, and the next Gram matrix is P·A·P. So only
    P, A ← PAP and the accumulated Q ← P·Q are formed (m×m), and X ← Q·X once at the end:
    2m²n for the first A, 2m²n for the final QX and 8m³ a step (A², PQ, PAP; the first step
    skips PQ, the last PAP), against 4m²n + 2m³ a standard step. At 5 steps that is fewer
    FLOPs from n/m ≈ 1.5 on; 1024×2816 costs 0.69× and 512×2816 0.47× the standard FLOPs.

    Restart rule (:func:`gram_restarts`, the steps to restart before; ``restarts`` gives
    them explicitly, ``()`` none). A is never recomputed from X within a segment, so rounding
    errors in it are not corrected: an error δ in a near-zero eigenvalue of A (rounding can
    make it negative) is multiplied by about a² each step, and once it is comparable to
    ‖A‖, P = aI + bA + cA² (c > 0) grows instead of shrinking and the output's singular
    values blow up; errors in Q near σ ≈ 1 are also never contracted by later steps, as
    the standard iteration's are. A restart forms X ← QX and A = XXᵀ afresh (2m²n each):
    - bf16/fp16: after every HALF_PRECISION_SEGMENT (2) steps. Measured on power-law and
      Gaussian spectra at 128×512 to 512×1376 (tests/test_gram_newton_schulz.py shows it):
      without restarts Polar Express's 5 bf16 steps reach σ_max ≈ 2000 and Muon's ≈ 10 on a
      spectrum spanning 1e-4; one restart after 2 steps (gram-newton-schulz's default) still
      widens the band to 1.35 (Polar Express) and after 3 to 1.44; restarting after steps
      2 and 4 keeps the standard method's band.
      (The gain bound below would restart every step here, sqrt(0.1/u) = 5: the rounding
      errors measured in A are far below its worst case u·‖A‖.)
    - fp32/fp64: before the segment's gain at σ → 0, G = ∏|a|, would exceed
      sqrt(GAIN_BUDGET / u) (a rounding error u·‖A‖ in a zero eigenvalue of A grows like
      G²): in fp32 1295, which 5 Muon (G = 485) or Polar Express (967) steps stay under,
      while 10 steps without a restart blow up (Muon) or leave the band (Polar Express)
      on the same spectra; with the restart this rule puts after step 5 they hold.
    So fp32 runs 5 steps with no restart, bf16 with two (12m²n + 22m³ in all; still fewer
    FLOPs than standard from n/m ≈ 1.5). microsoft/dion#55 turned its Gram path off by
    default after a bug: here "standard" stays the default, "auto" takes Gram only where a
    measured crossover says so, and the tests hold Gram to an SVD reference.

    On CUDA the symmetric Triton kernels (XXᵀ, bA + cA²) could serve A, A² and PAP too;
    dispatch stays on torch matmuls until that is measured on a GPU.
    """
    out_dtype = out_dtype or X.dtype
    shape = X.shape
    coefficients = tuple(tuple(float(v) for v in t) for t in coefficients)
    X, transposed = _wide_unit_stack(X, eps)
    if restarts is None:
        restarts = gram_restarts(coefficients, X.dtype)
    cuts = [0, *sorted(k for k in set(restarts) if 0 < k < len(coefficients)), len(coefficients)]
    for start, stop in zip(cuts, cuts[1:]):
        X = _gram_segment(X, coefficients[start:stop])
    return _restore(X, transposed, shape, out_dtype)


def _gram_segment(X, coefficients):
    """Q·X for Q the product of one segment's step matrices P, from a fresh A = XXᵀ."""
    A = X @ X.mT
    Q = None
    for k, (a, b, c) in enumerate(coefficients):
        P = torch.baddbmm(A, A, A, beta=b, alpha=c)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if Q is None else P @ Q
        if k + 1 < len(coefficients):
            A = (P @ A) @ P
    return X if Q is None else Q @ X


def choose_method(X, method=None) -> str:
    """Resolve ``method`` (argument, else ``MATRIXOPT_NS_METHOD``, else "standard") to
    "standard" or "gram"; "auto" looks X's device, dtype and shape up in GRAM_CROSSOVER."""
    method = method or os.environ.get("MATRIXOPT_NS_METHOD", "standard")
    if method not in METHODS:
        raise ValueError(f"Invalid method {method!r}; expected one of {METHODS} "
                         "(argument `method` or env var MATRIXOPT_NS_METHOD)")
    if method != "auto":
        return method
    m, n = sorted(X.shape[-2:])
    crossover = GRAM_CROSSOVER.get((X.device.type, X.dtype))
    if crossover is None or n == m:
        return "standard"
    ratio, side = crossover
    return "gram" if m >= side and n >= ratio * m else "standard"


def newton_schulz(X, coefficients, *, eps=1e-7, out_dtype=None, backend=None, method=None, restarts=None):
    """Orthogonalize every matrix of X (shape (..., m, n)) with one NS step per (a, b, c) triple.

    Computes in X's dtype; returns ``out_dtype`` (default X's dtype).
    ``method``: "standard" (the default, also via ``MATRIXOPT_NS_METHOD``), "gram"
    (:func:`newton_schulz_gram`; ``restarts`` as there) or "auto" (Gram where X's aspect
    ratio and size pass the measured crossover for its device and dtype, GRAM_CROSSOVER;
    square matrices always standard).
    ``backend`` (standard method): None/"auto" (Triton on CUDA for matrices of at least
    TRITON_MIN_SIDE on the short side, else PyTorch), "torch" or "triton".
    The Triton kernels take bf16, fp16 and fp32; other dtypes (fp64) always run the twin.
    """
    if X.ndim < 2:
        raise ValueError(f"newton_schulz needs X of shape (..., m, n), got {tuple(X.shape)}")
    coefficients = [tuple(float(v) for v in t) for t in coefficients]
    if choose_method(X, method) == "gram":
        return newton_schulz_gram(X, coefficients, eps=eps, out_dtype=out_dtype, restarts=restarts)
    large = min(X.shape[-2:]) >= TRITON_MIN_SIDE
    if choose_backend(X, backend, auto_triton=large) == "triton" and X.dtype in TRITON_DTYPES:
        from .newton_schulz_triton import newton_schulz_triton

        return newton_schulz_triton(X, coefficients, eps=eps, out_dtype=out_dtype)
    return newton_schulz_torch(X, coefficients, eps=eps, out_dtype=out_dtype)
