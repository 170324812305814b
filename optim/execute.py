"""The executor: one step of the selected params, run over the planner's buckets.

For the params selected that have a gradient and elements (:meth:`Executor.step`):

1. every gradient is checked (sparse, complex, shape) before anything changes, so an error
   leaves every param and state untouched;
2. per group, the planner's buckets; where every param of a bucket already has state, the
   rule's ``_prepare`` runs (its work on the gradients that changes nothing) and names the
   tensor the non-finite check reads per entry;
3. :func:`screen`: the non-finite policy, for every group before any update;
4. per bucket the rule's ``_update``, on the states as the rule sees them (created from the
   declarations on first use; fp32 working views at a lower ``state_precision``, written
   back after) and on the weights as the rule sees them (fp32 working copies of bf16/fp16
   weights stored as ``master_weights`` says, :mod:`matrixopt.weights`; the one place
   where a step stores weights);
5. the fallback params, in one call at fp32, in chunks at a lower precision or with
   working copies of the weights.
"""
import functools
import itertools
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, NamedTuple, Protocol

import torch
from torch import Tensor

from matrixopt.kernels import host

from .distributed import agree_finite
from .matrices import entry_span, local, rows_of
from .plan import Bucket, Item, Limits, Planner, fallback_chunks, group_of
from .protocols import Fallback
from .report import warn_once
from .seeding import Span
from .state import BlockState, Declarations, RowState, precision_of
from .weights import ROUNDING_STEP, Masters, mode_of, stored


class MatrixRule(Protocol):
    """What the executor calls on a matrix rule (the optimizer subclass)."""

    def _prepare(self, group: dict, bucket: Bucket) -> tuple[list[Tensor], list | None]: ...

    def _update(self, group: dict, bucket: Bucket) -> None: ...


class GroupPlan(NamedTuple):
    """One group's share of a step: the selected ``indices`` (with a gradient and elements),
    its ``buckets`` of matrices, its ``fallback`` param indices, and per param index the
    tensors its non-finite check reads (``checked``)."""
    group: dict
    indices: list[int]
    buckets: list[Bucket]
    fallback: list[int]
    checked: dict[int, list[Tensor]]


class NonFinite:
    """The non-finite policy's record: ``skips``, params skipped so far (a param each step);
    ``warned``, the names already warned about."""

    def __init__(self):
        self.skips = 0
        self.warned: set[str] = set()


