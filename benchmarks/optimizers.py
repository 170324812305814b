"""The contender registry: every optimizer the benchmarks compare, under one name, built the
same way for every command (train, step, memory, update_rms, continual, ns).

Contenders: ``torch.optim.AdamW`` (fused on CUDA), ``torch.optim.Muon`` on the hidden
matrices with AdamW for the rest, galore-torch's ``GaLoreAdamW`` when it is installed, and
every optimizer ``matrixopt`` exports; the step benchmark adds the other low-rank peers
(:data:`LOW_RANK_PEERS`) and the :data:`VARIANTS`, the memory benchmark the 8-bit AdamW peers
(:data:`EIGHT_BIT_PEERS`) and torch's step in backward (:class:`TorchStepInBackward`), the
continual benchmark its labelled :data:`CONTINUAL` contenders; any of them can be asked for by
name. All get the same weight decay and Adam betas; the low-rank ones (GaLore, DCT, the peers)
the same rank (a fraction of each matrix's smaller side, default d/4; APOLLO-mini's is 1 by
design) and projector refresh gap. Matrices (hidden-layer weights) and the rest (embeddings,
output head, 1-D params) are split once, by the caller, the same way for all: the rest goes
to each optimizer's plain Adam(W) path (torch.optim.AdamW, matrixopt's fallback, a peer's
groups without a rank).
"""
import ast
import importlib
import inspect
import math
import re
import sys
import types
from dataclasses import dataclass
from importlib.util import find_spec
from typing import NamedTuple

import torch
from torch import Tensor

import matrixopt
from matrixopt import MATCH_ADAMW_RMS
from matrixopt.kernels import host

ADAMW = "torch.optim.AdamW"
TORCH_MUON = "torch.optim.Muon"
GALORE_TORCH = "galore_torch.GaLoreAdamW"
BNB_ADAMW8BIT = "bitsandbytes.AdamW8bit"
TORCHAO_ADAMW8BIT = "torchao.AdamW8bit"
GALORE_TORCH_8BIT = "galore_torch.GaLoreAdamW8bit"
#: Muon peers for the step benchmark, asked for by name (`--optimizers`): not in the default
#: lists, so train and the tests stay as they are. (heavyball's Muon sets ``p.grad`` to None in
#: its step, so the step benchmark, which times repeated steps on fixed gradients, can time it
#: once only: use it in ``train``; its Newton-Schulz routine is in the ns benchmark.)
MUON_PEERS = {"pytorch_optimizer.Muon": ("pytorch_optimizer", {"ns_method": "newton_schulz"}, True),
              "pytorch_optimizer.Muon (gram)": ("pytorch_optimizer", {"ns_method": "gram_newton_schulz"}, True),
              "heavyball.Muon": ("heavyball", {"compile_step": False}, False)}


class Peer(NamedTuple):
    """A low-rank peer: where its class is, and the group settings besides rank and gap.

    ``module`` and ``defined_as`` name the submodule that defines the class, imported on its
    own when the package ``__init__`` cannot be (it imports bitsandbytes for an 8-bit variant);
    ``version_check``: the class imports ``transformers`` only for ``require_version``.
    ``rank``: a fixed rank instead of the shared rank fraction. ``kwargs``: constructor
    arguments besides lr, betas, eps and weight decay.
    """

    package: str
    exported_as: str
    module: str
    defined_as: str
    group: dict
    version_check: bool = False
    rank: int | None = None
    kwargs: dict = {}


