"""param_groups(model): which params get the matrix rule and which the AdamW fallback."""
import re

from torch import nn

from .matrices import matrix_shape

HEAD_NAMES = ("lm_head", "output", "classifier", "head")
# Params registered directly on a module (not an Embedding's weight) that are tables of
# vectors, not linear maps: positional embeddings, class/mask/register tokens.
VECTOR_TABLE = re.compile(r"emb|^wpe$|^wte$|tokens?$")


def _head_linears(model: nn.Module) -> set[str]:
    """Names of the Linear modules that are the model's output head.

    A Linear is a head if its own name is one of HEAD_NAMES, or if it is the last Linear
    whose weight is tied to (the same tensor as) an embedding's weight; failing both, the
    last Linear shaped like an embedding's weight.
    """
    embeddings = [m.weight for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    heads, tied, shaped = set(), None, None
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.rsplit(".", 1)[-1] in HEAD_NAMES:
            heads.add(name)
        if any(module.weight is e for e in embeddings):
            tied = name
        elif any(module.weight.shape == e.shape for e in embeddings):
            shaped = name
    if tied is not None:
        heads.add(tied)
    elif not heads and shaped is not None:
        # Only a guess: a hidden Linear can have the embedding's shape too (vocab = 4·d_model).
        heads.add(shaped)
    return heads


def _qkv(q: int, kv: int, rows: int) -> int | tuple | None:
    """``blocks`` of a fused q, k, v projection with q and kv rows each: 3 when equal, the
    three sizes when not, None if they do not add up to the weight's ``rows``."""
    if q + 2 * kv != rows:
        return None
    return 3 if q == kv else (q, kv, kv)


def _fused(module: nn.Module) -> dict[str, int | tuple]:
    """Fused projections of the training codebases' modules (recognised by their attributes,
    nothing imported), by the module's own param name → ``blocks``:

    - litgpt's ``CausalSelfAttention.qkv``: q, k, v one after the other, sizes from its
      ``config`` (``n_head``, ``n_query_groups``, ``head_size``);
    - GPT-NeoX / Pythia's ``query_key_value``: interleaved per head (q, k, v of head 0, then
      of head 1, …): its 3·``num_attention_heads`` blocks of ``head_size`` rows, each
      head's q, k and v a matrix of its own (the contiguous split that respects q/k/v);
    - transformers' ``qkv_proj`` (Phi-3 and others: q, k, v one after the other, sizes from
      ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``) and ``gate_up_proj``
      Linears (gate, up: 2 equal halves).
    """
    config = getattr(module, "config", None)
    found = {}
    qkv = getattr(module, "qkv", None)
    if isinstance(qkv, nn.Linear) and all(hasattr(config, a) for a in ("n_head", "n_query_groups", "head_size")):
        found["qkv.weight"] = _qkv(config.n_head * config.head_size, config.n_query_groups * config.head_size,
                                   qkv.out_features)
    qkv = getattr(module, "query_key_value", None)
    if isinstance(qkv, nn.Linear) and type(module).__name__.startswith("GPTNeoX") and hasattr(module, "head_size"):
        heads = qkv.out_features // (3 * module.head_size)
        found["query_key_value.weight"] = 3 * heads if 3 * heads * module.head_size == qkv.out_features else None
    qkv = getattr(module, "qkv_proj", None)
    if isinstance(qkv, nn.Linear) and hasattr(config, "num_attention_heads"):
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
        found["qkv_proj.weight"] = _qkv(heads * head_dim, kv_heads * head_dim, qkv.out_features)
    gate_up = getattr(module, "gate_up_proj", None)
    if isinstance(gate_up, nn.Linear) and gate_up.out_features % 2 == 0:
        found["gate_up_proj.weight"] = 2
    return {name: blocks for name, blocks in found.items() if blocks is not None}


def _packed(model: nn.Module, declared: dict) -> dict[str, int | tuple]:
    """Params that pack several matrices as row blocks, by name → ``blocks``:
    nn.MultiheadAttention's ``in_proj_weight`` (q, k, v), LSTM (4 gates) and GRU (3) weights,
    the fused projections of :func:`_fused`, and ``declared`` (a param's name, or the end of
    it after a dot → blocks; it overrides the others)."""
    packed = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            packed[f"{prefix}in_proj_weight"] = 3
        elif isinstance(module, (nn.LSTM, nn.GRU)):
            gates = 4 if isinstance(module, nn.LSTM) else 3
            for pname, _ in module.named_parameters(recurse=False):
                if pname.startswith(("weight_ih", "weight_hh")):
                    packed[prefix + pname] = gates
        packed.update({prefix + pname: blocks for pname, blocks in _fused(module).items()})
    unused = set(declared)
    for name, _ in model.named_parameters():
        for key in declared:
            if name == key or name.endswith("." + key):
                packed[name] = declared[key]
                unused.discard(key)
    if unused:
        raise ValueError(f"param_groups(fused=...): no param of the model is named or ends in {sorted(unused)}")
    return packed


def param_groups(model: nn.Module, *, fallback: dict | None = None, fused: dict | None = None,
                 **overrides) -> list[dict]:
    """Split ``model``'s trainable params into a matrix group and an AdamW-fallback group.

    The rule (the usual practice for Muon-style optimizers):

    - matrix rule (``matrix=True``): every param with ``ndim >= 2`` that is not below;
    - AdamW fallback (``matrix=False``): ``nn.Embedding``/``nn.EmbeddingBag`` weights, the
      output head (a Linear named ``lm_head``/``output``/``classifier``/``head``, or the last
      Linear whose weight is tied to an embedding's, or, when no head is named or tied, the
      last Linear shaped like an embedding's weight), every param with ``ndim < 2``
      (biases, norms' gains, scalars), every param whose matrices are vectors (a side of 1,
      e.g. a (1, 1, d) class token), and params whose own name says they are embedding or
      token tables (containing "emb", ending in "token(s)", or ``wpe``/``wte``; e.g. a
      ViT's ``pos_embed`` registered as a bare ``nn.Parameter``).

    Packed matrices get a group of their own per ``blocks`` value: each of their row blocks
    is orthogonalized / projected as its own matrix — ``nn.MultiheadAttention.in_proj_weight``
    (q, k, v: 3), LSTM (4) and GRU (3) gate weights, and the fused projections of litgpt,
    GPT-NeoX / Pythia and transformers' ``qkv_proj`` / ``gate_up_proj`` (:func:`_fused`; GQA
    sizes read from the module's config). ``fused={"name": blocks}`` declares others (a
    param's name or its ending, e.g. ``{"attn.c_attn.weight": 3}``; ``blocks`` a count of
    equal row blocks or the row sizes) and overrides a recognised one; a name no param has
    is a ValueError.

    ``overrides`` (e.g. ``weight_decay=0.0``) go into every group; ``fallback`` into the
    fallback group only (e.g. ``fallback={"lr": 3e-4}``). Params are given as (name, tensor)
    pairs, so optimizer warnings and errors name them. Tied params appear once. Empty groups
    are left out.
    """
    heads = _head_linears(model)
    packed = _packed(model, fused or {})
    embedding_modules = {name for name, m in model.named_modules()
                         if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    matrix, other, blocked = [], [], {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner, _, leaf = name.rpartition(".")
        on_fallback = (p.ndim < 2 or owner in heads or owner in embedding_modules
                       or min(matrix_shape(p)[1:]) == 1 or VECTOR_TABLE.search(leaf.lower()) is not None)
        if not on_fallback and name in packed:
            blocked.setdefault(packed[name], []).append((name, p))
        else:
            (other if on_fallback else matrix).append((name, p))
    groups = []
    if matrix:
        groups.append({"params": matrix, "matrix": True, **overrides})
    for k, params in blocked.items():
        groups.append({"params": params, "matrix": True, "blocks": k, **overrides})
    if other:
        groups.append({"params": other, "matrix": False, **overrides, **(fallback or {})})
    return groups
