"""``python -m benchmarks step|kernels|train|update_rms|memory``: tables, plots and results files.

    python -m benchmarks train --quick     # the demo: Shakespeare LM, every optimizer, CPU minutes
    python -m benchmarks update_rms --quick  # RMS of ΔW/lr per optimizer, 2 widths × 2 run lengths
    python -m benchmarks continual --quick # three text tasks in a row: forgetting vs plasticity (--seed N)
    python -m benchmarks step --quick      # step time and optimizer-state memory
    python -m benchmarks memory --quick    # peak memory of a whole training step, per optimizer
    python -m benchmarks kernels --quick   # Newton-Schulz, low-rank refresh, projection and DCT kernels
    python -m benchmarks ns --quick        # Newton-Schulz alone: standard, Gram, the peers (--cpu: target shapes)

Each command prints a markdown table and writes
``benchmarks/results/<command>-<machine>-<date>.{md,json,png}`` (``--out`` elsewhere).
Without ``--quick`` the sizes are meant for a GPU.
"""
import argparse
import importlib
import sys
import torch

from .common import add_common_arguments, write_results
from .memory import CONFIGS, PRECISIONS
from .step import SHAPES

# Modules with run(quick) -> table sections, gathered by the `kernels` command.
KERNEL_MODULES = ("ns", "lowrank", "projection", "dct")


