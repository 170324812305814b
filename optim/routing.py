"""The bare-params rule: where a group without a ``matrix`` key sends each param.

Training codebases build the optimizer as ``cls(model.parameters(), **kwargs)``: no names,
no groups. Putting every param with ``ndim >= 2`` on the matrix rule then orthogonalizes /
projects the embedding and the output head too, which loses to AdamW. So a group without a
``matrix`` key keeps 0-D/1-D params on the fallback and sends a param with ``ndim >= 2`` to
the fallback when one of these holds, else to the matrix rule — and never when the group
holds no other param with ``ndim >= 2`` to compare it with (an optimizer over one matrix,
``Muon([W])``, runs the matrix rule on it whatever its shape or gradient):

1. **broadcast table** — ``ndim >= 3`` with a leading dimension of 1 (a ViT's
   ``pos_embed`` (1, N, d), ``cls_token`` (1, 1, d)): a linear map is never stored so;
2. **embedding rows** — 2-D, and its first gradient has rows that are exactly zero, at
   least a quarter of them, beside rows that are not: an embedding table's rows of tokens
   absent from the batch (a dense gradient, random or a hidden Linear's, has no exactly-zero
   row; a Linear has one only where a ReLU unit was dead for the whole batch: a few units of
   a small batch, not a quarter of a layer);
3. **output head** — 2-D, at least ``HEAD_COLUMNS`` columns, its row count above 1 and not
   the model's width (the most common column count of the group's 2-D params), and its first
   gradient's rows sum to zero to within rounding, ``‖1ᵀG‖ ≤ ZERO_SUM·‖G‖``: every logit
   gradient of a softmax cross-entropy sums to zero over the classes, so the head's rows do
   up to rounding (fp32: ~1e-7; bf16 autocast or bf16 params: up to ~1e-2), where a
   generic gradient has ``‖1ᵀG‖ ≈ ‖G‖`` (a random one: the ratio is a chi over √columns, below
   ``ZERO_SUM`` with a probability ~``ZERO_SUM**columns``); every gradient into a LayerNorm
   also sums to zero, but that is a width-row residual writer's, which the width excludes;
4. **input table** — 2-D with rows other than the width, and either
   (a) the shape of a matrix rule 2 or 3 sent to the fallback (an untied embedding beside
   its head, (V, d) twice, whatever the batch held), or
   (b) at least ``TIED_ROWS`` times as many rows as every side of every other matrix of the
   group and its own columns, in a group of at least ``TIED_PEERS`` other matrices (a
   vocabulary table tied to the head, whose gradient is dense and not zero-sum: the only
   rule read from shapes alone, so it asks for a vocabulary well beyond any hidden size in
   a model-sized group).

1 and 4 read shapes; 2 and 3 read the param's own gradient at the first step that updates
it (whole: an FSDP2 gradient is gathered once; a gradient with a NaN or Inf, or all zeros —
the lr-0 step with zero gradients by which ``torch.distributed.checkpoint``'s state-dict
helpers and torchtitan make a fresh optimizer's state — is not read: the param is decided at
its next one, follows the shapes' verdict until then, and loses the state those steps made if
the decision goes the other way); a step decides 2 and 3 for all its params before
4, and a step in backward decides each param when its gradient is final (the head's comes
before its embedding's). The order of the params plays no part. The decision is recorded in
the group (``group["routed"]``, per param True: matrix rule, False: fallback, None: no
gradient yet), saved with ``state_dict()`` and restored by ``load_state_dict``, so it never
changes during a run or on resume, and every rank decides the same (DDP: the same averaged
gradients; FSDP2: the gathered ones). Explicit ``matrix=`` groups and
:func:`matrixopt.param_groups` are never re-decided.

**Fused projections.** A param the rule sends to the matrix rule is split into the blocks
:func:`matrixopt.param_groups` would give it (litgpt's ``qkv``, GPT-NeoX's
``query_key_value``, torchtitan's ``wqkv``, ``gate_up_proj``, GPT-2's ``c_attn``, LSTM gates,
…) when the model was seen: :class:`FirstForward` watches, from the optimizer's construction
until every param was in a module called (or the first gradient is read), for the modules
called that hold the params (the model, or its wrapper: DDP, FSDP2, Fabric,
``torch.compile``'s; or its parts, where a loop calls them one by one) and reads their fused
projections. The blocks are recorded with the decision (``group["routed_blocks"]``, per param
None or its ``blocks`` and ``block_axis``; absent when none was found), saved and restored
with it. No module called before a param's decision (gradients computed without calling the
model as a module), or blocks its DTensor does not take (a DTensor takes equal row blocks
that its pieces do not cut): the param stays one matrix, named in the warning. A param the
model names as a fused projection is a linear map: the shape rules 1 and 4 never send it to
the fallback (an ``in_proj_weight`` of 3·d rows among d×d matrices is no vocabulary).
"""
import warnings
import weakref
from collections import Counter

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.nn.modules.module import register_module_forward_pre_hook

