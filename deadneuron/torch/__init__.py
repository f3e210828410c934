"""PyTorch support: the scan engine's backend (`deadneuron.torch.backend`), SineReLU, swap and the training monitor.

Importing this package imports torch.
"""

from __future__ import annotations

from .kernels import clear_kernels as clear_kernels
from .kernels import compile_kernels as compile_kernels
from .kernels import kernel_status as kernel_status
from .monitor import DeadNeuronMonitor as DeadNeuronMonitor
from .sinerelu import SineReLU as SineReLU
from .sinerelu import sinerelu as sinerelu
from .swap import swap as swap
