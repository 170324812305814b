"""The planner: a step's param groups as typed plans of work.

Per group, once (:class:`GroupLayout`, cached until the group's params' list, ``blocks``,
``block_axis``, ``matrix`` or the bare-params rule's records change, or a param a step updates
is another tensor or has another shape): which params are matrices, how each is seen ((B, m, n), equal row blocks, or
blocks that are separate matrices: unequal row blocks, column blocks) and its index in the
group. Per step: the group's matrices in :class:`Bucket`\\ s
of same-shape matrices (:meth:`Planner.buckets`, :meth:`Planner.bucket`), its fallback
params, and the ``matrix_map`` each bucket's whole-matrix work runs through
(:meth:`Planner.matrix_map`: single process or owner ranks).
"""
import math
from collections import defaultdict
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from .batching import agree, stack_limit
from .distributed import MatrixWork, lane_group, lanes_apply, mesh_group
from .matrices import (as_matrices, block_axis, block_matrices, block_of, block_offset, block_sizes, entry_span,
                       equal_blocks, local, matrix_shape, my_view_box, separate_blocks, view_boxes, whole_projections)
from .ops import local_map
from .routing import BLOCKS, KEY as ROUTED
from .routing import decides, routed, split
from .seeding import Span
from .state import RowState
from .weights import working_dtype


def is_matrix(group: dict, p: Tensor, index: int | None = None) -> bool:
    """Whether ``p`` (the group's param ``index``; found by identity if None) goes to the
    matrix rule (else to the fallback): the group's ``matrix`` flag, or where it has none the
    bare-params rule (:mod:`matrixopt.routing`)."""
    flag = group.get("matrix")
    if flag is not None:
        return bool(flag)
    return routed(group, _index(group, p) if index is None else index, p)


def _index(group: dict, p: Tensor) -> int:
    return next(i for i, q in enumerate(group["params"]) if q is p)


def split_of(group: dict, p: Tensor, index: int | None = None) -> tuple[object, str]:
    """``p``'s ``blocks`` and ``block_axis`` (the group's param ``index``; found by identity if
    None): the group's, or, in a group the bare-params rule routes that sets no ``blocks``, those
    the rule found for ``p`` (a fused projection, :func:`matrixopt.routing.split`)."""
    if group.get("blocks") is not None or not decides(group) or not group.get(BLOCKS):
        return group.get("blocks"), block_axis(group)
    entries = split(group, _index(group, p) if index is None else index) or {}
    return entries.get("blocks"), block_axis(entries)


def param_blocks(group: dict, p: Tensor, index: int | None = None) -> tuple[list[int] | None, str]:
    """``p``'s blocks as sizes along their axis (None: not split) and the axis
    (:func:`split_of`, :func:`matrixopt.matrices.block_sizes`)."""
    value, axis = split_of(group, p, index)
    return block_sizes("blocks", value, p, axis), axis


def separate_parts(group: dict, p: Tensor) -> list[Tensor] | None:
    """``p``'s blocks in ``group`` that are separate matrices
    (:func:`~matrixopt.matrices.separate_blocks`), each a view of ``p.detach()``
    (:func:`~matrixopt.matrices.block_of`); None if it has none."""
    sizes, axis = param_blocks(group, p)
    sizes = separate_blocks(sizes, axis)
    return sizes and [block_of(p.detach(), sizes, b, axis) for b in range(len(sizes))]


class ParamLayout(NamedTuple):
    """How a group sees one of its params. ``index``: its place in the group's params;
    ``param_shape``: its shape when the layout was made; ``matrix``: routed to the matrix
    rule; ``shape``: its (B, m, n) view (equal blocks applied); ``blocks``: the count of equal
    row blocks, or None; ``separate``: the sizes of blocks that are separate matrices (each
    with its own state: unequal row blocks, column blocks), or None; ``axis``: the side
    ``separate`` splits ("rows" or "columns")."""
    index: int
    param_shape: torch.Size
    matrix: bool
    shape: tuple[int, int, int]
    blocks: int | None
    separate: list[int] | None
    axis: str = "rows"


