"""What every benchmark shares: the stamp, the markdown table, the results files."""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """A short machine label for file names: the GPU's name, else 'cpu<cores>'."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-").lower()
    return f"cpu{os.cpu_count()}"


def stamp() -> dict:
    """Machine, versions, commit and date, recorded with every result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "machine": machine(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
    }


def default_device(device=None) -> torch.device:
    """``device`` as a torch.device; None means cuda when available, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def cpu_note(device: torch.device) -> str:
    """Appended to the section titles of a GPU benchmark run on a CPU."""
    return "" if device.type == "cuda" else " — CPU run: checks the code, GPU figures pending"


def median_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones:
    CUDA events on a GPU (synchronized once, after the last call), ``perf_counter`` elsewhere."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """rows (dicts) as a markdown table; floats get 4 significant digits. Columns: every key
    of any row, in first-seen order (a row without one leaves its cell empty)."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(command: str, sections: dict[str, list[dict]], *, extra: dict | None = None,
                  figure=None, out_dir: Path = RESULTS, invocation: str | None = None) -> dict[str, Path]:
    """Print and write ``benchmarks/results/<command>-<machine>-<date>.{md,json[,png]}``.

    ``sections`` maps a title to its table rows; ``extra`` is added to the JSON (settings,
    sweeps); ``figure`` is a matplotlib figure saved as the PNG (which the results folder keeps out of git:
    the .md says so); ``invocation`` is the
    command line shown as the title (default ``python -m benchmarks <command>``). Returns
    the paths written.
    """
    meta = stamp()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{command}-{meta['machine']}-{meta['date']}"
    header = (f"# `{invocation or f'python -m benchmarks {command}'}`\n\n{meta['date']} · {meta['device']} "
              f"({meta['cpu_count']} CPUs) · torch {meta['torch']} · triton {meta['triton']} · "
              f"python {meta['python']} · commit {meta['commit']}\n")
    body = "".join(f"\n## {title}\n\n{markdown_table(rows)}" for title, rows in sections.items())
    paths = {"md": base.with_suffix(".md"), "json": base.with_suffix(".json")}
    if figure is not None:
        paths["png"] = base.with_suffix(".png")
        figure.savefig(paths["png"], dpi=120, bbox_inches="tight")
        body += (f"\nThe figure, `{paths['png'].name}`, is not committed: the command above draws it beside "
                 "this file.\n")
    paths["md"].write_text(header + body)
    paths["json"].write_text(json.dumps({"meta": meta, "sections": sections, **(extra or {})}, indent=2))
    print(header + body)
    for p in paths.values():
        print(f"wrote {p}")
    return paths


def cpu_peak_bytes(fn) -> int:
    """Peak bytes of CPU tensors ``fn()`` allocates beyond what was allocated before it
    (its temporaries, and what it leaves allocated), from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for _, nbytes in allocation_events(prof):
        current += nbytes
        peak = max(peak, current)
    return peak


def allocation_events(prof) -> list[tuple[int, int]]:
    """(time in ns, bytes) of every CPU allocation (positive) and free (negative) a
    ``profile_memory=True`` profile recorded, in time order. Frees of storages allocated
    before profiling started are not reported by torch's CPU allocator, so the running sum
    from 0 is the bytes allocated since the start that are still live."""
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type().name == "CPU"]
    return sorted(events)


def add_common_arguments(parser: argparse.ArgumentParser, *, device: bool) -> None:
    """The flags every benchmark command shares: ``--quick``, ``--out`` and, if asked, ``--device``."""
    parser.add_argument("--quick", action="store_true", help="small sizes, meant for a CPU")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default %(default)s)")
    if device:
        parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")


def module_main(command: str, run, *, description: str, extra: dict | None = None, argv=None,
                options=None) -> dict[str, Path]:
    """The command line of one benchmark module: ``python -m benchmarks.<command> [--quick] [--device D]
    [--out DIR]``, plus the flags ``options(parser)`` adds.

    Calls ``run(quick, device=..., **flags)`` for its table sections (``flags``: those ``options``
    added, also recorded in the JSON) and writes them with :func:`write_results`.
    """
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{command}", description=description)
    add_common_arguments(parser, device=True)
    if options is not None:
        options(parser)
    argv = sys.argv[1:] if argv is None else argv
    flags = vars(parser.parse_args(argv))
    quick, out, device = flags.pop("quick"), flags.pop("out"), flags.pop("device")
    return write_results(command, run(quick, device=device, **flags), extra={"quick": quick, **flags, **(extra or {})},
                         out_dir=out, invocation=" ".join([f"python -m benchmarks.{command}", *argv]))
