"""README's recipes inside the training codebases, each training a tiny model a few steps and
resuming exactly; step_in_backward inside their own loops equals their ordinary loop and
peaks lower (the profiler's memory events, as benchmarks/memory.py measures).

References are the frameworks' own loops: the uninterrupted run for resumes, the same loop
without the handle for step_in_backward. A framework that is not installed is skipped
(`make test` installs them all).
"""
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import matrixopt
from benchmarks.common import cpu_peak_bytes

torch.set_num_threads(1)
VOCAB, DIM, SEQ = 96, 64, 16


def tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB // 2, (n, SEQ), generator=g)


def assert_same_weights(a: nn.Module, b: nn.Module, rtol=0.0):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol * 1e-2, msg=n)


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- HF Trainer ---------------------------------------------------------------------------------

def hf_model(dim=DIM):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ))


def hf_trainer(model, out, steps, *, route, accumulation=1, resume=None, save=True, **args):
    import transformers

    data = [{"input_ids": t, "labels": t} for t in tokens(4 * steps * accumulation)]
    kwargs = {"optimizers": (route, None)} if isinstance(route, torch.optim.Optimizer) else \
        {"optimizer_cls_and_kwargs": route}
    arguments = transformers.TrainingArguments(
        str(out), max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        learning_rate=3e-3, lr_scheduler_type="constant", report_to=[], logging_strategy="no", use_cpu=True, seed=0,
        save_strategy="steps" if save else "no", save_steps=2, **args)
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=data, **kwargs)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("route", ["optimizers", "optimizer_cls_and_kwargs"])
def test_hf_trainer_recipes_train_and_resume_exactly(route, tmp_path):
    def make(model):
        return (matrixopt.Muon(matrixopt.param_groups(model), lr=3e-3) if route == "optimizers"
                else (matrixopt.Muon, {"lr": 3e-3}))

    whole = hf_model()
    hf_trainer(whole, tmp_path, 4, route=make(whole))
    resumed = hf_model()
    trainer = hf_trainer(resumed, tmp_path, 4, route=make(resumed), resume=str(tmp_path / "checkpoint-2"), save=False)
    assert_same_weights(resumed, whole)
    if route == "optimizer_cls_and_kwargs":   # the Trainer's own groups: the bare-params rule routed them
        embedding = resumed.model.embed_tokens.weight
        group = next(g for g in trainer.optimizer.param_groups if any(p is embedding for p in g["params"]))
        assert [d for p, d in zip(group["params"], group["routed"]) if p is embedding] == [False]


def test_hf_trainer_bare_params_split_gpt_neox_query_key_value_and_resume_exactly(tmp_path):
    """Pythia / GPT-NeoX fuse q, k, v head by head in ``query_key_value``: through
    ``optimizer_cls_and_kwargs`` (the Trainer's own groups, no ``matrix``) each is split into
    param_groups' 3·heads blocks, and a resume from the Trainer's checkpoint continues exactly."""
    transformers = pytest.importorskip("transformers")

    def neox():
        torch.manual_seed(0)
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=DIM, intermediate_size=2 * DIM, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=SEQ))

    whole = neox()
    trainer = hf_trainer(whole, tmp_path, 4, route=(matrixopt.Muon, {"lr": 3e-3}))
    names = {id(p): n for n, p in whole.named_parameters()}
    recorded = {names[id(p)]: b for g in trainer.optimizer.optimizer.param_groups
                for p, b in zip(g["params"], g.get("routed_blocks") or []) if b}
    assert recorded == {f"gpt_neox.layers.{i}.attention.query_key_value.weight": {"blocks": 12} for i in range(2)}
    assert recorded == {n: {"blocks": g["blocks"]} for g in matrixopt.param_groups(whole) if "blocks" in g
                        for n, _ in g["params"]}
    resumed = neox()
    hf_trainer(resumed, tmp_path, 4, route=(matrixopt.Muon, {"lr": 3e-3}), resume=str(tmp_path / "checkpoint-2"),
               save=False)
    assert_same_weights(resumed, whole)


def test_hf_trainer_with_step_in_backward_equals_its_loop_and_peaks_lower(tmp_path):
    """gradient_accumulation_steps=2 and the handle's accumulation_steps=2; the Trainer's
    clipping off (max_grad_norm=0) in both."""
    peaks, models = [], []
    for in_backward in (False, True):
        model = hf_model(dim=128)
        opt = matrixopt.Muon(matrixopt.param_groups(model), lr=3e-3)
        handle = matrixopt.step_in_backward(opt, accumulation_steps=2) if in_backward else None
        peaks.append(cpu_peak_bytes(lambda: hf_trainer(model, tmp_path, 3, route=opt, accumulation=2, save=False,
                                                       max_grad_norm=0.0)))
        models.append(model)
    handle.remove()
    assert_same_weights(models[1], models[0], rtol=1e-5)
    assert peaks[1] < peaks[0], peaks


