import os
import socket

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; it must be on before triton
# compiles (decorates) any kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Bucketing changes rounding (a stacked and a lone Newton-Schulz differ in the last bits), so
# the suite and its golden trajectories run on the default stack limits, not on limits
# measured on this machine, and write no measurement cache (matrixopt.batching).
os.environ.setdefault("MATRIXOPT_STACK_LIMITS", "default")
os.environ.setdefault("MATRIXOPT_STACK_CACHE", "off")

# For the tests of benchmarks/ (``pytestmark = pytest.mark.usefixtures(...)`` in their files).

@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to connect (a download) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the benchmarks must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def keep_threads():
    """`--threads` sets torch's global thread count; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
