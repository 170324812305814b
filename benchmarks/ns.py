"""Newton-Schulz kernels: speed, accuracy, and the Muon step they serve.

    python -m benchmarks kernels [--quick]      # with the other kernel benchmarks
    python -m benchmarks ns [--quick] [--cpu] [--threads 1] [--device cuda] [--out DIR]

``--cpu`` runs only the CPU sections (:func:`cpu_run`) at the target shapes (1024×2816,
2816×1024, 512×2816, 512², 1024², fp32, 5 Muon steps, a few minutes on 2 cores): our
standard, Gram and auto NS beside torch.optim.Muon's routine and the peer packages that
import (gram-newton-schulz, pytorch-optimizer, heavyball; each one missing is noted), the
Gram/standard crossover that ``method="auto"`` uses, the 4-step schedule against Muon's and
Polar Express's 5 steps on LLaMA shapes, and the bf16 failure Gram restarts prevent.
``--quick`` runs those sections at tiny sizes too.

Side by side in one run, all in bf16 with 5 steps:

- speed: the Triton kernels ("ours", :func:`matrixopt.kernels.newton_schulz`), the
  PyTorch twin (batched torch matmuls), torch.optim.Muon's own routine (2-D only, so
  looped over a stack), for rectangular cases the Gram method
  (``newton_schulz(method="gram")``), and a candidate that computes the symmetric products
  on their upper block triangle with cuBLAS (:func:`symmetric_blocks_newton_schulz`, at
  its default block size and at ``SPEED_SYM_BLOCKS``); ms are medians over CUDA events after warm-up (autotuning
  included in the warm-up). TFLOP/s count the products densely, 4m²n + 2m³ per step for
  an m×n matrix with m ≤ n (XXᵀ, A², BX), so the symmetric kernels' saving shows as
  higher throughput.
- accuracy: X = U diag(s) Vᵀ with a gradient-like power-law spectrum s_i = i^(-1/2) (random
  Gaussian matrices have σ_min near 0, which no 5-step schedule lifts); its fp64 polar
  factor is U Vᵀ. Reported for ours, the twin, Gram and sym-blocks: ‖O − UVᵀ‖_F / ‖UVᵀ‖_F and O's
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

import matrixopt
from matrixopt import ns_schedule
from matrixopt.kernels import choose_backend, newton_schulz, newton_schulz_torch

from .common import cpu_note, default_device, median_ms, module_main
from .optimizers import ADAMW, TORCH_MUON, VARIANTS, Settings, Variant
from .step import SHAPES, add_ratios, llama_matrices, measure

STEPS = 5
#: Keller Jordan's quintic, torch.optim.Muon's at every step (matrixopt's "muon" schedule).
MUON_COEFFICIENTS = ns_schedule("muon", 1)[0]
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


def symmetric_blocks_newton_schulz(X, coefficients, *, eps=1e-7, block=None, method=None):
    """Candidate (issue 6): the twin with its two symmetric products cut to their upper block
    triangle, all in cuBLAS GEMMs instead of Triton kernels (the standard formulation only:
    ``method``, which Muon passes, is ignored).

    With k block rows of the wide m×n X, A = XXᵀ costs (1 + 1/k)·m²n FLOPs instead of 2m²n and
    B = bA + cA² (= bA + c·AAᵀ, A symmetric) (1 + 1/k)·m³ instead of 2m³; X ← aX + BX stays a
    full GEMM. At k = 8 a square step is 4.25m³ against 6m³ (1.41× at equal GEMM throughput,
    against our Triton kernels' 1.12× measured at 4096²). Each product is k GEMMs (one per
    block row) plus the copies that mirror it. Equal to the twin up to rounding (tested in
    float64); on this repo's 2-core CPU it takes 1024² fp32 NS from 156 to 137 ms (block 512)
    or 122 ms (block 128). ``block``: rows per block (default :func:`sym_block`).
    """
    shape, out_dtype = X.shape, X.dtype
    # The twin's layout: a stack in the wide orientation, each matrix at unit Frobenius norm.
    X = X.reshape(-1, *shape[-2:])
    tall = X.size(-2) > X.size(-1)
    X = X.mT if tall else X
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    block = block or sym_block(X.size(-2))
    A = X.new_empty(X.size(0), X.size(-2), X.size(-2))
    B = torch.empty_like(A)
    for a, b, c in coefficients:
        _symmetric_product(X, A, block)
        _symmetric_product(A, B, block, base=A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return (X.mT if tall else X).reshape(shape).to(out_dtype)


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
    """Whether the Triton kernels run here (triton installed, and on CUDA, or on CPU under the
    interpreter): whether ``choose_backend`` lets a tensor on ``device`` force them."""
    try:
        choose_backend(torch.empty(0, device=device), "triton")
    except RuntimeError:
        return False
    return True


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
    impls["gram"] = lambda X: newton_schulz(X, schedule, method="gram")
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
        with mock.patch("matrixopt.kernels.newton_schulz", ns), mock.patch.dict(VARIANTS, {name: variant}):
            add(name)
    add_ratios(rows)
    torch_muon = next((r["step_ms"] for r in rows if r["optimizer"] == TORCH_MUON), None)
    return [{"optimizer": r["optimizer"], "step ms": r["step_ms"], "vs AdamW": r["step_vs_adamw"],
             "speedup vs torch.optim.Muon": torch_muon / r["step_ms"] if torch_muon else None,
             "peak extra MB": r["peak_extra_MB"]} for r in rows]



# -- CPU comparison with the peers (``--cpu``; tiny sizes with ``--quick``) -------------------
#: The shapes the Gram targets are stated for (fp32, 5 Muon steps).
CPU_CASES = [(1024, 2816), (2816, 1024), (512, 2816), (512, 512), (1024, 1024)]
QUICK_CPU_CASES = [(24, 72), (32, 32)]
#: Aspect ratios the crossover sweep times at short sides CROSSOVER_SIDES (quick: the first).
CROSSOVER_RATIOS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
CROSSOVER_SIDES = (128, 512)
#: LLaMA shapes the 4-step schedule is checked on (d = 512 and 1024 blocks, a GQA k/v map).
FOUR_STEP_SHAPES = [(512, 512), (512, 1376), (1024, 2816), (128, 512)]
QUICK_FOUR_STEP_SHAPES = [(32, 88)]


def peers(schedule) -> tuple[dict, list[str]]:
    """name -> NS of a (B, m, n) stack from the peer packages that import here, and a note for
    each one that does not. Each runs Muon's 5 steps where it takes a schedule."""
    impls, notes = {}, []
    routine = torch_muon_routine()
    if routine is not None:
        impls["torch.optim.Muon (bf16 inside)"] = routine
    try:
        from gram_newton_schulz import GramNewtonSchulz
    except ImportError as error:
        notes.append(f"gram-newton-schulz: not installed ({error})")
    else:  # its CuTeDSL kernels need CUDA (quack); the torch path runs in fp16
        gns = GramNewtonSchulz(ns_coefficients=[list(t) for t in schedule], ns_use_kernels=False, compile_kwargs=None)
        impls["gram-newton-schulz 0.1.6 (fp16 inside, restart at 2)"] = gns
    try:
        from pytorch_optimizer.optimizer.utils import (zero_power_via_gram_newton_schulz,
                                                       zero_power_via_newton_schulz_5)
    except ImportError as error:
        notes.append(f"pytorch-optimizer: not installed ({error})")
    else:
        kw = dict(num_steps=len(schedule), weights=list(schedule), dtype=torch.float32)
        impls["pytorch-optimizer NS"] = lambda X: zero_power_via_newton_schulz_5(X, **kw)
        impls["pytorch-optimizer Gram (restart at 2)"] = lambda X: zero_power_via_gram_newton_schulz(X, **kw)
    try:
        import heavyball.utils as heavyball_utils
    except ImportError as error:
        notes.append(f"heavyball: not installed ({error})")
    else:  # fixed 5-step schedule (You's), bf16 via stochastic rounding; not compiled here
        heavyball_utils.compile_mode = None
        impls["heavyball (own 5 triples, bf16 inside)"] = heavyball_utils.zeropower_via_newtonschulz5
    return impls, notes


