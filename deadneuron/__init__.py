"""deadneuron: dead, dormant and gradient-dead units in PyTorch and Keras models, and what SineReLU changes.

The package root imports no framework: `deadneuron.torch` and `deadneuron.keras` do, when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import DeadNeuronError

__version__ = "0.1.0"
__all__ = [
    "DeadNeuronError",
    "Report",
    "LayerReport",
    "Comparison",
    "compare",
    "inspect",
    "load_model",
    "scan",
    "sinerelu_reference",
    "swap",
]

if TYPE_CHECKING:
    from .api import compare, inspect, load_model, scan, swap
    from .core.sinerelu import sinerelu_reference
    from .report import Comparison, LayerReport, Report

_LAZY = {
    "scan": "api",
    "compare": "api",
    "swap": "api",
    "inspect": "api",
    "load_model": "api",
    "Report": "report",
    "LayerReport": "report",
    "Comparison": "report",
    "sinerelu_reference": "core.sinerelu",  # lazy too: numpy alone takes 0.2 s, while Ctrl-C has no handler yet
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'deadneuron' has no attribute {name!r}")
