"""Keras 3 support: SineReLU, the scan engine's backend (`deadneuron.keras.backend`), loading, swap and the callback.

Importing this package imports Keras (and so registers "deadneuron>SineReLU" for loading); `import deadneuron` does
not import it.
"""

from __future__ import annotations

from .sinerelu import SineReLU, custom_objects, sinerelu

__all__ = [
    "SineReLU",
    "custom_objects",
    "sinerelu",
]

from .callback import DeadNeuronCallback as DeadNeuronCallback  # noqa: E402  (appended export)
from .swap import swap as swap  # noqa: E402  (appended export)
