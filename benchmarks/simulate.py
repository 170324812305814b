"""`python -m benchmarks memory --simulate CONFIG`: the peak memory of a GPU-sized training
step, measured on fake tensors: nothing of that size is allocated, no GPU is needed.

**What is measured.** The training step of :mod:`benchmarks.memory`, twice from a fresh model
and optimizer (forward, ``loss.backward()``, ``opt.step()``, ``opt.zero_grad()``; with
``matrixopt.step_in_backward(opt)`` or torch's recipe, forward and a backward that updates
each param as its gradient is final), run under torch's ``FakeTensorMode``: every op runs on
tensors that have shapes, dtypes and a device but no storage. :class:`LiveBytes`, a
``TorchDispatchMode`` entered above it, sees every op's outputs: a storage it has not seen
is allocated (its bytes added to the live bytes, a resize adjusts them) and it is freed when
torch frees it (a finalizer on the storage's Python object, which torch keeps as long as the
storage lives). The peak of the live bytes, counted from before the model is built, is the
row's peak: the quantity :class:`benchmarks.memory.PeakMeter` measures on a real CPU from the
allocator's events (live tensor bytes), here without per-module bookkeeping, so a 7B row
takes minutes on two cores. matrixopt runs unchanged: its host reads of tensor values go
through ``matrixopt.kernels.host``, which answers a fake tensor with what a healthy step reads
(every gradient finite, every refresh done, no factorization to redo).

**Options.** Weights in bf16 (``--weights bf16``: params, gradients and activations bf16, as
GaLore's 7B recipe) or fp32 master weights under bf16 autocast (``--weights fp32``); batch ×
sequence length; activation checkpointing per block (``--checkpoint``:
``torch.utils.checkpoint``, only a block's input kept); the low-rank optimizers' rank
(``--rank``: an int, GaLore's 7B recipe is 1024, or a fraction of the smaller side). The
low-rank optimizers refresh their projections at both steps (``update_proj_gap=1``): the
second step is a refresh with every state live, the worst step of a run (a refresh every 200
steps).

**Rows.** torch.optim.AdamW in fp32 master weights + bf16 autocast and in pure bf16, fused and
foreach (CUDA's default; the foreach step holds temporaries the size of a dtype's params),
and torch's step-in-backward recipe; the 8-bit peers and galore-torch where they run under
fake tensors (a row that does not says why); every matrixopt optimizer × ``state_precision``
× ``step_in_backward``, and × ``master_weights`` (the lean bf16 weights' axis) where the class
takes it and the weights are bf16.

**The CUDA path.** On a CPU build of torch fake ``cuda`` tensors abort at the first autograd
op, so the CPU path runs, with CUDA's choices made explicit: Muon/ROOT's Newton-Schulz and
ARO's matmuls in bf16 (:data:`CUDA_COMPUTE`: their default on CUDA, fp32 on CPU); the
stack-or-not limits pinned to 2^24 elements (:data:`CUDA_STACK_LIMITS`: the largest a GPU's
measurement gives, which tries sides up to 2048, so at most the stacking a GPU does; 7B's and
13B's matrices run alone either way); attention by the CPU flash kernel
(``_scaled_dot_product_flash_attention_for_cpu``, which SDPA on fake CPU tensors takes, as on
real ones), which saves the output and the log-sum-exp as CUDA's flash kernel does, not the
math path's T×T scores (which SDPA under fake ``cuda`` tensors would silently take: 2.8× flash's
memory at seq 2048). Every GPU-sized row is unvalidated (``validated``: "no, GPU pending")
until a GPU runs it for real and compares ``torch.cuda.max_memory_allocated``
(benchmarks/gpu_session.sh runs the same configs); ``--validate`` runs each row for real
too, on a GPU where there is one, else on this CPU (for a config that fits it), by PeakMeter,
and gives the ratio.

**What the simulation cannot see:** the allocator's reserve and fragmentation (CUDA's caching
allocator holds more than it has allocated; its 512-byte rounding is not modeled), the CUDA
context (~0.5 GiB), library workspaces (cuBLAS, cuSOLVER, cuDNN), NCCL buffers, Triton's
scratch, and memory a kernel allocates inside one op without an aten op (a hidden copy, as
``aten::sum(dtype=float32)`` of a bf16 tensor makes). A "fits in 24 GiB" column is the peak
against 24 GiB with none of that counted.

Bytes per parameter (activations excluded): ``weights_B``, ``low_bits_B`` (the masters' low
bits of ``master_weights`` "int8"/"int16"), ``state_B`` (the rest of the optimizer state) from
counts, and ``step_B_per_param``, the peak less the byte model's activations and loss
gradients (A + L of benchmarks/memory.py, measured on fake tensors): what the step holds
beyond its activations — weights, state, gradients held at once and temporaries.
"""
import dataclasses
import functools
import itertools
import os
import time
import weakref
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary
from tqdm import tqdm

