"""Distributed training: FSDP2 and replicated (DDP) runs equal the single-process run.

One pair of gloo processes (spawning costs seconds) checks every optimizer in turn (GaLoreAdamW
in two cases, see dist_utils.CASES): under
DDP with distributed="replicated" and under FSDP2 (fully_shard per block + root; rows that
split unevenly, an empty shard, 3-D experts) 5 steps end at the single-process params, with
the matrix work done once and split by FLOPs; a torch.distributed.checkpoint save → load →
continue equals the uninterrupted run; a NaN in one rank's gradient shard skips the param on
every rank; DTensor layouts whose pieces are not blocks are refused by name (2-D meshes:
tests/test_meshes.py). All of it again with
``state_precision="int8"`` for every optimizer (int8 codes and scales sharded like the param,
saved by DCP as DTensors), and with "bf16" for Muon and GaLoreAdamW (stochastic rounding
seeded by global position, so a shard rounds as the single process does, and the fallback's
update in chunks of rows rounds as one of the whole shard); and bf16 params with each
``master_weights`` option (random bits and low bits by global position, low bits sharded like
the param and saved by DCP).
"""
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.nn.parallel import DistributedDataParallel

import matrixopt
from dist_utils import (CASES, WORLD, CountingWork, NanOnce, NoCollectives, assert_params_close, batches,
                        full_params, gathered, make_optimizer, model, sharded, spawn, train)

CHECKED = [case for case, (name, _) in CASES.items() if name in matrixopt.__all__]
STEPS = 5


def _assert_shared(flops: list[int], total: int, largest: int):
    """The ranks together did the single-process work once, split within one matrix's FLOPs."""
    assert sum(flops) == total, (flops, total)
    assert max(flops) - min(flops) <= largest, flops


#: bf16 params stored with each master_weights option: (case, master_weights).
LEAN = [("Muon", "int16"), ("GaLoreAdamW", "stochastic"), ("DCTAdamW", "int8")]


def _worker(rank, checkpoint_dir):
    runs = [(case, {"state_precision": precision}) for precision in ("fp32", "int8") for case in CHECKED]
    runs += [(case, {"state_precision": "bf16"}) for case in ("Muon", "GaLoreAdamW")]
    runs += [(case, {"master_weights": mode, "dtype": torch.bfloat16}) for case, mode in LEAN]
    for case, kwargs in runs:
        label = "-".join(str(v) for v in kwargs.values())
        try:
            _check(case, rank, f"{checkpoint_dir}/{case}-{label}", **kwargs)
        except Exception as e:
            raise AssertionError(f"{case} with {kwargs} on rank {rank}: {e}") from e
    _check_process_group()


def _check_process_group():
    """process_group= alone asks for the replicated split, over that group."""
    data = batches(2)
    ref = model()
    ref_opt = make_optimizer("Muon", ref)
    ref_work = CountingWork(ref_opt)
    train(ref, ref_opt, data)
    net = model()   # same data on every rank: the grads are replicated without DDP
    opt = make_optimizer("Muon", net, process_group=dist.new_group(list(range(WORLD))))
    work = CountingWork(opt)
    train(net, opt, data)
    assert_params_close(full_params(net), full_params(ref))
    assert sum(gathered(work.flops)) == ref_work.flops > work.flops > 0


def _check(case, rank, checkpoint_dir, dtype=torch.float32, **kwargs):
    """Every check of one optimizer (``kwargs``: its extra arguments, e.g. state_precision;
    ``dtype``: the params').

    Every rank trains on the whole batch: FSDP's and DDP's averaged gradients then equal the
    single-process ones bit for bit, so the comparison sees only the optimizer (ARO amplifies
    gradient rounding of 1e-7 to 1e-2, so split batches could not test it).
    """
    data = batches(STEPS)
    # The sharded and replicated paths equal the single process to fp32 rounding (1e-7 after
    # 5 steps: matmuls over shards round differently), not bit for bit; int8 codes and bf16's
    # stochastic rounding turn such a difference into a code step (≤ 1.4%) or a bf16 step of
    # the few entries it flips, ~2e-4 of a param after 5 steps (bf16 weights: their rounding).
    rtol = _rtol(dtype, **kwargs)

    # The single-process reference, run with the process group up: it calls no collective.
    ref = model(dtype=dtype)
    ref_opt = make_optimizer(case, ref, **kwargs)
    ref_work = CountingWork(ref_opt)
    with NoCollectives():
        train(ref, ref_opt, data)
    want = full_params(ref)
    largest = max(p.shape[0] * p.shape[1] * min(p.shape[:2]) if p.ndim == 2 else 0
                  for p in ref.parameters())

    # DDP with replicated params: each rank computes its share, results all-gathered.
    ddp = DistributedDataParallel(model(dtype=dtype))
    opt = make_optimizer(case, ddp.module, distributed="replicated", **kwargs)
    work = CountingWork(opt)
    train(ddp, opt, data)
    assert_params_close(full_params(ddp.module), want, rtol)
    _assert_shared(gathered(work.flops), ref_work.flops, largest)

    # FSDP2: sharded params, owner-rank matrix work.
    net = sharded(model(dtype=dtype))
    opt = make_optimizer(case, net, **kwargs)
    work = CountingWork(opt)
    train(net, opt, data)
    # Sharded fallback moments round a few last bits apart from whole ones (torch's fused
    # AdamW kernel rounds each tensor's scalar tail apart from its vectorized body), which
    # ARO's rotation amplifies to ~3e-5 within these steps; the others stay within 1e-5 at fp32
    # (and within rtol, above, at a lower state_precision).
    assert_params_close(full_params(net), want, rtol=1e-3 if CASES[case][0] == "ARO" else rtol)
    _assert_shared(gathered(work.flops), ref_work.flops, largest)

    if kwargs.get("state_precision") == "bf16" or "master_weights" in kwargs:
        _check_fallback_chunks(case, data, net, opt, dtype, **kwargs)
    _check_nonfinite(case, rank, data, dtype, **kwargs)
    _check_checkpoint(case, data, checkpoint_dir, dtype, **kwargs)
    if kwargs.get("state_precision", "fp32") == "fp32" and dtype == torch.float32:   # layouts do not depend on it
        _check_layouts(case)


