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


def _packed(model: nn.Module) -> dict[str, int]:
    """Params that pack several matrices as equal row blocks, by name → block count:
    nn.MultiheadAttention's ``in_proj_weight`` (q, k, v), LSTM (4 gates) and GRU (3) weights."""
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
    return packed


def param_groups(model: nn.Module, *, fallback: dict | None = None, **overrides) -> list[dict]:
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

    Packed matrices get a group of their own per block count, with ``blocks=k``: each of
    their k equal row blocks is orthogonalized / projected as its own matrix —
    ``nn.MultiheadAttention.in_proj_weight`` (q, k, v: 3), LSTM (4) and GRU (3) gate
    weights. Fused ``qkv`` / ``gate_up_proj`` Linears of other models are not recognizable
    by type: give them a group with ``blocks`` yourself (row sizes for GQA's unequal q, k, v).

    ``overrides`` (e.g. ``weight_decay=0.0``) go into every group; ``fallback`` into the
    fallback group only (e.g. ``fallback={"lr": 3e-4}``). Params are given as (name, tensor)
    pairs, so optimizer warnings and errors name them. Tied params appear once. Empty groups
    are left out.
    """
    heads = _head_linears(model)
    packed = _packed(model)
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