#: The low-rank peers of GaLoreAdamW and DCTAdamW, each with its own Adam for the params of
#: groups without a rank. galore-torch's is a default contender (train, the tests); the others
#: are in the step benchmark's table and, by name, anywhere. Scales are each peer's own
#: convention (galore-torch's 0.25, APOLLO's 1 and APOLLO-mini's 128 from its README); they
#: do not change a step's cost.
LOW_RANK_PEERS = {
    GALORE_TORCH: Peer("galore_torch", "GaLoreAdamW", "adamw", "AdamW",
                       {"scale": 0.25, "proj_type": "std"}, version_check=True,
                       kwargs={"no_deprecation_warning": True}),
    "pytorch_optimizer.GaLore": Peer("pytorch_optimizer", "GaLore", "optimizer.galore", "GaLore",
                                     {"scale": 0.25, "projection_type": "std"}),
    "apollo_torch.APOLLO": Peer("apollo_torch", "APOLLOAdamW", "apollo", "AdamW",
                                {"proj": "random", "scale_type": "channel", "scale": 1, "proj_type": "std"},
                                version_check=True),
    "apollo_torch.APOLLO-mini": Peer("apollo_torch", "APOLLOAdamW", "apollo", "AdamW",
                                     {"proj": "random", "scale_type": "tensor", "scale": 128, "proj_type": "std"},
                                     version_check=True, rank=1),
}
#: The peers' eps: matrixopt.GaLoreAdamW's (1e-6, also each peer's default).
PEER_EPS = inspect.signature(matrixopt.GaLoreAdamW).parameters["eps"].default


class EightBitPeer(NamedTuple):
    """An 8-bit AdamW peer: the module its class is imported from and, for a GaLore one, the
    low-rank peer whose param groups (ranks, group settings) it takes; the others step every
    param alike."""

    module: str
    exported_as: str
    groups_of: str | None = None


#: The 8-bit AdamW peers of the memory benchmark (both AdamWs run on CPU tensors).
EIGHT_BIT_PEERS = {
    BNB_ADAMW8BIT: EightBitPeer("bitsandbytes.optim", "AdamW8bit"),
    TORCHAO_ADAMW8BIT: EightBitPeer("torchao.optim", "AdamW8bit"),
    GALORE_TORCH_8BIT: EightBitPeer("galore_torch", "GaLoreAdamW8bit", groups_of=GALORE_TORCH),
}
#: How a peer installs without replacing torch (the Makefile's --no-deps line).
PEER_INSTALL = {BNB_ADAMW8BIT: "bitsandbytes==0.50.2", TORCHAO_ADAMW8BIT: "torchao==0.18.0",
                GALORE_TORCH: "galore-torch==1.0", GALORE_TORCH_8BIT: "galore-torch==1.0 bitsandbytes==0.50.2"}
#: What the 8-bit peers do on this kind of device, checked when the memory benchmark was written
#: (bitsandbytes 0.50.2, torchao 0.18.0, galore-torch 1.0 on torch 2.13 CPU), for the results' notes.
PEER_NOTES = [
    "bitsandbytes.AdamW8bit runs on CPU tensors: block-wise 8-bit moments (256-element blocks, "
    "fp32 absmax per block); params under 4096 elements (min_8bit_size) keep fp32 moments",
    "torchao.AdamW8bit runs on CPU tensors: its per-param step is torch.compile'd (inductor's C++ "
    "backend, compiled on the first step); params under 4096 elements or not a multiple of its "
    "256-element block keep fp32 moments",
    "galore_torch.GaLoreAdamW8bit does not run on CPU: its step() calls torch.cuda.synchronize() "
    "(on a CPU build of torch: AssertionError: Torch not compiled with CUDA enabled)",
]


@dataclass
class Settings:
    """What every contender shares, besides the lr."""

    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    rank_fraction: float = 0.25
    update_proj_gap: int = 200


# Table order; other matrixopt optimizers follow in export order.
ORDER = ("Muon", "ROOT", "ARO", "GaLoreAdamW", "DCTAdamW")


class Variant(NamedTuple):
    """A contender under a name of its own: ``base`` with non-default constructor arguments and,
    set on the instance, non-default class attributes (e.g. ``max_bucket_elements``). ``base``
    is a matrixopt optimizer, or (in :data:`CONTINUAL`, without arguments) any contender."""

    base: str
    kwargs: dict
    attributes: dict = {}


