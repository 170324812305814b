"""Low-precision optimizer state: how far stored Adam moments drift from fp32 ones.

    python -m benchmarks.quantization [--quick] [--steps N] [--out DIR]

Trains the ``train --quick`` model (``--quick``: and 200 steps; default 600) on Shakespeare
with ``torch.optim.AdamW`` (β = (0.9, 0.95), lr 3e-3 with train's schedule, clipping at 1),
and alongside it keeps, for every param of two or more dims, Adam's moments M and V
updated from the same gradients in each candidate storage: dequantize (or upcast), update
in fp32, store again — what ``state_precision`` does (:func:`matrixopt.quantize`,
:func:`matrixopt.round_bf16`). Reports, at the last step and as the worst over the run, the
relative error ‖x̂ − x‖/‖x‖ (all params' entries together) of M, of V, and of Adam's
direction M/(√V + ε) (ε = 1e-8), each candidate for one moment with the other kept fp32,
and the chosen pairs. Candidates for V (non-negative): linear absmax (256 levels of V/max),
linear in the sqrt domain (of √V/max √V), the dynamic exponent code
(:data:`matrixopt.SECOND_MOMENT_CODE`) of V, and of √V. For M: linear absmax (int8) and a
sign with a 7-bit dynamic code of |M|. And bf16 with stochastic rounding and with round to nearest.
Writes benchmarks/results/quantization-<machine>-<date>.{md,json}.
"""
import math
from dataclasses import replace

import torch

from matrixopt import SECOND_MOMENT_CODE, SIGNED_CODE, Code, code_of, dequantize, quantize, round_bf16

from .common import default_device, module_main
from .data import batches, load_shakespeare
from .model import ModelConfig, Transformer
from .train import QUICK, lr_factor

BETAS, EPS = (0.9, 0.95), 1e-8


def _linear(levels: int, signed: bool) -> Code:
    values = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    return code_of((2 * values - 1 if signed else values).tolist())


def _squared(code: Code) -> Code:
    """``code`` applied to √x: nearest in the sqrt domain, values squared."""
    return Code(code.values.double().square().float(), code.thresholds.double().square().float())


def _int8(code: Code):
    return (lambda x: quantize(x, code), lambda stored: dequantize(*stored, code))


def _bf16(stochastic: bool):
    def store(x, seed=[0]):
        seed[0] += 1
        return round_bf16(x, seed[0]) if stochastic else x.to(torch.bfloat16)
    return store, lambda stored: stored.float()


FP32 = (lambda x: x.clone(), lambda stored: stored)
#: name -> (storage of M, storage of V); a storage is (store, load).
CANDIDATES = {
    "V int8, linear absmax": (FP32, _int8(_linear(256, signed=False))),
    "V int8, linear in √V": (FP32, _int8(_squared(_linear(256, signed=False)))),
    "V int8, dynamic code (chosen)": (FP32, _int8(SECOND_MOMENT_CODE)),
    "V int8, dynamic code of √V": (FP32, _int8(_squared(SECOND_MOMENT_CODE))),
    "M int8, linear absmax": (_int8(_linear(255, signed=True)), FP32),
    "M int8, sign + 7-bit dynamic code (chosen)": (_int8(SIGNED_CODE), FP32),
    "M, V int8 (the chosen codes)": (_int8(SIGNED_CODE), _int8(SECOND_MOMENT_CODE)),
    "M, V bf16, stochastic rounding": (_bf16(True), _bf16(True)),
    "M, V bf16, round to nearest": (_bf16(False), _bf16(False)),
}


def _error(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    num = sum(float((x.double() - ref.double()).square().sum()) for x, ref in parts)
    den = sum(float(ref.double().square().sum()) for _, ref in parts)
    return math.sqrt(num / den)


def run(quick: bool = False, device=None, steps: int | None = None) -> dict[str, list[dict]]:
    device = default_device(device)
    cfg = replace(QUICK, steps=steps or (200 if quick else 600))
    corpus = load_shakespeare()
    torch.manual_seed(cfg.seed)
    model = Transformer(ModelConfig(len(corpus.vocab), cfg.dim, cfg.n_layers, cfg.n_heads,
                                    seq_len=cfg.seq_len)).to(device)
    params = [p for p in model.parameters() if p.ndim >= 2]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=BETAS, weight_decay=0.1)
    reference = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    stored = {name: [(m[0](torch.zeros_like(p)), v[0](torch.zeros_like(p))) for p in params]
              for name, (m, v) in CANDIDATES.items()}
    worst = {name: [0.0, 0.0, 0.0] for name in CANDIDATES}
    data = batches(corpus.train, cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed))
    for step in range(cfg.steps):
        x, y = (t.to(device) for t in next(data))
        for group in opt.param_groups:
            group["lr"] = 3e-3 * lr_factor(step, cfg)
        opt.zero_grad()
        model.loss(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        grads = [p.grad.float() for p in params]
        for (M, V), g in zip(reference, grads):
            M.lerp_(g, 1 - BETAS[0])
            V.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
        directions = [M / (V.sqrt() + EPS) for M, V in reference]
        for name, ((store_m, load_m), (store_v, load_v)) in CANDIDATES.items():
            errors = [[], [], []]
            for i, g in enumerate(grads):
                M, V = (load(s) for load, s in zip((load_m, load_v), stored[name][i]))
                M.lerp_(g, 1 - BETAS[0])
                V.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
                stored[name][i] = (store_m(M), store_v(V))
                M, V = load_m(stored[name][i][0]), load_v(stored[name][i][1])
                errors[0].append((M, reference[i][0]))
                errors[1].append((V, reference[i][1]))
                errors[2].append((M / (V.sqrt() + EPS), directions[i]))
            last = [_error(e) for e in errors]
            worst[name] = [max(w, e) for w, e in zip(worst[name], last)]
        opt.step()
    rows = []
    for name, w in worst.items():
        last_m, last_v, last_d = _final(stored[name], reference, CANDIDATES[name])
        rows.append({"storage": name, "M rel. err": last_m, "V rel. err": last_v, "direction rel. err": last_d,
                     "worst M": w[0], "worst V": w[1], "worst direction": w[2]})
    title = (f"Stored moments vs fp32 after {cfg.steps} AdamW steps of the train --quick model "
             f"({sum(p.numel() for p in params)} entries in {len(params)} params of ≥ 2 dims)")
    return {title: rows}


def _final(stored, reference, candidate):
    (_, load_m), (_, load_v) = candidate
    Ms = [load_m(m) for m, _ in stored]
    Vs = [load_v(v) for _, v in stored]
    return (_error(list(zip(Ms, (M for M, _ in reference)))), _error(list(zip(Vs, (V for _, V in reference)))),
            _error([(M / (V.sqrt() + EPS), Mr / (Vr.sqrt() + EPS)) for M, V, (Mr, Vr) in zip(Ms, Vs, reference)]))


def main(argv=None):
    return module_main("quantization", run, description=__doc__.splitlines()[0], argv=argv,
                       options=lambda parser: parser.add_argument("--steps", type=int, help="training steps"))


if __name__ == "__main__":
    main()
