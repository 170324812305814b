r"""Lean weights: low-precision params that keep the updates an fp32 master would
(``master_weights``).

A bf16 weight updated as ``W ← round(W − η·U)`` loses every update below half its ulp
(2⁻⁹·|W|): rounding to nearest gives back W itself, step after step. Per param group,
``master_weights`` says how the shell stores a bf16 or fp16 param after its rule's update.
With every option but "nearest" the rule updates an fp32 working copy x of the weight (one
bucket, or one fallback chunk, at a time: never the whole model at once), which the shell
then stores:

- ``"nearest"``: as torch.optim: no working copy, the rule updates W in W's dtype, each
  operation rounding to nearest.
- ``"stochastic"`` (the default): x rounded stochastically to W's dtype: to one of its two neighbours
  a ≤ x ≤ b, to b with probability (x − a)/(b − a), so E[W] = x and an update far below the
  ulp still moves W in expectation. No state but a counter: the random bits are a hash of
  the param's place, the counter and the element's global index
  (:func:`~matrixopt.seeding.element_bits`), so a resumed run and every FSDP2 shard round
  exactly as the uninterrupted single process.
- ``"int16"`` (bf16 params): W is the high half of an fp32 master whose low half is the
  state ``weight_low_bits`` (int16, sharded like the param). With P the int32 bit pattern
  of x::

      W = (P + 2¹⁵) >> 16          (x to the nearest bf16, ties away from 0)
      L = P − (W << 16) ∈ [−2¹⁵, 2¹⁵)

  and x = (W << 16) + L exactly: W moves as an fp32 master copy's rounding would, bit for
  bit, for 2 bytes per entry (an fp32 master copy: 4).
- ``"int8"`` (bf16 params): a 24-bit master. P is first rounded stochastically to a
  multiple of 2⁸ (P₂₄ = (P + r) >> 8, r eight random bits), then split as above:
  W = (P₂₄ + 2⁷) >> 8, L = P₂₄ − (W << 8) ∈ [−2⁷, 2⁷) (int8, 1 byte per entry). The master
  keeps 16 significant bits: each write's error is below 2⁻¹⁵·|x| and has mean 0 (bf16's
  own rounding: up to 2⁻⁹·|x|).

The shell (:class:`matrixopt.execute.Executor`) is the one place that does this, for the
matrix rules and the fallback alike; rules never see the stored weights. A param whose
gradient is skipped as non-finite is not written: W and its low bits stay as they were.
fp32 and fp64 params are their own masters: every option leaves them as they are. int8 and
int16 need bf16 params (the high half of an fp32 pattern is a bf16); fp16 params take
"nearest" or "stochastic".
"""
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from .distributed import dtensor_like
from .matrices import local
from .seeding import Span, element_bits, rounding_seed
from .precision import round_bf16
from .state import State, counter

MODES = ("nearest", "stochastic", "int8", "int16")
#: The default of every optimizer's ``master_weights``: on ``train --quick`` (five seeds, bf16
#: autocast) bf16 weights rounded to nearest ended 0.5-0.9% above fp32 params for every
#: optimizer at AdamW's lr (2.2-2.4% at a tenth of it), stochastically rounded ones within 0.09%
#: (0.012%), at no extra state (benchmarks/results/lean-weights/).
DEFAULT_MASTER_WEIGHTS = "stochastic"
#: The modes that draw random bits (a counter per param), and those that keep low bits.
ROUNDS, LOW_BITS_DTYPE = ("stochastic", "int8"), {"int8": torch.int8, "int16": torch.int16}
#: State keys: the low bits of the master; the counter that seeds the weight's rounding.
LOW_BITS, ROUNDING_STEP = "weight_low_bits", "weight_rounding_step"
KEYS = (LOW_BITS, ROUNDING_STEP)
#: Entries a conversion works on at a time (see :func:`_pieces`).
CHUNK = 1 << 20
LOW_PRECISION = (torch.bfloat16, torch.float16)


