"""`python -m benchmarks train`: a LLaMA-style character model on Shakespeare, per optimizer.

Every optimizer trains the same model (same init, seed and batches) for the same steps
and tokens, with the same schedule (linear warmup over the first 5% of steps, then cosine
to 10% of the peak lr), gradient clipping at norm 1, weight decay and betas. Its peak lr
is the best of the same grid for everyone (``lrs``, judged by the final validation loss),
extended by up to ``extend`` lrs at the grid's spacing beyond an end where an optimizer's
best sits (so the best is bracketed; one still at an end is flagged in
``best_lr_at_edge``), and the whole sweep is recorded. Every optimizer also runs at
AdamW's best lr (AdamW runs first): ``val_loss_at_adamw_lr`` is the loss a user who
keeps AdamW's tuned lr and weight decay gets, which README promises is a good start. Hidden-layer matrices get the optimizer's matrix rule;
embedding, head and norms get AdamW (``matrixopt.param_groups``). Validation is on whole
held-out plays (``benchmarks.data.VAL_PLAYS``); loss is in nats per character. ``--corpus``
trains on another corpus instead (:mod:`benchmarks.corpora`: byte-level verse, prose, code or
structured text, documents held out whole; loss in nats per byte), so that a default can be
checked on data it was not chosen on.

``--quick`` is a tiny model for a 2-core CPU (all optimizers and the sweep in a few
minutes); the default (~19M params, ~5M tokens per run) is sized for one GPU.
"""
import math
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

import matrixopt

from .common import default_device
from . import corpora
from .data import batches, eval_windows
from .model import ModelConfig, Transformer
from .optimizers import ADAMW, Settings, build, contenders, state_bytes


@dataclass
class TrainConfig:
    dim: int = 512
    n_layers: int = 6
    n_heads: int = 8
    seq_len: int = 256
    batch_size: int = 64
    steps: int = 320
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    warmup_frac: float = 0.05
    final_lr_frac: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 20
    eval_windows: int = 256
    update_proj_gap: int = 50
    tie_embeddings: bool = False
    seed: int = 0
    # The params' dtype ("float32" or "bfloat16"), and whether the forward runs under bf16
    # autocast (None: on CUDA only).
    param_dtype: str = "float32"
    autocast: bool | None = None
    # Up to this many lrs beyond each end of ``lrs`` while an optimizer's best is at that end.
    extend: int = 2


QUICK = TrainConfig(dim=64, n_layers=2, n_heads=4, seq_len=64, batch_size=16, steps=200,
                    lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), eval_every=20, eval_windows=128)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine to final_lr_frac."""
    warmup = max(1, round(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, inputs, targets, autocast, batch_size: int = 64) -> float:
    """Mean loss over the fixed validation windows."""
    model.eval()
    losses = []
    for x, y in zip(inputs.split(batch_size), targets.split(batch_size)):
        with autocast():
            losses.append(model.loss(x, y).item() * len(x))
    model.train()
    return sum(losses) / len(inputs)


def train_step(model, opt, x, y, step: int, cfg: TrainConfig, autocast, observer=None, lr: float = 0.0) -> float:
    """One step at the schedule's lr for ``step`` (each group's ``peak_lr`` times
    :func:`lr_factor`): loss, backward, clipping at ``cfg.clip_norm``, the optimizer's step.
    ``observer`` (see :func:`train_one`) sees the step at ``lr``'s scheduled value; returns
    the seconds spent in it, which are not training time."""
    for group in opt.param_groups:
        group["lr"] = group["peak_lr"] * lr_factor(step, cfg)
    with autocast():
        loss = model.loss(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
    observed = 0.0
    if observer is not None:
        t = time.perf_counter()
        observer.before(step, lr * lr_factor(step, cfg))
        observed += time.perf_counter() - t
    opt.step()
    if observer is not None:
        t = time.perf_counter()
        observer.after(step, lr * lr_factor(step, cfg))
        observed += time.perf_counter() - t
    opt.zero_grad(set_to_none=True)
    return observed


def train_one(name: str, lr: float, cfg: TrainConfig, corpus, device, progress, observer=None) -> dict:
    """Train from the shared init with optimizer ``name`` at peak ``lr``: its validation
    curve, tokens/s (training steps only), optimizer state and GPU peak memory.

    ``observer``, if given, sees every optimizer step: ``observer.start(matrices, opt)``
    once (the hidden matrices as (name, param) pairs), then ``observer.before(step, lr_t)``
    and ``observer.after(step, lr_t)`` around each ``opt.step()``, with lr_t the scheduled
    lr (``lr · lr_factor(step)``); its time is not counted in tokens/s.
    """
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    model = Transformer(ModelConfig(len(corpus.vocab), cfg.dim, cfg.n_layers, cfg.n_heads,
                                    seq_len=cfg.seq_len, tie_embeddings=cfg.tie_embeddings)).to(device)
    model.to(getattr(torch, cfg.param_dtype))
    groups = matrixopt.param_groups(model)
    matrices = [pair for g in groups if g["matrix"] for pair in g["params"]]
    others = [pair for g in groups if not g["matrix"] for pair in g["params"]]
    opt = build(name, matrices, others, lr, Settings(update_proj_gap=cfg.update_proj_gap))
    for group in opt.param_groups:
        group["peak_lr"] = group["lr"]
    if observer is not None:
        observer.start(matrices, opt)
    data = batches(corpus.train, cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed))
    val_x, val_y = (t.to(device) for t in eval_windows(corpus.val, cfg.eval_windows, cfg.seq_len))

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda if cfg.autocast is None else cfg.autocast)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    curve = {"step": [0], "val_loss": [evaluate(model, val_x, val_y, autocast)]}
    train_seconds = 0.0
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        x, y = (t.to(device, non_blocking=True) for t in next(data))
        t0 += train_step(model, opt, x, y, step, cfg, autocast, observer, lr)
        if cuda:
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t0
        progress.update()
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            curve["step"].append(done)
            curve["val_loss"].append(evaluate(model, val_x, val_y, autocast))
            if not math.isfinite(curve["val_loss"][-1]):
                progress.update(cfg.steps - done)  # diverged: the rest of the run is skipped
                break
    return {
        "optimizer": name, "lr": lr, "val_loss": curve["val_loss"][-1], "curve": curve,
        "tokens_per_s": done * cfg.batch_size * cfg.seq_len / train_seconds,
        "state_MB": state_bytes(opt) / 2**20,
        "gpu_peak_MB": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def steps_to_reach(curve: dict, target: float) -> int | None:
    """First evaluated step whose validation loss is at or below ``target``."""
    return next((s for s, v in zip(curve["step"], curve["val_loss"]) if v <= target), None)


def final(r: dict) -> float:
    """A run's final validation loss, inf where it diverged."""
    return r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf


