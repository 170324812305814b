"""Projector refresh: ``lowrank_svd`` (cold and warm) vs ``torch.linalg.svd`` vs ``torch.svd_lowrank``.

Every method gets the same gradient-like matrix (singular values σ_i = 1/i, random singular
vectors) in fp32; a second table repeats some shapes with a steep spectrum, σ_i = i^-2
(σ₁/σ_p ~ 1e4 at r = 128: the case where two Cholesky-QR rounds fail and the retry with three
runs). "warm" refreshes after a step of drift: the previous matrix's exact top-r
left basis is the ``init``, and the singular vectors of the current one moved by ~0.1 (each
factor perturbed by 0.1·Gaussian/√dim, singular values rescaled by up to ±10%).
Captured energy is ‖U_rᵀG‖²_F / ‖U*_rᵀG‖²_F with U* from the exact SVD (= Σ_{i≤r} σ_i², but
computed the same way as the numerator, in fp64, so GEMM rounding cancels; worst batch entry).
Times are medians of CUDA-event timings on GPU (wall clock on CPU). The "core" section
times Rayleigh-Ritz on Y = A·Q₂ (min(m, n)×p, p = r + 8): ``torch.linalg.svd`` against ours
(:func:`matrixopt.kernels.rayleigh_ritz`). The "eigh" section times the p×p eigensolver of
that core on the device and on the host, for the stacks of the refresh cases, next to where
``lowrank_svd`` puts it on a GPU (:func:`matrixopt.kernels.eigh_on_host`).
The "launches" section counts, with ``torch.profiler`` (aten ops), the small factorizations
and host syncs one refresh makes: on a GPU these, not the GEMMs, set a refresh's latency.

    python -m benchmarks.lowrank [--quick] [--device cuda] [--out DIR]   # --quick: tiny CPU sizes (what the tests run)
"""
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.profiler import ProfilerActivity, profile

from matrixopt.kernels import eigh_on_host, lowrank_svd, rayleigh_ritz

from .common import cpu_note, default_device, median_ms, module_main

FULL_CASES = [(1, 2048, 5632, 128), (1, 2048, 5632, 512), (1, 4096, 4096, 128), (1, 4096, 4096, 512),
              (1, 4096, 11008, 128), (1, 4096, 11008, 512), (16, 2048, 2048, 512)]
QUICK_CASES = [(1, 96, 160, 8), (1, 160, 96, 32), (4, 64, 64, 16)]
STEEP_FULL_CASES = [(1, 2048, 5632, 128), (1, 4096, 11008, 512)]
STEEP_QUICK_CASES = [(1, 96, 160, 32)]
STEEP = 2.0
OVERSAMPLE = 8
# What a refresh launches, by aten op: cuSOLVER/cuBLAS factorizations, and host syncs (a
# device value read on the host: .item()/bool(), nonzero's size, linalg's info checks).
LAUNCHES = {"cholesky": ("aten::linalg_cholesky_ex",), "solve_triangular": ("aten::linalg_solve_triangular",),
            "eigh": ("aten::linalg_eigh",), "qr": ("aten::linalg_qr",), "svd": ("aten::linalg_svd",),
            "host syncs": ("aten::_local_scalar_dense", "aten::nonzero")}


def timed(fn, reps, device):
    """Median milliseconds of ``fn()`` over ``reps`` runs after one warm-up; returns (ms, last result)."""
    result = None

    def call():
        nonlocal result
        result = fn()

    ms = median_ms(call, device, 1, reps)
    return ms, result


def gradient_pair(batch, m, n, device, generator, alpha=1.0):
    """(previous, current) fp32 matrices with σ_i = i^-alpha whose singular vectors drift by ~0.1."""
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(batch, m, k, device=device, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(batch, n, k, device=device, generator=generator))
    s = torch.arange(1, k + 1, device=device, dtype=torch.float32) ** -alpha
    previous = (U * s) @ V.mT
    U = U + 0.1 * torch.randn(U.shape, device=device, generator=generator) / m ** 0.5
    V = V + 0.1 * torch.randn(V.shape, device=device, generator=generator) / n ** 0.5
    s = s * (1 + 0.1 * (2 * torch.rand(k, device=device, generator=generator) - 1))
    return previous, (U * s) @ V.mT


def captured_energy(U, G, exact_U):
    """Worst batch entry's ‖UᵀG‖²_F / ‖U*ᵀG‖²_F (U* the exact top singular vectors, same width)."""
    G = G.double()
    energy = (U.double().mT @ G).square().sum((-2, -1))
    return (energy / (exact_U[..., :U.size(-1)].double().mT @ G).square().sum((-2, -1))).min().item()