# Extra contenders for the step benchmark. Bucket size: the low-rank optimizers cap buckets
# at 2^22 elements to keep temporaries small, which makes every matrix of the 1B set a bucket
# of its own (~11 launches each, each step); the second variant measures what 8× larger
# buckets (Muon's cap) save in launch-bound steps on a GPU, for 8× the temporaries.
VARIANTS = {
    # ROOT is Muon with an input transform and a per-shape schedule: with the same triple and
    # clipping off its step should cost Muon's.
    "matrixopt.Muon (ns_coefficients=muon)": Variant("matrixopt.Muon", {"ns_coefficients": "muon"}),
    "matrixopt.ROOT (ns_coefficients=muon, threshold_quantile=None)": Variant(
        "matrixopt.ROOT", {"ns_coefficients": "muon", "threshold_quantile": None}),
    "matrixopt.GaLoreAdamW (proj_dtype=bf16)": Variant("matrixopt.GaLoreAdamW", {"proj_dtype": torch.bfloat16}),
    "matrixopt.GaLoreAdamW (proj_dtype=bf16, 2^25-element buckets)": Variant(
        "matrixopt.GaLoreAdamW", {"proj_dtype": torch.bfloat16}, {"max_bucket_elements": 1 << 25}),
}
#: The continual benchmark's contenders, by its table labels: torch AdamW and GaLoreAdamW as
#: they are, and CoSOAdamW with each protection.
CONTINUAL = {
    "AdamW": Variant(ADAMW, {}),
    "GaLoreAdamW": Variant("matrixopt.GaLoreAdamW", {}),
    "CoSOAdamW (gradients)": Variant("matrixopt.CoSOAdamW", {"protect": "gradients"}),
    "CoSOAdamW (weights)": Variant("matrixopt.CoSOAdamW", {"protect": "weights"}),
    "CoSOAdamW (both)": Variant("matrixopt.CoSOAdamW", {"protect": "both"}),
}


def parse_variant(name: str) -> Variant | None:
    """``"matrixopt.X[key=value, ...]"`` as a :class:`Variant` of ``matrixopt.X`` (None for a
    name without brackets): a way to try other hyperparameters from the command line, e.g.
    ``train --optimizers "matrixopt.GaLoreAdamW[scale=0.5]"``. Values are Python literals.

    Keys are the class's constructor arguments, and two that stand for defaults the library
    does not have (yet), emulated exactly from the benchmark side:

    - ``rms=c`` (Muon, ROOT, ARO): the match_adamw rescale to update RMS ``c`` instead of
      ρ = ``matrixopt.MATCH_ADAMW_RMS``, i.e. the matrix rule's step times c/ρ. The
      matrix group runs at lr·c/ρ with weight decay λ·ρ/c, so its decay lr·λ is unchanged:
      ``W ← W(1−ηλ) − η·(c/ρ)·s·O``.
    - ``rms_scale=c`` (GaLoreAdamW, DCTAdamW): ``scale = c·√(min(m, n)/r)`` per matrix, which
      makes the projected-back step's RMS c times the low-rank Adam step's (an orthonormal
      back-projection keeps the Frobenius norm and spreads it over m·n instead of r·max(m, n)
      entries).
    """
    match = re.fullmatch(r"\s*([\w.]+)\s*\[(.*)\]\s*", name)
    if match is None:
        return None
    base, body = match.groups()
    if base not in matrixopt_classes():
        raise ValueError(f"{name!r}: variants are of matrixopt optimizers; available: {list(matrixopt_classes())}")
    kwargs = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if not key.isidentifier() or not value.strip():
            raise ValueError(f"{name!r}: {item!r} is not key=value")
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"{name!r}: the value of {key!r} is not a Python literal") from None
    cls = matrixopt_classes()[base]
    # lr, weight decay and betas are the contest's, the same for every contender.
    allowed = set(inspect.signature(cls).parameters) - {"params", "lr", "weight_decay", "betas", "distributed",
                                                        "process_group"}
    allowed |= {"rms_scale"} if "rank" in allowed else {"rms"} if "lr_scaling" in allowed else set()
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"{name!r}: {base} takes no {unknown}; it takes {sorted(allowed)}")
    return Variant(base, kwargs)


def variant_of(name: str) -> Variant:
    """The base optimizer, arguments and attributes ``name`` stands for."""
    return VARIANTS.get(name) or parse_variant(name) or Variant(name, {})


