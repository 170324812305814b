"""state_precision: the codes against float64 references, stochastic rounding's statistics,
and what the optimizers promise with state stored in bf16 or int8."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import matrixopt
from matrixopt import precision as q

CODES = {"signed": (q.SIGNED_CODE, True), "second_moment": (q.SECOND_MOMENT_CODE, False)}


def reference_quantize(x: torch.Tensor, values: list[float]):
    """float64 block-wise quantization by brute force: per row, per BLOCK consecutive entries,
    a = max |x| and each x/a mapped to the nearest of ``values``; returns x̂ and a."""
    x = x.double().reshape(x.shape[0], -1)
    table = torch.tensor(values, dtype=torch.float64)
    out = torch.empty_like(x)
    scales = torch.zeros(x.shape[0], -(-x.shape[1] // q.BLOCK), dtype=torch.float64)
    for r in range(x.shape[0]):
        for b in range(scales.shape[1]):
            block = x[r, b * q.BLOCK:(b + 1) * q.BLOCK]
            a = block.abs().max()
            scales[r, b] = a
            u = block / a if a > 0 else block
            nearest = table[(u[:, None] - table[None, :]).abs().argmin(1)]
            if table[0] == 0:   # non-negative: a nonzero entry takes the smallest nonzero value at least
                nearest = torch.where((u > 0) & (nearest == 0), table[1], nearest)
            out[r, b * q.BLOCK:(b + 1) * q.BLOCK] = nearest * a
    return out, scales


shapes = st.tuples(st.integers(1, 4), st.integers(1, 600)) | st.tuples(st.integers(1, 3), st.integers(1, 5),
                                                                      st.integers(1, 90))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, kind=st.sampled_from(sorted(CODES)), seed=st.integers(0, 2**31 - 1),
       spread=st.floats(0.0, 8.0))
def test_codes_match_a_float64_reference(shape, kind, seed, spread):
    code, signed = CODES[kind]
    g = torch.Generator().manual_seed(seed)
    # Magnitudes over `spread` decades, as moments have.
    x = torch.randn(shape, generator=g) * 10 ** (-spread * torch.rand(shape, generator=g))
    x = x if signed else x.square()
    x.view(-1)[::7] = 0.0
    codes, scale = q.quantize(x, code)
    got = q.dequantize(codes, scale, code)
    assert got.is_contiguous()   # the rules' fused kernels read it as dense
    want, want_scale = reference_quantize(x, code.values.double().tolist())
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert scale.shape == (shape[0], -(-math.prod(shape[1:]) // q.BLOCK))
    torch.testing.assert_close(scale.double(), want_scale, rtol=0, atol=0)
    got = got.double().reshape(want.shape)
    # Equal but where x/a lies within rounding of a midpoint (fp32 vs fp64 may pick either side).
    table = code.values.double()
    mids = (table[:-1] + table[1:]) / 2
    a = want_scale.repeat_interleave(q.BLOCK, 1)[:, :want.shape[1]]
    u = x.double().reshape(want.shape) / torch.where(a > 0, a, 1)
    tie = ((u[..., None] - mids).abs() < 1e-6).any(-1)
    torch.testing.assert_close(got[~tie], want[~tie], rtol=1e-6, atol=0)   # x̂ = value·a, rounded once in fp32
    assert (got[x.reshape(want.shape) == 0] == 0).all()


@pytest.mark.parametrize("kind", sorted(CODES))
def test_error_bounds(kind):
    """Each entry's error is at most half the gap between the code's neighbouring values
    (times the block's scale); a nonzero second moment is never stored as 0."""
    code, signed = CODES[kind]
    x = torch.randn(6, 1000) * torch.logspace(-6, 0, 1000)
    x = x if signed else x.square()
    codes, scale = q.quantize(x, code)
    got = q.dequantize(codes, scale, code)
    a = scale.repeat_interleave(q.BLOCK, 1)[:, :1000].double()
    table = code.values.double()
    u = (x.double() / a)
    i = torch.searchsorted(table, u.clamp(table[0], 1)).clamp(1, len(table) - 1)
    gap = (table[i] - table[i - 1]) * a
    err = (got.double() - x.double()).abs()
    small = (u.abs() < table[table > 0].min())   # below the smallest nonzero value: at most that value
    assert (err[~small] <= gap[~small] / 2 * (1 + 1e-5) + 1e-12).all()
    assert (err[small] <= table[table > 0].min() * a[small] * (1 + 1e-5)).all()
    if not signed:
        assert (got[x > 0] > 0).all()


@pytest.mark.parametrize("kind", sorted(CODES))
def test_blocks_lie_inside_rows(kind):
    """Quantizing any split of the rows (an FSDP2 Shard(0) piece) gives that split's codes and
    scales: no block crosses a row."""
    code, _ = CODES[kind]
    x = torch.randn(7, 3, 130).abs()
    codes, scale = q.quantize(x, code)
    for lo, hi in [(0, 4), (4, 7), (3, 3)]:
        c, s = q.quantize(x[lo:hi], code)
        assert torch.equal(c, codes[lo:hi]) and torch.equal(s, scale[lo:hi])


@pytest.mark.parametrize("kind", sorted(CODES))
@pytest.mark.parametrize("shape", [(7, 3, 130), (40, 64), (2, 1000)])
def test_quantizing_in_row_chunks_gives_the_whole_tensor_codes(kind, shape, monkeypatch):
    """(De)quantizing in bounded row chunks (CHUNK entries) gives what one pass over the whole
    tensor gives, codes, scales and values, for chunks of one row up to several."""
    code, _ = CODES[kind]
    x = torch.randn(shape).abs()
    whole_codes, whole_scale = q.quantize(x, code)
    whole = q.dequantize(whole_codes, whole_scale, code)
    for chunk in (1, 500, 1000):
        monkeypatch.setattr(q, "CHUNK", chunk)
        assert len(q._row_chunks(x)) > 1
        codes, scale = q.quantize(x, code)
        assert torch.equal(codes, whole_codes) and torch.equal(scale, whole_scale)
        assert torch.equal(q.dequantize(codes, scale, code), whole)


def bf16_neighbours(x: torch.Tensor):
    down = x.to(torch.bfloat16)
    down = torch.where(down.float() > x, torch.nextafter(down, torch.tensor(-math.inf, dtype=torch.bfloat16)), down)
    return down.float(), torch.nextafter(down, torch.tensor(math.inf, dtype=torch.bfloat16)).float()


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = torch.tensor([1.0 + 2**-10, -3.0 - 2**-9, 1e-3 * (1 + 2**-12), 7.0 + 2**-6], dtype=torch.float32)
    n = 20000
    stacked = x.repeat(n)   # entry i·4 + j rounds x[j] with its own bits
    rounded = q.round_bf16(stacked, seed=12345).float().view(n, 4)
    lo, hi = bf16_neighbours(x)
    assert ((rounded == lo) | (rounded == hi)).all()
    p = ((x - lo) / (hi - lo)).double()
    freq = (rounded == hi).double().mean(0)
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-3).all(), (freq, p)
    torch.testing.assert_close(rounded.double().mean(0), x.double(), rtol=2e-4, atol=0)


