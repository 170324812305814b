"""GaLore projections: matmul precision (``proj_dtype``) by accuracy, and batched vs per-matrix.

    python -m benchmarks.projection [--quick] [--device cuda] [--out DIR]

For each same-shape bucket of the LLaMA-1B matrix set (``--quick``: the "tiny" set) at rank
min(m, n)/4: a stack of gradient-like matrices (singular values σ_i = 1/i, random singular
vectors), bases from a refresh (:func:`matrixopt.kernels.lowrank_svd`), then ``project`` and
``project_back`` of :class:`matrixopt.SVDProjector` with "std" sides (right for
m ≥ n, left otherwise). Reports the relative Frobenius error of the projected gradient
and of the back-projected step against float64, and the time of the round trip as one
batched call for the stack vs one call per matrix (the per-param loop a bucket would
otherwise make). Writes benchmarks/results/projection-<machine>-<date>.{md,json}.
"""
import torch

from matrixopt import SVDProjector
from matrixopt.kernels import lowrank_svd

from .common import cpu_note, default_device, median_ms, module_main
from .lowrank import gradient_pair
from .step import SHAPES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def buckets(set_name: str) -> list[tuple[int, int, int]]:
    """(count, m, n) per matrix shape of one LLaMA set (wq wk wv wo; w1 w3; w2 per layer)."""
    d, h, layers = SHAPES[set_name]
    return [(4 * layers, d, d), (2 * layers, h, d), (layers, d, h)]


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.double() - reference).norm() / reference.norm()).item()


def rows_for(batch: int, m: int, n: int, device, repeats: int) -> list[dict]:
    generator = torch.Generator(device).manual_seed(0)
    rank = min(m, n) // 4
    G = gradient_pair(batch, m, n, device, generator)[0]
    reference = SVDProjector("std", rank, m, n)
    U, _, Vh = lowrank_svd(G, rank, generator=generator)
    basis = U if reference.left else Vh.mT
    exact = basis.double()
    want_low = reference.project(G.double(), exact)
    want_back = reference.project_back(want_low, exact)
    step = want_low.float()
    rows = []
    for name, dtype in DTYPES.items():
        proj = SVDProjector("std", rank, m, n, dtype=dtype)

        def batched():
            proj.project_back(proj.project(G, basis), basis)

        def per_matrix():
            for i in range(batch):
                one = basis[i:i + 1]
                proj.project_back(proj.project(G[i:i + 1], one), one)

        rows.append({"shape": f"{batch}×{m}×{n}", "rank": rank, "side": "left" if proj.left else "right",
                     "proj_dtype": name,
                     "project rel. err": relative_error(proj.project(G, basis), want_low),
                     "project_back rel. err": relative_error(proj.project_back(step, basis), want_back),
                     "batched ms": median_ms(batched, device, 2, repeats),
                     "per-matrix ms": median_ms(per_matrix, device, 1, repeats)})
        rows[-1]["per-matrix/batched"] = rows[-1]["per-matrix ms"] / rows[-1]["batched ms"]
        print(rows[-1], flush=True)
    return rows


def run(quick: bool = False, device=None) -> dict[str, list[dict]]:
    """One table: per bucket of the set and per proj_dtype, errors and round-trip times."""
    device = default_device(device)
    set_name, repeats = ("tiny", 3) if quick else ("1B", 10)
    rows = [row for shape in buckets(set_name) for row in rows_for(*shape, device, repeats)]
    return {f"{set_name} set: project + project_back, errors against float64{cpu_note(device)}": rows}


def main(argv=None):
    return module_main("projection", run, description=__doc__.splitlines()[0], argv=argv)


if __name__ == "__main__":
    main()
