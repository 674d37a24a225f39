"""dnc_lab: train, debug and study Differentiable Neural Computers in PyTorch."""

from dnc_lab.dnc import DNC

__all__ = ["DNC"]
__version__ = "0.1.0"
