"""``python -m benchmarks step|kernels|train|update_rms|memory|lean_weights``: tables, plots and results files.

    python -m benchmarks train --quick     # the demo: Shakespeare LM, every optimizer, CPU minutes
    python -m benchmarks update_rms --quick  # RMS of ΔW/lr per optimizer, 2 widths × 2 run lengths
    python -m benchmarks continual --quick # three text tasks in a row: forgetting vs plasticity (--seed N)
    python -m benchmarks step --quick      # step time and optimizer-state memory
    python -m benchmarks memory --quick    # peak memory of a whole training step, per optimizer
    python -m benchmarks memory --simulate 7B --batch 16 --seq-len 256 --checkpoint --rank 1024
                                           # the same on fake tensors, GPU-sized (GaLore's 7B recipe)
    python -m benchmarks lean_weights --quick  # bf16 weights, each master_weights option vs fp32 params
    python -m benchmarks kernels --quick   # Newton-Schulz, low-rank refresh, projection and DCT kernels
    python -m benchmarks frameworks --out benchmarks/results/frameworks  # bare params in litgpt / HF Trainer
    python -m benchmarks ns --quick        # Newton-Schulz alone: standard, Gram, the peers (--cpu: target shapes)

Each command prints a markdown table and writes
``benchmarks/results/<command>-<machine>-<date>.{md,json,png}`` (``--out`` elsewhere).
Without ``--quick`` the sizes are meant for a GPU.
"""
import argparse
import importlib
import sys
from typing import Callable, NamedTuple

import torch

from .common import add_common_arguments, write_results
from .corpora import CORPORA
from .memory import CONFIGS, PRECISIONS
from .step import SHAPES

# Modules with run(quick) -> table sections, gathered by the `kernels` command.
KERNEL_MODULES = ("ns", "lowrank", "projection", "dct")


def flag(*names, **kwargs) -> tuple[tuple, dict]:
    """One flag of a command: ``parser.add_argument``'s arguments."""
    return names, kwargs


#: The flag of the commands that train on a choice of corpora; a run on another corpus than
#: the default writes ``<command>-<corpus>-…``.
CORPUS = flag("--corpus", choices=CORPORA, help="the training data (default shakespeare, character level; the "
              "others are byte-level corpora of other kinds, see benchmarks/corpora.py)")


def corpus_suffix(flags: dict) -> str | None:
    return flags.get("corpus")


#: The flags of the commands that train or step a choice of the registry's optimizers.
RUN_OPTIONS = (
    flag("--threads", type=int,
         help="CPU threads for torch (on a busy shared CPU, 1 avoids threads waiting on each other)"),
    flag("--optimizers", nargs="+", metavar="NAME",
         help="only these (e.g. torch.optim.AdamW matrixopt.Muon); default: all available"),
)


def call_run(module, quick: bool, flags: dict):
    """``module.run(quick, **flags)``: (table sections, extra JSON, figure)."""
    return module.run(quick, **flags)


#: ``memory``'s flags that a simulation (``--simulate``) reads (the real measurement: ``--weights``).
SIMULATE_FLAGS = ("simulate", "weights", "checkpoint", "rank", "validate", "in_backward", "master_weights")


def call_memory(module, quick: bool, flags: dict):
    """``memory``: the real measurement (benchmarks.memory), or with ``--simulate CONFIG`` the
    fake-tensor one (benchmarks.simulate) on that config, batch and sequence length."""
    simulation = {key: flags.pop(key) for key in SIMULATE_FLAGS}
    config = simulation.pop("simulate")
    if config is None:
        return module.run(quick, weights=simulation["weights"] or "fp32", **flags)
    from . import simulate

    return simulate.run(config, flags["optimizers"], flags["precisions"], batch=flags["batch"],
                        seq_len=flags["seq_len"], **simulation)


def call_ns(module, quick: bool, flags: dict):
    """benchmarks.ns's sections, with its settings for the JSON and no figure."""
    return module.run(quick, **flags), {"cpu": flags["cpu"], "repeats": flags["repeats"], "steps": module.STEPS}, None