def output_accuracy(O, polar) -> dict:
    """‖O − UVᵀ‖/‖UVᵀ‖ and O's singular-value band, in fp64 (σ² from the small Gram side)."""
    O = O.double()
    small = O @ O.mT if O.size(-2) <= O.size(-1) else O.mT @ O
    sv = torch.linalg.eigvalsh(small).clamp_min(0).sqrt()
    return {"‖O−UVᵀ‖/‖UVᵀ‖": ((O - polar).norm() / polar.norm()).item(),
            "σ_min(O)": sv.min().item(), "σ_max(O)": sv.max().item()}


def cpu_compare(cases, warmup: int, repeats: int) -> tuple[list[dict], list[str]]:
    """fp32 inputs, Muon's 5 steps: our standard, Gram and auto NS beside the peers, on the
    same gradient-like matrix; ms (median) and accuracy against its fp64 polar factor."""
    schedule = ns_schedule("muon", STEPS)
    impls = {f"matrixopt {method}": lambda X, method=method: newton_schulz(X, schedule, method=method)
             for method in ("standard", "gram", "auto")}
    others, notes = peers(schedule)
    impls.update(others)
    device, rows = torch.device("cpu"), []
    for m, n in cases:
        X, polar = gradient_like(m, n, device)
        X = X.float()[None]
        base = None
        for name, fn in impls.items():
            ms = median_ms(lambda: fn(X), device, warmup, repeats)
            base = base or ms
            rows.append({"shape": f"{m}×{n}", "impl": name, "ms": ms, "vs matrixopt standard": ms / base,
                         **output_accuracy(fn(X)[0], polar)})
            print(rows[-1], flush=True)
    return rows, notes