import matrixopt

from .common import default_device
from .memory import (ADAMW, BNB_ADAMW8BIT, CONFIGS, GALORE_TORCH, GiB, MB, PRECISIONS, TORCHAO_ADAMW8BIT, PeakMeter,
                     Row, build_model, default_mode, loss_gradient_bytes, low_bits_bytes, make_optimizer,
                     add_row, missing, random_tokens, saved_activation_bytes, table_rows, tensor_bytes, train_step)
from .optimizers import PEER_NOTES, Settings, TorchStepInBackward, state_bytes

#: The weights: "bf16" (params, gradients and activations) or "fp32" (master weights, bf16 autocast).
WEIGHTS = ("bf16", "fp32")
#: torch.optim.AdamW's implementations (CUDA's default is foreach).
ADAMW_IMPLEMENTATIONS = ("fused", "foreach")
#: The compute dtype matrixopt's rules default to on CUDA, by hyperparameter.
CUDA_COMPUTE = {"ns_dtype": torch.bfloat16, "matmul_dtype": torch.bfloat16}
#: Stack-or-not limits (elements) pinned for both kinds of work: the largest a GPU measures.
CUDA_STACK_LIMITS = 1 << 24
#: The peers that get a row besides torch AdamW.
PEERS = (BNB_ADAMW8BIT, TORCHAO_ADAMW8BIT, GALORE_TORCH)
#: GaLore's 7B recipe (Zhao et al. 2024, §5.3): bf16 weights, batch 16 × 256, rank 1024,
#: activation checkpointing; its reported 22.8 GB is galore-torch's 8-bit GaLore with a
#: per-layer update, on the same recipe.
GALORE_7B = dict(batch=16, seq_len=256, weights="bf16", checkpoint=True, rank=1024)


class LiveBytes(TorchDispatchMode):
    """Bytes of live storages made by ops run under it and their peak (``peak``; within named
    spans ``peaks[name]``): each op's output storages it has not seen count from then until
    torch frees them. Enter it above a ``FakeTensorMode`` to count what a program would allocate."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.peaks, self._active = {}, []
        self._sizes = WeakIdKeyDictionary()   # storage -> [its bytes as counted]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        nbytes = storage.nbytes()
        counted = self._sizes.get(storage)
        if counted is None:
            counted = self._sizes[storage] = [0]
            weakref.finalize(storage, self._free, counted)
        if counted[0] != nbytes:
            self._add(nbytes - counted[0])
            counted[0] = nbytes

    def _free(self, counted: list) -> None:
        self._add(-counted[0])

    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        if nbytes > 0:
            self.peak = max(self.peak, self.live)
            for name in self._active:
                self.peaks[name] = max(self.peaks[name], self.live)

    @contextmanager
    def span(self, name: str):
        self.peaks[name] = max(self.peaks.get(name, 0), self.live)
        self._active.append(name)
        try:
            yield
        finally:
            self._active.remove(name)


@dataclasses.dataclass(frozen=True)
class SimRow:
    """A row: ``row`` (optimizer, state precision, in backward), the ``weights`` ("bf16",
    "fp32") and, for torch AdamW, its implementation (``variant``)."""

    row: Row
    weights: str
    variant: str | None = None

    @property
    def label(self) -> str:
        return self.row.label + ("" if self.variant is None else f" {self.variant}")


@dataclasses.dataclass(frozen=True)
class Options:
    """A step's sizes and recipe."""

    batch: int = 1
    seq_len: int = 256
    weights: str = "bf16"
    checkpoint: bool = False
    rank: int | float = 0.25

    def settings(self) -> Settings:
        return Settings(rank_fraction=self.rank, update_proj_gap=1)