def call_kernels(module, quick: bool, flags: dict):
    """Every kernel benchmark module's sections; a missing module is skipped and noted."""
    sections, skipped = {}, []
    for module_name in KERNEL_MODULES:
        try:
            kernel_module = importlib.import_module(f"{__package__}.{module_name}")
        except ImportError as error:
            print(f"kernels: skipping benchmarks.{module_name} ({error})")
            skipped.append(f"benchmarks.{module_name}: {error}")
            continue
        for title, rows in kernel_module.run(quick).items():
            sections[f"{module_name}: {title}"] = rows
    return sections, {"skipped": skipped}, None


class Command(NamedTuple):
    """A ``python -m benchmarks`` command; adding one is adding an entry to :data:`COMMANDS`.

    ``module``: ``benchmarks.<module>``, imported when the command runs (None: none). ``help``:
    its line in ``--help``. ``arguments``: its own flags (:func:`flag`), after ``--quick``,
    ``--out`` and, with ``device``, ``--device``. ``call(module, quick, flags)``: its table
    sections, extra JSON and figure, ``flags`` being the parsed flags but ``--quick``, ``--out``
    and ``--threads`` (which sets torch's thread count first). ``per_seed``: a run with
    ``--seed N`` writes ``<command>-seed<N>-…``, so runs of several seeds on one day sit side by
    side. ``results(flags)``: a suffix of the results' name (``<command>-<suffix>-…``) or None.
    """

    module: str | None
    help: str
    arguments: tuple = ()
    device: bool = True
    call: Callable = call_run
    per_seed: bool = False
    results: Callable | None = None


