"""matrixopt.kernels: hot paths with a PyTorch reference twin each.

Dispatch: Triton for CUDA tensors, PyTorch elsewhere; ``MATRIXOPT_KERNELS=torch|triton|auto``
or a kernel's ``backend=`` argument forces one. Newton-Schulz also has two formulations,
``method="standard"|"gram"|"auto"`` (or ``MATRIXOPT_NS_METHOD``).
"""
from ._dispatch import choose_backend
from .dct import dct_basis, dct_scores, top_indices
from .lowrank import lowrank_svd
from .newton_schulz import newton_schulz, newton_schulz_gram, newton_schulz_torch

__all__ = ["choose_backend", "dct_basis", "dct_scores", "lowrank_svd", "newton_schulz",
           "newton_schulz_gram", "newton_schulz_torch", "top_indices"]