def matrixopt_classes() -> dict[str, type]:
    """Every optimizer class matrixopt exports, by benchmark name (a name this build of matrixopt
    lists but lacks is none)."""
    classes = {}
    for name in sorted(matrixopt.__all__, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        obj = getattr(matrixopt, name, None)
        # The generic shells (LowRankAdamW needs a projector) are no contenders of their own.
        generic = (matrixopt.MatrixOptimizer, matrixopt.LowRankAdamW)
        if isinstance(obj, type) and issubclass(obj, matrixopt.MatrixOptimizer) and obj not in generic:
            classes[f"matrixopt.{name}"] = obj
    return classes


def peer_class(name: str) -> tuple[type | None, list[str]]:
    """The class of low-rank peer ``name`` (None when its package is not installed) and notes
    on how it was imported.

    galore-torch 1.0 and apollo-torch 1.0.3 import ``transformers.utils.versions.require_version``
    (only to check torch >= 1.5) and, in their package ``__init__``, bitsandbytes for the 8-bit
    variants. When transformers is missing, a no-op ``require_version`` stub is installed for
    the import, and when the package ``__init__`` fails the defining submodule is loaded without
    it; the notes say so, for the results.
    """
    peer = LOW_RANK_PEERS[name]
    if peer.package not in sys.modules and find_spec(peer.package) is None:
        return None, []
    notes, stubs = [], []
    if peer.version_check and peer.package not in sys.modules and "transformers" not in sys.modules \
            and find_spec("transformers") is None:
        stubs = ["transformers", "transformers.utils", "transformers.utils.versions"]
        for module in stubs:
            sys.modules[module] = types.ModuleType(module)
        sys.modules["transformers.utils.versions"].require_version = lambda requirement, hint=None: None
        notes.append(f"{peer.package} imported with a no-op stub for transformers.utils.versions."
                     "require_version (transformers is not installed)")
    try:
        return _import_peer(peer, notes), notes
    finally:
        for module in stubs:   # only for the peer's import: other packages probe for transformers
            del sys.modules[module]


def _import_peer(peer: Peer, notes: list[str]) -> type:
    try:
        return getattr(importlib.import_module(peer.package), peer.exported_as)
    except ImportError:
        # Its __init__ failed on bitsandbytes: expose the defining module through a package
        # without the __init__.
        spec = find_spec(peer.package)
        package = types.ModuleType(peer.package)
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules[peer.package] = package
        cls = getattr(importlib.import_module(f"{peer.package}.{peer.module}"), peer.defined_as)
        setattr(package, peer.exported_as, cls)
        notes.append(f"{peer.package}'s {peer.exported_as} loaded from {peer.package}.{peer.module} (its package "
                     "__init__ needs bitsandbytes, which is not installed)")
        return cls


def not_installed(name: str) -> str | None:
    """Why peer ``name`` cannot be built here, with the pip line that installs it (None if it can)."""
    peer = EIGHT_BIT_PEERS.get(name)
    if peer is not None and peer.groups_of is None and find_spec(peer.module.split(".")[0]) is None:
        return f"not installed (pip install --no-deps {PEER_INSTALL[name]})"
    if name in (GALORE_TORCH, GALORE_TORCH_8BIT) and peer_class(GALORE_TORCH)[0] is None:
        return f"not installed (pip install --no-deps {PEER_INSTALL[name]})"
    if name == GALORE_TORCH_8BIT and find_spec("bitsandbytes") is None:
        return f"needs bitsandbytes (pip install --no-deps {PEER_INSTALL[BNB_ADAMW8BIT]})"
    return None


def contenders(only=None, variants: bool = False, peers: bool = False) -> tuple[list[str], list[str]]:
    """Names of the optimizers available here (those in ``only`` if given), baselines
    first, galore-torch and (with ``peers``) the other low-rank peers next, then every
    matrixopt optimizer, (with ``variants``) the VARIANTS, the Muon peers named in ``only``,
    then the bracketed variants named in ``only`` (see :func:`parse_variant`) in the order
    given, and import notes. A low-rank peer named in ``only`` is in without ``peers``."""
    names, notes = [ADAMW], []
    if hasattr(torch.optim, "Muon"):
        names.append(TORCH_MUON)
    for name in LOW_RANK_PEERS:
        if name == GALORE_TORCH or peers or (only and name in only):
            cls, how = peer_class(name)
            if cls is not None:
                names.append(name)
                notes += [note for note in how if note not in notes]
    names += list(matrixopt_classes())
    if variants:
        names += [name for name, variant in VARIANTS.items() if variant.base in names]
    if only:
        names += [n for n in MUON_PEERS if n in only and find_spec(MUON_PEERS[n][0]) is not None]
        parsed = [n for n in dict.fromkeys(only) if n not in names and parse_variant(n) is not None]
        unknown = sorted(set(only) - set(names) - set(parsed))
        if unknown:
            raise ValueError(f"Unknown optimizers {unknown}; available: {names} "
                             f"(or a variant such as 'matrixopt.Muon[rms=0.4]')")
        names = [n for n in names if n in only] + parsed
    return names, notes


def is_low_rank(name: str) -> bool:
    """Whether the optimizer projects gradients to a rank (and has a refresh gap)."""
    if name in LOW_RANK_PEERS:
        return True
    cls = matrixopt_classes().get(variant_of(name).base)
    return cls is not None and "rank" in inspect.signature(cls).parameters


class Chained:
    """Several optimizers stepped as one (torch.optim.Muon takes only 2-D params)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers
        self.param_groups = [g for opt in optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_bytes(self) -> int:
        return sum(state_bytes(opt) for opt in self.optimizers)


class TorchStepInBackward:
    """torch's recipe for the optimizer step in backward (its tutorial "How to save memory by
    fusing the optimizer step into the backward pass"): one AdamW per param, stepped from the
    param's post-accumulate-grad hook, which then frees the gradient. ``remove()`` unhooks."""

    def __init__(self, params, **adamw):
        self.optimizers = {p: torch.optim.AdamW([p], **adamw) for p in params}
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in self.optimizers]

    def _step(self, p):
        self.optimizers[p].step()
        self.optimizers[p].zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        return Chained(*self.optimizers.values()).state_bytes()

    def remove(self):
        for handle in self.handles:
            handle.remove()


