"""Helpers for the 2-process gloo tests: spawning on a free port, a small transformer, runs.

Workers are module-level functions (spawned processes import them by name).
"""
import functools
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import matrixopt

WORLD = 2
DIM, VOCAB, HIDDEN, SEQ, BATCH = 16, 11, 37, 6, 8   # HIDDEN rows do not split evenly in 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, world: int, fn, args):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        fn(rank, *args)
    finally:
        dist.destroy_process_group()
    # The work is done and checked: the worker leaves without the interpreter's teardown, where
    # objects still holding gloo's threads (a model's device mesh in a reference cycle, say) have
    # aborted a rank now and then (std::terminate, SIGABRT) after everything had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args, world: int = WORLD) -> None:
    """Run ``fn(rank, *args)`` on ``world`` gloo ranks; a failure on any rank raises here."""
    mp.spawn(_entry, args=(free_port(), world, fn, args), nprocs=world, join=True)


# -- the model ------------------------------------------------------------------------------------

class Block(nn.Module):
    """Attention + gated MLP + a 3-D expert stack; shapes chosen to hit uneven/empty shards."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.proj = nn.Linear(DIM, DIM, bias=False)
        self.up = nn.Linear(DIM, HIDDEN)                  # 37 rows: shards of 19 and 18
        self.down = nn.Linear(HIDDEN, DIM, bias=False)
        self.gate = nn.Linear(DIM, 1, bias=False)          # 1 row: rank 1's shard is empty
        self.experts = nn.Parameter(torch.randn(3, DIM, DIM) / DIM)   # 3 experts: 2 + 1

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        x = x + self.proj(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        x = x + self.down(torch.relu(self.up(x))) * torch.sigmoid(self.gate(x))
        return x + (x.unsqueeze(-3) @ self.experts).mean(-3)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny().to(dtype)


def batches(steps: int):
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g) for _ in range(steps)]


def train(net, opt, data):
    """Next-token cross-entropy steps, one per batch."""
    for tokens in data:
        opt.zero_grad()
        logits = net(tokens[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        opt.step()


class NanOnce:
    """An optimizer whose first step first puts a NaN into ``param``'s gradient (into the
    local shard of it under FSDP2) on rank ``rank`` only, or always with ``rank`` None (the
    single-process reference). The param then lags its bucket-mates by one step, so its
    refreshes fall due apart from theirs."""

    def __init__(self, opt, param, rank=None):
        self.opt, self.param, self.rank, self.done = opt, param, rank, False

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self):
        if not self.done and (self.rank is None or dist.get_rank() == self.rank):
            grad = self.param.grad
            (grad.to_local() if hasattr(grad, "to_local") else grad)[0, 0] = float("nan")
        self.done = True
        self.opt.step()


# Small, fast settings per case: case -> (optimizer, settings). GaLoreAdamW twice, its default
# randomized refresh (moments carried on refresh) and the exact SVD, so that both projection
# sides meet every kind of matrix: with "std" qkv, proj, up (uneven rows) and the experts
# project right, down and gate (one row) left; "reverse_std" swaps the sides.
CASES = {
    "Muon": ("Muon", {}), "ROOT": ("ROOT", {}), "ARO": ("ARO", {}),
    "GaLoreAdamW": ("GaLoreAdamW", {"rank": 4, "update_proj_gap": 2, "reproject_states": True}),
    "GaLoreAdamW-exact-reverse_std": ("GaLoreAdamW", {"rank": 4, "update_proj_gap": 2, "svd": "exact",
                                                      "proj_type": "reverse_std"}),
    "DCTAdamW": ("DCTAdamW", {"rank": 4, "update_proj_gap": 2}),
}


def make_optimizer(case: str, net, **kwargs):
    """The optimizer of ``case`` (see CASES) over ``net``'s param groups."""
    name, settings = CASES[case]
    return getattr(matrixopt, name)(matrixopt.param_groups(net), lr=0.02, **settings, **kwargs)


def full_params(net) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in net.named_parameters()}


def assert_params_close(got: dict, want: dict, rtol: float = 1e-5):
    assert got.keys() == want.keys()
    for n in want:
        err = (got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-30)
        assert err <= rtol, f"{n}: relative error {err:.3g} > {rtol}"


def sharded(net):
    """FSDP2: fully_shard per block, then the root, on a 1-D CPU mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for block in net.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


class CountingWork:
    """Adds up the matrix FLOPs this rank computed: wraps the ``matrix_map`` each bucket gets
    from ``opt._planner.matrix_map`` so that every work function it runs counts b·m·n·min(m, n) of its
    first input's stack (b, m, n): the matrices whose whole-matrix work this rank does. And
    ``exchanges``: per call of a ``matrix_map``, the all-to-alls and all-gathers it made."""

    EXCHANGES = ("all_to_all_single", "all_gather_single")

    def __init__(self, opt):
        self.flops, self.exchanges = 0, []
        bucket_map = opt._planner.matrix_map

        def counting_bucket_map(*args, **kwargs):
            matrix_map = bucket_map(*args, **kwargs)

            def counted(fn, inputs, outputs, entries=None):
                def wrapped(*stacks):
                    b, m, n = stacks[0].shape
                    self.flops += b * m * n * min(m, n)
                    return fn(*stacks)

                saved, calls = {name: getattr(dist, name) for name in self.EXCHANGES}, [0]
                for name, collective in saved.items():
                    setattr(dist, name, functools.partial(self._counting, collective, calls))
                try:
                    return matrix_map(wrapped, inputs, outputs, entries)
                finally:
                    for name, collective in saved.items():
                        setattr(dist, name, collective)
                    self.exchanges.append(calls[0])

            return counted

        opt._planner.matrix_map = counting_bucket_map

    @staticmethod
    def _counting(collective, calls, *args, **kwargs):
        calls[0] += 1
        return collective(*args, **kwargs)


def gathered(value: int) -> list[int]:
    """``value`` from every rank."""
    t = torch.tensor([value], dtype=torch.int64)
    out = [torch.zeros_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t)
    return [int(o) for o in out]


class NoCollectives:
    """Within this context any collective matrixopt could call raises."""

    NAMES = ("all_to_all_single", "all_to_all", "all_reduce", "broadcast", "all_gather")

    def __enter__(self):
        self.saved = {n: getattr(dist, n) for n in self.NAMES}

        def refuse(*args, **kwargs):
            raise AssertionError("a collective was called on the single-process path")

        for n in self.NAMES:
            setattr(dist, n, refuse)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(dist, n, f)
