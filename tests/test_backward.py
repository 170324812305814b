"""matrixopt.step_in_backward: the update fused into backward equals the ordinary loop.

The reference is the ordinary loop — k backward passes of loss/k, then ``optimizer.step()`` —
with the same optimizer class, so each in-backward update is checked against the shell's
whole step over every param at once (buckets of several params there, one param here).
Every exported optimizer, a model with tall and wide matrices, a 3-D stack, biases and
fallback params, steps across projector refreshes, accumulation 1 and 3; LR schedulers
(the lr of every step, no warning), the per-param non-finite policy, per-param clipping,
params missing from some passes, checkpoints, ``remove()``, gradients held at once during
backward, refusals with clear errors; FSDP2 on 2 gloo ranks equal to the ordinary FSDP2 loop.
"""
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import matrixopt
from dist_utils import CASES, WORLD, assert_params_close, full_params, make_optimizer, model, sharded, spawn
from dist_utils import batches as dist_batches

torch.set_num_threads(1)

VOCAB, DIM = 9, 8
SETTINGS = {
    "Muon": {}, "ROOT": {}, "ARO": {},
    "GaLoreAdamW": dict(rank=2, update_proj_gap=2),
    "DCTAdamW": dict(rank=2, update_proj_gap=2),
    "CoSOAdamW": dict(rank=2, update_proj_gap=2, protect="both"),
}
OPTIMIZERS = [n for n in matrixopt.__all__
              if isinstance(getattr(matrixopt, n), type) and issubclass(getattr(matrixopt, n), matrixopt.MatrixOptimizer)
              and n not in ("MatrixOptimizer", "LowRankAdamW")]


def test_every_exported_optimizer_has_settings():
    assert sorted(OPTIMIZERS) == sorted(SETTINGS)


class Net(nn.Module):
    """Every matrix of its own shape (so every bucket of the ordinary step holds one param):
    a tall and a wide Linear with biases, a 3-D stack, an embedding and a head (fallback)."""

    def __init__(self, same_shapes: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.tall = nn.Linear(DIM, 20)                                  # (20, 8)
        self.stack = nn.Parameter(torch.randn(3, 20, 6) / 5)            # 3 matrices (20, 6)
        self.wide = nn.Linear(6, 4 if not same_shapes else 6)           # (4, 6) or (6, 6)
        self.twin = nn.Linear(6, 6, bias=False) if same_shapes else None
        self.head = nn.Linear(self.wide.out_features, VOCAB)

    def forward(self, tokens):
        x = torch.tanh(self.tall(self.embed(tokens)))
        x = torch.tanh(x.unsqueeze(-3) @ self.stack).mean(-3)
        x = torch.tanh(self.wide(x))
        if self.twin is not None:
            x = x + torch.tanh(self.twin(x))
        return self.head(x)


def net(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Net(**kwargs)


def data(n):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (4, 6), generator=g) for _ in range(n)]


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def optimizer(name, model, **kwargs):
    return getattr(matrixopt, name)(matrixopt.param_groups(model), lr=0.02, **{**SETTINGS[name], **kwargs})


def ordinary(model, opt, batches, k, *, each_window=None, before_step=None):
    """The ordinary loop: per window, zero_grad, k backwards of loss/k, step()."""
    for w in range(len(batches) // k):
        opt.zero_grad()
        for tokens in batches[w * k:(w + 1) * k]:
            (loss_of(model, tokens) / k).backward()
        if before_step:
            before_step()
        opt.step()
        if each_window:
            each_window()


def in_backward(model, batches, k, *, each_window=None):
    """The in-backward loop: backwards only (the handle is on the optimizer)."""
    for w in range(len(batches) // k):
        for tokens in batches[w * k:(w + 1) * k]:
            (loss_of(model, tokens) / k).backward()
        if each_window:
            each_window()


def assert_same(a: nn.Module, b: nn.Module, opt_a=None, opt_b=None):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
        assert p.grad is None or q.grad is None or torch.equal(p.grad, q.grad), n
    if opt_a is not None:
        sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for pid in sa:
            for key, v in sa[pid].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[pid][key])), (pid, key)


