"""PyTorch support: the adapter (`deadneuron.torch.adapter`), and SineReLU when `sinerelu.py` is present.

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