def sim_rows(weights: str, optimizers=None, precisions=PRECISIONS, in_backward: bool = False,
             master_weights=None) -> list[SimRow]:
    """torch AdamW in both weights × implementations and with torch's step-in-backward recipe,
    the peers, then every matrixopt optimizer × precision × in backward (× master_weights);
    with ``in_backward`` only matrixopt's rows that step in backward, with ``master_weights``
    only its rows of those values (the default's: the plain row)."""
    rows = [SimRow(Row(ADAMW), w, impl) for w in WEIGHTS for impl in ADAMW_IMPLEMENTATIONS]
    rows += [SimRow(Row(ADAMW, in_backward=True), weights, "fused")]
    rows += [SimRow(Row(name), weights) for name in PEERS]
    rows += [SimRow(c, weights) for c in table_rows(optimizers, precisions, lean=weights == "bf16")
             if c.matrixopt and (c.in_backward or not in_backward)
             and (master_weights is None or (c.master_weights or default_mode(c.optimizer)) in master_weights)]
    return [r for r in rows if not optimizers or r.row.optimizer in optimizers]


def build_optimizer(r: SimRow, model: torch.nn.Module, settings: Settings, lr: float = 1e-4):
    """Row ``r``'s optimizer, with CUDA's compute dtype (:data:`CUDA_COMPUTE`) for matrixopt."""
    c = r.row
    if c.optimizer == ADAMW:
        adamw = dict(lr=lr, betas=settings.betas, weight_decay=settings.weight_decay, **{r.variant: True})
        return TorchStepInBackward(model.parameters(), **adamw) if c.in_backward else \
            torch.optim.AdamW(model.parameters(), **adamw)
    opt = make_optimizer(c, model, settings, lr)
    for group in opt.param_groups if c.matrixopt else ():
        group.update({key: dtype for key, dtype in CUDA_COMPUTE.items() if group.get(key, 0) is None})
    return opt


@contextmanager
def cuda_stack_limits():
    """matrixopt's stack-or-not limits pinned to :data:`CUDA_STACK_LIMITS` for both kinds of work."""
    batching = matrixopt.batching
    pin = ",".join(f"{kind}:{device}={CUDA_STACK_LIMITS}" for kind in (batching.ORTHOGONALIZE, batching.LOWRANK)
                   for device in ("cpu", "cuda"))
    before = os.environ.get(batching.ENV_LIMITS)
    os.environ[batching.ENV_LIMITS] = pin
    try:
        yield
    finally:
        if before is None:
            del os.environ[batching.ENV_LIMITS]
        else:
            os.environ[batching.ENV_LIMITS] = before


def training(r: SimRow, config: str, options: Options, meter, device="cpu") -> int:
    """Two training steps of row ``r`` on ``config`` from a fresh model and optimizer, under
    ``meter`` (its spans: step 1, step 2 and their phases); returns the optimizer's state bytes."""
    shape = CONFIGS[config]
    dtype = torch.bfloat16 if r.weights == "bf16" else torch.float32
    tokens = random_tokens(shape, options.batch, options.seq_len, device)
    model = build_model(shape, options.seq_len, device, dtype, checkpoint=options.checkpoint)
    opt = build_optimizer(r, model, options.settings())
    handle = matrixopt.step_in_backward(opt) if r.row.in_backward and r.row.matrixopt else None
    for i in range(2):
        with meter.span(f"step {i + 1}"):
            train_step(model, opt, tokens, meter, r.row.in_backward, autocast=r.weights == "fp32")
    counts = {"state": state_bytes(opt), "low_bits": low_bits_bytes(opt),
              "params": sum(p.numel() for p in model.parameters()),
              "weights": tensor_bytes(itertools.chain(model.parameters(), model.buffers()))}
    for hooks in (handle, opt if isinstance(opt, TorchStepInBackward) else None):
        if hooks is not None:
            hooks.remove()
    return counts


def simulated(r: SimRow, config: str, options: Options) -> tuple[LiveBytes, int]:
    """Row ``r`` on fake tensors: the meter and the state bytes."""
    with cuda_stack_limits(), FakeTensorMode(allow_non_fake_inputs=True), LiveBytes() as meter:
        counts = training(r, config, options, meter)
    return meter, counts