def mode_of(group: dict, p: Tensor) -> str | None:
    """How ``p`` is stored after an update in ``group`` (None: as torch.optim would — the
    group's ``master_weights`` is "nearest", absent as in groups saved before it existed, or
    p is fp32/fp64)."""
    mode = group.get("master_weights", "nearest")
    return None if mode == "nearest" or p.dtype not in LOW_PRECISION else mode


def working_dtype(group: dict, p: Tensor) -> torch.dtype:
    """The dtype ``p``'s rule works in: fp32 for a weight stored from a working copy."""
    return torch.float32 if mode_of(group, p) else p.dtype


def check(name: str, p: Tensor, group: dict) -> None:
    """ValueError naming the param unless its dtype can be stored as its group's
    ``master_weights`` says."""
    mode = mode_of(group, p)
    if mode in LOW_BITS_DTYPE and p.dtype != torch.bfloat16:
        raise ValueError(f"Invalid master_weights for {name}: {mode!r} keeps the low half of an fp32 master "
                         f"under a bf16 param, and this one is {p.dtype}; use 'stochastic' or 'nearest'")


def declared(p: Tensor, group: dict) -> dict[str, State]:
    """The state ``p``'s storage adds to its rule's: the low bits (int8/int16), the rounding
    counter (stochastic/int8)."""
    mode = mode_of(group, p)
    out = {}
    if mode in ROUNDS:
        out[ROUNDING_STEP] = counter()
    if mode in LOW_BITS_DTYPE:
        out[LOW_BITS] = State(tuple(p.shape), LOW_BITS_DTYPE[mode], sharded=True)
    return out


class Stored(NamedTuple):
    """How one weight view is stored: ``mode``, its ``low`` bits' view (int8/int16), the
    rounding ``seed`` and ``offset`` (where the view's entries lie in the whole param: the
    global index of its first, or a :class:`~matrixopt.seeding.Span`)."""
    mode: str
    low: Tensor | None
    seed: int
    offset: int | Span


def stored(group: dict, p: Tensor, state: dict, place: tuple, low_view, offset: int | Span) -> Stored | None:
    """The :class:`Stored` of a view of ``p`` (None: as torch.optim); ``state``: p's state,
    ``place``: (group index, index in group), ``low_view``: the same view of a tensor shaped
    like p's local shard, ``offset``: where its entries lie in the whole param."""
    mode = mode_of(group, p)
    if mode is None:
        return None
    low = low_view(state[LOW_BITS]) if mode in LOW_BITS_DTYPE else None
    seed = rounding_seed(*place, "weight", state[ROUNDING_STEP]) if mode in ROUNDS else 0
    return Stored(mode, low, seed, offset)


@torch.no_grad()
def master_weight(p: Tensor, groups: list[dict], state: dict) -> Tensor:
    """The value param ``p`` (of one of ``groups``; ``state``: the optimizer's) stands for, in
    fp32 (fp64 stays fp64), as a new tensor: its master where its low bits are kept, else the
    weight itself; for a DTensor param a DTensor placed like it."""
    group = next((g for g in groups if any(q is p for q in g["params"])), None)
    if group is None:
        raise ValueError(f"master_weight: the tensor of shape {tuple(p.shape)} is not a param of this optimizer")
    mode, saved, weight = mode_of(group, p), state.get(p, {}), local(p)
    if mode in LOW_BITS_DTYPE and LOW_BITS in saved:
        value = master(weight, Stored(mode, saved[LOW_BITS], 0, 0))
    else:
        value = weight.detach().to(torch.promote_types(weight.dtype, torch.float32), copy=True)
    return dtensor_like(p, value) if isinstance(p, DTensor) else value


def _pieces(*tensors: Tensor):
    """(first entry, flat pieces) of same-shape contiguous ``tensors``, :data:`CHUNK` entries
    at a time: the integer temporaries of a conversion stay a few MB whatever the bucket."""
    flat = [t.view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), CHUNK):
        yield start, [f[start:start + CHUNK] for f in flat]


