"""Hyperparameter validators: each takes (name, value) and raises ``ValueError`` naming the
argument and its valid range. Optimizers list theirs in ``hyperparameters`` (name →
validator); :class:`~matrixopt.MatrixOptimizer` runs them on every param group at
construction, at ``add_param_group`` and on a loaded state dict's groups."""
import math
from typing import Any, Callable

import torch
from torch import Tensor

Validator = Callable[[str, Any], None]


def real(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
         hi_open: bool = False) -> Validator:
    """A real number in [lo, hi] (open ends as asked; an infinite end is always open)."""
    lo_open, hi_open = lo_open or lo == -math.inf, hi_open or hi == math.inf
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def check(name, value):
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"Invalid {name}: a Tensor {name} must have one element")
            value = value.item()
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        if ok:
            ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            raise ValueError(f"Invalid {name}: {value!r}; expected a number in {interval}")

    return check


def integer(lo: int = 0, hi: int | None = None) -> Validator:
    def check(name, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ValueError(f"Invalid {name}: {value!r}; expected an integer {bound}")

    return check


def choice(*options) -> Validator:
    def check(name, value):
        if not any(value is o or (type(value) is type(o) and value == o) for o in options):
            raise ValueError(f"Invalid {name}: {value!r}; expected one of {options}")

    return check


def compute_dtype(name, value):
    """None (the rule's default) or a floating dtype a rule runs its matrix products in."""
    choice(None, torch.float64, torch.float32, torch.bfloat16, torch.float16)(name, value)


def betas_in_unit_interval(name, value):
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"Invalid {name}: {value!r}; expected a pair (beta1, beta2)")
    for i, b in enumerate(value):
        real(0.0, 1.0, hi_open=True)(f"{name}[{i}]", b)


def rank_spec(name, value):
    """An int >= 1, or a fraction in (0, 1] of min(m, n)."""
    if isinstance(value, float):
        ok = 0.0 < value <= 1.0
    else:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= 1 or a fraction in (0, 1]")
