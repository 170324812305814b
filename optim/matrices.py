"""How params are seen as matrices: the (B, m, n) views, row blocks, shards.

- 2-D (m, n) as is; 3-D (E, m, n) as E independent matrices (stacked MoE experts); N-D with
  N ≥ 4 as conv kernels (out, in·k₁·k₂…); 1-D (routed to a matrix rule with ``matrix=True``)
  as a single row (1, n).
- A group's ``blocks`` splits each matrix's rows into blocks, each a matrix of its own:
  k equal blocks are a free (B·k, m/k, n) view; blocks of unequal sizes are separate
  matrices (their state is kept per block). With the group's ``block_axis="columns"`` the
  blocks split the columns instead (a fused projection stored (in, out), as transformers'
  ``Conv1D``, or an expert stack (E, d, 2·f)): each block is a separate matrix (its view a
  strided slice of the param; its state kept per block), whatever the sizes.
- A DTensor param (FSDP2, HSDP, tensor parallel) is updated through its local piece, a box of
  it (:func:`matrixopt.distributed.p_boxes`), and so of its (B, m, n) view; in equal row
  blocks, a box of the (B·k, m/k, n) view where the piece holds whole blocks, rows inside one
  block, or columns (:func:`view_boxes`; other pieces are refused by :func:`block_sizes`).
"""
import functools
import math

import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from .distributed import Box, mesh_group, my_box, p_boxes
from .seeding import Span


def matrix_shape(t: Tensor, blocks: int | None = None) -> tuple[int, int, int]:
    """(B, m, n): how ``t`` is seen as a batch of B matrices of m×n (see the module docstring);
    with ``blocks`` = k, each matrix's rows split into k equal blocks, each its own matrix
    (packed q/k/v or gate/up weights, LSTM gates)."""
    if t.ndim == 0:
        return 1, 1, 1
    if t.ndim == 1:
        return 1, 1, t.shape[0]
    if t.ndim == 2:
        B, m, n = 1, t.shape[0], t.shape[1]
    elif t.ndim == 3:
        B, m, n = t.shape
    else:
        return 1, t.shape[0], math.prod(t.shape[1:])
    k = blocks or 1
    return B * k, m // k, n


def view_boxes(p: Tensor, blocks: int | None = None) -> list[Box | None] | None:
    """Per rank, the box of ``p``'s (B, m, n) view (see :func:`matrix_shape`; ``blocks``: its
    equal row blocks) that the rank holds (None: a plain tensor, the same whole on every
    rank). A piece that is no box of the view (one that cuts across row blocks, see
    :func:`_blocked_box`) is None in the list."""
    if not isinstance(p, DTensor):
        return None
    return _view_boxes(tuple(p.shape), tuple(p_boxes(p)), blocks if p.ndim in (2, 3) and blocks != 1 else None)


