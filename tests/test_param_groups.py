"""param_groups(model): hidden matrices to the matrix rule; embeddings, head, 1-D to AdamW."""

import pytest
import torch
from torch import nn

import matrixopt


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    def __init__(self, d, norm):
        super().__init__()
        self.norm1, self.norm2 = norm(d), norm(d)
        self.q, self.k, self.v = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        att = torch.softmax(self.q(h) @ self.k(h).mT / h.shape[-1] ** 0.5, -1) @ self.v(h)
        x = x + self.o(att)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A small language model; ``head`` is "tied", "untied" (lm_head) or "classifier"."""

    def __init__(self, vocab=50, d=16, layers=2, head="untied", norm=nn.LayerNorm):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, norm) for _ in range(layers))
        self.norm = norm(d)
        if head == "classifier":
            self.classifier = nn.Linear(d, 3)
        else:
            self.lm_head = nn.Linear(d, vocab, bias=False)
            if head == "tied":
                self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.classifier(x.mean(1)) if hasattr(self, "classifier") else self.lm_head(x)


def hidden_matrix_names(model):
    """Expected matrix group, written out from the architecture."""
    names = []
    for i in range(len(model.blocks)):
        names += [f"blocks.{i}.{n}.weight" for n in ("q", "k", "v", "o", "mlp.0", "mlp.2")]
    return names


def names_of(group):
    return [n for n, _ in group["params"]]


@pytest.mark.parametrize("head", ["tied", "untied", "classifier"])
@pytest.mark.parametrize("norm", [nn.LayerNorm, RMSNorm], ids=["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("vocab", [50, 64], ids=["vocab50", "vocab=4d"])
def test_split(head, norm, vocab):
    """With vocab = 4·d the MLP's up-projection has the embedding's shape: still hidden."""
    model = Transformer(vocab=vocab, head=head, norm=norm)
    matrix, fallback = matrixopt.param_groups(model)
    assert matrix["matrix"] is True and fallback["matrix"] is False
    assert sorted(names_of(matrix)) == sorted(hidden_matrix_names(model))
    everything = [n for n, _ in model.named_parameters()]
    assert sorted(names_of(matrix) + names_of(fallback)) == sorted(everything)
    assert all(p.ndim < 2 for n, p in fallback["params"] if n not in
               ("embed.weight", "lm_head.weight", "classifier.weight"))
    assert "embed.weight" in names_of(fallback)
    if head == "untied":
        assert "lm_head.weight" in names_of(fallback)
    if head == "classifier":
        assert "classifier.weight" in names_of(fallback)


def test_tied_weights_appear_once():
    model = Transformer(head="tied")
    ids = [id(p) for g in matrixopt.param_groups(model) for _, p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert id(model.lm_head.weight) in ids


def test_head_found_by_shape_without_a_head_name():
    """The last Linear shaped like the embedding is the head, whatever it is called."""
    model = Transformer(head="untied")
    model.unembed = model.lm_head
    del model.lm_head
    _, fallback = matrixopt.param_groups(model)
    assert "unembed.weight" in names_of(fallback)


class VisionMoE(nn.Module):
    """Bare-Parameter tables (ViT's pos_embed, cls_token), MoE experts, a 1-output value head."""

    def __init__(self, d=8, patches=5, experts=3):
        super().__init__()
        self.patch = nn.Linear(12, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, d))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_tokens = nn.Parameter(torch.zeros(4, d))
        self.experts = nn.Parameter(torch.randn(experts, d, 2 * d))
        self.value = nn.Linear(d, 1)


def test_vector_tables_and_single_output_heads_go_to_the_fallback():
    """Matrices are linear maps: embedding/token tables registered as bare Parameters and
    maps with a side of 1 are AdamW's; a 3-D expert stack stays a matrix param."""
    matrix, fallback = matrixopt.param_groups(VisionMoE())
    assert sorted(names_of(matrix)) == ["experts", "patch.weight"]
    assert sorted(names_of(fallback)) == sorted(["patch.bias", "pos_embed", "cls_token", "register_tokens",
                                                 "value.weight", "value.bias"])


def test_frozen_params_left_out_and_empty_groups_dropped():
    model = Transformer()
    for p in model.blocks.parameters():
        p.requires_grad_(False)
    groups = matrixopt.param_groups(model)
    assert [g["matrix"] for g in groups] == [False]
    assert all(p.requires_grad for _, p in groups[0]["params"])