class GroupLayout(NamedTuple):
    """A group's :class:`ParamLayout` per param (by id) and what it was made from."""
    group: dict
    signature: tuple
    params: dict[int, ParamLayout]

    def of(self, p: Tensor) -> ParamLayout:
        return self.params[id(p)]

    def holds(self, index: int, p: Tensor) -> bool:
        """Whether the layout was made with ``p`` as param ``index``, of its present shape."""
        entry = self.params.get(id(p))
        return entry is not None and entry.index == index and entry.param_shape == p.shape

    def places(self, params: list[Tensor]) -> list[int]:
        """The params' indices in the group."""
        return [self.params[id(p)].index for p in params]


def _signature(group: dict) -> tuple:
    """What a group's layout is made from, bar its params one by one (see
    :meth:`GroupLayout.holds`): the params' list and length, the group's ``blocks``,
    ``block_axis``, ``matrix`` and the routing records (replaced, never edited, by
    :func:`matrixopt.routing.decide`)."""
    params = group["params"]
    return (id(params), len(params), repr(group.get("blocks")), block_axis(group), group.get("matrix"),
            id(group.get(ROUTED)), id(group.get(BLOCKS)))


def param_layout(group: dict, index: int, p: Tensor) -> ParamLayout:
    """How ``group`` sees ``p``, its param ``index``."""
    matrix = is_matrix(group, p, index)
    sizes, axis = param_blocks(group, p, index) if matrix else (None, block_axis(group))
    blocks = equal_blocks(sizes, axis)
    return ParamLayout(index, p.shape, matrix, matrix_shape(p, blocks), blocks, separate_blocks(sizes, axis), axis)


class Item(NamedTuple):
    """One entry of a bucket: ``block`` None for all of a param's (B, m, n) matrices, b for
    block b of a param split into blocks that are separate matrices."""
    param: Tensor
    block: int | None


class Bucket(NamedTuple):
    """What a rule's ``_update`` gets: one bucket of same-shape matrices.

    ``params``: the parameters (keys of the optimizer's state; DTensors under FSDP2).
    ``weights``, ``grads``: their (B_i, m, n) views (of the local shards), to update in place
    (``grads`` None for work outside a step).
    ``states``: their state dicts, created from the rule's declaration.
    ``shape``: the whole matrices' (m, n). ``sharded``: whether the params are FSDP2 DTensors.
    ``distributed``: whether their matrix work spans ranks (FSDP2, or replicated params).
    ``matrix_map``: runs whole-matrix work (see :meth:`MatrixOptimizer._update`).
    ``blocks``: per entry, None (all of the param's matrices) or b (block b of a param split
    into separate blocks; then ``params`` repeats the param and ``states`` is the block's).
    ``group_index``: the group's index in the optimizer; ``places``: per entry, the param's
    index in its group (together they name and seed it).
    ``counts``: per entry, the matrices it holds (B_i).
    ``stack``: whether the bucket's matrices are small enough to be stacked with others
    (:attr:`MatrixOptimizer.unbatched_elements`); a larger one has a bucket of its own.
    ``prepared``: per entry, what the rule's ``_prepare`` computed before the non-finite
    check (None: nothing).
    ``whole_projections``: whether the low-rank projections of the matrices are computed whole
    per matrix (:func:`~matrixopt.matrices.whole_projections`: ranks split their columns, or
    the params are DTensors in row blocks).
    ``lane``: the lane its distributed work runs in (:class:`Limits`).
    """
    params: list
    weights: list
    grads: list | None
    states: list | None
    shape: tuple
    sharded: bool
    distributed: bool
    matrix_map: Callable
    blocks: list
    group_index: int
    places: list[int]
    counts: list[int]
    stack: bool = True
    prepared: list | None = None
    whole_projections: bool = False
    lane: int = 0