# -- equal to the ordinary loop --------------------------------------------------------------

@pytest.mark.parametrize("mode", ["stochastic", "int8", "int16"])
@pytest.mark.parametrize("name", ["Muon", "GaLoreAdamW"])
def test_lean_weights_equal_the_ordinary_loop_bit_for_bit(name, mode):
    """bf16 params stored with master_weights (random bits drawn per param and step, low bits
    in the state): weights, low bits and counters equal the ordinary loop's."""
    batches = data(8)
    ref = net().to(torch.bfloat16)
    ref_opt = optimizer(name, ref, master_weights=mode)
    ordinary(ref, ref_opt, batches, 2)
    got = net().to(torch.bfloat16)
    opt = optimizer(name, got, master_weights=mode)
    matrixopt.step_in_backward(opt, accumulation_steps=2)
    in_backward(got, batches, 2)
    assert_same(got, ref, opt, ref_opt)
    assert any("weight_low_bits" in s or "weight_rounding_step" in s for s in opt.state.values())


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_equals_ordinary_loop_bit_for_bit(name, k):
    """4 windows (projector refreshes at steps 0 and 2): params and state bit-identical; no
    gradient is left after a window."""
    batches = data(4 * k)
    ref = net()
    ref_opt = optimizer(name, ref)
    ordinary(ref, ref_opt, batches, k)
    got = net()
    opt = optimizer(name, got)
    matrixopt.step_in_backward(opt, accumulation_steps=k)
    in_backward(got, batches, k)
    assert all(p.grad is None for p in got.parameters())
    assert_same(got, ref, opt, ref_opt)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_same_shape_matrices_updated_one_by_one_equal_the_batched_step(name):
    """Where the ordinary step stacks same-shape matrices ((6, 6) twice), the in-backward one
    updates them one by one: equal within 1e-6 relative."""
    batches = data(4)
    ref = net(same_shapes=True)
    ordinary(ref, optimizer(name, ref), batches, 1)
    got = net(same_shapes=True)
    matrixopt.step_in_backward(optimizer(name, got))
    in_backward(got, batches, 1)
    for (n, p), q in zip(got.named_parameters(), ref.parameters()):
        assert (p - q).norm() <= 1e-6 * q.norm(), n


def test_bf16_autocast():
    batches = data(3)
    ref, got = net(), net()
    ref_opt, opt = optimizer("Muon", ref), optimizer("Muon", got)
    matrixopt.step_in_backward(opt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ordinary(ref, ref_opt, batches, 1)
        in_backward(got, batches, 1)
    assert_same(got, ref, opt, ref_opt)


def test_a_param_missing_from_the_last_pass_is_updated_at_the_windows_end():
    """A param with a gradient from pass 1 of 3 only (a branch not taken later) is updated at
    the end of pass 3 with that gradient, as the ordinary step would."""
    def run(model, opt, handle):
        for w in range(2):
            if not handle:
                opt.zero_grad()
            for j, tokens in enumerate(data(6)[3 * w:3 * w + 3]):
                loss = loss_of(model, tokens) / 3
                if j == 0:
                    loss = loss + model.extra.pow(2).sum()
                loss.backward()
            if not handle:
                opt.step()

    ref, got = net(), net()
    for m in (ref, got):
        m.extra = nn.Parameter(torch.ones(5, 3))
    ref_opt, opt = optimizer("Muon", ref), optimizer("Muon", got)
    run(ref, ref_opt, False)
    matrixopt.step_in_backward(opt, accumulation_steps=3)
    run(got, opt, True)
    assert not torch.equal(got.extra, torch.ones(5, 3))
    assert_same(got, ref, opt, ref_opt)


# -- LR schedulers ---------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler_first", [True, False])
def test_lr_scheduler_follows_the_ordinary_schedule_without_warning(scheduler_first):
    """scheduler.step() after each window's last backward: the lr of every step equals the
    ordinary loop's, and torch's "lr_scheduler.step() before optimizer.step()" check passes
    (the handle's optimizer.step() at the window's end goes through the scheduler's wrapper),
    whether the scheduler is made before or after the handle."""
    k, windows = 2, 5
    batches = data(k * windows)

    def schedule(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=windows)

    ref = net()
    ref_opt = optimizer("GaLoreAdamW", ref)
    ref_sched = schedule(ref_opt)
    want = []
    ordinary(ref, ref_opt, batches, k, each_window=lambda: (want.append(ref_opt.param_groups[0]["lr"]),
                                                          ref_sched.step()))
    got = net()
    opt = optimizer("GaLoreAdamW", got)
    if scheduler_first:
        sched = schedule(opt)
        matrixopt.step_in_backward(opt, accumulation_steps=k)
    else:
        matrixopt.step_in_backward(opt, accumulation_steps=k)
        sched = schedule(opt)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        in_backward(got, batches, k, each_window=lambda: (lrs.append(opt.param_groups[0]["lr"]), sched.step()))
    assert lrs == want and len(set(want)) == windows
    assert_same(got, ref, opt, ref_opt)


def test_step_hooks_run_once_per_window():
    got = net()
    opt = optimizer("Muon", got)
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append(1))
    matrixopt.step_in_backward(opt, accumulation_steps=2)
    in_backward(got, data(6), 2)
    assert len(calls) == 3