def build(name: str, matrices: list[tuple[str, Tensor]], others: list[tuple[str, Tensor]],
          lr: float, settings: Settings):
    """Optimizer ``name`` over ``matrices`` (matrix rule) and ``others`` (AdamW); an 8-bit AdamW
    peer that takes no groups steps both alike."""
    wd, betas = settings.weight_decay, settings.betas
    if name == ADAMW:
        params = [p for _, p in matrices + others]
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd, fused=params[0].is_cuda)
    if name == TORCH_MUON:
        # "match_rms_adamw": torch's 0.2·sqrt(max(m, n)) (Moonshot's), the convention closest
        # to AdamW's lr that torch.optim.Muon has (matrixopt's match_adamw is 0.5·sqrt(max(m, n))).
        muon = torch.optim.Muon([p for _, p in matrices], lr=lr, weight_decay=wd,
                                adjust_lr_fn="match_rms_adamw")
        if not others:
            return muon
        return Chained(muon, torch.optim.AdamW([p for _, p in others], lr=lr, betas=betas, weight_decay=wd))
    if name in MUON_PEERS:
        module, kwargs, grouped = MUON_PEERS[name]
        cls = getattr(__import__(module), "Muon")
        params = [p for _, p in matrices]
        muon = cls([{"params": params, "use_muon": True}] if grouped else params, lr=lr, weight_decay=wd, **kwargs)
        if not others:
            return muon
        return Chained(muon, torch.optim.AdamW([p for _, p in others], lr=lr, betas=betas, weight_decay=wd))
    if name in LOW_RANK_PEERS:
        cls, _ = peer_class(name)
        return cls(low_rank_peer_groups(name, matrices, others, settings), lr=lr, betas=betas, eps=PEER_EPS,
                   weight_decay=wd, **LOW_RANK_PEERS[name].kwargs)
    if name in EIGHT_BIT_PEERS:
        peer = EIGHT_BIT_PEERS[name]
        if peer.groups_of is not None:
            peer_class(peer.groups_of)   # imports the package as for that peer (a stub for transformers)
        cls = getattr(importlib.import_module(peer.module), peer.exported_as)
        if peer.groups_of is None:
            return cls([p for _, p in matrices + others], lr=lr, betas=betas, weight_decay=wd)
        return cls(low_rank_peer_groups(peer.groups_of, matrices, others, settings), lr=lr, betas=betas,
                   eps=PEER_EPS, weight_decay=wd)
    base, extra, attributes = variant_of(name)
    cls = matrixopt_classes()[base]
    if is_low_rank(name):
        extra = {"rank": settings.rank_fraction, "update_proj_gap": settings.update_proj_gap, **extra}
    extra = dict(extra)
    rms, rms_scale = extra.pop("rms", None), extra.pop("rms_scale", None)
    groups = [{"params": matrices, "matrix": True}]
    if rms is not None:
        factor = rms / MATCH_ADAMW_RMS
        groups = [{"params": matrices, "matrix": True, "lr": lr * factor, "weight_decay": wd / factor}]
    if rms_scale is not None:
        by_scale = {}
        for pair in matrices:
            k, r = smaller_side_and_rank(pair[1], extra["rank"])
            by_scale.setdefault(rms_scale * math.sqrt(k / r), []).append(pair)
        groups = [{"params": ps, "matrix": True, "scale": s} for s, ps in by_scale.items()]
    if others:
        groups.append({"params": others, "matrix": False})
    opt = cls(groups, lr=lr, weight_decay=wd, betas=betas, **extra)
    for attribute, value in attributes.items():
        setattr(opt, attribute, value)
    return opt


