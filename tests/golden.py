"""Golden trajectories: every optimizer × its main configurations, recorded once, replayed by
``tests/test_golden.py``, which asserts that weights and state dicts are bit-identical.

A change that moves code must not change one bit of them. A change that means to change
behaviour regenerates them, and its commit says why:

    .venv/bin/python tests/golden.py          # rewrites tests/data/golden.pt

Runs are single-threaded (``torch.set_num_threads(1)``) so their bits depend on nothing
but the code and torch's version; the distributed cases are the 2-rank gloo runs of
``dist_utils`` (DDP with ``distributed="replicated"`` and FSDP2).
"""
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))   # dist_utils, when run as a script

import matrixopt  # noqa: E402

PATH = Path(__file__).with_name("data") / "golden.pt"
STEPS = 25
NAN_STEP = 7          # the NaN cases put a NaN into one gradient at this step
DIST_STEPS = 20


class Net(nn.Module):
    """Tall, wide, two same-shape squares (one bucket), a single row, a 3-D expert stack,
    a conv kernel and 1-D biases."""

    def __init__(self):
        super().__init__()
        self.tall = nn.Linear(6, 12)
        self.sq1 = nn.Linear(12, 12, bias=False)
        self.sq2 = nn.Linear(12, 12, bias=False)
        self.wide = nn.Linear(12, 5, bias=False)
        self.row = nn.Linear(5, 1, bias=False)
        self.experts = nn.Parameter(0.3 * torch.randn(3, 5, 4))
        self.conv = nn.Conv2d(2, 3, kernel_size=2)

    def forward(self, x, img):
        h = torch.relu(self.tall(x))
        h = torch.tanh(self.sq2(torch.relu(self.sq1(h)))) + h
        h = torch.tanh(self.wide(h))
        e = torch.tanh(torch.einsum("bm,emn->ben", h, self.experts)).sum((1, 2))
        return e + self.row(h)[:, 0] + torch.tanh(self.conv(img)).sum((1, 2, 3))


def batch(i: int, dtype):
    g = torch.Generator().manual_seed(1000 + i)
    return (torch.randn(8, 6, generator=g).to(dtype), torch.randn(8, 2, 3, 3, generator=g).to(dtype),
            torch.randn(8, generator=g).to(dtype))


bf16 = torch.bfloat16
LOWRANK = dict(rank=2, update_proj_gap=3)
#: name -> (optimizer, kwargs, options); options: "dtype" of the params, "nan" (a NaN gradient
#: at NAN_STEP), "groups" (two param groups with per-group settings).
CASES = {
    "Muon": ("Muon", {}, {}),
    "Muon-torch": ("Muon", dict(nesterov=False, lr_scaling="original", ns_coefficients="muon"), {}),
    "Muon-bf16ns-spectral": ("Muon", dict(ns_dtype=bf16, lr_scaling="spectral", weight_decay=0.0), {}),
    "Muon-3steps-none": ("Muon", dict(ns_steps=3, ns_coefficients=[(3.0, -3.2, 1.2), (2.5, -2.0, 0.6),
                                                                    (1.9, -1.3, 0.4)], lr_scaling="none"), {}),
    "Muon-bf16-params": ("Muon", {}, {"dtype": bf16}),
    "Muon-nan": ("Muon", {}, {"nan": True}),
    "Muon-groups": ("Muon", {}, {"groups": True}),
    "ROOT": ("ROOT", {}, {}),
    "ROOT-noclip-muon": ("ROOT", dict(threshold_quantile=None, ns_coefficients="muon"), {}),
    "ROOT-q0.3-original": ("ROOT", dict(threshold_quantile=0.3, lr_scaling="original", nesterov=False), {}),
    "ROOT-bf16-params": ("ROOT", {}, {"dtype": bf16}),
    "ROOT-nan": ("ROOT", {}, {"nan": True}),
    "ARO": ("ARO", {}, {}),
    "ARO-rownorm-cols-householder": ("ARO", dict(base="row_norm", rotate_side="cols", qr="householder"), {}),
    "ARO-sign-rows-none": ("ARO", dict(base="sign", rotate_side="rows", lr_scaling="none"), {}),
    "ARO-bf16-params": ("ARO", {}, {"dtype": bf16}),
    "ARO-nan": ("ARO", {}, {"nan": True}),
    "ARO-groups": ("ARO", {}, {"groups": True}),
    **{f"GaLore-{t}": ("GaLoreAdamW", dict(LOWRANK, proj_type=t), {})
       for t in ("std", "reverse_std", "left", "right", "full")},
    "GaLore-exact-reproject-wd": ("GaLoreAdamW", dict(LOWRANK, svd="exact", reproject_states=True,
                                                      weight_decay=0.1), {}),
    "GaLore-full-reproject": ("GaLoreAdamW", dict(LOWRANK, proj_type="full", reproject_states=True), {}),
    "GaLore-bf16proj-frac": ("GaLoreAdamW", dict(rank=0.5, update_proj_gap=4, proj_dtype=bf16, seed=3), {}),
    "GaLore-bf16-params": ("GaLoreAdamW", LOWRANK, {"dtype": bf16}),
    "GaLore-nan": ("GaLoreAdamW", LOWRANK, {"nan": True}),
    "GaLore-groups": ("GaLoreAdamW", LOWRANK, {"groups": True}),
    "DCT": ("DCTAdamW", LOWRANK, {}),
    "DCT-rotate-l2": ("DCTAdamW", dict(LOWRANK, rotate_states=True, score_norm=2, weight_decay=0.1), {}),
    "DCT-bf16proj": ("DCTAdamW", dict(LOWRANK, proj_dtype=bf16, scale=0.5), {}),
    "DCT-bf16-params": ("DCTAdamW", LOWRANK, {"dtype": bf16}),
    "DCT-nan": ("DCTAdamW", LOWRANK, {"nan": True}),
    "DCT-groups": ("DCTAdamW", LOWRANK, {"groups": True}),
    "CoSO": ("CoSOAdamW", LOWRANK, {}),
    "CoSO-both-left-wd": ("CoSOAdamW", dict(LOWRANK, protect="both", side="left", weight_decay=0.1), {}),
    # state_precision (matrixopt.precision): codes, scales and stochastic rounding bit for bit.
    "Muon-state-int8": ("Muon", dict(state_precision="int8"), {}),
    "Muon-state-bf16": ("Muon", dict(state_precision="bf16"), {}),
    "Muon-state-int8-nan": ("Muon", dict(state_precision="int8"), {"nan": True}),
    "ROOT-state-bf16": ("ROOT", dict(state_precision="bf16"), {}),
    "ARO-state-int8": ("ARO", dict(state_precision="int8"), {}),
    "GaLore-state-int8": ("GaLoreAdamW", dict(LOWRANK, state_precision="int8"), {}),
    "GaLore-state-bf16-groups": ("GaLoreAdamW", dict(LOWRANK, state_precision="bf16"), {"groups": True}),
    "DCT-state-int8": ("DCTAdamW", dict(LOWRANK, state_precision="int8"), {}),
    "CoSO-state-int8": ("CoSOAdamW", dict(LOWRANK, state_precision="int8"), {}),
}


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _flat_state(state_dict: dict) -> dict:
    """A state dict as {path: value}, tensors as full tensors (DTensors gathered)."""
    flat = {}
    for pid, s in state_dict["state"].items():
        for key, value in s.items():
            if hasattr(value, "full_tensor"):
                value = value.full_tensor()
            flat[f"state.{pid}.{key}"] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    for gi, group in enumerate(state_dict["param_groups"]):
        for key, value in group.items():
            if key != "params":
                flat[f"group.{gi}.{key}"] = repr(value)
    return flat