def crossover(sides, ratios, warmup: int, repeats: int) -> list[dict]:
    """Gram / standard time for m×(r·m) inputs, fp32 and bf16, 5 Muon steps: where Gram starts
    to win is the cost model of ``method="auto"`` (GRAM_CROSSOVER)."""
    schedule = ns_schedule("muon", STEPS)
    device, rows = torch.device("cpu"), []
    for dtype in (torch.float32, torch.bfloat16):
        for m in sides:
            for r in ratios:
                X = torch.randn(1, m, round(r * m), dtype=dtype)
                ms = {method: median_ms(lambda: newton_schulz(X, schedule, method=method), device, warmup, repeats)
                      for method in ("standard", "gram")}
                rows.append({"dtype": str(dtype).removeprefix("torch."), "m": m, "n/m": r, "standard ms": ms["standard"],
                             "gram ms": ms["gram"], "gram / standard": ms["gram"] / ms["standard"]})
                print(rows[-1], flush=True)
    return rows


def four_step_schedule(shapes) -> list[dict]:
    """Muon's 5 steps, Polar Express's 5 and the 4-step minimax schedule on LLaMA shapes
    (power-law spectrum, fp32 and bf16, standard method): error and band vs the fp64 polar factor."""
    named = {"muon, 5 steps": ns_schedule("muon", STEPS), "polar_express, 5 steps": ns_schedule("polar_express", STEPS),
             MINIMAX: minimax_schedule(*MINIMAX_STEPS_FLOOR)}
    rows = []
    for m, n in shapes:
        X, polar = gradient_like(m, n, torch.device("cpu"))
        for dtype in (torch.float32, torch.bfloat16):
            for name, schedule in named.items():
                O = newton_schulz(X.to(dtype)[None], schedule, method="standard")[0]
                rows.append({"shape": f"{m}×{n}", "dtype": str(dtype).removeprefix("torch."), "schedule": name,
                             **output_accuracy(O, polar)})
                print(rows[-1], flush=True)
    return rows


def restart_failure(m: int = 128, n: int = 512) -> list[dict]:
    """bf16 Gram NS with the restart rule and without restarts, on a spectrum spanning 1e-4."""
    generator = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64, generator=generator)).Q
    X = ((U * torch.logspace(0, -4, m, dtype=torch.float64)) @ V.mT)
    rows = []
    for name in ("muon", "polar_express"):
        schedule = ns_schedule(name, STEPS)
        for label, kw in (("standard", dict(method="standard")), ("gram, restarts by the rule", dict(method="gram")),
                          ("gram, no restart", dict(method="gram", restarts=()))):
            O = newton_schulz(X.bfloat16()[None], schedule, **kw)[0]
            rows.append({"schedule": name, "impl": label, **output_accuracy(O, U @ V.mT)})
    return rows


#: A LLaMA block of width 512 with GQA (n_kv_heads = n_heads/4): q, o; k, v; gate, up; down.
MUON_STEP_SHAPES = [(512, 512), (512, 512), (128, 512), (128, 512), (1376, 512), (1376, 512), (512, 1376)]
MUON_STEP_LAYERS = 4


def plain_muon_step(params, momenta, *, lr=0.02, momentum=0.95, weight_decay=0.1, steps=STEPS):
    """The Muon step of torch.optim.Muon (momentum, Nesterov, Keller Jordan's quintic 5 times
    on the wide orientation, lr·√max(1, m/n)), in fp32 throughout, one matrix at a time: the
    reference a fast implementation is timed against."""
    a, b, c = MUON_COEFFICIENTS
    for p, buf in zip(params, momenta):
        buf.lerp_(p.grad, 1 - momentum)
        X = p.grad.lerp(buf, momentum)
        tall = X.shape[0] > X.shape[1]
        X = X.mT if tall else X
        X = X / X.norm().clamp_min(1e-7)
        for _ in range(steps):
            A = X @ X.mT
            X = a * X + (b * A + c * A @ A) @ X
        X = X.mT if tall else X
        p.mul_(1 - lr * weight_decay).add_(X, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)


def bf16_matmul_note() -> str:
    """What this CPU does with bf16 matmuls (torch.optim.Muon always runs NS in bf16)."""
    amx = getattr(torch._C._cpu, "_is_amx_tile_supported", lambda: False)()
    avx512bf16 = getattr(torch._C._cpu, "_is_avx512_bf16_supported", lambda: False)()
    return (f"CPU capability {torch.backends.cpu.get_cpu_capability()}, AMX tiles {'yes' if amx else 'no'}, "
            f"AVX512-BF16 {'yes' if avx512bf16 else 'no'}: bf16 matmul speed varies by two orders of magnitude "
            "between CPUs, so torch.optim.Muon's CPU row says more about the CPU than the code")