@functools.cache
def activation_bytes(config: str, options: Options) -> int:
    """A + L of the byte model (benchmarks/memory.py) on fake tensors: the tensors autograd
    saves in one forward (with checkpointing: the blocks' inputs) and the loss's gradients."""
    shape = CONFIGS[config]
    dtype = torch.bfloat16 if options.weights == "bf16" else torch.float32
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(shape, options.seq_len, "cpu", dtype, checkpoint=options.checkpoint)
        tokens = random_tokens(shape, options.batch, options.seq_len, "cpu")
        with torch.autocast("cpu", torch.bfloat16, enabled=options.weights == "fp32"):
            saved = saved_activation_bytes(model, tokens)
    return saved + loss_gradient_bytes(shape, options.batch, options.seq_len)


def measured(r: SimRow, config: str, options: Options) -> PeakMeter:
    """Row ``r`` for real, with the simulation's choices, by PeakMeter: on a GPU where there is
    one (``torch.cuda.max_memory_allocated``), else on this CPU (the allocator's events)."""
    device = default_device()
    with cuda_stack_limits(), PeakMeter(device) as meter:
        training(r, config, options, meter, device)
    return meter


def simulate_row(r: SimRow, config: str, options: Options, validate: bool) -> dict:
    """Row ``r``'s table row: the simulated peak and its phases, the state, and with
    ``validate`` the real CPU peak and the ratio."""
    start = time.perf_counter()
    meter, counts = simulated(r, config, options)
    state, params = counts["state"], counts["params"]
    row = {"optimizer": r.label, "weights": r.weights, "peak_GiB": meter.peak / GiB, "state_GiB": state / GiB,
           "weights_B": counts["weights"] / params, "low_bits_B": counts["low_bits"] / params,
           "state_B": (state - counts["low_bits"]) / params,
           "step_B_per_param": (meter.peak - activation_bytes(config, dataclasses.replace(options, weights=r.weights))) / params,
           "forward_GiB": meter.peaks["forward"] / GiB, "backward_GiB": meter.peaks["backward"] / GiB,
           "step_GiB": meter.peaks.get("optimizer step", 0) / GiB, "fits_24GiB": meter.peak <= 24 * GiB,
           "seconds": time.perf_counter() - start, "validated": "no, GPU pending"}
    if validate:
        real = measured(r, config, options)
        where = "GPU real" if real.cuda else "CPU real"
        row.update(peak_MB=meter.peak / MB, real_peak_MB=real.peak / MB, sim_over_real=meter.peak / real.peak,
                   validated=where if abs(meter.peak / real.peak - 1) <= 0.05 else f"{where}: off by > 5%")
    return row


def run(config: str, optimizers=None, precisions=PRECISIONS, validate: bool = False, in_backward: bool = False,
        master_weights=None, **recipe):
    """Every row on ``config`` with ``recipe`` (:class:`Options`' fields), or those
    :func:`sim_rows` keeps with ``in_backward`` and ``master_weights``. Returns (table
    sections, extra JSON, no figure)."""
    options = Options(**{key: value for key, value in recipe.items() if value is not None})
    rows, notes = [], []
    progress = tqdm(sim_rows(options.weights, optimizers, precisions, in_backward, master_weights),
                    desc=f"simulate {config}", unit="row")
    for r in progress:
        progress.set_postfix_str(r.label)
        add_row(rows, notes, r.label, r.row.matrixopt, missing(r.row),
                lambda r=r: simulate_row(r, config, options, validate), "under fake tensors")
    progress.close()
    shape = CONFIGS[config]
    title = (f"{config} (d={shape.dim}, {shape.n_layers} layers, h={shape.hidden_dim}, vocab {shape.vocab_size}), "
             f"batch {options.batch} × {options.seq_len}, {options.weights} weights"
             f"{', activation checkpointing' if options.checkpoint else ''}, rank {options.rank}: simulated on fake "
             "tensors (CPU path, CUDA's choices)")
    sections = {title: [r for r in rows if "note" not in r], "Not simulated": [r for r in rows if "note" in r]}
    extra = {"settings": {"config": config, "validate": validate, **dataclasses.asdict(options),
                          "update_proj_gap": 1, "cuda_compute": {k: str(v) for k, v in CUDA_COMPUTE.items()},
                          "stack_limits": CUDA_STACK_LIMITS},
             "unseen": "allocator reserve/fragmentation, CUDA context, library workspaces (cuBLAS, cuSOLVER), "
                       "NCCL buffers, Triton scratch, copies made inside one op",
             "notes": notes + PEER_NOTES}
    return sections, extra, None