# -- accelerate -----------------------------------------------------------------------------------

def test_accelerate_recipe_trains_and_resumes_exactly(tmp_path):
    accelerate = pytest.importorskip("accelerate")

    def run(steps, save_at=None, load=None):
        model = hf_model()
        accelerator = accelerate.Accelerator(cpu=True)
        model, opt = accelerator.prepare(model, matrixopt.Muon(model.parameters(), lr=3e-3))
        if load:
            accelerator.load_state(load)
        for i, batch in enumerate(tokens(2 * steps).split(2)):
            if load and i < 2:
                continue
            accelerator.backward(model(input_ids=batch, labels=batch).loss)
            opt.step()
            opt.zero_grad()
            if i + 1 == save_at:
                accelerator.save_state(str(tmp_path))
        return model

    whole = run(4, save_at=2)
    assert_same_weights(run(4, load=str(tmp_path)), whole)


# -- Lightning ------------------------------------------------------------------------------------

def lightning_module(handle_steps=None):
    L = pytest.importorskip("lightning")

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = hf_model(dim=128)

        def training_step(self, batch, _):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            opt = matrixopt.Muon(self.parameters(), lr=3e-3)     # the recipe: bare params
            if handle_steps:
                matrixopt.step_in_backward(opt, accumulation_steps=handle_steps)
            return opt

    return LM()


