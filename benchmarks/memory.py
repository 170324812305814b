"""`python -m benchmarks memory`: the peak memory of a whole training step, per optimizer.

A training step of a LLaMA-style model (:mod:`benchmarks.model`: RMSNorm, RoPE, SwiGLU,
untied head, fp32) — forward, ``loss.backward()``, ``opt.step()``, ``opt.zero_grad()``, or,
with ``matrixopt.step_in_backward(opt)``, forward and a backward that updates each param as
its gradient is final — is run twice from a fresh model and optimizer (step 1 creates the
state and, for the low-rank optimizers, the projections; step 2 is a steady step). The peak
of the bytes of live tensors over both steps, counted from before the model was built
(weights, gradients, optimizer state, activations and every temporary), is the row's peak.
No gradient clipping: a global norm needs every gradient at once, which step_in_backward
does not hold.

**How the peak is measured.** On CUDA, ``torch.cuda.max_memory_allocated`` (reset when the
meter starts and the bytes allocated then subtracted). On CPU torch has no allocator
statistics (``torch.cpu`` has none, ``torch.accelerator``'s memory functions are for
accelerators); what it has is the profiler's memory events: with ``profile_memory=True``
the CPU allocator reports every tensor allocation and free, with its size, to the profiler,
from every thread the profiler follows (the autograd engine runs CPU backward on the
calling thread; a test allocates a known tensor inside a backward node and finds it). The
running sum of those events from a meter started before the model is built is the bytes of
live tensors allocated since then, event by event, so its maximum is the exact peak of live
tensor bytes — not a sample. Spans (``record_function``) give the peak within each step and
phase (forward, backward, optimizer step) from the same events. Not counted, on either
device: memory that is not a tensor's (the Python heap, BLAS/oneDNN workspaces, the CUDA
context) and, on CPU, what the C allocator keeps from freed blocks (a process's RSS
includes it, which is why RSS is not the measure here: it depends on glibc's heap
and mmap thresholds, not on the step).

**The byte model next to it**, from independent counts::

    model = W + S + max(A + L, G + T)      (ordinary loop)
    model = W + S + A + L + G + T           (step in backward)

W: the weights (params and buffers); S: the optimizer state after the steps
(``opt.state_bytes()`` for matrixopt, the state's tensors for the peers); A: the
activations, the bytes of the tensors autograd saves for backward in one forward (counted
with ``saved_tensors_hooks``, each storage once, weights and input tokens excluded); L: the
loss's backward, the gradients of the log-probabilities and of the logits (2 · tokens ·
vocabulary · 4 bytes), live with every activation when backward starts; G: the gradients
held at once —
every param's in the ordinary loop, one layer's (the largest of the embedding, a block, the
final norm and head) with a step in backward; T: the optimizer step's temporaries, measured
on their own: a fresh optimizer over a fresh model with the gradients of one backward on the
same tokens, the peak of its first step above its state and of its second step (for a step
in backward, which updates each param on its own, with one matrix per bucket:
``max_bucket_elements = 1``). In the ordinary loop a step peaks at one of two moments: the
start of backward (every activation live, no gradient yet) or the optimizer step (every
gradient live, activations freed), hence the max. A step in backward updates the head and
the last block while nearly every activation is still live, so there the terms add up (an
upper bound: the layer updated first is not the largest everywhere). ``measured − model``
is what the model leaves out: backward's other temporaries, and activations still live
while the first gradients arrive.

**Sizes.** The default CPU model ("70M": d = 768, 8 layers, 12 heads, SwiGLU 2048,
vocabulary 8192; 69.2M params) has its hidden matrices at 82% of the params, as in LLaMA-1B
(90%) and 7B (96%), whose memory GaLore's headline is about; with GaLore's 60M config
(vocabulary 32000, ``--config 60M``) the embedding and head are 56% of the params and every
optimizer's state is mostly theirs (AdamW's). Batch 1 × 128 tokens: the activations and
loss gradients are then 7% of AdamW's peak, so the rows compare what the optimizers hold,
not what the model's forward holds. ``--quick`` is a 4M-param model (batch 1 × 64 tokens)
that runs in a few minutes.

Rows: torch.optim.AdamW (fp32, torch's default implementation for the device; fused on
CUDA as in the other benchmarks), alone and with torch's own step-in-backward recipe (an
AdamW per param stepped from its post-accumulate-grad hook), the 8-bit AdamW peers that run here (bitsandbytes
``AdamW8bit``, torchao ``AdamW8bit``, galore-torch's ``GaLoreAdamW8bit``), galore-torch's
``GaLoreAdamW``, and every matrixopt optimizer × ``state_precision`` ("fp32", "bf16",
"int8") × with/without ``matrixopt.step_in_backward``, built with
``matrixopt.param_groups(model)`` as a user would. A row this build cannot run (an
argument or function matrixopt does not have yet, a peer that is not installed or fails on
this device) is listed with the reason.

**On a GPU** also: the largest LLaMA config (GaLore's 60M … 7B shapes) whose training step
fits under ``torch.cuda.set_per_process_memory_fraction`` for 24 GiB (a "24 GB" card), per
optimizer (bf16 weights, batch 1 × 256 tokens), by a binary search over the configs (a
larger config needs more memory), each try a model built and stepped twice; not fitting =
running out of memory. ``--fit-budget-gib`` runs the same search on CPU against the
measured peak.
"""
import bisect
import dataclasses
import gc
import inspect
import itertools
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