# -- step(), remove(), checkpoints -----------------------------------------------------------

def test_step_finishes_the_window_in_progress_and_updates_nothing_twice():
    """A loop that calls step() itself: after a full window it updates nothing; mid-window
    (an epoch's end) it updates every held gradient — the ordinary loop whose window ends
    there; remove() restores the ordinary loop."""
    batches = data(9)
    ref = net()
    ref_opt = optimizer("DCTAdamW", ref)
    ordinary(ref, ref_opt, batches[:2], 2)
    ref_opt.zero_grad()
    (loss_of(ref, batches[2]) / 2).backward()     # a window of one pass, ended by step()
    ref_opt.step()
    ordinary(ref, ref_opt, batches[3:9], 2)
    got = net()
    opt = optimizer("DCTAdamW", got)
    handle = matrixopt.step_in_backward(opt, accumulation_steps=2)
    for tokens in batches[:2]:
        (loss_of(got, tokens) / 2).backward()
    after_window = [p.clone() for p in got.parameters()]
    opt.step()                                    # the loop's step after a full window
    opt.zero_grad()
    assert all(torch.equal(p, b) for p, b in zip(got.parameters(), after_window))
    (loss_of(got, batches[2]) / 2).backward()     # pass 1 of 2: held
    opt.step()                                    # the loop ends the window early
    opt.zero_grad()
    in_backward(got, batches[3:7], 2)
    handle.remove()
    ordinary(got, opt, batches[7:9], 2)
    assert_same(got, ref, opt, ref_opt)


def test_step_with_a_closure_runs_the_last_pass_inside_it():
    """Lightning's way: passes 1..k-1 outside, the last forward and backward inside
    ``optimizer.step(closure)``: equal to the ordinary loop, each param updated once."""
    batches = data(6)
    ref = net()
    ref_opt = optimizer("Muon", ref)
    ordinary(ref, ref_opt, batches, 3)
    got = net()
    opt = optimizer("Muon", got)
    matrixopt.step_in_backward(opt, accumulation_steps=3)
    for w in range(2):
        for tokens in batches[3 * w:3 * w + 2]:
            (loss_of(got, tokens) / 3).backward()

        def closure(tokens=batches[3 * w + 2]):
            loss = loss_of(got, tokens) / 3
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
    assert_same(got, ref, opt, ref_opt)


def test_a_loop_stepping_once_per_several_windows_is_warned():
    model = net()
    opt = optimizer("Muon", model)
    matrixopt.step_in_backward(opt, accumulation_steps=1)
    for tokens in data(3):
        loss_of(model, tokens).backward()
    with pytest.warns(UserWarning, match=r"once per 3 windows.*accumulation_steps=3"):
        opt.step()


