"""Stack or not: the matrix size from which a matrix's work runs alone, measured where it runs.

Same-shape matrices share a bucket and their work runs on one stack (one batched Newton-Schulz,
one batched projection), which saves a kernel launch and a Python round per matrix but copies
every matrix into the stack and back out of it. Which of the two wins depends on the device,
the thread count, the CPU and the dtype: a table measured once on one machine at one thread
loses on another CPU. :func:`stack_limit` gives, per ``kind`` of work, the number of
elements m·n from which a matrix runs alone (a bucket of its own), taken from, in order:

1. ``table``, an optimizer's fixed per-device-type table (its ``unbatched_elements``, e.g.
   ``{"cpu": 1 << 18}``; a device type it does not name: no limit), when it sets one;
2. ``MATRIXOPT_STACK_LIMITS`` when set: ``default`` pins :data:`DEFAULT_LIMITS` (the tables
   measured on the reference CPU); comma-separated ``kind:device_type=elements`` entries pin
   those and leave the rest at the defaults (``MATRIXOPT_STACK_LIMITS=orthogonalize:cpu=65536``).
   Nothing is measured then;
3. the measurement of this process, or of an earlier one on the same machine (persisted in
   ``$MATRIXOPT_STACK_CACHE``, else ``$XDG_CACHE_HOME/matrixopt/stack_limits.json``, else
   ``~/.cache/matrixopt/stack_limits.json``; ``MATRIXOPT_STACK_CACHE=off`` keeps results in
   the process only), keyed by kind, device (type and index), dtype, torch's CPU thread count,
   the CPU model or the CUDA device's name and the torch version;
4. else :func:`measure`, once per key (on a 2-core CPU at one thread ~0.2 s for Newton-Schulz,
   ~40 ms for the low-rank work; device types other than CPU and CUDA are not measured: no
   limit, as before).

Memory: the measurement allocates each rung's matrices for a moment, at an optimizer's first step
(inside the first backward with ``step_in_backward``): ~10-20 MB on a CPU, on a GPU up to ~200 MiB
at the 2048² rung plus its temporaries, kept by the caching allocator. Where the first step's
peak matters, pin the limits or let an earlier process persist them.

The measurement times the kernels of a bucket's work (the rule's per-bucket ones included),
not the shell's Python per bucket, which favours stacking small matrices a little more; it
decides by elements, as the fixed tables did, from square matrices (a 128×512 Newton-Schulz
is a quarter of a 256² one's work at the same elements).

Determinism: stacked and one-by-one results differ in rounding (~1e-7), so a measured limit
makes bucketing, and the last bits of a trajectory, depend on the machine. Runs that must be
bit-identical (the test suite, golden trajectories) pin the limits, by setting
``MATRIXOPT_STACK_LIMITS=default`` (tests/conftest.py does) or a fixed table on the optimizer.

Distributed: every rank must build the same buckets, or their collectives mismatch and hang;
ranks measure on their own, so where a bucket's work spans a process group the planner takes
:func:`agree` of the limit (the ranks' smallest), once per optimizer and key.
"""
import functools
import json
import math
import os
import platform
from pathlib import Path
from time import perf_counter

import torch
import torch.distributed as dist

from matrixopt.kernels import newton_schulz

from .ns_table import MUON_COEFFICIENTS

#: Kinds of work whose batching is measured: Newton-Schulz on a stack (Muon, ROOT, ARO), and
#: a low-rank projection with its back-projection added to the weights (GaLore, DCT, CoSO).
ORTHOGONALIZE, LOWRANK = "orthogonalize", "lowrank"
#: A limit no matrix reaches: every size shares stacks.
NO_LIMIT = 1 << 62
#: The limits pinned by ``MATRIXOPT_STACK_LIMITS=default``: measured with the step benchmark's
#: batching table at one thread on the reference CPU (8 same-shape matrices,
#: benchmarks/results/step-cpu2-2026-12-01.md). Muon: one matrix per bucket took 1.1-1.6×
#: the stacked time up to 128×512, 0.95× at 256² and 512², 0.88× at 512×1376; GaLoreAdamW
#: (which adds each back-projection into its weight in one matmul when alone): 0.78-0.88×
#: from 128² on, 0.98-1.01× at 32² and 64². No CUDA entry: on an H200 batching pays for
#: Newton-Schulz up to 2048².
DEFAULT_LIMITS = {ORTHOGONALIZE: {"cpu": 1 << 18}, LOWRANK: {"cpu": 1 << 14}}
ENV_LIMITS, ENV_CACHE = "MATRIXOPT_STACK_LIMITS", "MATRIXOPT_STACK_CACHE"
#: The sides of the square matrices measured, smallest first, each rung 8× the work of the
#: one before; below CUDA Newton-Schulz's Triton sizes (no autotuning for a measurement).
SIDES = (32, 64, 128, 256, 512, 1024, 2048)
#: Same-shape matrices per rung: enough for a stack's batch to spread over a few threads.
COUNT = 4
#: Alone counts as not slower up to this fraction over the stacked time (ties run alone: no
#: copies, and one matrix's temporaries at a time).
TOLERANCE = 0.05
#: Consecutive rungs at which alone must not be slower for the climb to stop there.
CONFIRM = 2
#: Interleaved tries per rung (the fastest of each counts, which a busy CPU's stalls do not
#: reach): at least MIN_TRIES, more while that many of the fastest would take less than
#: RUNG_SECONDS, at most MAX_TRIES. Small rungs, where a wrong answer costs most (a lone 32²
#: Newton-Schulz is 3-4× slower than stacked), are cheap to repeat.
MIN_TRIES, MAX_TRIES, RUNG_SECONDS = 3, 10, 0.02
#: The climb stops before a rung whose MIN_TRIES would take the measurement past this many
#: seconds (a rung's work grows as the cube of its side; the time already spent counts as
#: the clock says, stalls of a busy CPU included). A matrix that big runs alone, as it
#: does beyond the ladder's top where stacking still paid: its own kernels are then long
#: enough for a launch not to count, and a stack only adds copies and memory.
MEASURE_SECONDS = 0.3
#: Version of the measurement: a persisted result of another version is measured again.
FORMAT = 1