def test_stochastic_rounding_is_deterministic_per_seed_and_position():
    x = torch.randn(1000) * (1 + 2**-9)
    a, b = q.round_bf16(x, 7), q.round_bf16(x, 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, q.round_bf16(x, 8))
    # A shard's bits are the whole tensor's at the same global positions.
    assert torch.equal(q.round_bf16(x[300:], 7, offset=300), a[300:])
    # bf16 values are stored exactly.
    y = x.to(torch.bfloat16).float()
    assert torch.equal(q.round_bf16(y, 3).float(), y)


def python_hash(value: int) -> int:
    """The rounding's hash in Python integers (unsigned 32-bit arithmetic)."""
    for _ in range(2):
        value = (((value >> 16) ^ value) * 0x45D9F3B) & 0xFFFFFFFF
    return (value >> 16) ^ value


@pytest.mark.parametrize("offset,seed", [(0, 3), (2**31 - 5, 2**32 - 1), (2**33 + 7, 12345)])
def test_stochastic_rounding_bits_are_the_documented_hash(offset, seed):
    """Entry i of a piece starting at ``offset`` adds hash(hash(offset + i mod 2³²) ^ seed)'s low
    16 bits to x's bit pattern and truncates: checked against Python integer arithmetic."""
    x = torch.randn(10) * 3
    got = q.round_bf16(x, seed, offset).float()
    for i, value in enumerate(x.tolist()):
        bits = int(torch.tensor([value]).view(torch.int32).item()) & 0xFFFFFFFF
        noise = python_hash(python_hash((offset + i) & 0xFFFFFFFF) ^ seed) & 0xFFFF
        want = ((bits + noise) & 0xFFFF0000)
        want = torch.tensor([want - (1 << 32) if want >= 1 << 31 else want], dtype=torch.int32).view(torch.float32)
        assert got[i] == want[0], i