def test_overrides_and_fallback():
    model = Transformer()
    matrix, fallback = matrixopt.param_groups(model, weight_decay=0.0, lr=0.02,
                                              fallback={"lr": 3e-4, "betas": (0.8, 0.9)})
    assert matrix["weight_decay"] == fallback["weight_decay"] == 0.0
    assert matrix["lr"] == 0.02 and fallback["lr"] == 3e-4 and fallback["betas"] == (0.8, 0.9)
    assert "betas" not in matrix
    opt = matrixopt.Muon(matrixopt.param_groups(model, fallback={"lr": 3e-4}), lr=0.02)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 3e-4]


def test_groups_route_and_train():
    """With Muon, the groups' routing is what the step does: fallback params get Adam moments,
    matrix params a momentum buffer; and the names flow into warnings."""
    model = Transformer(head="tied")
    opt = matrixopt.Muon(matrixopt.param_groups(model), lr=0.01)
    tokens = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    model(tokens).logsumexp(-1).mean().backward()
    opt.step()
    assert set(opt.state[model.embed.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[model.blocks[0].q.weight]) == {"momentum_buffer"}
    assert set(opt.state[model.blocks[0].o.bias]) == {"step", "exp_avg", "exp_avg_sq"}
    model.blocks[1].mlp[0].weight.grad.fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match=r"blocks\.1\.mlp\.0\.weight"):
        opt.step()


# -- fused projections of the training codebases ---------------------------------------------

def _blocks_of(groups):
    """name → blocks (row blocks), or (blocks, "columns")."""
    return {n: g["blocks"] if g.get("block_axis") is None else (g["blocks"], g["block_axis"])
            for g in groups for n, _ in g["params"] if g.get("blocks") is not None}


def test_litgpt_qkv_with_gqa_sizes_from_its_config():
    litgpt = pytest.importorskip("litgpt")
    config = litgpt.Config(n_layer=2, n_head=4, n_query_groups=2, n_embd=32, block_size=16, vocab_size=64,
                           padded_vocab_size=64, bias=False)
    model = litgpt.GPT(config)
    # litgpt splits qkv as (n_head, n_query_groups, n_query_groups) × head_size rows, in order.
    assert _blocks_of(matrixopt.param_groups(model)) == {f"transformer.h.{i}.attn.qkv.weight": (32, 16, 16)
                                                         for i in range(2)}
    mha = litgpt.GPT(litgpt.Config(n_layer=1, n_head=4, n_embd=32, block_size=16, vocab_size=64,
                                   padded_vocab_size=64))
    assert _blocks_of(matrixopt.param_groups(mha)) == {"transformer.h.0.attn.qkv.weight": 3}


def test_gpt_neox_query_key_value_interleaved_per_head():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                        intermediate_size=64, vocab_size=64)
    model = transformers.GPTNeoXForCausalLM(config)
    # view(..., heads, 3 * head_size): q, k, v of head 0, then head 1, ...: 12 blocks of 8 rows.
    assert _blocks_of(matrixopt.param_groups(model)) == {"gpt_neox.layers.0.attention.query_key_value.weight": 12}


def test_phi3_qkv_proj_and_gate_up_proj():
    transformers = pytest.importorskip("transformers")
    config = transformers.Phi3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                                     intermediate_size=48, vocab_size=64, pad_token_id=0)
    model = transformers.Phi3ForCausalLM(config)
    assert _blocks_of(matrixopt.param_groups(model)) == {"model.layers.0.self_attn.qkv_proj.weight": (32, 16, 16),
                                                         "model.layers.0.mlp.gate_up_proj.weight": 2}
    opt = matrixopt.Muon(matrixopt.param_groups(model), lr=1e-3)    # the optimizer accepts the groups
    model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    opt.step()


def gpt2(**config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=64,
                                                                n_positions=16, **config))


def test_gpt2_conv1d_c_attn_split_into_column_blocks():
    """transformers' Conv1D stores c_attn as (in, 3·out) and GPT2Attention splits its output
    with ``.split(split_size, dim=2)``: q, k, v are column blocks (cross-attention: k, v)."""
    assert _blocks_of(matrixopt.param_groups(gpt2())) == {f"transformer.h.{i}.attn.c_attn.weight": (3, "columns")
                                                          for i in range(2)}
    cross = _blocks_of(matrixopt.param_groups(gpt2(add_cross_attention=True)))
    assert cross["transformer.h.0.crossattention.c_attn.weight"] == (2, "columns")
    assert "transformer.h.0.crossattention.q_attn.weight" not in cross


