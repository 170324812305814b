"""matrixopt.kernels: hot paths with a PyTorch reference twin each.

Dispatch: Triton for CUDA tensors, PyTorch elsewhere; ``MATRIXOPT_KERNELS=torch|triton|auto``
or a kernel's ``backend=`` argument forces one. Newton-Schulz also has two formulations,
``method="standard"|"gram"|"auto"`` (or ``MATRIXOPT_NS_METHOD``). The DCT runs as a matmul or
an FFT (``dct(method=)``; "auto" by size, :func:`use_fft` from ``FFT_MIN_SIZE``), and a
low-rank refresh diagonalizes its Rayleigh-Ritz core (:func:`rayleigh_ritz`) on the host
for a small stack on a GPU (:func:`eigh_on_host`).
"""
from . import host
from ._dispatch import choose_backend
from .dct import FFT_MIN_SIZE, dct, dct_basis, dct_scores, top_indices, use_fft
from .lowrank import eigh_on_host, lowrank_svd, rayleigh_ritz
from .newton_schulz import newton_schulz, newton_schulz_gram, newton_schulz_torch

__all__ = ["FFT_MIN_SIZE", "choose_backend", "dct", "dct_basis", "dct_scores", "eigh_on_host", "host", "lowrank_svd",
           "newton_schulz", "newton_schulz_gram", "newton_schulz_torch", "rayleigh_ritz", "top_indices", "use_fft"]
