"""The drop-in contract: what a torch.optim optimizer promises, checked for every optimizer
matrixopt exports.

Each test builds a tiny model with a tall and a wide matrix, a 3-D expert stack, a conv
kernel and 1-D biases, trains it a few steps and compares against the behaviour torch.optim
promises: checkpoints resume bit-identically, hooks, schedulers, deepcopy, no-grad params,
the non-finite policy, GradScaler.
"""
import copy
import re
import warnings

import pytest
import torch
from torch import nn

import matrixopt

# Every exported optimizer but the two bases (MatrixOptimizer has no rule; LowRankAdamW needs
# a projector, which GaLoreAdamW and DCTAdamW give it).
OPTIMIZERS = [
    obj for obj in (getattr(matrixopt, name) for name in matrixopt.__all__)
    if isinstance(obj, type) and issubclass(obj, matrixopt.MatrixOptimizer)
    and obj not in (matrixopt.MatrixOptimizer, matrixopt.LowRankAdamW)
]
# Small ranks and refresh gaps, so a few steps cross projector refreshes.
CONTRACT_KWARGS = {
    "GaLoreAdamW": dict(rank=2, update_proj_gap=3),
    "DCTAdamW": dict(rank=2, update_proj_gap=3),
    "CoSOAdamW": dict(rank=2, update_proj_gap=3, protect="both"),
}

pytestmark = pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
#: The tests that exercise state run at every state_precision (matrixopt.precision).
precisions = pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
#: ... and the tests of checkpoints and skipped steps with every way of storing the weights:
#: fp32 params, and bf16 params with each master_weights (matrixopt.weights) — None: fp32.
LEAN = [None, "nearest", "stochastic", "int8", "int16"]
leans = pytest.mark.parametrize("lean", LEAN, ids=["fp32-params", *LEAN[1:]])


def lean_model(lean):
    return make_model(dtype=torch.float32 if lean is None else torch.bfloat16)


def lean_kwargs(lean, precision):
    return {"state_precision": precision, **({} if lean is None else {"master_weights": lean})}


class Tiny(nn.Module):
    """tall (hidden×6) and wide (5×hidden) Linears, a 3-D expert stack, a conv, 1-D biases."""

    def __init__(self, hidden=12):
        super().__init__()
        self.tall = nn.Linear(6, hidden)
        self.wide = nn.Linear(hidden, 5, bias=False)
        self.experts = nn.Parameter(0.3 * torch.randn(3, 5, 4))
        self.conv = nn.Conv2d(2, 3, kernel_size=2)

    def forward(self, x, img):
        h = torch.tanh(self.wide(torch.relu(self.tall(x))))
        h = torch.tanh(torch.einsum("bm,emn->ben", h, self.experts)).sum((1, 2))
        return h + torch.tanh(self.conv(img)).sum((1, 2, 3))


def make_model(hidden=12, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Tiny(hidden).to(dtype)


def make_opt(cls, model, only=None, **kw):
    """``cls`` over the model's named params (or just the one named ``only``)."""
    params = [(n, p) for n, p in model.named_parameters() if only in (None, n)]
    return cls(params, **{"lr": 1e-2, **CONTRACT_KWARGS.get(cls.__name__, {}), **kw})


def loss_fn(model, i):
    """The loss on batch ``i`` (deterministic data, independent of the global RNG)."""
    g = torch.Generator().manual_seed(1000 + i)
    dtype = model.experts.dtype
    x = torch.randn(8, 6, generator=g).to(dtype)
    img = torch.randn(8, 2, 3, 3, generator=g).to(dtype)
    y = torch.randn(8, generator=g).to(dtype)
    return (model(x, img) - y).square().mean()


def backward(model, i):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, i)
    loss.backward()
    return loss


def train(model, opt, steps):
    for i in steps:
        backward(model, i)
        opt.step()


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def state_snapshot(opt):
    return {k: copy.deepcopy(v) for k, v in opt.state_dict()["state"].items()}


