"""Muon: momentum, orthogonalized by Newton-Schulz, for hidden-layer matrices."""
import math

import torch

from .base import MatrixOptimizer, apply_update, choice, compute_dtype, integer, matrix_shape, real
from .distributed import local_tensor
from .orthogonalize import default_ns_dtype, ns_schedule, orthogonalize

LR_SCALINGS = ("match_adamw", "original", "spectral", "none")


def update_scale(m: int, n: int, lr_scaling: str) -> float:
    """Factor s in W ← W - lr·s·O for an m×n orthogonalized update O.

    "match_adamw": 0.2·sqrt(max(m, n)) gives O the RMS (0.2) of a typical AdamW update, so
    AdamW's lr and weight decay carry over (Moonshot, arXiv 2502.16982).
    "original": sqrt(max(1, m/n)) (Keller Jordan; torch.optim.Muon's default).
    "spectral": sqrt(m/n). "none": 1.
    """
    if lr_scaling == "match_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if lr_scaling == "original":
        return math.sqrt(max(1.0, m / n))
    if lr_scaling == "spectral":
        return math.sqrt(m / n)
    return 1.0


class Muon(MatrixOptimizer):
    r"""Muon (Keller Jordan 2024): orthogonalized momentum for matrices, AdamW for the rest.

    For a matrix W (m×n) with gradient G, momentum μ, lr η, weight decay λ:

    .. math::
        B &\leftarrow \mu B + (1-\mu) G \\
        X &= (1-\mu) G + \mu B \ \text{(nesterov)}, \quad X = B \ \text{(otherwise)} \\
        O &= \mathrm{NS}(X) \approx U V^\top \quad (X = U S V^\top) \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, s\, O

    NS normalizes X by its Frobenius norm and runs ``ns_steps`` steps of
    X ← aX + (bA + cA²)X, A = XXᵀ, on the wide orientation. ``s`` is set by ``lr_scaling``
    (see :func:`update_scale`); the default "match_adamw" lets AdamW's lr carry over.
    With ``lr_scaling="original"`` and ``ns_coefficients="muon"`` this is
    ``torch.optim.Muon``. Same-shape matrices are orthogonalized as one batch.

    Params that are not matrices (see :class:`~matrixopt.base.MatrixOptimizer`) get AdamW
    with ``betas`` and ``eps`` and the group's lr and weight decay.

    Args:
        params: tensors, (name, tensor) pairs or param-group dicts (every argument below
            can be overridden per group; ``matrix=True/False`` forces the routing).
        lr: learning rate (default 1e-3).
        momentum: μ in [0, 1) (default 0.95).
        nesterov: use the Nesterov input (default True).
        weight_decay: decoupled weight decay λ (default 0.1).
        ns_steps: Newton-Schulz steps (default 5).
        ns_coefficients: "polar_express" (default; Amsel et al. 2025, per-step optimal),
            "muon" ((3.4445, -4.7750, 2.0315) every step), one (a, b, c) triple, or a list
            of ``ns_steps`` triples.
        lr_scaling: "match_adamw" (default), "original", "spectral" or "none".
        betas, eps: the AdamW fallback's (defaults (0.9, 0.95), 1e-8).
        nonfinite: "skip" (default) or "raise" on NaN/Inf gradients.
        ns_dtype: dtype NS runs in (default: bf16 on CUDA, fp32 elsewhere).
        distributed: None (default; FSDP2's DTensor params are detected by themselves) or
            "replicated" (DDP): each rank orthogonalizes a share of the matrices and the
            results are all-gathered over ``process_group`` (default: the default group).
            See :mod:`matrixopt.distributed`.
    """

    supports_fsdp = True
    hyperparameters = {
        "momentum": real(0.0, 1.0, hi_open=True),
        "nesterov": choice(True, False),
        "ns_steps": integer(1, 100),
        "lr_scaling": choice(*LR_SCALINGS),
        "ns_dtype": compute_dtype,
    }

    def __init__(self, params, lr=1e-3, momentum=0.95, nesterov=True, weight_decay=0.1,
                 ns_steps=5, ns_coefficients="polar_express", lr_scaling="match_adamw",
                 betas=(0.9, 0.95), eps=1e-8, nonfinite="skip", ns_dtype=None, *,
                 distributed=None, process_group=None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_coefficients=ns_coefficients,
                        lr_scaling=lr_scaling, betas=betas, eps=eps, nonfinite=nonfinite,
                        ns_dtype=ns_dtype)
        super().__init__(params, defaults, distributed=distributed, process_group=process_group)

    def _validate_group(self, group):
        super()._validate_group(group)
        ns_schedule(group["ns_coefficients"], group["ns_steps"])

    def _matrix_state_shapes(self, p, group):
        return {"momentum_buffer": tuple(p.shape)}

    def _ns_schedule(self, group, m: int, n: int):
        """The (a, b, c) triples for m×n matrices."""
        return ns_schedule(group["ns_coefficients"], group["ns_steps"])

    def _ns_input(self, group, X: torch.Tensor) -> torch.Tensor:
        """What is orthogonalized, given the stacked momentum input X (identity for Muon)."""
        return X

    def _update_matrices(self, group, params, weights, grads):
        mu = group["momentum"]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(local_tensor(p),
                                                                    memory_format=torch.contiguous_format)
        bufs = [self.state[p]["momentum_buffer"].view_as(w) for p, w in zip(params, weights)]
        torch._foreach_lerp_(bufs, grads, 1 - mu)
        inputs = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        # Stacked (and, distributed, sent to owners) already in the NS dtype: a bf16 stack
        # is half an fp32 one, and NS would round to bf16 first anyway.
        dtype = group["ns_dtype"] or default_ns_dtype(weights[0].device)
        inputs = [x.to(dtype) for x in inputs]

        _, m, n = matrix_shape(params[0])
        schedule = self._ns_schedule(group, m, n)
        updates = self._matrix_map(lambda X: orthogonalize(self._ns_input(group, X), schedule, dtype=dtype), inputs)
        apply_update(weights, updates, lr=group["lr"], weight_decay=group["weight_decay"],
                     scale=update_scale(m, n, group["lr_scaling"]))
