"""A training step on fake tensors: matrixopt's host-read seam (``matrixopt.kernels.host``),
``state_bytes()`` and the non-finite check under FakeTensorMode and for real, and
``python -m benchmarks memory --simulate`` against the real CPU measurement."""
import inspect
import json
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import matrixopt
from benchmarks import __main__ as cli
from benchmarks import simulate
from benchmarks.common import cpu_peak_bytes
from benchmarks.memory import ADAMW, CONFIGS, Row, build_model, make_optimizer, random_tokens
from benchmarks.optimizers import Settings, matrixopt_classes
from matrixopt.execute import total
from matrixopt.kernels import host

pytestmark = pytest.mark.usefixtures("no_network", "keep_threads")

OPTIMIZERS = list(matrixopt_classes())
MB = 2**20


def steps(name, precision, in_backward=False, n=2):
    """``n`` training steps of the ci model (rank 2, a refresh every step); the optimizer."""
    shape = CONFIGS["ci"]
    model = build_model(shape, 8, "cpu")
    opt = make_optimizer(Row(name, precision, in_backward), model, Settings(rank_fraction=2, update_proj_gap=1))
    if in_backward:
        matrixopt.step_in_backward(opt)
    tokens = random_tokens(shape, 2, 8, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n):
            model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
            if not in_backward:
                opt.step()
                opt.zero_grad()
    return opt


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps_under_fake_tensors_and_counts_its_state_as_for_real(name, precision):
    """Refresh steps included, no host read fails; state_bytes() counts each fake storage as
    the real run's (a fake tensor's data_ptr() is 0 for all of them)."""
    real = steps(name, precision).state_bytes()
    with FakeTensorMode(allow_non_fake_inputs=True):
        opt = steps(name, precision)
        fake = opt.state_bytes()
        assert all(host.read(t, bool, "fake") == "fake" for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))
    stored = sum(t.numel() * t.element_size() for s in steps(name, precision).state.values()
                 for t in s.values() if isinstance(t, torch.Tensor))   # every state tensor has its own storage
    basis = 64 * 64 * 4 if name == "matrixopt.DCTAdamW" else 0     # DCTAdamW's one shared basis (k = 64)
    assert fake == real == stored + basis


def test_a_step_in_backward_runs_under_fake_tensors():
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert steps("matrixopt.GaLoreAdamW", "int8", in_backward=True).state_bytes() > 0


def test_the_seam_reads_real_tensors_as_before_and_answers_fake_ones_with_the_given_value():
    flags = torch.tensor([True, False])
    assert host.read(flags, torch.Tensor.tolist, "fake") == [True, False]
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert host.read(torch.ones(2), torch.Tensor.tolist, "fake") == "fake"
        assert host.read(flags, torch.Tensor.tolist, "fake") == [True, False]   # a real table, read for real
    a = torch.zeros(4)
    assert host.storage_id(a) == host.storage_id(a[1:]) != host.storage_id(torch.zeros(4))


def test_a_cache_of_tensors_keeps_real_and_each_fake_modes_entries_apart():
    made = []

    @host.cached
    def table(n):
        made.append(n)
        return torch.arange(n)

    real = table(3)
    with FakeTensorMode() as mode:
        fake = table(3)
        assert table(3) is fake and fake.fake_mode is mode
    assert table(3) is real and real.tolist() == [0, 1, 2] and made == [3, 3]


def nonfinite_raises(grad: torch.Tensor) -> bool:
    p = torch.nn.Parameter(torch.zeros(grad.shape, dtype=grad.dtype))
    p.grad = grad
    try:
        matrixopt.Muon([p], lr=0.01, nonfinite="raise").step()
    except FloatingPointError:
        return True
    return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_nonfinite_check_catches_nan_and_inf_in_every_dtype(dtype, bad):
    grad = torch.randn(64, 48).to(dtype)
    assert not nonfinite_raises(grad.clone())
    grad[17, 5] = bad
    assert nonfinite_raises(grad)