def low_rank_peer_groups(name: str, matrices, others, settings: Settings) -> list[dict]:
    """Low-rank peer ``name``'s param groups: the peers take one int rank per group, so one
    group per rank, with the peer's group settings; the rest in a group without a rank,
    which each of them steps with plain Adam(W)."""
    peer = LOW_RANK_PEERS[name]
    by_rank = {}
    for _, p in matrices:
        by_rank.setdefault(peer.rank or smaller_side_and_rank(p, settings.rank_fraction)[1], []).append(p)
    groups = [{"params": ps, "rank": r, "update_proj_gap": settings.update_proj_gap, **peer.group}
              for r, ps in by_rank.items()]
    if others:
        groups.append({"params": [p for _, p in others]})
    return groups


def smaller_side_and_rank(p: Tensor, rank: int | float) -> tuple[int, int]:
    """min(m, n) of p's matrices and the rank r matrixopt gives them for ``rank`` (an int, or
    a fraction of min(m, n), capped at it); 3-D params are stacks of (m, n) matrices, N-D
    ones (out, in·…) as in matrixopt's routing."""
    shape = tuple(p.shape)
    m, n = shape[-2:] if len(shape) <= 3 else (shape[0], math.prod(shape[1:]))
    k = min(m, n)
    r = max(1, round(rank * k)) if isinstance(rank, float) else rank
    return k, min(r, k)


def state_bytes(opt) -> int:
    """Bytes of optimizer state: ``state_bytes()`` where defined, else the state's tensors.

    For torch optimizers and the peers the tensors are the state's values and the tensors
    held by objects in it: each low-rank peer keeps its projector matrix in a projector object
    in the param's state (galore-torch's is a slice of the SVD factor and keeps the whole
    factor alive; APOLLO's random matrix is drawn again from a seed only at a refresh and held
    in between); a tensor subclass (torchao's 8-bit state) counts as the plain tensors it is
    made of (codes, scales); each storage is counted once. Nothing else holds tensors: the
    peers' other state (step counts, seeds; pytorch-optimizer's step count in the group) is
    Python ints.
    """
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    tensors = []
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                held = [value]
            else:
                held = vars(value).values() if hasattr(value, "__dict__") else []
            tensors += [inner for t in held if isinstance(t, Tensor) for inner in plain_tensors(t)]
    storages = {host.storage_id(t): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def plain_tensors(t: Tensor) -> list[Tensor]:
    """The plain tensors behind ``t``: itself, or a wrapper subclass's inner tensors
    (``__tensor_flatten__``), recursively."""
    if type(t) in (Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [inner for name in names for inner in plain_tensors(getattr(t, name))]