class Limits(NamedTuple):
    """The batching limits a step plans with (the optimizer's class attributes):
    ``max_bucket_elements`` per bucket; ``unbatched_elements``: None (measured,
    :func:`matrixopt.batching.stack_limit`) or a fixed table, per device type the matrix size
    from which a matrix gets a bucket of its own; ``work``: the rule's kind of work whose
    batching is measured (:data:`~matrixopt.batching.ORTHOGONALIZE`,
    :data:`~matrixopt.batching.LOWRANK`); ``lanes``: how many distributed buckets run at once
    (each lane in a thread and process group of its own, :func:`~matrixopt.distributed.lane_group`)."""
    max_bucket_elements: int
    unbatched_elements: dict | None
    work: str
    lanes: int = 1

    @classmethod
    def checked(cls, *limits) -> "Limits":
        """The limits, ValueError naming the optimizer's attribute if ``lanes`` is no int ≥ 1."""
        made = cls(*limits)
        if not isinstance(made.lanes, int) or isinstance(made.lanes, bool) or made.lanes < 1:
            raise ValueError(f"Invalid buckets_in_flight: {made.lanes!r}; expected an int ≥ 1")
        return made


class Planner:
    """Groups into layouts (cached) and buckets (per step). ``replicated``: whether the
    optimizer's params are replicated (DDP), their matrix work split over ``process_group``
    (None: the default group); ``owner``: the optimizer's class name, for errors."""

    def __init__(self, replicated: bool, process_group, owner: str):
        self.replicated, self.process_group, self.owner = replicated, process_group, owner
        self._layouts: dict[int, GroupLayout] = {}
        self._stack_limits: dict[tuple, int] = {}

    def replicated_group(self):
        """The process group replicated params split their matrix work over, or None."""
        if not self.replicated:
            return None
        if not torch.distributed.is_initialized():
            raise RuntimeError(f"{self.owner}(distributed='replicated') needs an initialized process group "
                               "(torch.distributed.init_process_group)")
        return self.process_group or torch.distributed.group.WORLD

    def layout(self, group: dict, check=()) -> GroupLayout:
        """The group's :class:`GroupLayout`, made again when its params' list, ``blocks`` or
        ``matrix`` changed, or when one of the params at the indices ``check`` is another
        tensor or has another shape than when it was made (a step checks the params it
        steps: per step, the work of the params themselves, not of the layout)."""
        signature = _signature(group)
        cached = self._layouts.get(id(group))
        params = group["params"]
        if (cached is None or cached.group is not group or cached.signature != signature
                or not all(cached.holds(i, params[i]) for i in check)):
            cached = GroupLayout(group, signature, {id(p): param_layout(group, i, p)
                                                    for i, p in enumerate(group["params"])})
            self._layouts[id(group)] = cached
        return cached

    def retain(self, groups: list[dict]) -> None:
        """Forget the layouts of groups no longer in ``groups`` (removed, or replaced by a
        load): a layout holds its group, and with it the params."""
        ids = {id(group) for group in groups}
        self._layouts = {key: layout for key, layout in self._layouts.items() if key in ids}

    def __getstate__(self):
        # The caches hold params and process groups (which do not pickle); a copy makes its own.
        return {**self.__dict__, "_layouts": {}, "_stack_limits": {}}

    def buckets(self, group: dict, params: list[Tensor], limits: Limits) -> list[list[Item]]:
        """The matrices of ``params`` grouped by (m, n, dtype, device, device mesh, placement), in
        first-seen order, as :class:`Item`\\ s. A bucket holds at most
        ``max_bucket_elements`` elements (a single larger item makes a bucket of its own),
        and a matrix too large to be stacked (:meth:`stacks`) one of its own."""
        layout = self.layout(group)
        buckets = defaultdict(list)
        for p in params:
            key = (working_dtype(group, p), p.device, getattr(p, "device_mesh", None), getattr(p, "placements", None))
            shape = layout.of(p)
            if shape.separate is None:
                _, m, n = shape.shape
                buckets[(m, n, *key)].append((Item(p, None), p.numel()))
            else:
                for b in range(len(shape.separate)):
                    B, m, n = block_matrices(p, shape.separate, b, shape.axis).shape
                    buckets[(m, n, *key)].append((Item(p, b), B * m * n))
        chunks = []
        for key, bucket in buckets.items():
            first = bucket[0][0].param
            alone = not self.stacks(key[0], key[1], first, key[2], limits, group_of([first], self.replicated_group()))
            chunk, size = [], 0
            for item, numel in bucket:
                if chunk and (alone or size + numel > limits.max_bucket_elements):
                    chunks.append(chunk)
                    chunk, size = [], 0
                chunk.append(item)
                size += numel
            chunks.append(chunk)
        return chunks

    def views(self, group: dict, items: list[Item], tensors: list[Tensor]) -> tuple[list[Tensor], list[tuple]]:
        """Each item's (B, m, n) matrix view of the corresponding tensor (a param's local
        shard or its gradient), and the items' whole (B, m, n) shapes."""
        layout = self.layout(group)
        views, shapes = [], []
        for (p, b), t in zip(items, tensors):
            shape = layout.of(p)
            if b is None:
                # A DTensor's piece in row blocks: its box of the (B·k, h, n) view (else the same).
                blocked = shape.blocks is not None and isinstance(p, DTensor)
                views.append(t.reshape(my_view_box(p, shape.blocks).sizes) if blocked else as_matrices(t, shape.blocks))
                shapes.append(shape.shape)
            else:
                views.append(block_matrices(t, shape.separate, b, shape.axis))
                shapes.append(tuple(views[-1].shape))
        return views, shapes

    def first_entries(self, group: dict, items: list[Item]) -> list[Span]:
        """Per item, where its view's entries lie in its whole param: the rank's piece
        (:func:`~matrixopt.matrices.entry_span`), a block's
        (:func:`~matrixopt.matrices.block_offset`)."""
        layout = self.layout(group)
        return [entry_span(p) if b is None else block_offset(p, layout.of(p).separate, b, layout.of(p).axis)
                for p, b in items]

    def bucket(self, group: dict, group_index: int, items: list[Item], loads: dict, limits: Limits,
               grads: bool = True, lane: int = 0) -> Bucket:
        """The :class:`Bucket` of ``items`` of ``group`` (the optimizer's group ``group_index``),
        without its states (the executor adds them); ``grads``: with the gradients' views.
        ``loads``: the step's matrix work per rank so far (:meth:`matrix_map`); ``lane``: the
        lane its distributed work runs in (:class:`Limits`; lane 0 where lanes do not apply,
        :func:`~matrixopt.distributed.lanes_apply`)."""
        # Sharded (DTensor) params are updated through their local shards.
        params = [p for p, _ in items]
        weights, shapes = self.views(group, items, [local(p) for p in params])
        grad_views = self.views(group, items, [local(p.grad) for p in params])[0] if grads else None
        _, m, n = shapes[0]
        process_group = group_of(params, self.replicated_group())
        lane = lane if process_group is not None and lanes_apply(process_group, weights[0].device) else 0
        layout = self.layout(group)
        return Bucket(params, weights, grad_views, None, (m, n), isinstance(params[0], DTensor),
                      process_group is not None, self.matrix_map(params, layout, shapes, loads, process_group, lane),
                      [b for _, b in items], group_index, layout.places(params), [s[0] for s in shapes],
                      self.stacks(m, n, params[0], working_dtype(group, params[0]), limits, process_group),
                      whole_projections=whole_projections(params[0], layout.of(params[0]).blocks), lane=lane)

    def stacks(self, m: int, n: int, p: Tensor, dtype: torch.dtype, limits: Limits, process_group) -> bool:
        """Whether m×n matrices of params like ``p`` (device, process group), worked on in
        ``dtype`` (:func:`~matrixopt.weights.working_dtype`), share
        stacks: below the stack limit of the rule's kind of work there
        (:func:`matrixopt.batching.stack_limit`: the optimizer's fixed table, a pinned one, or
        measured on this device, thread count and CPU), the same on every rank of the group
        the matrices' work spans (``process_group``, or None: :func:`matrixopt.batching.agree`).
        Decided once per optimizer and key (a thread count set later does not change it)."""
        table = limits.unbatched_elements
        key = (limits.work, p.device, dtype, tuple(sorted(table.items())) if table is not None else None,
               process_group)
        if key not in self._stack_limits:
            limit = stack_limit(limits.work, p.device, dtype, table)
            self._stack_limits[key] = limit if process_group is None else agree(limit, process_group, local(p).device)
        return m * n < self._stack_limits[key]

    def keep(self, group: dict, bucket: Bucket, kept: set[int], loads: dict, limits: Limits) -> Bucket | None:
        """``bucket`` with only the params in ``kept`` (ids of those whose check passed; None
        if none is left)."""
        keep = [j for j, p in enumerate(bucket.params) if id(p) in kept]
        if len(keep) == len(bucket.params):
            return bucket
        if not keep:
            return None
        items = [Item(bucket.params[j], bucket.blocks[j]) for j in keep]
        prepared = bucket.prepared and [bucket.prepared[j] for j in keep]
        return self.bucket(group, bucket.group_index, items, loads, limits, lane=bucket.lane)._replace(prepared=prepared)

    @staticmethod
    def matrix_map(params: list[Tensor], layout: GroupLayout, shapes: list[tuple[int, int, int]], loads: dict,
                   process_group, lane: int = 0) -> Callable:
        """The ``matrix_map`` of a bucket: :func:`~matrixopt.ops.local_map` in a single
        process (``process_group`` None), else the bucket's owner split over it
        (:class:`~matrixopt.distributed.MatrixWork`; ``loads``: process group → FLOPs of
        matrix work per rank so far this step), its collectives in ``lane``'s group
        (:func:`~matrixopt.distributed.lane_group`)."""
        if process_group is None:
            return local_map
        _, m, n = shapes[0]
        load = loads.setdefault(process_group, [0] * torch.distributed.get_world_size(process_group))
        boxes = [view_boxes(p, layout.of(p).blocks) for p in params]

        def work(entries, load) -> MatrixWork:
            return MatrixWork([shapes[i] for i in entries], [boxes[i] for i in entries], m * n * min(m, n),
                              lane_group(process_group, lane), load)

        whole = work(range(len(params)), load)
        after = list(load)

        def matrix_map(fn, inputs, outputs, entries=None):
            # A subset (params whose refresh is due while others' is not, after a skipped
            # step) gets an owner split of its own, the same on every rank: from the loads
            # after this bucket's plan, changing no other's (lanes run in any order).
            if entries is None or list(entries) == list(range(len(params))):
                return whole.map(fn, inputs, outputs)
            return work(entries, list(after)).map(fn, inputs, outputs)

        return matrix_map


