"""Newton-Schulz coefficient schedules and the one orthogonalization entry point.

A schedule is a list of (a, b, c) triples, one per step: X ← aX + (bA + cA²)X, A = XXᵀ.
Every optimizer orthogonalizes through :func:`orthogonalize`, which hands stacks of
same-shape matrices to :func:`matrixopt.kernels.newton_schulz` (Triton on CUDA,
PyTorch elsewhere).
"""
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
    return isinstance(t, (tuple, list)) and len(t) == 3 and all(isinstance(v, (int, float)) for v in t)


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
    if _is_triple(coefficients):
        return [tuple(float(v) for v in coefficients)] * steps
    if isinstance(coefficients, (tuple, list)) and coefficients and all(_is_triple(t) for t in coefficients):
        if len(coefficients) == 1:
            return [tuple(float(v) for v in coefficients[0])] * steps
        if len(coefficients) != steps:
            raise ValueError(f"Invalid ns_coefficients: {len(coefficients)} triples given for "
                             f"ns_steps={steps}; give one triple per step or a single triple")
        return [tuple(float(v) for v in t) for t in coefficients]
    raise ValueError(f"Invalid ns_coefficients: {coefficients!r}; expected a schedule name, "
                     "a triple (a, b, c) or a list of triples")


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (tensor cores; NS tolerates its rounding), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def orthogonalize(X: torch.Tensor, schedule, *, dtype: torch.dtype | None = None,
                  eps: float = 1e-7) -> torch.Tensor:
    """Orthogonalize a stack X of shape (B, m, n); returns fp32 of the same shape.

    ``schedule`` is a list of (a, b, c) triples (see :func:`ns_schedule`); the iteration
    runs in ``dtype`` (default: :func:`default_ns_dtype`).
    """
    dtype = dtype or default_ns_dtype(X.device)
    return newton_schulz(X.to(dtype), schedule, eps=eps, out_dtype=torch.float32)
