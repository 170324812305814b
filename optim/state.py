"""Declared state: what each param's optimizer state is, and everything derived from that.

A rule (and the fallback) declares a param's state once, name → :class:`State`; the group's
``state_precision`` turns that into the declaration *as stored*
(:func:`matrixopt.precision.stored`). From the stored declaration, with no shape comparison
anywhere, this module derives:

- creation on a param's first step (:meth:`Declarations.create`);
- the rule's fp32 working view at a lower precision and the write-back after the update
  (:meth:`Declarations.working`, :meth:`Declarations.write_back`);
- the load-time checks and dtypes (:meth:`Declarations.check_saved`,
  :meth:`Declarations.load`);
- DTensors for ``torch.distributed.checkpoint`` (:meth:`Declarations.as_dtensors`);
- the bytes held (:func:`storage_bytes`).
"""
from collections.abc import MutableMapping
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from matrixopt.kernels import host

from .distributed import dtensor_like, my_box
from .matrices import entry_span, local
from .precision import SCALE_SUFFIX, stored, working, write_back
from .routing import BLOCKS, KEY as ROUTED

#: State dtype policies besides a fixed dtype: the param's own, or at least fp32 (fp64 for
#: fp64 params).
PARAM_DTYPE, AT_LEAST_FP32 = "param", "at_least_fp32"


class State(NamedTuple):
    """One entry of a param's optimizer state, as a rule declares it.

    ``shape``: the global shape as stored (``None``: a Python int counter, e.g. Adam's step).
    ``dtype``: a torch dtype, :data:`PARAM_DTYPE` or :data:`AT_LEAST_FP32`.
    ``sharded``: element-wise state split like a DTensor param: each rank holds its piece
    of the global ``shape`` placed like the param (:func:`~matrixopt.distributed.my_box`):
    of the param's shape, the param's piece; of another shape whose dim 0 is the param's
    (low-rank moments, int8 scales), the param's rows (and, for int8 scales of a piece of
    columns, its blocks). Not sharded: whole per matrix, identical on every rank.
    ``init``: ``init(shape, dtype, device)`` gives the initial value (None: zeros).
    ``role``: what the state is, for ``state_precision`` (:mod:`matrixopt.precision`):
    ``"moment"`` (a signed moment: a momentum, Adam's M), ``"second_moment"`` (a
    non-negative one: Adam's V), ``"basis"`` (a projection basis); None (default): kept in
    ``dtype`` at every precision.
    """
    shape: tuple | None
    dtype: torch.dtype | str = PARAM_DTYPE
    sharded: bool = False
    init: Callable | None = None
    role: str | None = None

    def dtype_for(self, p: Tensor) -> torch.dtype:
        if self.dtype == PARAM_DTYPE:
            return p.dtype
        if self.dtype == AT_LEAST_FP32:
            return torch.promote_types(p.dtype, torch.float32)
        return self.dtype

    def create(self, p: Tensor):
        """The initial value for param ``p`` (for sharded state: this rank's piece of its
        global shape placed like p — p's piece, or p's rows of a shape with p's dim 0)."""
        if self.shape is None:
            return 0
        shard = local(p)
        shape = tuple(self.shape)
        if self.sharded and self.shape and isinstance(p, DTensor):
            shape = my_box(p, shape).sizes
        dtype = self.dtype_for(p)
        if self.init is None:
            return torch.zeros(shape, dtype=dtype, device=shard.device)
        return self.init(shape, dtype, shard.device)


def counter() -> State:
    """A step counter (a Python int, starting at 0)."""
    return State(None)


def precision_of(group: dict) -> str:
    """A group's ``state_precision`` (groups of checkpoints older than it have none: fp32)."""
    return group.get("state_precision", "fp32")


class BlockState(MutableMapping):
    """Block ``b``'s view of a param's state dict, whose entries for it are named ``<key>.<b>``
    (params split into blocks of unequal sizes keep a state per block)."""

    def __init__(self, state: dict, b: int):
        self._state, self._suffix = state, f".{b}"

    def __getitem__(self, key):
        return self._state[key + self._suffix]

    def __setitem__(self, key, value):
        self._state[key + self._suffix] = value

    def __delitem__(self, key):
        del self._state[key + self._suffix]

    def __iter__(self):
        return (k[:-len(self._suffix)] for k in list(self._state) if k.endswith(self._suffix))

    def __len__(self):
        return sum(1 for _ in self)


