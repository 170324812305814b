"""Newton-Schulz kernels: speed, accuracy, and the Muon step they serve.

    python -m benchmarks kernels [--quick]      # with the other kernel benchmarks
    python -m benchmarks.ns [--quick] [--device cuda] [--out DIR]

Side by side in one run, all in bf16 with 5 steps:

- speed: the Triton kernels ("ours", :func:`matrixopt.kernels.newton_schulz`), the
  PyTorch twin (batched torch matmuls), torch.optim.Muon's own routine (2-D only, so
  looped over a stack), for rectangular cases a candidate Gram formulation in torch
  matmuls (:func:`gram_newton_schulz`), and a candidate that computes the symmetric products
  on their upper block triangle with cuBLAS (:func:`symmetric_blocks_newton_schulz`, at
  its default block size and at ``SPEED_SYM_BLOCKS``); ms are medians over CUDA events after warm-up (autotuning
  included in the warm-up). TFLOP/s count the products densely, 4m²n + 2m³ per step for
  an m×n matrix with m ≤ n (XXᵀ, A², BX), as DESIGN.md's anchor figures do, so the
  symmetric kernels' saving shows as higher throughput.
- accuracy: X = U diag(s) Vᵀ with a gradient-like power-law spectrum s_i = i^(-1/2) (random
  Gaussian matrices have σ_min near 0, which no 5-step schedule lifts); its fp64 polar
  factor is U Vᵀ. Reported for ours, the twin and the two candidates: ‖O − UVᵀ‖_F / ‖UVᵀ‖_F and O's
  singular-value band, for the "muon" and "polar_express" schedules and a 4-step one
  (:func:`minimax_schedule`).
- optimizer step on the LLaMA-1B matrix set (16 layers × {4×2048², 2×5632×2048,
  2048×5632}): matrixopt.Muon with the Triton kernels, with the twin, with the
  sym-blocks candidate, the 4-step schedule and both, torch.optim.Muon,
  fused torch.optim.AdamW (see :mod:`benchmarks.step`).

``quick`` runs tiny sizes on CPU (ours through the Triton interpreter when
``TRITON_INTERPRET=1``, else left out; the optimizer step without it): it checks the
code, and its timings say nothing about a GPU.
"""
import functools
import os
from unittest import mock

import numpy as np
import scipy.optimize
import torch

from matrixopt.kernels import newton_schulz, newton_schulz_torch
from matrixopt.kernels._dispatch import interpreting, triton_available
from matrixopt.kernels.newton_schulz import _restore, _wide_unit_stack
from matrixopt.orthogonalize import MUON_COEFFICIENTS, ns_schedule

from .common import cpu_note, default_device, median_ms, module_main
from .optimizers import ADAMW, TORCH_MUON, VARIANTS, Settings, Variant
from .step import SHAPES, add_ratios, llama_matrices, measure

STEPS = 5
#: The fewer-step schedule the accuracy and step tables try (see :func:`minimax_schedule`).
MINIMAX = "minimax, 4 steps"
MINIMAX_STEPS_FLOOR = (4, 3e-3)
# (label, batch, m, n)
SPEED_CASES = [("1024²", 1, 1024, 1024), ("2048²", 1, 2048, 2048), ("4096²", 1, 4096, 4096),
               ("8192²", 1, 8192, 8192), ("2048×5632", 1, 2048, 5632), ("4096×11008", 1, 4096, 11008),
               ("32×1024²", 32, 1024, 1024), ("16×2048²", 16, 2048, 2048)]
QUICK_SPEED_CASES = [("24×72", 1, 24, 72), ("4×32²", 4, 32, 32)]
#: Block sizes the speed table also tries for the sym-blocks candidate (beside :func:`sym_block`'s).
SPEED_SYM_BLOCKS = (256, 1024)
# 1000×3001: sizes off every tile size, so the kernels' masks are checked on the GPU too.
ACCURACY_SHAPES = [(1024, 1024), (2048, 2048), (4096, 4096), (5632, 2048), (4096, 11008), (1000, 3001)]
QUICK_ACCURACY_SHAPES = [(72, 40)]


def ns_flops(batch: int, m: int, n: int, steps: int = STEPS) -> float:
    """Dense FLOPs of ``steps`` NS steps on ``batch`` m×n matrices."""
    m, n = min(m, n), max(m, n)
    return batch * steps * (4 * m * m * n + 2 * m**3)


def torch_muon_routine():
    """torch.optim.Muon's NS (a private function; None when this torch lacks it)."""
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz
    except ImportError:
        return None
    return lambda X: torch.stack([_zeropower_via_newtonschulz(x, MUON_COEFFICIENTS, STEPS, 1e-7) for x in X])