from .matrices import BLOCK_AXES, block_axis, block_sizes, matrix_shape
from .param_groups import packed
from .report import caller_stacklevel

#: The group entry that records the rule's decisions.
KEY = "routed"
#: The group entry that records the blocks of the fused projections the rule found.
BLOCKS = "routed_blocks"
#: An embedding's gradient: at least this fraction of its rows exactly zero.
ZERO_ROWS = 0.25
#: A head's rows sum to zero up to rounding: ‖1ᵀG‖ ≤ ZERO_SUM·‖G‖ (a generic gradient: ≈ 1;
#: a head's: ~1e-7 in fp32, up to ~1e-2 under bf16).
ZERO_SUM = 3e-2
#: A head has at least this many columns (its width): with fewer, a random gradient's rows
#: sum to nearly zero too often (one column: ZERO_SUM of the time).
HEAD_COLUMNS = 4
#: A tied vocabulary table (rule 4b): rows ≥ TIED_ROWS × every other side, among ≥ TIED_PEERS
#: other matrices.
TIED_ROWS, TIED_PEERS = 2, 4


def decides(group: dict) -> bool:
    """Whether the rule routes ``group``'s params (it has no ``matrix`` key)."""
    return group.get("matrix") is None


def routed(group: dict, index: int, p: Tensor) -> bool:
    """Whether the rule sends ``p`` (the group's param ``index``) to the matrix rule: the
    recorded decision, or, before its first gradient, the shapes' verdict."""
    decisions = group.get(KEY)
    if decisions is not None and decisions[index] is not None:
        return decisions[index]
    return p.ndim >= 2 and shape_reason(group["params"], index, set()) is None


def split(group: dict, index: int) -> dict | None:
    """The recorded ``blocks`` (and ``block_axis``) of the group's param ``index``: a fused
    projection the rule found, or None."""
    record = group.get(BLOCKS)
    return record[index] if record else None


