"""Choosing between a kernel's Triton implementation and its PyTorch twin."""
import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (checked once: a failed import is not cached by Python)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton programs run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(x: torch.Tensor, backend: str | None = None, *, auto_triton: bool = True) -> str:
    """Resolve ``backend`` (argument, else ``MATRIXOPT_KERNELS``, else "auto") to "torch" or "triton".

    "auto" takes Triton for CUDA tensors when it imports and the caller says it is the faster
    choice for this input (``auto_triton``), and the PyTorch twin otherwise.
    Forcing "triton" on a CPU tensor is allowed only under ``TRITON_INTERPRET=1``.
    """
    backend = backend or os.environ.get("MATRIXOPT_KERNELS", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend {backend!r}; expected one of {BACKENDS} "
                         "(argument `backend` or env var MATRIXOPT_KERNELS)")
    if backend == "auto":
        return "triton" if x.is_cuda and auto_triton and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not installed: "
                               "pip install 'matrixopt[triton]' (torch's CUDA wheels bring it too)")
        if not x.is_cuda and not interpreting():
            raise RuntimeError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1")
    return backend
