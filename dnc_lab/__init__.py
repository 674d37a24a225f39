"""dnc_lab: train, debug and study Differentiable Neural Computers in PyTorch."""

from dnc_lab.dnc import DNC
from dnc_lab.runs import load_run

__all__ = ["DNC", "load_run"]
__version__ = "0.1.0"