class RowState(MutableMapping):
    """Rows ``rows`` (a slice of dim 0) of a param's state dict, for an element-wise update
    of those rows alone (``declared``: the state as stored). An entry declared sharded (dim 0
    the param's) is read as the view of its rows and written into them; every other entry is
    a counter (a Python int), read from a copy taken at construction — the state as it was
    before the step — so that every row chunk advances it from the same value, and stored
    back by :meth:`commit`."""

    def __init__(self, state: dict, declared: dict, rows: slice):
        self._state, self.rows = state, rows
        self._rows = {key for key, spec in declared.items() if spec.sharded and spec.shape}
        self._counters = {key: value for key, value in state.items() if key not in self._rows}

    @staticmethod
    def splits(declared: dict) -> bool:
        """Whether a state so declared can be viewed by rows: every entry sharded or a counter."""
        return all(spec.shape is None or (spec.sharded and spec.shape) for spec in declared.values())

    def __getitem__(self, key):
        return self._state[key][self.rows] if key in self._rows else self._counters[key]

    def __setitem__(self, key, value):
        if key in self._rows:
            self._state[key][self.rows] = value
        else:
            self._counters[key] = value

    def __delitem__(self, key):
        raise TypeError("a fallback does not delete its declared state")

    def __iter__(self):
        return iter(self._state)

    def __len__(self):
        return len(self._state)

    def commit(self) -> None:
        self._state.update(self._counters)


