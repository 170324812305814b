"""The single-device cost of the distributed code path: world size 1 with the collectives in.

One GPU cannot run a multi-GPU job, so this measures what the distributed layer adds on its
own: the same step on the same LLaMA-like matrix set (``benchmarks.step``) three ways,

- ``plain``: ordinary tensors, no process group use (the single-process path);
- ``replicated``: ``distributed="replicated"`` on a 1-rank group (owner assignment, the
  all-gather of results, the agreement on non-finite gradients);
- ``fsdp2``: the params as DTensors ``Shard(0)`` on a 1-rank mesh, as ``fully_shard`` leaves
  them (local shards, the all-to-all to owners and back, the metadata for DCP);

and reports each one's median step time and its ratio to ``plain``. With one rank every
collective moves data to itself, so the ratio is the layer's overhead (bookkeeping, copies,
collective launch latency), not a multi-GPU speedup.

``--layouts``: the collectives of one step on ``--ranks`` (4) gloo processes, per layout of
the train benchmark's model, parallelized the way torchtitan does it (:data:`LAYOUTS`):
``replicated`` (DDP's params, ``distributed="replicated"``), ``fsdp`` (``fully_shard`` on a
1-D mesh), ``fsdp_tp`` (a (dp, tp) mesh: q/k/v and w1/w3 colwise, wo/w2 rowwise, the
embedding rowwise, the head colwise, then ``fully_shard`` on dp) and ``hsdp`` (``fully_shard``
on a (replicate, shard) mesh). Per optimizer and layout: the collectives one step called (all
kinds: the exchanges of the whole-matrix work, all-to-alls and all-gathers, and the
non-finite agreement's all-reduce per param group), the bytes this rank sent, the time in
collectives and the step's time (the slowest rank's; medians over steps). A layout the code
refuses is reported as such. (That each call of a bucket's whole-matrix work makes at most
one exchange each way is asserted in tests/test_meshes.py.)

    python -m benchmarks.distributed --quick     # CPU, gloo; writes benchmarks/results/distributed-*
    python -m benchmarks.distributed --quick --layouts --out benchmarks/results/meshes
"""
import json
import socket
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import matrixopt

from .common import default_device, module_main
from .model import ModelConfig, Transformer
from .step import SHAPES, llama_matrices

OPTIMIZERS = ("Muon", "ROOT", "ARO", "GaLoreAdamW", "DCTAdamW")
MODES = ("plain", "replicated", "fsdp2")


def _params(mode: str, d: int, h: int, layers: int, device, mesh):
    params = llama_matrices(d, h, layers, device)
    if mode != "fsdp2":
        return params
    sharded = []
    for name, p in params:
        q = torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))
        q.grad = distribute_tensor(p.grad, mesh, [Shard(0)])
        sharded.append((name, q))
    return sharded


def _median_ms(opts: dict, device, warmup: int, repeats: int) -> dict[str, float]:
    """Median step milliseconds of each optimizer; their steps alternate, so drift in the
    machine's load (a shared CPU) affects all of them alike."""
    times = {mode: [] for mode in opts}
    for i in range(warmup + repeats):
        for mode, opt in opts.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[mode].append(1e3 * (time.perf_counter() - t0))
    return {mode: statistics.median(t) for mode, t in times.items()}


def run(quick: bool = False, sets=None, optimizers=OPTIMIZERS, device=None):
    """Step times per optimizer and mode on a 1-rank process group; returns table sections."""
    device = default_device(device)
    sets = sets or (["ci", "tiny"] if quick else ["60M", "350M"])
    warmup, repeats = (2, 5) if quick else (3, 10)
    started = not dist.is_initialized()
    if started:  # an in-process store: one rank needs no port
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    try:
        mesh = init_device_mesh(device.type, (1,))
        sections = {}
        for set_name in sets:
            d, h, layers = SHAPES[set_name]
            rows = []
            for name in (n for n in optimizers if n in matrixopt.__all__):
                opts = {mode: getattr(matrixopt, name)(_params(mode, d, h, layers, device, mesh), lr=1e-3,
                                                       distributed="replicated" if mode == "replicated" else None)
                        for mode in MODES}
                row = {"optimizer": name}
                row.update({f"{mode}_ms": ms for mode, ms in _median_ms(opts, device, warmup, repeats).items()})
                del opts
                for mode in MODES[1:]:
                    row[f"{mode}_vs_plain"] = row[f"{mode}_ms"] / row["plain_ms"]
                rows.append(row)
            sections[f"{set_name} (d={d}, h={h}, {layers} layers), {device.type}, world size 1"] = rows
        return sections
    finally:
        if started:
            dist.destroy_process_group()


# -- layouts on several ranks ------------------------------------------------------------------------

def _fsdp_blocks(net, mesh):
    for layer in net.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def fsdp_tp(net, world: int):
    """torchtitan's FSDP2 × TP layout (without sequence parallel) on a (dp, tp=2) mesh."""
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(net, mesh["tp"], {"tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
                                         "output": ColwiseParallel(output_layouts=Replicate())})
    colwise = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
    for layer in net.layers:
        parallelize_module(layer, mesh["tp"], {**{name: ColwiseParallel() for name in colwise},
                                               "attention.wo": RowwiseParallel(), "feed_forward.w2": RowwiseParallel()})
    return _fsdp_blocks(net, mesh["dp"])