# Five Newton-Schulz steps (Muon's quintic): the values do not change the cost.
_SCHEDULE = [MUON_COEFFICIENTS] * 5
_measured: dict[str, int] = {}


def stack_limit(kind: str, device: torch.device, dtype: torch.dtype, table: dict | None = None) -> int:
    """Elements m·n from which an m×n matrix's ``kind`` of work (:data:`ORTHOGONALIZE`,
    :data:`LOWRANK`) runs alone on ``device`` for params of ``dtype`` (the planner passes the
    params' dtype; Muon's bf16 Newton-Schulz on a GPU is measured in it too); smaller ones
    share stacks. ``table``: an
    optimizer's fixed per-device-type table, which wins. See the module docstring."""
    if kind not in DEFAULT_LIMITS:
        raise ValueError(f"Unknown kind of work {kind!r}; expected one of {tuple(DEFAULT_LIMITS)}")
    if table is not None:
        return table.get(device.type, NO_LIMIT)
    pinned = _pinned()
    if pinned is not None:
        return pinned[kind].get(device.type, NO_LIMIT)
    if device.type not in ("cpu", "cuda"):
        return NO_LIMIT
    key = _key(kind, device, dtype)
    if key not in _measured:
        path = _cache_path()
        stored = _read(path).get(key) if path else None
        _measured[key] = stored or measure(kind, device, dtype)
        if path and not stored:
            _store(path, key, _measured[key])
    return _measured[key]


def measure(kind: str, device: torch.device, dtype: torch.dtype) -> int:
    """Time :data:`COUNT` same-shape matrices' ``kind`` of work as one stack (the copy in
    and the split back included, as a step does them) and one at a time, on square
    matrices of the :data:`SIDES`, smallest first, until alone has not been slower (within
    :data:`TOLERANCE`) at :data:`CONFIRM` rungs in a row, or the next rung would exceed
    :data:`MEASURE_SECONDS`; the elements of the first rung of the last run at which alone
    was not slower (if stacking paid at the last rung measured: of the next rung). Pins and
    caches play no part (:func:`stack_limit` applies them)."""
    with torch.no_grad():
        return _crossover(SIDES, functools.partial(_rung, kind, device=device, dtype=dtype))


