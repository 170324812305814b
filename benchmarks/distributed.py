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

    python -m benchmarks.distributed --quick     # CPU, gloo; writes benchmarks/results/distributed-*
"""
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import matrixopt

from .common import default_device, module_main
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


def main(argv=None):
    return module_main("distributed", run, description=__doc__.splitlines()[0], argv=argv)


if __name__ == "__main__":
    main()
