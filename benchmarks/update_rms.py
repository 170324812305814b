"""`python -m benchmarks update_rms`: how large a step each optimizer takes per unit lr.

"AdamW's lr carries over" holds when, at the same lr, an optimizer moves the hidden
matrices about as far as AdamW does (or, for the orthogonalized ones, further by the factor
their better-conditioned steps tolerate). This benchmark measures it: it trains the ``train``
benchmark's model on its data, with its schedule, clipping, weight decay and betas, every
optimizer at the same peak lr, and after each step records, for every hidden matrix W, the
RMS of ΔW/lr_t (lr_t: the scheduled lr of that step; ΔW includes the decoupled weight
decay) and of the step alone, (ΔW + lr_t·λ·W)/lr_t (galore-torch decays after the step,
which differs by O(lr_t²)). Per run it reports the mean over
matrices of these RMS in four windows of the run (the first step; just after the warmup,
5-15%; 45-55%; the last 10%), their lr-weighted mean over the run (Σ lr_t·rms_t / Σ lr_t,
the one that says how far the weights move) and its ratio to AdamW's in the same setting,
for each model width and run length. ``spectral_lr_weighted`` is the same lr-weighted mean
of the spectral norm ‖ΔW/lr‖₂ (mean over matrices): at equal RMS, a step whose energy sits
in a few directions (Adam's) has a larger spectral norm than an orthogonalized one, whose
singular values are all equal. ``grad_in_step_span`` is the lr-weighted mean of the share of
the gradient's energy that lies in the span of the step on the matrix's smaller side
(:func:`span_share`): about 1 for a full-rank step (AdamW, Muon: a little less where its
smallest singular directions fall under the cut that drops rounding), and for a low-rank one
(GaLoreAdamW, DCTAdamW) how much of the gradient its subspace holds — the part it descends on.

For GaLoreAdamW and DCTAdamW the projected-back step of an orthonormal basis has the
low-rank Adam step's Frobenius norm spread over m·n entries instead of r·max(m, n), so
``subspace_rms`` = rms / (scale·√(r/min(m, n))) is the RMS of the Adam step inside the
subspace (exact, not a model: P has orthonormal columns). Variants (e.g.
``"matrixopt.Muon[rms=0.6]"``, see :func:`benchmarks.optimizers.parse_variant`) can be
measured with ``--optimizers``.

``--corpus``: the train benchmark's other corpora (:mod:`benchmarks.corpora`), the data that
the update's profile, and so the lr that carries over, may depend on.

``--quick``: the train benchmark's quick model at widths 64 and 128, 200 and 600 steps, at
lr 3e-3 (AdamW's best on that grid); a few minutes on one CPU thread. Without it, widths
128, 256 and 512 (the default train model) at 320 and 1000 steps, lr 1e-3, for a GPU.
"""
import inspect
import math
from dataclasses import replace

import torch
from tqdm import tqdm

from .common import default_device
from . import corpora
from .optimizers import ADAMW, Settings, contenders, is_low_rank, matrixopt_classes, smaller_side_and_rank, variant_of
from .train import QUICK, TrainConfig, train_one

DEFAULT_OPTIMIZERS = (ADAMW, "matrixopt.Muon", "matrixopt.ROOT", "matrixopt.ARO", "matrixopt.GaLoreAdamW",
                      "matrixopt.DCTAdamW")
QUICK_SIZES = {"widths": (64, 128), "steps": (200, 600), "lr": 3e-3}
FULL_SIZES = {"widths": (128, 256, 512), "steps": (320, 1000), "lr": 1e-3}
# Fractions of the run: [start, end) of each reported window (the first step is its own).
WINDOWS = {"early": (0.05, 0.15), "mid": (0.45, 0.55), "late": (0.9, 1.0)}


def rms(t: torch.Tensor) -> float:
    return t.float().pow(2).mean().sqrt().item()


