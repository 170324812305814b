"""Newton-Schulz coefficient schedules and the orthogonalization entry point.

A schedule is a list of (a, b, c) triples, one per step: X ← aX + (bA + cA²)X, A = XXᵀ.
Every optimizer orthogonalizes through :func:`orthogonalize`, which hands stacks of
same-shape matrices to :func:`matrixopt.kernels.newton_schulz` (Triton on CUDA, PyTorch
elsewhere). Per-shape triples come from ROOT's release, then the table shipped in
``data/ns_coefficients.json``, then (for other shapes) the offline fitter
:mod:`matrixopt.ns_fit`, which alone needs numpy and scipy and is imported only then.
"""
import functools
import math
import warnings

import torch

from matrixopt import kernels

from .ns_table import MUON_COEFFICIENTS, TABLE_STEPS, shipped_table
from .report import caller_stacklevel

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


#: Four steps at the accuracy of Muon's five: Polar Express's per-step minimax construction
#: started from σ ≥ 3e-3 instead of 1e-3. It maps σ ∈ [3e-3, 1] into [0.80, 1.20] (Muon's five
#: steps: σ ≥ 1.5e-3 into [0.68, 1.20]; Polar Express's first four triples leave
#: [0.44, 1.56]); on power-law (σ_i ∝ i^-1/2) matrices of LLaMA shapes its distance to the
#: fp64 polar factor is 0.13-0.15 against Muon's 0.17-0.21, in fp32 and bf16
#: (benchmarks/results/ns-cpu2-2026-12-01.md, `python -m benchmarks ns --cpu`).
POLAR_EXPRESS_4 = (
    (8.383517263324883, -24.765534860474745, 18.35686771398597),
    (4.043404919685871, -3.011404650123234, 0.5695131392317121),
    (3.505653527529682, -2.626726637765991, 0.5257318534592743),
    (2.4902042958947694, -1.8343507849863556, 0.4368431804972702),
)


def _polar_express_4(steps: int) -> list[tuple[float, float, float]]:
    if steps != len(POLAR_EXPRESS_4):
        raise ValueError(f"Invalid ns_coefficients: 'polar_express_4' is a 4-step schedule; got ns_steps={steps}")
    return list(POLAR_EXPRESS_4)


NAMED_SCHEDULES = {
    "muon": lambda steps: [MUON_COEFFICIENTS] * steps,
    "polar_express": _polar_express,
    "polar_express_4": _polar_express_4,
}


def _is_triple(t) -> bool:
    return (isinstance(t, (tuple, list)) and len(t) == 3
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in t))


def ns_schedule(coefficients, steps: int, shape: tuple[int, int] | None = None) -> list[tuple[float, float, float]]:
    """Resolve ``coefficients`` to ``steps`` (a, b, c) triples for m×n matrices (``shape``).

    ``coefficients`` is a name ("muon", "polar_express", or "auto": the per-shape triple of
    :func:`root_coefficients`, repeated), a single triple (repeated every step) or a list of
    ``steps`` triples. ``shape`` may be left out to validate a schedule.
    """
    if isinstance(coefficients, str):
        if coefficients == "auto":
            return [root_coefficients(*shape, steps)] * steps if shape else []
        if coefficients not in NAMED_SCHEDULES:
            raise ValueError(f"Invalid ns_coefficients: {coefficients!r}; expected one of "
                             f"{sorted([*NAMED_SCHEDULES, 'auto'])}, a triple (a, b, c) or a list of triples")
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


def orthogonalize(X: torch.Tensor, schedule, *, transform=None, method: str = "auto",
                  eps: float = 1e-7) -> torch.Tensor:
    """Orthogonalize a stack X of shape (B, m, n), or ``transform(X)`` if one is given (ROOT's
    outlier clipping), in X's dtype: ``schedule`` is a list of (a, b, c) triples (see
    :func:`ns_schedule`); ``method`` as :func:`matrixopt.kernels.newton_schulz`'s ("auto":
    the Gram formulation for rectangular matrices where it measured faster, the same
    polynomial of X). The result stays in X's dtype: an fp32 copy of a bf16 update would only
    double its memory before it is added to the weights."""
    return kernels.newton_schulz(transform(X) if transform else X, schedule, eps=eps, method=method)


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

def ns_peak(coefficients, steps: int = 5) -> float:
    """max of p^steps(σ) over σ in [0, 1] (100,001 points, float64): the largest singular
    value NS can output."""
    a, b, c = coefficients
    x = torch.linspace(0.0, 1.0, 100_001, dtype=torch.float64)
    for _ in range(steps):
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return x.max().item()


def root_coefficients(m: int, n: int, steps: int = 5) -> tuple[float, float, float]:
    """ROOT's triple for m×n (or n×m: NS sees the same singular values), looked up once per
    shape: the released one unless it overshoots (peak > MAX_PEAK), else the shipped fit,
    else one fitted now — which needs numpy and scipy (``pip install 'matrixopt[fit]'``);
    without them Muon's triple stands in, with one warning per shape."""
    return _root_coefficients(min(m, n), max(m, n), steps)


@functools.cache
def _root_coefficients(k: int, K: int, steps: int) -> tuple[float, float, float]:
    key = (k, K)
    if steps == TABLE_STEPS:
        if key in ROOT_RELEASED_COEFFICIENTS and ns_peak(ROOT_RELEASED_COEFFICIENTS[key], steps) <= MAX_PEAK:
            return ROOT_RELEASED_COEFFICIENTS[key]
        if key in shipped_table():
            return shipped_table()[key]
    try:
        from .ns_fit import fit_ns_coefficients   # numpy and scipy: only a fit needs them
    except ImportError as e:
        warnings.warn(f"No fitted Newton-Schulz triple for {k}×{K} at {steps} steps and none can be fitted "
                      f"({e}; pip install 'matrixopt[fit]'): using Muon's {MUON_COEFFICIENTS}", RuntimeWarning,
                      stacklevel=caller_stacklevel())
        return MUON_COEFFICIENTS
    return fit_ns_coefficients(k, K, steps)
