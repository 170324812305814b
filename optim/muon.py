"""Muon: momentum, orthogonalized by Newton-Schulz, for hidden-layer matrices."""
import functools
import math
from typing import Callable

import torch

from .ops import MATCH_ADAMW_RMS, Out, Rows, apply_update, default_compute_dtype, local_map
from .optimizer import MatrixOptimizer
from .state import AT_LEAST_FP32, State
from .orthogonalize import ns_schedule, orthogonalize
from .precision import MOMENT
from .validation import choice, compute_dtype, integer, real
from .weights import DEFAULT_MASTER_WEIGHTS

LR_SCALINGS = ("match_adamw", "original", "spectral", "none")


def update_scale(m: int, n: int, lr_scaling: str) -> float:
    """Factor s in W ← W - lr·s·O for an m×n orthogonalized update O.

    "match_adamw": MATCH_ADAMW_RMS·sqrt(max(m, n)) = 0.5·sqrt(max(m, n)) gives O an RMS of
    0.5, at which AdamW's tuned lr and weight decay carry over (the rule of Moonshot, arXiv
    2502.16982, with the RMS measured to carry AdamW's lr: see
    :data:`~matrixopt.ops.MATCH_ADAMW_RMS`; Moonshot's 0.2 is ``torch.optim.Muon``'s
    ``adjust_lr_fn="match_rms_adamw"``).
    "original": sqrt(max(1, m/n)) (Keller Jordan; torch.optim.Muon's default).
    "spectral": sqrt(m/n). "none": 1.
    """
    if lr_scaling == "match_adamw":
        return MATCH_ADAMW_RMS * math.sqrt(max(m, n))
    if lr_scaling == "original":
        return math.sqrt(max(1.0, m / n))
    if lr_scaling == "spectral":
        return math.sqrt(m / n)
    return 1.0