def gram_newton_schulz(X, coefficients, *, eps=1e-7):
    """Candidate for rectangular matrices (issue 6: "a Gram-matrix formulation ... when it
    measures faster"): the same iteration carried on the small side.

    With X_k = Q_k·X_0 on the wide orientation (m ≤ n) and A_k = X_k X_kᵀ, a step is
    P = aI + bA + cA², Q ← P·Q, A ← P·A·P, and the result is Q·X_0: 4m²n + 8·steps·m³ dense
    FLOPs against steps·(4m²n + 2m³), fewer once n ≳ 2m (2048×5632: 21% fewer at 5 steps).
    A is carried, never recomputed from X, so rounding accumulates in it: the accuracy
    table shows what that costs in bf16. Equal to the twin in exact arithmetic (tested in
    float64). Moves into kernels/ if the GPU run says it is faster at equal accuracy.
    """
    shape, out_dtype = X.shape, X.dtype
    X, transposed = _wide_unit_stack(X, eps)
    A = X @ X.mT
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    Q = None
    for a, b, c in coefficients:
        P = torch.baddbmm(A, A, A, beta=b, alpha=c) + a * eye
        Q = P if Q is None else P @ Q
        A = P @ A @ P
    return _restore(Q @ X, transposed, shape, out_dtype)


def _symmetric_product(Y, out, block, base=None, beta=0.0, alpha=1.0):
    """out = beta·base + alpha·YYᵀ for a stack Y (B, m, k), computed one block row at a time
    from the diagonal block rightwards, the lower triangle mirrored from the upper."""
    m = Y.size(-2)
    for r0 in range(0, m, block):
        r1 = min(r0 + block, m)
        right = Y[:, r0:].mT
        rows = Y[:, r0:r1] @ right if base is None else \
            torch.baddbmm(base[:, r0:r1, r0:], Y[:, r0:r1], right, beta=beta, alpha=alpha)
        out[:, r0:r1, r0:] = rows
        out[:, r1:, r0:r1] = rows[:, :, r1 - r0:].mT
    return out