def agree(limit: int, process_group, device: torch.device | None = None) -> int:
    """The smallest of the ``limit`` each rank of ``process_group`` measured, so that every
    rank builds the same buckets; a collective, which every rank of the group must call
    (the planner does, where a bucket's matrix work spans the group, once per optimizer and
    key).
    ``device``: where the collective's tensor lives (the params' device; None: the current
    CUDA device under NCCL, else the CPU)."""
    if dist.get_world_size(process_group) == 1:
        return limit
    if device is None:
        nccl = dist.get_backend(process_group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    value = torch.tensor([limit], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=process_group)
    return int(value.item())


# -- the measurement ------------------------------------------------------------------------

def _crossover(sides, rung) -> int:
    """The limit from ``rung(side)`` -> (stacked seconds, alone seconds) on ``sides``."""
    start, run, begin = None, 0, perf_counter()
    for side, following in zip(sides, [*sides[1:], 2 * sides[-1]]):
        stacked, alone = rung(side)
        if alone <= (1 + TOLERANCE) * stacked:
            start, run = start or side * side, run + 1
        else:
            start, run = None, 0
        next_rung = MIN_TRIES * (stacked + alone) * (following / side) ** 3
        if run == CONFIRM or perf_counter() - begin + next_rung > MEASURE_SECONDS:
            break
    return start or following * following


def _rung(kind: str, side: int, *, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """Seconds of :data:`COUNT` side×side matrices' work as one stack and one at a time,
    the fastest of a few interleaved tries."""
    work, lists = _WORK[kind], _inputs(kind, side, device, dtype)
    runs = (lambda: work(*lists),
            lambda: [work(*([t] for t in matrix)) for matrix in zip(*lists)])
    best, tries = [math.inf, math.inf], 0
    while tries < MIN_TRIES or (tries < MAX_TRIES and tries * sum(best) < RUNG_SECONDS):
        best = [min(b, _seconds(run, device)) for b, run in zip(best, runs)]
        tries += 1
    return best[0], best[1]


def _inputs(kind: str, side: int, device: torch.device, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """The lists of :data:`COUNT` (1, side, ·) tensors a rung's work takes."""
    generator = torch.Generator().manual_seed(0)   # not the global one: a step must not move it

    def draw(cols: int, zero: bool = False):
        return [(torch.zeros(1, side, cols) if zero else torch.randn(1, side, cols, generator=generator)).to(device, dtype)
                for _ in range(COUNT)]

    if kind == ORTHOGONALIZE:
        return [draw(side), draw(side), draw(side)]   # weights, gradients, momenta
    rank = max(1, side // 4)
    return [draw(side), draw(side), draw(rank), draw(rank, zero=True), draw(rank, zero=True)]   # + bases, moments


def _seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return perf_counter() - start


def _stack(tensors):
    """One stack of (1, ...) tensors; a single one as it is (no copy), as ``stacked_call``."""
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def _apply_update(weights, updates) -> None:
    """W ← (1 − ηλ)W − η·U, as ``apply_update`` (foreach over the bucket)."""
    torch._foreach_mul_(weights, 1 - 1e-4)
    torch._foreach_add_(weights, updates, alpha=-1e-3)


def _orthogonalize(weights, grads, momenta) -> None:
    """A Muon bucket's work (``muon``): momentum, Nesterov input, Newton-Schulz on their
    stack, split, applied."""
    torch._foreach_lerp_(momenta, grads, 0.05)
    inputs = torch._foreach_lerp(grads, momenta, 0.95)
    _apply_update(weights, list(newton_schulz(_stack(inputs), _SCHEDULE, method="auto").split(1)))


def _lowrank(weights, grads, bases, exp_avgs, exp_avg_sqs) -> None:
    """A low-rank bucket's (``LowRankAdamW``): L = G·P, Adam on L (``lowrank_adam``), then
    back: a stack's back-projections split and applied, a lone matrix's added into its
    weight by one matmul (``add_back``)."""
    lows = list((_stack(grads) @ _stack(bases)).split(1))
    steps = [torch.zeros_like(m) for m in exp_avgs]
    torch._fused_adam_(steps, lows, exp_avgs, exp_avg_sqs, [], [torch.ones((), device=lows[0].device)] * len(lows),
                       lr=-1.0, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    if len(weights) > 1:
        _apply_update(weights, list((_stack(steps) @ _stack(bases).mT).split(1)))
    else:
        weights[0].baddbmm_(steps[0], bases[0].mT, beta=1 - 1e-4, alpha=-1e-3)


_WORK = {ORTHOGONALIZE: _orthogonalize, LOWRANK: _lowrank}


# -- pins and the persisted cache ------------------------------------------------------------

def _pinned() -> dict | None:
    """``MATRIXOPT_STACK_LIMITS`` as {kind: {device type: elements}} (None: unset)."""
    value = os.environ.get(ENV_LIMITS)
    if value is None:
        return None
    limits = {kind: dict(table) for kind, table in DEFAULT_LIMITS.items()}
    for entry in filter(None, (e.strip() for e in value.split(","))):
        if entry == "default":
            continue
        kind, _, rest = entry.partition(":")
        device_type, _, elements = rest.partition("=")
        if kind not in limits or not device_type or not elements.isdigit():
            raise ValueError(f"{ENV_LIMITS}={value!r}: expected 'default' or comma-separated "
                             f"kind:device_type=elements entries, kind one of {tuple(limits)}; got {entry!r}")
        limits[kind][device_type] = int(elements)
    return limits


def _key(kind: str, device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        device, model = torch.device("cuda", index), torch.cuda.get_device_name(index)
    else:
        model = _cpu_model()
    return "|".join((kind, str(device), str(dtype).removeprefix("torch."), f"threads={torch.get_num_threads()}",
                     model, f"torch {torch.__version__}"))


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _cache_path() -> Path | None:
    value = os.environ.get(ENV_CACHE)
    if value is not None:
        return None if value in ("", "off") else Path(value)
    base = os.environ.get("XDG_CACHE_HOME")
    try:
        base = Path(base) if base else Path.home() / ".cache"
    except RuntimeError:   # no home directory: nothing persisted
        return None
    return base / "matrixopt" / "stack_limits.json"


def _read(path: Path) -> dict[str, int]:
    """The persisted limits of this :data:`FORMAT`; a missing, unreadable or corrupt file,
    or a malformed entry, counts as none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("limits"), dict):
        return {}
    return {k: v for k, v in data["limits"].items() if type(v) is int and v > 0}


def _store(path: Path, key: str, limit: int) -> None:
    """Add ``key`` to the persisted limits, atomically (a concurrent reader sees the old file or
    the new one). A cache that cannot be written only means measuring in the next process too."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"format": FORMAT, "limits": {**_read(path), key: limit}}, indent=1,
                                        sort_keys=True), encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        pass