def same_lr(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def sweep(run_at, lrs, extend: int, must_include: float | None = None) -> tuple[list[dict], dict, str | None]:
    """Runs ``run_at(lr)`` over the grid ``lrs`` (and ``must_include``, AdamW's best lr, where
    it is not on it), then, while the best run is at the low or high end of what ran, one
    more lr beyond that end at the grid's spacing there, at most ``extend`` per side.

    Returns the runs in lr order, the best (lowest finite final loss) and where the best
    still sits if it is not bracketed: "low" or "high", "only lr" when one lr ran (a grid of
    one lr is not extended), None when a run on each side of it is worse.
    """
    runs = {}

    def at(lr):
        key = next((k for k in runs if same_lr(k, lr)), None)
        if key is None:
            runs[lr] = run_at(lr)
            key = lr
        return runs[key]

    for lr in sorted(set(lrs)):
        at(lr)
    if must_include is not None:
        at(must_include)
    grid = sorted(lrs)
    ratio = {"low": grid[0] / grid[1], "high": grid[-1] / grid[-2]} if len(grid) > 1 else {}
    added = {"low": 0, "high": 0}
    while True:
        ordered = sorted(runs)
        best_lr = min(ordered, key=lambda lr: final(runs[lr]))
        low, high = same_lr(best_lr, ordered[0]), same_lr(best_lr, ordered[-1])
        edge = "only lr" if low and high else "low" if low else "high" if high else None
        if edge in (None, "only lr") or not ratio or added[edge] >= extend or not math.isfinite(final(runs[best_lr])):
            return [runs[lr] for lr in ordered], runs[best_lr], edge
        added[edge] += 1
        at(best_lr * ratio[edge])


def run(quick: bool = False, steps: int | None = None, lrs=None, optimizers=None, device=None,
        dim: int | None = None, extend: int | None = None, seed: int | None = None, corpus: str | None = None):
    """The sweep and the comparison on ``corpus`` (:data:`benchmarks.corpora.CORPORA`, default
    Shakespeare); returns (table sections, extra JSON, figure)."""
    cfg = QUICK if quick else TrainConfig()
    if steps is not None:
        cfg = replace(cfg, steps=steps, eval_every=max(1, min(cfg.eval_every, steps // 4)))
    if lrs:
        cfg = replace(cfg, lrs=tuple(lrs))
    if dim is not None:
        cfg = replace(cfg, dim=dim)
    if extend is not None:
        cfg = replace(cfg, extend=extend)
    if seed is not None:   # another init and batch order: how much of a difference is noise
        cfg = replace(cfg, seed=seed)
    device = default_device(device)
    corpus_name, corpus = corpus or "shakespeare", corpora.named(corpus)
    names, notes = contenders(optimizers)

    runs, best, edges = [], {}, {}
    with tqdm(total=len(names) * len(cfg.lrs) * cfg.steps, desc="train", unit="step") as progress:
        for name in names:
            # Untimed: first calls pay one-off costs (lazy imports, kernel selection) that
            # would otherwise count against whichever run comes first.
            train_one(name, cfg.lrs[0], replace(cfg, steps=2, eval_every=2), corpus, device, tqdm(disable=True))

            def run_at(lr, name=name):
                progress.set_postfix_str(f"{name} lr={lr:g}")
                if not any(same_lr(lr, g) for g in cfg.lrs):
                    progress.total += cfg.steps  # an extension of the grid, or AdamW's best lr
                    progress.refresh()
                return train_one(name, lr, cfg, corpus, device, progress)

            adamw_lr = best[ADAMW]["lr"] if ADAMW in best else None
            done, best[name], edges[name] = sweep(run_at, cfg.lrs, cfg.extend, adamw_lr)
            runs += done

    rows = results_rows(best, cfg, runs, edges)
    sweep_rows = [{"optimizer": r["optimizer"], "lr": r["lr"], "val_loss": r["val_loss"],
                   "best": r is best[r["optimizer"]]} for r in runs]
    extra = {
        "config": asdict(cfg), "device": str(device), "params_M": runs[0]["params_M"],
        "tokens_per_run": cfg.steps * cfg.batch_size * cfg.seq_len,
        "data": {"corpus": corpus_name, "train_chars": len(corpus.train), "val_chars": len(corpus.val), "vocab": len(corpus.vocab),
                 "val_plays": corpus.val_plays},
        "curves": {name: r["curve"] for name, r in best.items()},
        "sweep_curves": [{"optimizer": r["optimizer"], "lr": r["lr"], **r["curve"]} for r in runs],
        "unbracketed": {name: edge for name, edge in edges.items() if edge},
        "notes": notes,
    }
    sections = {"Final validation loss at each optimizer's best lr": rows, "Learning-rate sweep": sweep_rows}
    return sections, extra, figure(best, runs, cfg)


def results_rows(best: dict, cfg: TrainConfig, runs: list[dict] | None = None, edges: dict | None = None) -> list[dict]:
    """One row per optimizer, with ratios to AdamW where it ran: its best lr and loss, whether
    that lr is bracketed by the sweep (``best_lr_at_edge``: "low"/"high" when it is the
    lowest/highest lr the optimizer ran, empty when bracketed), and its loss at AdamW's best
    lr (``val_loss_at_adamw_lr``, from ``runs``; the promise that AdamW's lr carries over)."""
    adamw = best.get(ADAMW)
    runs, edges = runs or [], edges or {}
    rows = []
    for name, r in best.items():
        row = {"optimizer": name, "best_lr": r["lr"], "best_lr_at_edge": edges.get(name), "val_loss": r["val_loss"],
               "val_loss_vs_adamw": None, "val_loss_at_adamw_lr": None, "at_adamw_lr_vs_adamw": None,
               "steps_to_adamw_loss": None, "tokens_per_s": r["tokens_per_s"],
               "state_MB": r["state_MB"], "state_vs_adamw": None, "gpu_peak_MB": r["gpu_peak_MB"]}
        if adamw is not None:
            row["val_loss_vs_adamw"] = r["val_loss"] / adamw["val_loss"]
            at = next((x for x in runs if x["optimizer"] == name and same_lr(x["lr"], adamw["lr"])), None)
            if at is not None:
                row["val_loss_at_adamw_lr"] = at["val_loss"]
                row["at_adamw_lr_vs_adamw"] = at["val_loss"] / adamw["val_loss"]
            reached = steps_to_reach(r["curve"], adamw["val_loss"])
            # As a fraction of AdamW's steps, at the resolution of eval_every.
            row["steps_to_adamw_loss"] = reached / cfg.steps if reached is not None else None
            row["state_vs_adamw"] = r["state_MB"] / adamw["state_MB"]
        rows.append(row)
    return rows


def figure(best: dict, runs: list[dict], cfg: TrainConfig):
    """Validation loss vs step at the best lr (left) and final loss vs lr (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_sweep) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    for name, r in best.items():
        line, = ax_curve.plot(r["curve"]["step"], r["curve"]["val_loss"], label=f"{name} (lr {r['lr']:g})")
        sweep = [x for x in runs if x["optimizer"] == name]
        ax_sweep.plot([x["lr"] for x in sweep], [x["val_loss"] for x in sweep], "o-", color=line.get_color())
    finals = [r["val_loss"] for r in best.values() if math.isfinite(r["val_loss"])]
    if finals:
        # Zoom on where the optimizers differ; the first evaluations are far above.
        ax_curve.set_ylim(min(finals) - 0.05, max(finals) + 0.6)
    ax_curve.set_xlabel("step")
    ax_curve.set_ylabel("validation loss (nats/char)")
    ax_curve.legend(fontsize=8)
    ax_curve.set_title(f"{cfg.steps} steps × {cfg.batch_size * cfg.seq_len} tokens, "
                       f"d={cfg.dim}, {cfg.n_layers} layers")
    ax_sweep.set_xscale("log")
    ax_sweep.set_xlabel("peak lr")
    ax_sweep.set_ylabel("final validation loss")
    ax_sweep.set_title("lr sweep")
    fig.tight_layout()
    return fig
