"""Lean weights (``master_weights``): bf16/fp16 params that keep the updates fp32 params would.

References are independent of the code under test: an fp32-param run of the same optimizer on
the same gradients (int16 is an fp32 master copy bit for bit; int8 within its bound), bf16's
neighbours of a value computed with ``torch.nextafter`` (stochastic rounding picks one of them,
unbiased), and the contract's promises (checkpoints, non-finite skips, state_bytes, errors).
"""
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import matrixopt

torch.set_num_threads(1)

SETTINGS = {
    "Muon": {}, "ROOT": {}, "ARO": {},
    "GaLoreAdamW": dict(rank=4, update_proj_gap=3),
    "DCTAdamW": dict(rank=4, update_proj_gap=3),
    "CoSOAdamW": dict(rank=4, update_proj_gap=3, protect="both"),
}
MODES = ("stochastic", "int8", "int16")
#: A matrix of each kind (tall, wide, 3-D stack, one split in unequal row blocks) and fallback params.
SHAPES = {"tall": (40, 24), "wide": (16, 40), "stack": (3, 12, 8), "blocked": (20, 8), "bias": (40,),
          "table": (11, 16)}


def groups(params: dict) -> list[dict]:
    return [{"params": [params[k] for k in ("tall", "wide", "stack")], "matrix": True},
            {"params": [params["blocked"]], "matrix": True, "blocks": [4, 16]},
            {"params": [params["bias"], params["table"]], "matrix": False}]


def weights_of(dtype, seed=0):
    """Params of every kind, bf16-representable values, as ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return {k: nn.Parameter((torch.randn(s, generator=g) * 0.05).bfloat16().to(dtype)) for k, s in SHAPES.items()}


def gradients(steps, seed=1):
    """bf16-representable gradients (the same values reach fp32 and bf16 params)."""
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g).bfloat16() for k, s in SHAPES.items()} for _ in range(steps)]


def run(name, dtype, steps=5, opt=None, params=None, grads=None, **kwargs):
    params = params if params is not None else weights_of(dtype)
    opt = opt or getattr(matrixopt, name)(groups(params), lr=0.02, weight_decay=0.1, **SETTINGS[name], **kwargs)
    for g in grads if grads is not None else gradients(steps):
        for k, p in params.items():
            p.grad = g[k].to(dtype)
        opt.step()
    return params, opt


def masters(params, opt) -> dict:
    return {k: opt.master_weight(p) for k, p in params.items()}


# -- int16: an fp32 master copy, bit for bit --------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_int16_is_an_fp32_master_bit_for_bit(name, precision):
    """Six steps (two projector refreshes) on bf16 params with int16 low bits end at the fp32
    params' run bit for bit, in every param kind, and each bf16 weight is its master rounded
    to nearest (ties away from 0)."""
    reference, _ = run(name, torch.float32, 6, state_precision=precision)
    params, opt = run(name, torch.bfloat16, 6, state_precision=precision, master_weights="int16")
    for k, master in masters(params, opt).items():
        assert master.dtype == torch.float32
        assert torch.equal(master, reference[k].detach()), k
        nearest = master.bfloat16().float()
        assert ((params[k].float() - master).abs() <= (nearest - master).abs()).all(), k


@pytest.mark.parametrize("name", ["Muon", "GaLoreAdamW"])
def test_int8_master_stays_within_its_bound_of_the_fp32_run(name):
    """The 24-bit master's every write errs below 2^-15 of the value, with mean 0: after 6
    steps it is within a few such errors of the fp32 run, far inside bf16's own rounding."""
    reference, _ = run(name, torch.float32, 6)
    params, opt = run(name, torch.bfloat16, 6, master_weights="int8")
    for k, master in masters(params, opt).items():
        want = reference[k].detach()
        err = (master - want).norm() / want.norm()
        assert err < 6 * 2 ** -15, (k, err)
        assert err < (want.bfloat16().float() - want).norm() / want.norm(), k