import matrixopt
from matrixopt.kernels import host

from .common import allocation_events, default_device
from .model import ModelConfig, Transformer
from .optimizers import (ADAMW, BNB_ADAMW8BIT, GALORE_TORCH, GALORE_TORCH_8BIT, PEER_NOTES, TORCHAO_ADAMW8BIT,
                         Settings, TorchStepInBackward, build, matrixopt_classes, not_installed, state_bytes)

MB = 2**20
GiB = 2**30   # a "24 GB" card (RTX 3090/4090) has 24 GiB
PRECISIONS = ("fp32", "bf16", "int8")
#: matrixopt's ``master_weights`` values: with bf16 weights, each but a class's default is a row.
MASTER_WEIGHTS = ("nearest", "stochastic", "int8", "int16")
#: The rows besides matrixopt's optimizers: torch AdamW, bitsandbytes' and torchao's 8-bit
#: AdamWs, galore-torch's GaLoreAdamW and its 8-bit variant.
PEERS = (ADAMW, BNB_ADAMW8BIT, TORCHAO_ADAMW8BIT, GALORE_TORCH, GALORE_TORCH_8BIT)
#: The issue's targets: peak of the row ≤ this fraction of torch.optim.AdamW's.
TARGETS = {("matrixopt.GaLoreAdamW", "int8", True): 0.40, ("matrixopt.Muon", "int8", True): 0.45}


@dataclass(frozen=True)
class Shape:
    """A LLaMA-style model's size."""

    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    vocab_size: int

    def model_config(self, seq_len: int) -> ModelConfig:
        return ModelConfig(self.vocab_size, self.dim, self.n_layers, self.n_heads, hidden_dim=self.hidden_dim,
                           seq_len=seq_len)


# GaLore's LLaMA shapes (60M … 7B, vocabulary 32000), and smaller ones for CPUs and tests.
CONFIGS = {
    "ci": Shape(64, 2, 4, 176, 256),
    "quick": Shape(256, 4, 4, 688, 2048),
    "70M": Shape(768, 8, 12, 2048, 8192),
    "60M": Shape(512, 8, 8, 1376, 32000),
    "130M": Shape(768, 12, 12, 2048, 32000),
    "350M": Shape(1024, 24, 16, 2736, 32000),
    "1B": Shape(2048, 24, 32, 5461, 32000),
    "3B": Shape(2560, 32, 32, 6848, 32000),
    "7B": Shape(4096, 32, 32, 11008, 32000),
    # LLaMA-13B (Touvron et al. 2023, Table 2; its FFN 13824 as in the released config)
    "13B": Shape(5120, 40, 40, 13824, 32000),
}
FIT_CONFIGS = ("60M", "130M", "350M", "1B", "3B", "7B")


