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


COLUMNS = {"block_axis": "columns"}


def _qkv(q: int, kv: int, rows: int) -> int | tuple | None:
    """``blocks`` of a fused q, k, v projection with q and kv rows each: 3 when equal, the
    three sizes when not, None if they do not add up to the weight's ``rows``."""
    if q + 2 * kv != rows:
        return None
    return 3 if q == kv else (q, kv, kv)


def _equal(count: int, size: int, total: int) -> int | None:
    """``count`` blocks of ``size`` if they make up ``total``, else None."""
    return count if count >= 2 and count * size == total else None


def _linear_out(module: nn.Module, attr: str) -> int | None:
    """The output size of ``module.<attr>`` if it is an ``nn.Linear``, else None."""
    child = getattr(module, attr, None)
    return child.out_features if isinstance(child, nn.Linear) else None


def _attention(module: nn.Module, kind: str) -> dict:
    """Fused q, k, v projections stored as Linear rows, by the module's param name → blocks:

    - litgpt's ``CausalSelfAttention.qkv``: q, k, v one after the other, sizes from its
      ``config`` (``n_head``, ``n_query_groups``, ``head_size``);
    - GPT-NeoX / Pythia's ``query_key_value``: q, k, v of head 0, then of head 1, …: its
      3·``num_attention_heads`` blocks of ``head_size`` rows (the contiguous split that
      respects q/k/v);
    - torchtitan's ``FusedQKVLinear.wqkv`` (llama3, qwen3): per kv group its q heads, then
      k, then v: ``out_features / head_dim`` = n_heads + 2·n_kv_heads blocks;
    - transformers' ``qkv_proj``: Phi-3 / Phi-4 q, k, v one after the other (sizes from
      ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``); MiniMax q, k, v per
      head (3·heads blocks); CodeGen 4 groups of q, v, k (12 blocks; transformers' mp_num).
    """
    config, found = getattr(module, "config", None), {}
    rows = _linear_out(module, "qkv")
    if rows and all(hasattr(config, a) for a in ("n_head", "n_query_groups", "head_size")):
        found["qkv.weight"] = _qkv(config.n_head * config.head_size, config.n_query_groups * config.head_size, rows)
    rows = _linear_out(module, "query_key_value")
    if rows and kind.startswith("GPTNeoX") and hasattr(module, "head_size"):
        found["query_key_value.weight"] = _equal(rows // module.head_size, module.head_size, rows)
    rows = _linear_out(module, "wqkv")
    if rows and hasattr(module, "heads_per_kv") and hasattr(module, "head_dim"):
        found["wqkv.weight"] = _equal(rows // module.head_dim, module.head_dim, rows)
    rows = _linear_out(module, "qkv_proj")
    if rows and kind.startswith(("Phi3", "Phi4")) and hasattr(config, "num_attention_heads"):
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(module, "head_dim", None) or config.hidden_size // heads
        found["qkv_proj.weight"] = _qkv(heads * head_dim, kv_heads * head_dim, rows)
    elif rows and kind.startswith(("MiniMax", "CodeGen")) and hasattr(module, "num_attention_heads"):
        count = 12 if kind.startswith("CodeGen") else 3 * module.num_attention_heads
        found["qkv_proj.weight"] = _equal(count, rows // count, rows)
    return {name: {"blocks": blocks} for name, blocks in found.items() if blocks is not None}


def _gates_and_conv1d(module: nn.Module, kind: str) -> dict:
    """Fused gate/up projections and transformers' ``Conv1D`` q, k, v, by the module's param
    name → its group entries:

    - ``gate_up_proj`` (transformers: gate, then up, split by ``chunk(2, -1)``): a Linear's
      rows in 2 halves; an expert stack (E, 2·f, d) (Mixtral, Qwen-MoE, DeepSeek, …) the same;
      Llama-4's (E, d, 2·f) its columns in 2. GPT-OSS interleaves gate and up columns
      (``[..., ::2]``): no split into blocks expresses that, so it stays one matrix;
    - ``c_attn`` (GPT-2, ImageGPT, Decision Transformer, OpenAI GPT): a ``Conv1D`` stores its
      weight (in, out), q, k, v (cross-attention: k, v) as column blocks of ``split_size``.
    """
    found = {}
    gate_up = getattr(module, "gate_up_proj", None)
    if isinstance(gate_up, nn.Linear) and gate_up.out_features % 2 == 0:
        found["gate_up_proj.weight"] = {"blocks": 2}
    elif isinstance(gate_up, nn.Parameter) and gate_up.ndim == 3:
        if gate_up.shape[1] == 2 * getattr(module, "intermediate_dim", -1):
            found["gate_up_proj"] = {"blocks": 2}
        elif kind.startswith("Llama4") and gate_up.shape[2] == 2 * getattr(module, "expert_dim", -1):
            found["gate_up_proj"] = {"blocks": 2, **COLUMNS}
    conv = getattr(module, "c_attn", None)
    if type(conv).__name__ == "Conv1D" and isinstance(getattr(module, "split_size", None), int):
        blocks = _equal(conv.weight.shape[1] // module.split_size, module.split_size, conv.weight.shape[1])
        if blocks:
            found["c_attn.weight"] = {"blocks": blocks, **COLUMNS}
    return found


def _fused(module: nn.Module) -> dict[str, dict]:
    """Fused projections of the training codebases' modules (recognised by their attributes
    and class names, nothing imported), by the module's own param name → its group entries
    (``blocks``, and ``block_axis`` for column blocks): :func:`_attention`,
    :func:`_gates_and_conv1d`."""
    kind = type(module).__name__
    return {**_attention(module, kind), **_gates_and_conv1d(module, kind)}


def _entries(name: str, declared) -> dict:
    """A ``fused=`` declaration as group entries: ``blocks`` (a count or row sizes), or a dict
    of ``blocks`` and ``block_axis``."""
    if isinstance(declared, dict):
        unknown = set(declared) - {"blocks", "block_axis"}
        if unknown or "blocks" not in declared:
            raise ValueError(f"param_groups(fused=...): {name!r} takes blocks, or a dict of 'blocks' and "
                             f"'block_axis'; got {declared!r}")
        return dict(declared)
    return {"blocks": declared}


def packed(model: nn.Module, declared: dict) -> dict[str, dict]:
    """Params that pack several matrices as blocks, by name → group entries (``blocks``,
    ``block_axis``): nn.MultiheadAttention's ``in_proj_weight`` (q, k, v), LSTM (4 gates) and
    GRU (3) weights, the fused projections of :func:`_fused`, and ``declared`` (a param's
    name, or the end of it after a dot → :func:`_entries`; it overrides the others)."""
    found = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            found[f"{prefix}in_proj_weight"] = {"blocks": 3}
        elif isinstance(module, (nn.LSTM, nn.GRU)):
            gates = 4 if isinstance(module, nn.LSTM) else 3
            for pname, _ in module.named_parameters(recurse=False):
                if pname.startswith(("weight_ih", "weight_hh")):
                    found[prefix + pname] = {"blocks": gates}
        found.update({prefix + pname: entries for pname, entries in _fused(module).items()})
    unused = set(declared)
    for name, _ in model.named_parameters():
        for key in declared:
            if name == key or name.endswith("." + key):
                found[name] = _entries(key, declared[key])
                unused.discard(key)
    if unused:
        raise ValueError(f"param_groups(fused=...): no param of the model is named or ends in {sorted(unused)}")
    return found


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

    Packed matrices get a group of their own per ``blocks`` (and ``block_axis``) value: each
    of their blocks is orthogonalized / projected as its own matrix —
    ``nn.MultiheadAttention.in_proj_weight`` (q, k, v: 3), LSTM (4) and GRU (3) gate weights,
    and the fused projections of litgpt, GPT-NeoX / Pythia, torchtitan's ``wqkv``, and
    transformers' ``qkv_proj``, ``gate_up_proj`` (Linears and expert stacks) and GPT-2's
    ``Conv1D`` ``c_attn`` (column blocks) (:func:`_fused`; GQA sizes read from the module or
    its config). ``fused={"name": blocks}`` declares others (a param's name or its ending;
    ``blocks`` a count of equal row blocks or the row sizes, e.g. ``{"attn.qkv.weight": 3}``,
    or a dict with ``block_axis``, e.g. ``{"c_attn.weight": {"blocks": 3, "block_axis":
    "columns"}}`` for a weight stored (in, out)) and overrides a recognised one; a name no
    param has is a ValueError.

    ``overrides`` (e.g. ``weight_decay=0.0``) go into every group; ``fallback`` into the
    fallback group only (e.g. ``fallback={"lr": 3e-4}``). Params are given as (name, tensor)
    pairs, so optimizer warnings and errors name them. Tied params appear once. Empty groups
    are left out.
    """
    heads = _head_linears(model)
    blocks = packed(model, fused or {})
    embedding_modules = {name for name, m in model.named_modules()
                         if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    matrix, other, blocked = [], [], {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner, _, leaf = name.rpartition(".")
        on_fallback = (p.ndim < 2 or owner in heads or owner in embedding_modules
                       or min(matrix_shape(p)[1:]) == 1 or VECTOR_TABLE.search(leaf.lower()) is not None)
        if not on_fallback and name in blocks:
            blocked.setdefault(tuple(sorted(blocks[name].items())), []).append((name, p))
        else:
            (other if on_fallback else matrix).append((name, p))
    groups = []
    if matrix:
        groups.append({"params": matrix, "matrix": True, **overrides})
    for entries, params in blocked.items():
        groups.append({"params": params, "matrix": True, **dict(entries), **overrides})
    if other:
        groups.append({"params": other, "matrix": False, **overrides, **(fallback or {})})
    return groups