def test_stochastic_rounding_does_not_stall_a_momentum():
    """A bf16 momentum μB + (1 − μ)G with a constant G converges to G with stochastic
    rounding; round to nearest stalls where (1 − μ)(G − B) is under half an ulp of B."""
    g = torch.full((4096,), 1.0 + 2**-6)
    sr = torch.ones(4096, dtype=torch.bfloat16)
    nearest = sr.clone()
    for t in range(400):
        sr = q.round_bf16(sr.float().lerp(g, 0.05), seed=t)
        nearest = nearest.float().lerp(g, 0.05).to(torch.bfloat16)
    assert torch.equal(nearest.float(), torch.ones(4096))
    assert abs(sr.float().mean().item() - g[0].item()) < 2**-9


# -- the optimizers -------------------------------------------------------------------------------

LOWRANK = dict(rank=2, update_proj_gap=3)
KWARGS = {"GaLoreAdamW": LOWRANK, "DCTAdamW": LOWRANK, "CoSOAdamW": dict(LOWRANK, protect="both")}
OPTIMIZERS = [matrixopt.Muon, matrixopt.ROOT, matrixopt.ARO, matrixopt.GaLoreAdamW, matrixopt.DCTAdamW,
              matrixopt.CoSOAdamW]


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.Tanh(), torch.nn.Linear(24, 300),
                               torch.nn.Tanh(), torch.nn.Linear(300, 3))


def train(net, opt, steps):
    for i in steps:
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 10, generator=g), torch.randn(16, 3, generator=g)
        net.zero_grad()
        (net(x) - y).square().mean().backward()
        opt.step()


def make(cls, net, **kw):
    return cls(list(net.named_parameters()), lr=1e-2, **KWARGS.get(cls.__name__, {}), **kw)


@pytest.mark.parametrize("cls", OPTIMIZERS + [matrixopt.MatrixOptimizer], ids=lambda c: c.__name__)
def test_invalid_state_precision_is_rejected_by_name(cls):
    net = model()
    if cls is matrixopt.MatrixOptimizer:
        with pytest.raises(ValueError, match="state_precision"):
            cls(net.parameters(), {"lr": 1e-3}, state_precision="fp8")
        return
    with pytest.raises(ValueError, match="state_precision"):
        make(cls, net, state_precision="int4")
    with pytest.raises(ValueError, match="state_precision"):
        cls([{"params": list(net.parameters()), "state_precision": "fp16"}], **KWARGS.get(cls.__name__, {}))


def loss_after(net, opt, steps):
    train(net, opt, range(steps))
    g = torch.Generator().manual_seed(10**6)
    x, y = torch.randn(256, 10, generator=g), torch.randn(256, 3, generator=g)
    with torch.no_grad():
        return (net(x) - y).square().mean().item()


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_low_precision_state_trains_like_fp32(cls, precision):
    """With bf16 or int8 state the first step is the fp32 one up to the storage's error, and
    30 steps reach the fp32-state run's loss (runs this small are chaotic step by step —
    orthogonalized steps and SVD subspaces turn on small differences —, so the loss is
    compared, not the trajectory); the state is stored as the precision says."""
    start = model()
    nets = [model(), model()]
    opts = [make(cls, nets[0]), make(cls, nets[1], state_precision=precision)]
    for n, o in zip(nets, opts):
        train(n, o, range(1))
    for (name, p), r in zip(nets[1].named_parameters(), nets[0].parameters()):
        moved = (r - start.state_dict()[name]).norm()
        assert (p - r).norm() <= 0.05 * moved + 1e-7, name
    losses = [loss_after(n, o, 30) for n, o in zip(nets, opts)]
    assert losses[1] <= losses[0] * (1.05 if precision == "bf16" else 1.1), losses
    opt = opts[1]
    moments = [v for s in opt.state.values() for k, v in s.items()
               if k in ("momentum_buffer", "exp_avg", "exp_avg_sq") and v.ndim >= 2]
    assert moments and all(v.dtype == (torch.bfloat16 if precision == "bf16" else torch.uint8) for v in moments)
    assert opt.state_bytes() < opts[0].state_bytes()