def lightning_fit(module, epochs, ckpt=None, accumulation=1, save=None):
    import lightning as L

    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulation)
    trainer.fit(module, torch.utils.data.DataLoader(tokens(8), batch_size=2), ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return trainer


def test_lightning_recipe_trains_and_resumes_exactly(tmp_path):
    whole = lightning_module()
    lightning_fit(whole, 2)
    first = lightning_module()
    lightning_fit(first, 1, save=tmp_path / "epoch1.ckpt")
    resumed = lightning_module()
    lightning_fit(resumed, 2, ckpt=tmp_path / "epoch1.ckpt")
    assert_same_weights(resumed, whole)


def test_lightning_with_step_in_backward_equals_its_loop_and_peaks_lower():
    """accumulate_grad_batches=2 and accumulation_steps=2: Lightning runs the window's last
    backward inside optimizer.step(closure)."""
    modules = [lightning_module(), lightning_module(handle_steps=2)]
    peaks = [cpu_peak_bytes(lambda m=m: lightning_fit(m, 1, accumulation=2)) for m in modules]
    assert_same_weights(modules[1], modules[0], rtol=1e-5)
    assert peaks[1] < peaks[0], peaks


# -- litgpt ---------------------------------------------------------------------------------------

def litgpt_setup(class_path=True):
    litgpt = pytest.importorskip("litgpt")
    import lightning as L
    from litgpt.utils import instantiate_torch_optimizer

    torch.manual_seed(0)
    model = litgpt.GPT(litgpt.Config(n_layer=2, n_head=4, n_query_groups=2, n_embd=128, block_size=SEQ,
                                     vocab_size=VOCAB, padded_vocab_size=VOCAB, bias=False, norm_class_name="RMSNorm",
                                     mlp_class_name="LLaMAMLP", intermediate_size=256))
    fabric = L.Fabric(devices=1, accelerator="cpu")
    # What `litgpt pretrain --optimizer '{"class_path": "matrixopt.Muon", "init_args": {"lr": 3e-3}}'` calls.
    opt = (instantiate_torch_optimizer({"class_path": "matrixopt.Muon", "init_args": {"lr": 3e-3}}, model.parameters(),
                                       fused=False) if class_path
           else matrixopt.Muon(matrixopt.param_groups(model), lr=3e-3))
    model = fabric.setup(model)
    return fabric, model, fabric.setup_optimizers(opt)


def litgpt_loop(fabric, model, opt, batches, accumulation=1, max_norm=None):
    """litgpt pretrain's loop: backward (no sync while accumulating), clip, step, zero_grad."""
    for i, batch in enumerate(batches):
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        fabric.backward(loss / accumulation)
        if (i + 1) % accumulation:
            continue
        if max_norm is not None:
            fabric.clip_gradients(model, opt, max_norm=max_norm)
        opt.step()
        opt.zero_grad()


def test_litgpt_class_path_recipe_trains_and_resumes_exactly(tmp_path):
    batches = tokens(8).split(2)
    fabric, whole, opt = litgpt_setup()
    litgpt_loop(fabric, whole, opt, batches, max_norm=1.0)
    fabric, first, opt = litgpt_setup()
    litgpt_loop(fabric, first, opt, batches[:2], max_norm=1.0)
    fabric.save(tmp_path / "ckpt.pth", {"model": first, "optimizer": opt})
    fabric, resumed, opt = litgpt_setup()
    fabric.load(tmp_path / "ckpt.pth", {"model": resumed, "optimizer": opt})
    litgpt_loop(fabric, resumed, opt, batches[2:], max_norm=1.0)
    assert_same_weights(resumed, whole)


def test_litgpt_class_path_route_trains_as_param_groups():
    """The class path's bare params, inside Fabric, give param_groups(model)'s weights (to the
    rounding of Newton-Schulz over other stacks of matrices): the same tables on AdamW, the fused
    qkv split into q, k and v as param_groups splits it."""
    batches = tokens(8).split(2)
    runs = []
    for class_path in (True, False):
        fabric, model, opt = litgpt_setup(class_path)
        litgpt_loop(fabric, model, opt, batches, max_norm=1.0)
        runs.append(model)
    for (n, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):   # buckets stack other matrices
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_litgpt_pretrain_cli_with_a_class_path_optimizer(tmp_path):
    """``litgpt pretrain --optimizer '{"class_path": "matrixopt.Muon", ...}'`` itself (a
    subprocess: its jsonargparse CLI, torch.compile'd model, Fabric loop and checkpoint), with
    a data module that needs no data extras: the bare params are routed (embedding and head to
    AdamW, the fused qkv to Muon, split into q, k and v) and the loss falls."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    litgpt = pytest.importorskip("litgpt")
    config = dict(n_layer=2, n_head=4, n_query_groups=2, n_embd=64, block_size=SEQ, vocab_size=VOCAB,
                  padded_vocab_size=VOCAB, bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                  intermediate_size=128)
    (tmp_path / "config.yaml").write_text("model_name: tiny\nmodel_config:\n  name: tiny\n"
                                          + "".join(f"  {k}: {v}\n" for k, v in config.items()))
    args = ["--config", "config.yaml", "--out_dir", "out", "--precision", "32-true", "--devices", "1",
            "--logger_name", "csv", "--data", "litgpt_cli_data.Counting", "--train.micro_batch_size", "4",
            "--train.global_batch_size", "4", "--train.max_tokens", str(12 * 4 * SEQ), "--train.lr_warmup_steps", "0",
            "--train.max_seq_length", str(SEQ), "--train.log_interval", "1", "--eval.interval", "1000",
            "--eval.max_iters", "1", "--optimizer", '{"class_path": "matrixopt.Muon", "init_args": {"lr": 3e-3}}']
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "litgpt", "pretrain", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(line.split("loss train: ")[1].split(",")[0]) for line in run.stdout.splitlines()
              if "loss train: " in line]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses
    saved = torch.load(tmp_path / "out" / "final" / "lit_model.pth", weights_only=False)["optimizer"]
    names = [n for n, _ in litgpt.GPT(litgpt.Config(**config)).named_parameters()]
    (group,) = saved["param_groups"]
    routed = dict(zip([names[i] for i in group["params"]], group["routed"]))
    assert routed["transformer.wte.weight"] is False and routed["lm_head.weight"] is False
    assert routed["transformer.h.0.attn.qkv.weight"] is True
    blocks = dict(zip([names[i] for i in group["params"]], group["routed_blocks"]))
    assert blocks["transformer.h.0.attn.qkv.weight"] == {"blocks": (64, 32, 32)}      # q of 4 heads, k and v of 2
    assert blocks["transformer.h.0.mlp.fc_1.weight"] is None
    assert set(saved["state"][names.index("transformer.wte.weight")]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(saved["state"][names.index("transformer.h.0.attn.qkv.weight")]) == {f"momentum_buffer.{b}" for b in range(3)}


def test_litgpt_with_step_in_backward_equals_its_loop_and_peaks_lower():
    batches, runs = tokens(8).split(2), []
    for in_backward in (False, True):
        fabric, model, opt = litgpt_setup(class_path=False)
        if in_backward:
            matrixopt.step_in_backward(opt.optimizer, accumulation_steps=2)
        runs.append((cpu_peak_bytes(lambda: litgpt_loop(fabric, model, opt, batches, accumulation=2)), model))
    assert_same_weights(runs[1][1], runs[0][1], rtol=1e-5)
    assert runs[1][0] < runs[0][0], [r[0] for r in runs]


# -- torchtitan -----------------------------------------------------------------------------------

MATRIXOPT_NAMES = ("Muon", "ROOT", "ARO", "GaLoreAdamW", "DCTAdamW", "CoSOAdamW")


def torchtitan_llama() -> nn.Module:
    """A tiny torchtitan llama3 (fused ``wqkv``, 4 q and 2 kv heads), built as its trainer builds
    one (meta device, ``to_empty``, ``init_weights``), with SDPA in place of its FlexAttention,
    whose backward has no CPU kernel."""
    pytest.importorskip("torchtitan")
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
    from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers

    config = Llama3Model.Config(
        dim=DIM, vocab_size=VOCAB, tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM),
        norm=RMSNorm.Config(normalized_shape=DIM), lm_head=Linear.Config(in_features=DIM, out_features=VOCAB),
        layers=_build_llama3_layers(n_layers=2, dim=DIM, n_heads=4, n_kv_heads=2, hidden_dim=2 * DIM,
                                    rope=ComplexRoPE.Config(dim=DIM // 4, max_seq_len=SEQ, theta=500000,
                                                            scaling="none"), attn_backend="flex"))
    for _, _, parent, attr in list(config.traverse(FlexAttention.Config)):
        setattr(parent, attr, ScaledDotProductAttention.Config())
    torch.manual_seed(0)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    return model


def matrixopt_optimizers():
    """The README's recipe: torchtitan's container resolving matrixopt's optimizer names."""
    from torchtitan.components.optimizer import OptimizersContainer

    class MatrixoptOptimizers(OptimizersContainer):
        @dataclass(kw_only=True, slots=True)
        class Config(OptimizersContainer.Config):    # torchtitan builds the class that declares it
            pass

        @staticmethod
        def _resolve_optimizer_factory(name):
            cls = getattr(matrixopt, name, None)
            if isinstance(cls, type) and issubclass(cls, matrixopt.MatrixOptimizer):
                return cls
            return OptimizersContainer._resolve_optimizer_factory(name)

    return MatrixoptOptimizers


def torchtitan_groups(name: str, flagged=True) -> list:
    """The README's patterns: embedding, head and norms on the fallback, each head's q, k and v
    rows of the fused ``wqkv`` a matrix of their own (4 + 2 + 2 blocks), the rest the matrix
    rule; ``flagged=False``: one catch-all group without ``matrix`` (the bare-params rule)."""
    from torchtitan.components.optimizer import ParamGroupConfig

    def group(pattern, **kwargs):
        return ParamGroupConfig(pattern=pattern, optimizer_name=name, optimizer_kwargs={"lr": 3e-3, **kwargs})

    if not flagged:
        return [group(r".*")]
    return [group(r"tok_embeddings|lm_head|norm", matrix=False), group(r"\.wqkv\.", matrix=True, blocks=8),
            group(r".*", matrix=True)]


class TrainState:
    """What torchtitan's Trainer checkpoints as ``train_state``: the step."""
    step = 0

    def state_dict(self):
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def torchtitan_run(folder, steps: int, groups: list) -> tuple[nn.Module, int]:
    """torchtitan's Trainer around the container: warmup schedule, a checkpoint every 2 steps
    by its CheckpointManager (DCP), the latest loaded at start (a restarted job resumes).
    Returns the model and the step it started from."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer

    model = torchtitan_llama()
    opt = matrixopt_optimizers().Config(param_groups=groups).build(model_parts=[model])
    schedule = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=opt, training_steps=6)
    state = TrainState()
    checkpointer = CheckpointManager.Config(enable=True, interval=2, keep_latest_k=0).build(
        dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=schedule,
        states={"train_state": state}, sd_adapter=None, base_folder=str(folder))
    checkpointer.load()
    start, batches = state.step, tokens(12).split(2)
    while state.step < steps:
        batch, state.step = batches[state.step], state.step + 1
        nn.functional.cross_entropy(model(batch[:, :-1]).reshape(-1, VOCAB), batch[:, 1:].reshape(-1)).backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
        checkpointer.save(state.step)
    checkpointer.close()
    return model, start


@pytest.mark.parametrize("name", MATRIXOPT_NAMES)
def test_torchtitan_container_recipe_trains_and_resumes_exactly(name, tmp_path):
    whole, _ = torchtitan_run(tmp_path / "whole", 6, torchtitan_groups(name))
    torchtitan_run(tmp_path / "job", 2, torchtitan_groups(name))
    resumed, start = torchtitan_run(tmp_path / "job", 6, torchtitan_groups(name))
    assert start == 2
    assert_same_weights(resumed, whole)


def test_torchtitan_catch_all_group_without_matrix_cannot_resume(tmp_path):
    """README: torchtitan (like torch's DCP state-dict helpers) makes the optimizer's state with
    a zero-gradient step before loading into it, and the bare-params rule cannot tell an
    embedding from a zero gradient: the live state asks for the matrix rule's momentum."""
    from torch.distributed.checkpoint.api import CheckpointException

    torchtitan_run(tmp_path, 2, torchtitan_groups("Muon", flagged=False))
    with pytest.raises(CheckpointException, match="tok_embeddings.weight.momentum_buffer"):
        torchtitan_run(tmp_path, 4, torchtitan_groups("Muon", flagged=False))


# -- OLMo-core ------------------------------------------------------------------------------------

def olmo_model() -> nn.Module:
    pytest.importorskip("olmo_core")
    from olmo_core.nn.transformer import TransformerConfig

    torch.manual_seed(0)
    config = TransformerConfig.llama_like(d_model=DIM, vocab_size=VOCAB, n_layers=2, n_heads=4, n_kv_heads=2,
                                          hidden_size_multiple_of=32)
    model = config.build(init_device="cpu")
    model.init_weights(max_seq_len=SEQ, device=torch.device("cpu"))
    return model


def olmo_config(optimizer, grouped=True):
    """The README's recipe: an OptimConfig building ``optimizer`` over ``param_groups``
    (``grouped=False``: OLMo-core's own groups, one without ``matrix``)."""
    from olmo_core.optim import OptimConfig

    @dataclass
    class MatrixoptConfig(OptimConfig):
        lr: float = 3e-3

        @classmethod
        def optimizer(cls):
            return optimizer

        def build_groups(self, model, strict=True):
            return matrixopt.param_groups(model) if grouped else OptimConfig.build_groups(self, model, strict)

    return MatrixoptConfig()


def olmo_run(path, optimizer, batches, grouped=True, load=False, save=False) -> nn.Module:
    """A few steps of a tiny OLMo-core transformer; state saved and loaded by OLMo-core's DCP
    functions (``save_model_and_optim_state`` / ``load_model_and_optim_state``)."""
    from olmo_core.distributed.checkpoint import load_model_and_optim_state, save_model_and_optim_state

    model = olmo_model()
    opt = olmo_config(optimizer, grouped).build(model)
    if load:
        load_model_and_optim_state(path, model, opt)
    for batch in batches:
        nn.functional.cross_entropy(model(batch[:, :-1]).reshape(-1, VOCAB), batch[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    if save:
        save_model_and_optim_state(path, model, opt)
    return model


@pytest.mark.parametrize("name", MATRIXOPT_NAMES)
def test_olmo_core_config_recipe_trains_and_resumes_exactly(name, tmp_path):
    optimizer, batches = getattr(matrixopt, name), tokens(8).split(2)
    whole = olmo_run(tmp_path, optimizer, batches)
    olmo_run(tmp_path, optimizer, batches[:2], save=True)
    assert_same_weights(olmo_run(tmp_path, optimizer, batches[2:], load=True), whole)


def test_olmo_core_param_groups_route_embedding_and_head_to_the_fallback():
    model = olmo_model()
    opt = olmo_config(matrixopt.Muon).build(model)
    fallback = {id(p) for g in opt.param_groups if not g["matrix"] for p in g["params"]}
    assert {id(model.embeddings.weight), id(model.lm_head.w_out.weight)} <= fallback


def test_olmo_core_groups_without_matrix_cannot_resume(tmp_path):
    """The same zero-gradient step (torch's get_/set_optimizer_state_dict) as torchtitan's."""
    from torch.distributed.checkpoint.api import CheckpointException

    olmo_run(tmp_path, matrixopt.Muon, tokens(4).split(2), grouped=False, save=True)
    with pytest.raises(CheckpointException, match="embeddings.weight.momentum_buffer"):
        olmo_run(tmp_path, matrixopt.Muon, [], grouped=False, load=True)
