"""MatrixOptimizer: the torch.optim adapter every matrixopt optimizer shares.

A rule is two things (see ARCHITECTURE.md):

- its **state declaration**, :meth:`MatrixOptimizer._state`: name → :class:`~matrixopt.State`
  (global shape, dtype policy, sharded like the param or whole per matrix, initial value);
- its **update**, :meth:`MatrixOptimizer._update`: one bucket of same-shape matrices, with
  the state already created from the declaration, calling the rule's functional form (a
  plain function over lists of tensors, like torch's ``adamw()``) and doing every
  whole-matrix computation through the ``matrix_map`` it is handed.

This class is what torch.optim sees: construction (hyperparameters validated up front, in
torch.optim's order: ``ValueError`` naming the argument), param groups of tensors, (name,
tensor) pairs or dicts with every hyperparameter overridable per group, naming, ``step()``,
state dicts and :meth:`state_bytes`. The work is done by its parts:

- routing, matrix views and buckets: :mod:`matrixopt.plan` (the planner; a param goes to the
  matrix rule when its group says ``matrix=True``, or when the key is absent and the
  bare-params rule says so (:mod:`matrixopt.routing`: ``ndim >= 2`` bar embedding and
  output-head tables, decided at a param's first gradient); else to the fallback,
  :mod:`matrixopt.fallback`'s AdamW unless given another);
- the step: :mod:`matrixopt.execute` (checks, the non-finite policy, the rules over buckets);
- state from the declarations: :mod:`matrixopt.state` (creation, precision views, load
  checks, DTensors for ``torch.distributed.checkpoint``);
- distribution: :mod:`matrixopt.distributed` (FSDP2's DTensor params through their local
  shards, whole-matrix work on owner ranks; ``distributed="replicated"`` for DDP).
"""
from typing import Callable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from . import routing, weights
from .batching import ORTHOGONALIZE
from .distributed import MODES, check_placement
from .execute import Executor, NonFinite
from .fallback import AdamW
from .matrices import BLOCK_AXES, block_sizes, equal_blocks, matrix_shape
from .plan import Bucket, Limits, Planner, is_matrix, param_blocks, separate_parts, split_of
from .precision import PRECISIONS
from .state import Declarations, State, storage_bytes
from .validation import betas_in_unit_interval, choice, real

SHARED_HYPERPARAMETERS = {
    "lr": real(0.0),
    "weight_decay": real(0.0),
    "betas": betas_in_unit_interval,
    "eps": real(0.0, lo_open=True),
    "nonfinite": choice("skip", "raise"),
    "state_precision": choice(*PRECISIONS),
    "master_weights": choice(*weights.MODES),
}


def _check_placement(p: Tensor, name: str, group: dict) -> None:
    """:func:`~matrixopt.distributed.check_placement` of ``p`` with what its group stores by
    global position: state at a lower precision (int8 codes in blocks), master weights."""
    precision = group.get("state_precision", "fp32")
    check_placement(p, name, precision != "fp32" or weights.mode_of(group, p) is not None, precision == "int8")


