"""2-D meshes: FSDP2 × tensor parallel and HSDP on 4 gloo ranks equal the single process.

A small LLaMA-style model (torchtitan's module names) is parallelized by
``benchmarks.distributed.LAYOUTS``, the way torchtitan does it (without sequence
parallel): on a (dp=2, tp=2) mesh, the attention's q/k/v and the MLP's w1/w3 colwise
(``Shard(0)`` on tp), their outputs wo/w2 rowwise (``Shard(1)``), the embedding rowwise
(its table ``Shard(0)``), the head colwise; then ``fully_shard`` per block and the root on the
dp mesh, which makes FSDP's strided shard of the TP shards (``(_StridedShard(0), Shard(0))``)
and ``(Shard(0), Shard(1))`` for the rowwise weights. HSDP is ``fully_shard`` on the 2-D
mesh: ``(Replicate(), Shard(0))``. The MLP's 38 rows split evenly by TP (which needs it), then
19 into 10 + 9 by FSDP.

Every optimizer, at fp32 and at int8 state (the rowwise weights in an fp32 group of their
own: their pieces are not ranges of rows, which int8 blocks need, see
``check_placement``), 4 steps on the single-process run's gradients (see :func:`replay`):
the params equal the single-process run's within 1e-5, with a step of w2 and one of the head
skipped for a NaN that one rank holds (the head's group also holds params on the 1-D dp mesh,
listed first: every rank must learn of it); a ``torch.distributed.checkpoint`` saved on the 2×2 FSDP+TP
layout after 2 steps loads on a 4×1 FSDP2 mesh, on HSDP and in one process without a process
group, every state tensor equal to the saved one, and the run goes on to the reference. And real FSDP+TP training (its own
forward and backward) of Muon ends within 1e-5 of the single process, and
``step_in_backward`` on both 2-D layouts equals their ordinary loop; each call of a bucket's
whole-matrix work makes at most one exchange each way. Params in equal row blocks (fused
per-head q/k/v, gate/up, a blocked expert stack) as DTensors on 1-D and 2-D meshes equal the
single process too, params and state.
"""
import threading

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import matrixopt
from benchmarks.distributed import LAYOUTS
from dist_utils import CountingWork, assert_params_close, full_params, spawn

WORLD = 4
DIM, HEAD, VOCAB, HIDDEN, SEQ, BATCH = 16, 4, 12, 38, 6, 8   # TP needs even splits; dp gets 10 + 9 of 19
STEPS = 4
RTOL = 1e-5   # measured: Muon, ROOT, ARO bit for bit; the low-rank rules within 5e-8 (their matmuls over pieces)
CASES = {
    "Muon": ("Muon", {}), "ROOT": ("ROOT", {}), "ARO": ("ARO", {}),
    "GaLoreAdamW": ("GaLoreAdamW", {"rank": 4, "update_proj_gap": 2}),
    "DCTAdamW": ("DCTAdamW", {"rank": 4, "update_proj_gap": 2}),
    "CoSOAdamW": ("CoSOAdamW", {"rank": 4, "update_proj_gap": 2}),
}


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, -1, HEAD).transpose(1, 2) for w in (self.wq, self.wk, self.wv))   # local heads
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.attention, self.feed_forward = Attention(), FeedForward()

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(), Block()])
        self.norm = nn.RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama()


def layout(name: str, net: Llama) -> Llama:
    """``net`` parallelized as benchmarks.distributed.LAYOUTS[name] does on the 4 ranks (the
    same module names as torchtitan's llama), or as is for "single"."""
    return net if name == "single" else LAYOUTS[name](net, WORLD)


ROWWISE = ("attention.wo.weight", "feed_forward.w2.weight")   # Shard(1) on tp


def optimizer(case: str, net, precision: str = "fp32"):
    """The case's optimizer; the rowwise weights in a group of their own, at fp32 (their pieces
    under TP are not ranges of rows, which int8 blocks need): the same groups on every layout."""
    name, settings = CASES[case]
    groups = []
    for group in matrixopt.param_groups(net):
        # 1-D params first: under FSDP+TP the first DTensor of the fallback group is then on the
        # 1-D dp mesh while the others span the 2-D one (the non-finite agreement spans both).
        group = {**group, "params": sorted(group["params"], key=lambda named: named[1].ndim)}
        rowwise = [(n, p) for n, p in group["params"] if n.endswith(ROWWISE)]
        others = [(n, p) for n, p in group["params"] if not n.endswith(ROWWISE)]
        groups += [{**group, "params": others, "state_precision": precision},
                   {**group, "params": rowwise, "state_precision": "fp32"}]
    return getattr(matrixopt, name)([g for g in groups if g["params"]], lr=0.02, **settings)