# -- the stored values -------------------------------------------------------------------------------

def _stored(mode, x, dtype=torch.bfloat16, seed=3):
    """x (fp32) stored by mode and read back (its master)."""
    from matrixopt.weights import Stored, master, store
    weight = torch.empty_like(x, dtype=dtype)
    low = torch.empty_like(x, dtype={"int8": torch.int8, "int16": torch.int16}[mode]) if mode != "stochastic" else None
    how = Stored(mode, low, seed, 0)
    store(x, weight, how)
    return weight, master(weight, how)


finite_fp32 = st.integers(-(2 ** 31), 2 ** 31 - 1).map(
    lambda b: torch.tensor([b], dtype=torch.int32).view(torch.float32)).filter(
    lambda t: bool(t.isfinite()) and t.abs().item() < 3.3e38)


@settings(max_examples=300, deadline=None)
@given(st.lists(finite_fp32, min_size=1, max_size=40))
def test_int16_round_trip_is_exact_for_every_finite_fp32(values):
    x = torch.cat(values)
    weight, master = _stored("int16", x)
    assert torch.equal(master.view(torch.int32), x.view(torch.int32))   # -0.0 and subnormals too
    assert ((weight.float() - x).abs() <= (x.bfloat16().float() - x).abs()).all()


@settings(max_examples=300, deadline=None)
@given(st.lists(finite_fp32, min_size=1, max_size=40), st.integers(0, 2 ** 32 - 1))
def test_int8_master_is_a_neighbour_within_2_to_the_minus_15(values, seed):
    x = torch.cat(values).double()
    _, master = _stored("int8", x.float(), seed=seed)
    exponent = torch.frexp(x).exponent.double() - 1   # 2^e <= |x| < 2^(e+1)
    bound = torch.where(x == 0, torch.zeros_like(x), torch.ldexp(torch.ones_like(x), exponent.long() - 15))
    assert ((master.double() - x).abs() < bound.clamp_min(2.0 ** -141)).all()


def _neighbours(x: torch.Tensor, dtype):
    """The two values of ``dtype`` around each x (fp32), by nextafter (equal where x is one)."""
    y = x.to(dtype)
    other = torch.nextafter(y, torch.where(x > y.float(), torch.full_like(y, math.inf), torch.full_like(y, -math.inf)))
    return torch.minimum(y.float(), other.float()), torch.maximum(y.float(), other.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype):
    """Each value rounds to one of its two neighbours, up with probability (x − a)/(b − a):
    the mean over 4096 seeds is x within 5 standard errors."""
    from matrixopt.weights import round_stochastic
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(64, generator=g) * 0.02, torch.tensor([1e-6, -3e-7, 65000.0, 0.0, 1.0])])
    if dtype == torch.bfloat16:
        x = torch.cat([x, torch.tensor([1e30, -2e-38])])
    a, b = _neighbours(x, dtype)
    draws = torch.stack([round_stochastic(x, dtype, seed).float() for seed in range(4096)])
    assert ((draws == a) | (draws == b)).all()
    p = torch.where(b > a, (x - a) / (b - a), torch.zeros_like(x)).double()
    mean_up = (draws == b).double().mean(0)
    assert ((mean_up - p).abs() <= 5 * (p * (1 - p) / 4096).sqrt() + 1e-9).all()