def _params(net) -> dict:
    return {f"param.{n}": (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in net.named_parameters()}


def run_case(name: str) -> dict:
    """The weights and optimizer state of case ``name`` after STEPS steps."""
    cls_name, kwargs, options = CASES[name]
    cls = getattr(matrixopt, cls_name)
    dtype = options.get("dtype", torch.float32)
    with one_thread():
        torch.manual_seed(0)
        net = Net().to(dtype)
        named = list(net.named_parameters())
        if options.get("groups"):
            weights = [(n, p) for n, p in named if not n.endswith("bias")]
            params = [{"params": [(n, p) for n, p in weights if n.startswith(("tall", "sq1", "experts"))],
                       "lr": 0.03, "weight_decay": 0.05},
                      {"params": [(n, p) for n, p in weights if n.startswith(("sq2", "wide", "row", "conv"))]},
                      {"params": [(n, p) for n, p in named if n.endswith("bias")], "matrix": False, "lr": 0.005}]
        else:
            params = named
        opt = cls(params, **{"lr": 0.02, **kwargs})
        with torch.no_grad():
            for i in range(STEPS):
                x, img, y = batch(i, dtype)
                net.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    (net(x, img) - y).float().square().mean().backward()
                if options.get("nan") and i == NAN_STEP:
                    net.sq1.weight.grad[0, 0] = float("nan")
                    net.tall.bias.grad[1] = float("inf")
                with _quiet():
                    opt.step()
        return {**_params(net), **_flat_state(opt.state_dict()), "nonfinite_skips": opt.nonfinite_skips}


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- distributed ---------------------------------------------------------------------------------

def _dist_worker(rank, out_dir):
    import dist_utils
    from torch.nn.parallel import DistributedDataParallel

    data = dist_utils.batches(DIST_STEPS)
    for case in dist_utils.CASES:
        for mode in ("ddp", "fsdp2"):
            if mode == "ddp":
                ddp = DistributedDataParallel(dist_utils.model())
                net, opt = ddp.module, dist_utils.make_optimizer(case, ddp.module, distributed="replicated")
                dist_utils.train(ddp, opt, data)
            else:
                net = dist_utils.sharded(dist_utils.model())
                opt = dist_utils.make_optimizer(case, net)
                dist_utils.train(net, opt, data)
            record = {**_params(net), **_flat_state(opt.state_dict())}
            if rank == 0:
                torch.save(record, os.path.join(out_dir, f"{case}.{mode}.pt"))


def run_distributed() -> dict:
    """{f"{case}.{mode}": record} for every dist_utils case under DDP and FSDP2 (2 ranks)."""
    import dist_utils

    with tempfile.TemporaryDirectory() as out_dir:
        dist_utils.spawn(_dist_worker, out_dir)
        return {f.stem: torch.load(os.path.join(out_dir, f.name), weights_only=True)
                for f in sorted(Path(out_dir).iterdir())}


def record() -> dict:
    return {"torch": str(torch.__version__), "single": {name: run_case(name) for name in CASES},
            "distributed": run_distributed()}


if __name__ == "__main__":
    golden = record()
    PATH.parent.mkdir(exist_ok=True)
    torch.save(golden, PATH)
    print(f"wrote {PATH}: {len(golden['single'])} single-process cases, "
          f"{len(golden['distributed'])} distributed runs, {PATH.stat().st_size / 1e6:.2f} MB")
