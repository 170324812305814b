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
whole-matrix work makes at most one exchange each way.
"""
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