def test_precision_is_per_group_and_restored_from_the_checkpoint(tmp_path):
    net = model()
    params = list(net.named_parameters())
    opt = matrixopt.Muon([{"params": params[:2], "state_precision": "int8"},
                          {"params": params[2:4], "state_precision": "bf16"}, {"params": params[4:]}], lr=1e-2)
    train(net, opt, range(3))
    dtypes = [opt.state[p]["momentum_buffer"].dtype for _, p in (params[0], params[2], params[4])]
    assert dtypes == [torch.uint8, torch.bfloat16, torch.float32]
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed_net = model()
    resumed_net.load_state_dict(net.state_dict())
    named = list(resumed_net.named_parameters())
    resumed = matrixopt.Muon([{"params": named[:2]}, {"params": named[2:4]}, {"params": named[4:]}],
                             lr=1e-2)   # fp32 everywhere, until loaded
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert [g.get("state_precision", "fp32") for g in resumed.param_groups] == ["int8", "bf16", "fp32"]
    train(net, opt, range(3, 6))
    train(resumed_net, resumed, range(3, 6))
    for p, r in zip(net.parameters(), resumed_net.parameters()):
        assert torch.equal(p, r)


@pytest.mark.parametrize("cls", [matrixopt.Muon, matrixopt.GaLoreAdamW], ids=lambda c: c.__name__)
def test_codes_of_another_dtype_or_without_scales_are_rejected_naming_the_param(cls):
    net = model()
    opt = make(cls, net, state_precision="int8")
    train(net, opt, range(1))
    key = "momentum_buffer" if cls is matrixopt.Muon else "exp_avg"
    for edit, message in [(lambda s: s.__setitem__(key, s[key].float()), "codes"),
                          (lambda s: s.pop(key + ".scale"), r"\.scale'\] missing")]:
        saved = copy.deepcopy(opt.state_dict())
        edit(saved["state"][2])
        fresh = make(cls, model(), state_precision="int8")
        with pytest.raises(ValueError, match=rf"2\.weight.*{key}.*{message}"):
            fresh.load_state_dict(saved)
        assert not fresh.state


def test_an_error_in_the_rule_leaves_the_stored_state_untouched(monkeypatch):
    net = model()
    opt = make(matrixopt.Muon, net, state_precision="int8")
    train(net, opt, range(2))
    before = {id(p): copy.deepcopy(s) for p, s in opt.state.items()}

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("matrixopt.muon.apply_update", fail)
    with pytest.raises(RuntimeError, match="boom"):
        train(net, opt, [2])
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, before[id(p)][k]) if torch.is_tensor(v) else v == before[id(p)][k], k


def _fallback_run(precision, dtype, rows, width, limit, fallback=None, steps=3):
    """Muon on one matrix, the fallback on a (rows, width) table and a bias of ``width``;
    gradients spanning 10^±3 so the int8 codes and bf16 roundings have work to do."""
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(rows, width, dtype=dtype))
    bias = torch.nn.Parameter(torch.randn(width, dtype=dtype))
    w = torch.nn.Parameter(torch.randn(8, 12))
    opt = matrixopt.Muon([{"params": [("w", w)]}, {"params": [("table", table), ("bias", bias)], "matrix": False}],
                         lr=1e-2, weight_decay=0.1, state_precision=precision, fallback=fallback)
    opt.fallback_chunk_elements = limit
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        for p in (table, bias, w):
            p.grad = (torch.randn(p.shape, generator=g) * 10 ** (3 * torch.rand(p.shape, generator=g) - 1.5)).to(p.dtype)
        opt.step()
    return [table, bias, w], opt


