"""Golden trajectories: every optimizer × its main configurations, recorded once, replayed by
``tests/test_golden.py``, which asserts that weights and state dicts are bit-identical.

A change that moves code must not change one bit of them. A change that means to change
behaviour regenerates them on purpose, and its commit says why:

    .venv/bin/python tests/golden.py            # replays every case, prints what differs
    .venv/bin/python tests/golden.py --write    # rewrites tests/data/golden.json

The file holds no tensors. Per entry of a run's weights and ``state_dict()`` it keeps, for a
tensor, ``[dtype, shape, digest, sum, max|x|]``: the digest is a 64-bit BLAKE2b of its raw
bytes (a contiguous copy), which with the dtype and shape is what is compared, so one ulp
anywhere fails; the float64 sum and max |x| (4 digits) only say in a failure roughly how far
it moved. For anything else (step counters, group settings) it keeps the ``repr``, so a
changed counter or an int that became a float fails. One line per entry: a regeneration's
diff names the entries that moved.

Runs are single-threaded (``torch.set_num_threads(1)``) so their bits depend on nothing
but the code and torch's version; the distributed cases are the 2-rank gloo runs of
``dist_utils`` (DDP with ``distributed="replicated"`` and FSDP2).
"""
import argparse
import contextlib
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))   # dist_utils, when run as a script

import matrixopt  # noqa: E402