@dataclass(frozen=True)
class Row:
    """One row: a contender of the registry (:mod:`benchmarks.optimizers`), its state precision
    and whether it steps inside backward."""

    optimizer: str
    precision: str = "fp32"
    in_backward: bool = False
    master_weights: str | None = None

    @property
    def matrixopt(self) -> bool:
        return self.optimizer in matrixopt_classes()

    @property
    def label(self) -> str:
        if not self.matrixopt:
            return self.optimizer + (" + step in backward (torch's recipe)" if self.in_backward else "")
        lean = "" if self.master_weights is None else f" master_weights={self.master_weights}"
        return f"{self.optimizer} {self.precision}{' + step_in_backward' if self.in_backward else ''}{lean}"


def table_rows(optimizers=None, precisions=PRECISIONS, lean: bool = False) -> list[Row]:
    """The peers (torch AdamW also with torch's step-in-backward recipe), then every matrixopt
    optimizer × precision × (ordinary, step_in_backward) (× with ``lean``, bf16 weights: each
    ``master_weights`` value other than the default); only the optimizers named in
    ``optimizers`` if given."""
    available = [*PEERS, *matrixopt_classes()]
    unknown = sorted(set(optimizers or ()) - set(available))
    if unknown:
        raise ValueError(f"Unknown optimizers {unknown}; available: {available}")
    out = [Row(ADAMW), Row(ADAMW, in_backward=True)] + [Row(name) for name in PEERS[1:]]
    out += [Row(name, precision, in_backward, mode) for name in matrixopt_classes() for precision in precisions
            for in_backward in (False, True) for mode in (None, *(lean_values(name) if lean else ()))]
    return [c for c in out if not optimizers or c.optimizer in optimizers]


def default_mode(name: str) -> str:
    """The default ``master_weights`` of matrixopt class ``name``."""
    return inspect.signature(matrixopt_classes()[name]).parameters["master_weights"].default


def lean_values(name: str) -> list[str]:
    """The ``master_weights`` values of matrixopt class ``name`` other than its default."""
    return [mode for mode in MASTER_WEIGHTS if mode != default_mode(name)]


def takes_precision(c: Row) -> bool:
    """Whether row ``c``'s matrixopt class takes ``state_precision``."""
    return "state_precision" in inspect.signature(matrixopt_classes()[c.optimizer]).parameters


def missing(c: Row) -> str | None:
    """Why this build cannot run row ``c`` (None if it can): a matrixopt feature it lacks, or
    a peer that is not installed."""
    if not c.matrixopt:
        return not_installed(c.optimizer)
    reasons = []
    if c.precision != "fp32" and not takes_precision(c):
        reasons.append("state_precision")
    if c.in_backward and not hasattr(matrixopt, "step_in_backward"):
        reasons.append("matrixopt.step_in_backward")
    return f"{' and '.join(reasons)} not in this build of matrixopt" if reasons else None


def make_optimizer(c: Row, model: torch.nn.Module, settings: Settings, lr: float = 1e-4, **arguments):
    """Row ``c``'s optimizer over ``model``, as the registry builds it: torch AdamW and the
    8-bit AdamWs over every param (torch AdamW in backward by :class:`TorchStepInBackward`), the
    others with ``matrixopt.param_groups``'s hidden matrices on their matrix rule and the rest
    on AdamW, matrixopt's with ``state_precision`` wherever the class takes it and the
    constructor ``arguments`` given (Python literals)."""
    if c.optimizer == ADAMW and c.in_backward:
        return TorchStepInBackward(model.parameters(), lr=lr, betas=settings.betas,
                                   weight_decay=settings.weight_decay)
    if c.optimizer in (ADAMW, BNB_ADAMW8BIT, TORCHAO_ADAMW8BIT):   # every param alike, in the model's order
        return build(c.optimizer, list(model.named_parameters()), [], lr, settings)
    groups = matrixopt.param_groups(model)
    matrices = [pair for g in groups if g["matrix"] for pair in g["params"]]
    others = [pair for g in groups if not g["matrix"] for pair in g["params"]]
    if c.matrixopt and takes_precision(c):
        arguments = {"state_precision": c.precision, **arguments}
    if c.master_weights is not None:
        arguments = {"master_weights": c.master_weights, **arguments}
    listed = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    name = f"{c.optimizer}[{listed}]" if listed else c.optimizer
    return build(name, matrices, others, lr, settings)