class FirstForward:
    """The fused projections among the params of the groups the rule routes, read from the
    modules called before their first gradient: a global forward pre-hook, from :meth:`watch`
    until every watched param was in a module called, the first gradient read (:meth:`close`)
    or ``owner`` is collected. A module called that holds a watched param not seen yet is read
    whole (:func:`matrixopt.param_groups.packed`): ``found`` maps the id of each of its params
    in a fused projection to its name there and its group entries (a group added later finds
    its params there too). Under ``torch.compile`` tracing the hook does nothing; without an
    ``owner`` (a pickled or deep-copied optimizer's) it watches nothing."""

    def __init__(self, owner=None):
        self.found: dict[int, tuple[str, dict]] = {}
        self._active, self._waiting, self._seen = owner is not None, set(), set()
        self._handle = None
        if owner is not None:
            weakref.finalize(owner, self.close)   # an optimizer dropped stops watching

    def __reduce__(self):
        return FirstForward, ()

    def watch(self, group: dict) -> None:
        """Watch ``group``'s params with ``ndim >= 2`` too, if the rule routes it (those not in
        a module called yet)."""
        if self._active and decides(group):
            self._waiting |= {id(p) for p in group["params"] if p.ndim >= 2} - self._seen
            if self._waiting and self._handle is None:
                self._handle = register_module_forward_pre_hook(self._called)

    def _called(self, module: torch.nn.Module, args) -> None:
        if torch.compiler.is_compiling():
            return
        named = list(module.named_parameters())
        if self._waiting.isdisjoint(id(p) for _, p in named):
            return
        fused = packed(module, {})
        self.found.update({id(p): (name, fused[name]) for name, p in named
                           if name in fused and id(p) not in self.found})
        self._seen |= {id(p) for _, p in named}
        self._waiting -= self._seen
        if not self._waiting:
            self.close()

    @property
    def watching(self) -> bool:
        return self._handle is not None

    def close(self) -> None:
        """Stop watching (until :meth:`watch` is given params not seen yet)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.remove()


def _width(params: list[Tensor]) -> int | None:
    """The most common column count of the 2-D params (the model's width), or None."""
    counts = Counter(q.shape[1] for q in params if q.ndim == 2)
    return counts.most_common(1)[0][0] if counts else None


def _alone(params: list[Tensor], index: int) -> bool:
    """Whether ``params[index]`` is the group's only param with ndim >= 2 (nothing to compare
    it with: the rule never routes it)."""
    return not any(q.ndim >= 2 for i, q in enumerate(params) if i != index)


def shape_reason(params: list[Tensor], index: int, tables: set) -> str | None:
    """Why rules 1 and 4 send ``params[index]`` to the fallback, or None; ``tables``: the
    shapes of the matrices rules 2 and 3 sent there."""
    p = params[index]
    if p.ndim < 2 or _alone(params, index):
        return None
    if p.ndim >= 3 and p.shape[0] == 1:
        return f"broadcast table (shape {tuple(p.shape)})"
    if p.ndim != 2 or p.shape[0] == _width(params):
        return None
    if tuple(p.shape) in tables:
        return f"input table (shape {tuple(p.shape)}, a table's sent to the fallback)"
    others = [q for i, q in enumerate(params) if q.ndim >= 2 and i != index]
    sides = [s for q in others for s in matrix_shape(q)[1:]] + [p.shape[1]]
    if len(others) >= TIED_PEERS and p.shape[0] >= TIED_ROWS * max(sides):
        return f"input table ({p.shape[0]} rows, over {TIED_ROWS}x every other side: a vocabulary)"
    return None


#: gradient_reason's answer for a gradient that tells nothing (a NaN or Inf, or all zeros:
#: torch.distributed.checkpoint's and torchtitan's state initialization step): not read, the
#: param decided at its next gradient.
UNREAD = "unread"


def gradient_reason(params: list[Tensor], index: int, grad: Tensor) -> str | None:
    """Why rules 2 and 3 send ``params[index]`` to the fallback, from its gradient, or None;
    :data:`UNREAD` if that gradient (gathered whole, once) has a NaN or Inf or is all zeros."""
    p = params[index]
    if p.ndim != 2 or grad.layout != torch.strided or _alone(params, index):   # sparse: the step's check names it
        return None
    g = (grad.full_tensor() if isinstance(grad, DTensor) else grad).float()
    live = int(g.ne(0).any(dim=1).sum())
    if not live or not bool(torch.isfinite(g).all()):
        return UNREAD
    if 0 < live <= (1 - ZERO_ROWS) * g.shape[0]:
        return f"embedding rows ({g.shape[0] - live} of its {g.shape[0]} rows got no gradient)"
    if g.shape[1] >= HEAD_COLUMNS and 1 < g.shape[0] != _width(params):
        scale = g.abs().amax()
        if scale > 0:
            g = g / scale                  # ‖G‖² of a gradient scaled by 1e30 would overflow fp32
            if g.sum(0).norm() <= ZERO_SUM * g.norm():
                return f"output head (the gradients of its {g.shape[0]} rows sum to zero)"
    return None


def decide(group: dict, indices, found: dict) -> tuple[list[tuple[int, str]], list[int], list[int]]:
    """Record the decision for the params at ``indices`` of ``group`` (a group the rule
    routes) that have a gradient (a finite, nonzero one, for a 2-D param) and none yet (rules 2
    and 3 first, then 1 and 4), and the blocks of those sent to the matrix rule that ``found``
    has (:attr:`FirstForward.found`); returns (index, reason) of those sent to the fallback,
    the indices whose state, made by steps on all-zero gradients, belongs to another rule or
    split (decided against the shapes' verdict they were routed by until now, or split into
    blocks), and those of fused projections left whole (blocks that do not fit them). The
    group's records are replaced, not edited, when anything is decided."""
    params = group["params"]
    decisions = group.get(KEY) or [None] * len(params)
    new, fallback = list(decisions), []
    todo = [i for i in indices if new[i] is None and params[i].grad is not None]
    reasons = {i: gradient_reason(params, i, params[i].grad) for i in todo}
    todo = [i for i in todo if reasons[i] != UNREAD]
    provisional = {i: routed(group, i, params[i]) for i in todo}
    reasons = {i: reasons[i] for i in todo}
    width = _width(params)
    tables = {tuple(params[i].shape) for i, d in enumerate(decisions) if d is False and params[i].ndim == 2}
    tables |= {tuple(params[i].shape) for i, r in reasons.items() if r is not None}
    tables = {shape for shape in tables if shape[0] != width}
    blocks, whole = list(group.get(BLOCKS) or [None] * len(params)), []
    for i in todo:
        # A fused projection the model names is a linear map, whatever its shape says (rules 1, 4).
        named = id(params[i]) in found
        reason = None if params[i].ndim < 2 else reasons[i] or (None if named else shape_reason(params, i, tables))
        new[i] = params[i].ndim >= 2 and reason is None
        if reason is not None:
            fallback.append((i, reason))
        elif new[i] and named and group.get("blocks") is None:
            blocks[i] = _fitting(params[i], *found[id(params[i])])
            if blocks[i] is None:
                whole.append(i)
    if new != decisions or KEY not in group:
        group[KEY] = new
    if any(blocks) and blocks != group.get(BLOCKS):
        group[BLOCKS] = blocks
    return fallback, [i for i in todo if new[i] != provisional[i] or blocks[i]], whole


def _fitting(p: Tensor, name: str, entries: dict) -> dict | None:
    """``entries`` (a fused projection's blocks), if they fit ``p``: a DTensor takes equal row
    blocks only, and only where its pieces do not cut them (:func:`~matrixopt.matrices.block_sizes`)."""
    try:
        block_sizes(name, entries["blocks"], p, block_axis(entries))
    except ValueError:
        return None
    return entries


def check_record(group: dict) -> None:
    """ValueError unless a group's records (from a checkpoint, say) have one entry per param:
    True, False or None (decisions); None or a dict of ``blocks`` and ``block_axis`` (blocks,
    whose sizes the group's validation checks against the param)."""
    count = len(group["params"])
    decisions, blocks = group.get(KEY), group.get(BLOCKS)
    if decisions is not None and (not isinstance(decisions, (list, tuple)) or len(decisions) != count
                                  or any(d not in (True, False, None) for d in decisions)):
        raise ValueError(f"Invalid {KEY!r} in a param group: expected one of True, False, None per param "
                         f"({count}), got {decisions!r}")
    if blocks is not None and (not isinstance(blocks, (list, tuple)) or len(blocks) != count or not all(
            b is None or isinstance(b, dict) and "blocks" in b and set(b) <= {"blocks", "block_axis"}
            and b.get("block_axis") in (None, *BLOCK_AXES) for b in blocks)):
        raise ValueError(f"Invalid {BLOCKS!r} in a param group: expected per param None or a dict of 'blocks' "
                         f"and 'block_axis' ({count}), got {blocks!r}")


def route(selection: list[tuple[dict, range | list[int]]], state: dict, name_of, owner: str, fallback: str,
          warned: bool, watcher: FirstForward) -> bool:
    """The rule's decision (:func:`decide`, with the fused projections ``watcher`` found) for
    the selected params of groups without ``matrix`` that have a gradient and none yet; a param
    decided against the rule or split it was routed by before (by the shapes, while its
    gradients were all zero) loses the state those steps made (``state``: the optimizer's).
    Unless ``warned`` (once per optimizer), a warning names the params it sent to the fallback
    and why, and those it split. ``watcher`` stops at the first gradient read. Returns
    whether it has warned."""
    sent_back, blocked, whole = [], [], []
    for group, indices in selection:
        if decides(group):
            sent, moved, unfit = decide(group, indices, watcher.found)
            sent_back += [f"{name_of(group, i)}: {reason}" for i, reason in sent]
            blocked += [f"{watcher.found[id(group['params'][i])][0]}: {split(group, i)}" for i in moved
                        if split(group, i)]
            whole += [watcher.found[id(group["params"][i])][0] for i in unfit]
            for i in moved:
                state.pop(group["params"][i], None)
    if watcher.watching and any(d is not None and p.ndim >= 2 for group, _ in selection if decides(group)
                                for p, d in zip(group["params"], group.get(KEY) or [])):
        watcher.close()   # a matrix's gradient was read: the model, if called as a module, was called before
    if not (sent_back or blocked or whole) or warned:
        return warned
    sent = f"sent to the fallback ({fallback}): {'; '.join(sent_back)}. " if sent_back else ""
    split_ = f"split into blocks, fused projections of the model's modules: {'; '.join(blocked)}. " if blocked else ""
    kept = (f"left whole, fused projections whose blocks their DTensor pieces do not take (equal row blocks, "
            f"not cut): {', '.join(whole)}. " if whole else "")
    warnings.warn(f"{owner}: params given without a 'matrix' flag, routed by the bare-params rule (README, "
                  f"'Bare params'): {sent}{split_}{kept}Every other param with ndim >= 2 gets the matrix rule, whole. "
                  "Give groups matrix=True/False, or use matrixopt.param_groups(model), to decide yourself.",
                  UserWarning, stacklevel=caller_stacklevel())
    return True
