"""The offline fitter of per-shape Newton-Schulz triples (ROOT's shape-aware coefficients).

``python -m matrixopt.ns_fit`` regenerates the table shipped in ``data/ns_coefficients.json``,
which :func:`matrixopt.orthogonalize.root_coefficients` reads at run time; shapes outside it
are fitted on first use. This module alone needs numpy and scipy.
"""
import json
from pathlib import Path

import numpy as np
import scipy.optimize

from .ns_table import MUON_COEFFICIENTS, TABLE_PATH, TABLE_STEPS

#: Model widths d of the LLaMA-style shapes whose fitted triples ship in data/.
LLAMA_WIDTHS = (512, 768, 1024, 2048, 4096)


def llama_shapes(d: int) -> list[tuple[int, int]]:
    """The distinct matrix shapes (min, max) of a LLaMA block of width d.

    q/o projections d×d; SwiGLU gate/up/down d×ff with ff = 8d/3 rounded up to a multiple
    of 256 (LLaMA's ``multiple_of``); k/v projections under GQA with n_kv_heads =
    n_heads/4, i.e. d/4 × d for any head_dim (64 or 128).
    """
    ff = 256 * -(-int(8 * d / 3) // 256)
    return [(d, d), (d, ff), (d // 4, d)]


def spectrum_floor(m: int, n: int, *, tail: float = 0.05, seed: int = 0) -> float:
    """Lower end of the singular values NS must lift to 1 for m×n momentum-like matrices.

    The ``tail`` quantile of two Frobenius-normalized spectra of an m×n matrix: a Gaussian
    matrix (Marchenko-Pastur, sampled at k' = min(k, 256) rows with the same aspect ratio
    and rescaled to k = min(m, n) singular values) and a power law σ_i ∝ i^(-1/2),
    i = 1..k. The smallest ``tail`` of each spectrum carries little of its energy and no
    fixed 5-step quintic can lift it anyway, so it is left out.
    """
    k, K = min(m, n), max(m, n)
    rng = np.random.default_rng(seed)
    k_small = min(k, 256)
    s = np.linalg.svd(rng.standard_normal((k_small, max(k_small, round(k_small * K / k)))),
                      compute_uv=False)
    gaussian = s / np.sqrt(k * np.mean(s**2))
    power = np.arange(1, k + 1) ** -0.5
    power /= np.linalg.norm(power)
    return float(min(np.quantile(gaussian, tail), np.quantile(power, tail)))


def ns_deviation(coefficients, sigma: np.ndarray, steps: int = 5) -> float:
    """max |p^steps(σ) - 1| over the given singular values, p(x) = ax + bx³ + cx⁵."""
    a, b, c = coefficients
    x = np.asarray(sigma, dtype=np.float64)
    for _ in range(steps):
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return float(np.max(np.abs(x - 1)))


def fit_ns_coefficients(m: int, n: int, steps: int = 5) -> tuple[float, float, float]:
    """The (a, b, c) that, repeated ``steps`` times, best orthogonalizes m×n momenta.

    Minimizes the worst deviation max |p^steps(σ) - 1| over σ in [σ_lo, 1], σ_lo =
    :func:`spectrum_floor` (m, n): every normalized singular value of a momentum-like
    matrix of this shape, bar its smallest 5%, ends within that deviation of 1, and so does
    any other σ up to 1 (a rank-one spike), so no input blows up. The iteration is run on
    scalars (2000 log-spaced σ), not matrices; Nelder-Mead from three fixed starts makes it
    deterministic and takes ~0.1 s. Wider spectra (square, large) need more gain per step
    and get triples near Muon's; rectangular ones get smaller gains and a tighter band.
    """
    if not (isinstance(m, int) and isinstance(n, int) and m >= 1 and n >= 1):
        raise ValueError(f"Invalid shape ({m!r}, {n!r}); expected positive integers")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"Invalid steps: {steps!r}; expected an integer >= 1")
    sigma = np.geomspace(spectrum_floor(m, n), 1.0, 2000)
    starts = (MUON_COEFFICIENTS, (3.0, -3.5, 1.5), (4.0, -6.0, 3.0))
    fits = [scipy.optimize.minimize(ns_deviation, x0, args=(sigma, steps), method="Nelder-Mead",
                                    options=dict(xatol=1e-7, fatol=1e-9, maxiter=4000))
            for x0 in starts]
    best = min(fits, key=lambda r: r.fun)
    return tuple(round(float(v), 6) for v in best.x)


def write_coefficient_table(path: Path = TABLE_PATH) -> dict:
    """Fit every LLaMA shape of :data:`LLAMA_WIDTHS` and write the shipped table.

    Run as ``python -m matrixopt.ns_fit``.
    """
    shapes = sorted({s for d in LLAMA_WIDTHS for s in llama_shapes(d)})
    table = {
        "steps": TABLE_STEPS,
        "objective": "fit_ns_coefficients: min over (a, b, c) of max |p^steps(σ) - 1| for σ "
                     "in [spectrum_floor(m, n), 1]; keys min(m, n)xmax(m, n)",
        "coefficients": {f"{k}x{K}": fit_ns_coefficients(k, K, TABLE_STEPS) for k, K in shapes},
    }
    rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in table["coefficients"].items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{{"steps": {table["steps"]},\n "objective": {json.dumps(table["objective"])},\n'
                    f' "coefficients": {{\n{rows}\n }}}}\n')
    return table


if __name__ == "__main__":
    for key, abc in write_coefficient_table()["coefficients"].items():
        print(key, abc)
