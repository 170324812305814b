"""`python -m benchmarks step`: optimizer step time and state memory on LLaMA-like matrix sets.

A parameter set is the hidden-layer matrices of a LLaMA-style model (per layer wq, wk, wv,
wo of d×d, w1 and w3 of h×d, w2 of d×h; fp32) and, in the sets of :data:`EMBEDDING_ROWS`, a
token embedding on every optimizer's plain Adam(W) path, with a fixed random gradient. For each
optimizer: the median time of ``repeats`` steps after ``warmup`` steps (CUDA events on a
GPU, ``perf_counter`` on CPU), the bytes of optimizer state, and the peak memory the
optimizer adds, state plus a step's temporaries (on a GPU ``max_memory_allocated`` over the
steps minus what was allocated before it was built; on CPU the state plus the peak of one
step's allocations, from the profiler). The low-rank optimizers are also timed
with a projector refresh at every step (``update_proj_gap=1``), giving the refresh step's
cost and the step cost amortized over the refresh gap.
"""
import gc
import time
from dataclasses import replace

import torch
from tqdm import tqdm

import matrixopt
from matrixopt import batching as stack_limits

from . import passes
from .common import cpu_peak_bytes, default_device, median_ms
from .optimizers import ADAMW, PEER_EPS, Settings, build, contenders, is_low_rank, smaller_side_and_rank, state_bytes

# name: (d, h, layers). 60M and 350M as in the GaLore paper; 1B is the 822M-param matrix set
# (16 layers, h = 5632) of a LLaMA-1B-sized model; "60M-4L" is 60M's widths in 4 layers, with
# an embedding: the quick CPU set, where the default rank d/4 is 128 on every matrix; "tiny"
# a smaller one and "ci" one small enough for the tests.
SHAPES = {
    "ci": (64, 176, 1),
    "tiny": (256, 688, 4),
    "60M-4L": (512, 1376, 4),
    "60M": (512, 1376, 8),
    "350M": (1024, 2736, 24),
    "1B": (2048, 5632, 16),
}
#: The sets with a (rows × d) token embedding, on each optimizer's AdamW path: torch.optim.AdamW
#: itself (for torch.optim.Muon and the Muon peers too), matrixopt's fallback (a group with
#: ``matrix=False``), a low-rank peer's group without a rank. None projects it.
EMBEDDING_ROWS = {"60M-4L": 4096}
QUICK_SETS = ("60M-4L",)
SLOW_REFRESH_S = 2.0
# Table columns; ratios are to torch.optim.AdamW; refresh/amortized only for low-rank ones.
COLUMNS = ("optimizer", "step_ms", "step_vs_adamw", "refresh_step_ms", "amortized_ms", "state_MB",
           "state_vs_adamw", "peak_extra_MB")


def default_sets(quick: bool, cuda: bool) -> list[str]:
    if quick:
        return list(QUICK_SETS)
    return ["60M", "350M", "1B"] if cuda else ["60M", "350M"]


def llama_matrices(d: int, h: int, layers: int, device) -> list[tuple[str, torch.Tensor]]:
    """The named hidden-layer matrices of a LLaMA-style model, with fixed random gradients."""
    shapes = {"wq": (d, d), "wk": (d, d), "wv": (d, d), "wo": (d, d), "w1": (h, d), "w3": (h, d), "w2": (d, h)}
    generator = torch.Generator().manual_seed(0)
    params = []
    for layer in range(layers):
        for name, shape in shapes.items():
            p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device))
            p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device)
            params.append((f"layers.{layer}.{name}.weight", p))
    return params


def embedding(rows: int, d: int, device) -> list[tuple[str, torch.Tensor]]:
    """A rows×d token embedding with a fixed random (dense) gradient."""
    generator = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter((torch.randn(rows, d, generator=generator) * 0.02).to(device))
    p.grad = (torch.randn(rows, d, generator=generator) * 1e-3).to(device)
    return [("tok_embeddings.weight", p)]