LAYOUTS = {
    "replicated": lambda net, world: nn.parallel.DistributedDataParallel(net).module,
    "fsdp": lambda net, world: _fsdp_blocks(net, init_device_mesh("cpu", (world,))),
    "fsdp_tp": fsdp_tp,
    "hsdp": lambda net, world: _fsdp_blocks(net, init_device_mesh("cpu", (2, world // 2),
                                                                  mesh_dim_names=("replicate", "shard"))),
}
COLLECTIVES = ("all_to_all_single", "all_gather_single", "all_reduce", "all_gather", "all_gather_into_tensor",
               "broadcast", "reduce_scatter_tensor")


class Counted:
    """Within it, every collective of ``torch.distributed`` is counted, with its bytes and time."""

    def __init__(self):
        self.calls, self.bytes, self.seconds = Counter(), 0, 0.0

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in COLLECTIVES}
        for name, fn in self.saved.items():
            setattr(dist, name, self._counting(name, fn))
        return self

    def _counting(self, name, fn):
        def counting(*args, **kwargs):
            self.calls[name] += 1
            sent = args[1] if name in ("all_to_all_single", "all_gather_single") else args[0]   # the input buffer
            self.bytes += sent.numel() * sent.element_size() if torch.is_tensor(sent) else 0
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return counting

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _layout_row(name: str, layout: str, cfg: ModelConfig, world: int, steps: int, in_flight: int = 1) -> dict:
    """One optimizer on one layout, ``in_flight`` buckets at once: medians over ``steps``
    steps (after one warm-up step)."""
    torch.manual_seed(0)
    net = LAYOUTS[layout](Transformer(cfg), world)
    try:
        opt = getattr(matrixopt, name)(matrixopt.param_groups(net), lr=1e-3,
                                       distributed="replicated" if layout == "replicated" else None)
    except ValueError as e:
        return {"optimizer": name, "layout": layout, "refused": str(e)[:120]}
    opt.buckets_in_flight = in_flight
    g = torch.Generator().manual_seed(0)
    per_step = []
    for _ in range(steps + 1):
        tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len + 1), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        dist.barrier()
        t0 = time.perf_counter()
        with Counted() as counted:
            opt.step()
        slowest = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        per_step.append((counted, float(slowest)))
    per_step = per_step[1:]
    first = per_step[0][0]
    return {"optimizer": name, "layout": layout, "in_flight": in_flight, "collectives": sum(first.calls.values()),
            "all_to_all": first.calls["all_to_all_single"], "all_gather": first.calls["all_gather_single"],
            "all_reduce": first.calls["all_reduce"],
            "sent_kB": first.bytes / 1e3, "collective_ms": 1e3 * statistics.median(c.seconds for c, _ in per_step),
            "step_ms": 1e3 * statistics.median(t for _, t in per_step)}


def _layouts_worker(rank: int, port: int, world: int, cfg: ModelConfig, optimizers, steps: int, out: str,
                    in_flight: tuple[int, ...]):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        rows = [_layout_row(name, layout, cfg, world, steps, lanes)
                for layout in LAYOUTS for name in optimizers for lanes in in_flight]
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def run_layouts(quick: bool, ranks: int = 4, optimizers=OPTIMIZERS + ("CoSOAdamW",), in_flight=(1,)) -> dict:
    """The collectives of a step per layout and optimizer, on ``ranks`` gloo processes, with
    each ``buckets_in_flight`` of ``in_flight`` (side by side in one run)."""
    cfg = ModelConfig(256, 64, 2, 4, seq_len=32) if quick else ModelConfig(256, 256, 4, 8, seq_len=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/rows.json"
        mp.spawn(_layouts_worker, args=(port, ranks, cfg, [n for n in optimizers if n in matrixopt.__all__],
                                        3 if quick else 5, out, tuple(in_flight)), nprocs=ranks, join=True)
        rows = json.loads(Path(out).read_text())
    return {f"{layout}, {ranks} gloo ranks, d={cfg.dim}, {cfg.n_layers} layers": [r for r in rows if r["layout"] == layout]
            for layout in LAYOUTS}


def main(argv=None):
    def options(parser):
        parser.add_argument("--layouts", action="store_true",
                            help="count and time the collectives of a step per layout on --ranks gloo processes")
        parser.add_argument("--ranks", type=int, default=4)
        parser.add_argument("--in-flight", type=int, nargs="+", default=[1],
                            help="with --layouts: buckets_in_flight values to time side by side")

    def run_either(quick, device=None, layouts=False, ranks=4, in_flight=(1,)):
        return run_layouts(quick, ranks, in_flight=in_flight) if layouts else run(quick, device=device)

    return module_main("distributed", run_either, description=__doc__.splitlines()[0], argv=argv, options=options)


if __name__ == "__main__":
    main()
