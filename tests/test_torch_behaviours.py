"""torch.optim behaviours a user swapping AdamW relies on: Tensor lr, resuming on params of
another dtype, zero-element params, torch.compile(opt.step), momentum schedulers, bf16
params. Each of these failed before the fix that made it pass."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import matrixopt

OPTIMIZERS = [matrixopt.Muon, matrixopt.ROOT, matrixopt.ARO, matrixopt.GaLoreAdamW, matrixopt.DCTAdamW]
SMALL = {"GaLoreAdamW": dict(rank=2, update_proj_gap=3), "DCTAdamW": dict(rank=2, update_proj_gap=3)}
ids = [c.__name__ for c in OPTIMIZERS]


def params(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(6, 4, dtype=dtype)), torch.nn.Parameter(torch.randn(3, 5, 4, dtype=dtype)),
            torch.nn.Parameter(torch.randn(5, 3, dtype=dtype)), torch.nn.Parameter(torch.randn(4, dtype=dtype))]


def run(opt, ps, steps, start=0):
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + i)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


def make(cls, ps, **kw):
    return cls(ps, **{"lr": 0.01, **SMALL.get(cls.__name__, {}), **kw})


@pytest.mark.parametrize("lr", [torch.tensor(0.01), torch.tensor([0.01])], ids=["0-d", "1-element"])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_tensor_lr_steps_like_the_float_lr(cls, lr):
    """A Tensor lr gives the float lr's result bit for bit (the float being the tensor's value)."""
    ps, qs = params(), params()
    run(make(cls, ps, lr=lr), ps, 7)
    run(make(cls, qs, lr=float(lr)), qs, 7)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_an_lr_made_invalid_after_construction_fails_before_any_update(cls):
    ps = params()
    opt = make(cls, ps)
    run(opt, ps, 1)
    before = [p.detach().clone() for p in ps]
    state = {k: v.clone() for k, v in opt.state[ps[0]].items() if isinstance(v, torch.Tensor)}
    opt.param_groups[0]["lr"] = torch.tensor([0.01, 0.02])
    with pytest.raises(ValueError, match="lr"):
        run(opt, ps, 1, start=1)
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    assert all(torch.equal(opt.state[ps[0]][k], v) for k, v in state.items())


@pytest.mark.parametrize("to", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_a_checkpoint_resumes_on_params_of_another_dtype(cls, to):
    """fp32 → bf16/fp64 and back: every state tensor takes the dtype the docs give it (fp32
    for the AdamW fallback and ARO, at least fp32 — fp64 for fp64 params — for Muon's and
    the low-rank moments and bases) and the next steps run."""
    ps = params()
    opt = make(cls, ps)
    run(opt, ps, 4)
    source = opt.state_dict()
    for dtype in (to, torch.float32):   # there, then back from the resumed run's checkpoint
        qs = params(dtype, seed=1)
        resumed = make(cls, qs)
        resumed.load_state_dict(source)
        run(resumed, qs, 3, start=4)
        for q in qs:
            for key, value in resumed.state[q].items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    fixed = q.ndim == 1 or cls is matrixopt.ARO
                    want = torch.float32 if fixed else torch.promote_types(dtype, torch.float32)
                    assert value.dtype == want, (key, value.dtype)
            assert q.isfinite().all()
        source = resumed.state_dict()


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_zero_element_params_are_left_alone(cls):
    empty = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((0, 5), (5, 0), (2, 0, 3))]
    ps = params()
    opt = make(cls, empty + ps)
    before = [p.detach().clone() for p in ps]
    run(opt, empty + ps, 4)
    assert all(p.shape == e.shape for p, e in zip(empty, empty))
    assert all(not torch.equal(p, b) for p, b in zip(ps, before))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=ids)
def test_compiled_step_equals_eager(cls):
    """torch.compile(opt.step) runs the step eagerly (it declines compilation), so it gives
    eager's result — GaLore's and ARO's per-bucket state used to be mixed up inside one
    compiled frame — and never recompiles."""
    torch._dynamo.reset()
    ps, qs = params(), params()
    eager, compiled = make(cls, ps), make(cls, qs)
    step = torch.compile(compiled.step)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # e.g. "recompile_limit reached"
        warnings.filterwarnings("ignore", message=".*record_function.*")
        for i in range(8):
            g = torch.Generator().manual_seed(i)
            for p, q in zip(ps, qs):
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
            eager.step()
            step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [matrixopt.Muon, matrixopt.ROOT, matrixopt.ARO], ids=["Muon", "ROOT", "ARO"])
def test_momentum_schedulers_cycle_the_fallbacks_beta1_only(cls):
    """What README states: torch's OneCycleLR/CyclicLR with cycle_momentum cycle
    ``betas[0]`` (they prefer ``betas`` when an optimizer has it), which is the AdamW
    fallback's β₁; the matrix rule's ``momentum`` stays as set."""
    ps = params()
    opt = make(cls, ps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=10, cycle_momentum=True,
                                                base_momentum=0.8, max_momentum=0.9)
    beta1s = []
    for i in range(5):
        run(opt, ps, 1, start=i)
        sched.step()
        beta1s.append(opt.param_groups[0]["betas"][0])
        assert opt.param_groups[0]["momentum"] == 0.95
    assert len(set(beta1s)) > 1


@pytest.mark.parametrize("cls", [matrixopt.Muon, matrixopt.ROOT], ids=["Muon", "ROOT"])
def test_bf16_params_get_fp32_momentum(cls):
    """README's promise: fp32 moments for bf16 params — the momentum accumulates increments a
    bf16 buffer would round: here one of 1e-3 of its size, ten times."""
    p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    opt = cls([p], lr=0.0, momentum=0.999, weight_decay=0.0)
    p.grad = torch.ones_like(p)
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == torch.float32
    for _ in range(10):
        p.grad = torch.full_like(p, 2.0)
        opt.step()
    # fp32 reference of B ← 0.999 B + 0.001 G
    want = torch.tensor(0.001)
    for _ in range(10):
        want = 0.999 * want + 0.001 * 2.0
    torch.testing.assert_close(buf, torch.full((4, 4), want.item()), rtol=1e-5, atol=0)


# -- packed matrices ------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,kw", [(matrixopt.Muon, {}), (matrixopt.ROOT, {}), (matrixopt.ARO, {}),
                                    (matrixopt.GaLoreAdamW, dict(rank=2, svd="exact", update_proj_gap=3)),
                                    (matrixopt.DCTAdamW, dict(rank=2, update_proj_gap=3))],
                         ids=["Muon", "ROOT", "ARO", "GaLoreAdamW", "DCTAdamW"])
@pytest.mark.parametrize("blocks", [3, (4, 4, 4), (6, 3, 3)], ids=["count", "sizes", "unequal-sizes"])
def test_each_block_of_a_packed_matrix_is_its_own_matrix(cls, kw, blocks):
    """A (12, 5) param split into row blocks steps like the blocks as separate params (GQA's
    fused qkv: unequal blocks)."""
    torch.manual_seed(0)
    packed = torch.nn.Parameter(torch.randn(12, 5))
    sizes = [4, 4, 4] if blocks == 3 else list(blocks)
    parts = [torch.nn.Parameter(b.detach().clone()) for b in packed.detach().split(sizes)]
    a = cls([{"params": [packed], "blocks": blocks}], lr=0.01, **kw)
    b = cls(parts, lr=0.01, **kw)
    for i in range(7):
        g = torch.randn(12, 5, generator=torch.Generator().manual_seed(i))
        packed.grad = g.clone()
        for part, gb in zip(parts, g.split(sizes)):
            part.grad = gb.clone()
        a.step()
        b.step()
    torch.testing.assert_close(packed.detach(), torch.cat([p.detach() for p in parts]), rtol=1e-6, atol=1e-7)
    sd = a.state_dict()   # a checkpoint round trip keeps the blocked state's shapes
    c = cls([{"params": [torch.nn.Parameter(packed.detach().clone())], "blocks": blocks}], lr=0.01, **kw)
    c.load_state_dict(sd)


COLUMN_RULES = [(matrixopt.Muon, {}), (matrixopt.ROOT, {}), (matrixopt.ARO, {}),
                (matrixopt.GaLoreAdamW, dict(rank=2, svd="exact", update_proj_gap=3)),
                (matrixopt.DCTAdamW, dict(rank=2, update_proj_gap=3)),
                # Its history from the weights: the gradients' sketch draws per (param, matrix).
                (matrixopt.CoSOAdamW, dict(rank=2, svd="exact", update_proj_gap=3, protect="weights"))]


@pytest.mark.parametrize("cls,kw", COLUMN_RULES, ids=[c.__name__ for c, _ in COLUMN_RULES])
@pytest.mark.parametrize("shape,blocks", [((5, 12), 3), ((5, 12), (4, 4, 4)), ((5, 12), (6, 3, 3)),
                                          ((2, 5, 8), 2)], ids=["count", "sizes", "unequal-sizes", "experts"])
def test_each_column_block_of_a_packed_matrix_is_its_own_matrix(cls, kw, shape, blocks):
    """``block_axis="columns"``: a param fused along its columns (transformers' Conv1D stores
    GPT-2's q, k, v as (in, 3·out); Llama-4's experts gate and up as (E, d, 2·f)) steps like
    the column blocks as separate params, and its checkpoint loads into a fresh optimizer."""
    torch.manual_seed(0)
    packed = torch.nn.Parameter(torch.randn(shape))
    sizes = [shape[-1] // blocks] * blocks if isinstance(blocks, int) else list(blocks)
    parts = [torch.nn.Parameter(b.detach().clone()) for b in packed.detach().split(sizes, dim=-1)]
    whole = torch.nn.Parameter(packed.detach().clone())     # not split: one matrix per (B, m, n) entry
    a = cls([{"params": [packed], "blocks": blocks, "block_axis": "columns"}], lr=0.01, weight_decay=0.1, **kw)
    b = cls(parts, lr=0.01, weight_decay=0.1, **kw)
    d = cls([whole], lr=0.01, weight_decay=0.1, **kw)
    for i in range(7):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        packed.grad, whole.grad = g.clone(), g.clone()
        for part, gb in zip(parts, g.split(sizes, dim=-1)):
            part.grad = gb.clone()
        for opt in (a, b, d):
            opt.step()
    torch.testing.assert_close(packed.detach(), torch.cat([p.detach() for p in parts], dim=-1), rtol=1e-6, atol=1e-7)
    assert (packed - whole).abs().max() > 1e-3
    c = cls([{"params": [torch.nn.Parameter(packed.detach().clone())], "blocks": blocks, "block_axis": "columns"}],
            lr=0.01, weight_decay=0.1, **kw)
    c.load_state_dict(a.state_dict())
    q = c.param_groups[0]["params"][0]
    assert all(torch.equal(x, y) for x, y in zip(a.state[packed].values(), c.state[q].values())
               if isinstance(x, torch.Tensor))


@pytest.mark.parametrize("master_weights", ["stochastic", "int8"])
def test_column_blocks_of_bf16_params_keep_their_masters(master_weights):
    """A column block is a strided view of the param: its bf16 weight and low bits are stored
    through contiguous copies. With int16 masters (exact fp32 copies) the bf16 run equals the
    fp32 run to bf16 rounding; stochastic and int8 masters stay within a bf16 ulp of it."""
    torch.manual_seed(0)
    w = torch.randn(8, 12).bfloat16()        # the fp32 run starts from the bf16 values and gets bf16 gradients
    runs = {}
    for mode in (master_weights, "int16", None):
        p = torch.nn.Parameter(w.float() if mode is None else w.clone())
        opt = matrixopt.Muon([{"params": [p], "blocks": 3, "block_axis": "columns"}], lr=0.01,
                             **({} if mode is None else {"master_weights": mode}))
        for i in range(5):
            p.grad = torch.randn(8, 12, generator=torch.Generator().manual_seed(i)).bfloat16().to(p.dtype)
            opt.step()
        runs[mode] = opt.master_weight(p) if mode else p.detach()
    torch.testing.assert_close(runs["int16"], runs[None], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs[master_weights], runs[None], rtol=1e-2, atol=1e-2)


LOWRANK = {"GaLoreAdamW": (matrixopt.GaLoreAdamW, dict(svd="exact"), "reproject_states"),
           "DCTAdamW": (matrixopt.DCTAdamW, {}, "rotate_states"),
           # Its protected history from the weights: the gradients' sketch draws random numbers
           # per (param, matrix), which blocks and separate params do not share.
           "CoSOAdamW": (matrixopt.CoSOAdamW, dict(svd="exact", protect="weights"), "reproject_states")}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(name=st.sampled_from(sorted(LOWRANK)), blocks=st.sampled_from([1, 2, 4]), count=st.integers(1, 3),
       block_shape=st.sampled_from([(7, 5), (5, 7), (6, 6)]), experts=st.sampled_from([None, 2]),
       proj_type=st.sampled_from(["std", "reverse_std", "left", "right", "full"]),
       side=st.sampled_from(["left", "right"]), carry=st.booleans(), alone=st.booleans())
def test_equal_blocks_of_same_shape_params_step_like_the_blocks_as_separate_params(
        name, blocks, count, block_shape, experts, proj_type, side, carry, alone):
    """A group with ``blocks=k`` holding ``count`` params of one shape (2-D, or 3-D expert
    stacks) steps like the k·count blocks given as separate params: weights and moments,
    with each projection side (DCT's by the blocks' shape), moments carried into new bases or
    not, in stacks or in buckets of their own, and through a checkpoint. The low-rank moments
    of a right projection were made with the param's rows as dim 0 ((m, m/k, r) for (k, m/k,
    r)): wrong-sized moments that failed or read past their end."""
    cls, kw, carry_key = LOWRANK[name]
    # CoSO's refresh takes the SVD of a gradient projected off a history made from the weights,
    # which a rounding apart can give a basis vector of the other sign: carried moments follow it.
    carry = carry or name == "CoSOAdamW"
    kw = {**kw, carry_key: carry, "rank": 2, "update_proj_gap": 2, "weight_decay": 0.1}
    if name != "DCTAdamW":
        kw["proj_type"] = proj_type
    if name == "CoSOAdamW":
        kw["side"] = side
    rows, cols = block_shape
    shape = (blocks * rows, cols) if experts is None else (experts, blocks * rows, cols)
    g = torch.Generator().manual_seed(0)
    packed = [torch.nn.Parameter(torch.randn(shape, generator=g)) for _ in range(count)]

    def split(t):   # t's blocks, in the order of its (B·k, rows, cols) view
        return list(t.reshape(-1, rows, cols).unbind(0))

    parts = [torch.nn.Parameter(b.clone()) for p in packed for b in split(p.detach())]
    a = cls([{"params": packed, "blocks": blocks}], lr=0.01, **kw)
    b = cls(parts, lr=0.01, **kw)
    if alone:   # every matrix in a bucket of its own (the back-projection added into it)
        a.unbatched_elements = b.unbatched_elements = {"cpu": 1}

    def step(opts, i):
        grads = [torch.randn(shape, generator=torch.Generator().manual_seed(100 * i + j)) for j in range(count)]
        for p, grad in zip(packed, grads):
            p.grad = grad.clone()
        for p, grad in zip(parts, [x for grad in grads for x in split(grad)]):
            p.grad = grad.clone()
        for opt in opts:
            opt.step()

    for i in range(5):
        step([a, b], i)
        if name == "CoSOAdamW" and i == 2:
            a.end_task()
            b.end_task()
    separate = iter(parts)
    for p in packed:
        mine = [next(separate) for _ in split(p)]
        torch.testing.assert_close(p.detach(), torch.stack([q.detach() for q in mine]).reshape(shape),
                                   rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):   # |M|: a basis vector's sign flips a row or column of M
            want = torch.stack([b.state[q][key].reshape(a.state[p][key].shape[-2:]) for q in mine])
            torch.testing.assert_close(a.state[p][key].abs(), want.reshape(a.state[p][key].shape).abs(),
                                       rtol=1e-4, atol=1e-6)
    c = cls([{"params": [torch.nn.Parameter(p.detach().clone()) for p in packed], "blocks": blocks}], lr=0.01, **kw)
    c.load_state_dict(a.state_dict())   # the blocked state's shapes are the declared ones
    assert all(torch.equal(x, y) for p, q in zip(packed, c.param_groups[0]["params"])
               for x, y in zip(a.state[p].values(), c.state[q].values()) if isinstance(x, torch.Tensor))


def test_blocks_are_validated_naming_the_param():
    p = torch.nn.Parameter(torch.randn(12, 5))
    with pytest.raises(ValueError, match=r"blocks for w\.qkv"):
        matrixopt.Muon([{"params": [("w.qkv", p)], "blocks": 5}])
    with pytest.raises(ValueError, match=r"blocks for w\.qkv"):
        matrixopt.Muon([{"params": [("w.qkv", p)], "blocks": (8, 2, 1)}])
    experts = torch.nn.Parameter(torch.randn(2, 12, 5))   # unequal blocks: 2-D params only
    with pytest.raises(ValueError, match=r"blocks for w\.experts"):
        matrixopt.Muon([{"params": [("w.experts", experts)], "blocks": (8, 2, 2)}])
    with pytest.raises(ValueError, match=r"blocks for w\.qkv.*'columns'"):
        matrixopt.Muon([{"params": [("w.qkv", p)], "blocks": 2, "block_axis": "columns"}])
    with pytest.raises(ValueError, match=r"block_axis"):
        matrixopt.Muon([{"params": [("w.qkv", p)], "blocks": 3, "block_axis": 1}])


def test_param_groups_splits_multihead_attention_and_lstm_gates():
    model = torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(8, 2), "lstm": torch.nn.LSTM(4, 6),
                                 "proj": torch.nn.Linear(8, 8)})
    groups = matrixopt.param_groups(model)
    blocked = {g["blocks"]: [n for n, _ in g["params"]] for g in groups if "blocks" in g}
    assert blocked == {3: ["attn.in_proj_weight"], 4: ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]}
    opt = matrixopt.Muon(groups, lr=0.01)
    x = torch.randn(5, 3, 8)
    out = model["attn"](x, x, x)[0].sum() + model["lstm"](x[..., :4])[0].sum() + model["proj"](x).sum()
    out.backward()
    opt.step()
    assert opt.state[model["attn"].in_proj_weight]["momentum_buffer"].shape == (24, 8)


def _torch_error_inputs():
    """torch's own error inputs for AdamW and Muon (the ones its test_optim runs on every
    optimizer), less those about options matrixopt does not have (``foreach``,
    ``adjust_lr_fn``, Tensor betas), Muon's 2-D-only rule (matrixopt takes every shape) and
    step-time errors (matrixopt refuses complex params at construction)."""
    from torch.testing._internal.common_optimizers import (OptimizerErrorEnum, optim_error_inputs_func_adamw,
                                                           optim_error_inputs_func_muon)

    cases = {}
    for func in (optim_error_inputs_func_adamw, optim_error_inputs_func_muon):
        for error in func(device="cpu", dtype=torch.float32):
            kwargs = error.optimizer_error_input.kwargs
            if (error.error_on != OptimizerErrorEnum.CONSTRUCTION_ERROR or {"foreach", "adjust_lr_fn"} & kwargs.keys()
                    or "both floats or both Tensors" in error.error_regex or "2D parameters" in error.error_regex):
                continue
            cases.setdefault((error.error_regex, repr(kwargs)), error)
    return list(cases.values())


@pytest.mark.parametrize("cls", [*OPTIMIZERS, matrixopt.CoSOAdamW], ids=[*ids, "CoSOAdamW"])
def test_torch_optimizers_error_inputs_raise_the_same_errors(cls):
    """Every construction error torch.optim's own test suite checks on AdamW and Muon gives the
    same exception type (or warning) here: hyperparameters are validated before the params,
    in torch's order, so ``params=None`` with an invalid beta is a ValueError naming it."""
    errors = _torch_error_inputs()
    assert len(errors) >= 8
    for error in errors:
        inputs = error.optimizer_error_input
        if issubclass(error.error_type, Warning):
            with pytest.warns(error.error_type, match=error.error_regex):
                cls(inputs.params, **inputs.kwargs)
        else:
            with pytest.raises(error.error_type):
                cls(inputs.params, **inputs.kwargs)
