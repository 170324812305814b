"""Passes over memory of one optimizer step, counted from the ops it dispatches.

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op of a step. For
each watched tensor (a param's gradient G, the param W, each state tensor) it counts the ops
that read it (an input that shares its storage) and those that write it (a mutable argument,
in the op's schema, that shares its storage). Ops that only make views (their outputs alias
an input without writing it) touch no memory and are not counted. This is the profile behind
the bandwidth models in the optimizers' docstrings: a fused kernel that reads and writes M, V
and a step counts once for each.
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage(t) -> int | None:
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) and t.numel() else None


class PassCounter(TorchDispatchMode):
    """Counts reads and writes of the ``watched`` tensors (name → tensor) per op."""

    def __init__(self, watched: dict[str, torch.Tensor]):
        super().__init__()
        self.names = {_storage(t): name for name, t in watched.items()}
        self.reads, self.writes = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return out   # a view: no memory touched
        written, read = set(), set()
        for argument, value in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in
                                                                    schema.arguments[len(args):]]):
            tensors, _ = tree_flatten(value)
            names = {self.names.get(_storage(t)) for t in tensors} - {None}
            read |= names
            if argument.alias_info is not None and argument.alias_info.is_write:
                written |= names
        for name in read:
            self.reads[name] += 1
        for name in written:
            self.writes[name] += 1
        return out


def count_passes(opt, params: dict[str, torch.Tensor]) -> list[dict]:
    """Reads and writes of each param, its gradient and its state tensors in one ``opt.step()``
    (state made by an earlier step); one row per tensor."""
    watched = {}
    for name, p in params.items():
        watched[f"{name}: W"] = p
        watched[f"{name}: G"] = p.grad
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                watched[f"{name}: {key}"] = value
    counter = PassCounter(watched)
    with counter:
        opt.step()
    return [{"tensor": name, "elements": t.numel(), "reads": counter.reads[name], "writes": counter.writes[name]}
            for name, t in watched.items()]


def run(optimizers=None, shape=(512, 256), rank: int = 64) -> dict:
    """Passes over memory of a plain step (no refresh) of each optimizer on one m×n matrix
    and a bias on the fallback."""
    import matrixopt

    settings = {"GaLoreAdamW": dict(rank=rank, update_proj_gap=100), "DCTAdamW": dict(rank=rank, update_proj_gap=100),
                "Muon": {}, "ARO": {}}
    sections = {}
    for name in optimizers or settings:
        g = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        b = torch.nn.Parameter(torch.zeros(shape[0]))
        opt = getattr(matrixopt, name)([("w", w), ("b", b)], lr=1e-3, weight_decay=0.1, **settings.get(name, {}))
        for _ in range(2):
            w.grad, b.grad = torch.randn(shape, generator=g), torch.randn(shape[0], generator=g)
            opt.step()
        sections[f"{name}: passes over memory of a plain step, W {shape[0]}×{shape[1]} (+ bias on the fallback)"] = \
            count_passes(opt, {"w": w, "b": b})
    return sections
