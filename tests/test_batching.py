"""matrixopt.batching: the measured stack-or-not limit, its caches, pins and agreement."""
import json

import pytest
import torch

from matrixopt import batching
from matrixopt.batching import LOWRANK, NO_LIMIT, ORTHOGONALIZE

from dist_utils import spawn

CPU = torch.device("cpu")


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Measurement on (tests/conftest.py pins the limits), an empty process cache, the
    persisted file in tmp_path, and a fake ``measure`` that counts its calls."""
    monkeypatch.delenv(batching.ENV_LIMITS, raising=False)
    path = tmp_path / "limits.json"
    monkeypatch.setenv(batching.ENV_CACHE, str(path))
    monkeypatch.setattr(batching, "_measured", {})
    calls = []

    def fake(kind, device, dtype):
        calls.append((kind, device.type, dtype))
        return 4096
    monkeypatch.setattr(batching, "measure", fake)
    return path, calls


def fake_rungs(monkeypatch, times):
    """``_rung`` answering (stacked, alone) seconds from ``times`` by side; returns the sides
    it was asked for."""
    asked = []

    def rung(kind, side, *, device, dtype):
        asked.append(side)
        return times[side]
    monkeypatch.setattr(batching, "_rung", rung)
    return asked


# -- the decision ---------------------------------------------------------------------------------

def test_the_crossover_is_the_first_of_two_rungs_where_alone_is_not_slower(monkeypatch):
    asked = fake_rungs(monkeypatch, {32: (1e-4, 3e-4), 64: (2e-4, 3e-4), 128: (1e-3, 9e-4), 256: (8e-3, 8e-3),
                                     512: (1.0, 9.0)})
    assert batching.measure(ORTHOGONALIZE, CPU, torch.float32) == 128 * 128
    assert asked == [32, 64, 128, 256]   # confirmed at 256: 512 is not timed


def test_a_lone_rung_where_alone_won_by_chance_is_not_the_crossover(monkeypatch):
    asked = fake_rungs(monkeypatch, {32: (1e-4, 0.9e-4), 64: (2e-4, 3e-4), 128: (1e-3, 1e-3), 256: (8e-3, 7e-3)})
    assert batching.measure(LOWRANK, CPU, torch.float32) == 128 * 128
    assert asked == [32, 64, 128, 256]


def test_alone_within_the_tolerance_counts_as_not_slower(monkeypatch):
    tie = 1 + batching.TOLERANCE
    fake_rungs(monkeypatch, {32: (1e-4, 1e-4 * tie), 64: (1e-4, 1e-4 * tie)})
    assert batching.measure(LOWRANK, CPU, torch.float32) == 32 * 32
    fake_rungs(monkeypatch, {32: (1e-4, 1e-4 * tie * 1.001), 64: (1e-4, 1e-4 * tie), 128: (1e-4, 1e-4)})
    assert batching.measure(LOWRANK, CPU, torch.float32) == 64 * 64


def test_where_stacking_pays_at_every_rung_the_next_size_runs_alone(monkeypatch):
    asked = fake_rungs(monkeypatch, {side: (1e-6, 2e-6) for side in batching.SIDES})
    assert batching.measure(ORTHOGONALIZE, CPU, torch.float32) == (2 * batching.SIDES[-1]) ** 2
    assert asked == list(batching.SIDES)


def test_the_climb_stops_before_a_rung_past_the_time_budget(monkeypatch):
    # Work ∝ side³: after 64, the 128 rung's MIN_TRIES · 3·(8 + 16) ms is past the 0.3 s.
    asked = fake_rungs(monkeypatch, {s: (1e-3 * (s / 32) ** 3, 2e-3 * (s / 32) ** 3) for s in batching.SIDES})
    assert batching.measure(ORTHOGONALIZE, CPU, torch.float32) == 128 * 128
    assert asked == [32, 64]
    # Alone at the last affordable rung, unconfirmed: from there.
    asked = fake_rungs(monkeypatch, {32: (1e-3, 2e-3), 64: (2e-2, 1e-2)})
    assert batching.measure(ORTHOGONALIZE, CPU, torch.float32) == 64 * 64
    assert asked == [32, 64]


def test_the_climb_stops_when_the_clock_says_the_budget_is_spent(monkeypatch):
    """Stalls (a busy CPU) that the fastest tries do not show still count."""
    clock = iter([0.0, 0.1, 0.2, 0.31])   # begin, then after each rung
    monkeypatch.setattr(batching, "perf_counter", lambda: next(clock))
    asked = fake_rungs(monkeypatch, {side: (1e-6, 2e-6) for side in batching.SIDES})
    assert batching.measure(ORTHOGONALIZE, CPU, torch.float32) == 256 * 256
    assert asked == [32, 64, 128]


@pytest.mark.parametrize("kind", [ORTHOGONALIZE, LOWRANK])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_real_measurement_on_a_tiny_ladder_gives_one_of_its_sizes(monkeypatch, kind, dtype):
    monkeypatch.setattr(batching, "SIDES", (4, 8, 16))
    state = torch.random.get_rng_state()
    assert batching.measure(kind, CPU, dtype) in {16, 64, 256, 1024}
    assert torch.equal(torch.random.get_rng_state(), state)   # the global generator is not drawn from


# -- caches ---------------------------------------------------------------------------------------

def test_a_limit_is_measured_once_per_process_and_key(measured, monkeypatch):
    path, calls = measured
    assert batching.stack_limit(ORTHOGONALIZE, CPU, torch.float32) == 4096
    assert batching.stack_limit(ORTHOGONALIZE, CPU, torch.float32) == 4096
    assert len(calls) == 1
    batching.stack_limit(LOWRANK, CPU, torch.float32)
    batching.stack_limit(ORTHOGONALIZE, CPU, torch.bfloat16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    batching.stack_limit(ORTHOGONALIZE, CPU, torch.float32)
    assert len(calls) == 4
    keys = json.loads(path.read_text())["limits"]
    assert len(keys) == 4 and any("threads=97" in k and k.startswith("orthogonalize|cpu|float32|") for k in keys)


def test_a_later_process_reads_the_persisted_limit(measured, monkeypatch):
    path, calls = measured
    batching.stack_limit(LOWRANK, CPU, torch.float32)
    monkeypatch.setattr(batching, "_measured", {})   # a new process
    monkeypatch.setattr(batching, "measure", lambda *a: pytest.fail("measured again"))
    assert batching.stack_limit(LOWRANK, CPU, torch.float32) == 4096
    assert json.loads(path.read_text())["format"] == batching.FORMAT


@pytest.mark.parametrize("content", [b"{not json", b'["a list"]', b'{"format": 0, "limits": {}}', b"\xff"])
def test_a_corrupt_or_older_file_is_ignored_and_replaced(measured, content):
    path, calls = measured
    path.write_bytes(content)
    assert batching.stack_limit(ORTHOGONALIZE, CPU, torch.float32) == 4096
    assert len(calls) == 1
    assert list(json.loads(path.read_text())["limits"].values()) == [4096]


def test_a_malformed_entry_is_measured_again(measured):
    path, calls = measured
    key = batching._key(ORTHOGONALIZE, CPU, torch.float32)
    path.write_text(json.dumps({"format": batching.FORMAT, "limits": {key: "64", "other": 7}}))
    assert batching.stack_limit(ORTHOGONALIZE, CPU, torch.float32) == 4096 and len(calls) == 1
    assert json.loads(path.read_text())["limits"] == {key: 4096, "other": 7}


def test_a_cache_that_cannot_be_written_does_not_fail(measured, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(batching.ENV_CACHE, str(tmp_path / "file" / "limits.json"))   # its folder is a file
    assert batching.stack_limit(ORTHOGONALIZE, CPU, torch.float32) == 4096


def test_the_default_path_and_persistence_off(measured, monkeypatch, tmp_path):
    monkeypatch.delenv(batching.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    batching.stack_limit(ORTHOGONALIZE, CPU, torch.float32)
    assert (tmp_path / "xdg" / "matrixopt" / "stack_limits.json").is_file()
    monkeypatch.setenv(batching.ENV_CACHE, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
    batching.stack_limit(LOWRANK, CPU, torch.float32)
    assert not (tmp_path / "other").exists()


# -- pins -----------------------------------------------------------------------------------------

def test_the_test_suite_runs_on_the_default_limits():
    """tests/conftest.py pins them: bucketing (and so rounding) is the same on every machine."""
    assert batching.stack_limit(ORTHOGONALIZE, CPU, torch.float32) == 1 << 18
    assert batching.stack_limit(LOWRANK, CPU, torch.bfloat16) == 1 << 14


def test_the_env_pins_the_limits(measured, monkeypatch):
    _, calls = measured
    monkeypatch.setenv(batching.ENV_LIMITS, "default")
    assert batching.stack_limit(ORTHOGONALIZE, CPU, torch.float32) == 1 << 18
    assert batching.stack_limit(LOWRANK, torch.device("cuda", 1), torch.bfloat16) == NO_LIMIT
    monkeypatch.setenv(batching.ENV_LIMITS, " orthogonalize:cpu=65536, lowrank:cuda=1024 ")
    assert batching.stack_limit(ORTHOGONALIZE, CPU, torch.float32) == 65536
    assert batching.stack_limit(LOWRANK, CPU, torch.float32) == 1 << 14
    assert batching.stack_limit(LOWRANK, torch.device("cuda"), torch.float32) == 1024
    assert calls == []
    for bad in ("orthogonalize=1", "newton:cpu=1", "lowrank:cpu=-1", "lowrank:=5"):
        monkeypatch.setenv(batching.ENV_LIMITS, bad)
        with pytest.raises(ValueError, match="MATRIXOPT_STACK_LIMITS"):
            batching.stack_limit(LOWRANK, CPU, torch.float32)


def test_a_fixed_table_wins(measured, monkeypatch):
    _, calls = measured
    assert batching.stack_limit(LOWRANK, CPU, torch.float32, table={"cpu": 123}) == 123
    assert batching.stack_limit(LOWRANK, CPU, torch.float32, table={"cuda": 123}) == NO_LIMIT
    monkeypatch.setenv(batching.ENV_LIMITS, "lowrank:cpu=7")
    assert batching.stack_limit(LOWRANK, CPU, torch.float32, table={"cpu": 123}) == 123
    assert calls == []


def test_devices_other_than_cpu_and_cuda_are_not_measured(measured):
    _, calls = measured
    assert batching.stack_limit(ORTHOGONALIZE, torch.device("meta"), torch.float32) == NO_LIMIT
    assert calls == []
    with pytest.raises(ValueError, match="kind"):
        batching.stack_limit("newton", CPU, torch.float32)


# -- distributed ----------------------------------------------------------------------------------

def _agree_worker(rank: int):
    import torch.distributed as dist

    assert batching.agree([1 << 14, 1 << 12][rank], dist.group.WORLD) == 1 << 12
    assert batching.agree(NO_LIMIT, None) == NO_LIMIT   # None: the default group; "no limit" fits an int64


def test_every_rank_gets_the_smallest_limit():
    spawn(_agree_worker)


# -- the planner ----------------------------------------------------------------------------------

def bucket_sizes(opt, params):
    return [len(b) for b in opt._planner.buckets(opt.param_groups[0], params, opt._limits())]


def square_params(side: int, count: int = 3):
    return [torch.nn.Parameter(torch.randn(side, side)) for _ in range(count)]


@pytest.mark.parametrize("cls, kind", [("Muon", ORTHOGONALIZE), ("GaLoreAdamW", LOWRANK)])
def test_the_planner_stacks_below_the_limit_of_the_rules_kind_of_work(measured, monkeypatch, cls, kind):
    """Unpinned, an optimizer's buckets follow the limit measured for its kind of work: with
    4096 measured, 32² matrices share a stack and 64² ones run alone; the measurement is
    asked once per optimizer and key, for the rule's kind."""
    import matrixopt

    _, calls = measured
    small, large = square_params(32), square_params(64)
    opt = getattr(matrixopt, cls)(small + large, rank=4) if cls == "GaLoreAdamW" else matrixopt.Muon(small + large)
    assert bucket_sizes(opt, small) == [3] and bucket_sizes(opt, large) == [1, 1, 1]
    assert calls == [(kind, "cpu", torch.float32)]


def test_a_fixed_table_on_the_optimizer_wins_over_the_measurement(measured):
    import matrixopt

    _, calls = measured
    params = square_params(64)
    opt = matrixopt.Muon(params)
    opt.unbatched_elements = {"cpu": 1 << 20}
    assert bucket_sizes(opt, params) == [3] and calls == []


def _planner_agree_worker(rank: int):
    """Ranks that measured different limits (pinned per rank here) build the same buckets: the
    smallest limit's. Replicated params (DDP): their matrix work spans the group."""
    import os

    import matrixopt

    os.environ[batching.ENV_LIMITS] = ["orthogonalize:cpu=16384", "orthogonalize:cpu=2048"][rank]
    torch.manual_seed(0)
    params = square_params(32) + square_params(64)
    opt = matrixopt.Muon(params, distributed="replicated")
    # 2048 on both: 32² (1024) share a stack, 64² (4096) run alone (rank 0's 16384 would stack them)
    assert bucket_sizes(opt, params) == [3, 1, 1, 1]


def test_ranks_plan_with_the_smallest_limit_any_of_them_measured():
    spawn(_planner_agree_worker)
