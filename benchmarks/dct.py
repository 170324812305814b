"""DCT scores by matmul vs by FFT: where the FFT gets faster (sets kernels/dct.py's FFT_MIN_SIZE).

    python -m benchmarks.dct [--quick] [--device cuda] [--rows N] [--out DIR]

Times the orthonormal DCT of ``rows``×k fp32 matrices both ways (after a warm-up that builds
the basis and the FFT plan), for smooth and prime k, and the whole DCT-AdamW refresh
(scores + top-r at r = k/4) through the path ``method="auto"`` picks. Writes
benchmarks/results/dct-<machine>-<date>.{md,json}.
"""
import functools

import torch
from torch.utils.benchmark import Timer

from matrixopt.kernels import FFT_MIN_SIZE, dct, dct_scores, top_indices, use_fft

from .common import default_device, module_main

QUICK_SIZES = (64, 128, 192, 256, 257, 384, 509, 512, 768, 1024, 2048, 4096)
FULL_SIZES = QUICK_SIZES + (5632, 8192, 11008)


def seconds(fn, x, min_run_time: float) -> float:
    fn(x)  # warm-up: basis, FFT plan
    return Timer("f(x)", globals={"f": fn, "x": x}).blocked_autorange(min_run_time=min_run_time).median


def refresh(x):
    scores = dct_scores(x)[1]
    return top_indices(scores, max(1, x.shape[-1] // 4))


def run(quick: bool = False, device=None, rows: int = 1024) -> dict[str, list[dict]]:
    """One table: per k, matmul and FFT times, their ratio, and the auto refresh's time."""
    device = default_device(device)
    min_run_time = 0.2 if quick else 1.0
    table = []
    for k in QUICK_SIZES if quick else FULL_SIZES:
        x = torch.randn(rows, k, device=device)
        t_mm, t_fft = (seconds(functools.partial(dct, method=method), x, min_run_time) for method in ("matmul", "fft"))
        table.append({"k": k, "matmul ms": t_mm * 1e3, "fft ms": t_fft * 1e3, "matmul/fft": t_mm / t_fft,
                      "auto picks": "fft" if use_fft(k, device) else "matmul",
                      "refresh ms (auto, r=k/4)": seconds(refresh, x, min_run_time) * 1e3})
        print(table[-1], flush=True)
    return {f"DCT of {rows}×k fp32 on {device.type} (FFT_MIN_SIZE={FFT_MIN_SIZE})": table}


def main(argv=None):
    def options(parser):
        parser.add_argument("--rows", type=int, default=1024, help="rows of every matrix (default %(default)s)")

    return module_main("dct", run, description=__doc__.splitlines()[0], options=options, argv=argv)


if __name__ == "__main__":
    main()
