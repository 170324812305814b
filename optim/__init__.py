"""matrixopt: memory-efficient, matrix-aware optimizers that drop in for torch.optim.AdamW."""
from .aro import ARO
from .base import MatrixOptimizer
from .dct import DCTAdamW
from .galore import GaLoreAdamW
from .muon import Muon
from .orthogonalize import fit_ns_coefficients
from .param_groups import param_groups
from .root import ROOT

__all__ = ["ARO", "DCTAdamW", "GaLoreAdamW", "MatrixOptimizer", "Muon", "ROOT", "fit_ns_coefficients", "param_groups"]
__version__ = "0.1.0"