def assert_same(a, b):
    """Two dicts (or lists, or values) nest the same bit-identical tensors and values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


# -- checkpoints ---------------------------------------------------------------------------------

@leans
@precisions
def test_checkpoint_resumes_bit_identically(cls, tmp_path, precision, lean):
    model = lean_model(lean)
    opt = make_opt(cls, model, **lean_kwargs(lean, precision))
    train(model, opt, range(3))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed_model = copy.deepcopy(model)
    train(model, opt, range(3, 9))  # crosses refreshes at steps 3 and 6

    torch.manual_seed(12345)  # resuming must not depend on the global RNG's state
    resumed = make_opt(cls, resumed_model, **lean_kwargs(lean, precision))
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    train(resumed_model, resumed, range(3, 9))
    assert_same(weights(resumed_model), weights(model))
    assert_same(resumed.state_dict(), opt.state_dict())


@precisions
@pytest.mark.parametrize("only", [None, "tall.bias"], ids=["all", "fallback"])
def test_state_dict_for_other_shapes_is_rejected(cls, only, precision):
    model = make_model()
    opt = make_opt(cls, model, only=only, state_precision=precision)
    train(model, opt, range(2))
    fresh = make_opt(cls, make_model(hidden=7), only=only, state_precision=precision)
    with pytest.raises(ValueError, match=re.escape(only or "tall.weight")):
        fresh.load_state_dict(opt.state_dict())
    assert not fresh.state


def test_state_dict_with_invalid_hyperparameters_is_rejected(cls):
    model = make_model()
    opt = make_opt(cls, model)
    train(model, opt, range(1))
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = -1.0
    fresh = make_opt(cls, make_model())
    with pytest.raises(ValueError, match="lr"):
        fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 1e-2 and not fresh.state


# -- torch.optim machinery -------------------------------------------------------------------------

def test_hooks(cls, tmp_path):
    model = make_model()
    opt = make_opt(cls, model)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o, sd):
        calls.append("sd_post")
        sd["note"] = "kept"
        return sd

    opt.register_state_dict_post_hook(sd_post)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    train(model, opt, range(1))
    sd = opt.state_dict()
    assert sd["note"] == "kept"
    opt.load_state_dict(sd)
    assert calls == ["step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"]


def test_add_param_group(cls):
    """Adding a group later steps exactly like having it from the start, with its own lr."""
    first = ["tall.weight", "tall.bias"]
    model_a, model_b = make_model(), make_model()

    def split(model):
        named = list(model.named_parameters())
        return ([(n, p) for n, p in named if n in first],
                {"params": [(n, p) for n, p in named if n not in first], "lr": 3e-3})

    kw = CONTRACT_KWARGS.get(cls.__name__, {})
    head, rest = split(model_a)
    opt_a = cls(head, lr=1e-2, **kw)
    opt_a.add_param_group(rest)
    head, rest = split(model_b)
    opt_b = cls([{"params": head}, rest], lr=1e-2, **kw)
    assert opt_a.param_groups[1]["lr"] == 3e-3
    assert opt_a.param_groups[1].keys() == opt_b.param_groups[1].keys()
    before = weights(model_a)
    train(model_a, opt_a, range(4))
    train(model_b, opt_b, range(4))
    assert_same(weights(model_a), weights(model_b))
    assert all(not torch.equal(before[n], p) for n, p in model_a.named_parameters())


def test_closure(cls):
    model_a, model_b = make_model(), make_model()
    opt_a, opt_b = make_opt(cls, model_a), make_opt(cls, model_b)
    for i in range(3):
        loss = opt_a.step(lambda: backward(model_a, i))
        assert torch.equal(loss, loss_fn(model_b, i))
        backward(model_b, i)
        opt_b.step()
    assert_same(weights(model_a), weights(model_b))


@pytest.mark.parametrize("scheduler", [
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4),
], ids=["LambdaLR", "CosineAnnealingLR"])
def test_lr_scheduler(cls, scheduler):
    """A scheduler's lr is the one the step uses: same as setting group["lr"] by hand."""
    model_a, model_b = make_model(), make_model()
    opt_a, opt_b = make_opt(cls, model_a), make_opt(cls, model_b)
    sched = scheduler(opt_a)
    lrs = []
    for i in range(5):
        lrs.append(opt_a.param_groups[0]["lr"])
        for group in opt_b.param_groups:
            group["lr"] = lrs[-1]
        train(model_a, opt_a, [i])
        train(model_b, opt_b, [i])
        sched.step()
    assert len(set(lrs)) == 5
    assert_same(weights(model_a), weights(model_b))
    # and lr 0 (with it the decay) freezes the weights
    for group in opt_a.param_groups:
        group["lr"] = 0.0
    before = weights(model_a)
    train(model_a, opt_a, range(5, 7))
    assert_same(weights(model_a), before)


