"""The two protocols a contributor implements besides a rule: a fallback and a projector.

Both are structural (``typing.Protocol``): any object with these members works, no base
class to inherit. Their state lives as tensors in the optimizer's state (never as Python
objects), so checkpoints load with ``torch.load(weights_only=True)``.
"""
from typing import Protocol, runtime_checkable

import torch

from .ops import Out
from .state import State


@runtime_checkable
class Fallback(Protocol):
    """The rule for params that are not matrices (biases, norms, embeddings, the head):
    ``MatrixOptimizer(..., fallback=...)``; :class:`matrixopt.AdamWFallback` is the default.

    ``hyperparameters``: name → validator of the group keys it reads beyond the shared ones.
    ``state(p, group)``: its declared state of ``p``, name → :class:`~matrixopt.State`.
    ``update(group, weights, grads, states)``: one step of the params' local shards, given
    their gradients and their state dicts (fp32 working views at a lower precision).
    ``elementwise`` (optional, default False): its update of each entry reads only that
    entry (of the weight, gradient and sharded state) and the param's counters, so that at
    a lower ``state_precision`` the shell may update a large param in chunks of rows; and
    it must never couple params, since the shell calls it per chunk of params then.
    """

    hyperparameters: dict

    def state(self, p: torch.Tensor, group: dict) -> dict[str, State]: ...

    def update(self, group: dict, weights: list, grads: list, states: list) -> None: ...


@runtime_checkable
class Projector(Protocol):
    """A low-rank subspace of m×n gradients, for :class:`matrixopt.LowRankAdamW` (GaLore's
    SVD, DCT columns, CoSO's Π(G)); one object per matrix shape and settings, working on
    stacks of same-shape matrices G (B, m, n).

    Attributes: ``m``, ``n``, ``rank``; ``left``: whether the projection sums over G's
    rows; ``keys``: its state's names, ``basis_dims``: key → per-matrix shape;
    ``low_dims``: L's per-matrix shape; ``randomized``: whether :meth:`refresh` wants
    seeds; ``refresh_gives_low``: whether :meth:`refresh` returns L too; ``dtype``: the
    projection matmuls' operand dtype (None: the bases').
    """

    m: int
    n: int
    rank: int
    left: bool
    keys: tuple[str, ...]
    basis_dims: dict[str, tuple]
    low_dims: tuple[int, int]
    randomized: bool
    refresh_gives_low: bool
    dtype: torch.dtype | None
    #: Set by the rule (after making the projector) for params whose pieces need every
    #: projection whole per matrix (:func:`~matrixopt.matrices.whole_projections`: tensor
    #: parallel column splits, DTensors in row blocks); ``whole_low`` must then be True.
    whole_projections: bool

    def whole_low(self) -> bool:
        """Whether the low-rank gradient and moments are whole per matrix (identical on every
        rank) rather than having G's rows (sharded like them under FSDP2)."""
        ...

    def low_shape(self, batch: int) -> tuple[int, int, int]:
        """Shape of the projected gradient of a (batch, m, n) stack."""
        ...

    def basis(self, batch: int, batched: bool) -> dict[str, State]:
        """Its state for a param of ``batch`` matrices (``batched``: a 3-D or blocked param,
        which keeps the leading B), whole per matrix."""
        ...

    def project(self, G: torch.Tensor, *bases: torch.Tensor) -> torch.Tensor:
        """L, the low-rank gradient of G; ``bases``: the state's stacks in ``keys`` order."""
        ...

    def project_back(self, L: torch.Tensor, *bases: torch.Tensor) -> torch.Tensor:
        """A low-rank step L mapped back to (B, m, n)."""
        ...

    def refresh_outputs(self, dtype: torch.dtype) -> list[Out]:
        """What :meth:`refresh` returns, declared for ``matrix_map``."""
        ...

    def refresh(self, G: torch.Tensor, *previous: torch.Tensor, seeds=None, warm: bool = True) -> tuple:
        """New bases from G (``keys`` order), a (B,) int8 status (REFRESHED, ZERO_GRADIENT,
        SVD_FAILED: the previous basis kept) and, where ``refresh_gives_low``, L."""
        ...

    def transition(self, old: dict, new: dict) -> dict:
        """What :meth:`carry` needs to move the moments from the ``old`` bases to ``new``."""
        ...

    def carry(self, M: torch.Tensor, V: torch.Tensor, transition: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The moments expressed in the new subspace."""
        ...
