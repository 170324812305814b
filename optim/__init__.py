"""matrixopt: memory-efficient, matrix-aware optimizers that drop in for torch.optim.AdamW."""
from .base import MatrixOptimizer
from .muon import Muon
from .param_groups import param_groups

__all__ = ["MatrixOptimizer", "Muon", "param_groups"]
__version__ = "0.1.0"
