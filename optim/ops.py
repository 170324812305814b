"""What every rule shares: the ``matrix_map`` seam's argument types and the single-process
map, matmuls in a compute dtype, and the weight update.

A rule does every computation that needs a whole matrix through the ``matrix_map`` it is
handed (``bucket.matrix_map(fn, inputs, outputs, entries=None)``): inputs say what they
are — :class:`Rows` (per param, pieces of its (B, m, n) view: local rows under FSDP2) or
:class:`Whole` (per-matrix values identical on every rank) — and outputs what they will be
(:class:`Out`). Single process it is :func:`local_map`; distributed,
:class:`matrixopt.distributed.MatrixWork` runs ``fn`` on owner ranks.
"""
from typing import Callable, NamedTuple

import torch
from torch import Tensor


class Rows(NamedTuple):
    """A matrix-map input: one (B_i, ·, ·) piece of each param's matrix view (its local rows
    under FSDP2; the whole matrices otherwise)."""
    tensors: list[Tensor]


class Whole(NamedTuple):
    """A matrix-map input: one (B_i, ...) per-matrix value for each param, whole and identical
    on every rank (a rotation, a basis, indices, seeds)."""
    tensors: list[Tensor]


class Out(NamedTuple):
    """A matrix-map output: per matrix of ``shape`` and ``dtype``; rows of the param (returned
    to the ranks that hold them) unless ``whole`` (all-gathered to every rank)."""
    shape: tuple
    dtype: torch.dtype
    whole: bool = False


def stacked_call(fn: Callable, *lists: list[Tensor]) -> tuple[list[Tensor], ...]:
    """``fn`` on the concatenations along dim 0 of ``lists`` (each one (B_i, ...) tensor per
    param); each of its outputs (one stack or a tuple of stacks) split back per param."""
    sizes = [t.shape[0] for t in lists[0]]
    out = fn(*(torch.cat(ts) if len(ts) > 1 else ts[0] for ts in lists))
    return tuple(list(o.split(sizes)) for o in (out if isinstance(out, tuple) else (out,)))


def local_map(fn: Callable, inputs, outputs, entries=None) -> tuple[list[Tensor], ...]:
    """The single-process ``matrix_map``: ``fn`` once on the stacks of ``inputs`` (whichever
    of the bucket's ``entries`` they hold)."""
    return stacked_call(fn, *(inp.tensors for inp in inputs))


def named_map(matrix_map: Callable, fn: Callable, inputs: dict, outputs: dict, entries=None) -> dict:
    """``matrix_map`` with named inputs and outputs: ``fn(**stacks)`` gets one stack per name
    of ``inputs`` (:class:`Rows` or :class:`Whole`) and returns a dict of one stack per name
    of ``outputs`` (:class:`Out`); returns a dict of one per-param list per output name."""
    names = list(inputs)

    def call(*stacks):
        out = fn(**dict(zip(names, stacks)))
        return tuple(out[name] for name in outputs)

    results = matrix_map(call, list(inputs.values()), list(outputs.values()), entries=entries)
    return dict(zip(outputs, results))


def matmul_in(A: Tensor, B: Tensor, dtype: torch.dtype | None) -> Tensor:
    """A @ B with both operands in ``dtype`` (a rule's ``compute_dtype``; None: their
    promoted dtype)."""
    dtype = dtype or torch.promote_types(A.dtype, B.dtype)
    return A.to(dtype) @ B.to(dtype)


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """Matrix products' operand dtype when a rule is not told: bf16 on GPUs (tensor cores),
    fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def decay_weights(weights, *, lr: float, weight_decay: float):
    """Decoupled weight decay W ← W·(1 - lr·weight_decay); no pass over the weights when the
    factor is 1 (as torch.optim.AdamW)."""
    if lr * weight_decay:
        torch._foreach_mul_(weights, 1 - lr * weight_decay)


def apply_update(weights, updates, *, lr: float, weight_decay: float, scale: float):
    """W ← W·(1 - lr·weight_decay) - lr·scale·U for each W and its update U (U may have
    another dtype than W: it is converted element by element, never copied whole)."""
    decay_weights(weights, lr=lr, weight_decay=weight_decay)
    torch._foreach_add_(weights, updates, alpha=-lr * scale)


#: The update RMS of lr_scaling="match_adamw" (Muon, ROOT, ARO): at AdamW's tuned lr these
#: rules then match or beat AdamW. Not AdamW's own update RMS (0.21-0.26 in our runs, the 0.2
#: of Moonshot's rule): AdamW's tuned lr is set by its step's spectral norm, 4-6x that of an
#: orthogonalized step of the same RMS, so at that lr an RMS of 0.2 moves every direction too
#: little. Measured on `train --quick` at widths 64 and 128 and 200 and 600 steps: the worst
#: loss vs AdamW at AdamW's lr was 1.042 at 0.2, 1.000 at 0.3, 0.945 at 0.5, 0.994 at 0.8
#: (benchmarks/results/lr-study/summary-2026-12-01.md; `python -m benchmarks update_rms`).
MATCH_ADAMW_RMS = 0.5
