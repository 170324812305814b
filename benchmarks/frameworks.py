"""Bare params inside the training codebases: litgpt's ``--optimizer`` class path and the HF
Trainer's ``optimizer_cls_and_kwargs`` against the same optimizer over ``param_groups``.

A tiny LLaMA-style model (litgpt ``GPT`` / transformers ``LlamaForCausalLM``: RMSNorm,
SwiGLU, GQA, untied head) trains character-level on Shakespeare at AdamW's lr. Routes:

- ``litgpt class_path``: ``litgpt.utils.instantiate_torch_optimizer({"class_path":
  "matrixopt.<Name>", "init_args": {...}}, model.parameters())`` — what ``litgpt pretrain
  --optimizer '{...}'`` calls — in litgpt's pretrain loop (Fabric, ``clip_gradients``
  max_norm 1); ``litgpt param_groups``: the same loop over ``matrixopt.param_groups(model)``
  (which splits litgpt's fused ``qkv`` into q, k, v blocks, as bare params do where the model
  is called as a module: :class:`matrixopt.routing.FirstForward`); ``litgpt unsplit``: the
  same groups with ``qkv`` moved, whole, into the plain matrix group, so ``bare/unsplit`` shows
  what the split is worth.
- ``HF optimizer_cls_and_kwargs``: ``Trainer(..., optimizer_cls_and_kwargs=(cls, kwargs))``
  (the Trainer's own two groups, weight decay and none, no ``matrix`` key); ``HF
  param_groups``: ``Trainer(..., optimizers=(cls(param_groups(model)), None))``.

Validation loss on held-out plays after 40 and 200 steps (``--steps``), the mean over
``--seeds`` seeds (init and batches; default 1) and the worst seed's bare/param_groups ratio.
Each codebase's ``routing`` section lists the matrices each route puts on the fallback and
those it splits into blocks (first optimizer's run).
"""
import warnings

import torch

from .data import eval_windows, load_shakespeare

LR, WEIGHT_DECAY, BATCH, SEQ = 3e-3, 0.1, 8, 64
DIM, LAYERS, HEADS, GROUPS, HIDDEN = 64, 2, 4, 2, 172
OPTIMIZERS = ("Muon", "ROOT", "ARO", "GaLoreAdamW", "DCTAdamW", "CoSOAdamW")


def windows(tokens, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - SEQ - 1, (steps * BATCH,), generator=g)
    return torch.stack([tokens[s:s + SEQ + 1] for s in starts.tolist()])


def val_loss(forward, val) -> float:
    with torch.no_grad():
        logits = forward(val[0])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), val[1].reshape(-1)).item()


#: The first run's routing, by codebase and route: the matrices on the fallback, those split.
ROUTING = {}


def routing_of(model, opt) -> dict:
    """Names of the params with ndim >= 2 that ``opt`` (bare or grouped) puts on the fallback,
    and of those it splits into blocks (a group's ``blocks``, or the bare-params rule's)."""
    names = {id(p): n.removeprefix("_forward_module.") for n, p in model.named_parameters()}   # Fabric's wrapper
    fallback, split = [], []
    for g in opt.param_groups:
        for i, p in enumerate(g["params"]):
            if p.ndim >= 2 and not opt.is_matrix(g, p, i):
                fallback.append(names[id(p)])
            elif g.get("blocks") is not None or g.get("routed_blocks") and g["routed_blocks"][i]:
                split.append(names[id(p)])
    return {"fallback": ", ".join(sorted(fallback)), "split into blocks": ", ".join(sorted(split))}


def litgpt_run(name: str, route: str, corpus, steps: list[int], seed: int = 0) -> dict:
    import lightning as L
    import litgpt
    from litgpt.utils import instantiate_torch_optimizer

    torch.manual_seed(seed)
    config = litgpt.Config(n_layer=LAYERS, n_head=HEADS, n_query_groups=GROUPS, n_embd=DIM, block_size=SEQ,
                           vocab_size=len(corpus.vocab), padded_vocab_size=len(corpus.vocab), bias=False,
                           norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=HIDDEN,
                           rotary_percentage=1.0, parallel_residual=False)
    model = litgpt.GPT(config)
    fabric = L.Fabric(devices=1, accelerator="cpu")
    cls_path = name if "." in name else f"matrixopt.{name}"
    init = {"lr": LR, "weight_decay": WEIGHT_DECAY}
    if route in ("param_groups", "unsplit"):
        import matrixopt
        groups = matrixopt.param_groups(model)
        if route == "unsplit":
            blocked = [p for g in groups if "blocks" in g for p in g["params"]]
            groups = [{**g, "params": g["params"] + blocked} if g["matrix"] and "blocks" not in g else g
                      for g in groups if "blocks" not in g]
        opt = getattr(matrixopt, name)(groups, **init)
    else:
        opt = instantiate_torch_optimizer({"class_path": cls_path, "init_args": init}, model.parameters(),
                                          fused=False)
    model = fabric.setup(model)
    opt = fabric.setup_optimizers(opt)
    data, val, losses = windows(corpus.train, max(steps), seed), eval_windows(corpus.val, 32, SEQ), {}
    for step in range(1, max(steps) + 1):
        batch = data[(step - 1) * BATCH:step * BATCH]
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        fabric.backward(loss)
        fabric.clip_gradients(model, opt, max_norm=1.0)
        opt.step()
        opt.zero_grad()
        if step in steps:
            losses[step] = val_loss(model, val)
    if "." not in name:
        ROUTING.setdefault("litgpt", {}).setdefault(route, routing_of(model, opt))
    return losses


