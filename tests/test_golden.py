"""Refactors keep behaviour bit for bit: every optimizer × its main configurations, single
process and 2-rank DDP/FSDP2, ends where the recorded trajectories (tests/data/golden.pt)
ended — weights and state dicts equal to the last bit, state dtypes included.

Regenerate only for an intended change of behaviour: ``python tests/golden.py``.
"""
import pytest
import torch

import golden

RECORDED = torch.load(golden.PATH, weights_only=True)


def _assert_same(got: dict, want: dict, case: str):
    assert got.keys() == want.keys(), f"{case}: keys differ: {sorted(got.keys() ^ want.keys())}"
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype, f"{case}: {key} is {got[key].dtype}, was {value.dtype}"
            assert torch.equal(got[key], value), (
                f"{case}: {key} differs by up to {(got[key].double() - value.double()).abs().max():.3g}")
        else:
            assert got[key] == value, f"{case}: {key} is {got[key]!r}, was {value!r}"


@pytest.mark.parametrize("case", sorted(golden.CASES))
def test_single_process_trajectory_is_unchanged(case):
    _assert_same(golden.run_case(case), RECORDED["single"][case], case)


@pytest.mark.distributed
def test_distributed_trajectories_are_unchanged():
    got = golden.run_distributed()
    assert got.keys() == RECORDED["distributed"].keys()
    for run, record in RECORDED["distributed"].items():
        _assert_same(got[run], record, run)


def test_golden_file_covers_every_optimizer():
    import matrixopt

    recorded = {golden.CASES[case][0] for case in RECORDED["single"]}
    exported = {name for name in matrixopt.__all__ if isinstance(getattr(matrixopt, name), type)
                and issubclass(getattr(matrixopt, name), torch.optim.Optimizer)
                and name not in ("MatrixOptimizer", "LowRankAdamW")}
    assert exported <= recorded
