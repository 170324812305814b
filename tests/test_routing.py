"""The bare-params rule (matrixopt.routing): ``cls(model.parameters())`` routes embedding-like
and output-head tables to the fallback without names.

The reference is :func:`matrixopt.param_groups`, which reads module types and names: on a
model zoo (LLaMA-style, nanoGPT and HF GPT-2 with tied embeddings, ViT, CNN, MoE with 3-D
experts, an LSTM LM, a tiny vocabulary) the params the rule sends to the fallback are the
matrices param_groups sends there. The decision is made once, warned once, kept across steps
and restored by load_state_dict (exact resume), equal under step_in_backward and on every
FSDP2 rank; explicit ``matrix=`` groups are never re-decided. Fused projections (litgpt's GQA
``qkv``, GPT-2's ``c_attn``, nn.MultiheadAttention, LSTM gates) read from the model at its
first call get param_groups' blocks, and bare params then train as param_groups does.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import matrixopt
from dist_utils import WORLD, sharded, spawn
from dist_utils import batches as dist_batches
from dist_utils import model as dist_model
from dist_utils import train as dist_train

torch.set_num_threads(1)


class Attention(nn.Module):
    def __init__(self, d, norm):
        super().__init__()
        self.norm = norm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        att = nn.functional.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h), is_causal=True)
        return x + self.o(att)


class SwiGLU(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm, self.gate, self.up = nn.RMSNorm(d), nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class LLaMA(nn.Module):
    """RMSNorm, SwiGLU, untied head (``tied``: nanoGPT-style, LayerNorm, GELU MLP, head = embedding)."""

    def __init__(self, vocab=64, d=32, layers=2, tied=False):
        super().__init__()
        norm = nn.LayerNorm if tied else nn.RMSNorm
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(Attention(d, norm), SwiGLU(d, 4 * d) if not tied else GeluMLP(d)) for _ in range(layers))
        self.norm = norm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class GeluMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc, self.proj = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.proj(nn.functional.gelu(self.fc(self.norm(x))))


class MoE(nn.Module):
    """Embedding, a dense softmax router over 4 experts stored as 3-D stacks, untied head."""

    def __init__(self, vocab=64, d=16, h=24, experts=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.router = nn.Linear(d, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, d, h) / d ** 0.5)
        self.w_out = nn.Parameter(torch.randn(experts, h, d) / h ** 0.5)
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        gates = torch.softmax(self.router(x), -1)                                    # (B, T, E)
        y = torch.einsum("bteh,ehd->bted", torch.relu(torch.einsum("btd,edh->bteh", x, self.w_in)), self.w_out)
        return self.lm_head(self.norm(x + (gates.unsqueeze(-1) * y).sum(-2)))


class LSTMLM(nn.Module):
    """PyTorch's word_language_model: encoder, LSTM, decoder (embedding and hidden widths differ)."""

    def __init__(self, vocab=50, e=16, h=24):
        super().__init__()
        self.encoder, self.rnn, self.decoder = nn.Embedding(vocab, e), nn.LSTM(e, h, batch_first=True), nn.Linear(h, vocab)

    def forward(self, tokens):
        return self.decoder(self.rnn(self.encoder(tokens))[0])


class ViT(nn.Module):
    """Conv patches, a class token and positions as bare Parameters, pre-LN blocks, a head."""

    def __init__(self, d=32, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        self.blocks = nn.Sequential(*(nn.TransformerEncoderLayer(d, 2, 2 * d, 0.0, batch_first=True, norm_first=True)
                                      for _ in range(2)))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, images):
        x = self.patch(images).flatten(2).mT
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class CNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(32, classes)

    def forward(self, images):
        return self.classifier(self.features(images))


def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def tokens(vocab, used, batch=4, seq=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, used, (batch, seq), generator=g) % vocab