class Executor:
    """Runs ``rule`` (its ``_prepare`` and ``_update``) and ``fallback`` over the planner's
    buckets; ``name_of(group, i)`` names a param, ``place_of(group)`` gives a group's index in
    the optimizer (it seeds the stochastic rounding), ``nonfinite`` keeps the non-finite
    policy's record across steps."""

    def __init__(self, planner: Planner, declarations: Declarations, rule: MatrixRule, fallback: Fallback,
                 name_of: Callable[[dict, int], str], place_of: Callable[[dict], int], nonfinite: NonFinite):
        self.planner, self.declarations, self.rule, self.fallback = planner, declarations, rule, fallback
        self.name_of, self.place_of, self.nonfinite = name_of, place_of, nonfinite

    def step(self, state: dict, selection: list[tuple[dict, range | list[int]]], limits: Limits,
             fallback_chunk: int) -> None:
        """The step of the params ``selection`` names, as (group, indices in its params)
        pairs: those with a gradient and elements go the whole way (module docstring) and no
        other param is touched. ``state``: the optimizer's; ``fallback_chunk``: the most
        elements of one fallback call at a lower precision."""
        loads = {}   # process group -> FLOPs of matrix work per rank, this step
        work = [(group, indices) for group, indices in
                ((group, self._selected(group, candidates)) for group, candidates in selection) if indices]
        # Two passes: first every bucket's _prepare and the non-finite check on what it read,
        # for every group, then the updates.
        dealt = itertools.count()   # lanes are dealt to the buckets in plan order: alike on every rank
        plans = [self._plan(state, group, indices, loads, limits, dealt) for group, indices in work]
        verdicts = [self._screen(plan) for plan in plans]
        runs, fallbacks = [], []
        for plan, finite in zip(plans, verdicts):
            buckets, fallback = plan.buckets, plan.fallback
            if not all(finite.values()):
                kept = {id(plan.group["params"][i]) for i in plan.indices if finite[i]}
                buckets = [self.planner.keep(plan.group, bucket, kept, loads, limits) for bucket in buckets]
                fallback = [i for i in fallback if finite[i]]
            self._advance_rounding(state, plan.group, [plan.group["params"][i] for i in plan.indices if finite[i]])
            buckets = [bucket for bucket in buckets if bucket is not None]
            fallback = [plan.group["params"][i] for i in fallback]
            # Every state made here, in plan order (lanes would make it in any order): a state
            # dict lists params in that order, which ranks iterate alike (DCP, collectives).
            self.declarations.create(state, plan.group, [p for bucket in buckets for p in bucket.params] + fallback)
            runs += [(plan.group, bucket) for bucket in buckets]
            fallbacks += [(plan.group, fallback)] if fallback else []
        self._run_buckets(state, runs)
        for group, params in fallbacks:   # element-wise, no collective: after every bucket's
            self._fallback(state, group, params, fallback_chunk)

    def _run_buckets(self, state: dict, runs: list[tuple[dict, Bucket]]) -> None:
        """Each (group, bucket)'s update, in this thread; with distributed buckets dealt to
        more than one lane (:class:`~matrixopt.plan.Limits`), each further lane in a thread
        of its own, its buckets in plan order and its collectives in its own process group
        (:func:`~matrixopt.distributed.lane_group`), so one lane's exchanges overlap another's
        compute. Every lane is done when it returns."""
        lanes = defaultdict(list)
        for group, bucket in runs:
            lanes[bucket.lane if bucket.distributed else 0].append((group, bucket))
        others = [lanes[lane] for lane in sorted(lanes) if lane]
        if not others:
            self._lane(state, runs)
            return
        with ThreadPoolExecutor(len(others), thread_name_prefix="matrixopt-lane") as pool:
            futures = [pool.submit(self._lane, state, lane) for lane in others]
            self._lane(state, lanes.get(0, []))
            for future in futures:
                future.result()   # a lane's error, raised here

    def _lane(self, state: dict, runs: list[tuple[dict, Bucket]]) -> None:
        # Grad mode is per thread: a lane's thread sets the step's.
        with torch.no_grad():
            for group, bucket in runs:
                self.run_bucket(state, group, bucket)

    def _selected(self, group: dict, candidates) -> list[int]:
        """The candidates with a gradient and elements, their gradients checked (ValueError
        or TypeError naming the param) and the group's lr (set since construction)."""
        params = group["params"]
        indices = [i for i in candidates if params[i].grad is not None and params[i].numel()]
        if indices and isinstance(group["lr"], Tensor) and group["lr"].numel() != 1:
            raise ValueError("Invalid lr: a Tensor lr must have one element")
        for i in indices:
            check_grad(params[i], lambda: self.name_of(group, i), type(self.rule).__name__)
        return indices

    def _plan(self, state: dict, group: dict, indices: list[int], loads: dict, limits: Limits,
              dealt: Iterator[int]) -> GroupPlan:
        """The group's :class:`GroupPlan`, its buckets prepared where every param has state,
        each in lane ``next(dealt) % limits.lanes``."""
        layout = self.planner.layout(group, check=indices)
        params = group["params"]
        matrices = [params[i] for i in indices if layout.params[id(params[i])].matrix]
        fallback = [i for i in indices if not layout.params[id(params[i])].matrix]
        checked = {i: [local(params[i].grad)] for i in fallback}
        buckets, group_index = [], self.place_of(group)
        for items in self.planner.buckets(group, matrices, limits):
            bucket = self.planner.bucket(group, group_index, items, loads, limits, lane=next(dealt) % limits.lanes)
            tensors = bucket.grads
            # State is created only once the check has passed (an error leaves none behind).
            if all(state.get(p) for p in bucket.params):
                # Working views dequantize an entry only when read (_prepare reads bases, not
                # moments) and are dropped here: the update makes its own.
                views = self._states(items, self.declarations.working(group, bucket.params,
                                                                             [state[p] for p in bucket.params]))
                tensors, prepared = self.rule._prepare(group, bucket._replace(states=views))
                bucket = bucket._replace(prepared=prepared)
            for i, t in zip(bucket.places, tensors):
                checked.setdefault(i, []).append(t)
            buckets.append(bucket)
        return GroupPlan(group, indices, buckets, fallback, checked)

    def _advance_rounding(self, state: dict, group: dict, params: list[Tensor]) -> None:
        """Each param that will be stored with random rounding (``master_weights``) draws new
        bits this step: its counter advanced once, before any of its blocks or row chunks
        is stored (its state created now if this is its first step)."""
        params = [p for p in params if mode_of(group, p) is not None]
        for s in self.declarations.create(state, group, params):
            if ROUNDING_STEP in s:
                s[ROUNDING_STEP] += 1

    def _masters(self, state: dict, group: dict, params: list[Tensor], views: list[Tensor], low_views,
                 firsts: list[Span]) -> Masters:
        """The working copies of weight ``views`` of ``params`` (``low_views(j, t)``: entry j's
        view of a tensor shaped like its param's local shard; ``firsts``: where each view's
        entries lie in its whole param)."""
        places = self.planner.layout(group).places(params)
        g = self.place_of(group)
        return Masters(views, [stored(group, p, state[p], (g, i), functools.partial(low_views, j), first)
                               for j, (p, i, first) in enumerate(zip(params, places, firsts))])

    def _screen(self, plan: GroupPlan) -> dict[int, bool]:
        group = plan.group
        process_group = group_of([group["params"][i] for i in plan.indices], self.planner.replicated_group())
        return screen(group, plan.indices, plan.checked, process_group, self.name_of, self.nonfinite)

    @staticmethod
    def _states(items: list[Item], states: list) -> list:
        """Each item's state, or a block's view of it (:class:`~matrixopt.state.BlockState`)."""
        return [s if b is None else BlockState(s, b) for s, (_, b) in zip(states, items)]

    def run_bucket(self, state: dict, group: dict, bucket: Bucket,
                   rule: Callable[[dict, Bucket], None] | None = None) -> None:
        """``rule`` (default: the rule's ``_update``) on ``bucket`` with its states as the rule
        sees them (created on first use), stored again after; weights that could not be
        viewed as matrices are written back."""
        items = [Item(p, b) for p, b in zip(bucket.params, bucket.blocks)]
        views = self.declarations.working(group, bucket.params,
                                          self.declarations.create(state, group, bucket.params))
        masters = self._masters(state, group, bucket.params, bucket.weights,
                                lambda j, t: self.planner.views(group, [items[j]], [local(t)])[0][0],
                                self.planner.first_entries(group, items))
        (rule or self.rule._update)(group, bucket._replace(states=self._states(items, views), weights=masters.values,
                                                           grads=masters.gradients(bucket.grads)))
        masters.store()
        self._write_back(group, bucket.params, views)
        # as_matrices copies a param it cannot view (e.g. channels_last); write those back.
        for (p, b), w in zip(items, bucket.weights):
            t = local(p)
            if b is None and host.storage_id(w) != host.storage_id(t):
                t.copy_(w.reshape(t.shape))

    def _write_back(self, group: dict, params: list[Tensor], views: list, first_rows: list[int] | None = None):
        if precision_of(group) == "fp32":
            return
        g = self.place_of(group)
        seeds = [(g, i) for i in self.planner.layout(group).places(params)]
        self.declarations.write_back(group, seeds, params, views, first_rows)

    def _fallback(self, state: dict, group: dict, params: list[Tensor], chunk: int) -> None:
        """The fallback's update of ``params``: in one call at fp32; at a lower
        ``state_precision`` in chunks of at most ``chunk`` elements, so the fp32 working
        copies of their state stay that size: whole params together, and a larger param, if
        the fallback is ``elementwise``, in chunks of its rows (each call sees those rows of
        its weights, gradient and sharded state, and its counters as they were before the
        step). The update is element-wise, the int8 blocks lie inside rows and the bf16
        rounding is seeded per element: the chunks change nothing else. Params stored with
        working copies (``master_weights``) are chunked the same way at every precision."""
        states = self.declarations.create(state, group, params)
        if precision_of(group) == "fp32" and not any(mode_of(group, p) for p in params):
            calls = [list(zip(params, states))]
        else:
            calls = fallback_chunks(params, states, [self.declarations.stored(p, group) for p in params], chunk,
                                    getattr(self.fallback, "elementwise", False))
        for pieces in calls:
            chunk_params = [p for p, _ in pieces]
            views = self.declarations.working(group, chunk_params, [s for _, s in pieces])
            rows = [s.rows if isinstance(s, RowState) else None for _, s in pieces]
            starts = [0 if r is None else r.start for r in rows]
            masters = self._masters(state, group, chunk_params, [rows_of(local(p), r) for p, r in zip(chunk_params, rows)],
                                    lambda j, t: rows_of(local(t), rows[j]),
                                    [entry_span(p, row=r) for p, r in zip(chunk_params, starts)])
            self.fallback.update(group, masters.values,
                                 masters.gradients([rows_of(local(p.grad), r) for p, r in zip(chunk_params, rows)]),
                                 views)
            masters.store()
            self._write_back(group, chunk_params, views, starts)
            for _, s in pieces:
                if isinstance(s, RowState):
                    s.commit()