def test_deepcopy(cls):
    model = make_model()
    opt = make_opt(cls, model)
    train(model, opt, range(2))
    model_copy, opt_copy = copy.deepcopy((model, opt))
    assert opt_copy.state and all(p in opt_copy.state for p in model_copy.parameters())
    train(model, opt, range(2, 6))
    train(model_copy, opt_copy, range(2, 6))
    assert_same(weights(model_copy), weights(model))
    assert_same(opt_copy.state_dict(), opt.state_dict())


def test_repr(cls):
    opt = make_opt(cls, make_model(), weight_decay=0.025)
    text = repr(opt)
    assert text.startswith(cls.__name__)
    assert "weight_decay: 0.025" in text and "lr: 0.01" in text
    for name in opt.defaults:
        assert name in text


def test_params_without_grad_are_untouched(cls):
    model = make_model()
    model.wide.weight.requires_grad_(False)
    model.conv.bias.requires_grad_(False)
    opt = make_opt(cls, model)
    before = weights(model)
    train(model, opt, range(3))
    for name in ("wide.weight", "conv.bias"):
        p = dict(model.named_parameters())[name]
        assert torch.equal(p, before[name]) and p not in opt.state
    assert not torch.equal(model.tall.weight, before["tall.weight"])


@precisions
def test_step_without_grads_is_a_noop(cls, precision):
    model = make_model()
    opt = make_opt(cls, model, state_precision=precision)
    opt.step()
    assert not opt.state
    train(model, opt, range(2))
    before, state = weights(model), state_snapshot(opt)
    opt.zero_grad()
    opt.step()
    assert_same(weights(model), before)
    assert_same(state_snapshot(opt), state)


# -- bad input --------------------------------------------------------------------------------------

NONFINITE = [("wide.weight", float("nan")), ("experts", float("inf")),
             ("conv.weight", -float("inf")), ("tall.bias", float("nan"))]


@leans
@precisions
@pytest.mark.parametrize("bad,value", NONFINITE, ids=[n for n, _ in NONFINITE])
def test_nonfinite_grad_is_skipped(cls, bad, value, precision, lean):
    """The bad param and its state (its weight's low bits and rounding counter too) stay
    bit-identical; the others step exactly as if it had no grad; nonfinite_skips counts; one
    warning names it, however often it recurs."""
    model, reference = lean_model(lean), lean_model(lean)
    opt, ref_opt = make_opt(cls, model, **lean_kwargs(lean, precision)), \
        make_opt(cls, reference, **lean_kwargs(lean, precision))
    train(model, opt, range(2))
    train(reference, ref_opt, range(2))
    p = dict(model.named_parameters())[bad]
    before, state = weights(model)[bad], copy.deepcopy(opt.state[p])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(2, 4):
            backward(model, i)
            p.grad.view(-1)[1] = value
            opt.step()
            backward(reference, i)
            dict(reference.named_parameters())[bad].grad = None
            ref_opt.step()
    assert torch.equal(p, before)
    assert_same(opt.state[p], state)
    assert opt.nonfinite_skips == 2
    named = [w for w in caught if bad in str(w.message)]
    assert len(named) == 1 and "nonfinite" in str(named[0].message)
    assert named[0].filename == __file__  # points at the opt.step() call
    for name, q in reference.named_parameters():
        if name != bad:
            torch.testing.assert_close(dict(model.named_parameters())[name], q, rtol=1e-6, atol=1e-7)