def test_checkpoint_mid_run_resumes_identically(tmp_path):
    batches = data(9)
    whole = net()
    whole_opt = optimizer("GaLoreAdamW", whole)
    matrixopt.step_in_backward(whole_opt, accumulation_steps=3)
    in_backward(whole, batches, 3)

    first = net()
    first_opt = optimizer("GaLoreAdamW", first)
    matrixopt.step_in_backward(first_opt, accumulation_steps=3)
    in_backward(first, batches[:3], 3)
    torch.save({"model": first.state_dict(), "optim": first_opt.state_dict()}, tmp_path / "ckpt.pt")

    resumed = net(seed=1)
    opt = optimizer("GaLoreAdamW", resumed)
    matrixopt.step_in_backward(opt, accumulation_steps=3)   # active before the load
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    in_backward(resumed, batches[3:], 3)
    assert_same(resumed, whole, opt, whole_opt)


# -- per-param policies ----------------------------------------------------------------------

def test_nonfinite_gradient_skips_that_param_only():
    batches = data(2)
    ref, got = net(), net()
    ref_opt, opt = optimizer("Muon", ref), optimizer("Muon", got)
    for m in (ref, got):
        m.wide.weight.register_hook(lambda g: g * float("nan"))   # before accumulation
    matrixopt.step_in_backward(opt)
    before = net()
    with pytest.warns(RuntimeWarning, match="Non-finite gradient in wide.weight: skipped"):
        in_backward(got, batches, 1)
    with pytest.warns(RuntimeWarning):
        ordinary(ref, ref_opt, batches, 1)
    assert torch.equal(got.wide.weight, before.wide.weight) and got.wide.weight not in opt.state
    assert not torch.equal(got.tall.weight, before.tall.weight)
    assert opt.nonfinite_skips == ref_opt.nonfinite_skips == 2
    assert_same(got, ref, opt, ref_opt)


def test_nonfinite_raise_comes_out_of_backward():
    got = net()
    opt = optimizer("Muon", got, nonfinite="raise")
    got.wide.weight.register_hook(lambda g: g * float("inf"))
    matrixopt.step_in_backward(opt)
    before = got.wide.weight.clone()
    with pytest.raises(FloatingPointError, match="Non-finite gradient in wide.weight"):
        loss_of(got, data(1)[0]).backward()
    assert torch.equal(got.wide.weight, before)


@pytest.mark.parametrize("k", [1, 2])
def test_max_grad_norm_clips_each_param(k):
    """Equal to the ordinary loop with clip_grad_norm_([p], c) for each param before step()."""
    batches = data(4)
    ref, got = net(), net()
    ref_opt, opt = optimizer("ARO", ref), optimizer("ARO", got)
    clip = lambda: [torch.nn.utils.clip_grad_norm_([p], 0.05) for p in ref.parameters() if p.grad is not None]
    ordinary(ref, ref_opt, batches, k, before_step=clip)
    matrixopt.step_in_backward(opt, accumulation_steps=k, max_grad_norm=0.05)
    in_backward(got, batches, k)
    assert_same(got, ref, opt, ref_opt)
    # the clipping mattered: without it the run differs
    unclipped = net()
    matrixopt.step_in_backward(optimizer("ARO", unclipped), accumulation_steps=k)
    in_backward(unclipped, batches, k)
    assert not torch.equal(unclipped.tall.weight, got.tall.weight)


# -- memory ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Muon", "GaLoreAdamW"])
def test_one_gradient_alive_at_a_time(name):
    """At each param's hook (registered before the handle's, so it runs first) no other param
    holds a gradient: gradient memory peaks at one param's. The ordinary loop holds all."""
    def most_alive(model, handle):
        opt = optimizer(name, model)
        params = list(model.parameters())
        alive = []
        for p in params:
            p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
        if handle:
            matrixopt.step_in_backward(opt)
        for tokens in data(2):
            opt.zero_grad()
            loss_of(model, tokens).backward()
            if not handle:
                opt.step()
        return max(alive)

    assert most_alive(net(), handle=True) == 1
    assert most_alive(net(), handle=False) == len(list(net().parameters()))


# -- refused ---------------------------------------------------------------------------------

