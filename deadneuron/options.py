"""Options of a swap, checked once for both frameworks: the target, the kinds replaced, epsilon per site kind."""

from __future__ import annotations

import math
from typing import Any

from .errors import DeadNeuronError

SWAP_TARGETS: tuple[str, ...] = ("sinerelu",)
# Kinds a swap may replace; ReLU6 and the leaky variants only when asked (`include=`): they are not plain ReLUs.
SWAPPABLE_KINDS: tuple[str, ...] = ("relu", "relu6", "leaky_relu")
# The article's MNIST settings: 0.0025 after convolutions, 0.025 after dense layers.
DEFAULT_EPSILON_CONV = 0.0025
DEFAULT_EPSILON_DENSE = 0.025


def check_to(to: str) -> str:
    if to not in SWAP_TARGETS:
        raise DeadNeuronError(f"cannot swap ReLU for {to!r}; expected one of {', '.join(SWAP_TARGETS)}")
    return to


def check_include(include: Any) -> tuple[str, ...]:
    """The kinds to replace, validated: a name or a sequence of names from SWAPPABLE_KINDS."""
    kinds = (include,) if isinstance(include, str) else tuple(include)
    unknown = [k for k in kinds if k not in SWAPPABLE_KINDS]
    if unknown or not kinds:
        raise DeadNeuronError(
            f"cannot swap {', '.join(map(repr, unknown)) or 'nothing'}; include takes kinds from "
            f"{', '.join(SWAPPABLE_KINDS)}"
        )
    return kinds


def resolve_epsilons(
    epsilon: float | None = None, epsilon_conv: float | None = None, epsilon_dense: float | None = None
) -> dict[str, float]:
    """{"conv": e, "dense": e}: `epsilon` sets both; otherwise each defaults to the article's value.

    >>> resolve_epsilons()
    {'conv': 0.0025, 'dense': 0.025}
    >>> resolve_epsilons(0.01)
    {'conv': 0.01, 'dense': 0.01}
    """
    if epsilon is not None and (epsilon_conv is not None or epsilon_dense is not None):
        raise DeadNeuronError(
            "epsilon sets every site; expected either epsilon or epsilon_conv/epsilon_dense, received both"
        )
    conv = epsilon if epsilon is not None else epsilon_conv
    dense = epsilon if epsilon is not None else epsilon_dense
    values = {
        "conv": DEFAULT_EPSILON_CONV if conv is None else conv,
        "dense": DEFAULT_EPSILON_DENSE if dense is None else dense,
    }
    for key, value in values.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise DeadNeuronError(
                f"SineReLU epsilon ({key}) must be a finite number >= 0, received {value!r}"
            )
        values[key] = float(value)
    return values