class PeakMeter:
    """Peak bytes of live tensors on ``device`` allocated since the meter started: overall
    (``peak``) and within named spans (``peaks[name]``, the max over spans of that name).
    CUDA: ``max_memory_allocated``; CPU: the running sum of the profiler's allocation events
    (see the module docstring)."""

    def __init__(self, device: torch.device, collect: bool = True):
        self.device = torch.device(device)
        self.collect = collect
        self.cuda = self.device.type == "cuda"
        self.peaks, self.peak = {}, 0
        self._active, self._span_names = [], set()

    def __enter__(self):
        if self.collect:   # garbage of earlier rows freed now, not inside the measurement
            gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._fold()
            return False
        self._profile.__exit__(*exc)
        events = allocation_events(self._profile)
        times = [t for t, _ in events]
        running = list(itertools.accumulate(n for _, n in events))
        self.peak = max(running, default=0)
        if min(running, default=0) < 0:
            warnings.warn("PeakMeter: tensors allocated under an earlier profiler were freed during the "
                          "measurement; its peak may be understated by their bytes")
        for e in self._profile.profiler.kineto_results.events():
            if e.name() in self._span_names:
                start, end = e.start_ns(), e.start_ns() + e.duration_ns()
                i, j = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
                at_start = running[i - 1] if i else 0
                self.peaks[e.name()] = max(self.peaks.get(e.name(), 0), at_start, *running[i:j])
        return False

    @contextmanager
    def span(self, name: str):
        if not self.cuda:
            self._span_names.add(name)
            with torch.profiler.record_function(name):
                yield
            return
        self._fold()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._active.append(name)
        try:
            yield
        finally:
            torch.cuda.synchronize(self.device)
            self._fold()
            self._active.pop()

    def _fold(self):
        """Credit the peak since the last reset to every open span (CUDA)."""
        now = torch.cuda.max_memory_allocated(self.device) - self.base
        self.peak = max(self.peak, now)
        for name in self._active:
            self.peaks[name] = max(self.peaks.get(name, 0), now)


def train_step(model, opt, tokens, meter: PeakMeter, in_backward: bool, autocast: bool = False) -> None:
    """Forward (under bf16 autocast with ``autocast``), backward and (unless the optimizer
    steps in backward) step and zero_grad."""
    with meter.span("forward"), torch.autocast(tokens.device.type, torch.bfloat16, enabled=autocast):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    with meter.span("backward"):
        loss.backward()
    if not in_backward:
        with meter.span("optimizer step"):
            opt.step()
            opt.zero_grad(set_to_none=True)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def layer_grad_bytes(model: Transformer) -> int:
    """Bytes of the largest layer's gradients: the embedding, a block, or the final norm and
    head (each param once: a tied head counts in the embedding)."""
    seen = set()

    def new(module):
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(map(id, params))
        return params

    layers = [new(model.tok_embeddings), *(new(block) for block in model.layers), new(model.norm) + new(model.output)]
    return max(tensor_bytes(params) for params in layers)


