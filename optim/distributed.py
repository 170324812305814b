"""Matrix work across ranks: FSDP2-sharded (DTensor ``Shard(0)``) and replicated (DDP) params.

Usage (nothing else in the training loop changes)::

    for block in model.blocks:                       # FSDP2: the params become DTensors,
        fully_shard(block)                           # which the optimizers detect
    fully_shard(model)
    opt = matrixopt.Muon(matrixopt.param_groups(model), lr=3e-4)

    ddp = DistributedDataParallel(model)             # DDP: ask for the split explicitly
    opt = matrixopt.Muon(matrixopt.param_groups(model), lr=3e-4, distributed="replicated")

    # checkpoints as for any torch.optim optimizer under FSDP2
    model_sd, optim_sd = get_state_dict(model, opt)  # torch.distributed.checkpoint.state_dict
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

Every rule routes its whole-matrix work (orthogonalization, QR, projector refresh, DCT scores)
through the ``matrix_map`` its step is given (:meth:`matrixopt.plan.Planner.matrix_map`); this
module runs that work on owner ranks so that each matrix is computed exactly once and the
results equal the single-process run. Every input says what it is — :class:`Rows` (pieces
of the param's matrix view, sharded like the param) or :class:`Whole` (a per-matrix value of
another shape, identical on every rank) — and so does every output (:class:`Out`, with its
per-matrix shape and dtype), so ranks that own no matrix know what they receive.

**FSDP2** (params are DTensors placed ``(Shard(0),)`` on a 1-D mesh; shards may be uneven
or empty). Element-wise work (momentum, Adam moments, the AdamW fallback) runs on the local
shards and its state stays local. For the whole-matrix work of a bucket (same-shape params)
each matrix gets an owner rank, chosen greedily by FLOPs (m·n·min(m, n) per matrix) so the
ranks' loads stay balanced across all buckets of the step. Then, per input of the work:

1. one ``all_to_all_single`` sends every rank's row shards of each matrix to its owner,
   which concatenates them into the whole matrix (no rank holds more than the matrices it
   owns);
2. the owner runs the work on the stack of its matrices in one call;
3. one ``all_to_all_single`` per output returns the rows of each result to the ranks that
   hold those rows of the param.

A 3-D param (E, m, n) sharded on dim 0 holds whole expert matrices, so its experts are
computed where they live, without communication; so is a matrix whose rows all sit on one
rank. A 1-D param routed to the matrix rule is a (1, n) matrix sharded on its columns; it is
handled like the row case. All ranks agree on which params have non-finite gradients (one
small all-reduce per group), so they skip the same params and run the same collectives.

Per-matrix state of another shape than the param (a rotation, a projector, selected
indices) is kept whole and identical on every rank: such inputs are :class:`Whole`, read from
the owner's own copy, and such outputs ``Out(..., whole=True)``, all-gathered. In the
optimizer's ``state_dict`` the state a rule declares sharded (``State(sharded=True)``, see
:mod:`matrixopt.state`) is a DTensor with the param's placement, so
``torch.distributed.checkpoint`` saves each shard once; whole state is a plain tensor (a
replicated value to DCP).

Low-rank projections between refreshes (GaLore, DCT-AdamW): with G sharded by rows, the
right projection ``G·V_r`` (or ``G·Q[:, I]``) of each row block is that block of the result,
so the low-rank moments are row-sharded like the param; both compute that projection and
its back-projection ``L·V_rᵀ`` locally, reading a sharded expert stack's bases (or DCT
indices) through :func:`matrixopt.matrices.local_matrices`. The left projection ``U_rᵀ·G`` sums over rows: rather than add up
per-shard partial products (an all-reduce whose summation order would differ from the
single-process matmul), it is routed through ``matrix_map`` (computed on the owner of the
whole gradient, the r×n result all-gathered, the moments whole on every rank), and so is
its back-projection ``U_r·L`` (rows returned to their ranks); so are refreshes (SVD, DCT
scores) and ARO's rotation. GaLore's randomized refresh draws each matrix's sketch from a
seed of its own (see :class:`~matrixopt.GaLoreAdamW`), so owners draw what a single process
would.

**Replicated** (``distributed="replicated"``, with ``process_group=`` or the default group;
DDP keeps params identical on every rank): each rank computes a disjoint, FLOP-balanced
share of the matrices, and the results are all-gathered. Without it, and without DTensor
params, the optimizers never call a collective.

Collectives are gloo-compatible: ``all_to_all_single`` with uneven splits (gloo supports
it); an all-gather of uneven pieces is an ``all_to_all_single`` whose send buffer repeats
the rank's piece for every peer, since ``all_gather`` wants pieces of equal size.
"""
import bisect
import itertools
import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from .ops import Out, Rows, Whole