def group_of(params, replicated_group):
    """The process group the matrix work of ``params`` spans (their DTensors' mesh with the
    most ranks: under FSDP+TP the 2-D one, which holds the 1-D dp mesh of the params TP left
    whole; else the replicated group), or None (single process)."""
    meshes = {id(p.device_mesh): p.device_mesh for p in params if isinstance(p, DTensor)}
    if meshes:
        return mesh_group(max(meshes.values(), key=lambda mesh: mesh.mesh.numel()))
    return replicated_group


def fallback_chunks(params: list[Tensor], states: list[dict], declared: list[dict], limit: int,
                    elementwise: bool) -> list[list[tuple]]:
    """The fallback's calls at a lower precision: lists of (param, state) of at most ``limit``
    elements in all, and for each larger param whose rows the fallback may update alone
    (``elementwise``, every entry sharded or a counter), one call per chunk of its rows,
    (param, :class:`~matrixopt.state.RowState`). Row states are made before any call, so
    each copies the counters as they were before the step."""
    calls, size = [[]], 0
    for p, state, spec in zip(params, states, declared):
        shard = local(p)
        if shard.numel() > limit and shard.dim() and elementwise and RowState.splits(spec):
            # Chunks of a multiple of 64 entries: the fused kernels' vector loops split a
            # tensor into 64-byte units, so chunk edges fall where the whole tensor's do
            # (rows of an odd length: chunks of 64 rows, beyond the limit if they are long).
            row = math.prod(shard.shape[1:])
            unit = 64 // math.gcd(row, 64)
            step = max(unit, limit // row // unit * unit)
            calls += [[(p, RowState(state, spec, slice(r, r + step)))] for r in range(0, shard.shape[0], step)]
            calls.append([])
            size = 0
            continue
        if calls[-1] and size + shard.numel() > limit:
            calls.append([])
            size = 0
        calls[-1].append((p, state))
        size += shard.numel()
    return [pieces for pieces in calls if pieces]
