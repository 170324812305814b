"""The seam between a step and tensor values on the host: what lets a step run on fake tensors.

A step reads a few tensor values on the host: the non-finite check's flags (one sync per
step), a refresh's status (which params kept their basis), the entries of a batched
factorization that failed and are redone (the low-rank SVD, ARO's QR), the sketch seeds,
CoSO's history counts and solver checks. Under torch's ``FakeTensorMode`` (tensors with
shapes, dtypes and devices but no storage, on which ``python -m benchmarks memory
--simulate`` runs a whole training step to measure its memory without allocating it) such
a read has no value and raises. Every such read goes through :func:`read`, whose caller
states the answer of the normal case for a fake tensor: every value finite, every refresh
done, no entry to redo, seeds 0, no protected history (a first task). A real tensor is read
as before, so a real step is unchanged bit for bit; a fake step takes the path of a
healthy real step, allocating what it allocates.

Two more things a fake step needs: constants made from the int8 code tables (real CPU
tensors made at import) are computed from those real tensors (:func:`read` of a real
tensor suspends the fake mode), and a cache of tensors made in a step (a DCT basis, the
codes' lookup tables) keys its entries by the active fake mode (:func:`cached`), so no
fake tensor reaches a real step and a simulation counts the tables it makes. Storages
are told apart by :func:`storage_id` (a fake tensor's ``data_ptr()`` is 0).

It lives in ``kernels/`` (the lowest layer, which imports nothing from ``optim/``) so the
kernels and the optimizers share it.
"""
import functools
from typing import Callable, TypeVar

import torch
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

T = TypeVar("T")


def read(t: torch.Tensor, value: Callable[[torch.Tensor], T], fake: T) -> T:
    """``value(t)``, a value read from ``t`` on the host (``Tensor.tolist``, ``bool``, ...),
    or ``fake``, the normal case's answer, when ``t`` is a fake tensor. A real tensor read
    under a fake mode (a table made at import) is read for real, the mode suspended."""
    if is_fake(t):
        return fake
    with unset_fake_temporarily():
        return value(t)


def fake_mode():
    """The active ``FakeTensorMode``, or None."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)


def cached(fn: Callable[..., T]) -> Callable[..., T]:
    """``functools.cache`` of ``fn`` per active fake mode: real tensors for real steps, and
    each fake mode's own fake ones. ``cache_clear()`` clears every entry."""
    @functools.cache
    def per_mode(mode, *args):
        return fn(*args)

    @functools.wraps(fn)
    def wrapper(*args):
        return per_mode(fake_mode(), *args)

    wrapper.cache_clear = per_mode.cache_clear
    return wrapper


def storage_id(t: torch.Tensor) -> int:
    """An id of ``t``'s storage, the same for every view of it and distinct between live
    storages, real or fake."""
    return t.untyped_storage()._cdata