@precisions
def test_nonfinite_raise(cls, precision):
    model = make_model()
    opt = make_opt(cls, model, nonfinite="raise", state_precision=precision)
    train(model, opt, range(2))
    backward(model, 2)
    model.experts.grad[0, 0, 0] = float("nan")
    before, state = weights(model), state_snapshot(opt)
    with pytest.raises(FloatingPointError, match="experts"):
        opt.step()
    assert_same(weights(model), before)
    assert_same(state_snapshot(opt), state)


def test_nonfinite_raise_in_a_later_group_updates_nothing(cls):
    model = make_model()
    named = list(model.named_parameters())
    opt = cls([{"params": named[:2]}, {"params": named[2:], "nonfinite": "raise"}], lr=1e-2,
              **CONTRACT_KWARGS.get(cls.__name__, {}))
    backward(model, 0)
    model.conv.weight.grad.fill_(float("inf"))
    before = weights(model)
    with pytest.raises(FloatingPointError, match="conv.weight"):
        opt.step()
    assert_same(weights(model), before)
    assert not opt.state


def test_sparse_grad_is_rejected(cls):
    model = make_model()
    opt = make_opt(cls, model)
    backward(model, 0)
    model.tall.weight.grad = model.tall.weight.grad.to_sparse()
    before = weights(model)
    with pytest.raises(TypeError, match=re.escape("tall.weight")):
        opt.step()
    assert_same(weights(model), before)


def test_complex_param_is_rejected(cls):
    z = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    with pytest.raises((TypeError, ValueError), match="z_param"):
        cls([("z_param", z)], **CONTRACT_KWARGS.get(cls.__name__, {}))


# -- dtypes, AMP, memory ------------------------------------------------------------------------------

@precisions
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params(cls, dtype, precision):
    """Params keep their dtype, move and stay finite; state is fp32 or the param's dtype (or
    bf16 / uint8 codes, as state_precision says)."""
    model = make_model(dtype=dtype)
    opt = make_opt(cls, model, state_precision=precision)
    before = weights(model)
    train(model, opt, range(4))
    for name, p in model.named_parameters():
        assert p.dtype == dtype and p.isfinite().all()
        assert not torch.equal(p, before[name]), name
    for s in opt.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype in (torch.float32, dtype, *[torch.bfloat16] * (precision != "fp32"))
                assert v.isfinite().all()


@precisions
def test_grad_scaler(cls, precision):
    """scaler.step(opt) steps like opt.step() on unscaled grads, and skips on inf."""
    model, reference = make_model(), make_model()
    opt, ref_opt = make_opt(cls, model, state_precision=precision), make_opt(cls, reference, state_precision=precision)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i in range(3):
        opt.zero_grad()
        scaler.scale(loss_fn(model, i)).backward()
        scaler.step(opt)
        scaler.update()
        train(reference, ref_opt, [i])
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    before, state, scale = weights(model), state_snapshot(opt), scaler.get_scale()
    opt.zero_grad()
    scaler.scale(loss_fn(model, 3)).backward()
    model.tall.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert_same(weights(model), before)
    assert_same(state_snapshot(opt), state)
    assert scaler.get_scale() < scale and opt.nonfinite_skips == 0


# The model's params as the optimizers see them: matrices (B, m, n) and fallback vectors.
MATRICES = {"tall.weight": (1, 12, 6), "wide.weight": (1, 5, 12), "experts": (3, 5, 4),
            "conv.weight": (1, 3, 8)}   # conv (3, 2, 2, 2) as (out, in·kh·kw)