def span_share(step: torch.Tensor, grad: torch.Tensor, tol: float = 1e-3) -> float:
    """‖G·P‖²/‖G‖² with P the projector onto the span of ``step`` on the smaller side of the
    m×n matrix (its right singular vectors for m ≥ n, else its left ones, times G from the
    left), keeping the singular directions above ``tol``·σ_max (rounding leaves the rest)."""
    step, grad = step.double().flatten(1), grad.double().flatten(1)
    if step.shape[0] < step.shape[1]:
        step, grad = step.mT, grad.mT
    _, sigma, Vh = torch.linalg.svd(step, full_matrices=False)
    basis = Vh[sigma > tol * sigma[0]]
    return ((grad @ basis.mT).square().sum() / grad.square().sum()).item()


class UpdateRMS:
    """The train loop's observer: per step, per hidden matrix, RMS(ΔW/lr_t) and the RMS of the
    step without its weight decay, (ΔW + lr_g·λ_g·W)/lr_t with lr_g, λ_g the matrix's group's
    (which may differ from lr_t, λ when a variant rescales the group; lr_g·λ_g = lr_t·λ)."""

    def __init__(self):
        self.delta, self.step_only, self.spectral, self.captured, self.lrs = [], [], [], [], []

    def start(self, matrices, opt):
        self.names = [n for n, _ in matrices]
        self.params = [p for _, p in matrices]
        group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
        self.groups = [group_of[id(p)] for p in self.params]

    def before(self, step, lr):
        self.old = [p.detach().clone() for p in self.params]

    def after(self, step, lr):
        delta, step_only, spectral, captured = [], [], [], []
        for p, old, g in zip(self.params, self.old, self.groups):
            d = p.detach() - old
            step = d + g["lr"] * g["weight_decay"] * old
            delta.append(rms(d) / lr)
            step_only.append(rms(step) / lr)
            spectral.append(torch.linalg.matrix_norm(d.float().flatten(1), ord=2).item() / lr)
            captured.append(span_share(step, p.grad) if p.grad is not None and step.any() else float("nan"))
        self.delta.append(delta)
        self.step_only.append(step_only)
        self.spectral.append(spectral)
        self.captured.append(captured)
        self.lrs.append(lr)
        self.old = None


def window_mean(per_step: list[float], start: float, end: float) -> float:
    n = len(per_step)
    lo, hi = round(start * n), max(round(start * n) + 1, round(end * n))
    return sum(per_step[lo:hi]) / (hi - lo)


def summarize(obs: UpdateRMS, select=None) -> dict:
    """The windows and lr-weighted means of the per-step mean over matrices (``select``: the
    indices of the matrices to average; default all)."""
    idx = range(len(obs.names)) if select is None else select

    def mean_over(rows):
        return [sum(row[i] for i in idx) / len(idx) for row in rows]

    delta, step_only, spectral = mean_over(obs.delta), mean_over(obs.step_only), mean_over(obs.spectral)
    captured = mean_over(obs.captured)
    total = sum(obs.lrs)
    out = {"first_step": delta[0]}
    out.update({name: window_mean(delta, *bounds) for name, bounds in WINDOWS.items()})
    out["lr_weighted"] = sum(lr * v for lr, v in zip(obs.lrs, delta)) / total
    out["step_only_lr_weighted"] = sum(lr * v for lr, v in zip(obs.lrs, step_only)) / total
    out["spectral_lr_weighted"] = sum(lr * v for lr, v in zip(obs.lrs, spectral)) / total
    out["grad_in_step_span"] = sum(lr * v for lr, v in zip(obs.lrs, captured)) / total
    return out


def low_rank_factor(name: str, params, rank_fraction: float) -> float | None:
    """scale·√(r/min(m, n)) of a matrixopt low-rank optimizer's matrices (None for the others,
    or where the matrices' factors differ)."""
    base, kwargs, _ = variant_of(name)
    cls = matrixopt_classes().get(base)
    if cls is None or not is_low_rank(name):
        return None
    rank = kwargs.get("rank", rank_fraction)
    factors = set()
    for p in params:
        k, r = smaller_side_and_rank(p, rank)
        if "rms_scale" in kwargs:
            scale = kwargs["rms_scale"] * math.sqrt(k / r)
        else:
            scale = kwargs.get("scale", inspect.signature(cls).parameters["scale"].default)
            scale = math.sqrt(k / r) if scale is None else scale   # the default: √(min(m, n)/r)
        factors.add(round(scale * math.sqrt(r / k), 12))
    return factors.pop() if len(factors) == 1 else None