MODES = (None, "replicated")


def check_placement(p: Tensor, name: str) -> None:
    """Reject DTensor layouts other than FSDP2's (``Shard(0)`` on a 1-D mesh), naming ``p``."""
    if not isinstance(p, DTensor):
        return
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(
            f"{name} is a DTensor placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; "
            "matrixopt supports FSDP2's (Shard(dim=0),) on a 1-D mesh (tensor-parallel "
            "Shard(1), 2-D meshes and Replicate placements are not supported)")


def shard_sizes(size: int, world: int) -> list[int]:
    """Sizes of the ``Shard(0)`` pieces of a dim of ``size`` on ``world`` ranks (torch.chunk)."""
    chunk = -(-size // world)
    return [max(0, min(chunk, size - r * chunk)) for r in range(world)]


def dtensor_like(p: DTensor, local: Tensor, shape: Sequence[int] | None = None) -> DTensor:
    """``local`` (p's shard, or a shard of a tensor of global ``shape`` split on dim 0 like p)
    as a DTensor with p's mesh and placement."""
    shape = torch.Size(p.shape if shape is None else shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


def agree_finite(finite: Tensor, group) -> Tensor:
    """Per-param finiteness flags agreed by all ranks (a param is finite only if it is on all)."""
    flags = finite.to(torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    return flags.bool()


class MatrixWork:
    """The owner split of one bucket's whole-matrix work in one step, and its collectives.

    Per param: ``counts`` (matrices in its (B, m, n) view), ``axes`` (the axis of that view
    that holds the param's dim 0, the one FSDP2 splits; None for replicated params),
    ``rows`` (global and local sizes of dim 0). ``cost`` is one matrix's FLOPs; ``load``
    (FLOPs per rank so far this step, shared by all buckets) is updated in place.
    """

    def __init__(self, counts: list[int], axes: list[int | None], rows: list[tuple[int, int]],
                 cost: int, group, load: list[int]):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.sharded = axes[0] is not None
        self.counts, self.axes = counts, axes
        self.splits, self.owners = [], []     # per param
        for count, axis, (size, local_size) in zip(counts, axes, rows):
            splits = shard_sizes(size, self.world) if self.sharded else None
            if self.sharded and local_size != splits[self.rank]:
                raise ValueError(f"Shard with {local_size} rows on rank {self.rank} is not the "
                                 f"Shard(0) piece of a dim of {size}")
            holders = [r for r, k in enumerate(splits) if k] if self.sharded else []
            ends = list(itertools.accumulate(splits)) if axis == 0 else None   # of each rank's experts
            owners = []
            for j in range(count):
                if axis == 0:             # expert j is a whole matrix: computed where it lives
                    owner = bisect.bisect_right(ends, j)
                elif len(holders) == 1:   # one rank holds every row: nothing to move
                    owner = holders[0]
                else:                     # the least loaded rank so far this step
                    owner = min(range(self.world), key=load.__getitem__)
                owners.append(owner)
                load[owner] += cost
            self.splits.append(splits)
            self.owners.append(owners)
        self.units = [(i, j) for i, owners in enumerate(self.owners) for j, r in enumerate(owners)
                      if r == self.rank]
        self.units_of = [0] * self.world   # matrices each rank owns
        for owners in self.owners:
            for r in owners:
                self.units_of[r] += 1

    def _gathered(self, i: int) -> bool:
        """Whether param i's matrices are split across ranks (so they move to the owner)."""
        return self.sharded and self.axes[i] != 0

    # -- the map ---------------------------------------------------------------------------------
    def map(self, fn: Callable, inputs: Sequence[Rows | Whole], outputs: Sequence[Out]) -> tuple[list[Tensor], ...]:
        """``matrix_map`` on owner ranks; returns per-param lists like the single-process map."""
        for inp in inputs:
            if len(inp.tensors) != len(self.counts):   # else one rank fails while the others wait
                raise ValueError(f"matrix_map: an input holds {len(inp.tensors)} entries for a split of "
                                 f"{len(self.counts)}; pass entries= for a subset of the bucket")
        stacks = []
        for inp in inputs:
            whole, tensors = isinstance(inp, Whole), inp.tensors
            full = None if whole or not self.sharded else self._to_owners(tensors)
            pieces = []
            for i, j in self.units:
                if whole or not self.sharded:
                    pieces.append(tensors[i][j])
                elif self._gathered(i):
                    pieces.append(full[i][0])
                else:  # an expert this rank holds; j counts the param's experts globally
                    pieces.append(tensors[i][j - sum(self.splits[i][:self.rank])])
            stacks.append(torch.stack(pieces) if pieces else None)
        device = inputs[0].tensors[0].device
        if self.units:
            out = fn(*stacks)
            outs = out if isinstance(out, tuple) else (out,)
            for o, spec in zip(outs, outputs, strict=True):
                if o.dtype != spec.dtype or tuple(o.shape[1:]) != tuple(spec.shape):
                    raise ValueError(f"matrix_map: an output of {tuple(o.shape[1:])} {o.dtype} per matrix "
                                     f"was declared {tuple(spec.shape)} {spec.dtype}")
        else:
            outs = [torch.empty((0, *spec.shape), dtype=spec.dtype, device=device) for spec in outputs]
        return tuple(self._all_gather(o, spec.shape) if spec.whole or not self.sharded else self._to_shards(o)
                     for o, spec in zip(outs, outputs))

    # -- collectives -------------------------------------------------------------------------------
    def _piece_shape(self, i: int, rank: int, shape: Sequence[int]) -> list[int]:
        """Shape of rank ``rank``'s piece of param i's matrix view, given any piece's ``shape``."""
        shape = list(shape)
        shape[self.axes[i]] = self.splits[i][rank]
        return shape

    def _to_owners(self, tensors: list[Tensor]) -> dict[int, Tensor]:
        """Whole (1, m, n) matrices of the split params this rank owns, from every rank's shard."""
        split_params = [i for i in range(len(tensors)) if self._gathered(i)]
        if not split_params:
            return {}
        send = [[] for _ in range(self.world)]
        for i in split_params:
            send[self.owners[i][0]].append(tensors[i].reshape(-1))
        mine = [i for i in split_params if self.owners[i][0] == self.rank]
        recv_shapes = [[self._piece_shape(i, r, tensors[i].shape) for i in mine] for r in range(self.world)]
        received = self._exchange(send, [[math.prod(s) for s in shapes] for shapes in recv_shapes],
                                  tensors[0].dtype, tensors[0].device)
        return {i: torch.cat([received[r][k].view(recv_shapes[r][k]) for r in range(self.world)],
                             dim=self.axes[i])
                for k, i in enumerate(mine)}
    def _to_shards(self, out: Tensor) -> list[Tensor]:
        """Per param, this rank's shard of the owners' results (``out`` holds this rank's units)."""
        send = [[] for _ in range(self.world)]
        local = {}
        for (i, j), o in zip(self.units, out):
            if self._gathered(i):
                for r, piece in enumerate(o.unsqueeze(0).split(self.splits[i], dim=self.axes[i])):
                    send[r].append(piece.reshape(-1))
            else:
                local.setdefault(i, []).append(o)
        shapes = {i: self._piece_shape(i, self.rank, (1, *out.shape[1:])) for i in range(len(self.counts))
                  if self._gathered(i)}
        recv_sizes = [[] for _ in range(self.world)]
        for i, shape in shapes.items():
            recv_sizes[self.owners[i][0]].append(math.prod(shape))
        received = self._exchange(send, recv_sizes, out.dtype, out.device) if shapes else None
        taken = [0] * self.world
        results = []
        for i in range(len(self.counts)):
            if i in shapes:
                r = self.owners[i][0]
                results.append(received[r][taken[r]].view(shapes[i]))
                taken[r] += 1
            else:
                held = local.get(i, [])
                results.append(torch.stack(held) if held else out.new_empty((0, *out.shape[1:])))
        return results

    def _all_gather(self, out: Tensor, shape: tuple) -> list[Tensor]:
        """Every unit's result on every rank, as per-param stacks (B_i, *shape)."""
        numel = math.prod(shape)
        flat = out.reshape(-1)
        received = self._exchange([[flat]] * self.world,
                                  [[numel] * self.units_of[r] for r in range(self.world)],
                                  out.dtype, out.device)
        taken = [0] * self.world
        results = []
        for owners in self.owners:
            rows = []
            for r in owners:
                rows.append(received[r][taken[r]].view(shape))
                taken[r] += 1
            results.append(torch.stack(rows) if rows else out.new_empty((0, *shape)))
        return results

    def _exchange(self, send: list[list[Tensor]], recv_sizes: list[list[int]], dtype, device):
        """One all_to_all_single: ``send[r]`` (flat pieces) to rank r; returns ``recv[r]`` pieces."""
        flat = [t.to(dtype) for pieces in send for t in pieces]
        inp = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
        out = torch.empty(sum(map(sum, recv_sizes)), dtype=dtype, device=device)
        dist.all_to_all_single(out, inp.contiguous(), [sum(s) for s in recv_sizes],
                               [sum(t.numel() for t in pieces) for pieces in send], group=self.group)
        chunks = out.split([sum(s) for s in recv_sizes])
        return [list(chunk.split(sizes)) for chunk, sizes in zip(chunks, recv_sizes)]