def measure(name: str, params, settings: Settings, device, warmup: int, repeats: int, others=()) -> dict:
    """One optimizer on one parameter set (``params`` on its matrix rule, ``others`` on its
    AdamW): step time, state bytes, GPU peak."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    opt = build(name, params, list(others), lr=1e-4, settings=settings)
    row = dict.fromkeys(COLUMNS)
    row.update(optimizer=name, step_ms=median_ms(opt.step, device, warmup, repeats), state_MB=state_bytes(opt) / 2**20)
    if cuda:
        row["peak_extra_MB"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        row["peak_extra_MB"] = (state_bytes(opt) + cpu_peak_bytes(opt.step)) / 2**20
    del opt
    if is_low_rank(name):
        # Few repeats, since a refresh can take seconds; one that took more than SLOW_REFRESH_S
        # in the warm-up (galore-torch's full SVDs: 25 s on the 1B set) is timed once more.
        opt = build(name, params, list(others), lr=1e-4, settings=replace(settings, update_proj_gap=1))
        warm_up_ms = median_ms(opt.step, device, 0, 1)
        reps = 1 if warm_up_ms > 1e3 * SLOW_REFRESH_S else min(repeats, 3)
        row["refresh_step_ms"] = median_ms(opt.step, device, 0, reps)
        row["amortized_ms"] = row["step_ms"] + (row["refresh_step_ms"] - row["step_ms"]) / settings.update_proj_gap
        del opt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def run(quick: bool = False, sets=None, optimizers=None, warmup: int | None = None,
        repeats: int | None = None, device=None, settings: Settings | None = None):
    """Measure every optimizer on every set; returns (table sections, extra JSON, figure)."""
    device = default_device(device)
    sets = sets or default_sets(quick, device.type == "cuda")
    warmup = warmup if warmup is not None else (2 if quick else 5)
    repeats = repeats if repeats is not None else (5 if quick else 20)
    settings = settings or Settings()
    names, notes = contenders(optimizers, variants=True, peers=True)
    sections = {}
    progress = tqdm(total=len(sets) * len(names), desc="step", unit="opt")
    for set_name in sets:
        d, h, layers = SHAPES[set_name]
        params = llama_matrices(d, h, layers, device)
        others = embedding(EMBEDDING_ROWS[set_name], d, device) if set_name in EMBEDDING_ROWS else []
        count = sum(p.numel() for _, p in params + others)
        rows = []
        for name in names:
            progress.set_postfix_str(f"{set_name} {name}")
            rows.append(measure(name, params, settings, device, warmup, repeats, others))
            tqdm.write(str(rows[-1]))  # as it comes: a run cut short still shows what it measured
            progress.update()
        add_ratios(rows)
        ranks = sorted({smaller_side_and_rank(p, settings.rank_fraction)[1] for _, p in params})
        title = (f"{set_name}: {len(params)} matrices"
                 + "".join(f" + a {p.shape[0]}×{p.shape[1]} embedding on AdamW" for _, p in others)
                 + f", {count / 1e6:.1f}M params (d={d}, h={h}, {layers} layers; "
                 f"rank {', '.join(map(str, ranks))}, gap {settings.update_proj_gap})")
        sections[title] = rows
        del params, others
    progress.close()
    sections[f"Batching: {'Muon, GaLoreAdamW'}, 8 same-shape matrices, stacked vs one per bucket ({device.type})"] = \
        batching(CI_BATCHING_SHAPES if "ci" in sets else BATCHING_SHAPES, device, warmup, repeats)
    notes += ["state_MB counts each storage held by the state once: galore-torch's projector is a view of "
              "the full SVD factor, so the whole factor counts; APOLLO's and APOLLO-mini's random projection "
              "is a matrix held in the state (drawn again from a seed at a refresh only), and counts",
              "Low-rank peers: the same rank (APOLLO-mini: 1, with tensor-wise scaling, as its README "
              "configures it), refresh gap, lr, betas, weight decay and fp32 as matrixopt's, eps "
              f"{PEER_EPS:g} (matrixopt.GaLoreAdamW's); scales are each one's own convention (they do not "
              "change a step's cost); refresh_step_ms times each with a refresh at every step "
              "(update_proj_gap=1), as matrixopt's",
              "Embedding (in the sets that have one): plain Adam(W), never projected, on each optimizer's "
              "own AdamW path: torch.optim.AdamW for torch.optim.AdamW, torch.optim.Muon and the Muon peers; "
              "matrixopt's AdamW fallback (a matrix=False group); the low-rank peers' group without a rank "
              "(galore-torch and apollo-torch: a per-tensor Adam loop; pytorch-optimizer: foreach)",
              "torch.optim.Muon orthogonalizes in bf16 everywhere; matrixopt in bf16 on CUDA and fp32 "
              "elsewhere (its ns_dtype default)",
              "Batching table: the limits are elements m·n from which a matrix runs alone (None: none); "
              "'fixed limit' is matrixopt.batching.DEFAULT_LIMITS (measured on the reference CPU at one "
              f"thread), 'measured limit' what matrixopt.batching.measure finds here at "
              f"{torch.get_num_threads()} CPU threads (square matrices, kernels only), 'measure ms' its cost"]
    sections.update(passes.run())
    notes.append("Passes over memory (benchmarks.passes): the aten ops of one plain step that read or write "
                 "each tensor; torch's fused Adam/AdamW kernels declare their gradient arguments mutable in "
                 "their schema (they do not write them here), so the fallback's G counts one write")
    sections["Notes"] = [{"note": note} for note in notes]
    extra = {"settings": {"device": str(device), "warmup": warmup, "repeats": repeats, "dtype": "float32",
                          **vars(settings)}}
    return sections, extra, figure(sections)


#: Shapes of the batching table: where stacking same-shape matrices into one bucket pays.
BATCHING_SHAPES = [(32, 32), (64, 64), (128, 128), (64, 256), (128, 256), (256, 256), (128, 512), (512, 512),
                   (512, 1376)]
CI_BATCHING_SHAPES = [(32, 32), (256, 256)]   # for the "ci" set the tests run


def batching(shapes, device, warmup: int, repeats: int, count: int = 8) -> list[dict]:
    """ms per step of ``count`` same-shape matrices stacked into one bucket, and one matrix per
    bucket, for Muon and GaLoreAdamW (rank d/4, no refresh): the measurement behind each
    optimizer's ``unbatched_elements``; beside it, the fixed limit of its kind of work and the
    one measured on this machine (in the dtype its work runs in: Muon's ns_dtype)."""
    rows = []
    ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for cls, kind, dtype, kwargs in ((matrixopt.Muon, stack_limits.ORTHOGONALIZE, ns_dtype, {}),
                                     (matrixopt.GaLoreAdamW, stack_limits.LOWRANK, torch.float32,
                                      dict(rank=0.25, update_proj_gap=10**9))):
        start = time.perf_counter()
        limits = {"fixed limit": stack_limits.DEFAULT_LIMITS[kind].get(device.type),
                  "measured limit": stack_limits.measure(kind, device, dtype),
                  "measure ms": 1e3 * (time.perf_counter() - start)}
        for shape in shapes:
            times = {}
            for label, threshold in (("stacked", 1 << 62), ("one per bucket", 0)):
                g = torch.Generator().manual_seed(0)
                params = [torch.nn.Parameter((0.02 * torch.randn(shape, generator=g)).to(device)) for _ in range(count)]
                for p in params:
                    p.grad = (1e-3 * torch.randn(shape, generator=g)).to(device)
                opt = cls(params, lr=0.01, **kwargs)
                opt.max_bucket_elements, opt.unbatched_elements = 1 << 30, {device.type: threshold}
                times[label] = median_ms(opt.step, device, warmup, repeats)
            rows.append({"optimizer": cls.__name__, "shape": f"{count}×{shape[0]}×{shape[1]}",
                         "elements": shape[0] * shape[1], "stacked ms": times["stacked"],
                         "one per bucket ms": times["one per bucket"],
                         "one per bucket / stacked": times["one per bucket"] / times["stacked"], **limits})
            print(rows[-1], flush=True)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Step time and state memory relative to torch.optim.AdamW, when it was measured."""
    base = next((r for r in rows if r["optimizer"] == ADAMW), None)
    for r in rows:
        r["step_vs_adamw"] = r["step_ms"] / base["step_ms"] if base else None
        r["state_vs_adamw"] = r["state_MB"] / base["state_MB"] if base else None


def figure(sections: dict):
    """Bars of step time and state memory per optimizer for the largest set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, rows = [(t, rows) for t, rows in sections.items() if "step_ms" in rows[0]][-1]   # not the batching table
    names = [r["optimizer"] for r in rows]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.5), sharey=True)
    ax_time.barh(names, [r["amortized_ms"] or r["step_ms"] for r in rows], color="tab:gray",
                 label="amortized over the refresh gap")
    ax_time.barh(names, [r["step_ms"] for r in rows], color="tab:blue", label="step")
    ax_time.set_xlabel("ms per step")
    ax_time.legend(loc="lower right", fontsize=8)
    ax_mem.barh(names, [r["state_MB"] for r in rows], color="tab:orange")
    ax_mem.set_xlabel("optimizer state (MB)")
    ax_time.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
