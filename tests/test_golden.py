"""Refactors keep behaviour bit for bit: every optimizer × its main configurations, single
process and 2-rank DDP/FSDP2, ends where the recorded trajectories (tests/data/golden.json)
ended — weights and state dicts equal to the last bit, state dtypes included.

Regenerate only for an intended change of behaviour: ``python tests/golden.py --write``.
"""
import math

import pytest
import torch

import golden

RECORDED = golden.load()


def _assert_same(got: dict, want: dict, run: str):
    lines = golden.differences(got, want, run)
    assert not lines, "\n".join([*lines, f"(recorded with torch {RECORDED['torch']}, running {torch.__version__})"])


@pytest.mark.parametrize("case", sorted(golden.CASES))
def test_single_process_trajectory_is_unchanged(case):
    _assert_same(golden.run_case(case), RECORDED["single"][case], case)


@pytest.mark.distributed
def test_distributed_trajectories_are_unchanged():
    _assert_same(golden.run_distributed(), RECORDED["distributed"], "distributed")


def test_golden_file_covers_every_optimizer():
    import matrixopt

    recorded = {golden.CASES[case][0] for case in RECORDED["single"]}
    exported = {name for name in matrixopt.__all__ if isinstance(getattr(matrixopt, name), type)
                and issubclass(getattr(matrixopt, name), torch.optim.Optimizer)
                and name not in ("MatrixOptimizer", "LowRankAdamW")}
    assert exported <= recorded


def _last_bit_flipped(t: torch.Tensor, index) -> torch.Tensor:
    """``t`` with element ``index`` one ulp away (its lowest mantissa bit flipped)."""
    bits = t.clone().view({4: torch.int32, 2: torch.int16}[t.element_size()])
    bits[index] ^= 1
    return bits.view(t.dtype)


WEIGHT = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
RUN = {"param.w": WEIGHT, "state.0.exp_avg": WEIGHT.bfloat16(), "state.0.step": 25, "group.0.lr": 0.02}


@pytest.mark.parametrize("key, value", [
    ("param.w", _last_bit_flipped(WEIGHT, (2, 3))),
    ("state.0.exp_avg", _last_bit_flipped(WEIGHT.bfloat16(), (0, 5))),
    ("param.w", WEIGHT.reshape(6, 4)),                  # the same bytes, another shape
    ("param.w", WEIGHT.view(torch.int32)),              # the same bytes, another dtype
    ("state.0.step", 26),
    ("state.0.step", 25.0),
    ("state.0.step", torch.tensor(25)),
    ("group.0.lr", math.nextafter(0.02, 1.0)),
], ids=["ulp-fp32", "ulp-bf16", "shape", "dtype", "counter", "int-to-float", "int-to-tensor", "ulp-setting"])
def test_the_check_catches_any_change_of_one_entry(key, value):
    want = golden.summary(RUN)
    assert golden.differences(golden.summary(RUN), want, "run") == []
    (line,) = golden.differences(golden.summary({**RUN, key: value}), want, "run")
    assert line.startswith(f"run/{key}: was ")


def test_the_check_names_missing_and_new_entries_and_reads_a_view_as_its_contiguous_copy():
    want = golden.summary(RUN)
    got = golden.summary({**{k: v for k, v in RUN.items() if k != "state.0.step"}, "state.1.step": 25})
    assert golden.differences(got, want, "run") == ["run/state.0.step: missing", "run/state.1.step: new, not recorded"]
    assert golden.summary({"w": WEIGHT.t()}) == golden.summary({"w": WEIGHT.t().contiguous()})