class MatrixOptimizer(torch.optim.Optimizer):
    """Base class: a matrix rule for matrices, a fallback (AdamW) for the rest.

    A subclass sets ``hyperparameters`` (name → validator, beyond the shared lr,
    weight_decay, betas, eps, nonfinite, state_precision), declares its state in
    :meth:`_state` and implements :meth:`_update` (and optionally :meth:`_prepare`).
    ``fallback`` (default :class:`matrixopt.AdamWFallback`) is the rule for params that are
    not matrices (:class:`matrixopt.protocols.Fallback`).
    """

    #: Elements of one bucket of same-shape matrices, at most: a step stacks (copies) a
    #: bucket a few times over, so this bounds its temporaries, while batching pays only for
    #: small matrices (on an H200 a 5-step NS of one 2048² matrix runs at the rate of 16
    #: stacked ones; 32 stacked 1024² ones run 7× faster than one by one): 2^25 elements
    #: batch 32 matrices of 1024², 8 of 2048².
    max_bucket_elements = 1 << 25
    #: Distributed CPU buckets whose work runs at once (each lane in a thread and process group
    #: of its own: one's collectives overlap another's compute; bit for bit as with 1; lanes_apply).
    buckets_in_flight = 1
    #: Per device type, the matrix size (elements) from which a matrix gets a bucket of its own:
    #: stacking copies a bucket's matrices (its element-wise temporaries live together), which
    #: pays only while the batched kernel saves more. None (default): measured per device, thread
    #: count, CPU, dtype (:func:`matrixopt.batching.stack_limit`; ``MATRIXOPT_STACK_LIMITS`` pins it).
    unbatched_elements: dict | None = None
    #: The kind of work whose batching :func:`matrixopt.batching.stack_limit` measures.
    stack_work = ORTHOGONALIZE
    #: At a lower ``state_precision``, the most elements the fallback updates in one call
    #: (the executor's fallback chunks), so the fp32 working copies of their moments take a
    #: few MB where a whole head's (8192×768) took 50 MB.
    fallback_chunk_elements = 1 << 20

    hyperparameters: dict = {}

    def __init__(self, params, defaults: dict, *, fallback=None, distributed: str | None = None,
                 process_group=None, state_precision: str = "fp32",
                 master_weights: str = weights.DEFAULT_MASTER_WEIGHTS):
        self.fallback = AdamW() if fallback is None else fallback
        # Hyperparameters first, as torch.optim's own optimizers check them before the params.
        choice(*MODES)("distributed", distributed)
        choice(*PRECISIONS)("state_precision", state_precision)
        choice(*weights.MODES)("master_weights", master_weights)
        # Groups without these keys are fp32 and "nearest": their state dicts stay as they were.
        if state_precision != "fp32":
            defaults = {"state_precision": state_precision, **defaults}
        if master_weights != "nearest":
            defaults = {"master_weights": master_weights, **defaults}
        self._validate_hyperparameters(defaults)
        # Replicated params (DDP): with distributed="replicated" or a process_group, matrix
        # work is split over process_group's ranks (None: the default group). The planner
        # holds nothing of this object's, and the executor is made per step: no reference
        # cycle, so an optimizer dropped frees its state at once, not at the next collection.
        self._planner = Planner(distributed == "replicated" or process_group is not None, process_group,
                                type(self).__name__)
        self._nonfinite = NonFinite()
        self._routing_warned = False
        self._first_forward = routing.FirstForward(self)   # the model's fused projections, seen at its first call
        super().__init__(params, defaults)

    def __getstate__(self):
        # Everything but torch.optim's hook registries, which __setstate__ recreates.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    @property
    def nonfinite_skips(self) -> int:
        """Params skipped for a non-finite gradient so far (one per param and step)."""
        return self._nonfinite.skips

    @nonfinite_skips.setter
    def nonfinite_skips(self, value: int) -> None:
        self._nonfinite.skips = value

    @property
    def _declarations(self) -> Declarations:
        return Declarations(self._rule_state, weights.declared, weights.KEYS)

    def _executor(self) -> Executor:
        """The executor of a step (made per step: it refers to this optimizer's methods)."""
        return Executor(self._planner, self._declarations, self, self.fallback, self._param_name, self._group_index,
                        self._nonfinite)

    # -- construction ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except (ValueError, TypeError, NotImplementedError):
            self.param_groups.pop()
            raise
        self._first_forward.watch(group)

    def _validators(self) -> dict:
        """Every hyperparameter this optimizer takes (the shared ones, the fallback's and the
        rule's) → its validator."""
        return {**SHARED_HYPERPARAMETERS, **self.fallback.hyperparameters, **self.hyperparameters}

    def _validate_hyperparameters(self, values: dict) -> None:
        """ValueError naming the first invalid hyperparameter in ``values``."""
        for name, check in self._validators().items():
            if name in values:
                check(name, values[name])

    def _validate_group(self, group: dict) -> None:
        self._validate_hyperparameters(group)
        if "matrix" in group:
            choice(None, True, False)("matrix", group["matrix"])
        choice(None, *BLOCK_AXES)("block_axis", group.get("block_axis"))
        routing.check_record(group)
        for i, p in enumerate(group["params"]):
            name = self._param_name(group, i)
            if p.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters: {name} is {p.dtype}")
            _check_placement(p, name, group)
            weights.check(name, p, group)
            value, axis = split_of(group, p, i)
            if value is not None and self.is_matrix(group, p, i):
                block_sizes(name, value, p, axis)

    # -- naming and routing --------------------------------------------------------------------
    def _param_name(self, group: dict, index: int) -> str:
        names = group.get("param_names")
        if names:
            return names[index]
        p = group["params"][index]
        return f"param_groups[{self._group_index(group)}]['params'][{index}] (shape {tuple(p.shape)})"

    def _group_index(self, group: dict) -> int:
        """``group``'s index in param_groups (len(param_groups) if it is not there yet)."""
        # By identity: list.index would compare the groups' dicts, and with them their tensors.
        return next((gi for gi, other in enumerate(self.param_groups) if other is group), len(self.param_groups))

    @staticmethod
    def is_matrix(group: dict, p: Tensor, index: int | None = None) -> bool:
        """Whether ``p`` (the group's param ``index``, or found by identity) goes to the matrix
        rule (else to the fallback)."""
        return is_matrix(group, p, index)

    def _shape(self, group: dict, p: Tensor) -> tuple[int, int, int]:
        """p's (B, m, n) matrix view in ``group`` (its equal row ``blocks`` applied)."""
        return matrix_shape(p, equal_blocks(*param_blocks(group, p)))

    # -- what a rule gives ---------------------------------------------------------------------
    def _state(self, p: Tensor, group: dict) -> dict[str, State]:
        """The matrix rule's state of ``p``: name → :class:`~matrixopt.State`."""
        raise NotImplementedError

    def _prepare(self, group: dict, bucket: Bucket) -> tuple[list[Tensor], list | None]:
        """The rule's first pass over a bucket, before the non-finite check: per entry the
        tensor the check reads (it must hold a NaN/Inf exactly when the gradient does), and
        per entry what the rule computed to get it, passed on as ``bucket.prepared`` (None:
        nothing). It must change no param and no state. The default checks the gradients
        themselves; a low-rank rule checks the projected gradient it computes anyway
        (:class:`~matrixopt.LowRankAdamW`), a fraction of the reads."""
        return bucket.grads, None

    def _update(self, group: dict, bucket: Bucket) -> None:
        """Apply the matrix rule to one :class:`~matrixopt.plan.Bucket` of same-shape matrices
        (same m, n, dtype and device): update ``bucket.weights`` in place and the state in
        ``bucket.states``.

        ``bucket.matrix_map(fn, inputs, outputs, entries=None)`` runs ``fn`` on whole
        matrices, batched: every computation that needs a whole matrix (orthogonalization,
        QR, refreshes) goes through it. ``inputs`` are :class:`~matrixopt.Rows` (per param,
        pieces of its matrix view) and :class:`~matrixopt.Whole` (per-matrix values kept
        whole on every rank), one per bucket entry, or one per entry of ``entries`` (indices
        into the bucket, in order) when the work is for some of them; ``fn`` takes one stack
        per input and returns one stack per ``outputs`` entry (:class:`~matrixopt.Out`: the
        per-matrix shape, dtype and layout). It returns a tuple with one per-param list per
        output. Single-process it is :func:`~matrixopt.ops.local_map`; distributed, the
        owner ranks compute (:mod:`matrixopt.distributed`).
        """
        raise NotImplementedError

    def _rule_state(self, p: Tensor, group: dict) -> dict[str, State]:
        """p's state as the rule (or the fallback) declares it and sees it in its update."""
        if not self.is_matrix(group, p):
            return self.fallback.state(p, group)
        sizes, separate = param_blocks(group, p)[0], separate_parts(group, p)
        declared = self._state(p, group) if separate is None else {
            f"{key}.{b}": spec for b, block in enumerate(separate)   # one matrix per block, "<key>.<b>"
            for key, spec in self._state(block, {**group, "blocks": None, "block_axis": None, "matrix": True}).items()}
        # Blocks of a plain param: their state may lack p's dim 0 ((k, m/k, r) moments), none is sharded.
        plain = sizes is not None and not isinstance(p, DTensor)   # a DTensor's: the rule declares by pieces
        return {key: spec._replace(sharded=False) for key, spec in declared.items()} if plain else declared

    # -- the step ------------------------------------------------------------------------------
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        ``lr`` may be a float or a one-element Tensor (read as ``float(lr)`` each step, so
        a scheduler may change it in place). Every check that can fail (gradients' layout
        and shape, non-finite gradients with ``nonfinite="raise"``) runs before any param or
        state changes. Params with no elements are left alone (nothing to update).

        The step declines ``torch.compile`` (``torch.compiler.disable``): it runs eagerly
        inside a compiled region, with eager's results, rather than being traced per
        bucket and shape and recompiled every step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_params([(group, range(len(group["params"]))) for group in self.param_groups])
        return loss

    def step_params(self, selection: list[tuple[dict, range | list[int]]]) -> None:
        """The step of the params ``selection`` names, as (group, indices in its params)
        pairs: those with a gradient and elements go the whole way of :meth:`step` (checks,
        non-finite policy, buckets, state, the rules) and no other param is touched.
        :meth:`step` passes every param; :func:`matrixopt.step_in_backward` one whose
        gradient is final."""
        self._planner.retain(self.param_groups)
        self._route(selection)
        self._executor().step(self.state, selection, self._limits(), self.fallback_chunk_elements)

    @torch.no_grad()
    def for_each_bucket(self, work: Callable[[dict, Bucket], None]) -> None:
        """Work outside :meth:`step` (a task boundary, say): ``work(group, bucket)`` for every
        bucket of matrices that have state, as :meth:`_update` gets it — the weights' matrix
        views, the states as the rule sees them (stored again after), a ``matrix_map`` — but
        with ``grads`` None. Distributed, every rank must call it (the map's collectives)."""
        self._planner.retain(self.param_groups)
        loads, limits, executor = {}, self._limits(), self._executor()
        for gi, group in enumerate(self.param_groups):
            self._planner.layout(group, check=range(len(group["params"])))
            params = [p for i, p in enumerate(group["params"]) if self.is_matrix(group, p, i) and self.state.get(p)]
            for items in self._planner.buckets(group, params, limits):
                bucket = self._planner.bucket(group, gi, items, loads, limits, grads=False)
                executor.run_bucket(self.state, group, bucket, work)

    def _route(self, selection: list[tuple[dict, range | list[int]]]) -> None:
        """The bare-params rule's decision for the selected params (:func:`matrixopt.routing.route`)."""
        self._routing_warned = routing.route(selection, self.state, self._param_name, type(self).__name__,
                                             type(self.fallback).__name__, self._routing_warned, self._first_forward)

    def _limits(self) -> Limits:
        return Limits.checked(self.max_bucket_elements, self.unbatched_elements, self.stack_work, self.buckets_in_flight)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim's state dict; for a DTensor (FSDP2) param, the state declared sharded
        is a DTensor placed like the param, so ``torch.distributed.checkpoint`` saves its
        shards."""
        return self._declarations.as_dtensors(super().state_dict(), self.param_groups)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict; rejects state saved for other shapes, naming the parameter.

        Each state tensor gets its declared dtype (:meth:`_state`; the fallback's moments
        are fp32, low-rank moments and rotations at least fp32, whatever the param's dtype)
        and the param's device, whatever it was saved with, so a checkpoint resumes on
        params of another dtype or device. DTensor state (from :meth:`state_dict` of a
        sharded run) is stored as its local shard. The shape check sees the state dict as
        the load_state_dict pre-hooks return it, and the post-hooks see (and may edit) the
        state as loaded. A param's saved state must hold every declared entry; a
        hyperparameter a saved group lacks (one added after it was saved) takes this
        optimizer's default.
        """
        loaded = []

        def check_shapes(optimizer, state_dict):
            loaded.extend(self._declarations.check_saved(state_dict, self.param_groups, self._validate_group,
                                                         self._param_name))

        def declared_dtypes(optimizer):
            # A hyperparameter the checkpoint predates takes its default (not state_precision
            # nor master_weights: a group saved without them is fp32 and "nearest", as its state).
            for group in self.param_groups:
                for key in self._validators().keys() & self.defaults.keys() - {"state_precision", "master_weights"}:
                    group.setdefault(key, self.defaults[key])
            self._declarations.load(self.state, loaded)

        # Registered now: the check runs after every other pre-hook, the dtypes are set
        # before every other post-hook.
        handles = (self.register_load_state_dict_pre_hook(check_shapes),
                   self.register_load_state_dict_post_hook(declared_dtypes, prepend=True))
        try:
            super().load_state_dict(state_dict)
        finally:
            for handle in handles:
                handle.remove()

    def master_weight(self, p: Tensor) -> Tensor:
        """The fp32 value param ``p`` stands for (:func:`matrixopt.weights.master_weight`: with
        ``master_weights`` "int8"/"int16" its master, else the weight; a new tensor, a DTensor
        for an FSDP2 param). To export the masters: ``{n: opt.master_weight(p) for n, p in
        model.named_parameters()}``."""
        return weights.master_weight(p, self.param_groups, self.state)

    def _shared_state_tensors(self) -> list[Tensor]:
        """State shared by many params (e.g. a DCT basis); counted once by state_bytes."""
        return []

    def state_bytes(self) -> int:
        """Bytes of optimizer state held on this rank (each storage counted once)."""
        tensors = [v for s in self.state.values() for v in s.values() if isinstance(v, Tensor)]
        return storage_bytes(tensors + self._shared_state_tensors())