def images(batch, size, seed=0):
    """Seeded images (a batch drawn from the global RNG at import would depend on which tests
    ran before)."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


#: name -> (model factory, batch, kind): "lm" next-token, "hf" HF causal LM, "image" classes.
ZOO = {
    "llama": (lambda: LLaMA(), tokens(64, 40), "lm"),
    "llama-all-tokens-seen": (lambda: LLaMA(), torch.arange(64).repeat(2, 1), "lm"),
    "tiny-vocab": (lambda: LLaMA(vocab=4), tokens(4, 4), "lm"),
    "nanogpt-tied": (lambda: LLaMA(vocab=300, tied=True), tokens(300, 300), "lm"),
    "hf-gpt2-tied": (hf_gpt2, tokens(300, 300), "hf"),
    "moe-3d-experts": (lambda: MoE(), tokens(64, 40), "lm"),
    "lstm-lm": (lambda: LSTMLM(), tokens(50, 20), "lm"),
    "vit": (lambda: ViT(), images(16, 16), "image"),
    "cnn": (lambda: CNN(), images(16, 8), "image"),
}


#: Softmax outputs the rule finds and param_groups does not: the LSTM LM's ``decoder`` is
#: neither named like a head nor shaped like its embedding (widths 24 and 16), and the MoE's
#: softmax ``router`` is a head over the experts (AdamW for the router, as many MoE recipes do).
BEYOND_PARAM_GROUPS = {"lstm-lm": {"decoder.weight"}, "moe-3d-experts": {"router.weight"}}


def loss_of(net, batch, kind):
    if kind == "hf":
        return net(input_ids=batch, labels=batch).loss
    if kind == "image":
        return nn.functional.cross_entropy(net(batch), torch.arange(len(batch)) % 10)
    logits = net(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def build(name, seed=0):
    torch.manual_seed(seed)
    factory, batch, kind = ZOO[name]
    return factory(), batch, kind


def fallback_matrices_of_param_groups(net):
    """Names of the params with ndim >= 2 that param_groups puts on the fallback."""
    return {n for g in matrixopt.param_groups(net) if not g["matrix"] for n, p in g["params"] if p.ndim >= 2}


def routed_to_fallback(net, opt):
    names = {id(p): n for n, p in net.named_parameters()}
    group = opt.param_groups[0]
    return {names[id(p)] for p, d in zip(group["params"], group["routed"]) if p.ndim >= 2 and d is False}


@pytest.mark.parametrize("name", list(ZOO))
def test_bare_params_route_what_param_groups_routes(name):
    net, batch, kind = build(name)
    opt = matrixopt.Muon(net.parameters(), lr=1e-3)
    loss_of(net, batch, kind).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.step()   # decided once: no second warning
    expected = fallback_matrices_of_param_groups(net) | BEYOND_PARAM_GROUPS.get(name, set())
    assert routed_to_fallback(net, opt) == expected
    messages = [str(w.message) for w in caught if "bare-params rule" in str(w.message)]
    assert len(messages) == (1 if expected else 0)
    assert not expected or messages[0].count("param_groups[0]['params']") == len(expected)


def test_the_warning_names_the_params_when_given_names():
    net, batch, kind = build("llama")
    opt = matrixopt.Muon(list(net.named_parameters()), lr=1e-3)
    loss_of(net, batch, kind).backward()
    with pytest.warns(UserWarning, match=r"embed\.weight: embedding rows .*lm_head\.weight: output head"):
        opt.step()


def test_tied_tiny_vocabulary_is_the_known_miss():
    """Tied, every token in the first batch, the vocabulary smaller than the width: no
    evidence (the table's gradient is dense, its head part is not zero-sum with the
    embedding part added); it stays on the matrix rule, as README says."""
    torch.manual_seed(0)
    net = LLaMA(vocab=8, tied=True)
    opt = matrixopt.Muon(net.parameters(), lr=1e-3)
    loss_of(net, tokens(8, 8), "lm").backward()
    opt.step()
    assert routed_to_fallback(net, opt) == set()


def test_a_lone_matrix_is_never_routed():
    """An optimizer (or a group) over one matrix has nothing to compare it with: the matrix
    rule runs on it whatever its shape or first gradient (zero rows, zero-sum rows, a
    broadcast-like leading 1, a vocabulary-like height)."""
    zero_rows = torch.randn(64, 32)
    zero_rows[:40] = 0
    zero_sum = torch.randn(10, 32)
    zero_sum -= zero_sum.mean(0)
    for shape, grad in (((64, 32), zero_rows), ((10, 32), zero_sum), ((1, 6, 4), None), ((5000, 8), None)):
        p = nn.Parameter(torch.randn(shape))
        opt = matrixopt.Muon([p, nn.Parameter(torch.zeros(3))], lr=1e-3)
        p.grad = torch.randn(shape) if grad is None else grad
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        assert opt.param_groups[0]["routed"][0] is True, shape
        assert set(opt.state[p]) == {"momentum_buffer"}


def test_random_gradients_on_small_sets_stay_on_the_matrix_rule():
    """What unit tests do: a few matrices of assorted shapes, dense random gradients (at any
    scale). No exactly-zero rows, rows far from zero-sum, no table tied to a head."""
    shapes = [(6, 4), (3, 5, 4), (5, 3), (12, 8), (10, 6), (5, 8), (24, 40), (40, 4), (1, 7), (7, 1), (2, 2)]
    for seed in range(20):
        for scale in (1e-30, 1.0, 1e30):
            g = torch.Generator().manual_seed(seed)
            ps = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
            opt = matrixopt.Muon(ps, lr=1e-3)
            for p in ps:
                p.grad = scale * torch.randn(p.shape, generator=g)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                opt.step()
            assert all(opt.param_groups[0]["routed"]), (seed, scale)


def test_bf16_autocast_head_is_found():
    """Under bf16 autocast the logits' gradient is rounded to bf16 before the head's matmul:
    its rows sum to zero to ~1e-3 of its norm, not to fp32 rounding; still a head."""
    net, batch, kind = build("lstm-lm")
    opt = matrixopt.Muon(net.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(net, batch, kind)
    loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert routed_to_fallback(net, opt) == {"encoder.weight", "decoder.weight"}


def test_a_non_finite_first_gradient_is_not_read():
    """A NaN in a matrix's first gradient decides nothing (the step's non-finite policy skips
    it); the next finite gradient decides."""
    net, batch, kind = build("llama")
    opt = matrixopt.Muon(net.parameters(), lr=1e-3, nonfinite="skip")
    loss_of(net, batch, kind).backward()
    net.lm_head.weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
        index = next(i for i, p in enumerate(opt.param_groups[0]["params"]) if p is net.lm_head.weight)
        assert opt.param_groups[0]["routed"][index] is None
        opt.zero_grad()
        loss_of(net, batch, kind).backward()
        opt.step()
    assert routed_to_fallback(net, opt) == {"embed.weight", "lm_head.weight"}


@pytest.mark.parametrize("name", ["Muon", "GaLoreAdamW"])
def test_a_state_dict_before_the_first_step_decides_nothing(name):
    """torch.distributed.checkpoint's get_optimizer_state_dict makes a fresh optimizer's state by
    an lr-0 step on all-zero gradients: that step routes by the shapes alone and records
    nothing; the first real gradient decides as without it, and the tables' state from the
    zero step (the matrix rule's) is replaced by the fallback's."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    net, batch, kind = build("llama")
    opt = getattr(matrixopt, name)(net.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_optimizer_state_dict(net, opt)
        assert all(d is None for p, d in zip(opt.param_groups[0]["params"], opt.param_groups[0]["routed"])
                   if p.ndim == 2)
        assert "momentum_buffer" in opt.state[net.embed.weight] or "proj_left" in opt.state[net.embed.weight] \
            or "proj_right" in opt.state[net.embed.weight]   # the shapes' verdict: the matrix rule
        loss_of(net, batch, kind).backward()
        opt.step()
    assert routed_to_fallback(net, opt) == {"embed.weight", "lm_head.weight"}
    assert set(opt.state[net.embed.weight]) == {"step", "exp_avg", "exp_avg_sq"}   # AdamW's, fresh
    assert opt.state[net.embed.weight]["step"] == 1


def test_explicit_groups_are_never_decided():
    net, batch, kind = build("llama")
    groups = [{"params": list(net.parameters()), "matrix": True}]
    opt = matrixopt.Muon(groups, lr=1e-3)
    loss_of(net, batch, kind).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert "routed" not in opt.param_groups[0]
    assert set(opt.state[net.embed.weight]) == {"momentum_buffer"}     # the matrix rule's state


def train(net, opt, batches, kind="lm"):
    for batch in batches:
        opt.zero_grad()
        loss_of(net, batch, kind).backward()
        opt.step()


@pytest.mark.parametrize("cls", [matrixopt.Muon, matrixopt.GaLoreAdamW])
def test_decision_is_stable_and_resumes_exactly(cls, tmp_path):
    """The LSTM LM's embedding is decided by its rows on the first batch (20 of 50 tokens);
    later batches with every token would not say so, but the record stands; a checkpoint
    restores it into a fresh optimizer, which continues bit for bit."""
    later = [torch.arange(50).repeat(2, 1)] * 2 + [tokens(50, 50, seed=s) for s in range(3)]
    net, first, _ = build("lstm-lm")
    kwargs = dict(rank=4, update_proj_gap=2) if cls is matrixopt.GaLoreAdamW else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(net.parameters(), lr=1e-2, **kwargs)
        train(net, opt, [first] + later[:2])
        decided = list(opt.param_groups[0]["routed"])
        torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
        train(net, opt, later[2:])
        assert opt.param_groups[0]["routed"] == decided
        assert decided[0] is False                                     # the embedding

        resumed, _, _ = build("lstm-lm", seed=1)
        saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        resumed.load_state_dict(saved["model"])
        opt2 = cls(resumed.parameters(), lr=1e-2, **kwargs)
        opt2.load_state_dict(saved["opt"])
        assert opt2.param_groups[0]["routed"] == decided
        assert opt2.param_groups[0]["routed_blocks"] == opt.param_groups[0]["routed_blocks"]   # the LSTM's gates
        train(resumed, opt2, later[2:])
    for (n, p), q in zip(net.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_step_in_backward_decides_as_step():
    """Each param decided from its own gradient inside backward: the same record, the same
    weights as the ordinary loop (buckets of one param here: every matrix has its own shape
    or the update is per matrix)."""
    results = []
    for in_backward in (False, True):
        net, batch, kind = build("lstm-lm")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = matrixopt.Muon(net.parameters(), lr=1e-2)
            if in_backward:
                matrixopt.step_in_backward(opt)
                for _ in range(3):
                    loss_of(net, batch, kind).backward()
            else:
                train(net, opt, [batch] * 3)
        results.append((opt.param_groups[0]["routed"], [p.detach().clone() for p in net.parameters()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_bad_record_is_refused_naming_the_key():
    net, _, _ = build("llama")
    opt = matrixopt.Muon(net.parameters(), lr=1e-3)
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0]["routed"] = [True]
    with pytest.raises(ValueError, match="Invalid 'routed' in a param group"):
        opt.load_state_dict(state)


# -- fused projections: the blocks param_groups gives, read from the model at its first call --------

def litgpt_gpt():
    litgpt = pytest.importorskip("litgpt")
    return litgpt.GPT(litgpt.Config(n_layer=2, n_head=4, n_query_groups=2, n_embd=32, block_size=16, vocab_size=96,
                                    padded_vocab_size=96, bias=False, norm_class_name="RMSNorm",
                                    mlp_class_name="LLaMAMLP", intermediate_size=64))


#: Models with fused projections: litgpt's GQA ``qkv`` (unequal row blocks), GPT-2's ``Conv1D``
#: ``c_attn`` (column blocks), nn.MultiheadAttention's ``in_proj_weight`` (a ViT's encoder
#: layers), LSTM gates.
FUSED = {"litgpt-gqa": (litgpt_gpt, tokens(96, 60), "lm"), **{k: ZOO[k] for k in ("hf-gpt2-tied", "vit", "lstm-lm")}}


def build_fused(name, seed=0):
    torch.manual_seed(seed)
    factory, batch, kind = FUSED[name]
    return factory(), batch, kind


def param_groups_blocks(net):
    """param name → the blocks entries param_groups gives it (its blocked groups)."""
    names = {id(p): n for n, p in net.named_parameters()}
    return {names[id(p)]: {k: g[k] for k in ("blocks", "block_axis") if k in g}
            for g in matrixopt.param_groups(net) if "blocks" in g for _, p in g["params"]}


def recorded_blocks(net, opt):
    names = {id(p): n for n, p in net.named_parameters()}
    group = opt.param_groups[0]
    return {names[id(p)]: b for p, b in zip(group["params"], group.get("routed_blocks") or []) if b is not None}


def forward_pre_hooks():
    return len(torch.nn.modules.module._global_forward_pre_hooks)


@pytest.mark.parametrize("wrap", ["none", "compiled"])
@pytest.mark.parametrize("name", list(FUSED))
def test_bare_params_split_the_fused_projections_param_groups_splits(name, wrap):
    """The rule reads the fused projections from the first module called (here the model, or
    torch.compile's wrapper of it), records param_groups' blocks for each, warns naming them, and
    stops watching (its global hook removed)."""
    hooks = forward_pre_hooks()
    net, batch, kind = build_fused(name)
    opt = matrixopt.Muon(net.parameters(), lr=1e-3)
    assert forward_pre_hooks() == hooks + 1
    model = torch.compile(net, backend="eager") if wrap == "compiled" else net
    loss_of(model, batch, kind).backward()
    assert forward_pre_hooks() == hooks                 # seen at the first call: the hook is gone
    with pytest.warns(UserWarning, match="split into blocks, fused projections"):
        opt.step()
    want = param_groups_blocks(net)
    assert want and recorded_blocks(net, opt) == want
    if name == "litgpt-gqa":
        assert want["transformer.h.0.attn.qkv.weight"] == {"blocks": (32, 16, 16)}      # q, k, v of 4 heads, 2 groups


#: Deterministic settings: a randomized refresh or sketch draws by the param's place in the
#: optimizer (group, index), which bare params and param_groups do not share.
DETERMINISTIC = {"Muon": {}, "ROOT": {}, "ARO": {}, "DCTAdamW": {"rank": 8, "update_proj_gap": 2},
                 "GaLoreAdamW": {"rank": 8, "update_proj_gap": 2, "svd": "exact"}}


@pytest.mark.parametrize("cls", list(DETERMINISTIC))
@pytest.mark.parametrize("name", ["litgpt-gqa", "hf-gpt2-tied"])
def test_bare_params_train_as_param_groups_on_fused_models(name, cls):
    """Where the rule routes the tables as param_groups does, bare params and param_groups(model)
    give the same weights, fused projections and all (param_groups' blocks are checked against
    separate matrices in test_torch_behaviours and test_param_groups)."""
    runs = []
    for bare in (True, False):
        net, batch, kind = build_fused(name)
        kwargs = dict(lr=1e-2, weight_decay=0.1, **DETERMINISTIC[cls])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = getattr(matrixopt, cls)(net.parameters() if bare else matrixopt.param_groups(net), **kwargs)
            train(net, opt, [batch, tokens(*((96, 96) if name == "litgpt-gqa" else (300, 300)), seed=1)] * 2, kind)
        runs.append(net)
    for (n, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


def test_a_model_never_called_splits_nothing_and_stops_watching():
    """Gradients set without calling the model: nothing seen, nothing split; the first gradient
    read ends the watch. A dropped optimizer, or a copy, watches nothing."""
    hooks = forward_pre_hooks()
    net, _, _ = build_fused("lstm-lm")
    opt = matrixopt.Muon(net.parameters(), lr=1e-3)
    copy.deepcopy(opt)
    assert forward_pre_hooks() == hooks + 1
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert "routed_blocks" not in opt.param_groups[0] and forward_pre_hooks() == hooks
    matrixopt.Muon(build_fused("lstm-lm")[0].parameters(), lr=1e-3)   # dropped at once
    assert forward_pre_hooks() == hooks


class EncoderDecoder(nn.Module):
    """Two parts a loop may call one by one (Lightning's ``training_step`` calls no module of
    its own): an attention encoder, an LSTM decoder."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True)
        self.dec = nn.LSTM(16, 24, batch_first=True)
        self.head = nn.Linear(24, 50)


def test_parts_called_one_by_one_and_groups_added_later_are_split_as_param_groups_splits():
    """The watch reads every module called until each param was in one: a loop that calls the
    parts itself (after a warm-up call of one layer) splits what param_groups splits, and a
    group added after the model was seen (progressive unfreezing) finds its params read too."""
    torch.manual_seed(0)
    net, batch = EncoderDecoder(), tokens(50, 20)
    net.dec.requires_grad_(False)
    opt = matrixopt.Muon([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    with torch.no_grad():
        net.enc.linear1(torch.zeros(1, 16))                    # one layer first: its own params only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for unfreeze in (False, True):
            if unfreeze:
                net.dec.requires_grad_(True)
                opt.add_param_group({"params": list(net.dec.parameters())})
            logits = net.head(net.dec(net.enc(net.embed(batch[:, :-1])))[0])
            nn.functional.cross_entropy(logits.reshape(-1, 50), batch[:, 1:].reshape(-1)).backward()
            opt.step()
    names = {id(p): n for n, p in net.named_parameters()}
    recorded = {names[id(p)]: b for g in opt.param_groups for p, b in zip(g["params"], g.get("routed_blocks") or [])
                if b}
    assert recorded == param_groups_blocks(net)
    assert set(recorded) == {"enc.self_attn.in_proj_weight", "dec.weight_ih_l0", "dec.weight_hh_l0"}


class AttentionOnly(nn.Module):
    """nn.MultiheadAttention among d×d Linears only: its in_proj_weight (3·d rows) is over twice
    as tall as every other matrix, which rule 4b alone would take for a vocabulary table."""

    def __init__(self, d=16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(4))
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.attn(x, x, x, need_weights=False)[0]


def test_a_fused_projection_the_model_names_is_never_a_shape_rules_table():
    torch.manual_seed(0)
    net = AttentionOnly()
    opt = matrixopt.Muon(net.parameters(), lr=1e-3)
    net(torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))).square().mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert routed_to_fallback(net, opt) == set() == fallback_matrices_of_param_groups(net)
    assert recorded_blocks(net, opt) == param_groups_blocks(net) == {"attn.in_proj_weight": {"blocks": 3}}


def test_a_copy_of_an_optimizer_never_watches():
    hooks = forward_pre_hooks()
    net, _, _ = build_fused("lstm-lm")
    opt = matrixopt.Muon(list(net.parameters())[:2], lr=1e-3)
    twin = copy.deepcopy(opt)
    del opt
    twin.add_param_group({"params": list(net.parameters())[2:]})
    assert forward_pre_hooks() == hooks


def test_state_made_before_the_model_is_seen_is_replaced_by_the_split():
    """torch.distributed.checkpoint's lr-0 step on zero gradients comes before any forward: its
    state is the whole matrices'; the first real step splits the LSTM's gates, and its matrices
    and their state then equal a run's without that step (the fallback's 1-D params differ:
    torch's zero step counts in their AdamW's bias correction)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    runs = []
    for zero_step in (True, False):
        net, batch, kind = build_fused("lstm-lm")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = matrixopt.GaLoreAdamW(net.parameters(), lr=1e-2, rank=4, update_proj_gap=2)
            if zero_step:
                get_optimizer_state_dict(net, opt)
                assert opt.state[net.rnn.weight_hh_l0]["proj_right"].shape == (1, 24, 4)   # whole (96, 24)
            train(net, opt, [batch])
        assert recorded_blocks(net, opt) == {"rnn.weight_ih_l0": {"blocks": 4}, "rnn.weight_hh_l0": {"blocks": 4}}
        assert opt.state[net.rnn.weight_hh_l0]["proj_right"].shape == (4, 24, 4)          # per gate
        runs.append((net, opt.state))
    (net, state), (reference, reference_state) = runs
    for name in ("weight_ih_l0", "weight_hh_l0"):
        p, q = getattr(net.rnn, name), getattr(reference.rnn, name)
        assert torch.equal(p, q), name
        assert set(state[p]) == set(reference_state[q])
        for key, value in state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(reference_state[q][key])), (name, key)


def test_a_bad_blocks_record_is_refused_naming_the_key():
    net, batch, kind = build_fused("lstm-lm")
    opt = matrixopt.Muon(net.parameters(), lr=1e-3)
    loss_of(net, batch, kind).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    for bad, match in (([None], "Invalid 'routed_blocks'"), (None, "Invalid blocks for")):
        state = copy.deepcopy(opt.state_dict())
        record = state["param_groups"][0]["routed_blocks"]
        state["param_groups"][0]["routed_blocks"] = bad or [b and {"blocks": 5} for b in record]
        with pytest.raises(ValueError, match=match):
            matrixopt.Muon(build_fused("lstm-lm")[0].parameters(), lr=1e-3).load_state_dict(state)


def _fsdp_worker(rank, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = sharded(dist_model())
        opt = matrixopt.Muon(net.parameters(), lr=0.02)
        dist_train(net, opt, dist_batches(2))
        # DDP, each rank half of every batch: DDP's averaged gradient is the whole batch's.
        ddp = torch.nn.parallel.DistributedDataParallel(dist_model())
        ddp_opt = matrixopt.Muon(ddp.module.parameters(), lr=0.02)
        dist_train(ddp, ddp_opt, [tokens.chunk(WORLD)[rank] for tokens in dist_batches(2)])
    torch.save(opt.param_groups[0]["routed"], f"{out}/routed{rank}.pt")
    torch.save(ddp_opt.param_groups[0]["routed"], f"{out}/ddp-routed{rank}.pt")


@pytest.mark.distributed
def test_fsdp2_and_ddp_ranks_decide_as_the_single_process(tmp_path):
    net = dist_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = matrixopt.Muon(net.parameters(), lr=0.02)
        dist_train(net, opt, dist_batches(2))
    want = opt.param_groups[0]["routed"]
    assert want[0] is False and want[-2] is False      # the embedding and the head (weight, bias last)
    spawn(_fsdp_worker, str(tmp_path))
    for rank in range(WORLD):
        assert torch.load(tmp_path / f"routed{rank}.pt") == want
        assert torch.load(tmp_path / f"ddp-routed{rank}.pt") == want


class GateUp(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_up_proj, self.down = nn.Linear(d, 2 * f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


class FusedNet(nn.Module):
    """nn.MultiheadAttention's in_proj_weight (3 blocks of 16 rows: 2 FSDP2 pieces of 24 rows cut
    them) and a gate_up_proj (2 blocks of 24 rows: each piece one whole block)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.attn = nn.MultiheadAttention(16, 2, bias=False, batch_first=True)
        self.mlp = GateUp(16, 24)
        self.out = nn.Linear(16, 16, bias=False)
        self.head = nn.Linear(16, 11, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x + self.out(self.mlp(x)))


def fused_net():
    torch.manual_seed(0)
    return FusedNet()


def _fused_worker(rank, out):
    from torch.distributed.fsdp import fully_shard

    batches = [tokens(11, 6, seed=s) for s in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = fused_net()
        for module in (net.attn, net.mlp, net):
            fully_shard(module)
        opt = matrixopt.Muon(net.parameters(), lr=0.02)
        train(net, opt, batches)
        ddp = torch.nn.parallel.DistributedDataParallel(fused_net())
        ddp_opt = matrixopt.Muon(ddp.module.parameters(), lr=0.02)
        train(ddp, ddp_opt, [b.chunk(2)[rank] for b in batches])
    torch.save({"fsdp": opt.param_groups[0]["routed_blocks"], "ddp": ddp_opt.param_groups[0]["routed_blocks"],
                "ddp weights": {n: p.detach() for n, p in ddp.module.named_parameters()}}, f"{out}/blocks{rank}.pt")


@pytest.mark.distributed
def test_fsdp2_and_ddp_ranks_split_as_the_single_process_where_pieces_hold_whole_blocks(tmp_path):
    """Every rank records the same blocks: DDP's the single process's (and its weights, to the
    rounding of the gradients' all-reduce); FSDP2's the same where each piece holds whole blocks
    (gate_up_proj) and none where the pieces would cut them (in_proj_weight stays one matrix, no
    error)."""
    net = fused_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = matrixopt.Muon(net.parameters(), lr=0.02)
        train(net, opt, [tokens(11, 6, seed=s) for s in range(2)])
    want = recorded_blocks(net, opt)
    assert want == {"attn.in_proj_weight": {"blocks": 3}, "mlp.gate_up_proj.weight": {"blocks": 2}}
    spawn(_fused_worker, str(tmp_path))
    names = [n for n, _ in net.named_parameters()]
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"blocks{rank}.pt")
        assert {n: b for n, b in zip(names, saved["ddp"]) if b} == want
        assert {n: b for n, b in zip(names, saved["fsdp"]) if b} == {"mlp.gate_up_proj.weight": {"blocks": 2}}
        for n, p in net.named_parameters():
            torch.testing.assert_close(saved["ddp weights"][n], p.detach(), rtol=1e-5, atol=1e-5, msg=n)


def _unfit_worker(rank, out):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = fully_shard(litgpt_gpt())
    opt = matrixopt.Muon(net.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_of(net, tokens(96, 60), "lm").backward()
        opt.step()
    torch.save({"messages": [str(w.message) for w in caught], "blocks": opt.param_groups[0].get("routed_blocks")},
               f"{out}/unfit.pt")


@pytest.mark.distributed
def test_blocks_a_dtensor_does_not_take_leave_it_whole_named_in_the_warning(tmp_path):
    """litgpt's GQA qkv blocks are unequal (q, k, v), which a DTensor does not take: under
    FSDP2 each qkv stays one matrix, no error, and the warning says so."""
    pytest.importorskip("litgpt")
    spawn(_unfit_worker, str(tmp_path), world=1)
    saved = torch.load(tmp_path / "unfit.pt")
    assert saved["blocks"] is None
    (message,) = [m for m in saved["messages"] if "bare-params rule" in m]
    assert "left whole" in message and "transformer.h.0.attn.qkv.weight, transformer.h.1.attn.qkv.weight" in message
