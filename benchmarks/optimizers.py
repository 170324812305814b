"""The optimizers the benchmarks compare, built the same way for every benchmark.

Contenders: ``torch.optim.AdamW`` (fused on CUDA), ``torch.optim.Muon`` on the hidden
matrices with AdamW for the rest, galore-torch's ``GaLoreAdamW`` when it is installed, and
every optimizer ``matrixopt`` exports. All get the same weight decay and Adam betas; the
low-rank ones (GaLore, DCT) the same rank (a fraction of each matrix's smaller side,
default d/4) and projector refresh gap. Matrices (hidden-layer weights) and the rest
(embeddings, output head, 1-D params) are split once, by the caller, the same way for all.
"""
import ast
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
from matrixopt.base import MATCH_ADAMW_RMS

ADAMW = "torch.optim.AdamW"
TORCH_MUON = "torch.optim.Muon"
GALORE_TORCH = "galore_torch.GaLoreAdamW"
#: Muon peers for the step benchmark, asked for by name (`--optimizers`): not in the default
#: lists, so train and the tests stay as they are. (heavyball's Muon sets ``p.grad`` to None in
#: its step, so the step benchmark, which times repeated steps on fixed gradients, can time it
#: once only: use it in ``train``; its Newton-Schulz routine is in the ns benchmark.)
MUON_PEERS = {"pytorch_optimizer.Muon": ("pytorch_optimizer", {"ns_method": "newton_schulz"}, True),
              "pytorch_optimizer.Muon (gram)": ("pytorch_optimizer", {"ns_method": "gram_newton_schulz"}, True),
              "heavyball.Muon": ("heavyball", {"compile_step": False}, False)}


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
    """An extra contender: a matrixopt optimizer with non-default arguments and, set on the
    instance, non-default class attributes (e.g. ``max_bucket_elements``)."""

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


def parse_variant(name: str) -> Variant | None:
    """``"matrixopt.X[key=value, ...]"`` as a :class:`Variant` of ``matrixopt.X`` (None for a
    name without brackets): a way to try other hyperparameters from the command line, e.g.
    ``train --optimizers "matrixopt.GaLoreAdamW[scale=0.5]"``. Values are Python literals.

    Keys are the class's constructor arguments, and two that stand for defaults the library
    does not have (yet), emulated exactly from the benchmark side:

    - ``rms=c`` (Muon, ROOT, ARO): the match_adamw rescale to update RMS ``c`` instead of
      ρ = ``matrixopt.base.MATCH_ADAMW_RMS``, i.e. the matrix rule's step times c/ρ. The
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
    """Every optimizer class matrixopt exports, by benchmark name."""
    classes = {}
    for name in sorted(matrixopt.__all__, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        obj = getattr(matrixopt, name)
        # The generic shells (LowRankAdamW needs a projector) are no contenders of their own.
        generic = (matrixopt.MatrixOptimizer, matrixopt.LowRankAdamW)
        if isinstance(obj, type) and issubclass(obj, matrixopt.MatrixOptimizer) and obj not in generic:
            classes[f"matrixopt.{name}"] = obj
    return classes


def galore_torch_class() -> tuple[type | None, list[str]]:
    """galore-torch's GaLoreAdamW (None when not installed) and notes on how it was imported.

    galore-torch 1.0 imports ``transformers.utils.versions.require_version`` (only to check
    torch >= 1.5) and, in its package ``__init__``, bitsandbytes for the 8-bit variant. When
    those are missing, a no-op ``require_version`` stub is installed and ``galore_torch.adamw``
    is loaded without the package ``__init__``; the notes say so, for the results.
    """
    if "galore_torch" not in sys.modules and find_spec("galore_torch") is None:
        return None, []
    notes, stubs = [], []
    if "galore_torch" not in sys.modules and "transformers" not in sys.modules and find_spec("transformers") is None:
        stubs = ["transformers", "transformers.utils", "transformers.utils.versions"]
        for name in stubs:
            sys.modules[name] = types.ModuleType(name)
        sys.modules["transformers.utils.versions"].require_version = lambda requirement, hint=None: None
        notes.append("galore-torch imported with a no-op stub for transformers.utils.versions."
                     "require_version (transformers is not installed)")
    try:
        return _import_galore_torch(notes)
    finally:
        for name in stubs:   # only for galore-torch's import: other packages probe for transformers
            del sys.modules[name]


def _import_galore_torch(notes):
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:
        # Its __init__ failed on bitsandbytes after loading .adamw: expose that module
        # through a package without the __init__.
        package = types.ModuleType("galore_torch")
        package.__path__ = list(find_spec("galore_torch").submodule_search_locations)
        sys.modules["galore_torch"] = package
        from galore_torch.adamw import AdamW as GaLoreAdamW

        package.GaLoreAdamW = GaLoreAdamW
        notes.append("galore-torch's GaLoreAdamW loaded from galore_torch.adamw (its package "
                     "__init__ needs bitsandbytes, which is not installed)")
    return GaLoreAdamW, notes


def contenders(only=None, variants: bool = False) -> tuple[list[str], list[str]]:
    """Names of the optimizers available here (those in ``only`` if given), baselines
    first, then (with ``variants``) the VARIANTS, then the bracketed variants named in
    ``only`` (see :func:`parse_variant`) in the order given, and import notes."""
    galore_cls, notes = galore_torch_class()
    names = [ADAMW]
    if hasattr(torch.optim, "Muon"):
        names.append(TORCH_MUON)
    if galore_cls is not None:
        names.append(GALORE_TORCH)
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
    if name == GALORE_TORCH:
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


def build(name: str, matrices: list[tuple[str, Tensor]], others: list[tuple[str, Tensor]],
          lr: float, settings: Settings):
    """Optimizer ``name`` over ``matrices`` (matrix rule) and ``others`` (AdamW)."""
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
    if name == GALORE_TORCH:
        cls, _ = galore_torch_class()
        return cls(galore_torch_groups(matrices, others, settings), lr=lr, betas=betas, weight_decay=wd,
                   no_deprecation_warning=True)
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


def galore_torch_groups(matrices, others, settings: Settings) -> list[dict]:
    """galore-torch's param groups for ``matrices`` (GaLore at rank ``rank_fraction`` of each
    smaller side, its ``scale=0.25``) and ``others`` (plain AdamW): it takes one int rank per
    group, so one group per smaller-side size."""
    by_side = {}
    for _, p in matrices:
        by_side.setdefault(min(p.shape), []).append(p)
    groups = [{"params": ps, "rank": max(1, round(settings.rank_fraction * k)),
               "update_proj_gap": settings.update_proj_gap, "scale": 0.25, "proj_type": "std"}
              for k, ps in by_side.items()]
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

    For torch and galore-torch optimizers the tensors are the state's values and the
    tensors held by objects in it (galore-torch keeps its projector matrix in a
    ``GaLoreProjector``); a tensor subclass (torchao's 8-bit state) counts as the plain
    tensors it is made of (codes, scales); each storage is counted once.
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
    storages = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def plain_tensors(t: Tensor) -> list[Tensor]:
    """The plain tensors behind ``t``: itself, or a wrapper subclass's inner tensors
    (``__tensor_flatten__``), recursively."""
    if type(t) in (Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [inner for name in names for inner in plain_tensors(getattr(t, name))]