def test_refusals_name_the_problem():
    model = net()
    with pytest.raises(TypeError, match="needs a matrixopt optimizer, got AdamW"):
        matrixopt.step_in_backward(torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="Invalid accumulation_steps: 0"):
        matrixopt.step_in_backward(optimizer("Muon", model), accumulation_steps=0)
    with pytest.raises(ValueError, match="Invalid max_grad_norm: -1"):
        matrixopt.step_in_backward(optimizer("Muon", model), max_grad_norm=-1)
    with pytest.raises(ValueError, match="does not support Muon\\(distributed='replicated'"):
        matrixopt.step_in_backward(optimizer("Muon", model, distributed="replicated"))
    opt = optimizer("Muon", model)
    handle = matrixopt.step_in_backward(opt)
    with pytest.raises(RuntimeError, match="already active"):
        matrixopt.step_in_backward(opt)
    handle.remove()
    matrixopt.step_in_backward(opt).remove()


def test_grad_scaler_step_is_refused():
    model = net()
    opt = optimizer("Muon", model)
    matrixopt.step_in_backward(opt, accumulation_steps=2)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, data(1)[0])).backward()     # pass 1 of 2: gradients held
    with pytest.raises(RuntimeError, match="GradScaler is not supported with step_in_backward"):
        scaler.step(opt)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, data(1)[0])).backward()     # pass 2: every gradient consumed
    with pytest.raises(AssertionError, match="No inf checks were recorded"):
        scaler.step(opt)


def test_reentrant_activation_checkpointing_with_accumulation_steps_1():
    """Each checkpointed segment's backward is a backward of its own (its end calls the
    handle's step): with accumulation_steps=1 the run still equals the ordinary loop."""
    from torch.utils.checkpoint import checkpoint

    def checkpointed_loss(m, tokens):
        x = torch.tanh(m.tall(m.embed(tokens[:, :-1])))
        x = checkpoint(lambda x: torch.tanh(x.unsqueeze(-3) @ m.stack).mean(-3), x, use_reentrant=True)
        logits = m.head(checkpoint(lambda x: torch.tanh(m.wide(x)), x, use_reentrant=True))
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    ref, got = net(), net()
    ref_opt, opt = optimizer("Muon", ref), optimizer("Muon", got)
    matrixopt.step_in_backward(opt)
    for tokens in data(3):
        ref_opt.zero_grad()
        checkpointed_loss(ref, tokens).backward()
        ref_opt.step()
        checkpointed_loss(got, tokens).backward()
    assert_same(got, ref, opt, ref_opt)


# -- FSDP2 -----------------------------------------------------------------------------------

FSDP_CASES = [c for c, (n, _) in CASES.items() if n in matrixopt.__all__]


