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
  it (:func:`matrixopt.distributed.p_boxes`).
"""
import math

from torch import Tensor
from torch.distributed.tensor import DTensor

from .distributed import Box, my_box, p_boxes


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


def view_boxes(p: Tensor) -> list[Box] | None:
    """Per rank, the box of ``p``'s (B, m, n) view (see :func:`matrix_shape`) it holds (None:
    a plain tensor, the same whole on every rank)."""
    if not isinstance(p, DTensor):
        return None
    boxes = []
    for (offsets, sizes) in p_boxes(p):
        if p.ndim == 1:
            offsets, sizes = (0, 0, offsets[0]), (1, 1, sizes[0])
        elif p.ndim == 2:
            offsets, sizes = (0, *offsets), (1, *sizes)
        elif p.ndim > 3:   # split on dim 0 only (check_placement)
            offsets, sizes = (0, offsets[0], 0), (1, sizes[0], math.prod(p.shape[1:]))
        boxes.append(Box(tuple(offsets), tuple(sizes)))
    return boxes


def as_matrices(t: Tensor, blocks: int | None = None) -> Tensor:
    """``t`` viewed (or, if not viewable, copied) as (B, m, n) (see :func:`matrix_shape`)."""
    return t.reshape(matrix_shape(t, blocks))


#: A group's ``block_axis`` values: the side of each matrix its ``blocks`` split.
BLOCK_AXES = ("rows", "columns")


def block_axis(group: dict) -> str:
    """The side a group's ``blocks`` split: "rows" (the default) or "columns"."""
    return group.get("block_axis") or "rows"


def block_sizes(name: str, value, p: Tensor, axis: str = "rows") -> list[int] | None:
    """A group's ``blocks`` for ``p`` as sizes along ``axis`` (None: not split); ValueError
    naming the param unless they split the rows of a 2-D (unequal sizes) or 3-D (equal ones)
    non-DTensor matrix, or the columns of a 2-D or 3-D non-DTensor one."""
    if value is None:
        return None
    dim = -2 if axis == "rows" else -1
    sizes = value
    if isinstance(value, int) and not isinstance(value, bool):
        sizes = [p.shape[dim] // value] * value if p.ndim in (2, 3) and value >= 1 else [0]
    ok = (isinstance(sizes, (list, tuple)) and sizes and p.ndim in (2, 3) and not isinstance(p, DTensor)
          and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
          and sum(sizes) == p.shape[dim] and (len(set(sizes)) == 1 or p.ndim == 2 or axis == "columns"))
    if not ok:
        raise ValueError(f"Invalid blocks for {name}: {value!r} (block_axis {axis!r}); expected a count k or "
                         f"sizes splitting the {axis} of a 2-D or 3-D (rows: of equal sizes), non-DTensor param "
                         f"of shape {tuple(p.shape)}")
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


def separate_parts(group: dict, p: Tensor) -> list[Tensor] | None:
    """``p``'s blocks under ``group``'s ``blocks`` and ``block_axis`` that are separate
    matrices (:func:`separate_blocks`), each a view of ``p.detach()`` (:func:`block_of`);
    None if it has none."""
    axis = block_axis(group)
    sizes = separate_blocks(block_sizes("blocks", group.get("blocks"), p, axis), axis)
    return sizes and [block_of(p.detach(), sizes, b, axis) for b in range(len(sizes))]


def block_matrices(t: Tensor, sizes: list[int], b: int, axis: str) -> Tensor:
    """Block ``b`` of ``t`` as its (B, m, n) view (:func:`block_of`)."""
    block = block_of(t, sizes, b, axis)
    return block if block.ndim == 3 else block.unsqueeze(0)


def block_offset(p: Tensor, sizes: list[int], b: int, axis: str) -> int:
    """A global index for the first entry of ``p``'s block ``b``, its entries' indices
    following on from it (a column block's are not p's own, but the blocks' ranges are
    disjoint): what stochastic rounding draws its bits by."""
    if axis == "rows":
        return (first_row(p) + sum(sizes[:b])) * math.prod(p.shape[1:])
    return sum(sizes[:b]) * (p.numel() // p.shape[-1])


def local(t: Tensor) -> Tensor:
    """The rank's shard of a DTensor; a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def rows_of(t: Tensor, rows: slice | None) -> Tensor:
    """Rows ``rows`` of t (None: all of t)."""
    return t if rows is None else t[rows]


def first_row(p: Tensor) -> int:
    """The global index of the first row of this rank's piece of ``p`` (0 for a plain tensor)."""
    return my_box(p).offsets[0] if isinstance(p, DTensor) else 0


def splits_columns(p: Tensor) -> bool:
    """Whether some rank holds only part of the columns of ``p``'s (B, m, n) view (its last
    dim; a 1-D param's only one): a right projection G·V then sums over ranks."""
    return isinstance(p, DTensor) and any(b.sizes[-1] != p.shape[-1] for b in p_boxes(p) if not b.empty)


def local_matrices(p: Tensor, values: Tensor) -> Tensor:
    """The entries of per-matrix values ``values`` (B, ...) (kept whole on every rank) for the
    matrices this rank holds part of: a split 3-D param's own experts, else all B."""
    if not isinstance(p, DTensor) or p.ndim != 3:
        return values
    box = my_box(p)
    return values.narrow(0, box.offsets[0], box.sizes[0])


def resolve_rank(rank: int | float, m: int, n: int) -> int:
    """``rank`` as an int (a float is a fraction of min(m, n)), capped at min(m, n)."""
    k = min(m, n)
    r = max(1, round(rank * k)) if isinstance(rank, float) else rank
    return min(r, k)
