r"""Optimizer state stored in fewer bits: ``state_precision="fp32" | "bf16" | "int8"``.

A rule marks the state it accumulates in its declaration (:class:`~matrixopt.State`'s
``role``): :data:`MOMENT` for a signed moment (a momentum, Adam's M), :data:`SECOND_MOMENT`
for a non-negative one (Adam's V), :data:`BASIS` for a projection basis (recomputed at a
refresh, never accumulated). Everything else (counters, ARO's rotation, CoSO's history and
sketch, DCT's indices) keeps its declared dtype at every precision. Per param group:

- ``"fp32"`` (default): the declarations as they are; the step never comes here.
- ``"bf16"``: moments stored in bf16, written with **stochastic rounding**: x is rounded to
  one of its two bf16 neighbours a < x < b, to b with probability (x − a)/(b − a), so
  E[round(x)] = x and an increment far below bf16's resolution (a momentum's (1 − μ)·G,
  2⁻⁸ of M) still moves M in expectation instead of being rounded away every step. The
  random bits are a hash of (the param's place in the optimizer, the state's key, a
  rounding counter saved in the state, the element's global index), so a resumed run and
  an FSDP2 shard draw exactly the bits the uninterrupted single-process run draws
  (:func:`round_bf16`). Bases are stored in bf16 by round to nearest.
- ``"int8"``: moments of two or more dims stored as 8-bit codes with one fp32 scale per
  block of :data:`BLOCK` consecutive entries inside a row (a dim-0 slice, its trailing dims
  flattened; a row shorter than that, as a low-rank moment's r entries, is one block), so
  an FSDP2 ``Shard(0)`` split never cuts a block and the scales (shape (d₀, ⌈row/BLOCK⌉))
  shard like the param. The codes are stored under the state's key,
  the scales under ``"<key>.scale"`` (a name no rule declares, and no block index of
  :class:`~matrixopt.state.BlockState`'s ``"<key>.<b>"``; the suffix of a blocked param's
  state comes first, ``"exp_avg.0.scale"``). Bases are stored in bf16 (below). 1-D moments
  (biases, norm gains on the fallback) stay fp32: FSDP2 shards their only dim, so a block
  could not lie inside a rank's piece, and they are a negligible share of the state.

  Both codes are 8-bit dynamic exponent codes after bitsandbytes' dynamic map (uint8
  indices into a table of values, :class:`Code`; x/a rounded to the nearest value, a the
  block's max |x|): 2ⁱ⁺¹ linear steps in (0.1, 1]·10^(i+1−D) for i < D, plus 0 and 1, so
  small entries keep a few significant digits where a linear code stores them as 0.

  - Signed moments (:data:`MOMENT`): a sign and D = 6 decades (255 values,
    :data:`SIGNED_CODE`).
  - Second moments (:data:`SECOND_MOMENT`): D = 7 decades (256 values,
    :data:`SECOND_MOMENT_CODE`); a nonzero entry is never stored as 0 (it gets at least
    the smallest nonzero value, 3.25e-7·a), so Adam's √V never drops to ε where V is not 0.

  Chosen by this table: the error of Adam's direction M/(√V + ε) (ε = 1e-8), the quantity
  the step uses, at the last step and the worst over the run, with each candidate for one
  moment and the other kept fp32, then the chosen pair. ‖x̂ − x‖/‖x‖ over every entry of
  the 16 params of ≥ 2 dims (117,248 entries) of the ``train --quick`` model, trained 200
  steps by AdamW (β = (0.9, 0.95)) on Shakespeare, the stored moments updated from the same
  gradients as fp32 ones (``python -m benchmarks.quantization --quick``,
  benchmarks/results/quantization-cpu2-2026-12-01.md):

  ====================================  =======  =======  ===========  ===============
  storage                               M err    V err    direction    worst direction
  ====================================  =======  =======  ===========  ===============
  V int8, linear absmax                 0        0.0107   0.0729       0.211
  V int8, linear in √V                  0        0.0104   0.0211       0.0536
  V int8, dynamic code (chosen)         0        0.0163   0.0273       0.0364
  V int8, dynamic code of √V            0        0.0183   0.0270       0.0388
  M int8, linear absmax                 0.0156   0        0.0319       0.103
  M int8, sign + dynamic (chosen)       0.0223   0        0.0296       0.0362
  M, V int8, the chosen codes           0.0223   0.0163   0.0403       0.0484
  M, V bf16, stochastic rounding        0.0054   0.0070   0.0057       0.0061
  M, V bf16, round to nearest           0.0038   0.0052   0.0047       0.0049
  ====================================  =======  =======  ===========  ===============

  Linear codes are accurate on average but store the small entries of a block as 0: a V
  of 0 under a nonzero M makes a step of M/ε (linear V: a worst direction error of 0.21),
  and a linear M loses the small momenta (0.10). The dynamic codes keep the worst case
  within 1.5× of the last step's. (Round to nearest looks as good as stochastic rounding
  here, on AdamW's moments over 200 steps; its failure is the stall of increments below
  half a bf16 step, which ``tests/test_precision.py`` shows on a momentum.)

The update math always runs in fp32 (fp64 for fp64 params): per bucket of same-shape
matrices (and per chunk of the fallback's params or rows) the shell dequantizes the marked
state to fp32 temporaries (:func:`working`), the rule updates them, and the shell writes
them back (:func:`write_back`) — no fp32 copy of the whole model's state exists at any time.

Bases (GaLore's P, CoSO's GaLore bases) at "bf16" and "int8" are stored in bf16: they are
orthonormal, recomputed every ``update_proj_gap`` steps and only ever multiplied with
(never accumulated), so rounding them to bf16 costs a relative projection error of about
2⁻⁹ ≈ 2e-3 — what ``proj_dtype=torch.bfloat16`` already accepts for the matmuls, and far
below a stochastic gradient's noise (Q-GaLore, Zhang et al. 2024, trains with INT4
projections). ARO's rotation R stays fp32 at every precision: it is the warm start of the
next rotation's QR and the basis the base map f is applied in, and a bf16 R would be
orthogonal only to 2⁻⁸.
"""
import functools
import math
from collections.abc import MutableMapping
from typing import NamedTuple