PATH = Path(__file__).with_name("data") / "golden.json"
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
#: bf16 params stored as torch.optim would (the default before master_weights existed).
NEAREST = dict(master_weights="nearest")
#: name -> (optimizer, kwargs, options); options: "dtype" of the params, "nan" (a NaN gradient
#: at NAN_STEP), "groups" (two param groups with per-group settings).
CASES = {
    "Muon": ("Muon", {}, {}),
    "Muon-torch": ("Muon", dict(nesterov=False, lr_scaling="original", ns_coefficients="muon"), {}),
    "Muon-bf16ns-spectral": ("Muon", dict(ns_dtype=bf16, lr_scaling="spectral", weight_decay=0.0), {}),
    "Muon-3steps-none": ("Muon", dict(ns_steps=3, ns_coefficients=[(3.0, -3.2, 1.2), (2.5, -2.0, 0.6),
                                                                    (1.9, -1.3, 0.4)], lr_scaling="none"), {}),
    "Muon-bf16-params": ("Muon", NEAREST, {"dtype": bf16}),
    "Muon-nan": ("Muon", {}, {"nan": True}),
    "Muon-groups": ("Muon", {}, {"groups": True}),
    "ROOT": ("ROOT", {}, {}),
    "ROOT-noclip-muon": ("ROOT", dict(threshold_quantile=None, ns_coefficients="muon"), {}),
    "ROOT-q0.3-original": ("ROOT", dict(threshold_quantile=0.3, lr_scaling="original", nesterov=False), {}),
    "ROOT-bf16-params": ("ROOT", NEAREST, {"dtype": bf16}),
    "ROOT-nan": ("ROOT", {}, {"nan": True}),
    "ARO": ("ARO", {}, {}),
    "ARO-rownorm-cols-householder": ("ARO", dict(base="row_norm", rotate_side="cols", qr="householder"), {}),
    "ARO-sign-rows-none": ("ARO", dict(base="sign", rotate_side="rows", lr_scaling="none"), {}),
    "ARO-bf16-params": ("ARO", NEAREST, {"dtype": bf16}),
    "ARO-nan": ("ARO", {}, {"nan": True}),
    "ARO-groups": ("ARO", {}, {"groups": True}),
    **{f"GaLore-{t}": ("GaLoreAdamW", dict(LOWRANK, proj_type=t), {})
       for t in ("std", "reverse_std", "left", "right", "full")},
    "GaLore-exact-reproject-wd": ("GaLoreAdamW", dict(LOWRANK, svd="exact", reproject_states=True,
                                                      weight_decay=0.1), {}),
    "GaLore-full-reproject": ("GaLoreAdamW", dict(LOWRANK, proj_type="full", reproject_states=True), {}),
    "GaLore-bf16proj-frac": ("GaLoreAdamW", dict(rank=0.5, update_proj_gap=4, proj_dtype=bf16, seed=3), {}),
    "GaLore-bf16-params": ("GaLoreAdamW", dict(LOWRANK, **NEAREST), {"dtype": bf16}),
    "GaLore-nan": ("GaLoreAdamW", LOWRANK, {"nan": True}),
    "GaLore-groups": ("GaLoreAdamW", LOWRANK, {"groups": True}),
    "DCT": ("DCTAdamW", LOWRANK, {}),
    "DCT-rotate-l2": ("DCTAdamW", dict(LOWRANK, rotate_states=True, score_norm=2, weight_decay=0.1), {}),
    "DCT-bf16proj": ("DCTAdamW", dict(LOWRANK, proj_dtype=bf16, scale=0.5), {}),
    "DCT-bf16-params": ("DCTAdamW", dict(LOWRANK, **NEAREST), {"dtype": bf16}),
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
    # master_weights (matrixopt.weights): bf16 params, random bits and low bits bit for bit.
    "Muon-bf16-stochastic": ("Muon", {}, {"dtype": bf16}),
    "Muon-bf16-int16-nan": ("Muon", dict(master_weights="int16"), {"dtype": bf16, "nan": True}),
    "ARO-bf16-int8": ("ARO", dict(master_weights="int8"), {"dtype": bf16}),
    "GaLore-bf16-int8-state-int8": ("GaLoreAdamW", dict(LOWRANK, master_weights="int8", state_precision="int8"),
                                    {"dtype": bf16}),
    "DCT-bf16-int16-groups": ("DCTAdamW", dict(LOWRANK, master_weights="int16"), {"dtype": bf16, "groups": True}),
    "CoSO-bf16-stochastic": ("CoSOAdamW", LOWRANK, {"dtype": bf16}),
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
                flat[f"group.{gi}.{key}"] = value
    return flat


def _params(net) -> dict:
    return {f"param.{n}": (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in net.named_parameters()}


def summary(record: dict) -> dict:
    """{key: entry} of a run's {key: value} (the entries of the module docstring)."""
    return {key: _tensor_entry(value) if isinstance(value, torch.Tensor) else repr(value)
            for key, value in record.items()}


def _tensor_entry(t: torch.Tensor) -> list:
    t = t.detach().cpu().contiguous()
    x = t.double()
    return [str(t.dtype).removeprefix("torch."), list(t.shape),
            hashlib.blake2b(t.reshape(-1).view(torch.uint8).numpy(), digest_size=8).hexdigest(),
            float(f"{x.sum():.4g}"), float(f"{x.abs().max():.4g}") if t.numel() else 0.0]


def differences(got, want, path: str) -> list[str]:
    """One line per entry of ``got`` that is not bit for bit ``want``'s, or missing or new in
    it ([] when none); both are entries or nested dicts of them, ``path`` names them."""
    if isinstance(got, dict) and isinstance(want, dict):
        return [line for key in {**want, **got} for line in (
            differences(got[key], want[key], f"{path}/{key}") if key in got and key in want
            else [f"{path}/{key}: {'missing' if key in want else 'new, not recorded'}"])]
    if _exact(got) == _exact(want):
        return []
    return [f"{path}: was {_shown(want)}, is {_shown(got)}"]


def _exact(entry):
    return entry[:3] if isinstance(entry, list) else entry   # a tensor's [dtype, shape, digest]


def _shown(entry) -> str:
    if not isinstance(entry, list):
        return str(entry)
    dtype, shape, digest, total, largest = entry
    return f"{dtype}{shape} sum {total:.4g} max|x| {largest:.4g} ({digest})"


def run_case(name: str) -> dict:
    """The summary of case ``name``'s weights and optimizer state after STEPS steps."""
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
        return summary({**_params(net), **_flat_state(opt.state_dict()), "nonfinite_skips": opt.nonfinite_skips})


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
            record = {**_params(net), **_flat_state(opt.state_dict())}   # collectives: every rank
            if rank == 0:
                Path(out_dir, f"{case}.{mode}.json").write_text(json.dumps(summary(record)))


def run_distributed() -> dict:
    """{f"{case}.{mode}": summary} for every dist_utils case under DDP and FSDP2 (2 ranks)."""
    import dist_utils

    with tempfile.TemporaryDirectory() as out_dir:
        dist_utils.spawn(_dist_worker, out_dir)
        return {f.stem: json.loads(f.read_text()) for f in sorted(Path(out_dir).iterdir())}


def record() -> dict:
    return {"torch": str(torch.__version__), "single": {name: run_case(name) for name in CASES},
            "distributed": run_distributed()}


def load() -> dict:
    return json.loads(PATH.read_text())


def dumps(value, pad: str = "") -> str:
    """JSON with every dict spread over lines and anything else (an entry) on one line."""
    if not isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    inner = pad + " "
    return "{\n" + ",\n".join(f"{inner}{json.dumps(k)}: {dumps(v, inner)}" for k, v in value.items()) + f"\n{pad}}}"


def main() -> int:
    parser = argparse.ArgumentParser(description="Replay the golden trajectories and print what differs "
                                                 f"from {PATH.name}; --write records them instead.")
    parser.add_argument("--write", action="store_true",
                        help=f"rewrite {PATH} from this code (only for an intended change of behaviour)")
    args = parser.parse_args()
    golden = record()
    if args.write:
        PATH.parent.mkdir(exist_ok=True)
        PATH.write_text(dumps(golden) + "\n")
        print(f"wrote {PATH}: {len(golden['single'])} single-process cases, "
              f"{len(golden['distributed'])} distributed runs, {PATH.stat().st_size / 1e3:.0f} kB")
        return 0
    recorded = load()
    lines = [line for kind in ("single", "distributed") for line in differences(golden[kind], recorded[kind], kind)]
    print("\n".join(lines) or f"bit-identical to {PATH}")
    if lines and recorded["torch"] != golden["torch"]:
        print(f"(recorded with torch {recorded['torch']}, running {golden['torch']})")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