def run(quick: bool = False, widths=None, steps=None, lr=None, optimizers=None, device=None, corpus=None):
    sizes = QUICK_SIZES if quick else FULL_SIZES
    widths, run_steps, lr = widths or sizes["widths"], steps or sizes["steps"], lr or sizes["lr"]
    base_cfg = QUICK if quick else TrainConfig()
    device = default_device(device)
    corpus_name, corpus = corpus or "shakespeare", corpora.named(corpus)
    names, notes = contenders(optimizers or DEFAULT_OPTIMIZERS)
    rows, traces = [], []
    total = len(names) * len(widths) * sum(run_steps)
    with tqdm(total=total, desc="update_rms", unit="step") as progress:
        for dim in widths:
            for n_steps in run_steps:
                cfg = replace(base_cfg, dim=dim, steps=n_steps, eval_every=max(1, n_steps // 4))
                adamw_lrw = adamw_spectral = None
                for name in names:
                    progress.set_postfix_str(f"d={dim} T={n_steps} {name}")
                    obs = UpdateRMS()
                    result = train_one(name, lr, cfg, corpus, device, progress, observer=obs)
                    square = [i for i, p in enumerate(obs.params) if p.shape[0] == p.shape[1]]
                    rect = [i for i, p in enumerate(obs.params) if p.shape[0] != p.shape[1]]
                    summary = summarize(obs)
                    if name == ADAMW:
                        adamw_lrw, adamw_spectral = summary["lr_weighted"], summary["spectral_lr_weighted"]
                    spectral, captured = summary.pop("spectral_lr_weighted"), summary.pop("grad_in_step_span")
                    row = {"dim": dim, "steps": n_steps, "optimizer": name, **summary,
                           "vs_adamw": summary["lr_weighted"] / adamw_lrw if adamw_lrw else None,
                           "spectral_lr_weighted": spectral,
                           "spectral_vs_adamw": spectral / adamw_spectral if adamw_lrw else None,
                           "attn_lr_weighted": summarize(obs, square)["lr_weighted"],
                           "ffn_lr_weighted": summarize(obs, rect)["lr_weighted"],
                           "subspace_rms": None, "grad_in_step_span": captured, "val_loss": result["val_loss"]}
                    factor = low_rank_factor(name, obs.params, Settings().rank_fraction)
                    if factor:
                        row["subspace_rms"] = summary["lr_weighted"] / factor
                    rows.append(row)
                    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                          flush=True)
                    traces.append({"dim": dim, "steps": n_steps, "optimizer": name, "lr": obs.lrs,
                                   "rms": [sum(r) / len(r) for r in obs.delta],
                                   "spectral": [sum(r) / len(r) for r in obs.spectral],
                                   "grad_in_step_span": [sum(r) / len(r) for r in obs.captured],
                                   "matrices": obs.names})
    sections = {f"RMS of ΔW/lr over the hidden matrices at peak lr {lr:g}": rows}
    extra = {"corpus": corpus_name, "lr": lr, "widths": list(widths), "run_steps": list(run_steps), "windows": WINDOWS,
             "base_config": {k: v for k, v in vars(base_cfg).items() if k not in ("lrs",)},
             "notes": notes, "traces": traces}
    return sections, extra, figure(traces)


def figure(traces):
    """RMS of ΔW/lr per step, one panel per (width, run length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys((t["dim"], t["steps"]) for t in traces))
    fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 4), squeeze=False)
    for ax, (dim, n_steps) in zip(axes[0], settings):
        for t in traces:
            if (t["dim"], t["steps"]) == (dim, n_steps):
                ax.plot(range(1, len(t["rms"]) + 1), t["rms"], label=t["optimizer"], lw=1)
        ax.set_yscale("log")
        ax.set_title(f"d={dim}, {n_steps} steps")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("RMS(ΔW / lr), mean over hidden matrices")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig
