"""`python -m benchmarks lean_weights`: bf16 weights stored each way, against the standard
mixed-precision recipe.

Every matrixopt optimizer trains the train benchmark's model (``train --quick``: the same
data, schedule, clipping, weight decay and evaluation; :mod:`benchmarks.train`) under bf16
autocast, with

- fp32 params: the standard mixed-precision recipe (fp32 master weights, bf16 compute), the
  reference;
- bf16 params (the fp32 init rounded to nearest), stored after each step as each
  ``master_weights`` option says: "nearest" (torch.optim's rounding), "stochastic", "int8"
  (24-bit master), "int16" (32-bit master).

The compute is the same (autocast runs the matmuls in bf16 either way; losses and norms in
fp32), so only the weights' storage differs. Per optimizer, lr, storage and seed the final
validation loss is compared with the reference's of the same seed; a row reports the mean
over seeds of loss / reference − 1 (in %), the worst seed's, and the bytes per parameter the
weights take (bf16: 2, plus the low bits: 1 or 2; fp32: 4). Seeds change the init and the
batch order. ``--quick``: the train benchmark's quick model, 200 steps, five seeds, at AdamW's
tuned lr there (3e-3, ``benchmarks/results/train-*``) and a tenth of it (smaller updates:
rounding to nearest loses more of them).
"""
from dataclasses import replace
from statistics import mean

from tqdm import tqdm

from .common import default_device
from .data import load_shakespeare
from .optimizers import matrixopt_classes
from .train import QUICK, TrainConfig, train_one

#: (name, params' dtype, master_weights; None: fp32 params, the reference).
STORAGES = (("fp32 params (reference)", "float32", None), ("bf16, nearest", "bfloat16", "nearest"),
            ("bf16, stochastic", "bfloat16", "stochastic"), ("bf16, int8", "bfloat16", "int8"),
            ("bf16, int16", "bfloat16", "int16"))
#: Bytes per parameter of the weights and their low bits, per master_weights option.
WEIGHT_BYTES = {None: 4, "nearest": 2, "stochastic": 2, "int8": 3, "int16": 4}


def run(quick: bool = False, seeds: int | None = None, lrs=None, steps: int | None = None, optimizers=None,
        device=None):
    """The table: per optimizer × lr × storage, the loss vs the reference over ``seeds`` (default 5)."""
    seeds = seeds or 5
    cfg = replace(QUICK if quick else TrainConfig(), autocast=True)
    if steps is not None:
        cfg = replace(cfg, steps=steps, eval_every=max(1, min(cfg.eval_every, steps // 4)))
    lrs = lrs or (3e-3, 3e-4)
    names = [n for n in matrixopt_classes() if not optimizers or n in optimizers]
    device = default_device(device)
    corpus = load_shakespeare()
    losses = {}
    total = len(names) * len(lrs) * seeds * len(STORAGES) * cfg.steps
    with tqdm(total=total, desc="lean_weights", unit="step") as progress:
        for name in names:
            for lr in lrs:
                for seed in range(seeds):
                    for label, dtype, mode in STORAGES:
                        contender = name if mode is None else f"{name}[master_weights={mode!r}]"
                        progress.set_postfix_str(f"{name} lr={lr:g} seed={seed} {label}")
                        result = train_one(contender, lr, replace(cfg, seed=seed, param_dtype=dtype), corpus,
                                           device, progress)
                        losses[name, lr, label, seed] = result["val_loss"]
    rows = []
    for name in names:
        for lr in lrs:
            for label, _, mode in STORAGES:
                excess = [100 * (losses[name, lr, label, s] / losses[name, lr, STORAGES[0][0], s] - 1)
                          for s in range(seeds)]
                rows.append({"optimizer": name, "lr": lr, "weights": label, "weight_bytes_per_param": WEIGHT_BYTES[mode],
                             "val_loss_mean": mean(losses[name, lr, label, s] for s in range(seeds)),
                             "vs_reference_pct_mean": mean(excess), "vs_reference_pct_worst": max(excess)})
    extra = {"config": {**cfg.__dict__, "seeds": seeds, "lrs": list(lrs)},
             "losses": [{"optimizer": n, "lr": lr, "weights": label, "seed": s, "val_loss": v}
                        for (n, lr, label, s), v in losses.items()]}
    return {"Final validation loss vs fp32 params under bf16 autocast (mean over seeds)": rows}, extra, None