import torch
from torch import Tensor

from matrixopt.kernels import host

from .seeding import Span, element_bits, rounding_seed

PRECISIONS = ("fp32", "bf16", "int8")
#: Roles a rule gives state in its declaration.
MOMENT, SECOND_MOMENT, BASIS = "moment", "second_moment", "basis"
ROLES = (MOMENT, SECOND_MOMENT, BASIS)
#: Entries per int8 block: one fp32 scale per 256 codes is 1.6% on top of the codes.
BLOCK = 256
#: The key of a state's int8 scales; the counter that seeds a param's stochastic rounding.
SCALE_SUFFIX, ROUNDING_STEP = ".scale", "rounding_step"


# -- int8 codes ------------------------------------------------------------------------------

class Code(NamedTuple):
    """An 8-bit code of values in [−1, 1]: ``values`` (ascending; at most 256) and the
    ``thresholds`` between neighbours: x/a (a: its block's max |x|) is stored as the index
    of the first value whose threshold is ≥ it, the nearest value."""
    values: Tensor
    thresholds: Tensor


def _dynamic_magnitudes(decades: int) -> list[float]:
    """0, 1 and 2ⁱ⁺¹ linear steps in (0.1, 1]·10^(i+1−decades) for i < decades: 2^(decades+1)
    values spanning ``decades`` decades, the finest steps at the top (bitsandbytes' dynamic map)."""
    values = [0.0, 1.0]
    for i in range(decades):
        edges = torch.linspace(0.1, 1.0, 2 ** (i + 1) + 1, dtype=torch.float64)
        values += (10.0 ** (i + 1 - decades) * (edges[:-1] + edges[1:]) / 2).tolist()
    return values


def code_of(values) -> Code:
    """The code of ``values``, rounding to the nearest."""
    values = torch.tensor(sorted(values), dtype=torch.float64)
    return Code(values.float(), ((values[:-1] + values[1:]) / 2).float())