def test_updates_below_half_an_ulp_move_the_weight_unless_rounded_to_nearest():
    """A weight of 1.0 stepped 256 times by −2⁻¹⁰ (1/8 of its bf16 ulp): round to nearest never
    moves it; int16 and int8 move it exactly to 1 − 2⁻²; stochastic rounding on average over
    its 256 entries (each a random walk of ~7 ulps' spread: the mean's standard error is
    ~0.002)."""
    ends = {}
    for mode in ("nearest",) + MODES:
        p = nn.Parameter(torch.ones(4, 64, dtype=torch.bfloat16))
        opt = matrixopt.Muon([{"params": [p], "matrix": False}], lr=2 ** -10, betas=(0.0, 0.0), eps=1e-30,
                             weight_decay=0.0, master_weights=mode)
        for _ in range(256):
            p.grad = torch.ones_like(p)   # Adam with β = 0: the step is lr·sign(g)
            opt.step()
        ends[mode] = opt.master_weight(p)
    assert torch.equal(ends["nearest"], torch.ones(4, 64))
    assert torch.equal(ends["int16"], torch.full((4, 64), 0.75))
    assert torch.equal(ends["int8"], torch.full((4, 64), 0.75))
    assert abs(ends["stochastic"].mean().item() - 0.75) < 0.01


# -- the contract ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["Muon", "GaLoreAdamW", "CoSOAdamW"])
def test_checkpoint_resumes_exactly(name, mode):
    """Save after 3 steps (torch.save, read back with weights_only=True), resume in a fresh
    optimizer over the saved weights: the next 3 steps equal the uninterrupted run's, weights
    and low bits bit for bit."""
    grads = gradients(6)
    params, opt = run(name, torch.bfloat16, grads=grads[:3], master_weights=mode)
    buffer = io.BytesIO()
    torch.save({"weights": {k: p.detach() for k, p in params.items()}, "opt": opt.state_dict()}, buffer)
    run(name, torch.bfloat16, grads=grads[3:], params=params, opt=opt)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = {k: nn.Parameter(w.clone()) for k, w in saved["weights"].items()}
    fresh = matrixopt.__dict__[name](groups(resumed), lr=0.02, weight_decay=0.1, **SETTINGS[name])
    fresh.load_state_dict(saved["opt"])
    run(name, torch.bfloat16, grads=grads[3:], params=resumed, opt=fresh)
    for k in params:
        assert torch.equal(params[k], resumed[k]), k
        assert torch.equal(opt.master_weight(params[k]), fresh.master_weight(resumed[k])), k


@pytest.mark.parametrize("mode", MODES)
def test_a_skipped_step_leaves_weight_low_bits_and_counter_untouched(mode):
    params, opt = run("GaLoreAdamW", torch.bfloat16, 2, master_weights=mode)
    before = {k: (p.detach().clone(), {s: v.clone() if torch.is_tensor(v) else v for s, v in opt.state[p].items()})
              for k, p in params.items()}
    for k, p in params.items():
        p.grad = torch.randn_like(p)
    params["wide"].grad[0, 0] = float("nan")
    params["table"].grad[1, 1] = float("inf")
    with pytest.warns(RuntimeWarning, match="Non-finite"):
        opt.step()
    for k in ("wide", "table"):
        weight, state = before[k]
        assert torch.equal(params[k], weight), k
        for key, value in state.items():
            now = opt.state[params[k]][key]
            assert torch.equal(now, value) if torch.is_tensor(value) else now == value, (k, key)
    assert not torch.equal(params["tall"], before["tall"][0])


def test_state_bytes_count_the_low_bits_and_fp32_params_are_untouched():
    sizes = sum(math.prod(s) for s in SHAPES.values())
    counts = {mode: run("Muon", torch.bfloat16, 1, master_weights=mode)[1].state_bytes() for mode in ("nearest",) + MODES}
    assert counts["stochastic"] == counts["nearest"]
    assert counts["int8"] == counts["nearest"] + sizes
    assert counts["int16"] == counts["nearest"] + 2 * sizes
    plain, plain_opt = run("Muon", torch.float32, 3)
    lean, lean_opt = run("Muon", torch.float32, 3, master_weights="int16")
    for k in plain:
        assert torch.equal(plain[k], lean[k]), k
        assert "weight_low_bits" not in lean_opt.state[lean[k]]
    assert plain_opt.state_bytes() == lean_opt.state_bytes()