@functools.lru_cache(maxsize=None)
def _view_boxes(shape: tuple, boxes: tuple[Box, ...], blocks: int | None) -> list[Box | None]:
    out = []
    for (offsets, sizes) in boxes:
        if len(shape) == 1:
            offsets, sizes = (0, 0, offsets[0]), (1, 1, sizes[0])
        elif len(shape) == 2:
            offsets, sizes = (0, *offsets), (1, *sizes)
        elif len(shape) > 3:   # split on dim 0 only (check_placement)
            offsets, sizes = (0, offsets[0], 0), (1, sizes[0], math.prod(shape[1:]))
        box = Box(tuple(offsets), tuple(sizes))
        out.append(_blocked_box(box, shape[-2] // blocks, blocks) if blocks else box)
    return out


def my_view_box(p: DTensor, blocks: int | None = None) -> Box:
    """This rank's box of ``p``'s (B, m, n) view (see :func:`view_boxes`)."""
    return view_boxes(p, blocks)[dist.get_rank(mesh_group(p.device_mesh))]


def _blocked_box(box: Box, h: int, k: int) -> Box | None:
    """``box`` of a (B, m, n) view as a box of its (B·k, h, n) view in row blocks of h rows:
    whole blocks (rows from a block's first, a multiple of h of them, of one matrix or all rows
    of each), or rows inside one block; else (rows across a block's edge) None."""
    (b0, r0, c0), (bs, rs, cs) = box
    if 0 in box.sizes:
        return Box((b0 * k, 0, c0), (0, h, cs))
    if r0 % h == 0 and rs % h == 0 and (bs == 1 or rs == h * k):
        return Box((b0 * k + r0 // h, 0, c0), (bs * rs // h, h, cs))
    if bs == 1 and r0 // h == (r0 + rs - 1) // h:
        return Box((b0 * k + r0 // h, r0 % h, c0), (1, rs, cs))
    return None


def as_matrices(t: Tensor, blocks: int | None = None) -> Tensor:
    """``t`` viewed (or, if not viewable, copied) as (B, m, n) (see :func:`matrix_shape`)."""
    return t.reshape(matrix_shape(t, blocks))


#: A group's ``block_axis`` values: the side of each matrix its ``blocks`` split.
BLOCK_AXES = ("rows", "columns")


def block_axis(group: dict) -> str:
    """The side the ``blocks`` of a group (or of a fused projection's entries) split: "rows" (the
    default) or "columns"."""
    return group.get("block_axis") or "rows"


def block_sizes(name: str, value, p: Tensor, axis: str = "rows") -> list[int] | None:
    """A group's ``blocks`` for ``p`` as sizes along ``axis`` (None: not split); ValueError
    naming the param unless they split the rows of a 2-D (unequal sizes) or 3-D (equal ones)
    matrix, or the columns of a 2-D or 3-D one. A DTensor takes equal row blocks only, where
    each rank's piece holds whole blocks, rows inside one block, or columns of all rows (see
    :func:`view_boxes`)."""
    if value is None:
        return None
    dim = -2 if axis == "rows" else -1
    sizes = value
    if isinstance(value, int) and not isinstance(value, bool):
        sizes = [p.shape[dim] // value] * value if p.ndim in (2, 3) and value >= 1 else [0]
    dtensor = isinstance(p, DTensor)
    ok = (isinstance(sizes, (list, tuple)) and sizes and p.ndim in (2, 3)
          and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
          and sum(sizes) == p.shape[dim]
          and (len(set(sizes)) == 1 and axis == "rows" or not dtensor and (p.ndim == 2 or axis == "columns")))
    if not ok:
        raise ValueError(f"Invalid blocks for {name}: {value!r} (block_axis {axis!r}); expected a count k or "
                         f"sizes splitting the {axis} of a 2-D or 3-D param of shape {tuple(p.shape)} (rows of a "
                         f"3-D one or of a DTensor: equal sizes; columns: not of a DTensor)")
    if dtensor and None in view_boxes(p, len(sizes)):
        raise ValueError(f"blocks={value!r} of {name}: its pieces on the mesh (placed {tuple(p.placements)}) cut "
                         f"across its row blocks of {sizes[0]} rows; each rank must hold whole blocks, rows "
                         "inside one block, or columns (e.g. fully_shard(..., shard_placement_fn=...) "
                         "returning Shard(1) for it)")
    return list(sizes)


def equal_blocks(sizes: list[int] | None, axis: str = "rows") -> int | None:
    """The count of a split into equal row blocks, viewed as more matrices of the param's
    (B, m, n) view (None: not split, or split into separate blocks)."""
    return len(sizes) if sizes and len(set(sizes)) == 1 and axis == "rows" else None


def separate_blocks(sizes: list[int] | None, axis: str = "rows") -> list[int] | None:
    """The sizes of a split into blocks that are separate matrices, each with its own state:
    row blocks of different sizes, or any column blocks (None otherwise)."""
    return sizes if sizes and (len(set(sizes)) > 1 or axis == "columns") else None


def block_of(t: Tensor, sizes: list[int], b: int, axis: str) -> Tensor:
    """Block ``b`` of ``t`` (a param, its gradient, a tensor shaped like it) split into
    ``sizes`` along ``axis``: a view with t's ndim (a strided one for columns)."""
    start = sum(sizes[:b])
    return t.narrow(-2 if axis == "rows" else -1, start, sizes[b])


def block_matrices(t: Tensor, sizes: list[int], b: int, axis: str) -> Tensor:
    """Block ``b`` of ``t`` as its (B, m, n) view (:func:`block_of`)."""
    block = block_of(t, sizes, b, axis)
    return block if block.ndim == 3 else block.unsqueeze(0)


def block_offset(p: Tensor, sizes: list[int], b: int, axis: str) -> Span:
    """Where the entries of ``p``'s block ``b`` (split into ``sizes`` along ``axis``) lie in
    the whole param (:func:`entry_span`; a column block: some columns of every row), what
    stochastic rounding draws its bits by: the bits the unsplit param would draw."""
    if axis == "rows":
        return entry_span(p, row=sum(sizes[:b]))
    return Span(sum(sizes[:b]), sizes[b], p.shape[-1])


def local(t: Tensor) -> Tensor:
    """The rank's shard of a DTensor; a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def rows_of(t: Tensor, rows: slice | None) -> Tensor:
    """Rows ``rows`` of t (None: all of t)."""
    return t if rows is None else t[rows]


def entry_span(p: Tensor, shape: tuple | None = None, row: int = 0) -> Span:
    """Where the entries of this rank's piece of ``p`` (or of a tensor of global ``shape``
    placed like it: sharded state), from the piece's local row ``row`` on, lie in the whole
    tensor (a plain tensor: its own, from that row): a range of rows, or some columns of
    each (a 2-D piece split beyond its rows)."""
    shape = tuple(p.shape if shape is None else shape)
    n = math.prod(shape[1:])
    if not isinstance(p, DTensor):
        return Span(row * n)
    (r0, *columns), (_, *widths) = my_box(p, shape)
    if tuple(widths) == shape[1:]:
        return Span((r0 + row) * n)
    return Span((r0 + row) * n + columns[0], widths[0], n)


def whole_projections(p: Tensor, blocks: int | None = None) -> bool:
    """Whether the low-rank projections of ``p``'s view matrices are computed whole per matrix
    (each on the matrix's owner, through ``matrix_map``) rather than on each rank's rows: some
    rank holds part of their columns (tensor-parallel ``Shard(1)``: a right projection G·V
    sums over ranks), or p is a DTensor in row blocks (``blocks``) whose pieces are not whole
    matrices of its (B·k, h, n) view laid out as p's placement lays out a tensor of that
    shape (rows inside a block; blocks dealt otherwise than DTensor deals dim 0), so that
    per-matrix values could not be sharded like p."""
    if not isinstance(p, DTensor):
        return False
    if any(b.sizes[-1] != p.shape[-1] for b in p_boxes(p) if not b.empty):
        return True
    if not blocks or blocks == 1:
        return False
    B, h, n = matrix_shape(p, blocks)
    dealt = p_boxes(p, (B, h, n))
    return any(box.sizes[1] != h or (box.offsets[0], box.sizes[0]) != (d.offsets[0], d.sizes[0])
               for box, d in zip(view_boxes(p, blocks), dealt) if box.sizes[0])


def local_matrices(p: Tensor, values: Tensor) -> Tensor:
    """The entries of per-matrix values ``values`` (B·k, ...) (kept whole on every rank) for
    the matrices of p's view (in k row blocks: ``values`` has k entries per matrix of p's
    plain view) this rank holds part of: a split 3-D param's own experts, a row-split param's
    own blocks, else all of them."""
    if not isinstance(p, DTensor) or p.ndim not in (2, 3):
        return values
    blocks = values.shape[0] // matrix_shape(p)[0]
    box = my_view_box(p, blocks if blocks > 1 else None)
    return values.narrow(0, box.offsets[0], box.sizes[0])


def resolve_rank(rank: int | float, m: int, n: int) -> int:
    """``rank`` as an int (a float is a fraction of min(m, n)), capped at min(m, n)."""
    k = min(m, n)
    r = max(1, round(rank * k)) if isinstance(rank, float) else rank
    return min(r, k)