def check_grad(p: Tensor, name: Callable[[], str], owner: str) -> None:
    """TypeError (sparse, complex) or ValueError (shape) naming the param (``name()``) unless
    its gradient is one ``owner`` (the optimizer's class name) can step on."""
    if p.grad.is_sparse:
        raise TypeError(f"{owner} does not support sparse gradients: {name()}")
    if p.grad.is_complex():
        raise TypeError(f"{owner} does not support complex gradients: {name()}")
    if p.grad.shape != p.shape:
        raise ValueError(f"Gradient of {name()} has shape {tuple(p.grad.shape)}, expected {tuple(p.shape)}")


def screen(group: dict, indices: list[int], checked: dict[int, list[Tensor]], process_group,
           name_of: Callable[[dict, int], str], record: NonFinite) -> dict[int, bool]:
    """Whether each param's checked tensors are all finite; applies the group's non-finite
    policy (``nonfinite``) to those that are not: "raise" raises FloatingPointError naming
    them, "skip" counts them in ``record`` and warns once per param."""
    # One device sync for the whole group rather than one per param (a group may span
    # devices, so the flags meet on the first param's), and one fused reduction per tensor
    # rather than isfinite's four ops (:func:`total`).
    owners = [i for i in indices for _ in checked[i]]
    tensors = [t for i in indices for t in checked[i]]
    totals = [total(t) for t in tensors]
    dtype = functools.reduce(torch.promote_types, {s.dtype for s in totals}, torch.float32)
    device = tensors[0].device
    flags = torch.stack([s.to(device, dtype) for s in totals]).isfinite()
    if process_group is not None:  # every rank must skip the same params
        flags = agree_finite(flags, process_group)
    finite = dict.fromkeys(indices, True)
    for i, ok in zip(owners, host.read(flags, Tensor.tolist, [True] * len(owners))):
        finite[i] = finite[i] and ok
    bad = [i for i in indices if not finite[i]]
    if not bad:
        return finite
    names = [name_of(group, i) for i in bad]
    if group["nonfinite"] == "raise":
        raise FloatingPointError(f"Non-finite gradient in {', '.join(names)}")
    record.skips += len(bad)
    warn_once(record.warned, names,
              "Non-finite gradient in {}: skipped this step, its weights and state left "
              "unchanged (nonfinite='skip'; counted in nonfinite_skips; warned once per param)")
    return finite