def refresh_rows(cases, device, reps, alpha=1.0):
    rows = []
    generator = torch.Generator(device).manual_seed(0)
    for batch, m, n, rank in cases:
        previous, G = gradient_pair(batch, m, n, device, generator, alpha)
        svd_ms, (exact_U, _, _) = timed(lambda: torch.linalg.svd(G, full_matrices=False), max(1, reps // 2), device)
        init = torch.linalg.svd(previous, full_matrices=False)[0 if m <= n else 2]
        init = init[..., :rank] if m <= n else init[..., :rank, :].mT
        methods = {
            "svd_lowrank": lambda: torch.svd_lowrank(G, q=rank + OVERSAMPLE, niter=2),
            "cold": lambda: lowrank_svd(G, rank, iters=2, oversample=OVERSAMPLE, generator=generator),
            "warm": lambda: lowrank_svd(G, rank, init=init, iters=1, oversample=OVERSAMPLE, generator=generator),
        }
        row = {"shape": f"{batch}×{m}×{n}", "rank": rank, "svd ms": svd_ms}
        for name, fn in methods.items():
            ms, (U, _, _) = timed(fn, reps, device)
            row[f"{name} ms"], row[f"{name} energy"] = ms, captured_energy(U[..., :rank], G, exact_U)
        row["svd/warm"] = svd_ms / row["warm ms"]
        row["svd_lowrank/warm"] = row["svd_lowrank ms"] / row["warm ms"]
        row["svd_lowrank/cold"] = row["svd_lowrank ms"] / row["cold ms"]
        rows.append(row)
        print(row, flush=True)
    return rows


def core_rows(cases, device, reps):
    """Rayleigh-Ritz on Y = A·Q₂: torch.linalg.svd vs ours (eigh of YᵀY + Cholesky-QR2 of YṼ)."""
    rows = []
    for batch, a, rank in sorted({(b, min(m, n), r) for b, m, n, r in cases}):
        p = rank + OVERSAMPLE
        Y = torch.randn(batch, a, p, device=device) / torch.arange(1, p + 1, device=device)
        row = {"batch×a×p": f"{batch}×{a}×{p}", "rank": rank,
               "torch.linalg.svd ms": timed(lambda: torch.linalg.svd(Y, full_matrices=False), reps, device)[0],
               "eigh + CholQR2 ms": timed(lambda: rayleigh_ritz(Y, rank, rounds=2), reps, device)[0]}
        row["speedup"] = row["torch.linalg.svd ms"] / row["eigh + CholQR2 ms"]
        if device.type == "cuda":  # cuSOLVER's approximate SVD for tall-skinny matrices, batched
            row["svd gesvda ms"] = timed(lambda: torch.linalg.svd(Y, full_matrices=False, driver="gesvda"),
                                         reps, device)[0]
        rows.append(row)
        print(row, flush=True)
    return rows


def cupy_syevj():
    """cuSOLVER's Jacobi eigensolver (syevj) through CuPy, for a stack of symmetric CUDA
    tensors, one matrix at a time (its batched form stops at 32×32); None without CuPy."""
    try:
        import cupy
        import cupyx.cusolver
    except ImportError:
        return None
    return lambda W: [cupyx.cusolver.syevj(cupy.from_dlpack(w)) for w in W]


def eigh_in_threads(W, on_host: bool):
    """torch.linalg.eigh of each matrix of the stack W in a thread of its own: on the host
    (``on_host``: LAPACK, the results copied back) or on W's GPU, each thread on a CUDA stream
    of its own. On the H200 a 16×520 stack took about 16 times one matrix's time, as if solved
    one after another, each latency-bound and ending in a host sync (eigh's info check);
    threads would overlap those."""
    current = torch.cuda.current_stream(W.device) if W.is_cuda and not on_host else None
    streams = [torch.cuda.Stream(W.device) for _ in W] if current is not None else [None] * len(W)

    def one(w, stream):
        if on_host:
            return [t.to(W.device) for t in torch.linalg.eigh(w.cpu())]
        if stream is None:
            return torch.linalg.eigh(w)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            return torch.linalg.eigh(w)

    with ThreadPoolExecutor(len(W)) as pool:
        results = list(pool.map(one, W, streams))
    for stream in streams:
        if stream is not None:
            current.wait_stream(stream)
    return results


def eigh_rows(cases, device, reps):
    """The p×p symmetric eigensolver Rayleigh-Ritz needs, the step that dominates a GPU refresh
    at r = 512: torch.linalg.eigh on the device (cuSOLVER's syevd), with MAGMA where torch
    has it, on the host (copies included), and cuSOLVER's Jacobi syevj where CuPy is
    installed; for a stack also one matrix per thread, on the device or on the host
    (:func:`eigh_in_threads`); to pick the fastest on a GPU. There "lowrank_svd on" says where
    a refresh runs it (:func:`matrixopt.kernels.eigh_on_host`), a rule the device and host
    columns check."""
    rows = []
    for batch, rank in sorted({(b, r) for b, _, _, r in cases}):
        p = rank + OVERSAMPLE
        Y = torch.randn(batch, 2 * p, p, device=device)
        W = Y.mT @ Y
        row = {"batch×p": f"{batch}×{p}", "eigh ms": timed(lambda: torch.linalg.eigh(W), reps, device)[0]}
        if batch > 1:
            row["eigh, thread+stream each ms"] = timed(lambda: eigh_in_threads(W, False), reps, device)[0]
            row["host eigh, thread each ms"] = timed(lambda: eigh_in_threads(W, True), reps, device)[0]
        if device.type == "cuda":
            row["lowrank_svd on"] = "host" if eigh_on_host(batch, p) else "device"
            row["host eigh ms"] = timed(lambda: [t.to(device) for t in torch.linalg.eigh(W.cpu())], reps, device)[0]
            previous = torch.backends.cuda.preferred_linalg_library()
            try:
                torch.backends.cuda.preferred_linalg_library("magma")
                row["magma eigh ms"] = timed(lambda: torch.linalg.eigh(W), reps, device)[0]
            except RuntimeError as error:  # a torch build without MAGMA
                row["magma eigh ms"] = f"n/a ({str(error).splitlines()[0][:60]})"
            finally:
                torch.backends.cuda.preferred_linalg_library(previous)
            syevj = cupy_syevj()
            if syevj is not None:
                try:
                    row["cupy syevj ms"] = timed(lambda: syevj(W), reps, device)[0]
                except Exception as error:  # CuPy built for another CUDA, no device, ...
                    row["cupy syevj ms"] = f"n/a ({type(error).__name__})"
        rows.append(row)
        print(row, flush=True)
    return rows


def launch_counts(fn):
    """How many ops of each ``LAUNCHES`` kind ``fn()`` runs (torch.profiler's aten events)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = Counter(event.name for event in prof.events())
    return {kind: sum(names[op] for op in ops) for kind, ops in LAUNCHES.items()}


def launch_rows(device):
    """Launches per refresh of one 1×256×704 matrix at r = 32 (counts do not depend on the size),
    on a gentle and on a steep spectrum."""
    rows = []
    generator = torch.Generator(device).manual_seed(0)
    for alpha in (1.0, 3.0):  # σ₁/σ_p = 40 and 6e4: the second needs the three-round retry
        previous, G = gradient_pair(1, 256, 704, device, generator, alpha)
        basis = torch.linalg.svd(previous, full_matrices=False)[0][..., :32]
        for name, init, iters in [("warm", basis, 1), ("cold", None, 2)]:
            counts = launch_counts(lambda: lowrank_svd(G, 32, init=init, iters=iters, generator=generator))
            rows.append({"refresh": name, "spectrum": f"i^-{alpha:g}", "iters": iters, **counts})
        print(rows[-1], flush=True)
    return rows


def run(quick: bool = False, device=None) -> dict[str, list[dict]]:
    """The refresh, core and launch tables; ``quick``: tiny sizes, meant for a CPU."""
    device = default_device(device)
    cases, reps = (QUICK_CASES, 3) if quick else (FULL_CASES, 5)
    steep = STEEP_QUICK_CASES if quick else STEEP_FULL_CASES
    note = cpu_note(device)
    return {f"refresh: time (ms) and captured energy{note}": refresh_rows(cases, device, reps),
            f"refresh, steep spectrum σ_i = i^-{STEEP:g}{note}": refresh_rows(steep, device, reps, STEEP),
            f"Rayleigh-Ritz core (ms){note}": core_rows(cases, device, reps),
            f"p×p eigh: device vs host vs MAGMA (ms){note}": eigh_rows(cases, device, reps),
            "launches per refresh (aten op counts)": launch_rows(device)}


def main(argv=None):
    extra = {"oversample": OVERSAMPLE, "cold_iters": 2, "warm_iters": 1, "svd_lowrank_niter": 2}
    return module_main("lowrank", run, description=__doc__.splitlines()[0], extra=extra, argv=argv)


if __name__ == "__main__":
    main()
