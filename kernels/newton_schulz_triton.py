"""Triton kernels for one Newton-Schulz step, X ← aX + (bA + cA²)X with A = XXᵀ.

Three launches per step, each over (tiles × batch) in one grid, on the wide orientation
(X is m×n with m ≤ n):

1. ``A = XXᵀ`` (:func:`xxt`): only the tiles on and above the diagonal are computed, each
   stored twice (as is and transposed into the mirror tile), so A is exactly symmetric
   and costs half the FLOPs of a general product.
2. ``B = bA + cA²`` (:func:`ba_plus_ca2`): since A is symmetric, A² = AAᵀ is the same
   kernel as (1) read from A's rows, with ``bA`` fused into the epilogue.
3. ``X' = aX + BX`` (:func:`ax_plus_bx`): a general product with ``aX`` fused into the
   epilogue, written to a second buffer (other programs still read X).

Inputs bf16/fp16/fp32, accumulation in fp32, A, B and X' stored in the input dtype
(as the PyTorch twin does). fp32 products follow ``torch.backends.cuda.matmul.allow_tf32``
like torch's own matmul. Block sizes are autotuned on CUDA per (shape, batch, dtype),
cached by ``triton.autotune``; under ``TRITON_INTERPRET=1`` a single small configuration
is used so CPU tests stay fast.

Measured on an H200 (triton 3.6, ``benchmarks/results/ns-h200-2026-11-28.md``): 1.11-1.15×
the torch-matmul twin for 4096² and larger, but slower for 1024²-2048² and small batched
stacks, where 15 launches per NS and too few tiles per launch dominate.
"""
import torch
import triton
import triton.language as tl

from ._dispatch import interpreting
from .newton_schulz import TRITON_DTYPES, _restore, _wide_unit_stack


def _configs(names, candidates, interpreted):
    """Autotuning candidates, each (*block sizes, num_warps, num_stages); under the
    interpreter only the ``interpreted`` block sizes, which keep CPU tests fast."""
    if interpreting():
        return [triton.Config(dict(zip(names, interpreted)), num_warps=1, num_stages=1)]
    return [triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages)
            for *blocks, warps, stages in candidates]


# From large tiles for big matrices down to small ones that keep the SMs busy on small
# (batched) matrices.
_SYRK_CONFIGS = _configs(("BLOCK", "BLOCK_K"), [
    (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 32, 4, 4),
    (64, 64, 4, 4), (64, 128, 4, 3), (64, 32, 4, 5), (32, 64, 2, 4),
], (32, 32))
_MATMUL_CONFIGS = _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [
    (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4), (64, 64, 32, 8, 2, 5),
    (32, 64, 64, 8, 2, 4),
], (32, 32, 32, 2))