#: Signed moments: a sign and a 7-bit dynamic code of |x|/a (6 decades; 255 values).
SIGNED_CODE = code_of(set(_dynamic_magnitudes(6)) | {-v for v in _dynamic_magnitudes(6) if v})
#: Non-negative second moments: an 8-bit dynamic code of x/a (7 decades; 256 values).
SECOND_MOMENT_CODE = code_of(_dynamic_magnitudes(7))


def _blocks(x: Tensor) -> Tensor:
    """x (d₀, ...) as (d₀, ⌈row/b⌉, b), a row being a dim-0 slice flattened, zero-padded; b is
    BLOCK, or the row's length when shorter (a low-rank moment's row of r entries)."""
    row = math.prod(x.shape[1:])
    size = max(1, min(BLOCK, row))
    rows = x.reshape(x.shape[0], row)   # explicit sizes: an empty FSDP2 shard has 0 rows
    return torch.nn.functional.pad(rows, (0, -row % size)).view(x.shape[0], -(-row // size), size)


def _unblock(blocks: Tensor, shape) -> Tensor:
    return blocks.reshape(shape[0], blocks.shape[1] * blocks.shape[2])[:, :math.prod(shape[1:])].reshape(shape)


@host.cached
def _tables(code: Code, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For :func:`nearest`: per bf16 bit pattern t (the top 16 bits of an fp32), the count of
    thresholds below t; and the thresholds padded with +inf after and −inf before."""
    patterns = torch.arange(1 << 16, dtype=torch.int32)
    patterns = torch.where(patterns >= 1 << 15, patterns - (1 << 16), patterns).to(torch.int16)
    below = torch.searchsorted(code.thresholds, patterns.view(torch.bfloat16).float()).to(torch.int32)
    inf = torch.tensor([math.inf])
    return (below.to(device), torch.cat([code.thresholds, inf]).to(device),
            torch.cat([-inf, code.thresholds]).to(device))


def nearest(u: Tensor, code: Code) -> Tensor:
    """``torch.searchsorted(code.thresholds, u)`` (int32), by table: the count of thresholds
    below u's bf16 truncation t, corrected by the at most one threshold between t and u (t
    is u rounded toward 0 by < 2⁻⁷ relative, and neighbouring thresholds of these codes are
    ≥ 1.8 bf16 steps apart). A fraction of searchsorted's cost and no int64 temporaries."""
    below, after, before = _tables(code, u.device)
    index = _lookup(below, (u.view(torch.int32) >> 16) & 0xFFFF)
    return index + (_lookup(after, index) < u).to(torch.int32) - (_lookup(before, index) >= u).to(torch.int32)


def _lookup(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for a 1-D table and int32 indices, by ``index_select`` (on a CPU 5×
    faster than advanced indexing, which converts the indices to int64 first)."""
    return table.index_select(0, index.reshape(-1)).view(index.shape)


#: Entries (de)quantized at a time, in whole rows: the codes' intermediates (the padded
#: blocks, |x|, x/a, the table lookups: several temporaries per entry) then take tens of MB
#: rather than several copies of the state tensor (on a 6.3M-entry head, ~200 MB). Blocks lie
#: inside rows, so the result is the same. 2^20 rather than 2^18: a 7B model's int8 state is
#: 6.7G entries, ~35 ops per chunk — 2^18 made ~900k kernel launches per step (seconds of
#: launch overhead on a GPU), 2^20 a quarter of that, for ~30 MB more temporaries.
CHUNK = 1 << 20


def _row_chunks(x: Tensor) -> list[slice]:
    """Slices of x's dim 0 of about :data:`CHUNK` entries each (at least one row)."""
    rows = max(1, CHUNK // max(1, math.prod(x.shape[1:])))
    return [slice(r, r + rows) for r in range(0, x.shape[0], rows)] or [slice(0, 0)]


def quantize(x: Tensor, code: Code) -> tuple[Tensor, Tensor]:
    """uint8 indices into ``code`` of x/a per block and the blocks' scales a = max |x|; for
    a non-negative code (values[0] = 0) a nonzero x never gets index 0. In row chunks of
    :data:`CHUNK` entries."""
    chunks = _row_chunks(x)
    if len(chunks) == 1:
        return _quantize(x, code)
    row = math.prod(x.shape[1:])
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty((x.shape[0], -(-row // min(BLOCK, row))), dtype=x.dtype, device=x.device)
    for rows in chunks:
        codes[rows], scale[rows] = _quantize(x[rows], code)
    return codes, scale


def _quantize(x: Tensor, code: Code) -> tuple[Tensor, Tensor]:
    blocks = _blocks(x)
    scale = blocks.abs().amax(-1)
    normalized = blocks / torch.where(scale > 0, scale, 1.0)[..., None]
    index = nearest(normalized.contiguous(), code)
    if host.read(code.values, lambda values: bool(values[0] == 0), False):
        index = torch.maximum(index, (normalized > 0).to(torch.int32))
    return _unblock(index.to(torch.uint8), x.shape), scale


def dequantize(codes: Tensor, scale: Tensor, code: Code) -> Tensor:
    """The values of ``codes`` (uint8 indices into ``code``) times their blocks' ``scale``, as
    a dense tensor (like the state it stands for: fused kernels take no strides). In row
    chunks of :data:`CHUNK` entries."""
    chunks = _row_chunks(codes)
    if len(chunks) == 1:
        return _dequantize(codes, scale, code)
    out = torch.empty(codes.shape, dtype=torch.promote_types(code.values.dtype, scale.dtype), device=codes.device)
    for rows in chunks:
        out[rows] = _dequantize(codes[rows], scale[rows], code)
    return out


@host.cached
def _values(code: Code, device: torch.device) -> Tensor:
    return code.values.to(device)


def _dequantize(codes: Tensor, scale: Tensor, code: Code) -> Tensor:
    values = _lookup(_values(code, codes.device), _blocks(codes).int())
    return _unblock(values * scale[..., None], codes.shape).contiguous()


def code_for(role: str) -> Code:
    return SIGNED_CODE if role == MOMENT else SECOND_MOMENT_CODE


def zero_codes(role: str):
    """The ``init`` of the codes of a state of ``role``: every entry the code's 0."""
    zero = host.read(code_for(role).thresholds, lambda t: int(torch.searchsorted(t, torch.tensor(0.0))), 0)
    return lambda shape, dtype, device: torch.full(shape, zero, dtype=dtype, device=device)


# -- bf16 with stochastic rounding -----------------------------------------------------------

def round_bf16(x: Tensor, seed: int, offset: int | Span = 0) -> Tensor:
    """x (fp32) stochastically rounded to bf16 (see the module docstring).

    The 16 bits bf16 drops are replaced: a random 16-bit r is added to x's bit pattern and
    the low 16 bits are cleared, which rounds |x| up with probability (low bits)/2¹⁶. r of
    entry i is :func:`~matrixopt.seeding.element_bits` of its global index (``offset``: the
    index of x's first entry in the whole tensor, for a shard of rows; a
    :class:`~matrixopt.seeding.Span` for a shard of columns) and ``seed``.
    """
    noise = element_bits(x.numel(), seed, offset, x.device)
    bits = (x.float().contiguous().view(torch.int32).reshape(-1) + noise) & -0x10000
    return bits.view(torch.float32).view(x.shape).to(torch.bfloat16)


# -- declarations and the working state -------------------------------------------------------

def storage(spec, precision: str) -> str | None:
    """How state ``spec`` is stored at ``precision``: "int8" (codes and scales), "bf16", or
    None (as declared)."""
    if precision == "fp32" or spec.role not in ROLES or spec.shape is None:
        return None
    if precision == "int8" and spec.role != BASIS:
        return "int8" if len(spec.shape) >= 2 else None
    return "bf16"


def stochastic(spec, precision: str) -> bool:
    """Whether state ``spec`` is written with stochastic rounding at ``precision``."""
    return storage(spec, precision) == "bf16" and spec.role != BASIS


def stored(declared: dict, precision: str, counter) -> dict:
    """The declaration as stored at ``precision``: marked moments as bf16, or as int8 codes
    (int8 for :data:`MOMENT`, uint8 for :data:`SECOND_MOMENT`) under their key plus fp32
    scales under ``key + SCALE_SUFFIX``; bases as bf16; a :data:`ROUNDING_STEP` counter
    (``counter``) when some state is stochastically rounded."""
    if precision == "fp32":
        return declared
    out = {}
    for key, spec in declared.items():
        kind = storage(spec, precision)
        if kind == "int8":
            rows = -(-math.prod(spec.shape[1:]) // BLOCK)
            out[key] = spec._replace(dtype=torch.uint8, init=zero_codes(spec.role))
            out[key + SCALE_SUFFIX] = spec._replace(shape=(spec.shape[0], rows), dtype=torch.float32, init=None,
                                                    role=None)
        elif kind == "bf16":
            out[key] = spec._replace(dtype=torch.bfloat16)
        else:
            out[key] = spec
    if any(stochastic(spec, precision) for spec in declared.values()):
        out[ROUNDING_STEP] = counter
    return out


class Working(MutableMapping):
    """A param's state as its rule sees it (``declared``: the rule's declaration): each entry
    of ``pending`` (key → how it is stored: "int8" or "bf16") is read as a temporary of its
    declared dtype, dequantized (or upcast) on first access and kept in ``temporaries``;
    every other entry is the stored state's, read and written through. The int8 scales and
    the rounding counter are not seen."""

    def __init__(self, state: dict, declared: dict, pending: dict[str, str], dtype_of):
        self.state, self.declared, self.temporaries = state, declared, {}
        self._pending, self._dtype_of = pending, dtype_of
        self._hidden = {ROUNDING_STEP} | {key + SCALE_SUFFIX for key, kind in pending.items() if kind == "int8"}

    def __getitem__(self, key):
        if key in self._pending:
            kind, spec = self._pending.pop(key), self.declared[key]
            value = self.state[key]
            if kind == "int8":
                value = dequantize(value, self.state[key + SCALE_SUFFIX], code_for(spec.role))
            self.temporaries[key] = value.to(self._dtype_of(spec))
        return self.temporaries[key] if key in self.temporaries else self.state[key]

    def __setitem__(self, key, value):
        if key in self._pending or key in self.temporaries:
            self._pending.pop(key, None)
            self.temporaries[key] = value
        else:
            self.state[key] = value

    def __delitem__(self, key):
        raise TypeError("a rule does not delete its declared state")

    def __iter__(self):
        return (k for k in self.state if k not in self._hidden)

    def __len__(self):
        return sum(1 for _ in self)


def working(state: dict, declared: dict, precision: str, p: Tensor) -> Working:
    """The rule's view of param ``p``'s ``state`` (stored by :func:`stored` from
    ``declared``): each entry stored in fewer bits read as a temporary of its declared dtype
    (for ``p``), made when first read."""
    pending = {key: kind for key, spec in declared.items()
               if (kind := storage(spec, precision)) is not None and key in state}
    return Working(state, declared, pending, lambda spec: spec.dtype_for(p))


def write_back(view: Working, precision: str, place: tuple, offsets: dict[str, Span]) -> None:
    """Store the temporaries of ``view`` (the entries the rule read) into its state: int8
    requantized, bf16 moments stochastically rounded (seeded by ``place``, the key, and the state's rounding counter,
    advanced here when the view holds such a moment; ``offsets``: key → where the local piece's entries lie), bases
    rounded to nearest. In place, so each state keeps its storage."""
    state, declared = view.state, view.declared
    if ROUNDING_STEP in state and any(stochastic(declared[key], precision) for key in view.temporaries):
        state[ROUNDING_STEP] += 1
    for key, value in view.temporaries.items():
        spec = declared[key]
        if storage(spec, precision) == "int8":
            codes, scale = quantize(value, code_for(spec.role))
            state[key].copy_(codes)
            state[key + SCALE_SUFFIX].copy_(scale)
        elif stochastic(spec, precision):
            seed = rounding_seed(*place, key, state[ROUNDING_STEP])
            state[key].copy_(round_bf16(value, seed, offsets.get(key, 0)))
        else:
            state[key].copy_(value)