def test_a_gradient_summing_past_fp32s_range_in_aggregate_is_non_finite_in_fp32_and_bf16_not_fp16():
    """The check's semantics (matrixopt.execute.total): Σt non-finite in fp32. Finite bf16
    entries of 3e37 (one 2048×1 block) sum to 6e40 > 3.4e38: treated as non-finite, as the same
    fp32 gradient is. fp16 entries of 60000 sum past fp16's range but never past fp32's: finite."""
    for dtype, value in ((torch.float32, 3e37), (torch.bfloat16, 3e37)):
        grad = torch.full((64, 32), value, dtype=dtype)
        assert grad.isfinite().all() and not grad.double().sum().float().isfinite()   # the reference
        assert nonfinite_raises(grad)
    grad = torch.full((64, 32), 60000.0, dtype=torch.float16)
    assert not grad.sum().isfinite() and grad.double().sum().float().isfinite()
    assert not nonfinite_raises(grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_nonfinite_check_makes_no_copy_of_the_tensor(dtype):
    """``t.sum(dtype=torch.float32)`` of a bf16 t allocates an fp32 copy (4 MiB here) that an
    op-level tracker cannot see; the check's reduction allocates a few bytes."""
    t = torch.randn(1 << 20).to(dtype)
    assert cpu_peak_bytes(lambda: total(t)) < 1024
    if dtype == torch.bfloat16:
        assert cpu_peak_bytes(lambda: t.sum(dtype=torch.float32)) >= 4 * MB   # the copy it replaced


def test_live_bytes_counts_fake_allocations_and_frees():
    with FakeTensorMode(), simulate.LiveBytes() as meter:
        a = torch.empty(MB // 4)          # 1 MiB
        with meter.span("b"):
            b = torch.empty(MB // 2)      # 3 MiB live
            del a
            c = b[1:] * 1                 # a new storage of 2 MiB - 4 B: 4 MiB - 4 B live
        del b, c
    assert meter.peak == 4 * MB - 4 and meter.peaks["b"] == 4 * MB - 4 and meter.live == 0


@pytest.mark.parametrize("name, precision, in_backward, weights", [
    (ADAMW, "fp32", False, "fp32"),
    ("matrixopt.Muon", "int8", True, "bf16"),
    ("matrixopt.GaLoreAdamW", "int8", False, "fp32"),
    ("matrixopt.DCTAdamW", "bf16", True, "fp32"),
])
def test_the_simulated_peak_of_the_quick_config_is_the_real_one_within_5_percent(name, precision, in_backward,
                                                                                 weights):
    r = simulate.SimRow(Row(name, precision, in_backward), weights, "foreach" if name == ADAMW else None)
    row = simulate.simulate_row(r, "quick", simulate.Options(batch=1, seq_len=32, weights=weights, rank=16),
                                validate=True)
    assert row["sim_over_real"] == pytest.approx(1, abs=0.05), row


#: What the rows name the default by: no master_weights in the label.
DEFAULT_MASTER_WEIGHTS = inspect.signature(matrixopt.Muon).parameters["master_weights"].default


def test_memory_simulate_command_writes_its_table(tmp_path):
    paths = cli.main(["memory", "--simulate", "ci", "--seq-len", "8", "--threads", "1", "--precisions", "int8",
                      "--optimizers", ADAMW, "matrixopt.Muon", "--checkpoint", "--out", str(tmp_path)])
    result = json.loads(paths["json"].read_text())
    rows, _ = result["sections"].values()
    assert "memory-simulate-ci" in paths["md"].name and result["settings"]["checkpoint"]
    assert [r["optimizer"] for r in rows] == [
        f"{ADAMW} fused", f"{ADAMW} foreach", f"{ADAMW} fused", f"{ADAMW} foreach",
        f"{ADAMW} + step in backward (torch's recipe) fused",
        *[f"matrixopt.Muon int8{backward}{lean}" for backward in ("", " + step_in_backward")
          for lean in ("", *(f" master_weights={mode}" for mode in ("nearest", "stochastic", "int8", "int16")
                             if mode != DEFAULT_MASTER_WEIGHTS))]]
    assert all(r["validated"] == "no, GPU pending" and r["peak_GiB"] > 0 for r in rows)