@triton.jit
def _bf16_nearest_even(x):
    """fp32 x rounded to bf16, nearest even, in integer arithmetic (see _dot_options)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.autotune(configs=_SYRK_CONFIGS, key=["M", "K", "BATCH", "HAS_C"])
@triton.jit
def _syrk_kernel(x_ptr, c_ptr, out_ptr, M, K, BATCH,
                 sxb, sxm, sxk, scb, scm, scn, sob, som, son, alpha, beta,
                 HAS_C: tl.constexpr, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = alpha·XXᵀ (+ beta·C) for X (M×K); one program per upper tile (i ≤ j)."""
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    # Upper tiles are numbered column by column, pid = j(j+1)/2 + i; invert with a square
    # root, then fix the float rounding at triangular numbers.
    j = ((tl.sqrt(8.0 * pid + 1.0) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    i = pid - j * (j + 1) // 2

    rows = i * BLOCK + tl.arange(0, BLOCK)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    x = x_ptr + batch * sxb
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        lhs = tl.load(x + rows[:, None] * sxm + k[None, :] * sxk,
                      mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        rhs = tl.load(x + k[:, None] * sxk + cols[None, :] * sxm,
                      mask=(k[:, None] < K) & (cols[None, :] < M), other=0.0)
        if EMULATE_BF16:
            lhs, rhs = lhs.to(tl.float32), rhs.to(tl.float32)
        acc = tl.dot(lhs, rhs, acc, input_precision=PRECISION)

    inside = (rows[:, None] < M) & (cols[None, :] < M)
    acc = alpha * acc
    if HAS_C:
        c = tl.load(c_ptr + batch * scb + rows[:, None] * scm + cols[None, :] * scn, mask=inside, other=0.0)
        acc += beta * c.to(tl.float32)
    if EMULATE_BF16:
        val = _bf16_nearest_even(acc)
    else:
        val = acc.to(out_ptr.dtype.element_ty)
    out = out_ptr + batch * sob
    # A diagonal tile keeps its upper half and takes its lower half from the mirror store,
    # so the result is symmetric bit for bit.
    tl.store(out + rows[:, None] * som + cols[None, :] * son, val,
             mask=inside & (rows[:, None] <= cols[None, :]))
    tl.store(out + cols[:, None] * som + rows[None, :] * son, tl.trans(val),
             mask=(cols[:, None] < M) & (rows[None, :] < M) & (cols[:, None] > rows[None, :]))


@triton.autotune(configs=_MATMUL_CONFIGS, key=["M", "N", "BATCH"])
@triton.jit
def _ax_plus_bx_kernel(b_ptr, x_ptr, out_ptr, M, N, BATCH,
                       sbb, sbm, sbk, sxb, sxm, sxn, sob, som, son, a,
                       PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = a·X + B·X for B (M×M), X (M×N)."""
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    # Grouped ordering: GROUP_M row blocks sweep the columns together, so the X column
    # panels they share stay in L2.
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    b = b_ptr + batch * sbb
    x = x_ptr + batch * sxb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        k = k0 + ks
        lhs = tl.load(b + rows[:, None] * sbm + k[None, :] * sbk,
                      mask=(rows[:, None] < M) & (k[None, :] < M), other=0.0)
        rhs = tl.load(x + k[:, None] * sxm + cols[None, :] * sxn,
                      mask=(k[:, None] < M) & (cols[None, :] < N), other=0.0)
        if EMULATE_BF16:
            lhs, rhs = lhs.to(tl.float32), rhs.to(tl.float32)
        acc = tl.dot(lhs, rhs, acc, input_precision=PRECISION)

    inside = (rows[:, None] < M) & (cols[None, :] < N)
    x_tile = tl.load(x + rows[:, None] * sxm + cols[None, :] * sxn, mask=inside, other=0.0)
    acc += a * x_tile.to(tl.float32)
    if EMULATE_BF16:
        val = _bf16_nearest_even(acc)
    else:
        val = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + batch * sob + rows[:, None] * som + cols[None, :] * son, val, mask=inside)


def _dot_options(dtype):
    """fp32 products follow torch's TF32 switch. The interpreter (triton 3.9) gets bf16 wrong
    twice: its tl.dot multiplies bf16's raw uint16 storage (triton-lang/triton#11584; bf16
    arithmetic is unsupported there), and its fp32→bf16 cast truncates where GPUs round to
    nearest even. EMULATE_BF16 upcasts the operands (bf16 products are exact in fp32) and
    rounds with integer arithmetic instead: the GPU's results, on CPU."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return dict(PRECISION="tf32" if tf32 else "ieee", EMULATE_BF16=interpreting() and dtype == torch.bfloat16)


def _check(name, t, stack=True):
    if stack and t.ndim != 3:
        raise ValueError(f"{name} must be a stack of matrices (B, m, n), got shape {tuple(t.shape)}")
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels take {TRITON_DTYPES}")


def _output(out, shape, like):
    if out is None:
        return like.new_empty(shape)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be a {like.dtype} tensor of shape {tuple(shape)} on {like.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def _syrk(X, C, alpha, beta, out):
    batch, m, k = X.shape
    out = _output(out, (batch, m, m), X)
    C_ = out if C is None else C  # any valid pointer; not read when HAS_C is False

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK"])
        return (tiles * (tiles + 1) // 2, batch)

    _syrk_kernel[grid](X, C_, out, m, k, batch, *X.stride(), *C_.stride(), *out.stride(),
                       float(alpha), float(beta), HAS_C=C is not None, **_dot_options(X.dtype))
    return out


def xxt(X, *, out=None):
    """A = X Xᵀ for a stack X (B, m, n), computing only the upper tiles and mirroring them."""
    _check("X", X)
    return _syrk(X, None, 1.0, 0.0, out)


def ba_plus_ca2(A, b, c, *, out=None):
    """B = b·A + c·A² for a stack of symmetric A (B, m, m); A² is computed as A Aᵀ (upper tiles)."""
    _check("A", A)
    if A.size(-1) != A.size(-2):
        raise ValueError(f"A must be square, got shape {tuple(A.shape)}")
    return _syrk(A, A, c, b, out)


def ax_plus_bx(X, B, a, *, out=None):
    """X' = a·X + B·X for stacks X (B, m, n) and B (B, m, m); ``out`` must not alias X."""
    _check("X", X)
    _check("B", B)
    batch, m, n = X.shape
    if B.shape != (batch, m, m) or B.dtype != X.dtype:
        raise ValueError(f"B must be {X.dtype} of shape {(batch, m, m)}, got {B.dtype} {tuple(B.shape)}")
    out = _output(out, X.shape, X)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), batch)

    _ax_plus_bx_kernel[grid](B, X, out, m, n, batch, *B.stride(), *X.stride(), *out.stride(),
                             float(a), **_dot_options(X.dtype))
    return out


def newton_schulz_triton(X, coefficients, *, eps=1e-7, out_dtype=None):
    """Triton path of :func:`matrixopt.kernels.newton_schulz`; same arguments and result."""
    _check("X", X, stack=False)
    out_dtype = out_dtype or X.dtype
    if X.numel() == 0:
        return X.to(out_dtype)
    shape = X.shape
    X, transposed = _wide_unit_stack(X, eps)
    # The kernels read the wide orientation row-wise; a tall X's normalized copy is still
    # laid out transposed, so it takes one more copy here.
    X = X.contiguous()
    batch, m, _ = X.shape
    A = X.new_empty(batch, m, m)
    B = torch.empty_like(A)
    spare = torch.empty_like(X)
    for a, b, c in coefficients:
        xxt(X, out=A)
        ba_plus_ca2(A, b, c, out=B)
        X, spare = ax_plus_bx(X, B, a, out=spare), X
    return _restore(X, transposed, shape, out_dtype)