def _fsdp_run(case, batches, k, handle, **kwargs):
    """The FSDP2 model after the ordinary loop or the in-backward one (every rank the whole batch)."""
    net = sharded(model())
    opt = make_optimizer(case, net)
    clip = kwargs.get("max_grad_norm")
    if handle:
        matrixopt.step_in_backward(opt, accumulation_steps=k, **kwargs)
    for w in range(len(batches) // k):
        if not handle:
            opt.zero_grad()
        for tokens in batches[w * k:(w + 1) * k]:
            (loss_of(net, tokens) / k).backward()
        if not handle:
            if clip:
                for p in net.parameters():
                    torch.nn.utils.clip_grad_norm_([p], clip)
            opt.step()
    return net, opt


def _fsdp_worker(rank, checkpoint_dir):
    batches = dist_batches(6)
    for case in FSDP_CASES:
        for k in ([1, 3] if case in ("Muon", "GaLoreAdamW") else [1]):
            want = full_params(_fsdp_run(case, batches[:2 * k], k, False)[0])
            got, _ = _fsdp_run(case, batches[:2 * k], k, True)
            assert all(p.grad is None for p in got.parameters())
            try:
                assert_params_close(full_params(got), want, rtol=1e-6)
            except AssertionError as e:
                raise AssertionError(f"{case}, accumulation_steps={k}, rank {rank}: {e}") from e

    # Per-param clipping: the whole param's norm, as clip_grad_norm_([p]) of the ordinary loop.
    want = full_params(_fsdp_run("ARO", batches[:2], 1, False, max_grad_norm=0.05)[0])
    assert_params_close(full_params(_fsdp_run("ARO", batches[:2], 1, True, max_grad_norm=0.05)[0]), want, 1e-6)

    # At each sharded param's hook (FSDP2 calls them after the reduce-scatter) only its grad lives.
    net = sharded(model())
    params = list(net.parameters())
    alive = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    matrixopt.step_in_backward(make_optimizer("Muon", net))
    loss_of(net, batches[0]).backward()
    assert len(alive) == len(params) and max(alive) == 1

    # DCP save mid-run with the handle active, resumed in a fresh model: as uninterrupted.
    net, opt = _fsdp_run("GaLoreAdamW", batches[:2], 1, True)
    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)
    for tokens in batches[2:4]:
        loss_of(net, tokens).backward()
    resumed = sharded(model(seed=1))
    opt = make_optimizer("GaLoreAdamW", resumed)
    # Loaded before the handle: DCP makes a fresh optimizer's state by a step() with zero grads.
    model_sd, optim_sd = get_state_dict(resumed, opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=checkpoint_dir)
    set_state_dict(resumed, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    matrixopt.step_in_backward(opt)
    for tokens in batches[2:4]:
        loss_of(resumed, tokens).backward()
    got, want = full_params(resumed), full_params(net)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert dist.get_world_size() == WORLD


def test_fsdp2_equals_the_ordinary_fsdp2_loop(tmp_path):
    spawn(_fsdp_worker, str(tmp_path / "dcp"))


# -- DDP -------------------------------------------------------------------------------------

def _ddp_run(case, batches, k, handle):
    """DDP (each rank its own batches, so the gradients are averaged) trained by the ordinary
    loop (``no_sync`` in passes 1…k-1, DDP's all-reduce hook) or the in-backward one."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model(), bucket_cap_mb=0.002)   # several buckets for this small model
    opt = make_optimizer(case, ddp.module)
    if handle:
        matrixopt.step_in_backward(opt, accumulation_steps=k, ddp=ddp)
        opt.updates = []   # per step_params call, the params it found with a gradient
        step_params = opt.step_params
        opt.step_params = lambda selection: (
            opt.updates.append(sum(g["params"][i].grad is not None for g, idx in selection for i in idx)),
            step_params(selection))
    else:
        ddp.register_comm_hook(None, allreduce_hook)
    for w in range(len(batches) // k):
        if not handle:
            opt.zero_grad()
        for j, tokens in enumerate(batches[w * k:(w + 1) * k]):
            if j < k - 1:
                with ddp.no_sync():
                    (loss_of(ddp, tokens) / k).backward()
            else:
                (loss_of(ddp, tokens) / k).backward()
        if not handle:
            opt.step()
    return ddp.module, opt


def _ddp_worker(rank):
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, 11, (8, 7), generator=g) for _ in range(6)]
    for case in FSDP_CASES:
        for k in ([1, 3] if case in ("Muon", "GaLoreAdamW") else [1]):
            want = full_params(_ddp_run(case, batches[:2 * k], k, False)[0])
            got, opt = _ddp_run(case, batches[:2 * k], k, True)
            assert all(p.grad is None for p in got.parameters())
            # Per window: one call per DDP bucket inside backward updates them all, the
            # window's own step() finds nothing left.
            calls = [n for n in opt.updates if n]
            assert len(calls) > 2 and sum(calls) == 2 * len(list(got.parameters())), opt.updates
            try:
                assert_params_close(full_params(got), want, rtol=1e-6)
            except AssertionError as e:
                raise AssertionError(f"{case}, accumulation_steps={k}, rank {rank}: {e}") from e
    with pytest.raises(ValueError, match="under DDP each rank updates every param"):
        ddp = torch.nn.parallel.DistributedDataParallel(model())
        matrixopt.step_in_backward(make_optimizer("Muon", ddp.module, distributed="replicated"), ddp=ddp)


def test_ddp_updates_each_bucket_after_its_all_reduce_as_the_ordinary_ddp_loop():
    spawn(_ddp_worker)