def batches(steps: int):
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g) for _ in range(steps)]


def loss(net, tokens):
    logits = net(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def train(net, opt, data):
    for tokens in data:
        opt.zero_grad()
        loss(net, tokens).backward()
        opt.step()


def reference(case: str, precision: str, data) -> tuple[dict, list[dict]]:
    """The single-process run, with a NaN in w2's gradient at the first step and in the head's
    (on the fallback) at the second: its final params and every step's gradients."""
    net = llama()
    opt = optimizer(case, net, precision)
    grads = []
    for step, tokens in enumerate(data):
        opt.zero_grad()
        loss(net, tokens).backward()
        if step < 2:
            (net.layers[0].feed_forward.w2 if step == 0 else net.output).weight.grad[0, 0] = float("nan")
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
        opt.step()
    assert opt.nonfinite_skips == 2
    return full_params(net), grads


def replay(net, opt, grads: list[dict]):
    """Steps on the reference's gradients, each placed like its param: the NaN lands on the one
    rank holding that entry. (The TP forward rounds apart from the single process, ~1e-7 in
    the gradients, which ARO amplifies to 1e-2 and int8 codes turn into code steps: replayed
    gradients show the optimizer alone.)"""
    for step_grads in grads:
        for n, p in net.named_parameters():
            p.grad = placed_like(p, step_grads[n])
        opt.step()


def placed_like(p: DTensor, full: torch.Tensor) -> DTensor:
    """``full`` as a DTensor placed like ``p`` (distribute_tensor takes no strided shards): this
    rank's piece at the offset DTensor gives it, checked by gathering it back."""
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    piece = full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
    placed = DTensor.from_local(piece.contiguous(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    torch.testing.assert_close(placed.full_tensor(), full, rtol=0, atol=0, equal_nan=True)
    return placed


def _worker(rank, checkpoint_dir):
    data = batches(STEPS)
    for case in CASES:
        for precision in ("fp32", "int8"):
            try:
                want, grads = reference(case, precision, data)
                for name in ("fsdp_tp", "hsdp"):
                    net = layout(name, llama())
                    opt = optimizer(case, net, precision)
                    replay(net, opt, grads)
                    assert opt.nonfinite_skips == 2
                    assert_params_close(full_params(net), want, RTOL)
                _check_checkpoint(case, precision, grads, want, f"{checkpoint_dir}/{case}-{precision}")
            except Exception as e:
                raise AssertionError(f"{case} at {precision} on rank {rank}: {e}") from e
    _check_training(data)
    _check_exchanges(data)


def _check_exchanges(data):
    """Each call of a bucket's whole-matrix work makes at most one exchange to the owners and
    one back (all-to-all or all-gather), on both layouts, for every optimizer."""
    for case in CASES:
        for name in ("fsdp_tp", "hsdp"):
            net = layout(name, llama())
            opt = optimizer(case, net)
            work = CountingWork(opt)
            train(net, opt, data[:2])
            assert work.exchanges and max(work.exchanges) <= 2, (case, name, work.exchanges)


def _check_training(data):
    """Real FSDP+TP training (its own forward and backward) ends at the single process's
    params; on both 2-D layouts, updates in backward (each param after its reduce-scatter)
    equal the ordinary loop there."""
    ref = llama()
    train(ref, optimizer("Muon", ref), data)
    net = layout("fsdp_tp", llama())
    train(net, optimizer("Muon", net), data)
    assert_params_close(full_params(net), full_params(ref), 1e-5)
    for name in ("fsdp_tp", "hsdp"):
        for case in ("Muon", "GaLoreAdamW"):
            want = layout(name, llama())
            train(want, optimizer(case, want), data)
            got = layout(name, llama())
            matrixopt.step_in_backward(optimizer(case, got))
            for tokens in data:
                loss(got, tokens).backward()
            assert all(p.grad is None for p in got.parameters())
            assert_params_close(full_params(got), full_params(want), 1e-6)


def _full_state(opt) -> dict:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                out[(i, key)] = value.full_tensor() if isinstance(value, DTensor) else value
    return out


def _check_checkpoint(case, precision, grads, want, checkpoint_dir):
    """Saved on FSDP+TP after 2 steps; loaded on FSDP2 over 4 ranks and on HSDP: the same
    state, and the run goes on to the single-process params."""
    net = layout("fsdp_tp", llama())
    opt = optimizer(case, net, precision)
    replay(net, opt, grads[:2])
    saved = _full_state(opt)
    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)
    if dist.get_rank() == 0:   # for the single-process resume (test_single_process_resumes_a_2x2_checkpoint)
        torch.save({"saved": saved, "grads": grads[2:], "want": want}, f"{checkpoint_dir}.pt")
    for name in ("fsdp", "hsdp"):
        resumed = layout(name, llama(seed=1))
        resumed_opt = optimizer(case, resumed, precision)
        model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=checkpoint_dir)
        set_state_dict(resumed, resumed_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        got = _full_state(resumed_opt)
        assert got.keys() == saved.keys(), (name, sorted(set(got) ^ set(saved)))
        for key, value in saved.items():
            assert torch.equal(got[key], value), (name, key)
        replay(resumed, resumed_opt, grads[2:])
        assert_params_close(full_params(resumed), want, RTOL)


def _resume_single(checkpoint_dir, case, precision):
    """The 2×2 checkpoint loaded by one process without a process group: the same state, and
    the run goes on to the reference."""
    expected = torch.load(f"{checkpoint_dir}.pt")
    net = llama(seed=1)
    opt = optimizer(case, net, precision)
    model_sd, optim_sd = get_state_dict(net, opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=checkpoint_dir, no_dist=True)
    set_state_dict(net, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    got = _full_state(opt)
    assert got.keys() == expected["saved"].keys()
    for key, value in expected["saved"].items():
        assert torch.equal(got[key], value), key
    for step_grads in expected["grads"]:
        for n, p in net.named_parameters():
            p.grad = step_grads[n].clone()
        opt.step()
    assert_params_close(full_params(net), expected["want"], RTOL)


def test_fsdp_tp_and_hsdp_match_single_process_and_checkpoints_move_between_layouts(tmp_path):
    spawn(_worker, str(tmp_path), world=WORLD)
    for case in CASES:
        for precision in ("fp32", "int8"):
            try:
                _resume_single(f"{tmp_path}/{case}-{precision}", case, precision)
            except Exception as e:
                raise AssertionError(f"{case} at {precision}, resumed in one process: {e}") from e


# -- params in row blocks (fused projections: per-head q/k/v) as DTensors --------------------------

BLOCKED = {   # name: (shape, blocks); the pieces below hold whole blocks, rows inside one, or columns
    "wqkv": ((32, 16), 8),       # 8 heads of 4 rows (GQA q, k, v)
    "gate_up": ((32, 16), 2),    # 2 blocks of 16 rows
    "experts": ((4, 16, 8), 2),  # 4 experts, each 2 blocks of 8 rows
}
BLOCKED_LAYOUTS = {   # name: (mesh shape, placements per param)
    "fsdp": ((4,), {"wqkv": ("S0",), "gate_up": ("S0",), "experts": ("S0",)}),
    "columns": ((4,), {"wqkv": ("S1",), "gate_up": ("S1",), "experts": ("S0",)}),
    "fsdp_tp": ((2, 2), {"wqkv": ("S0", "S0"), "gate_up": ("S0", "S1"), "experts": ("S0", "R")}),
    "hsdp": ((2, 2), {"wqkv": ("R", "S0"), "gate_up": ("R", "S0"), "experts": ("R", "S0")}),
}


def _placed(full: dict[str, torch.Tensor], mesh_shape: tuple | None, placements: dict) -> dict[str, nn.Parameter]:
    """``full`` as params, DTensors on a CPU mesh of ``mesh_shape`` placed as ``placements``
    says per name ("S0", "S1", "R" per mesh dim; None: plain tensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if mesh_shape is None:
        return {n: nn.Parameter(t) for n, t in full.items()}
    mesh = init_device_mesh("cpu", mesh_shape)
    kinds = {"S0": Shard(0), "S1": Shard(1), "R": Replicate()}
    return {n: nn.Parameter(distribute_tensor(t, mesh, [kinds[k] for k in placements[n]], src_data_rank=None))
            for n, t in full.items()}


def _blocked_params(layout_name: str | None) -> dict[str, torch.Tensor]:
    """The blocked params (seeded), as DTensors placed as ``layout_name`` says (None: plain)."""
    g = torch.Generator().manual_seed(7)
    full = {n: torch.randn(shape, generator=g) / 4 for n, (shape, _) in BLOCKED.items()}
    if layout_name is None:
        return _placed(full, None, None)
    return _placed(full, *BLOCKED_LAYOUTS[layout_name])


def _blocked_optimizer(case: str, params: dict, precision: str = "fp32"):
    name, settings = CASES[case]
    groups = [{"params": [p], "param_names": [n], "matrix": True, "blocks": BLOCKED[n][1],
               "state_precision": precision} for n, p in params.items()]
    return getattr(matrixopt, name)(groups, lr=0.02, weight_decay=0.1, **settings)


def _blocked_grads(steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(11)
    return [{n: torch.randn(shape, generator=g) for n, (shape, _) in BLOCKED.items()} for _ in range(steps)]


def _blocked_run(case, layout_name, grads, precision="fp32", opt=None, params=None):
    params = params or _blocked_params(layout_name)
    opt = opt or _blocked_optimizer(case, params, precision)
    for step_grads in grads:
        for n, p in params.items():
            p.grad = step_grads[n].clone() if layout_name is None else placed_like(p, step_grads[n])
        opt.step()
    return params, opt


def _blocked_worker(rank, checkpoint_dir):
    grads = _blocked_grads(STEPS)
    for case in CASES:
        for precision in ("fp32", "int8"):
            want, want_opt = _blocked_run(case, None, grads, precision)
            want_state = _full_state(want_opt)
            for name in BLOCKED_LAYOUTS if precision == "fp32" else ("fsdp", "hsdp"):   # int8: row pieces
                try:
                    got, opt = _blocked_run(case, name, grads, precision)
                    assert_params_close(full_params(nn.ParameterDict(got)), full_params(nn.ParameterDict(want)), RTOL)
                    if case == "GaLoreAdamW" and name == "fsdp":   # each rank's whole blocks: moments sharded
                        moments = opt.state_dict()["state"]
                        assert isinstance(moments[2]["exp_avg"], DTensor), "experts' moments"
                        assert not isinstance(moments[1]["exp_avg"], DTensor), "gate_up's (rows inside a block)"
                    state = _full_state(opt)
                    assert state.keys() == want_state.keys()
                    for key, value in want_state.items():   # the same state, laid out as one process's
                        torch.testing.assert_close(state[key], value, rtol=RTOL, atol=1e-7, msg=str(key))
                except Exception as e:
                    raise AssertionError(f"{case} at {precision} on {name}, rank {rank}: {e}") from e
        # Saved on 2×2 FSDP+TP after 2 steps, loaded on 1-D FSDP2: the run goes on to the reference.
        params, opt = _blocked_run(case, "fsdp_tp", grads[:2])
        dcp.save({"optim": get_state_dict(nn.ParameterDict(params), opt)[1]}, checkpoint_id=f"{checkpoint_dir}/{case}")
        resumed = _blocked_params("fsdp")
        resumed_opt = _blocked_optimizer(case, resumed)
        module = nn.ParameterDict(resumed)
        loaded = {"optim": get_state_dict(module, resumed_opt)[1]}
        dcp.load(loaded, checkpoint_id=f"{checkpoint_dir}/{case}")
        set_state_dict(module, resumed_opt, model_state_dict={}, optim_state_dict=loaded["optim"])
        for n, p in resumed.items():
            p.data.copy_(placed_like(p, params[n].full_tensor()))
        _blocked_run(case, "fsdp", grads[2:], opt=resumed_opt, params=resumed)
        want, _ = _blocked_run(case, None, grads)
        assert_params_close(full_params(module), full_params(nn.ParameterDict(want)), RTOL)
    _check_blocked_refusals()


def _check_blocked_refusals():
    """Pieces that cut across row blocks, and unequal or column blocks of a DTensor, are refused by name."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    w = nn.Parameter(distribute_tensor(torch.randn(24, 8), mesh, [Shard(0)]))   # 6 rows a rank; blocks of 4
    with pytest.raises(ValueError, match=r"fused\.weight.*cut across its row blocks of 4 rows"):
        matrixopt.Muon([{"params": [w], "param_names": ["fused.weight"], "blocks": 6}])
    with pytest.raises(ValueError, match=r"Invalid blocks for fused\.weight.*of a DTensor: equal sizes"):
        matrixopt.Muon([{"params": [w], "param_names": ["fused.weight"], "blocks": [8, 16]}])
    with pytest.raises(ValueError, match=r"Invalid blocks for fused\.weight.*columns: not of a DTensor"):
        matrixopt.Muon([{"params": [w], "param_names": ["fused.weight"], "blocks": 2, "block_axis": "columns"}])


def test_blocked_dtensors_match_single_process_on_every_layout(tmp_path):
    """Params in row blocks (a fused per-head q/k/v, a gate/up pair, an expert stack) as
    DTensors on 1-D and 2-D meshes, pieces holding whole blocks, rows inside one block or
    columns: every optimizer equals the single process (params and state), at int8 state
    too where the pieces are rows; a checkpoint saved on 2×2 resumes on a 1-D mesh."""
    spawn(_blocked_worker, str(tmp_path), world=WORLD)


# -- state and weights stored by global position, on params split by columns (TP's rowwise) --------

WIDE = {"wo": (8, 1024), "head": (8, 1024)}   # head: on the fallback; 1024 columns: whole int8 blocks per piece
WIDE_LAYOUTS = {"tp": ((4,), ("S1",)), "fsdp_tp": ((2, 2), ("S0", "S1"))}
STORED = {   # name: (param dtype, group settings)
    "int8 state": (torch.float32, {"state_precision": "int8"}),
    "bf16 state": (torch.float32, {"state_precision": "bf16"}),
    "stochastic bf16 weights, int8 state": (torch.bfloat16, {"master_weights": "stochastic", "state_precision": "int8"}),
    "int8 master bits": (torch.bfloat16, {"master_weights": "int8"}),
}


def _wide_params(layout_name: str | None, dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    full = {n: (torch.randn(shape, generator=g) / 8).to(dtype) for n, shape in WIDE.items()}
    if layout_name is None:
        return _placed(full, None, None)
    mesh_shape, placements = WIDE_LAYOUTS[layout_name]
    return _placed(full, mesh_shape, dict.fromkeys(full, placements))


def _wide_run(case, stored, layout_name, grads):
    dtype, settings = STORED[stored]
    params = _wide_params(layout_name, dtype)
    name, rule = CASES[case]
    opt = getattr(matrixopt, name)([{"params": [p], "param_names": [n], "matrix": n != "head", **settings}
                                    for n, p in params.items()], lr=0.02, weight_decay=0.1, **rule)
    for step_grads in grads:
        for n, p in params.items():
            full = step_grads[n].to(dtype)
            p.grad = full if layout_name is None else placed_like(p, full)
        opt.step()
    return full_params(nn.ParameterDict(params)), _full_state(opt)


def _wide_worker(rank):
    g = torch.Generator().manual_seed(9)
    grads = [{n: torch.randn(shape, generator=g) for n, shape in WIDE.items()} for _ in range(STEPS)]
    for case in CASES:
        for stored in STORED:
            want, want_state = _wide_run(case, stored, None, grads)
            for name in WIDE_LAYOUTS:
                try:
                    got, state = _wide_run(case, stored, name, grads)
                    assert_params_close(got, want, RTOL)
                    assert state.keys() == want_state.keys()
                    for key, value in want_state.items():
                        torch.testing.assert_close(state[key], value, rtol=RTOL, atol=1e-7, msg=str(key))
                except Exception as e:
                    raise AssertionError(f"{case}, {stored} on {name}, rank {rank}: {e}") from e
    _check_wide_refusals()


def _check_wide_refusals():
    """A column split that cuts int8 blocks is refused by name; bf16 state there is not."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    w = nn.Parameter(distribute_tensor(torch.randn(8, 512), init_device_mesh("cpu", (WORLD,)), [Shard(1)]))
    with pytest.raises(ValueError, match=r"wo\.weight is placed .*cut its rows' int8 blocks of 256 entries"):
        matrixopt.Muon([{"params": [w], "param_names": ["wo.weight"], "state_precision": "int8"}])
    matrixopt.Muon([{"params": [w], "param_names": ["wo.weight"], "state_precision": "bf16"}])


def test_state_and_weights_stored_by_position_on_column_splits_match_single_process():
    """TP's rowwise weights (split by columns, on a 1-D tp mesh and under FSDP+TP), matrix rule
    and fallback: int8 and bf16 state, stochastic bf16 weights and int8 master bits draw and
    store every entry as the single process does (params and state, every optimizer)."""
    spawn(_wide_worker, world=WORLD)


# -- buckets in flight: one lane's collectives overlap another's compute ---------------------------

def _lanes_worker(rank):
    """Each optimizer with ``buckets_in_flight = 3`` on FSDP2, FSDP+TP and HSDP equals the
    default (one lane) bit for bit, params and state, through a NaN-skipped step, and its
    buckets' collectives ran in more than one thread and process group."""
    data = batches(STEPS)
    seen = set()
    saved = {name: getattr(dist, name) for name in CountingWork.EXCHANGES}

    def recording(collective):
        def record(*args, **kwargs):
            seen.add((threading.current_thread().name, id(kwargs.get("group"))))
            return collective(*args, **kwargs)
        return record

    for case in CASES:
        _, grads = reference(case, "fp32", data)
        for name in ("fsdp", "fsdp_tp", "hsdp"):
            runs = []
            for lanes in (1, 3):
                net = layout(name, llama())
                opt = optimizer(case, net)
                opt.buckets_in_flight = lanes
                for collective, fn in saved.items():
                    setattr(dist, collective, recording(fn) if lanes > 1 else fn)
                try:
                    replay(net, opt, grads)
                finally:
                    for collective, fn in saved.items():
                        setattr(dist, collective, fn)
                runs.append((full_params(net), _full_state(opt)))
            (want, want_state), (got, state) = runs
            assert all(torch.equal(got[n], want[n]) for n in want), (case, name)
            assert state.keys() == want_state.keys(), (case, name, sorted(set(state) ^ set(want_state)))
            bad = [k for k, v in want_state.items() if not torch.equal(state[k], v)]
            assert not bad, (case, name, [(k, (state[k] - want_state[k]).abs().max().item()) for k in bad])
    assert len({thread for thread, _ in seen}) > 1 and len({group for _, group in seen}) > 1, seen
    _check_sub_mesh_lanes()


def _check_sub_mesh_lanes():
    """Buckets whose work spans a sub-mesh (each dp half of a 2×2 mesh: other ranks on other
    ranks) stay in lane 0, whatever buckets_in_flight says: the same params as one lane."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["dp"]
    g = torch.Generator().manual_seed(3)
    fulls = [torch.randn(8, 8, generator=g) for _ in range(3)]
    grads = [[torch.randn(8, 8, generator=g) for _ in fulls] for _ in range(2)]
    finals, threads, all_to_all = [], set(), dist.all_to_all_single

    def recorded(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return all_to_all(*args, **kwargs)

    for lanes in (1, 3):
        params = [nn.Parameter(distribute_tensor(f, mesh, [Shard(0)], src_data_rank=None)) for f in fulls]
        opt = matrixopt.Muon(params, lr=0.02)
        opt.buckets_in_flight, opt.max_bucket_elements = lanes, 64   # a bucket per matrix
        dist.all_to_all_single = recorded
        try:
            for step_grads in grads:
                for p, grad in zip(params, step_grads):
                    p.grad = placed_like(p, grad)
                opt.step()
        finally:
            dist.all_to_all_single = all_to_all
        finals.append([p.full_tensor() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*finals))
    assert threads == {threading.current_thread().name}, threads


def test_buckets_in_flight_overlap_lanes_and_change_no_bit():
    spawn(_lanes_worker, world=WORLD)