def total(t: Tensor) -> Tensor:
    """A scalar that is NaN or inf exactly when Σt in fp32 (fp64 for fp64 t) is: when t holds
    a NaN or inf (+inf and −inf sum to NaN), or sums past 3.4e38 (fp32's range: a gradient
    that large in aggregate is treated as non-finite). A plain sum reduces 3.6× faster than
    Σ|t| on a CPU; not the 2-norm, as fast: Σt² overflows from |t| ~ 1e19, and a
    scale-invariant rule (ARO, Muon) steps on 1e30 fine.

    No copy of t: ``t.sum(dtype=torch.float32)`` of a bf16 or fp16 t converts all of t to
    fp32 first (a hidden temporary twice t's size). A bf16 t is summed as bf16, which
    accumulates in fp32 and rounds the total to bf16, whose exponent range is fp32's: it is
    inf where the fp32 sum is, and where that sum rounds past bf16's largest value, 3.39e38
    (0.3% below fp32's). fp16's range is small (65504): a healthy fp16 gradient can sum past
    it, so an fp16 t is read by its min and max instead, added in fp32: NaN or inf exactly
    when t holds a NaN or inf, as its fp32 sum is (|t| ≤ 65504: no fp16 tensor sums past
    3.4e38)."""
    if t.dtype != torch.float16:
        return t.sum()
    return torch.stack(t.aminmax()).sum(dtype=torch.float32) if t.numel() else t.new_zeros((), dtype=torch.float32)