def test_gpt2_c_attn_steps_as_three_linears():
    """Muon through param_groups on GPT-2 updates each of q, k, v as Muon updates a Linear
    (out, in) holding that projection: the Conv1D block transposed, its gradient too."""
    model = gpt2()
    attn = model.transformer.h[0].attn.c_attn.weight
    before = attn.detach().clone()
    opt = matrixopt.Muon(matrixopt.param_groups(model), lr=0.02, weight_decay=0.1)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=tokens, labels=tokens).loss.backward()
    grads = attn.grad.detach().clone().split(32, dim=1)
    opt.step()
    for b, (w, g) in enumerate(zip(before.split(32, dim=1), grads)):
        linear = torch.nn.Parameter(w.T.clone())
        linear.grad = g.T.clone()
        matrixopt.Muon([linear], lr=0.02, weight_decay=0.1).step()
        torch.testing.assert_close(attn.detach()[:, 32 * b:32 * (b + 1)], linear.detach().T, rtol=1e-5, atol=1e-6)


def test_torchtitan_wqkv_blocks_are_its_heads():
    """torchtitan's FusedQKVLinear: one block per q head and per kv group's k and v
    (n_heads + 2·n_kv_heads = 4 + 2·2), each lying on one head of the wq / wk / wv its own
    state-dict hook splits the weight into."""
    from test_frameworks import torchtitan_llama

    model = torchtitan_llama()
    name = "layers.0.attention.qkv_linear.wqkv.weight"
    blocks = _blocks_of(matrixopt.param_groups(model))
    assert blocks == {f"layers.{i}.attention.qkv_linear.wqkv.weight": 8 for i in range(2)}
    fused = dict(model.named_parameters())[name].detach()
    heads = {tuple(h.flatten().tolist()) for key in ("wq", "wk", "wv")
             for h in model.state_dict()[name.replace("wqkv", key)].split(16)}    # head_dim 16
    assert {tuple(b.flatten().tolist()) for b in fused.split(fused.shape[0] // 8)} == heads


def test_moe_expert_stacks_gate_up_proj():
    """Expert stacks of gate and up: Mixtral's (E, 2·f, d) in 2 row blocks, Llama-4's
    (E, d, 2·f) in 2 column blocks; GPT-OSS interleaves them, and is left whole."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    small = dict(hidden_size=16, intermediate_size=24, num_local_experts=3)
    model = torch.nn.ModuleDict({
        "mixtral": MixtralExperts(transformers.MixtralConfig(**small)),
        "llama4": Llama4TextExperts(transformers.Llama4TextConfig(**small)),
        "gpt_oss": GptOssExperts(transformers.GptOssConfig(hidden_size=16, intermediate_size=24, num_local_experts=3))})
    assert model["mixtral"].gate_up_proj.shape == (3, 48, 16) and model["llama4"].gate_up_proj.shape == (3, 16, 48)
    assert _blocks_of(matrixopt.param_groups(model)) == {"mixtral.gate_up_proj": 2,
                                                         "llama4.gate_up_proj": (2, "columns")}


def test_qkv_proj_layouts_of_codegen_and_minimax():
    """CodeGen's qkv_proj is 4 groups of (q, v, k) (its forward: ``reshape(..., mp_num=4, -1)``
    then split), MiniMax's per head (q, k, v): contiguous blocks of equal sizes, not Phi-3's 3."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    codegen = transformers.CodeGenForCausalLM(transformers.CodeGenConfig(
        n_embd=32, n_head=4, n_layer=1, vocab_size=64, n_positions=16, rotary_dim=4))
    assert _blocks_of(matrixopt.param_groups(codegen)) == {"transformer.h.0.attn.qkv_proj.weight": 12}
    minimax = MiniMaxLightningAttention(transformers.MiniMaxConfig(hidden_size=32, num_attention_heads=4,
                                                                   num_key_value_heads=2), 0)
    assert _blocks_of(matrixopt.param_groups(torch.nn.ModuleDict({"attn": minimax}))) == {"attn.qkv_proj.weight": 12}


def test_fused_declares_other_projections_by_name():
    model = Transformer()
    groups = matrixopt.param_groups(model, fused={"mlp.0.weight": 4, "blocks.1.q.weight": (8, 4, 4)})
    assert _blocks_of(groups) == {"blocks.0.mlp.0.weight": 4, "blocks.1.mlp.0.weight": 4,
                                  "blocks.1.q.weight": (8, 4, 4)}
    with pytest.raises(ValueError, match=r"no param of the model is named or ends in \['c_attn.weight'\]"):
        matrixopt.param_groups(model, fused={"c_attn.weight": 3})
    groups = matrixopt.param_groups(model, fused={"q.weight": {"blocks": 2, "block_axis": "columns"}})
    assert _blocks_of(groups) == {f"blocks.{i}.q.weight": (2, "columns") for i in range(2)}
    with pytest.raises(ValueError, match=r"'q\.weight' takes blocks, or a dict"):
        matrixopt.param_groups(model, fused={"q.weight": {"block_axis": "columns"}})
