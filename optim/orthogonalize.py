"""Newton-Schulz coefficient schedules and the one orthogonalization entry point.

A schedule is a list of (a, b, c) triples, one per step: X ← aX + (bA + cA²)X, A = XXᵀ.
Every optimizer orthogonalizes through :func:`orthogonalize`, which hands stacks of
same-shape matrices to :func:`matrixopt.kernels.newton_schulz` (Triton on CUDA,
PyTorch elsewhere).
"""
import functools
import json
import math
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

from matrixopt.kernels import newton_schulz

#: Keller Jordan's quintic, the one torch.optim.Muon uses at every step.
MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al. 2025, arXiv 2505.16932, Algorithm 1), degree 5: the optimal
# per-step polynomials for σ in [1e-3, 1]; after these the iteration has converged to
# (1.875, -1.25, 0.375), which then repeats.
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
# Their safety margin: each polynomial but the last is evaluated at x/1.01, so rounding
# that pushes σ slightly above 1 is still mapped back into the band.
_SAFETY = 1.01


def _polar_express(steps: int) -> list[tuple[float, float, float]]:
    triples = [(a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]]
    triples.append(_POLAR_EXPRESS_RAW[-1])
    triples = triples[:steps] + [triples[-1]] * max(0, steps - len(triples))
    # The paper also normalizes by 1.01·‖X‖_F; dividing X by 1.01 before the first step is
    # the same as evaluating the first polynomial at x/1.01.
    a, b, c = triples[0]
    triples[0] = (a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5)
    return triples


NAMED_SCHEDULES = {
    "muon": lambda steps: [MUON_COEFFICIENTS] * steps,
    "polar_express": _polar_express,
}


def _is_triple(t) -> bool:
    return (isinstance(t, (tuple, list)) and len(t) == 3
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in t))


def ns_schedule(coefficients, steps: int) -> list[tuple[float, float, float]]:
    """Resolve ``coefficients`` to ``steps`` (a, b, c) triples.

    ``coefficients`` is a name ("muon", "polar_express"), a single triple (repeated every
    step) or a list of ``steps`` triples.
    """
    if isinstance(coefficients, str):
        if coefficients not in NAMED_SCHEDULES:
            raise ValueError(f"Invalid ns_coefficients: {coefficients!r}; expected one of "
                             f"{sorted(NAMED_SCHEDULES)}, a triple (a, b, c) or a list of triples")
        return NAMED_SCHEDULES[coefficients](steps)
    triples = [coefficients] if _is_triple(coefficients) else coefficients
    if isinstance(triples, (tuple, list)) and triples and all(_is_triple(t) for t in triples):
        triples = [tuple(float(v) for v in t) for t in triples]
        if len(triples) == 1:
            return triples * steps
        if len(triples) != steps:
            raise ValueError(f"Invalid ns_coefficients: {len(triples)} triples given for "
                             f"ns_steps={steps}; give one triple per step or a single triple")
        return triples
    raise ValueError(f"Invalid ns_coefficients: {coefficients!r}; expected a schedule name, "
                     "a triple (a, b, c) or a list of triples")


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (tensor cores; NS tolerates its rounding), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def orthogonalize(X: torch.Tensor, schedule, *, dtype: torch.dtype | None = None,
                  eps: float = 1e-7) -> torch.Tensor:
    """Orthogonalize a stack X of shape (B, m, n); returns the same shape in ``dtype``.

    ``schedule`` is a list of (a, b, c) triples (see :func:`ns_schedule`); the iteration
    runs in ``dtype`` (default: :func:`default_ns_dtype`). The result stays in that dtype:
    an fp32 copy of a bf16 update would only double its memory before it is added to the
    weights.
    """
    dtype = dtype or default_ns_dtype(X.device)
    return newton_schulz(X.to(dtype), schedule, eps=eps)


# -- ROOT's per-shape coefficients ----------------------------------------------------------
# NS on an m×n matrix sees the same singular values as on its transpose, so every per-shape
# table is keyed by (min(m, n), max(m, n)) and serves both orientations.

#: The per-shape 5-step triples released with ROOT (He et al. 2025, arXiv 2511.20626).
ROOT_RELEASED_COEFFICIENTS = {
    (2048, 2048): (3.4916, -4.8224, 2.1095),
    (2048, 3072): (3.4509, -4.5790, 1.9325),
    (2048, 8192): (2.9794, -3.6674, 1.6207),
    (2048, 16384): (3.1943, -3.8221, 1.5322),
}

#: "auto" takes a triple only if its composed polynomial stays below this on [0, 1] (Muon's
#: reaches 1.20, the shipped fits at most 1.27): the released 2048×2048 triple maps σ ≈ 0.56
#: to 3.3 after 5 steps, so a momentum with singular values there would get an update 3×
#: too large in those directions.
MAX_PEAK = 1.5

#: Model widths d of the LLaMA-style shapes whose fitted triples ship in data/.
LLAMA_WIDTHS = (512, 768, 1024, 2048, 4096)

_TABLE_PATH = Path(__file__).with_name("data") / "ns_coefficients.json"
_TABLE_STEPS = 5


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


def ns_peak(coefficients, steps: int = 5) -> float:
    """max of p^steps(σ) over σ in [0, 1]: the largest singular value NS can output."""
    a, b, c = coefficients
    x = np.linspace(0.0, 1.0, 100_001)
    for _ in range(steps):
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return float(np.max(x))


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


@functools.lru_cache(maxsize=None)
def _shipped_table() -> dict[tuple[int, int], tuple[float, float, float]]:
    table = json.loads(_TABLE_PATH.read_text())
    return {tuple(int(v) for v in key.split("x")): tuple(abc)
            for key, abc in table["coefficients"].items()}


_fit_once = functools.lru_cache(maxsize=None)(fit_ns_coefficients)


def root_coefficients(m: int, n: int, steps: int = 5) -> tuple[float, float, float]:
    """ROOT's triple for m×n: the released one unless it overshoots (peak > MAX_PEAK), else
    the shipped fit, else a fit now (cached)."""
    key = (min(m, n), max(m, n))
    if steps == _TABLE_STEPS:
        if key in ROOT_RELEASED_COEFFICIENTS and ns_peak(ROOT_RELEASED_COEFFICIENTS[key], steps) <= MAX_PEAK:
            return ROOT_RELEASED_COEFFICIENTS[key]
        if key in _shipped_table():
            return _shipped_table()[key]
    return _fit_once(*key, steps)


def write_coefficient_table(path: Path = _TABLE_PATH) -> dict:
    """Fit every LLaMA shape of :data:`LLAMA_WIDTHS` and write the shipped table.

    Run as ``python -m matrixopt.orthogonalize``.
    """
    shapes = sorted({s for d in LLAMA_WIDTHS for s in llama_shapes(d)})
    table = {
        "steps": _TABLE_STEPS,
        "objective": "fit_ns_coefficients: min over (a, b, c) of max |p^steps(σ) - 1| for σ "
                     "in [spectrum_floor(m, n), 1]; keys min(m, n)xmax(m, n)",
        "coefficients": {f"{k}x{K}": fit_ns_coefficients(k, K, _TABLE_STEPS) for k, K in shapes},
    }
    rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in table["coefficients"].items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{{"steps": {table["steps"]},\n "objective": {json.dumps(table["objective"])},\n'
                    f' "coefficients": {{\n{rows}\n }}}}\n')
    return table


if __name__ == "__main__":
    for key, abc in write_coefficient_table()["coefficients"].items():
        print(key, abc)
