"""matrixopt: memory-efficient, matrix-aware optimizers that drop in for torch.optim.AdamW."""
from . import batching
from .aro import ARO
from .backward import step_in_backward
from .coso import CoSOAdamW
from .dct import DCTAdamW
from .fallback import AdamW as AdamWFallback
from .galore import GaLoreAdamW
from .lowrank import LowRankAdamW
from .muon import Muon
from .ops import MATCH_ADAMW_RMS, Out, Rows, Whole, apply_update, local_map
from .optimizer import MatrixOptimizer
from .orthogonalize import ns_schedule
from .param_groups import param_groups
from .precision import SECOND_MOMENT_CODE, SIGNED_CODE, Code, code_of, dequantize, quantize, round_bf16
from .projectors import DCTProjector, SVDProjector
from .root import ROOT
from .state import State

__all__ = ["ARO", "AdamWFallback", "CoSOAdamW", "DCTAdamW", "GaLoreAdamW", "LowRankAdamW", "MatrixOptimizer", "Muon",
           "ROOT", "State", "fit_ns_coefficients", "param_groups", "step_in_backward",
           # writing a rule of one's own: the matrix_map types and the shared update (ARCHITECTURE.md)
           "Out", "Rows", "Whole", "apply_update", "local_map",
           # the update RMS lr_scaling="match_adamw" gives; ns_coefficients resolved to (a, b, c) triples
           "MATCH_ADAMW_RMS", "ns_schedule",
           # the shipped projectors (GaLore's top singular subspace, DCT columns), for a LowRankAdamW of one's own
           "DCTProjector", "SVDProjector",
           # stack or not: the measured (or pinned) limits from which a matrix's work runs alone
           "batching",
           # how state_precision stores state: the int8 codes, (de)quantization, bf16 stochastic rounding
           "Code", "SECOND_MOMENT_CODE", "SIGNED_CODE", "code_of", "dequantize", "quantize", "round_bf16"]
__version__ = "0.1.0"


def __getattr__(name):
    # The coefficient fitter needs numpy and scipy, which nothing else imports.
    if name == "fit_ns_coefficients":
        from .ns_fit import fit_ns_coefficients

        return fit_ns_coefficients
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
