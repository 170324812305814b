"""How params are seen as matrices: the (B, m, n) views, row blocks, shards.

- 2-D (m, n) as is; 3-D (E, m, n) as E independent matrices (stacked MoE experts); N-D with
  N ≥ 4 as conv kernels (out, in·k₁·k₂…); 1-D (routed to a matrix rule with ``matrix=True``)
  as a single row (1, n).
- A group's ``blocks`` splits each matrix's rows into blocks, each a matrix of its own:
  k equal blocks are a free (B·k, m/k, n) view; blocks of unequal sizes are separate
  matrices (their state is kept per block).
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


def block_sizes(name: str, value, p: Tensor) -> list[int] | None:
    """A group's ``blocks`` for ``p`` as row sizes (None: not split); ValueError naming the
    param unless they split the rows of a 2-D or 3-D, non-DTensor matrix (unequal sizes: of a
    2-D one)."""
    if value is None:
        return None
    sizes = value
    if isinstance(value, int) and not isinstance(value, bool):
        sizes = [p.shape[-2] // value] * value if p.ndim in (2, 3) and value >= 1 else [0]
    ok = (isinstance(sizes, (list, tuple)) and sizes and p.ndim in (2, 3) and not isinstance(p, DTensor)
          and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
          and sum(sizes) == p.shape[-2] and (len(set(sizes)) == 1 or p.ndim == 2))
    if not ok:
        raise ValueError(f"Invalid blocks for {name}: {value!r}; expected a count k or row sizes splitting "
                         f"the rows of a 2-D (unequal sizes) or 3-D (equal ones), non-DTensor param of "
                         f"shape {tuple(p.shape)}")
    return list(sizes)


def equal_blocks(sizes: list[int] | None) -> int | None:
    """The count of a split into equal row blocks (None: not split, or unequal blocks)."""
    return len(sizes) if sizes and len(set(sizes)) == 1 else None


def unequal_blocks(sizes: list[int] | None) -> list[int] | None:
    """The row sizes of a split into blocks of different sizes (None otherwise)."""
    return sizes if sizes and len(set(sizes)) > 1 else None


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
