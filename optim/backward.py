"""The optimizer step fused into backward: each param is updated as soon as its gradient is
final, and the gradient freed, so a backward holds about one layer's gradients, not the model's.

:func:`step_in_backward` registers a post-accumulate-grad hook
(``Tensor.register_post_accumulate_grad_hook``) on every param of a
:class:`~matrixopt.MatrixOptimizer`. Autograd calls it right after it has accumulated the
param's gradient of a backward into ``p.grad``; FSDP2 (``fully_shard``) calls it on the sharded
param after the gradient's reduce-scatter. The hook hands that one param to the optimizer's own
step path (``MatrixOptimizer.step_params``: the checks, the non-finite policy, buckets, state
creation, the rule — exactly what ``step()`` runs for every param) and sets ``p.grad = None``.
"""
import sys
import warnings
import weakref

import torch
from torch.autograd import Variable
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from .optimizer import MatrixOptimizer
from .validation import integer, real

#: Optimizers with an active handle (two handles would update every param twice).
_ACTIVE: "weakref.WeakSet[MatrixOptimizer]" = weakref.WeakSet()


def step_in_backward(optimizer: MatrixOptimizer, *, accumulation_steps: int = 1,
                     max_grad_norm: float | None = None,
                     ddp: DistributedDataParallel | None = None) -> "StepInBackward":
    """Update ``optimizer``'s params inside ``loss.backward()``, each as soon as its gradient
    is final, freeing the gradient; returns a handle whose ``.remove()`` restores ordinary
    ``backward(); step()`` training.

    A window of ``accumulation_steps`` = k backward passes (a pass: one backward that reaches
    any of the optimizer's params) replaces k backwards and one ``step()``: in passes 1…k-1
    the gradients accumulate in ``p.grad`` as usual; in pass k each param is updated by the
    optimizer from its gradient summed over the k passes when that gradient is final, and
    ``p.grad`` is set to None. Scale the loss by 1/k for the mean, as in an ordinary
    accumulation loop. At the end of pass k the handle calls ``optimizer.step()`` once, through
    every wrapper torch puts on it (step pre/post hooks, an LR scheduler's check that
    ``optimizer.step()`` ran): that step updates the params that still hold a gradient — those
    that got one in an earlier pass of the window but not in pass k — and sets every
    ``p.grad`` to None (``zero_grad()``), so the window equals the ordinary loop for them
    too. Call ``scheduler.step()`` after pass k, where the ordinary loop calls it after
    ``optimizer.step()``. Every param's update is the one ``step()`` would make: results
    equal the ordinary loop bit for bit where its buckets hold one param each, and within
    1e-6 relative (a stack of same-shape matrices is orthogonalized / projected in one
    batched call there, one by one here: same-shape matrices are not batched) otherwise.
    With ``accumulation_steps`` > 1, activation checkpointing must be non-reentrant
    (``use_reentrant=False``): a reentrant segment's backward counts as a pass of its own.

    With FSDP2, load a DCP checkpoint into a fresh optimizer before calling this
    (``get_state_dict`` / ``set_state_dict`` create its state by a ``step()``).

    Inside a framework's loop (HF Trainer, accelerate, Lightning, litgpt), which calls
    ``optimizer.step()``, ``zero_grad()`` and ``clip_grad_norm_`` itself: pass the loop's own
    accumulation (``gradient_accumulation_steps``, ``accumulate_grad_batches``) as
    ``accumulation_steps`` and turn the loop's clipping off in favour of ``max_grad_norm``
    (below). While the handle is active, ``optimizer.step()`` finishes the window in
    progress: it updates the params that still hold a gradient (a window the loop ends
    early, at an epoch's end say: every param, from the gradients of its passes so far),
    clipped as the handle clips, and starts a new window; after a window's last pass has
    updated everything it updates nothing, so nothing is updated twice. A ``closure``
    (Lightning runs the window's last forward and backward inside ``optimizer.step(closure)``)
    runs first, and its backward updates the params as any last pass does. Step hooks and an
    LR scheduler's check then see two ``step()`` calls per window (the handle's and the
    loop's). A loop that calls ``step()`` only once per several windows of the handle gets a
    warning saying which ``accumulation_steps`` it uses. ``zero_grad()`` works as always.
    ``GradScaler.step(optimizer)`` raises ``RuntimeError`` (with GradScaler's own
    assertion once pass k has consumed every gradient): fp16 loss scaling needs every
    gradient unscaled and checked before any update, and is not supported — bf16 autocast
    needs no scaler and works. A global ``clip_grad_norm_`` needs every gradient and sees
    none after pass k (it returns 0); ``max_grad_norm`` = c instead clips each param's
    gradient to norm c (``clip_grad_norm_([p], c)``, the whole param's norm under FSDP2)
    before its update — per param, not the global clipping. The non-finite policy applies
    per param: a NaN or Inf in one param's gradient skips that param only
    (``nonfinite="skip"``, counted and warned as by ``step()``), or raises
    ``FloatingPointError`` out of ``backward()`` with ``nonfinite="raise"``, after the params
    updated before it in that pass.

    DDP: pass the ``DistributedDataParallel`` module as ``ddp``. The handle registers DDP's
    communication hook (DDP's own all-reduce and mean, ``allreduce_hook``) and, in a window's
    last pass, updates each DDP bucket's params as soon as its all-reduce completes, from the
    averaged gradients (views of the bucket), overlapping the updates with the backward of
    the layers before them: the result equals DDP's ordinary loop. Use DDP's ``no_sync()``
    for passes 1…k-1 of a window, as in the ordinary accumulation loop. The optimizer must
    not split its matrix work (no ``distributed="replicated"`` / ``process_group``): the
    updates run inside DDP's hook, where no other collective may run, so each rank updates
    every param from the identical averaged gradients. DDP keeps its gradient buckets, so
    under DDP the handle saves time (the overlap), not the gradients' memory. A comm hook
    cannot be removed from DDP: after ``remove()`` it is DDP's plain all-reduce. Without
    ``ddp``, an optimizer with ``distributed="replicated"`` or a ``process_group`` is refused
    (its hooks would run before DDP averages the gradients). FSDP2 works (each rank updates
    its shards after the reduce-scatter, whole-matrix work on owner ranks as in ``step()``)
    with gradient sync on every backward (FSDP2's default). Checkpoints: ``optimizer.state_dict()`` and
    ``load_state_dict`` work as without the handle; save at the end of a window (after pass k),
    since the accumulated gradients of a window in progress live in ``p.grad``. Params added by
    ``add_param_group`` afterwards get no hook: they are updated by the step at the end of
    pass k.
    """
    return StepInBackward(optimizer, accumulation_steps, max_grad_norm, ddp)