@settings(max_examples=25, deadline=None)
@given(precision=st.sampled_from(["bf16", "int8"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       rows=st.integers(1, 40), width=st.integers(1, 300), limit=st.integers(1, 3000))
def test_fallback_chunks_change_nothing(precision, dtype, rows, width, limit):
    """At a low precision the fallback updates params in chunks of fallback_chunk_elements (a
    larger param in chunks of its rows, int8 blocks and all): every weight and state entry,
    counters included, bit-identical to one call over whole params."""
    whole, whole_opt = _fallback_run(precision, dtype, rows, width, 1 << 30)
    chunked, chunked_opt = _fallback_run(precision, dtype, rows, width, limit)
    for p, r in zip(whole, chunked):
        assert torch.equal(p, r)
        for key, value in whole_opt.state[p].items():
            other = chunked_opt.state[r][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    assert chunked_opt.state[chunked[0]]["step"] == 3


class _Recording(matrixopt.fallback.AdamW):
    """The default fallback, recording the shapes of the weights of every call."""

    def __init__(self, elementwise=True):
        self.elementwise, self.calls = elementwise, []

    def update(self, group, weights, grads, states):
        self.calls.append([tuple(w.shape) for w in weights])
        super().update(group, weights, grads, states)


@pytest.mark.parametrize("elementwise", [True, False])
def test_fallback_chunks_bound_the_working_state(elementwise):
    """An element-wise fallback gets at most fallback_chunk_elements entries per call (rows of
    a multiple of 64 entries), covering every row once; one that is not element-wise gets
    each param whole."""
    fallback = _Recording(elementwise)
    (table, bias, _), _ = _fallback_run("int8", torch.float32, 40, 48, 400, fallback=fallback, steps=1)
    calls = fallback.calls
    if not elementwise:
        assert calls == [[(40, 48)], [(48,)]]
        return
    assert calls == [[(8, 48)]] * 5 + [[(48,)]]   # 8 rows: 384 entries, the most ≤ 400 in 64s


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_unequal_blocks_keep_codes_per_block_and_resume(precision, tmp_path):
    """A param split into row blocks of unequal sizes stores each block's codes and scales
    under its own keys ("exp_avg.0", "exp_avg.0.scale"), and resumes bit for bit."""
    def run(steps, opt=None, p=None):
        if p is None:
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(16, 12))
            opt = matrixopt.GaLoreAdamW([{"params": [("qkv", p)], "blocks": (8, 4, 4)}], lr=1e-2, rank=2,
                                        update_proj_gap=2, state_precision=precision)
        for i in steps:
            p.grad = torch.randn(16, 12, generator=torch.Generator().manual_seed(i))
            opt.step()
        return opt, p

    opt, p = run(range(3))
    keys = set(opt.state[p])
    assert {"exp_avg.0", "exp_avg_sq.2", "proj_left.1"} <= keys or {"exp_avg.0", "exp_avg_sq.2", "proj_right.1"} <= keys
    assert ({"exp_avg.0.scale", "exp_avg_sq.2.scale"} <= keys) == (precision == "int8")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    saved_p = p.detach().clone()
    run(range(3, 6), opt, p)
    resumed, q2 = run([])
    with torch.no_grad():
        q2.copy_(saved_p)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    run(range(3, 6), resumed, q2)
    assert torch.equal(q2, p)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("cls", [matrixopt.Muon, matrixopt.GaLoreAdamW], ids=lambda c: c.__name__)
def test_step_in_backward_equals_the_ordinary_loop(cls, precision):
    """Updates inside backward, one param at a time, store the same codes and draw the same
    rounding bits as the ordinary step (every matrix here has a shape of its own, so the
    buckets are the same)."""
    nets = [model(), model()]
    opts = [make(cls, n, state_precision=precision) for n in nets]
    matrixopt.step_in_backward(opts[1])
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 10, generator=g), torch.randn(16, 3, generator=g)
        for n in nets:
            (n(x) - y).square().mean().backward()
        opts[0].step()
        opts[0].zero_grad()
    for p, r in zip(nets[1].parameters(), nets[0].parameters()):
        assert torch.equal(p, r)
    for p, r in zip(nets[1].parameters(), nets[0].parameters()):
        for key, value in opts[0].state[r].items():
            other = opts[1].state[p][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