def hf_run(name: str, route: str, corpus, steps: list[int], seed: int, out_dir: str) -> dict:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(corpus.vocab), hidden_size=DIM, intermediate_size=HIDDEN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=GROUPS, max_position_embeddings=SEQ)
    model = transformers.LlamaForCausalLM(config)
    data = [{"input_ids": w, "labels": w} for w in windows(corpus.train, max(steps), seed)]
    val, losses = eval_windows(corpus.val, 32, SEQ), {}

    class Evaluate(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step in steps:
                losses[state.global_step] = val_loss(lambda x: model(input_ids=x).logits, val)
            if state.global_step == max(steps) and name != "torch.optim.AdamW":
                opt = getattr(optimizer, "optimizer", optimizer)    # accelerate's wrapper
                ROUTING.setdefault("HF Trainer", {}).setdefault(route, routing_of(model, opt))

    args = transformers.TrainingArguments(out_dir, max_steps=max(steps), per_device_train_batch_size=BATCH,
                                          learning_rate=LR, weight_decay=WEIGHT_DECAY, lr_scheduler_type="constant",
                                          report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                          seed=seed, dataloader_drop_last=True)
    kwargs = {"callbacks": [Evaluate()]}
    if name != "torch.optim.AdamW":
        import matrixopt
        cls = getattr(matrixopt, name)
        if route == "param_groups":
            kwargs["optimizers"] = (cls(matrixopt.param_groups(model), lr=LR, weight_decay=WEIGHT_DECAY), None)
        else:
            kwargs["optimizer_cls_and_kwargs"] = (cls, {"lr": LR})
    transformers.Trainer(model=model, args=args, train_dataset=data, **kwargs).train()
    return losses


def mean_over_seeds(train, name: str, route: str, corpus, steps: list[int], seeds: int) -> tuple[dict, list]:
    """``train``'s validation losses at ``steps``, the mean over seeds 0 … seeds-1, and per seed."""
    runs = [train(name, route, corpus, steps, seed) for seed in range(seeds)]
    return {s: sum(run[s] for run in runs) / seeds for s in steps}, runs


def optimizer_row(name: str, steps: list[int], adamw: dict, bare, grouped, unsplit) -> dict:
    """One optimizer's row: per step count the routes' mean losses, the ratios of the means and
    the worst seed's bare/param_groups ratio (each route a (means, per-seed runs) pair)."""
    row = {"optimizer": f"matrixopt.{name}"}
    for s in steps:
        row.update({f"bare@{s}": round(bare[0][s], 4), f"param_groups@{s}": round(grouped[0][s], 4),
                    f"bare/param_groups@{s}": round(bare[0][s] / grouped[0][s], 4),
                    f"worst seed@{s}": round(max(b[s] / g[s] for b, g in zip(bare[1], grouped[1])), 4),
                    f"bare/AdamW@{s}": round(bare[0][s] / adamw[s], 4)})
        if unsplit:
            row.update({f"unsplit@{s}": round(unsplit[0][s], 4),
                        f"bare/unsplit@{s}": round(bare[0][s] / unsplit[0][s], 4)})
    return row


def run(quick: bool, *, steps=None, seeds=None, optimizers=None, device=None) -> dict:
    import tempfile

    steps, seeds = sorted(steps or [40, 200]), seeds or 1
    corpus = load_shakespeare()
    names = optimizers or OPTIMIZERS
    sections = {}
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as out_dir:
        warnings.simplefilter("ignore")
        for codebase, train in (("litgpt", litgpt_run), ("HF Trainer", lambda *a: hf_run(*a, out_dir))):
            adamw = mean_over_seeds(train, "torch.optim.AdamW", "class_path", corpus, steps, seeds)[0]
            rows = [{"optimizer": "torch.optim.AdamW", **{f"loss@{s}": round(adamw[s], 4) for s in steps}}]
            for name in names:
                bare, grouped = (mean_over_seeds(train, name, route, corpus, steps, seeds)
                                 for route in ("class_path", "param_groups"))
                unsplit = mean_over_seeds(train, name, "unsplit", corpus, steps, seeds) if codebase == "litgpt" else None
                rows.append(optimizer_row(name, steps, adamw, bare, grouped, unsplit))
                print(rows[-1], flush=True)
            sections[f"{codebase}: validation loss, bare params vs param_groups (lr {LR}, mean of {seeds} seeds)"] = rows
            routing = ROUTING.get(codebase, {})
            sections[f"{codebase}: matrices on the fallback and split into blocks"] = [
                {"route": route, **found} for route, found in routing.items()]
    from importlib.metadata import version
    versions = {package: version(package) for package in ("transformers", "accelerate", "lightning", "litgpt")}
    sections["versions of the codebases"] = [versions]
    return sections, {"steps": steps, "seeds": seeds, "lr": LR, "weight_decay": WEIGHT_DECAY, "routing": ROUTING,
                      "versions": versions}, None