class Declarations:
    """Every param's state as declared: ``rule_state(p, group)`` is the declaration its rule
    (or the fallback) makes and sees in its update; :meth:`stored` is that declaration at
    the group's ``state_precision``, with what ``weight_state(p, group)`` declares for the
    weight's own storage (``master_weights``; every key it may declare: ``weight_keys``),
    which is what the optimizer's state holds."""

    def __init__(self, rule_state: Callable[[Tensor, dict], dict[str, State]],
                 weight_state: Callable[[Tensor, dict], dict[str, State]], weight_keys: tuple[str, ...]):
        self.rule_state, self.weight_state, self.weight_keys = rule_state, weight_state, weight_keys

    def stored(self, p: Tensor, group: dict) -> dict[str, State]:
        """p's state as stored: its rule's at the group's precision
        (:func:`matrixopt.precision.stored`) and what its weight's storage keeps
        (``weight_state``: :func:`matrixopt.weights.declared`)."""
        return {**stored(self.rule_state(p, group), precision_of(group), counter()), **self.weight_state(p, group)}

    def create(self, state: dict, group: dict, params: list[Tensor]) -> list[dict]:
        """The params' state dicts (``state``: the optimizer's), created from the declarations
        on a param's first step."""
        states = []
        for p in params:
            entry = state[p]
            if not entry:
                entry.update({key: spec.create(p) for key, spec in self.stored(p, group).items()})
            states.append(entry)
        return states

    def working(self, group: dict, params: list[Tensor], states: list[dict]) -> list:
        """The params' states as their rule sees them: at fp32 the states themselves; at a
        lower ``state_precision`` a :class:`~matrixopt.precision.Working` view with fp32
        temporaries of what is stored in fewer bits (one per param, however often it
        repeats)."""
        precision = precision_of(group)
        if precision == "fp32":
            return states
        views = {}
        return [views.setdefault(id(p), working(s, self.rule_state(p, group), precision, local(p)))
                for p, s in zip(params, states)]

    @staticmethod
    def write_back(group: dict, seeds: list[tuple[int, int]], params: list[Tensor], views: list,
                   first_rows: list[int] | None = None) -> None:
        """Store the temporaries of :meth:`working`'s views (nothing to do at fp32); the
        stochastic rounding is seeded by each param's place (group index, index in it) in
        ``seeds`` and drawn by the global index of each entry of the view
        (:func:`~matrixopt.matrices.entry_span`; ``first_rows``: per param, the local row a
        view of rows starts at)."""
        precision = precision_of(group)
        if precision == "fp32":
            return
        done = set()
        for p, place, view, row in zip(params, seeds, views, first_rows or [0] * len(params)):
            if id(p) in done:
                continue
            done.add(id(p))
            offsets = {key: entry_span(p, spec.shape, row) for key, spec in view.declared.items()
                       if spec.sharded and spec.shape}
            write_back(view, precision, place, offsets)

    # -- checkpoints -----------------------------------------------------------------------------
    def as_dtensors(self, state_dict: dict, groups: list[dict]) -> dict:
        """``state_dict`` with, for each DTensor (FSDP2) param, the state declared sharded as a
        DTensor placed like the param, so ``torch.distributed.checkpoint`` saves its shards."""
        for saved, group in zip(state_dict["param_groups"], groups):
            for pid, p in zip(saved["params"], group["params"]):
                if pid not in state_dict["state"] or not isinstance(p, DTensor):
                    continue
                declared = self.stored(p, group)
                state_dict["state"][pid] = {
                    k: dtensor_like(p, v, declared[k].shape) if k in declared and declared[k].sharded else v
                    for k, v in state_dict["state"][pid].items()}
        return state_dict

    def check_saved(self, state_dict: dict, groups: list[dict], validate: Callable[[dict], None],
                    name_of: Callable[[dict, int], str]) -> list[tuple[Tensor, dict, dict]]:
        """(param, its declared state, its saved state) triples; ValueError naming the param
        if a saved state lacks a declared entry (int8 codes: their scales) or a tensor's
        shape differs from the declared one (int8 codes: or their dtype), or naming the
        hyperparameter if a saved group's is invalid (``validate``). The declarations are at
        the saved group's ``state_precision`` and ``master_weights`` (a group saved without it:
        "nearest"), which the load restores (as every saved hyperparameter)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(groups):
            raise ValueError(f"State dict has {len(saved_groups)} param groups, this optimizer "
                             f"has {len(groups)}")
        triples = []
        for gi, (saved, group) in enumerate(zip(saved_groups, groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"State dict's param group {gi} has {len(saved['params'])} "
                                 f"params, this optimizer's has {len(group['params'])}")
            validate({**saved, "params": group["params"]})
            precision = precision_of(saved)
            storage = {"state_precision": precision, "master_weights": saved.get("master_weights", "nearest")}
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                # The weight's storage entries follow the param's dtype, not the checkpoint's: a
                # param that takes none drops them, one that takes some starts them afresh.
                # Routed and split as saved (the bare-params rule's records, matrixopt.routing), which the load restores.
                settings = {**group, **storage, **{k: saved.get(k) for k in (ROUTED, BLOCKS)}}
                optional = self.weight_state(p, settings)
                saved_state = {k: v for k, v in state_dict["state"].get(pid, {}).items()
                               if k not in self.weight_keys or k in optional}
                declared = self.stored(p, settings)
                _check_entries(name_of(group, i), declared, saved_state, precision, optional)
                triples.append((p, declared, saved_state))
        return triples

    @staticmethod
    def load(state: dict, triples: list[tuple[Tensor, dict, dict]]) -> None:
        """Each saved tensor into ``state`` (the optimizer's) as its declared dtype on its
        param's device, from the saved value (not torch.optim's copy cast to the param's
        dtype); DTensor state as its local shard."""
        for p, declared, saved_state in triples:
            if saved_state:   # the saved entries only (a dropped one too was loaded by torch.optim)
                state[p] = {key: value for key, value in state[p].items() if key in saved_state}
                state[p].update({key: spec.create(p) for key, spec in declared.items() if key not in saved_state})
            for key, value in saved_state.items():
                if isinstance(value, Tensor):
                    dtype = declared[key].dtype_for(p) if key in declared else value.dtype
                    state[p][key] = local(value).to(device=local(p).device, dtype=dtype, copy=True)


def _check_entries(name: str, declared: dict, saved_state: dict, precision: str, optional: dict) -> None:
    """ValueError naming the param ``name`` unless its saved state fits its declaration (the
    ``optional`` entries may be missing: created afresh)."""
    missing = sorted(set(declared) - set(saved_state) - set(optional)) if saved_state else []
    if missing:   # state is created whole: a checkpoint of an older rule, say
        raise ValueError(f"State dict does not fit {name}: state {missing} missing "
                         f"(state_precision={precision!r})")
    for key, value in saved_state.items():
        if key not in declared:
            raise ValueError(f"State dict does not fit {name}: state '{key}' is not one of "
                             f"{sorted(declared)} (state_precision={precision!r})")
        want = declared[key].shape
        if isinstance(value, Tensor) and tuple(value.shape) != tuple(want or ()):
            raise ValueError(
                f"State dict does not fit {name}: state "
                f"'{key}' has shape {tuple(value.shape)}, expected {tuple(want or ())}")
        if key + SCALE_SUFFIX in declared:   # int8 codes
            if not isinstance(value, Tensor) or value.dtype != declared[key].dtype:
                raise ValueError(f"State dict does not fit {name}: state '{key}' is "
                                 f"{getattr(value, 'dtype', type(value).__name__)}, expected "
                                 f"{declared[key].dtype} codes (state_precision={precision!r})")


def storage_bytes(tensors: list[Tensor]) -> int:
    """Bytes of the storages of ``tensors``, each storage counted once (told apart by
    :func:`~matrixopt.kernels.host.storage_id`, which also tells fake tensors' apart)."""
    seen, total = set(), 0
    for t in tensors:
        key = host.storage_id(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
