"""What matrixopt's refreshes and steps cost, counted with the benchmarks' instruments: the
launches and host syncs of a low-rank refresh (benchmarks.lowrank's launch counter), the passes
over memory of a low-rank step (benchmarks.passes), and the temporaries of a step
(benchmarks.common's CPU peak meter). Library properties, kept apart from the library's own
test files, which do not import benchmarks/."""
import pytest
import torch

import matrixopt
from matrixopt.kernels import lowrank_svd
from helpers import power_law
from benchmarks import passes
from benchmarks.common import cpu_peak_bytes
from benchmarks.lowrank import launch_counts

pytestmark = pytest.mark.usefixtures("no_network", "keep_threads")


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_a_refresh_syncs_once_and_runs_two_cholesky_qr_rounds_only_where_needed(iters):
    """Fast path: one round per intermediate basis, two for the returned ones, one host sync of ours."""
    G = power_law(2, 40, 70, seed=12).float()
    init = torch.linalg.svd(G)[0][..., :8]
    counts = launch_counts(lambda: lowrank_svd(G, 8, init=init, iters=iters))
    eigh_syncs = launch_counts(lambda: torch.linalg.eigh(torch.eye(16).expand(2, 16, 16)))["host syncs"]
    rounds = 1 + 2 * (iters - 1) + 2 + 2  # sketch, intermediate pairs, last right basis, Rayleigh-Ritz
    assert counts == {"cholesky": rounds, "solve_triangular": rounds, "eigh": 1, "qr": 0, "svd": 0,
                      "host syncs": 1 + eigh_syncs}


@pytest.mark.parametrize("name", ["GaLoreAdamW", "DCTAdamW"])
def test_a_low_rank_step_reads_each_gradient_once_and_writes_each_weight_once(name):
    """The bandwidth model of the low-rank rules, counted from the dispatched ops of a plain
    step: G read once (the projection), W read and written once (the matmul into it), each
    moment read and written once (the fused Adam kernel); the basis is read by the two
    projections."""
    (rows,) = passes.run([name]).values()
    counts = {r["tensor"]: (r["reads"], r["writes"]) for r in rows}
    assert counts["w: G"] == (1, 0) and counts["w: W"] == (1, 1)
    assert counts["w: exp_avg"] == counts["w: exp_avg_sq"] == (1, 1)
    basis = "w: proj_right" if name == "GaLoreAdamW" else "w: indices"
    assert counts[basis] == (2, 0)
    # The tracer sees what it should: Muon reads G in the check, the momentum and the Nesterov input.
    (muon,) = passes.run(["Muon"]).values()
    assert {r["tensor"]: r["reads"] for r in muon}["w: G"] == 3


def test_galore_step_temporaries_are_bounded_by_the_bucket_cap():
    """A step stacks (copies) gradients and back-projected steps bucket by bucket, so its
    temporaries stay within a few buckets of max_bucket_elements (one 2048² matrix), not the
    size of all same-shape params (they were 1.9× the params with 2^26-element buckets)."""
    params = [torch.nn.Parameter(torch.randn(2048, 1024) * 0.02) for _ in range(6)]
    for p in params:
        p.grad = torch.randn(p.shape) * 1e-3
    opt = matrixopt.GaLoreAdamW(params, rank=256, update_proj_gap=100)
    opt.step()  # the refresh
    bucket_bytes = 4 * matrixopt.GaLoreAdamW.max_bucket_elements
    assert bucket_bytes < 6 * 2048 * 1024 * 4 / 2  # several buckets
    assert cpu_peak_bytes(opt.step) < 2 * bucket_bytes


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_bf16_step_temporaries_stay_small(nesterov):
    """A bf16-NS step stacks its inputs in bf16 and adds the bf16 update to the weights
    without an fp32 copy: its allocations peak at 2.9× the bucket's fp32 size (3.75× without
    Nesterov, 4.75× with it, when the stack and the update went through fp32)."""
    params = [torch.nn.Parameter(torch.randn(96, 128)) for _ in range(8)]
    opt = matrixopt.Muon(params, ns_dtype=torch.bfloat16, nesterov=nesterov)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()  # momentum buffers exist from here on
    bucket = sum(p.numel() for p in params) * 4
    assert cpu_peak_bytes(opt.step) < 3.5 * bucket