def muon_step_cpu(layers: int, warmup: int, repeats: int) -> list[dict]:
    """ms per Muon step on LLaMA d=512 matrices, fp32: the plain reference, matrixopt.Muon with
    torch.optim.Muon's polynomial and scaling (auto = Gram for the rectangular ones, and the
    standard method alone), torch.optim.Muon (bf16 NS)."""
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)

    def fresh():
        params = [torch.nn.Parameter(0.02 * torch.randn(shape, generator=generator))
                  for _ in range(layers) for shape in MUON_STEP_SHAPES]
        for p in params:
            p.grad = 1e-3 * torch.randn(p.shape, generator=generator)
        return params

    rows = []
    params = fresh()
    momenta = [torch.zeros_like(p) for p in params]
    with torch.no_grad():
        plain = median_ms(lambda: plain_muon_step(params, momenta), device, warmup, repeats)
    rows.append({"implementation": "plain fp32 Muon (reference)", "step ms": plain, "vs plain": 1.0})
    candidates = {"matrixopt.Muon (auto: Gram for rectangular)": {},
                  "matrixopt.Muon (standard NS)": {"ns_method": "standard"}}
    for label, extra in candidates.items():
        params = fresh()
        opt = matrixopt.Muon(params, lr=0.02, lr_scaling="original", ns_coefficients="muon", **extra)
        ms = median_ms(opt.step, device, warmup, repeats)
        rows.append({"implementation": label, "step ms": ms, "vs plain": ms / plain})
    if hasattr(torch.optim, "Muon"):
        params = fresh()
        opt = torch.optim.Muon(params, lr=0.02)
        ms = median_ms(opt.step, device, warmup, repeats)
        rows.append({"implementation": "torch.optim.Muon (bf16 NS)", "step ms": ms, "vs plain": ms / plain,
                     "note": bf16_matmul_note()})
    return rows


def cpu_run(quick: bool, repeats: int | None = None) -> dict[str, list[dict]]:
    """The CPU sections: peers, the auto crossover, the 4-step schedule, the restart failure."""
    warmup, repeats = (1, 1) if quick else (1, repeats or 5)
    threads = torch.get_num_threads()
    compare, notes = cpu_compare(QUICK_CPU_CASES if quick else CPU_CASES, warmup, repeats)
    sides = CROSSOVER_SIDES[:1] if quick else CROSSOVER_SIDES
    return {
        f"NS, {STEPS} Muon steps, fp32 input, CPU ({threads} threads): ms (median of {repeats}) and accuracy "
        "against the fp64 polar factor (power-law spectrum)": compare,
        "Peers that did not run": [{"note": note} for note in notes],
        f"crossover: Gram / standard time, {STEPS} Muon steps, CPU ({threads} threads)":
            crossover([16] if quick else sides, CROSSOVER_RATIOS[::3] if quick else CROSSOVER_RATIOS, warmup, repeats),
        "4-step schedule vs 5 steps on LLaMA shapes (standard method, power-law spectrum), against the fp64 polar factor":
            four_step_schedule(QUICK_FOUR_STEP_SHAPES if quick else FOUR_STEP_SHAPES),
        "bf16 Gram NS with and without restarts (σ from 1 to 1e-4)": restart_failure(*((16, 48) if quick else ())),
        f"Muon step, fp32, LLaMA d=512 matrices ({1 if quick else MUON_STEP_LAYERS} layers × q, o 512², k, v "
        f"128×512, gate, up 1376×512, down 512×1376), CPU ({threads} threads)":
            muon_step_cpu(1 if quick else MUON_STEP_LAYERS, warmup, repeats),
    }

def run(quick: bool = False, device=None, cpu: bool = False, repeats: int | None = None) -> dict[str, list[dict]]:
    """The sections as table rows. ``cpu``: only the CPU sections (:func:`cpu_run`, the target
    shapes); ``quick``: tiny sizes, meant for a CPU, the GPU sections and the CPU ones."""
    if cpu:
        return cpu_run(quick, repeats)
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
        **(cpu_run(quick) if quick else {}),
    }


def options(parser):
    parser.add_argument("--cpu", action="store_true",
                        help="only the CPU sections at the target shapes (peers, auto crossover, 4-step schedule)")
    parser.add_argument("--repeats", type=int, help="timed calls per case with --cpu (median reported; default 5)")


def main(argv=None):
    return module_main("ns", run, description=__doc__.splitlines()[0], extra={"steps": STEPS}, argv=argv,
                       options=options)


if __name__ == "__main__":
    main()
