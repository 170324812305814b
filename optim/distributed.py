"""Matrix work across ranks: DTensor params on 1-D or 2-D meshes (FSDP2, HSDP, tensor
parallel, both) and replicated (DDP) params.

Usage (nothing else in the training loop changes)::

    for block in model.blocks:                       # FSDP2: the params become DTensors,
        fully_shard(block)                           # which the optimizers detect
    fully_shard(model)
    opt = matrixopt.Muon(matrixopt.param_groups(model), lr=3e-4)

    # the same with torchtitan's layouts: parallelize_module(..., ColwiseParallel /
    # RowwiseParallel) on a "tp" mesh, then fully_shard on "dp"; or fully_shard on a
    # (replicate, shard) mesh (HSDP)

    ddp = DistributedDataParallel(model)             # DDP: ask for the split explicitly
    opt = matrixopt.Muon(matrixopt.param_groups(model), lr=3e-4, distributed="replicated")

    # checkpoints as for any torch.optim optimizer under FSDP2
    model_sd, optim_sd = get_state_dict(model, opt)  # torch.distributed.checkpoint.state_dict
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

Every rule routes its whole-matrix work (orthogonalization, QR, projector refresh, DCT scores)
through the ``matrix_map`` its step is given (:meth:`matrixopt.plan.Planner.matrix_map`); this
module runs that work on owner ranks so that each matrix is computed exactly once and the
results equal the single-process run. Every input says what it is — :class:`Rows` (pieces
of the param's matrix view, placed like the param) or :class:`Whole` (a per-matrix value of
another shape, identical on every rank) — and so does every output (:class:`Out`, with its
per-matrix shape and dtype), so ranks that own no matrix know what they receive.

**Layouts.** A DTensor param may be placed ``Shard(d)``, ``Replicate()`` or FSDP2's strided
shard on each dim of its mesh, as long as each rank's piece is a block of it (a
:class:`Box`: offsets and sizes per dim; :func:`p_boxes` gives every rank's, from DTensor's
own layout arithmetic, and :func:`check_placement` refuses the rest by name). FSDP2 gives
``(Shard(0),)``; HSDP ``(Replicate(), Shard(0))``; a colwise TP weight under FSDP2
``(_StridedShard(0), Shard(0))``, a rowwise one ``(Shard(0), Shard(1))``. Pieces may be uneven
or empty. Element-wise work (momentum, Adam moments, the AdamW fallback) runs on the local
pieces and its state stays local. For the whole-matrix work of a bucket (same-shape params
of one mesh and placement) each matrix gets an owner rank: one that holds it whole where
there is one (an expert of a stack sharded on dim 0, a param on one rank, any replica: the
least loaded of them), else the least loaded rank; loads are FLOPs (m·n·min(m, n) per
matrix) summed across all buckets of the step. Then, per call of the work:

1. one ``all_to_all_single`` sends each distinct piece of each matrix (one holder per piece:
   the owner where it holds it, so replicas send nothing twice) to its owner, for every
   :class:`Rows` input at once (packed as bytes, whatever their dtypes);
2. the owner runs the work on the stack of its matrices in one call;
3. one collective returns every output: a Rows result's piece to each rank holding that
   piece of the param (replicas included; an output of the param's rows but other columns,
   a right projection's, gets the piece's rows), a Whole one to every rank (an all-gather
   where every rank gets everything, else an ``all_to_all_single``).

Where nothing moves (every owner holds its matrices whole and is their only holder) the
exchange is skipped. All ranks agree on which params have non-finite gradients (one small
all-reduce per group), so they skip the same params and run the same collectives.

Per-matrix state of another shape than the param (a rotation, a projector, selected
indices) is kept whole and identical on every rank: such inputs are :class:`Whole`, read from
the owner's own copy, and such outputs ``Out(..., whole=True)``. In the optimizer's
``state_dict`` the state a rule declares sharded (``State(sharded=True)``, see
:mod:`matrixopt.state`) is a DTensor with the param's placement, so
``torch.distributed.checkpoint`` saves each piece once and loads it on another layout (a
2×2 FSDP+TP checkpoint resumes on a 4-rank FSDP2 mesh); whole state is a plain tensor (a
replicated value to DCP).

Low-rank projections between refreshes (GaLore, DCT-AdamW): with G split by rows only, the
right projection ``G·V_r`` (or ``G·Q[:, I]``) of each row block is that block of the result,
so the low-rank moments are row-sharded like the param; both compute that projection and
its back-projection ``L·V_rᵀ`` locally, reading a sharded expert stack's bases (or DCT
indices) through :func:`matrixopt.matrices.local_matrices`. The left projection ``U_rᵀ·G``
sums over rows, and a right one over columns that TP splits (``Projector.whole_projections``,
also set for a DTensor in row blocks whose pieces are not whole blocks dealt like its placement):
rather than add up per-piece partial products (an all-reduce whose summation order would
differ from the single-process matmul), such projections go through ``matrix_map``
(computed on the owner of the whole gradient, the result whole on every rank, and so the
moments), and so do their back-projections (pieces returned to their ranks); so do
refreshes (SVD, DCT scores) and ARO's rotation. GaLore's randomized refresh draws each
matrix's sketch from a seed of its own (see :class:`~matrixopt.GaLoreAdamW`), so owners
draw what a single process would. Stochastic rounding (of bf16 state, of weights) and int8
master bits draw by each entry's global index (:func:`matrixopt.matrices.entry_span`: rows,
or some columns of each row of a 2-D param split by TP's rowwise ``Shard(1)``); int8 state
keeps one scale per 256 entries of a row, so a column split must not cut those blocks
(:func:`check_placement` refuses it by name, and any split beyond the rows of a 3-D or N-D
param with such bits).

**Replicated** (``distributed="replicated"``, with ``process_group=`` or the default group;
DDP keeps params identical on every rank): each rank computes a disjoint, FLOP-balanced
share of the matrices (every rank holds every matrix whole), and the results go to every
rank. Without it, and without DTensor params, the optimizers never call a collective.

Collectives are gloo-compatible: ``all_to_all_single`` with uneven splits (gloo supports
it); where every rank gets every result (replicated params, or only Whole outputs) the
return is one ``all_gather_single`` of each rank's bytes padded to the longest; results some
ranks get and others not go in the ``all_to_all_single``, a Whole one repeated for every
peer.
"""
import math
import weakref
from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from .ops import Out, Rows, Whole
from .precision import BLOCK