def _rtol(dtype, **kwargs) -> float:
    return 1e-5 if kwargs.get("state_precision", "fp32") == "fp32" and dtype == torch.float32 else 1e-3


def _check_fallback_chunks(case, data, net, opt, dtype, **kwargs):
    """The sharded fallback params (embedding, head) updated in chunks of a few rows, each
    chunk's stochastic rounding offset by its shard's and its own first row: every local
    param and state bit-identical to the run updating each shard whole (``net``, ``opt``)."""
    chunked = sharded(model(dtype=dtype))
    chunked_opt = make_optimizer(case, chunked, **kwargs)
    chunked_opt.fallback_chunk_elements = 1
    train(chunked, chunked_opt, data)
    for p, q in zip(net.parameters(), chunked.parameters()):
        assert torch.equal(p.to_local(), q.to_local())
        for key, value in opt.state[p].items():
            other = chunked_opt.state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


def _check_nonfinite(case, rank, data, dtype, **kwargs):
    """A NaN in one rank's shard of a gradient skips that param on every rank, and the run goes
    on with it a step behind its bucket-mates (its refreshes due apart from theirs: work for a
    subset of a bucket) to the single-process run with the same skip, under DDP and FSDP2."""
    ref = model(dtype=dtype)
    ref_opt = make_optimizer(case, ref, **kwargs)
    with NoCollectives():
        train(ref, NanOnce(ref_opt, ref.blocks[0].up.weight), data)
    assert ref_opt.nonfinite_skips == 1
    want = full_params(ref)

    net = sharded(model(dtype=dtype))
    opt = make_optimizer(case, net, **kwargs)
    before = full_params(net)
    train(net, NanOnce(opt, net.blocks[0].up.weight, rank=1), data[:1])
    after = full_params(net)
    assert opt.nonfinite_skips == 1
    assert torch.equal(after["blocks.0.up.weight"], before["blocks.0.up.weight"])
    assert not torch.equal(after["blocks.0.down.weight"], before["blocks.0.down.weight"])
    train(net, opt, data[1:])
    rtol = _rtol(dtype, **kwargs)
    assert_params_close(full_params(net), want, rtol=1e-3 if CASES[case][0] == "ARO" else rtol)

    ddp = DistributedDataParallel(model(dtype=dtype))
    opt = make_optimizer(case, ddp.module, distributed="replicated", **kwargs)
    train(ddp, NanOnce(opt, ddp.module.blocks[0].up.weight, rank=1), data)
    assert opt.nonfinite_skips == 1
    assert_params_close(full_params(ddp.module), want, rtol)


def _check_checkpoint(case, data, checkpoint_dir, dtype, **kwargs):
    """Distributed checkpoint after 3 steps, resumed in a fresh model and optimizer."""
    net = sharded(model(dtype=dtype))
    opt = make_optimizer(case, net, **kwargs)
    train(net, opt, data[:3])
    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)
    train(net, opt, data[3:])
    uninterrupted = full_params(net)

    resumed = sharded(model(seed=1, dtype=dtype))
    opt = make_optimizer(case, resumed, **kwargs)
    model_sd, optim_sd = get_state_dict(resumed, opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=checkpoint_dir)
    set_state_dict(resumed, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train(resumed, opt, data[3:])
    got = full_params(resumed)
    for n, p in uninterrupted.items():
        assert torch.equal(got[n], p), n


def _check_layouts(case):
    """Placements whose pieces are not blocks of the param, partial sums, and a column split
    under int8 state are refused, naming the param and the placement."""
    cls = getattr(matrixopt, CASES[case][0])
    mesh = init_device_mesh("cpu", (WORLD,))
    column = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    cls([("tp.weight", column)])   # fp32 state: any placement
    with pytest.raises(ValueError, match=r"tp\.weight .*Shard\(dim=1\).*state_precision"):
        cls([("tp.weight", column)], state_precision="int8")
    partial = torch.nn.Parameter(DTensor.from_local(torch.randn(4, 6), mesh, [Partial()]))
    with pytest.raises(ValueError, match=r"sum\.weight .*Partial"):
        cls([("sum.weight", partial)])
    mesh_2d = init_device_mesh("cpu", (1, WORLD))
    strided = DTensor.from_local(torch.randn(2, 6), mesh_2d, [Shard(0), _StridedShard(0, split_factor=2)],
                                 shape=(4, 6), stride=(6, 1))
    with pytest.raises(ValueError, match=r"strided\.weight.*not contiguous blocks"):
        cls([("strided.weight", torch.nn.Parameter(strided))])


def test_fsdp_ddp_and_checkpoint_match_single_process(tmp_path):
    spawn(_worker, str(tmp_path))


def test_replicated_needs_a_process_group():
    net = model()
    opt = matrixopt.Muon(net.parameters(), distributed="replicated")
    next(net.parameters()).grad = torch.ones_like(next(net.parameters()))
    with pytest.raises(RuntimeError, match="initialized process group"):
        opt.step()


def test_distributed_argument_is_validated():
    with pytest.raises(ValueError, match="distributed"):
        matrixopt.Muon(model().parameters(), distributed="fsdp")