VECTORS = {"tall.bias": 12, "conv.bias": 3}


def moment_bytes(shape, precision):
    """Bytes of one moment stored as ``shape``: fp32, bf16, or (2+ dims) one byte per entry
    and a 4-byte scale per 256 entries of each row (dim-0 slice), counted row by row."""
    numel = 1
    for s in shape:
        numel *= s
    if precision == "bf16":
        return 2 * numel
    if precision == "int8" and len(shape) >= 2:
        row = numel // shape[0]
        return numel + 4 * shape[0] * -(-row // 256)
    return 4 * numel


#: The param shapes, and the low-rank moments' stored shapes (GaLore's "std" and DCT project the
#: smaller side: m ≥ n on the right, (m, r); else on the left, (r, n); a 3-D param keeps its E).
SHAPES = {"tall.weight": (12, 6), "wide.weight": (5, 12), "experts": (3, 5, 4), "conv.weight": (3, 2, 2, 2)}
LOW = {"tall.weight": (12, 2), "wide.weight": (2, 12), "experts": (3, 5, 2), "conv.weight": (2, 8)}


def expected_state_bytes(name, precision="fp32"):
    """Bytes of state after a step with fp32 params, from each rule's definition (step
    counters are Python ints, not tensors) at ``state_precision``: moments as
    :func:`moment_bytes`, bases (GaLore, CoSO) bf16 below fp32, everything else fp32 / int32."""
    fallback = sum(2 * moment_bytes((n,), precision) for n in VECTORS.values())   # AdamW's exp_avg, exp_avg_sq
    basis = 2 if precision != "fp32" else 4
    r = 2                                                       # CONTRACT_KWARGS' rank
    total = 0
    for key, (B, m, n) in MATRICES.items():
        k = min(m, n)
        low = 2 * moment_bytes(LOW[key], precision)
        if name in ("Muon", "ROOT"):
            total += moment_bytes(SHAPES[key], precision)      # the momentum
        elif name == "ARO":                                     # momentum, rotation of the smaller side
            total += moment_bytes(SHAPES[key], precision) + 4 * B * k * k
        elif name == "GaLoreAdamW":   # 2 moments of the low-rank gradient + its basis
            total += low + basis * B * r * k
        elif name == "DCTAdamW":      # 2 moments (smaller side projected), r int32 indices
            total += low + 4 * B * r
        elif name == "CoSOAdamW":     # GaLore's, and on the input side (n): a history of
            h = k                       # max_history = min(m, n) (the sketch in its free columns), its int32
            total += low + basis * B * r * k + 4 * B * (n * h + 1 + n * min(r, n) + 1)   # count, an r-column
            # accumulator and the energy the sketch cut off
    if name == "DCTAdamW":            # one shared k×k DCT basis per distinct k (6, 5, 4, 3), fp32 (Q a view of Qᵀ)
        total += 4 * sum({min(m, n): min(m, n) ** 2 for _, m, n in MATRICES.values()}.values())
    if name == "CoSOAdamW":           # the fallback's bool masks: entries protected, entries touched
        fallback += sum(2 * n for n in VECTORS.values())
    return total + fallback


@precisions
def test_state_bytes(cls, precision):
    """state_bytes() is the state each rule defines (counted here by hand), and 0 before a step."""
    model = make_model()
    opt = make_opt(cls, model, state_precision=precision)
    assert opt.state_bytes() == 0
    assert {n for n, p in model.named_parameters()} == MATRICES.keys() | VECTORS.keys()
    train(model, opt, range(4))
    assert opt.state_bytes() == expected_state_bytes(cls.__name__, precision)


def test_unknown_state_key_is_rejected_naming_the_param(cls):
    model = make_model()
    opt = make_opt(cls, model)
    train(model, opt, range(1))
    saved = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    index = names.index("wide.weight")
    saved["state"][index]["bogus"] = torch.zeros(1)
    fresh = make_opt(cls, make_model())
    with pytest.raises(ValueError, match=r"wide\.weight.*'bogus'"):
        fresh.load_state_dict(saved)
    assert not fresh.state


def test_missing_state_key_is_rejected_naming_the_param(cls):
    """A checkpoint whose state lacks a declared entry (one of an older rule) is refused by
    name at load, not with a KeyError at the next step."""
    model = make_model()
    opt = make_opt(cls, model)
    train(model, opt, range(1))
    saved = opt.state_dict()
    index = [n for n, _ in model.named_parameters()].index("tall.bias")   # the fallback's: 3 entries
    del saved["state"][index]["exp_avg_sq"]
    fresh = make_opt(cls, make_model())
    with pytest.raises(ValueError, match=r"tall\.bias.*\['exp_avg_sq'\] missing"):
        fresh.load_state_dict(saved)
    assert not fresh.state


def test_hyperparameter_a_checkpoint_predates_takes_the_default(cls):
    """A saved group without one of the optimizer's hyperparameters (saved before it existed)
    loads with the default, and the run goes on as the uninterrupted one."""
    model, other = make_model(), make_model()
    opt = make_opt(cls, model)
    train(model, opt, range(2))
    saved = opt.state_dict()
    name = next(k for k in cls.hyperparameters if k in saved["param_groups"][0])
    for group in saved["param_groups"]:
        group.pop(name, None)
    other.load_state_dict(model.state_dict())
    resumed = make_opt(cls, other)
    resumed.load_state_dict(saved)
    assert all(group[name] == opt.defaults[name] for group in resumed.param_groups)
    train(model, opt, range(2, 4))
    train(other, resumed, range(2, 4))
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


@precisions
def test_loaded_state_takes_the_declared_dtypes(cls, precision):
    """A checkpoint whose state tensors were saved as float64 loads with each state's declared
    dtype (here: what the optimizer itself holds for fp32 params), and the run continues bit
    for bit (fp32 → fp64 → fp32 is exact)."""
    model = make_model()
    opt = make_opt(cls, model, state_precision=precision)
    train(model, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())
    for s in saved["state"].values():
        for k, v in s.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                s[k] = v.double()
    resumed_model = copy.deepcopy(model)
    resumed = make_opt(cls, resumed_model, state_precision=precision)
    resumed.load_state_dict(saved)
    dtypes = lambda o: {(pid, k): v.dtype for pid, s in o.state_dict()["state"].items() for k, v in s.items()
                        if isinstance(v, torch.Tensor)}
    assert dtypes(resumed) == dtypes(opt)
    train(model, opt, range(3, 7))
    train(resumed_model, resumed, range(3, 7))
    assert_same(weights(resumed_model), weights(model))
    assert_same(resumed.state_dict(), opt.state_dict())


def test_load_state_dict_hooks_can_edit(cls):
    """A pre-hook's returned state dict is what gets loaded (and checked); a post-hook sees
    the final state, and its edits stay."""
    model = make_model()
    opt = make_opt(cls, model)
    train(model, opt, range(2))
    saved = opt.state_dict()
    fresh = make_opt(cls, make_model())

    def double(o, sd):
        sd = copy.deepcopy(sd)
        for s in sd["state"].values():
            for k, v in s.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    s[k] = 2 * v
        return sd

    def zero(o):
        for s in o.state.values():
            for v in s.values():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    zeroed.append(v.zero_())

    zeroed = []
    fresh.register_load_state_dict_pre_hook(double)
    fresh.load_state_dict(saved)
    assert_same(fresh.state_dict()["state"], double(None, saved)["state"])
    fresh.register_load_state_dict_post_hook(zero)
    fresh.load_state_dict(saved)
    assert zeroed and all(not v.any() for s in fresh.state.values() for v in s.values()
                          if isinstance(v, torch.Tensor) and v.is_floating_point())