MODES = (None, "replicated")


class Box(NamedTuple):
    """The piece of a tensor one rank holds: ``offsets`` and ``sizes`` per dim, global."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def empty(self) -> bool:
        return 0 in self.sizes


def check_placement(p: Tensor, name: str, positional: bool = False, int8: bool = False) -> None:
    """Reject DTensor layouts whose pieces are not boxes of the param, naming ``p``: partial
    sums (gradients, not params), strided shards that interleave rows, and an N-D (N ≥ 4) param
    split beyond its dim 0 (its (1, d₀, d₁·d₂…) matrix view would interleave the pieces).
    ``positional``: p's state or weight is stored with bits that follow each entry's global
    index (stochastic rounding, int8 codes), which needs each piece to be rows, or columns of
    rows of a 2-D param; ``int8``: its state in int8 blocks of a row
    (:data:`~matrixopt.precision.BLOCK` entries), which a piece of columns must not cut."""
    if not isinstance(p, DTensor):
        return
    bad = [q for q in p.placements if not isinstance(q, (Shard, _StridedShard, Replicate))]
    if bad:
        raise ValueError(f"{name} is a DTensor placed {tuple(p.placements)}: matrixopt takes params "
                         f"placed Shard(d), Replicate() or FSDP2's strided shards, not {bad[0]}")
    boxes = [b for b in set(p_boxes(p)) if not b.empty]
    if sum(math.prod(b.sizes) for b in boxes) != p.numel() or _overlap(boxes):
        raise ValueError(f"{name}: the pieces of its placement {tuple(p.placements)} on a mesh of "
                         f"{tuple(p.device_mesh.shape)} are not contiguous blocks of its {tuple(p.shape)}")
    beyond_rows = any(b.sizes[1:] != tuple(p.shape[1:]) for b in boxes)
    if p.ndim >= 4 and beyond_rows:
        raise ValueError(f"{name} ({p.ndim}-D, placed {tuple(p.placements)}) is split beyond dim 0; "
                         "an N-D param (N ≥ 4) can be split on its dim 0 only")
    if positional and beyond_rows and p.ndim != 2:
        raise ValueError(f"{name} ({p.ndim}-D, placed {tuple(p.placements)}) is split beyond its rows: its "
                         "state_precision must be 'fp32' and master_weights 'nearest' (stochastic rounding and "
                         "int8 codes follow global positions); give it a group of its own")
    if int8 and beyond_rows and not _whole_int8_blocks(p):
        raise ValueError(f"{name} is placed {tuple(p.placements)}: its pieces' columns "
                         f"{sorted({(b.offsets[1], b.offsets[1] + b.sizes[1]) for b in boxes})} cut its rows' "
                         f"int8 blocks of {min(BLOCK, p.shape[1])} entries; give it state_precision 'fp32' or "
                         "'bf16' (a group of its own), or split it where blocks end")


def _whole_int8_blocks(p: DTensor) -> bool:
    """Whether the pieces of 2-D ``p`` split no int8 block of a row (each starts at a block's
    first column and ends at a block's end or the row's), so that each rank's blocks and
    their scales (a (rows, ⌈n/BLOCK⌉) tensor placed like p) are the whole param's."""
    n = p.shape[1]
    block = min(BLOCK, n)
    scales = (p.shape[0], -(-n // block))
    for box, scale in zip(p_boxes(p), p_boxes(p, scales)):
        (r0, c0), (rs, cs) = box
        if box.empty:
            continue
        if c0 % block or (cs % block and c0 + cs != n) or scale != Box((r0, c0 // block), (rs, -(-cs // block))):
            return False
    return True


def _overlap(boxes: list[Box]) -> bool:
    return any(all(a0 < b0 + bs and b0 < a0 + as_ for a0, as_, b0, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes))
               for i, a in enumerate(boxes) for b in boxes[i + 1:])


#: Per device mesh (held weakly: a cache must not keep a mesh, and with it process groups,
#: alive past ``destroy_process_group`` to the interpreter's exit, where their threads are torn
#: down out of order), its group and its pieces by (shape, placements).
_MESHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _mesh_cache(mesh) -> dict:
    return _MESHES.setdefault(mesh, {})


def mesh_group(mesh):
    """The process group of all ranks of ``mesh``: a 1-D mesh's own; for more dims the default
    group where the mesh spans every process, else the mesh flattened (a named mesh) or a new
    group of its ranks (made on first use, which every process must reach alike)."""
    cache = _mesh_cache(mesh)
    if "group" not in cache:
        if mesh.ndim == 1:
            cache["group"] = mesh.get_group()
        elif mesh.mesh.numel() == dist.get_world_size():
            cache["group"] = dist.group.WORLD
        elif mesh.mesh_dim_names:
            cache["group"] = mesh._flatten().get_group()
        else:
            ranks = tuple(sorted(mesh.mesh.flatten().tolist()))
            if ranks not in _SUB_MESH_GROUPS:
                _SUB_MESH_GROUPS[ranks] = dist.new_group(list(ranks))
            cache["group"] = _SUB_MESH_GROUPS[ranks]
    return cache["group"]


#: The groups made for sub-meshes, by their ranks, for the process's life: ``new_group`` is a
#: collective every rank must reach alike, which a cache entry lost with one mesh object (on
#: whichever rank collected it first) would break.
_SUB_MESH_GROUPS: dict[tuple, object] = {}


def lanes_apply(group, device: torch.device) -> bool:
    """Whether buckets whose matrix work spans ``group`` on ``device`` may run in lanes other
    than 0 (``MatrixOptimizer.buckets_in_flight``): on CPU (gloo) and where the group spans
    every process. A sub-mesh's lane groups would be made with other ranks' lists on other
    ranks (``new_group`` must see one list everywhere), and NCCL needs the collectives of its
    communicators issued in one order on every rank, which threads do not keep."""
    return device.type == "cpu" and dist.get_world_size(group) == dist.get_world_size()


def lane_group(group, lane: int):
    """The process group the buckets of ``lane`` use for ``group``'s matrix work: ``group``
    itself for lane 0, else a new group of the same ranks (made on first use, which every
    rank reaches alike: lanes are dealt in the step's plan, the same on every rank; only for
    groups of every process, :func:`lanes_apply`). Buckets of different lanes run in
    different threads, so one's collectives overlap another's compute; within a group they
    never interleave."""
    if lane == 0:
        return group
    copies = _LANES.setdefault(group, {})
    if lane not in copies:
        copies[lane] = dist.new_group(dist.get_process_group_ranks(group))
    return copies[lane]


#: Per process group (held weakly, as :data:`_MESHES`), its lanes' copies.
_LANES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def p_boxes(p: DTensor, shape: Sequence[int] | None = None) -> list[Box]:
    """Per rank of ``mesh_group(p.device_mesh)`` (in its rank order), the piece of p it holds,
    or of a tensor of global ``shape`` placed like p."""
    mesh, key = p.device_mesh, (tuple(p.shape if shape is None else shape), tuple(p.placements))
    cache = _mesh_cache(mesh)
    if key not in cache:
        cache[key] = _boxes(*key, mesh)
    return cache[key]


def _boxes(shape: tuple, placements: tuple, mesh) -> list[Box]:
    group = mesh_group(mesh)
    boxes = []
    for r in range(dist.get_world_size(group)):
        coordinate = (mesh.mesh == dist.get_global_rank(group, r)).nonzero()[0].tolist()
        sizes, offsets = _compute_local_shape_and_global_offset(shape, tuple(mesh.shape), coordinate, placements)
        boxes.append(Box(tuple(offsets), tuple(sizes)))
    return boxes


def my_box(p: DTensor, shape: Sequence[int] | None = None) -> Box:
    """This rank's piece of ``p``, or of a tensor of global ``shape`` placed like it."""
    return p_boxes(p, shape)[dist.get_rank(mesh_group(p.device_mesh))]


def dtensor_like(p: DTensor, local: Tensor, shape: Sequence[int] | None = None) -> DTensor:
    """``local`` (p's piece, or this rank's piece of a tensor of global ``shape`` placed like
    p: :func:`my_box`) as a DTensor with p's mesh and placement."""
    shape = torch.Size(p.shape if shape is None else shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


def agree_finite(finite: Tensor, group) -> Tensor:
    """Per-param finiteness flags agreed by all ranks (a param is finite only if it is on all)."""
    flags = finite.to(torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    return flags.bool()


def _bytes(t: Tensor) -> Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _typed(b: Tensor, dtype: torch.dtype) -> Tensor:
    """Bytes ``b`` (a slice of a received buffer) as ``dtype`` (copied where misaligned)."""
    return (b if b.storage_offset() % dtype.itemsize == 0 else b.clone()).view(dtype)


class MatrixWork:
    """The owner split of one bucket's whole-matrix work in one step, and its collectives.

    Per param: ``shapes`` (its (B, m, n) view) and ``boxes`` (per rank of ``group``, the box of
    that view the rank holds; None: replicated, every rank holds all of it). ``cost`` is one
    matrix's FLOPs; ``load`` (FLOPs per rank so far this step, shared by all buckets) is
    updated in place. A matrix some rank holds whole is owned by the least loaded such rank
    (computed where it lives: an expert of a sharded stack, a param on one rank); one split
    across ranks by the least loaded rank of all.
    """

    def __init__(self, shapes: list[tuple[int, int, int]], boxes: list[list[Box] | None], cost: int, group,
                 load: list[int]):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.shapes = shapes
        self.everywhere = all(b is None for b in boxes)   # replicated: every rank gets every result whole
        self.boxes = [b or [Box((0, 0, 0), tuple(s))] * self.world for b, s in zip(boxes, shapes)]
        self.owners, self.holders, self.pieces = [], [], []   # per param, per matrix
        for shape, pieces_of in zip(shapes, self.boxes):
            owners, holders, pieces = [], [], []
            for j in range(shape[0]):
                held = [r for r, b in enumerate(pieces_of)
                        if not b.empty and b.offsets[0] <= j < b.offsets[0] + b.sizes[0]]
                whole = [r for r in held if pieces_of[r].sizes[1:] == tuple(shape[1:])]
                owner = min(whole or range(self.world), key=load.__getitem__)
                load[owner] += cost
                senders = {}
                for r in held:   # one sender per distinct piece: the owner where it holds it
                    if r == owner or pieces_of[r] not in senders:
                        senders[pieces_of[r]] = r
                owners.append(owner)
                holders.append(held)
                pieces.append([] if owner in whole else sorted(senders.values()))
            self.owners.append(owners)
            self.holders.append(holders)
            self.pieces.append(pieces)
        self.units = [(i, j) for i, owners in enumerate(self.owners) for j, r in enumerate(owners) if r == self.rank]
        # Whether any input piece moves, and whether any Rows result does (known on every rank).
        self.gathers = any(senders for pieces in self.pieces for senders in pieces)
        self.scatters = any(held != [owner] for holders, owners in zip(self.holders, self.owners)
                            for held, owner in zip(holders, owners))

    def _local(self, i: int, j: int, tensors: list[Tensor]) -> Tensor:
        """Matrix j of param i as this rank holds it in ``tensors[i]``."""
        return tensors[i][j - self.boxes[i][self.rank].offsets[0]]

    # -- the map ---------------------------------------------------------------------------------
    def map(self, fn: Callable, inputs: Sequence[Rows | Whole], outputs: Sequence[Out]) -> tuple[list[Tensor], ...]:
        """``matrix_map`` on owner ranks; returns per-param lists like the single-process map:
        one collective brings every Rows input to the owners, one takes every output back."""
        for inp in inputs:
            if len(inp.tensors) != len(self.shapes):   # else one rank fails while the others wait
                raise ValueError(f"matrix_map: an input holds {len(inp.tensors)} entries for a split of "
                                 f"{len(self.shapes)}; pass entries= for a subset of the bucket")
        rows = [inp.tensors for inp in inputs if isinstance(inp, Rows)]
        gathered = iter(self._to_owners(rows))
        stacks = []
        for inp in inputs:
            if isinstance(inp, Whole):
                stacks.append(torch.stack([inp.tensors[i][j] for i, j in self.units]) if self.units else None)
            else:
                stacks.append(next(gathered))
        if self.units:
            out = fn(*stacks)
            outs = out if isinstance(out, tuple) else (out,)
            for o, spec in zip(outs, outputs, strict=True):
                if o.dtype != spec.dtype or tuple(o.shape[1:]) != tuple(spec.shape):
                    raise ValueError(f"matrix_map: an output of {tuple(o.shape[1:])} {o.dtype} per matrix "
                                     f"was declared {tuple(spec.shape)} {spec.dtype}")
        else:
            outs = [None] * len(outputs)
        return self._from_owners(outs, outputs, inputs[0].tensors[0].device)

    # -- collectives -------------------------------------------------------------------------------
    def _to_owners(self, inputs: list[list[Tensor]]) -> list[Tensor | None]:
        """Per Rows input, the stack of the whole matrices this rank owns, assembled from the
        pieces their holders send (all inputs in one exchange)."""
        if not inputs:
            return []
        if not self.gathers:   # every owner holds its matrices whole
            return [torch.stack([self._local(i, j, t) for i, j in self.units]) if self.units else None for t in inputs]
        send = [[] for _ in range(self.world)]
        for tensors in inputs:
            for i, pieces in enumerate(self.pieces):
                for j, senders in enumerate(pieces):
                    if self.rank in senders:
                        send[self.owners[i][j]].append(self._local(i, j, tensors))
        recv = [[] for _ in range(self.world)]
        for tensors in inputs:
            for i, j in self.units:
                for r in self.pieces[i][j]:
                    recv[r].append((self.boxes[i][r].sizes[1:], tensors[0].dtype))
        received = self._exchange(send, recv, inputs[0][0].device)
        stacks = []
        for tensors in inputs:
            whole = []
            for i, j in self.units:
                if not self.pieces[i][j]:
                    whole.append(self._local(i, j, tensors))
                    continue
                m, n = self.shapes[i][1:]
                matrix = tensors[0].new_empty((m, n))
                for r in self.pieces[i][j]:
                    (_, r0, c0), (_, rs, cs) = self.boxes[i][r]
                    matrix[r0:r0 + rs, c0:c0 + cs] = next(received[r])
                whole.append(matrix)
            stacks.append(torch.stack(whole) if whole else None)
        return stacks

    def _piece(self, i: int, rank: int, spec: Out) -> tuple[slice, slice]:
        """The rows and columns of a per-matrix Rows output ``spec`` that ``rank`` holds: the
        box's rows, and its columns where the output has the matrix's."""
        (_, r0, c0), (_, rs, cs) = self.boxes[i][rank]
        n = self.shapes[i][2]
        return slice(r0, r0 + rs), slice(c0, c0 + cs) if spec.shape[1] == n else slice(None)

    def _from_owners(self, outs: list, outputs: Sequence[Out], device) -> tuple[list[Tensor], ...]:
        """Every output back in one exchange: Whole ones to every rank, Rows ones to the ranks
        holding those rows (replicas included)."""
        if not self.scatters and not any(spec.whole for spec in outputs):   # each result where it lives
            return tuple([self._kept(i, out, spec, device) for i in range(len(self.shapes))]
                         for out, spec in zip(outs, outputs))
        everywhere = all(spec.whole for spec in outputs) or self.everywhere   # an all-gather
        send = [[] for _ in range(self.world)]
        for out, spec in zip(outs, outputs):
            for (i, j), o in zip(self.units, out if out is not None else []):
                for r in range(self.world) if spec.whole else self.holders[i][j]:
                    send[r].append(o if spec.whole else o[self._piece(i, r, spec)])
        recv = [[] for _ in range(self.world)]
        for spec in outputs:
            for i, owners in enumerate(self.owners):
                for j, r in enumerate(owners):
                    if spec.whole:
                        recv[r].append((tuple(spec.shape), spec.dtype))
                    elif self.rank in self.holders[i][j]:
                        recv[r].append((tuple(self._local_shape(i, spec)), spec.dtype))
        received = self._exchange(send, recv, device, everywhere)
        results = []
        for spec in outputs:
            per_param = []
            for i, owners in enumerate(self.owners):
                mine = [next(received[r]) for j, r in enumerate(owners)
                        if spec.whole or self.rank in self.holders[i][j]]
                per_param.append(torch.stack(mine) if mine else self._nothing(i, spec, device))
            results.append(per_param)
        return tuple(results)

    def _kept(self, i: int, out: Tensor | None, spec: Out, device) -> Tensor:
        """Param i's results from this rank's own ``out`` (each of its matrices' only holder)."""
        mine = [o for (k, _), o in zip(self.units, out if out is not None else []) if k == i]
        return torch.stack(mine) if mine else self._nothing(i, spec, device)

    def _nothing(self, i: int, spec: Out, device) -> Tensor:
        """Param i's results on a rank holding none of its entries (an empty piece: (1, 0, n) of
        a matrix, (0, m, n) of an expert stack)."""
        count = 0 if spec.whole else self.boxes[i][self.rank].sizes[0]
        shape = tuple(spec.shape) if spec.whole else tuple(self._local_shape(i, spec))
        return torch.empty((count, *shape), dtype=spec.dtype, device=device)

    def _local_shape(self, i: int, spec: Out) -> torch.Size:
        """The per-matrix shape of this rank's piece of a Rows output ``spec`` of param i."""
        rows, cols = self._piece(i, self.rank, spec)
        return torch.empty(spec.shape, device="meta")[rows, cols].shape

    def _exchange(self, send: list[list[Tensor]], recv: list[list[tuple]], device, everywhere: bool = False) -> list:
        """One collective of bytes: ``send[r]`` (tensors of any dtype) to rank r; ``recv[r]``:
        (shape, dtype) of each tensor rank r sends here. Returns per rank an iterator over the
        received tensors, in order. ``everywhere``: every rank sends the same to all, an
        all-gather (each rank's bytes padded to the longest), else an ``all_to_all_single``."""
        sizes = [[math.prod(shape) * dtype.itemsize for shape, dtype in pieces] for pieces in recv]
        totals = [sum(s) for s in sizes]
        flat = [_bytes(t) for pieces in (send[:1] if everywhere else send) for t in pieces]
        inp = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8, device=device)
        if everywhere:
            width = max(totals)
            out = torch.empty(self.world * width, dtype=torch.uint8, device=device)
            dist.all_gather_single(out, torch.nn.functional.pad(inp, (0, width - inp.numel())), group=self.group)
            chunks = [out[r * width:r * width + totals[r]] for r in range(self.world)]
        else:
            out = torch.empty(sum(totals), dtype=torch.uint8, device=device)
            dist.all_to_all_single(out, inp, totals, [sum(t.numel() * t.element_size() for t in pieces)
                                                      for pieces in send], group=self.group)
            chunks = out.split(totals)
        received = []
        for chunk, pieces, nbytes in zip(chunks, recv, sizes):
            received.append(iter([_typed(b, dtype).view(shape)
                                  for b, (shape, dtype) in zip(chunk.split(nbytes), pieces)]))
        return received
