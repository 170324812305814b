"""matrixopt: memory-efficient, matrix-aware optimizers that drop in for torch.optim.AdamW."""
from .aro import ARO
from .backward import step_in_backward
from .coso import CoSOAdamW
from .dct import DCTAdamW
from .fallback import AdamW as AdamWFallback
from .galore import GaLoreAdamW
from .lowrank import LowRankAdamW
from .muon import Muon
from .ops import Out, Rows, Whole, apply_update, local_map
from .optimizer import MatrixOptimizer
from .param_groups import param_groups
from .root import ROOT
from .state import State

__all__ = ["ARO", "AdamWFallback", "CoSOAdamW", "DCTAdamW", "GaLoreAdamW", "LowRankAdamW", "MatrixOptimizer", "Muon",
           "Out", "ROOT", "Rows", "State", "Whole", "apply_update", "fit_ns_coefficients", "local_map", "param_groups",
           "step_in_backward"]
__version__ = "0.1.0"


def __getattr__(name):
    # The coefficient fitter needs numpy and scipy, which nothing else imports.
    if name == "fit_ns_coefficients":
        from .ns_fit import fit_ns_coefficients

        return fit_ns_coefficients
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