def kernels(quick: bool):
    """Every kernel benchmark module's sections; a missing module is skipped and noted."""
    sections, skipped = {}, []
    for module_name in KERNEL_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{module_name}")
        except ImportError as error:
            print(f"kernels: skipping benchmarks.{module_name} ({error})")
            skipped.append(f"benchmarks.{module_name}: {error}")
            continue
        for title, rows in module.run(quick).items():
            sections[f"{module_name}: {title}"] = rows
    return sections, {"skipped": skipped}, None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, help, *, device=True):
        sub = commands.add_parser(name, help=help)
        add_common_arguments(sub, device=device)
        return sub

    def add_run_options(sub):
        sub.add_argument("--threads", type=int,
                         help="CPU threads for torch (on a busy shared CPU, 1 avoids threads waiting on each other)")
        sub.add_argument("--optimizers", nargs="+", metavar="NAME",
                         help="only these (e.g. torch.optim.AdamW matrixopt.Muon); default: all available")

    train = command("train", "Shakespeare character LM: validation loss, tokens/s, memory, lr sweep")
    train.add_argument("--steps", type=int, help="training steps per run (overrides the size's default)")
    train.add_argument("--lrs", type=float, nargs="+", help="the lr grid every optimizer is swept over")
    train.add_argument("--extend", type=int, metavar="N",
                       help="lrs added beyond an end of the grid where an optimizer's best sits, at most N per side "
                            "(default 2; 0: the grid only)")
    train.add_argument("--dim", type=int, help="model width (overrides the size's default)")
    train.add_argument("--seed", type=int, help="seed of the init and the batches (default 0)")
    add_run_options(train)
    continual = command("continual", "three text tasks in a row (plays, Python, tragedies): forgetting, plasticity")
    continual.add_argument("--steps", type=int, help="training steps per task (overrides the size's default)")
    continual.add_argument("--seed", type=int, help="seed of the init and the batches (default 0)")
    add_run_options(continual)
    step = command("step", "optimizer step time and state memory on LLaMA-like matrix sets")
    step.add_argument("--sets", nargs="+", choices=list(SHAPES),
                      help="parameter sets (default: 60M-4L with --quick; 60M 350M, and 1B on a GPU)")
    step.add_argument("--warmup", type=int, help="untimed steps first")
    step.add_argument("--repeats", type=int, help="timed steps (the median is reported)")
    add_run_options(step)
    memory = command("memory", "peak memory of a whole training step (weights, gradients, state, activations, "
                               "temporaries) per optimizer, next to its byte model")
    memory.add_argument("--config", choices=list(CONFIGS),
                        help="model size (default: quick with --quick, 70M on CPU, 1B on a GPU)")
    memory.add_argument("--batch", type=int, help="sequences per step (default 1)")
    memory.add_argument("--seq-len", type=int, help="tokens per sequence (default 64 with --quick, else 128)")
    memory.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="matrixopt state precisions (default: all)")
    memory.add_argument("--fit-budget-gib", type=float,
                        help="also find the largest config whose step fits in this many GiB per optimizer "
                             "(default on a GPU: 24, under set_per_process_memory_fraction; on CPU by measured peak)")
    memory.add_argument("--fit-configs", nargs="+", choices=list(CONFIGS), help="configs the fit search tries, "
                        "in increasing size (default: GaLore's 60M … 7B)")
    add_run_options(memory)
    update_rms = command("update_rms", "RMS of each optimizer's step per unit lr (ΔW/lr) vs AdamW's, "
                                       "at several widths and run lengths")
    update_rms.add_argument("--widths", type=int, nargs="+", help="model widths (default 64 128 with --quick)")
    update_rms.add_argument("--steps", type=int, nargs="+", help="run lengths (default 200 600 with --quick)")
    update_rms.add_argument("--lr", type=float, help="the peak lr every optimizer runs at (default 3e-3 with --quick)")
    add_run_options(update_rms)
    command("kernels", "Newton-Schulz and low-rank refresh kernels", device=False)
    ns = command("ns", "Newton-Schulz: standard and Gram methods, peers, schedules")
    ns.add_argument("--cpu", action="store_true",
                    help="only the CPU sections at the target shapes (peers, auto crossover, 4-step schedule)")
    ns.add_argument("--repeats", type=int, help="timed calls per case with --cpu (median reported; default 5)")
    ns.add_argument("--threads", type=int, help="CPU threads for torch")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "train":
        from .train import run

        sections, extra, fig = run(args.quick, steps=args.steps, lrs=args.lrs, optimizers=args.optimizers,
                                   device=args.device, dim=args.dim, extend=args.extend, seed=args.seed)
    elif args.command == "continual":
        from .continual import run

        sections, extra, fig = run(args.quick, steps=args.steps, optimizers=args.optimizers, device=args.device,
                                   seed=args.seed)
    elif args.command == "step":
        from .step import run

        sections, extra, fig = run(args.quick, sets=args.sets, optimizers=args.optimizers, warmup=args.warmup,
                                   repeats=args.repeats, device=args.device)
    elif args.command == "memory":
        from .memory import run

        sections, extra, fig = run(args.quick, config=args.config, batch=args.batch, seq_len=args.seq_len,
                                   optimizers=args.optimizers, precisions=args.precisions, device=args.device,
                                   fit_budget_gib=args.fit_budget_gib, fit_configs=args.fit_configs)
    elif args.command == "update_rms":
        from .update_rms import run

        sections, extra, fig = run(args.quick, widths=args.widths, steps=args.steps, lr=args.lr,
                                   optimizers=args.optimizers, device=args.device)
    elif args.command == "ns":
        from .ns import run

        sections, extra, fig = run(args.quick, device=args.device, cpu=args.cpu, repeats=args.repeats), {}, None
        extra.update(cpu=args.cpu, repeats=args.repeats, steps=5)
    else:
        sections, extra, fig = kernels(args.quick)
    extra.update(quick=args.quick, cpu_threads=torch.get_num_threads())
    # One file per seed (continual-seed1-…): runs of several seeds on one day side by side.
    name = args.command if getattr(args, "seed", None) is None or args.command != "continual" \
        else f"continual-seed{args.seed}"
    return write_results(name, sections, extra=extra, figure=fig, out_dir=args.out,
                         invocation=" ".join(["python -m benchmarks", *argv]))


if __name__ == "__main__":
    main()