def master(weight: Tensor, how: Stored) -> Tensor:
    """The fp32 master of a stored weight view (a new tensor)."""
    if how.low is None:
        return weight.float()
    out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    shift = 8 if how.mode == "int8" else 0
    for _, (x, w, low) in _pieces(out, weight.contiguous(), how.low.contiguous()):
        x.view(torch.int32).copy_((w.view(torch.int16).to(torch.int32) << 16) + (low.to(torch.int32) << shift))
    return out


def store(x: Tensor, weight: Tensor, how: Stored) -> None:
    """Store the fp32 master ``x`` into ``weight`` (and its low bits) as ``how`` says; a
    strided view (a column block) through contiguous copies, copied into it after."""
    views = (weight,) if how.low is None else (weight, how.low)
    stores = [t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format) for t in views]
    _store(x.contiguous(), how, *stores)
    for view, stored_ in zip(views, stores):
        if stored_ is not view:
            view.copy_(stored_)


def _store(x: Tensor, how: Stored, *targets: Tensor) -> None:
    """:func:`store` into contiguous ``targets`` (the weight, and its low bits if kept)."""
    span = how.offset if isinstance(how.offset, Span) else Span(how.offset)
    for start, (x, weight, *low) in _pieces(x, *targets):
        offset = span.after(start)
        if how.mode == "stochastic":
            weight.copy_(round_stochastic(x, weight.dtype, how.seed, offset))
            continue
        bits, shift = x.view(torch.int32), 16
        if how.mode == "int8":
            bits, shift = (bits + (element_bits(x.numel(), how.seed, offset, x.device) & 0xFF)) >> 8, 8
        high = (bits + (1 << (shift - 1))) >> shift
        low[0].copy_(bits - (high << shift))
        weight.copy_(high.to(torch.int16).view(torch.bfloat16))


def round_stochastic(x: Tensor, dtype: torch.dtype, seed: int, offset: int | Span = 0) -> Tensor:
    """x (fp32) stochastically rounded to ``dtype`` (bf16 or fp16), unbiased, the bits drawn
    per element's global index (see the module docstring)."""
    if dtype == torch.bfloat16:
        return round_bf16(x, seed, offset)
    # fp16: the ulp of |x| in [2^(e-1), 2^e) is 2^(e-11), at least 2^-24 (subnormals); x/ulp
    # and its fraction are exact in fp32, and the fraction (≤ 13 bits) compares exactly
    # with a 16-bit uniform draw.
    ulp = torch.ldexp(torch.ones_like(x), (torch.frexp(x).exponent - 11).clamp(min=-24))
    q = x / ulp
    low = q.floor()
    up = element_bits(x.numel(), seed, offset, x.device).view(x.shape).float() / 65536 < q - low
    return ((low + up) * ulp).to(dtype)


class Masters:
    """The fp32 working copies of weight views for a rule: ``values`` (a view itself where
    its param is stored as torch.optim would), stored back by :meth:`store`. The rule sees
    what it would see for fp32 params: fp32 weights and, through :meth:`gradients`, fp32
    gradients (so "int16" is an fp32 master copy bit for bit, whatever the rule does with
    a gradient's dtype)."""

    def __init__(self, views: list[Tensor], how: list[Stored | None]):
        self.views, self.how = views, how
        self.values = [w if h is None else master(w, h) for w, h in zip(views, how)]

    def gradients(self, grads: list[Tensor] | None) -> list[Tensor] | None:
        """``grads`` (of the views, in order) as the rule sees them: fp32 where the weight's is."""
        return grads and [g if h is None else g.float() for g, h in zip(grads, self.how)]

    def store(self) -> None:
        for w, x, h in zip(self.views, self.values, self.how):
            if h is not None:
                store(x, w, h)