def test_errors_name_the_argument_and_the_param():
    with pytest.raises(ValueError, match="master_weights"):
        matrixopt.Muon([nn.Parameter(torch.zeros(4, 4))], master_weights="fp32")
    half = nn.Parameter(torch.zeros(4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"master_weights for w\.half: 'int16'.*float16"):
        matrixopt.Muon([("w.half", half)], master_weights="int16")
    opt = matrixopt.Muon([("w.half", half)], master_weights="stochastic")
    half.grad = torch.full_like(half, 1e-3)
    opt.step()   # fp16 params round stochastically (the generic path)
    assert half.isfinite().all() and opt.state[half]["weight_rounding_step"] == 1
    with pytest.raises(ValueError, match=r"master_weights for w\.half: 'int8'"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2, dtype=torch.float16))],
                             "master_weights": "int8", "param_names": ["w.half"]})


def test_a_checkpoint_saved_before_the_option_loads_as_nearest():
    """A group saved without master_weights (an older checkpoint) is "nearest", as its state."""
    params, opt = run("Muon", torch.bfloat16, 2, master_weights="nearest")
    saved = opt.state_dict()
    for group in saved["param_groups"]:   # as saved before the option existed
        group.pop("master_weights", None)
    fresh = matrixopt.Muon(groups(params), lr=0.02, master_weights="int16")
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0].get("master_weights", "nearest") == "nearest"
    run("Muon", torch.bfloat16, 1, params=params, opt=fresh)
    assert all("weight_low_bits" not in fresh.state[p] for p in params.values())


@pytest.mark.parametrize("mode", MODES)
def test_conversions_in_pieces_equal_one_piece(mode, monkeypatch):
    """The stores and reads work CHUNK entries at a time (bounded integer temporaries); the
    random bits follow the global index, so pieces of 7 entries give the one-piece result."""
    from matrixopt import weights
    x = torch.randn(3, 50) * 0.05
    whole = _stored(mode, x)
    monkeypatch.setattr(weights, "CHUNK", 7)
    pieces = _stored(mode, x)
    assert torch.equal(whole[0], pieces[0]) and torch.equal(whole[1], pieces[1])


@pytest.mark.parametrize("mode", MODES)
def test_a_checkpoint_resumes_on_params_of_the_other_dtype(mode):
    """The weight's storage entries follow the param's dtype: saved from bf16 params they are
    dropped on fp32 ones (their own masters); saved from fp32 params they start afresh on bf16
    ones (low bits 0: the master is the loaded weight; counter 0), and the run goes on."""
    keys = ("weight_low_bits", "weight_rounding_step")
    params, opt = run("GaLoreAdamW", torch.bfloat16, 2, master_weights=mode)
    as_fp32 = {k: nn.Parameter(p.detach().float()) for k, p in params.items()}
    fp32_opt = matrixopt.GaLoreAdamW(groups(as_fp32), lr=0.02, master_weights=mode, **SETTINGS["GaLoreAdamW"])
    fp32_opt.load_state_dict(opt.state_dict())
    assert not any(key in s for s in fp32_opt.state.values() for key in keys)
    run("GaLoreAdamW", torch.float32, 1, params=as_fp32, opt=fp32_opt)

    back = {k: nn.Parameter(p.detach().bfloat16()) for k, p in as_fp32.items()}
    bf16_opt = matrixopt.GaLoreAdamW(groups(back), lr=0.02, master_weights=mode, **SETTINGS["GaLoreAdamW"])
    bf16_opt.load_state_dict(fp32_opt.state_dict())
    for p in back.values():
        state = bf16_opt.state[p]
        assert state.get("weight_rounding_step", 0) == 0 and set(keys) & set(state), list(state)
        assert torch.equal(bf16_opt.master_weight(p), p.float())
    run("GaLoreAdamW", torch.bfloat16, 1, params=back, opt=bf16_opt)