class StepInBackward:
    """The handle of :func:`step_in_backward`: the hooks and the window's pass count."""

    def __init__(self, optimizer: MatrixOptimizer, accumulation_steps: int, max_grad_norm: float | None,
                 ddp: DistributedDataParallel | None = None):
        if not isinstance(optimizer, MatrixOptimizer):
            raise TypeError(f"step_in_backward needs a matrixopt optimizer, got {type(optimizer).__name__}")
        integer(1)("accumulation_steps", accumulation_steps)
        if max_grad_norm is not None:
            real(0.0, lo_open=True)("max_grad_norm", max_grad_norm)
        if ddp is not None and not isinstance(ddp, DistributedDataParallel):
            raise TypeError(f"step_in_backward: ddp must be the DistributedDataParallel module, got {type(ddp).__name__}")
        if optimizer._planner.replicated:
            raise ValueError(f"step_in_backward does not support {type(optimizer).__name__}(distributed="
                             "'replicated' or process_group=...): " + (
                                 "under DDP each rank updates every param inside DDP's hook, where the split "
                                 "work's collectives cannot run; drop distributed=" if ddp is not None else
                                 "its hooks would run before DDP averages the gradients; pass ddp=<the "
                                 "DistributedDataParallel module>, use FSDP2, or the ordinary loop"))
        if optimizer in _ACTIVE:
            raise RuntimeError(f"step_in_backward is already active on this {type(optimizer).__name__}; "
                               "remove() its handle first")
        self._optimizer = optimizer
        self._accumulation_steps = accumulation_steps
        self._max_grad_norm = max_grad_norm
        self._passes = 0            # passes ended in the current window
        self._pass_task = None      # the backward (autograd graph task) whose end is queued
        self._finishing = False     # the handle's own optimizer.step() at the end of a window
        self._in_step = False       # inside a step() called by the user's or the framework's loop
        self._windows = 0           # windows ended by count since that loop's last step()
        self._mismatch_warned = False
        self._ddp = ddp
        self._updated = []          # params a DDP bucket's hook updated in this pass
        self._where = {p: (gi, i) for gi, group in enumerate(optimizer.param_groups)
                       for i, p in enumerate(group["params"])}
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]
        for gi, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook(gi, i)))
        if ddp is not None:
            ddp.register_comm_hook(None, self._bucket_hook)
        _ACTIVE.add(optimizer)

    def remove(self) -> None:
        """Remove the hooks: ``backward()`` accumulates gradients and ``step()`` updates again.
        Gradients accumulated by a window in progress stay in ``p.grad``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _ACTIVE.discard(self._optimizer)

    def _hook(self, gi: int, i: int):
        # By index: load_state_dict replaces the group dicts.
        def ready(p):
            self._count_pass()
            if self._passes + 1 < self._accumulation_steps or self._ddp is not None:
                return   # accumulating (the gradient stays for the next pass), or DDP's hook updates
            with torch.no_grad():
                self._clip(p)
                self._optimizer.step_params([(self._optimizer.param_groups[gi], [i])])
            p.grad = None

        return ready

    def _count_pass(self) -> None:
        """At a backward's first hook, queue the end of the pass (autograd's final callback;
        under DDP queued again from there, so that it runs after DDP's own, which writes the
        averaged gradients into ``p.grad``)."""
        task = torch._C._current_graph_task_id()
        if task != self._pass_task:
            self._pass_task = task
            end = self._end_pass if self._ddp is None else lambda: Variable._execution_engine.queue_callback(
                self._end_pass)
            Variable._execution_engine.queue_callback(end)

    def _bucket_hook(self, process_group, bucket):
        """DDP's communication hook: DDP's all-reduce and mean, then, in a window's last pass,
        the bucket's params updated from the averaged gradients."""
        reduced = allreduce_hook(process_group, bucket)
        if not self._handles or self._passes + 1 < self._accumulation_steps:
            return reduced
        params, grads = bucket.parameters(), bucket.gradients()

        def update(fut):
            self._update_from(params, grads)
            return fut.value()

        return reduced.then(update)

    def _update_from(self, params, grads) -> None:
        """Update ``params`` (those of the optimizer) from ``grads``, in one step_params call."""
        mine = [(p, grad) for p, grad in zip(params, grads) if p in self._where]
        selection = {}
        with torch.no_grad():
            for p, grad in mine:
                p.grad = grad.view_as(p)
                self._clip(p)
                gi, i = self._where[p]
                selection.setdefault(gi, []).append(i)
            self._optimizer.step_params([(self._optimizer.param_groups[gi], indices)
                                         for gi, indices in selection.items()])
        for p, _ in mine:
            p.grad = None
            self._updated.append(p)

    def _end_pass(self) -> None:
        self._pass_task = None
        for p in self._updated:   # DDP wrote the averaged gradients back after the update
            p.grad = None
        self._updated = []
        self._passes += 1
        if self._passes == self._accumulation_steps:
            self._passes = 0
            self._windows += 1
            if self._in_step:      # the loop's step(closure) is running: it is the window's step
                self._finish()
                return
            self._finishing = True
            try:
                self._optimizer.step()
            finally:
                self._finishing = False
            self._optimizer.zero_grad(set_to_none=True)   # the leftovers', as the ordinary loop's zero_grad

    def _finish(self) -> None:
        """The window's end inside the loop's own step(): the params that still hold a
        gradient, clipped and updated, then every gradient set to None."""
        optimizer = self._optimizer
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    self._clip(p)
            optimizer.step_params([(group, range(len(group["params"]))) for group in optimizer.param_groups])
        optimizer.zero_grad(set_to_none=True)

    def _clip(self, p) -> None:
        if self._max_grad_norm is not None and p.grad is not None:
            torch.nn.utils.clip_grad_norm_([p], self._max_grad_norm)

    def _before_step(self, optimizer, args, kwargs) -> None:
        """The step pre-hook. The handle's own step (at a window's end) and a step() of the
        loop both update the params that hold a gradient, clipped first; with a closure the
        clipping waits for the closure's backward (the window's last pass). GradScaler's
        step is refused."""
        if _called_by_grad_scaler():
            raise RuntimeError(
                f"GradScaler is not supported with step_in_backward ({type(optimizer).__name__}): the updates "
                "happen inside backward, before the scaler could unscale and check every gradient; use bf16 "
                "autocast (no scaler), or handle.remove() for the ordinary loop")
        if not self._finishing:
            self._in_step = True
        if self._finishing or not (args or kwargs.get("closure") is not None):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    self._clip(p)

    def _after_step(self, optimizer, args, kwargs) -> None:
        """The step post-hook: a step() of the loop ends the window in progress."""
        if self._finishing:
            return
        self._in_step = False
        if self._windows > 1 and not self._mismatch_warned:
            self._mismatch_warned = True
            warnings.warn(f"step_in_backward(accumulation_steps={self._accumulation_steps}) on "
                          f"{type(optimizer).__name__}: the training loop called step() once per {self._windows} "
                          f"windows, each updating the params; pass the loop's own accumulation, "
                          f"accumulation_steps={self._windows * self._accumulation_steps}", UserWarning, stacklevel=2)
        self._passes = self._windows = 0
        self._pass_task = None


def _called_by_grad_scaler() -> bool:
    """Whether the running step() was called by ``GradScaler.step`` (its ``_maybe_opt_step``)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_maybe_opt_step" and frame.f_code.co_filename.endswith("grad_scaler.py"):
            return True
        frame = frame.f_back
    return False
