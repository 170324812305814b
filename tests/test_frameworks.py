"""README's recipes inside the training codebases, each training a tiny model a few steps and
resuming exactly; step_in_backward inside their own loops equals their ordinary loop and
peaks lower (the profiler's memory events, as benchmarks/memory.py measures).

References are the frameworks' own loops: the uninterrupted run for resumes, the same loop
without the handle for step_in_backward. A framework that is not installed is skipped
(`make test` installs them all).
"""
import warnings

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


def test_litgpt_with_step_in_backward_equals_its_loop_and_peaks_lower():
    batches, runs = tokens(8).split(2), []
    for in_backward in (False, True):
        fabric, model, opt = litgpt_setup(class_path=False)
        if in_backward:
            matrixopt.step_in_backward(opt.optimizer, accumulation_steps=2)
        runs.append((cpu_peak_bytes(lambda: litgpt_loop(fabric, model, opt, batches, accumulation=2)), model))
    assert_same_weights(runs[1][1], runs[0][1], rtol=1e-5)
    assert runs[1][0] < runs[0][0], [r[0] for r in runs]