COMMANDS = {
    "train": Command("train", "Shakespeare character LM: validation loss, tokens/s, memory, lr sweep", (
        flag("--steps", type=int, help="training steps per run (overrides the size's default)"),
        flag("--lrs", type=float, nargs="+", help="the lr grid every optimizer is swept over"),
        flag("--extend", type=int, metavar="N",
             help="lrs added beyond an end of the grid where an optimizer's best sits, at most N per side "
                  "(default 2; 0: the grid only)"),
        flag("--dim", type=int, help="model width (overrides the size's default)"),
        flag("--seed", type=int, help="seed of the init and the batches (default 0)"),
        CORPUS, *RUN_OPTIONS), results=corpus_suffix),
    "continual": Command("continual", "three text tasks in a row (plays, Python, tragedies): forgetting, plasticity", (
        flag("--steps", type=int, help="training steps per task (overrides the size's default)"),
        flag("--seed", type=int, help="seed of the init and the batches (default 0)"),
        *RUN_OPTIONS), per_seed=True),
    "step": Command("step", "optimizer step time and state memory on LLaMA-like matrix sets", (
        flag("--sets", nargs="+", choices=list(SHAPES),
             help="parameter sets (default: 60M-4L with --quick; 60M 350M, and 1B on a GPU)"),
        flag("--warmup", type=int, help="untimed steps first"),
        flag("--repeats", type=int, help="timed steps (the median is reported)"),
        *RUN_OPTIONS)),
    "memory": Command("memory", "peak memory of a whole training step (weights, gradients, state, activations, "
                                "temporaries) per optimizer, next to its byte model", (
        flag("--config", choices=list(CONFIGS),
             help="model size (default: quick with --quick, 70M on CPU, 1B on a GPU)"),
        flag("--batch", type=int, help="sequences per step (default 1)"),
        flag("--seq-len", type=int, help="tokens per sequence (default 64 with --quick, else 128)"),
        flag("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
             help="matrixopt state precisions (default: all)"),
        flag("--fit-budget-gib", type=float,
             help="also find the largest config whose step fits in this many GiB per optimizer "
                  "(default on a GPU: 24, under set_per_process_memory_fraction; on CPU by measured peak)"),
        flag("--fit-configs", nargs="+", choices=list(CONFIGS), help="configs the fit search tries, "
             "in increasing size (default: GaLore's 60M … 7B)"),
        flag("--simulate", choices=list(CONFIGS), metavar="CONFIG",
             help="measure CONFIG's step on fake tensors instead (nothing of its size allocated; "
                  "benchmarks/simulate.py): 1B, 3B, 7B, 13B, or quick/70M to check against --validate"),
        flag("--weights", choices=["bf16", "fp32"], help="the params' dtype: fp32 (default) or bf16 (then "
             "matrixopt's rows also with each master_weights value); with --simulate: bf16 weights (default) or "
             "fp32 master weights under bf16 autocast"),
        flag("--checkpoint", action="store_true", help="with --simulate: activation checkpointing per block"),
        flag("--in-backward", action="store_true",
             help="with --simulate: of matrixopt's rows only those that step in backward"),
        flag("--master-weights", nargs="+", choices=["nearest", "stochastic", "int8", "int16"],
             help="with --simulate and bf16 weights: of matrixopt's rows only those with these master_weights"),
        flag("--rank", type=lambda v: float(v) if "." in v else int(v),
             help="with --simulate: the low-rank optimizers' rank (int, or a fraction; default 0.25)"),
        flag("--validate", action="store_true",
             help="with --simulate: also run each row for real on this CPU and give the ratio"),
        *RUN_OPTIONS), call=call_memory, results=lambda flags: flags.get("simulate") and
        f"simulate-{flags['simulate']}"),
    "update_rms": Command("update_rms", "RMS of each optimizer's step per unit lr (ΔW/lr) vs AdamW's, "
                                        "at several widths and run lengths", (
        flag("--widths", type=int, nargs="+", help="model widths (default 64 128 with --quick)"),
        flag("--steps", type=int, nargs="+", help="run lengths (default 200 600 with --quick)"),
        flag("--lr", type=float, help="the peak lr every optimizer runs at (default 3e-3 with --quick)"),
        CORPUS, *RUN_OPTIONS), results=corpus_suffix),
    "lean_weights": Command("lean_weights", "bf16 params stored with each master_weights option vs fp32 params "
                                            "under bf16 autocast, several seeds", (
        flag("--seeds", type=int, help="seeds per cell (default 5)"),
        flag("--lrs", type=float, nargs="+", help="peak lrs (default 3e-3 3e-4)"),
        flag("--steps", type=int, help="training steps per run (overrides the size's default)"),
        *RUN_OPTIONS)),
    "frameworks": Command("frameworks", "bare params in litgpt (--optimizer class_path) and the HF Trainer "
                                        "(optimizer_cls_and_kwargs) vs param_groups, at AdamW's lr", (
        flag("--steps", type=int, nargs="+", help="validation loss after these many steps (default 40 200)"),
        flag("--seeds", type=int, help="seeds per run, losses averaged (default 1)"),
        *RUN_OPTIONS), device=False),
    "kernels": Command(None, "Newton-Schulz and low-rank refresh kernels", device=False, call=call_kernels),
    "ns": Command("ns", "Newton-Schulz: standard and Gram methods, peers, schedules", (
        flag("--cpu", action="store_true",
             help="only the CPU sections at the target shapes (peers, auto crossover, 4-step schedule)"),
        flag("--repeats", type=int, help="timed calls per case with --cpu (median reported; default 5)"),
        flag("--threads", type=int, help="CPU threads for torch")), call=call_ns),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help)
        add_common_arguments(sub, device=command.device)
        for names, kwargs in command.arguments:
            sub.add_argument(*names, **kwargs)
    argv = sys.argv[1:] if argv is None else argv
    flags = vars(parser.parse_args(argv))
    name, quick, out, threads = flags.pop("command"), flags.pop("quick"), flags.pop("out"), flags.pop("threads", None)
    command = COMMANDS[name]
    suffix = command.results and command.results(flags)
    if threads:
        torch.set_num_threads(threads)
    module = importlib.import_module(f"{__package__}.{command.module}") if command.module else None
    sections, extra, fig = command.call(module, quick, flags)
    extra.update(quick=quick, cpu_threads=torch.get_num_threads())
    results = f"{name}-seed{flags['seed']}" if command.per_seed and flags["seed"] is not None else name
    results = f"{results}-{suffix}" if suffix else results
    return write_results(results, sections, extra=extra, figure=fig, out_dir=out,
                         invocation=" ".join(["python -m benchmarks", *argv]))


if __name__ == "__main__":
    main()
