"""CoSOAdamW against an independent float64 implementation of its rule (``Reference``,
written from the docstring of matrixopt.coso, calling nothing of matrixopt): trajectories
across refreshes and task boundaries, the history's merge, exact orthogonality of every
update to the protected subspace (fp32), the state round trip, and 2-rank DDP/FSDP2 runs
equal to the single-process one."""
import copy
import math
import warnings

import numpy as np
import pytest
import torch

import matrixopt

# max_history 0.5: a history that can fill min(m, n) = d would leave no direction to step in
# (Π(G) = 0 up to rounding, whose SVD is noise), which the reference cannot follow to 1e-9.
HYPER = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6, scale=0.5, rank=3, update_proj_gap=4, max_history=0.5)


def grad_fn(task: int, shape=(12, 8)):
    """A task's gradient of W: a quadratic pull towards a task-specific target, plus noise."""
    m, n = shape
    g = torch.Generator().manual_seed(100 + task)
    target = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / 3

    def grad(W, t):
        noise = torch.randn(m, n, generator=torch.Generator().manual_seed(1000 * task + t), dtype=torch.float64)
        return (W - target) @ (mix @ mix.T + torch.eye(n, dtype=torch.float64)) + 0.1 * noise

    return grad


class Reference:
    """The rule for one matrix in float64, growing H as a d×c matrix (no padding)."""

    def __init__(self, W, *, lr, betas, eps, scale, rank, update_proj_gap, weight_decay=0.0, protect="gradients",
                 side="right", history_energy=0.95, weight_energy=0.5, max_history=1.0, sketch_rank=None,
                 sketch_gap=5, proj_type="std"):
        self.W, self.lr, self.betas, self.eps, self.scale = W.clone(), lr, betas, eps, scale
        self.T, self.wd, self.protect, self.side = update_proj_gap, weight_decay, protect, side
        self.e_hist, self.e_w = history_energy, weight_energy
        m, n = W.shape
        k = min(m, n)
        self.r = min(rank, k)
        self.h_max = max(1, round(max_history * k)) if isinstance(max_history, float) else max_history
        self.d = m if side == "left" else n
        b = sketch_rank if sketch_rank is not None else self.r
        self.gap = sketch_gap
        self.S = torch.zeros(self.d, self.h_max, dtype=torch.float64)   # h_max − c columns: the free ones
        self.A = torch.zeros(self.d, min(b, self.d), dtype=torch.float64)
        self.E = 0.0   # the energy the sketch's truncations cut off
        self.H = torch.zeros(self.d, 0, dtype=torch.float64)
        self.right = (m >= n) == (proj_type == "std")   # which side GaLore projects
        self.t, self.M, self.V, self.P = 0, None, None, None
        self.full = False
        if protect != "gradients":
            self.fold(self.tall(self.W), weight_energy)
            self.S = torch.zeros(self.d, self.h_max - self.H.shape[1], dtype=torch.float64)

    def tall(self, X):
        return X if self.side == "left" else X.T

    def pi(self, X):
        H = self.H
        return X - H @ (H.T @ X) if self.side == "left" else X - (X @ H) @ H.T

    def project(self, X):
        return X @ self.P if self.right else self.P.T @ X

    def back(self, L):
        return L @ self.P.T if self.right else self.P @ L

    def fold(self, X, energy, beyond=0.0):
        if self.H.shape[1] >= self.h_max:
            self.full = True
            return
        X = X - self.H @ (self.H.T @ X)
        U, s, _ = torch.linalg.svd(X, full_matrices=False)
        if s[0] == 0:
            return
        e = torch.where(s > 1e-6 * s[0], s**2, torch.zeros_like(s))
        cum = torch.cumsum(e, 0) / (e.sum() + beyond)
        wanted = min(int((cum < energy - 1e-15).sum()) + 1, int((e > 0).sum()))
        add = min(wanted, self.h_max - self.H.shape[1])
        self.full |= wanted > add
        Q, _ = torch.linalg.qr(U[:, :add] - self.H @ (self.H.T @ U[:, :add]))
        self.H = torch.cat([self.H, Q], dim=1)

    def step(self, G):
        Gt = self.pi(G)
        if self.t % self.T == 0:
            U, _, Vh = torch.linalg.svd(Gt)
            self.P = Vh[:self.r].T if self.right else U[:, :self.r]
        L = self.project(Gt)
        b1, b2 = self.betas
        self.M = (1 - b1) * L if self.M is None else b1 * self.M + (1 - b1) * L
        self.V = (1 - b2) * L**2 if self.V is None else b2 * self.V + (1 - b2) * L**2
        self.t += 1
        size = math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        delta = self.pi(self.back(self.M / (self.V.sqrt() + self.eps)))
        self.W = self.W - self.lr * self.wd * self.pi(self.W) - self.lr * self.scale * size * delta
        if self.protect != "weights":   # the Gaussian accumulator of the gradient outside H, truncated into S every gap steps
            Y = self.tall(Gt)
            b = self.A.shape[1]
            # numpy's SeedSequence(seed 0, key (group 0, place 0, matrix 0, step t, stream 1))
            word = int(np.random.SeedSequence(0, spawn_key=(0, 0, 0, self.t - 1, 1)).generate_state(1)[0])
            omega = torch.randn(Y.shape[1], b, generator=torch.Generator().manual_seed(word), dtype=torch.float32)
            self.A = self.A + Y @ omega.double() / math.sqrt(b)
            ell = self.h_max - self.H.shape[1]
            if self.t % self.gap == 0 and ell:
                U, s, _ = torch.linalg.svd(torch.cat([self.S, self.A], dim=1), full_matrices=False)
                self.S = U[:, :ell] * s[:ell]
                self.E += float((s[ell:] ** 2).sum())
            if self.t % self.gap == 0:
                self.A = torch.zeros_like(self.A)

    def end_task(self):
        if self.protect != "weights":
            self.fold(torch.cat([self.S, self.A], dim=1), self.e_hist, self.E)
            self.S = torch.zeros(self.d, self.h_max - self.H.shape[1], dtype=torch.float64)
            self.A, self.E = torch.zeros_like(self.A), 0.0
        if self.protect != "gradients":
            self.fold(self.tall(self.W), self.e_w)
            self.S = torch.zeros(self.d, self.h_max - self.H.shape[1], dtype=torch.float64)