def muon(weights, grads, momenta, *, lr: float, momentum: float, nesterov: bool, weight_decay: float,
         schedule, scale: float, ns_dtype: torch.dtype, ns_method: str = "auto", transform: Callable | None = None,
         shape: tuple[int, int] | None = None, matrix_map: Callable = local_map) -> None:
    r"""One Muon step over lists of same-shape (B, m, n) weights, gradients and momenta
    (under FSDP2 their local rows, ``shape`` the whole matrices' (m, n)).

    .. math::
        B \leftarrow \mu B + (1-\mu) G, \quad X = (1-\mu) G + \mu B \ \text{(nesterov) or } B, \quad
        W \leftarrow W (1 - \eta\lambda) - \eta\, s\, \mathrm{NS}(T(X))

    with NS the Newton-Schulz ``schedule`` run in ``ns_dtype`` by ``ns_method`` and T the optional input
    ``transform`` of a stack (ROOT's outlier clipping). The NS inputs are cast to
    ``ns_dtype`` before they are stacked (and, distributed, sent to owner ranks): a bf16
    stack is half an fp32 one, and NS would round to bf16 first anyway.

    Passes over memory per step (a bandwidth model, each m×n; the shell's non-finite check
    reads G once more before): G 2 reads (the momentum, the Nesterov input); B 1 read and
    write (momentum), 1 read (Nesterov); X 1 write (in ``ns_dtype``: no copy when it is B's
    dtype); NS ``ns_steps`` × a few passes over X and its Gram matrix (compute-bound); O 1
    write, 1 read; W 1 read and write, and one more when λ > 0 (the decay). Without Nesterov,
    X is B itself. Stacked (small) matrices are copied into a stack once more.
    """
    grads = [g.to(b.dtype) for g, b in zip(grads, momenta)]   # bf16 grads into fp32 momenta
    torch._foreach_lerp_(momenta, grads, 1 - momentum)
    inputs = torch._foreach_lerp(grads, momenta, momentum) if nesterov else momenta
    inputs = [x.to(ns_dtype) for x in inputs]
    (updates,) = matrix_map(functools.partial(orthogonalize, schedule=schedule, transform=transform,
                                                      method=ns_method), [Rows(inputs)],
                            [Out(shape or tuple(inputs[0].shape[1:]), ns_dtype)])
    apply_update(weights, updates, lr=lr, weight_decay=weight_decay, scale=scale)


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
    ``torch.optim.Muon``. Same-shape matrices are orthogonalized as one batch
    (:func:`muon`). State: the momentum B, fp32 (fp64 for fp64 params; torch.optim.Muon
    keeps it in the param's dtype, where a bf16 momentum keeps each step's (1 − μ)·G to a
    few bits), sharded like the param; with ``state_precision`` "bf16" (stochastically
    rounded) or "int8" (block-wise codes), see :mod:`matrixopt.precision`.

    Params that are not matrices (see :class:`~matrixopt.MatrixOptimizer`) get the
    fallback, AdamW with ``betas`` and ``eps`` and the group's lr and weight decay.

    Args:
        params: tensors, (name, tensor) pairs or param-group dicts (every argument below
            can be overridden per group; ``matrix=True/False`` forces the routing).
        lr: learning rate (default 1e-3).
        momentum: μ in [0, 1) (default 0.95).
        nesterov: use the Nesterov input (default True).
        weight_decay: decoupled weight decay λ (default 0.1).
        ns_steps: Newton-Schulz steps (default 5).
        ns_coefficients: "polar_express" (default; Amsel et al. 2025, per-step optimal),
            "muon" ((3.4445, -4.7750, 2.0315) every step), "polar_express_4" (with
            ``ns_steps=4``: four steps at Muon's five-step accuracy, see
            :data:`~matrixopt.orthogonalize.POLAR_EXPRESS_4`), "auto" (a triple per matrix
            shape, ROOT's: see :func:`~matrixopt.orthogonalize.root_coefficients`), one
            (a, b, c) triple, or a list of ``ns_steps`` triples.
        lr_scaling: "match_adamw" (default), "original", "spectral" or "none".
        betas, eps: the AdamW fallback's (defaults (0.9, 0.95), 1e-8).
        nonfinite: "skip" (default) or "raise" on NaN/Inf gradients.
        ns_dtype: dtype NS runs in (default: bf16 on CUDA, fp32 elsewhere).
        ns_method: "auto" (default: the Gram formulation for rectangular matrices where the
            measured crossover of :func:`matrixopt.kernels.newton_schulz` says it is faster —
            on CPU from aspect 1.75 in fp32; not yet on CUDA — else the standard one),
            "standard" or "gram". Both compute the same polynomial of X.
        fallback: the rule for non-matrix params (default: AdamW, :mod:`matrixopt.fallback`).
        distributed: None (default; FSDP2's DTensor params are detected by themselves) or
            "replicated" (DDP): each rank orthogonalizes a share of the matrices and the
            results are all-gathered over ``process_group`` (default: the default group).
            See :mod:`matrixopt.distributed`.
        state_precision: "fp32" (default), "bf16" or "int8": how the momentum and the
            fallback's moments are stored (the math runs in fp32 either way); see
            :mod:`matrixopt.precision`.
        master_weights: "stochastic" (default), "nearest", "int8" or "int16": how bf16 (fp16)
            params are stored after an update, see :mod:`matrixopt.weights`.
    """

    hyperparameters = {
        "momentum": real(0.0, 1.0, hi_open=True),
        "nesterov": choice(True, False),
        "ns_steps": integer(1, 100),
        "lr_scaling": choice(*LR_SCALINGS),
        "ns_dtype": compute_dtype,
        "ns_method": choice("auto", "standard", "gram"),
    }

    def __init__(self, params, lr=1e-3, momentum=0.95, nesterov=True, weight_decay=0.1,
                 ns_steps=5, ns_coefficients="polar_express", lr_scaling="match_adamw",
                 betas=(0.9, 0.95), eps=1e-8, nonfinite="skip", ns_dtype=None, ns_method="auto", *,
                 fallback=None, distributed=None, process_group=None, state_precision="fp32",
                 master_weights=DEFAULT_MASTER_WEIGHTS, **rule_defaults):
        unknown = sorted(rule_defaults.keys() - self.hyperparameters.keys())
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments {unknown}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_coefficients=ns_coefficients,
                        lr_scaling=lr_scaling, betas=betas, eps=eps, nonfinite=nonfinite,
                        ns_dtype=ns_dtype, ns_method=ns_method, **rule_defaults)
        super().__init__(params, defaults, fallback=fallback, distributed=distributed,
                         process_group=process_group, state_precision=state_precision, master_weights=master_weights)

    def _validate_hyperparameters(self, values):
        super()._validate_hyperparameters(values)
        if "ns_coefficients" in values and "ns_steps" in values:
            ns_schedule(values["ns_coefficients"], values["ns_steps"])

    def _state(self, p, group):
        # fp32 for bf16/fp16 params: in bf16 (8 significant bits) the step's increment
        # (1 − μ)·G ≈ 0.05·G would keep ~4 bits relative to B, and vanish below 2⁻⁹·B.
        return {"momentum_buffer": State(tuple(p.shape), AT_LEAST_FP32, sharded=True, role=MOMENT)}

    def _transform(self, group) -> Callable | None:
        """The input transform T of :func:`muon` (none for Muon)."""
        return None

    def _update(self, group, bucket):
        m, n = bucket.shape
        weights = bucket.weights
        muon(weights, bucket.grads, [s["momentum_buffer"].view_as(w) for s, w in zip(bucket.states, weights)],
             lr=float(group["lr"]), momentum=group["momentum"], nesterov=group["nesterov"],
             weight_decay=group["weight_decay"],
             schedule=ns_schedule(group["ns_coefficients"], group["ns_steps"], (m, n)),
             scale=update_scale(m, n, group["lr_scaling"]),
             ns_dtype=group["ns_dtype"] or default_compute_dtype(weights[0].device), ns_method=group["ns_method"],
             transform=self._transform(group), shape=(m, n), matrix_map=bucket.matrix_map)
