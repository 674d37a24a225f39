"""Shared pytest set-up. Fixtures of each area live in their own module, loaded here."""

import os

import torch

pytest_plugins = ["viz_fixtures"]  # Visdom server, dead/hung ports, Chromium (tests/test_viz*.py)

# Without a GPU, Triton's kernels run in its interpreter on CPU tensors (tests/test_triton.py). Triton reads
# the switch when a kernel is defined, that is when dnc_lab.backends.triton is first imported, so it is set
# here, before any test module can import it. With a GPU the kernels are compiled for it instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
