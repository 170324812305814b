r"""The fallback: the rule for params that are not matrices (biases, norms, embeddings, the
head). :class:`AdamW` is the default; any object with the members of
:class:`matrixopt.protocols.Fallback` can replace it (``MatrixOptimizer(..., fallback=...)``).
"""
import math

import torch

from .ops import decay_weights
from .state import State, counter
from .precision import MOMENT, SECOND_MOMENT


def adamw(weights, grads, exp_avgs, exp_avg_sqs, steps, *, lr: float, betas: tuple[float, float],
          eps: float, weight_decay: float) -> None:
    r"""AdamW as ``torch.optim.AdamW`` computes it, over lists of tensors.

    For each weight W with gradient G, moments M, V and step t (already incremented):

    .. math::
        W \leftarrow W (1 - \eta\lambda), \quad M \leftarrow \beta_1 M + (1-\beta_1) G, \quad
        V \leftarrow \beta_2 V + (1-\beta_2) G^2, \\
        W \leftarrow W - \frac{\eta}{1-\beta_1^t} \frac{M}{\sqrt{V}/\sqrt{1-\beta_2^t} + \epsilon}

    A weight whose dtype is its moments' and its gradient's (fp32 params: the default
    fallback's moments are fp32) goes through torch's fused AdamW kernel
    (``torch.optim.AdamW(fused=True)``'s, bit for bit): one pass that reads G, M, V and W
    and writes M, V and W, where the foreach form makes eight
    passes over M, V and a temporary of W's size. Low-precision weights (fp32 moments) take
    ``torch.optim.AdamW(foreach=True)``'s form through an fp32 copy that is written back (and
    fp64 ones the same form on themselves).
    """
    fused, rest = [], []
    for i, (w, g, m) in enumerate(zip(weights, grads, exp_avgs)):
        ok = w.dtype == g.dtype == m.dtype and w.device.type in ("cpu", "cuda") and w.is_contiguous() \
            and g.is_contiguous()
        (fused if ok else rest).append(i)
    if fused:
        device = weights[fused[0]].device
        torch._fused_adamw_([weights[i] for i in fused], [grads[i] for i in fused], [exp_avgs[i] for i in fused],
                            [exp_avg_sqs[i] for i in fused], [],
                            [torch.full((), float(steps[i]), device=device) for i in fused], lr=lr,
                            beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=False,
                            maximize=False)
    if rest:
        _adamw_foreach([weights[i] for i in rest], [grads[i] for i in rest], [exp_avgs[i] for i in rest],
                       [exp_avg_sqs[i] for i in rest], [steps[i] for i in rest], lr=lr, betas=betas, eps=eps,
                       weight_decay=weight_decay)


def _adamw_foreach(weights, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, eps, weight_decay) -> None:
    """:func:`adamw` in torch.optim.AdamW's foreach form, ``weights`` in fp32 (fp64 ones as
    they are: the step is added to them in fp64) and ``grads`` in fp32 (``.float()`` of an
    fp32 tensor is the tensor itself)."""
    beta1, beta2 = betas
    work = [w if w.dtype == torch.float64 else w.float() for w in weights]
    grads = [g.float() for g in grads]
    decay_weights(work, lr=lr, weight_decay=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, [math.sqrt(1 - beta2 ** t) for t in steps])
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(work, exp_avgs, denominators, [-lr / (1 - beta1 ** t) for t in steps])
    for w, x in zip(weights, work):
        if x is not w:
            w.copy_(x)


class AdamW:
    """The default fallback: :func:`adamw` with the group's ``lr``, ``betas``, ``eps`` and
    ``weight_decay``, and fp32 moments shaped (and, under FSDP2, sharded) like the param,
    marked for the group's ``state_precision`` (M a moment, V a second moment: see
    :mod:`matrixopt.precision`; the shell hands :func:`adamw` fp32 temporaries of them)."""

    hyperparameters: dict = {}   # lr, betas, eps, weight_decay: every optimizer validates them
    elementwise = True

    @staticmethod
    def state(p, group) -> dict[str, State]:
        moment = State(tuple(p.shape), torch.float32, sharded=True, role=MOMENT)
        return {"step": counter(), "exp_avg": moment, "exp_avg_sq": moment._replace(role=SECOND_MOMENT)}

    @staticmethod
    def update(group, weights, grads, states) -> None:
        for s in states:
            s["step"] += 1
        adamw(weights, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [s["step"] for s in states], lr=float(group["lr"]), betas=group["betas"], eps=group["eps"],
              weight_decay=group["weight_decay"])