def saved_activation_bytes(model: Transformer, tokens: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward and loss, each storage
    once, the model's own params and buffers and the input tokens excluded."""
    own = {host.storage_id(t) for t in itertools.chain(model.parameters(), model.buffers(), [tokens])}
    saved = {}

    def pack(t):
        if host.storage_id(t) not in own:
            saved[host.storage_id(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    del loss
    return sum(saved.values())


def build_model(shape: Shape, seq_len: int, device, dtype=torch.float32, checkpoint: bool = False) -> Transformer:
    """The model of ``shape``, its params created on ``device`` in ``dtype`` (a 7B model
    built in fp32 first would not fit the budget its bf16 copy is measured in), each block
    checkpointed with ``checkpoint``."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Transformer(dataclasses.replace(shape.model_config(seq_len), checkpoint=checkpoint))
    finally:
        torch.set_default_dtype(default)


def random_tokens(shape: Shape, batch: int, seq_len: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(shape.vocab_size, (batch, seq_len + 1), generator=generator).to(device)


def step_temporaries(c: Row, shape: Shape, batch: int, seq_len: int, settings: Settings, device,
                     dtype=torch.float32) -> int:
    """Peak bytes one optimizer step allocates beyond the state it leaves (its temporaries),
    on their own: a fresh optimizer over a fresh model with the gradients of one backward on
    the row's tokens (a low-rank refresh's work can depend on the gradients' rank), the larger
    of its first step (above the state it creates) and its second. For a step in backward,
    which updates each param on its own, the matrixopt step runs one matrix per bucket
    (``max_bucket_elements = 1``); torch's recipe is one AdamW per param already."""
    model = build_model(shape, seq_len, device, dtype)
    tokens = random_tokens(shape, batch, seq_len, device)
    model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    opt = make_optimizer(Row(c.optimizer, c.precision, master_weights=c.master_weights), model, settings)
    if c.in_backward and c.matrixopt:
        opt.max_bucket_elements = 1
    peaks = []
    for _ in range(2):
        before = state_bytes(opt)
        with PeakMeter(device, collect=False) as meter:
            opt.step()
        peaks.append(meter.peak - (state_bytes(opt) - before))
    return max(peaks)


def measure(c: Row, shape: Shape, batch: int, seq_len: int, settings: Settings, device,
            dtype=torch.float32, temporaries: int | None = None, activations: int | None = None) -> dict:
    """Row ``c``: the measured peak of two training steps from a fresh model and optimizer,
    the byte model's terms (see the module docstring) and the peak of each phase. Raises
    what the optimizer raises."""
    tokens = random_tokens(shape, batch, seq_len, device)
    with PeakMeter(device) as meter:
        model = build_model(shape, seq_len, device, dtype)
        opt = make_optimizer(c, model, settings)
        handle = None if not c.in_backward else opt if isinstance(opt, TorchStepInBackward) else \
            matrixopt.step_in_backward(opt)
        for i in range(2):
            with meter.span(f"step {i + 1}"):
                train_step(model, opt, tokens, meter, c.in_backward)
        state = state_bytes(opt)
        low_bits = low_bits_bytes(opt)
        params = sum(p.numel() for p in model.parameters())
        weights = tensor_bytes(itertools.chain(model.parameters(), model.buffers()))
        grads = layer_grad_bytes(model) if c.in_backward else tensor_bytes(model.parameters())
        if handle is not None:
            handle.remove()
        del opt, model, handle
    row = {"optimizer": c.label, "in_backward": c.in_backward, "peak_MB": meter.peak / MB, "vs_adamw": None,
           "weights_MB": weights / MB, "grads_MB": grads / MB, "state_MB": state / MB}
    if activations is not None and temporaries is not None:
        loss_grads = loss_gradient_bytes(shape, batch, seq_len)
        backward_start, optimizer_step = activations + loss_grads, grads + temporaries
        model_bytes = weights + state + (backward_start + optimizer_step if c.in_backward else
                                         max(backward_start, optimizer_step))
        row.update(activations_MB=activations / MB, loss_grads_MB=loss_grads / MB, temporaries_MB=temporaries / MB,
                   model_MB=model_bytes / MB, measured_minus_model_MB=(meter.peak - model_bytes) / MB,
                   measured_minus_model_pct=100 * (meter.peak - model_bytes) / meter.peak)
        row.update(bytes_per_param(params, weights, low_bits, grads, state, temporaries))
    row.update({f"{column}_peak_MB": meter.peaks[span] / MB if span in meter.peaks else None
                for column, span in PHASES.items()})
    return row


#: Table column → span of :func:`train_step` / :func:`measure` whose peak it shows.
PHASES = {"forward": "forward", "backward": "backward", "step": "optimizer step", "step1": "step 1", "step2": "step 2"}


def low_bits_bytes(opt) -> int:
    """Bytes of the low halves of lean weights' masters in ``opt``'s state (matrixopt's
    ``weight_low_bits``: ``master_weights`` "int8"/"int16"; 0 for every other optimizer)."""
    return sum(v.numel() * v.element_size() for s in getattr(opt, "state", {}).values() for k, v in s.items()
               if k == "weight_low_bits")


def bytes_per_param(params: int, weights: int, low_bits: int, grads: int, state: int, temporaries: int) -> dict:
    """The step's bytes per parameter, activations excluded, split as the byte model's terms:
    weights (params and buffers), the low bits of their masters (``master_weights``), the
    gradients held at once, the rest of the optimizer state, the step's temporaries; and
    their sum."""
    split = {"weights_B": weights, "low_bits_B": low_bits, "grads_B": grads, "state_B": state - low_bits,
             "temporaries_B": temporaries}
    split = {key: value / params for key, value in split.items()}
    return {**split, "step_B_per_param": sum(split.values())}


def loss_gradient_bytes(shape: Shape, batch: int, seq_len: int, element_size: int = 4) -> int:
    """Bytes of the cross-entropy's backward at backward's start: the gradients of the
    log-probabilities and of the logits, each (batch·seq_len, vocab) fp32."""
    return 2 * batch * seq_len * shape.vocab_size * element_size


def run(quick: bool = False, config: str | None = None, batch: int | None = None, seq_len: int | None = None,
        optimizers=None, precisions=PRECISIONS, device=None, fit_budget_gib: float | None = None,
        fit_configs=None, settings: Settings | None = None, weights: str = "fp32"):
    """Every row on one config, with fp32 or bf16 ``weights`` (bf16: matrixopt's rows also
    with each ``master_weights`` value); on CUDA (or with ``fit_budget_gib``) also the largest
    config that fits the budget (GiB; 24 by default) per optimizer. Returns (table sections,
    extra JSON, figure)."""
    device = default_device(device)
    cuda = device.type == "cuda"
    config = config or ("quick" if quick else "1B" if cuda else "70M")
    batch = batch or 1
    seq_len = seq_len or (64 if quick else 128)
    settings = settings or Settings()
    shape = CONFIGS[config]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[weights]
    rows_to_run = table_rows(optimizers, precisions, lean=weights == "bf16")
    tokens = random_tokens(shape, batch, seq_len, device)
    model = build_model(shape, seq_len, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    activations = saved_activation_bytes(model, tokens)
    del model
    # matrixopt measures its stack-or-not limits once per process, at an optimizer's first
    # step: measured here, no row's peak or temporaries include the measurement.
    stack_limits = {f"{kind} {dtype_name}": matrixopt.batching.stack_limit(kind, device, getattr(torch, dtype_name))
                    for kind in (matrixopt.batching.ORTHOGONALIZE, matrixopt.batching.LOWRANK)
                    for dtype_name in dict.fromkeys(("float32", str(dtype).removeprefix("torch.")))}
    rows, notes, temporaries = [], [], {}
    progress = tqdm(rows_to_run, desc="memory", unit="row")
    for c in progress:
        progress.set_postfix_str(c.label)

        def measured(c=c):
            key = (c.optimizer, c.precision, c.in_backward and c.matrixopt, c.master_weights)
            if key not in temporaries:
                temporaries[key] = step_temporaries(c, shape, batch, seq_len, settings, device, dtype)
            return measure(c, shape, batch, seq_len, settings, device, dtype, temporaries=temporaries[key],
                           activations=activations)

        add_row(rows, notes, c.label, c.matrixopt, missing(c), measured, f"on {device.type}")
    progress.close()
    add_ratios(rows)
    title = (f"{config}: {params / 1e6:.1f}M params (d={shape.dim}, {shape.n_layers} layers, h={shape.hidden_dim}, "
             f"vocab {shape.vocab_size}), batch {batch} × {seq_len} tokens, {weights} weights, {device.type}")
    sections = {title: [r for r in rows if "note" not in r],
                "Not run in this build": [r for r in rows if "note" in r],
                "Targets (issue 15): peak vs torch.optim.AdamW's": targets(rows)}
    extra = {"settings": {"config": config, "batch": batch, "seq_len": seq_len, "device": str(device),
                          "dtype": str(dtype).removeprefix("torch."), "activations_bytes": activations,
                          "stack_limits": stack_limits,
                          **vars(settings)},
             "byte_model": "W + S + max(A + L, G + T); with a step in backward W + S + A + L + G + T "
                           "(see benchmarks/memory.py)", "notes": notes + PEER_NOTES}
    if cuda or fit_budget_gib is not None:
        budget = (fit_budget_gib or 24) * GiB
        fit_rows = fit_search(table_rows(optimizers, precisions), fit_configs or FIT_CONFIGS, budget, settings, device)
        fit_title = f"Largest config whose step fits in {budget / GiB:g} GiB (bf16 weights, batch 1 × 256 tokens)"
        sections[fit_title] = fit_rows
    return sections, extra, figure(title, sections[title])


def add_row(rows: list, notes: list, label: str, is_matrixopt: bool, reason: str | None, measured,
            where: str) -> None:
    """Append ``measured()``'s row to ``rows`` (and print it), or, where it cannot run, a row
    with a note why: ``reason`` (a missing install) or the error of a peer that does not run
    ``where`` (matrixopt's errors are raised: they are bugs), also added to ``notes``."""
    if reason is None:
        try:
            row = measured()
        except Exception as error:
            if is_matrixopt:
                raise
            reason = f"does not run {where}: {first_line(error)}"
            gc.collect()
    if reason is not None:
        row = {"optimizer": label, "note": reason}
        notes.append(f"{label}: {reason}")
    rows.append(row)
    tqdm.write(str(row))


def first_line(error: Exception) -> str:
    """``Type: the first line of the message``, for a table cell."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"


def add_ratios(rows: list[dict]) -> None:
    """Each row's peak relative to torch.optim.AdamW's."""
    base = next((r for r in rows if r["optimizer"] == ADAMW and "peak_MB" in r), None)
    for r in rows:
        if "peak_MB" in r and base is not None:
            r["vs_adamw"] = r["peak_MB"] / base["peak_MB"]


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured ratio (or why it has none)."""
    out = []
    for (name, precision, in_backward), limit in TARGETS.items():
        label = Row(name, precision, in_backward).label
        row = next((r for r in rows if r["optimizer"] == label), None)
        ratio = None if row is None else row.get("vs_adamw")
        out.append({"row": label, "target": f"≤ {limit:.0%}", "vs_adamw": ratio,
                    "met": None if ratio is None else ratio <= limit,
                    "note": "not in this run" if row is None else row.get("note")})
    return out


def fits(c: Row, shape: Shape, budget: int, settings: Settings, device, seq_len: int = 256) -> float | None:
    """Peak bytes of two training steps of ``shape`` in bf16 for row ``c``, or None when it
    does not fit in ``budget``: on CUDA under ``set_per_process_memory_fraction`` (an OOM),
    elsewhere when the measured peak exceeds it."""
    device = torch.device(device)
    try:
        peak = measure(c, shape, 1, seq_len, settings, device, dtype=torch.bfloat16)["peak_MB"] * MB
    except torch.OutOfMemoryError:
        peak = None
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return peak if peak is not None and peak <= budget else None


def largest_fitting(names, try_config) -> tuple[str | None, float | None]:
    """The largest of ``names`` (in increasing size) for which ``try_config(name)`` gives a
    peak (None: it does not fit), and that peak. A step's memory grows with the config, so
    the configs that fit are a prefix of ``names``: a binary search tries ⌈log₂(n+1)⌉ of them
    (3 of GaLore's 6), each try a model built and stepped."""
    fitting, lo, hi = (None, None), 0, len(names)   # names[:lo] fit, names[hi:] do not
    while lo < hi:
        mid = (lo + hi) // 2
        peak = try_config(names[mid])
        if peak is None:
            hi = mid
        else:
            fitting, lo = (names[mid], peak), mid + 1
    return fitting


def fit_search(rows_to_run, configs, budget: int, settings: Settings, device) -> list[dict]:
    """Per row, the largest of ``configs`` whose step fits in ``budget`` bytes."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    out = []
    try:
        for c in rows_to_run:
            reason = missing(c)
            if reason is not None:
                out.append({"optimizer": c.label, "note": reason})
                continue
            try:
                name, peak = largest_fitting(configs, lambda n: fits(c, CONFIGS[n], budget, settings, device))
            except Exception as error:
                if c.matrixopt:
                    raise
                out.append({"optimizer": c.label, "note": first_line(error)})
                continue
            out.append({"optimizer": c.label, "largest_config": name,
                        "params_M": None if name is None else params_of(CONFIGS[name]) / 1e6,
                        "peak_GiB": None if peak is None else peak / GiB})
            tqdm.write(str(out[-1]))
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return out


def params_of(shape: Shape) -> int:
    """Parameter count of a config (untied head)."""
    d, h, v = shape.dim, shape.hidden_dim, shape.vocab_size
    return 2 * v * d + d + shape.n_layers * (4 * d * d + 3 * d * h + 2 * d)


def figure(title: str, rows: list[dict]):
    """Stacked bars of the byte model per row, the measured peak as a mark, and the issue's
    40% / 45% of AdamW's peak as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "peak_MB" in r]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.8))
    names = [r["optimizer"] for r in rows]
    left = [0.0] * len(rows)
    for key, label, color in (("weights_MB", "weights", "tab:gray"), ("state_MB", "optimizer state", "tab:orange")):
        ax.barh(names, [r[key] for r in rows], left=left, color=color, label=label)
        left = [x + r[key] for x, r in zip(left, rows)]
    modeled = [r.get("model_MB") is not None for r in rows]
    at_step = [m and r["grads_MB"] + r["temporaries_MB"] >= r["activations_MB"] + r["loss_grads_MB"]
               for m, r in zip(modeled, rows)]
    # the terms each row's model adds: both moments' with a step in backward, else the larger's
    grads_too = [m and (r["in_backward"] or g) for m, g, r in zip(modeled, at_step, rows)]
    activations_too = [m and (r["in_backward"] or not g) for m, g, r in zip(modeled, at_step, rows)]
    for key, label, color, when in (("grads_MB", "gradients held", "tab:blue", grads_too),
                                    ("temporaries_MB", "step temporaries", "tab:cyan", grads_too),
                                    ("activations_MB", "activations", "tab:green", activations_too),
                                    ("loss_grads_MB", "loss gradients", "tab:olive", activations_too)):
        widths = [r[key] if w else 0.0 for r, w in zip(rows, when)]
        ax.barh(names, widths, left=left, color=color, label=label)
        left = [x + w for x, w in zip(left, widths)]
    ax.scatter([r["peak_MB"] for r in rows], names, color="black", marker="|", s=200, zorder=3,
               label="measured peak")
    base = next((r["peak_MB"] for r in rows if r["optimizer"] == ADAMW), None)
    if base is not None:
        for fraction, style in ((0.40, ":"), (0.45, "--")):
            ax.axvline(fraction * base, color="tab:red", linestyle=style, linewidth=1,
                       label=f"{fraction:.0%} of AdamW's peak")
    ax.invert_yaxis()
    ax.set_xlim(0, 1.03 * max(max(left), max(r["peak_MB"] for r in rows)))
    ax.set_xlabel("MB (bars: byte model W + S + max(A + L, G + T), with a step in backward W + S + A + L + G + T; "
                  "mark: measured)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.65 / (0.32 * len(rows) + 0.5)), ncol=4, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