def sym_block(m: int) -> int:
    """Block rows for :func:`symmetric_blocks_newton_schulz` on an m×m Gram matrix: at most 8
    block rows (so 56% of the dense FLOPs of a symmetric product at best), at least 512 each (a
    GEMM that cuBLAS runs near its peak)."""
    return max(512, m // 8)


def symmetric_blocks_newton_schulz(X, coefficients, *, eps=1e-7, block=None):
    """Candidate (issue 6): the twin with its two symmetric products cut to their upper block
    triangle, all in cuBLAS GEMMs instead of Triton kernels.

    With k block rows of the wide m×n X, A = XXᵀ costs (1 + 1/k)·m²n FLOPs instead of 2m²n and
    B = bA + cA² (= bA + c·AAᵀ, A symmetric) (1 + 1/k)·m³ instead of 2m³; X ← aX + BX stays a
    full GEMM. At k = 8 a square step is 4.25m³ against 6m³ (1.41× at equal GEMM throughput,
    against our Triton kernels' 1.12× measured at 4096²). Each product is k GEMMs (one per
    block row) plus the copies that mirror it. Equal to the twin up to rounding (tested in
    float64); on this repo's 2-core CPU it takes 1024² fp32 NS from 156 to 137 ms (block 512)
    or 122 ms (block 128). ``block``: rows per block (default :func:`sym_block`).
    """
    shape, out_dtype = X.shape, X.dtype
    X, transposed = _wide_unit_stack(X, eps)
    block = block or sym_block(X.size(-2))
    A = X.new_empty(X.size(0), X.size(-2), X.size(-2))
    B = torch.empty_like(A)
    for a, b, c in coefficients:
        _symmetric_product(X, A, block)
        _symmetric_product(A, B, block, base=A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return _restore(X, transposed, shape, out_dtype)


@functools.cache  # ~2 s of fitting; the accuracy and step tables both use it
def minimax_schedule(steps: int, floor: float) -> list[tuple[float, float, float]]:
    """Polar Express's construction (Amsel et al. 2025) from another floor: step by step, the
    odd quintic closest to 1 in the worst case over the interval [lo, hi] the singular values
    are known to lie in (first [floor, 1]), whose range on it is the next step's interval.

    Their published triples start from lo = 1e-3 and want 5 steps: cut to 4 they leave σ in
    [0.44, 1.56] (0.41 from the polar factor on this benchmark's spectrum). From lo = 3e-3 four
    steps map [3e-3, 1] into [0.80, 1.20]; on this benchmark's 1024×1024 and 1024×2816 matrices
    (σ_min/‖X‖_F ≈ 0.011) that is 0.149 from the polar factor in bf16 against 0.167 for Muon's
    five steps (CPU): the same accuracy for 4/5 of the FLOPs, on spectra whose normalized σ
    stay above ~3e-3 (directions below it are left short of 1, as Muon's leave those below ~1.5e-3).
    The fit is Nelder-Mead on 2000 log-spaced σ per step, from fixed starts (deterministic).
    """
    lo, hi, schedule = floor, 1.0, []
    starts = (MUON_COEFFICIENTS, (2.0, -1.5, 0.5), (8.0, -20.0, 15.0), (1.875, -1.25, 0.375))
    for _ in range(steps):
        sigma = np.geomspace(lo, hi, 2000)
        fits = [scipy.optimize.minimize(lambda abc: np.abs(_quintic(abc, sigma) - 1).max(), x0,
                                        method="Nelder-Mead", options=dict(xatol=1e-9, fatol=1e-11, maxiter=8000))
                for x0 in starts]
        abc = tuple(float(v) for v in min(fits, key=lambda fit: fit.fun).x)
        schedule.append(abc)
        image = _quintic(abc, np.linspace(lo, hi, 20001))
        lo, hi = float(image.min()), float(image.max())
    return schedule


def _quintic(abc, x):
    a, b, c = abc
    return x * (a + x * x * (b + c * x * x))


def ours_runs(device: torch.device) -> bool:
    """Whether the Triton kernels run here: on CUDA, or on CPU under the interpreter."""
    return triton_available() and (device.type == "cuda" or interpreting())


def schedules() -> dict[str, list[tuple[float, float, float]]]:
    """The schedules the accuracy table compares; the speed table runs Muon's."""
    return {"muon": ns_schedule("muon", STEPS), "polar_express": ns_schedule("polar_express", STEPS),
            MINIMAX: minimax_schedule(*MINIMAX_STEPS_FLOOR)}


def implementations(device: torch.device, schedule_name: str = "muon", schedule=None) -> dict:
    """name -> NS of a (B, m, n) stack with ``schedule`` (default: the named one, 5 steps);
    torch.optim.Muon's routine has the "muon" schedule only."""
    schedule = schedule or ns_schedule(schedule_name, STEPS)
    impls = {}
    if ours_runs(device):
        impls["ours"] = lambda X: newton_schulz(X, schedule, backend="triton")
    impls["twin"] = lambda X: newton_schulz_torch(X, schedule)
    impls["gram"] = lambda X: gram_newton_schulz(X, schedule)
    impls["sym-blocks"] = lambda X: symmetric_blocks_newton_schulz(X, schedule)
    if schedule_name != "muon":
        return impls
    routine = torch_muon_routine()
    if routine is not None:
        impls["torch.optim.Muon"] = routine
    return impls


def speed(cases, device, warmup: int, repeats: int) -> list[dict]:
    impls = implementations(device)
    schedule = ns_schedule("muon", STEPS)
    for block in SPEED_SYM_BLOCKS:  # how much the candidate's block size matters
        impls[f"sym-blocks/{block}"] = lambda X, block=block: symmetric_blocks_newton_schulz(X, schedule, block=block)
    rows = []
    for label, batch, m, n in cases:
        X = torch.randn(batch, m, n, device=device, dtype=torch.bfloat16)
        row = {"case": label}
        outputs = {}
        for name, fn in impls.items():
            if name == "gram" and max(m, n) < 2 * min(m, n):  # it does more work there
                continue
            block = int(name.split("/")[1]) if name.startswith("sym-blocks/") else None
            if block is not None and (block == sym_block(min(m, n)) or block >= min(m, n)):
                continue  # the default block size's column, or no blocking at all
            outputs[name] = fn(X)
            ms = median_ms(lambda: fn(X), device, warmup, repeats)
            row[f"{name} ms"] = ms
            row[f"{name} TFLOP/s"] = ns_flops(batch, m, n) / ms / 1e9
        for name in outputs:
            if name != "ours" and "ours" in outputs:
                row[f"speedup vs {name}"] = row[f"{name} ms"] / row["ours ms"]
        row["sym-blocks speedup vs twin"] = row["twin ms"] / row["sym-blocks ms"]
        if "ours" in outputs:
            twin = outputs["twin"].double()
            row["ours vs twin (rel. diff)"] = ((outputs["ours"].double() - twin).norm() / twin.norm()).item()
        rows.append(row)
        print(row, flush=True)
        X = outputs = None  # freed before the next case's matrices are made
    return rows


def gradient_like(m: int, n: int, device, seed: int = 0):
    """(X, U Vᵀ) in fp64: X = U diag(s) Vᵀ with random orthonormal U, V and s_i = i^(-1/2)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, device=device, dtype=torch.float64, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(n, k, device=device, dtype=torch.float64, generator=generator)).Q
    s = torch.arange(1, k + 1, device=device, dtype=torch.float64).rsqrt()
    return (U * s) @ V.mT, U @ V.mT


def accuracy(shapes, device) -> list[dict]:
    rows = []
    named_schedules = schedules()
    for m, n in shapes:
        X, polar = gradient_like(m, n, device)
        X = X.bfloat16()[None]
        for schedule_name, schedule in named_schedules.items():
            impls = implementations(device, schedule_name, schedule)
            impls.pop("torch.optim.Muon", None)  # same schedule and arithmetic as the twin
            for name, fn in impls.items():
                O = fn(X)[0].double()
                small = O @ O.mT if m <= n else O.mT @ O  # its eigenvalues are σ(O)², and it is small
                sv = torch.linalg.eigvalsh(small).clamp_min(0).sqrt()
                rows.append({"shape": f"{m}×{n}", "schedule": schedule_name, "impl": name,
                             "‖O−UVᵀ‖/‖UVᵀ‖": ((O - polar).norm() / polar.norm()).item(),
                             "σ_min(O)": sv.min().item(), "σ_max(O)": sv.max().item()})
                print(rows[-1], flush=True)
        del X, polar
    return rows


def optimizer_step(set_name: str, device, warmup: int, repeats: int) -> list[dict]:
    """ms per step: matrixopt.Muon with our kernels, with the twin and with the candidates
    (sym-blocks NS, the 4-step schedule, both), torch.optim.Muon, AdamW."""
    params = llama_matrices(*SHAPES[set_name], device)
    settings = Settings()
    rows = []

    def add(name, label=None):
        rows.append(measure(name, params, settings, device, warmup, repeats))
        rows[-1]["optimizer"] = label or name
        print(rows[-1], flush=True)

    add(ADAMW)
    if hasattr(torch.optim, "Muon"):
        add(TORCH_MUON)
    # Not through the interpreter: a CPU step with it only retests the kernels, slowly.
    variants = {"ours": "triton", "twin": "torch"} if device.type == "cuda" else {"twin": "torch"}
    for label, backend in variants.items():
        with mock.patch.dict(os.environ, MATRIXOPT_KERNELS=backend):
            add("matrixopt.Muon", f"matrixopt.Muon ({label})")
    steps, floor = MINIMAX_STEPS_FLOOR
    minimax = Variant("matrixopt.Muon", {"ns_steps": steps, "ns_coefficients": minimax_schedule(steps, floor)})
    candidates = {"sym-blocks": (symmetric_blocks_newton_schulz, Variant("matrixopt.Muon", {})),
                  MINIMAX: (newton_schulz, minimax),
                  f"sym-blocks, {MINIMAX}": (symmetric_blocks_newton_schulz, minimax)}
    for label, (ns, variant) in candidates.items():
        name = f"matrixopt.Muon ({label})"
        with mock.patch("matrixopt.orthogonalize.newton_schulz", ns), mock.patch.dict(VARIANTS, {name: variant}):
            add(name)
    add_ratios(rows)
    torch_muon = next((r["step_ms"] for r in rows if r["optimizer"] == TORCH_MUON), None)
    return [{"optimizer": r["optimizer"], "step ms": r["step_ms"], "vs AdamW": r["step_vs_adamw"],
             "speedup vs torch.optim.Muon": torch_muon / r["step_ms"] if torch_muon else None,
             "peak extra MB": r["peak_extra_MB"]} for r in rows]


def run(quick: bool = False, device=None) -> dict[str, list[dict]]:
    """The three sections as table rows; ``quick``: tiny sizes, meant for a CPU."""
    device = default_device(device)
    warmup, repeats = (1, 1) if quick else (3, 20)
    set_name = "ci" if quick else "1B"
    note = cpu_note(device)
    d, h, layers = SHAPES[set_name]
    return {
        f"NS, {STEPS} steps, bf16: ms and dense TFLOP/s{note}":
            speed(QUICK_SPEED_CASES if quick else SPEED_CASES, device, warmup, repeats),
        f"NS accuracy against the fp64 polar factor (power-law spectrum){note}":
            accuracy(QUICK_ACCURACY_SHAPES if quick else ACCURACY_SHAPES, device),
        f"Optimizer step, {set_name} matrix set ({layers} layers, d={d}, h={h}){note}":
            optimizer_step(set_name, device, warmup, repeats),
    }


def main(argv=None):
    return module_main("ns", run, description=__doc__.splitlines()[0], extra={"steps": STEPS}, argv=argv)


if __name__ == "__main__":
    main()