def run_both(W0, tasks, steps, dtype=torch.float64, **kw):
    """CoSOAdamW (exact SVD) and the reference over ``tasks`` × ``steps``, end_task between."""
    p = torch.nn.Parameter(W0.to(dtype).clone())
    opt = matrixopt.CoSOAdamW([p], svd="exact", **{**HYPER, **kw})
    ref = Reference(W0, **{**HYPER, **kw})
    for task in range(tasks):
        grad = grad_fn(task, tuple(W0.shape))
        for t in range(steps):
            p.grad = grad(ref.W, t).to(dtype)   # the reference's W: both see the same gradients
            opt.step()
            ref.step(grad(ref.W, t))
        opt.end_task()
        ref.end_task()
    return p, opt, ref


def protected(opt, p):
    s = opt.state[p]
    return s["history"][0, :, :int(s["history_count"][0])].double()


CASES = [dict(protect="gradients"), dict(protect="gradients", side="left", proj_type="reverse_std"),
         dict(protect="weights", weight_decay=0.1), dict(protect="both", side="left", weight_decay=0.1)]


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)], ids=["tall", "wide"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_matches_float64_reference(shape, case):
    """Three tasks of 6 steps (refreshes at 0, 4, 8, …; a task boundary mid-gap): weights and
    protected subspaces equal the reference's to 1e-9."""
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p, opt, ref = run_both(W0, tasks=3, steps=6, **case)
    assert ((p.detach() - ref.W).norm() / ref.W.norm()) < 1e-9
    H = protected(opt, p)
    assert H.shape == ref.H.shape and ref.H.shape[1] > 0
    assert (H @ H.T - ref.H @ ref.H.T).abs().max() < 1e-9      # the same subspace
    assert (H.T @ H - torch.eye(H.shape[1], dtype=torch.float64)).abs().max() < 1e-12


def test_history_merge_and_cap():
    """end_task adds the sketch's directions up to the energy threshold, orthonormal to what is
    there; at max_history it stops adding and warns once, naming the param."""
    W0 = torch.randn(12, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = torch.nn.Parameter(W0.clone())
    opt = matrixopt.CoSOAdamW([("w", p)], svd="exact", **{**HYPER, "max_history": 5, "history_energy": 0.7, "sketch_rank": 8})
    ref = Reference(W0, **{**HYPER, "max_history": 5, "history_energy": 0.7, "sketch_rank": 8})
    counts = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for task in range(4):
            for t in range(5):
                p.grad = grad_fn(task)(ref.W, t)
                opt.step()
                ref.step(grad_fn(task)(ref.W, t))
            opt.end_task()
            ref.end_task()
            counts.append(int(opt.state[p]["history_count"][0]))
            assert counts[-1] == ref.H.shape[1]
            assert (protected(opt, p) @ protected(opt, p).T - ref.H @ ref.H.T).abs().max() < 1e-9
            assert torch.equal(opt.state[p]["sketch"], torch.zeros_like(opt.state[p]["sketch"]))
    assert counts == sorted(counts) and counts[-1] == 5 and counts[0] < 5
    full = [w for w in caught if "is full" in str(w.message)]
    assert len(full) == 1 and "w" in str(full[0].message)
    # unused columns stay zero: the projection needs no mask
    assert torch.equal(opt.state[p]["history"][0, :, 5:], torch.zeros(8, 0, dtype=torch.float64))
    assert opt.state_bytes() >= opt.state[p]["history"].numel() * 8


@pytest.mark.parametrize("case", [dict(protect="gradients"), dict(protect="weights", side="left"),
                                  dict(protect="both", proj_type="reverse_std", weight_decay=0.1)],
                         ids=["gradients", "weights-left", "both-wd"])
def test_updates_are_orthogonal_to_history_fp32(case, monkeypatch):
    """fp32: every term added to W (the step and the weight decay), at refresh steps and right
    after a task boundary too, has ‖HᵀU‖ (left) or ‖U·H‖ (right) ≤ 1e-6‖U‖. The terms are
    caught where they are added (W itself would add its own fp32 rounding)."""
    W0 = torch.randn(12, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p = torch.nn.Parameter(W0.float())
    opt = matrixopt.CoSOAdamW([p], **{**HYPER, **case})
    side = case.get("side", "right")
    added, original = [], torch._foreach_add_

    def recording(targets, updates, **kwargs):
        if any(t is p or t.data_ptr() == p.data_ptr() for t in targets):
            added.extend(u.detach().clone() for u in updates)
        return original(targets, updates, **kwargs)

    monkeypatch.setattr(torch, "_foreach_add_", recording)
    worst, checked = 0.0, 0
    for task in range(3):
        for t in range(6):
            p.grad = grad_fn(task)(p.detach().double(), t).float()
            added.clear()
            opt.step()
            c = int(opt.state[p]["history_count"][0])
            if not c:
                continue
            H = opt.state[p]["history"][0, :, :c].double()   # beyond c: the task's sketch
            for U in added:
                U = U.reshape(12, 8).double()
                leak = H.T @ U if side == "left" else U @ H
                worst, checked = max(worst, (leak.norm() / U.norm()).item()), checked + 1
        opt.end_task()
    assert checked >= 12 and worst <= 1e-6, worst


def test_first_task_is_galore():
    """With protect="gradients" nothing is protected during the first task: GaLoreAdamW's run."""
    W0 = torch.randn(12, 8, generator=torch.Generator().manual_seed(3))
    a, b = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    galore_hyper = {k: v for k, v in HYPER.items() if k != "max_history"}
    coso, galore = matrixopt.CoSOAdamW([a], **HYPER), matrixopt.GaLoreAdamW([b], **galore_hyper)
    for t in range(9):
        a.grad = b.grad = grad_fn(0)(W0.double(), t).float()
        coso.step()
        galore.step()
    assert torch.allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("protect_fallback", [True, False])
def test_fallback_keeps_the_entries_earlier_tasks_used(protect_fallback):
    """A gain and an embedding on the fallback against torch.optim.AdamW: the first task is
    AdamW's; after end_task the entries it gave gradients to (the gain, the embedding rows of
    tokens 0-2) stay bit for bit, the others (rows 3-5, never seen) follow AdamW's run of the
    second task; with protect_fallback=False everything follows AdamW."""
    gen = torch.Generator().manual_seed(6)
    g0, e0 = torch.randn(4, generator=gen), torch.randn(6, 4, generator=gen)
    ours = [torch.nn.Parameter(g0.clone()), torch.nn.Parameter(e0.clone())]
    theirs = [torch.nn.Parameter(g0.clone()), torch.nn.Parameter(e0.clone())]
    kw = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt = matrixopt.CoSOAdamW([{"params": ours, "matrix": False}], protect_fallback=protect_fallback, **kw)
    ref = torch.optim.AdamW(theirs, **kw)
    for task, rows in enumerate((slice(0, 3), slice(3, 6))):
        if task == 1:
            kept = [p.detach().clone() for p in ours]
        for t in range(4):
            gg = torch.randn(4, generator=gen)
            ge = torch.zeros(6, 4)
            ge[rows] = torch.randn(3, 4, generator=gen)
            for params, o in ((ours, opt), (theirs, ref)):
                params[0].grad, params[1].grad = gg.clone(), ge.clone()
                o.step()
        if task == 0:
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        opt.end_task()
    if protect_fallback:
        assert torch.equal(ours[0], kept[0]) and torch.equal(ours[1][:3], kept[1][:3])
        torch.testing.assert_close(ours[1][3:], theirs[1][3:], rtol=1e-6, atol=1e-7)
        assert opt.state[ours[1]]["protected"].all()   # rows 3-5 joined at the second end_task
    else:
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_state_round_trip_is_bit_identical(tmp_path):
    """save → torch.load(weights_only=True) → load → continue (steps, end_task, steps)
    equals the uninterrupted run bit for bit, history included."""
    W0 = torch.randn(12, 8, generator=torch.Generator().manual_seed(4))
    E0 = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(5))

    def make(w, e):
        return matrixopt.CoSOAdamW([w, e], **{**HYPER, "protect": "both", "weight_decay": 0.1})

    def steps(w, e, opt, task, ts):
        for t in ts:
            w.grad = grad_fn(task)(w.detach().double(), t).float()
            e.grad = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(t + 10 * task))
            opt.step()

    w, e = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(E0.clone())
    opt = make(w, e)
    steps(w, e, opt, 0, range(5))
    opt.end_task()
    steps(w, e, opt, 1, range(2))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    w2, e2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(e.detach().clone())
    for o, ww, ee in ((opt, w, e), (None, w2, e2)):
        if o is None:
            o = make(ww, ee)
            o.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
        steps(ww, ee, o, 1, range(2, 6))
        o.end_task()
        steps(ww, ee, o, 2, range(3))
        if ww is w2:
            resumed = o
    assert torch.equal(w, w2) and torch.equal(e, e2)
    for p, q in ((w, w2), (e, e2)):
        for key, value in opt.state[p].items():
            other = resumed.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    assert int(opt.state[w]["history_count"].sum()) > 0


def test_shape_check_names_param():
    """The history has a fixed declared shape: a checkpoint for another max_history is refused."""
    p = torch.nn.Parameter(torch.randn(12, 8))
    opt = matrixopt.CoSOAdamW([("w", p)], **HYPER)
    p.grad = torch.randn(12, 8)
    opt.step()
    other = matrixopt.CoSOAdamW([("w", torch.nn.Parameter(p.detach().clone()))], **{**HYPER, "max_history": 2})
    with pytest.raises(ValueError, match="w.*history"):
        other.load_state_dict(copy.deepcopy(opt.state_dict()))


# -- distributed -----------------------------------------------------------------------------

def _dist_worker(rank):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dist_utils import NanOnce, assert_params_close, batches, full_params, model, sharded, train

    data = batches(6)
    # The exact SVD: a warm-started randomized refresh of these flat random-token spectra is
    # far from converged, so the last-bit roundings that differ between a rank's shard of the
    # moments and the whole (torch's fused Adam kernel rounds a tensor's scalar tail apart
    # from its vectorized body) move its subspace by 10-30% within six steps.
    # A NaN in one param's gradient at the first step (on rank 1 only, distributed) puts it a
    # step behind its bucket-mate: their refreshes and sketch truncations fall due apart.
    kwargs = dict(lr=0.02, rank=4, update_proj_gap=2, protect="both", weight_decay=0.1, svd="exact", sketch_gap=2)

    def run(net, opt, trained, nan_rank=1):
        train(trained, NanOnce(opt, net.blocks[0].up.weight, nan_rank), data[:3])
        opt.end_task()
        train(trained, opt, data[3:])
        assert opt.nonfinite_skips == 1
        return net, opt

    net = model()
    ref_opt = matrixopt.CoSOAdamW(matrixopt.param_groups(net), **kwargs)
    run(net, ref_opt, net, nan_rank=None)
    want = full_params(net)
    histories = {n: ref_opt.state[p]["history"] for n, p in net.named_parameters() if "history" in ref_opt.state[p]}
    assert sum(int(ref_opt.state[p]["history_count"].sum()) for p in net.parameters() if "history" in ref_opt.state[p])

    ddp = DistributedDataParallel(model())
    opt = matrixopt.CoSOAdamW(matrixopt.param_groups(ddp.module), distributed="replicated", **kwargs)
    run(ddp.module, opt, ddp)
    assert_params_close(full_params(ddp.module), want)

    fsdp = sharded(model())
    opt = matrixopt.CoSOAdamW(matrixopt.param_groups(fsdp), **kwargs)
    run(fsdp, opt, fsdp)
    assert_params_close(full_params(fsdp), want)
    for n, p in fsdp.named_parameters():
        if n in histories:
            got = opt.state[p]["history"]
            assert (got.double() @ got.double().mT - histories[n].double() @ histories[n].double().mT).abs().max() < 1e-4, n
    dist.barrier()


@pytest.mark.distributed
def test_ddp_and_fsdp2_match_single_process():
    """2 gloo ranks, a task boundary mid-run, protect="both" with weight decay, one skipped
    step: DDP (distributed="replicated") and FSDP2 (uneven and empty shards, 3-D experts, 1-row
    gate) end at the single-process params, with the same protected subspaces."""
    from dist_utils import spawn

    spawn(_dist_worker)
