"""SineReLU, framework-free: the numpy reference in float64 (the formula every framework implementation is tested
against), its options checked in one place (`check_epsilon`, `check_form`), and the max form's crossing point.

f(z) = z for z > 0, eps*(sin z - cos z) for z <= 0 ("piecewise", the article's definition);
keras-contrib shipped max(eps*(sin z - cos z), z) ("max"), which differs only on (z*, 0], z* ~ -eps/(1-eps).
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from ..errors import DeadNeuronError

Form = Literal["piecewise", "max"]
FORMS: tuple[str, ...] = ("piecewise", "max")
DEFAULT_EPSILON = 0.0025


def check_form(form: str) -> Form:
    if form not in FORMS:
        raise DeadNeuronError(f"unknown SineReLU form {form!r}; expected one of {', '.join(FORMS)}")
    return form  # type: ignore[return-value]


def check_epsilon(epsilon: object, site: str | None = None) -> float:
    """`epsilon` as a float; DeadNeuronError unless it is a finite number >= 0 (numpy scalars pass)."""
    what = f"SineReLU epsilon ({site})" if site else "SineReLU epsilon"
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise DeadNeuronError(
            f"{what} must be a finite number >= 0; received {type(epsilon).__name__} {epsilon!r}: it must be a "
            "number; pass a float such as 0.0025"
        )
    value = float(epsilon)
    if not math.isfinite(value) or value < 0:
        raise DeadNeuronError(
            f"{what} must be a finite number >= 0; received {epsilon!r}, which is not finite and >= 0; the article "
            "uses 0.0025 (conv) and 0.025 (dense)"
        )
    return value


@lru_cache(maxsize=64)
def max_form_crossing(epsilon: float, dtype: Any = None) -> float | None:
    """Smallest z where the max form's z branch wins, eps*(sin z - cos z) <= z, on the grid of `dtype` (float32
    when its itemsize is 4, as for `torch.float32`; float64 otherwise).

    With k = eps*sqrt(2) <= 1, g(z) = eps*(sin z - cos z) - z has g' = k*cos(z - pi/4) - 1 <= 0, so there is
    one crossing z* <= 0 and the z branch wins exactly on [z*, inf): the backward of the max form needs no sine to
    know which branch won. Bisection on [-(k + 1), 0] (the sine branch wins at the left end, z at 0) in float64,
    then the grid point where the decision flips, so gradients taken on that grid match the reference exactly.
    None when k > 1 (several crossings are possible): compare the branches element by element instead.
    """
    k = epsilon * math.sqrt(2.0)
    if k > 1.0:
        return None

    def z_wins(z: float) -> bool:
        return epsilon * (math.sin(z) - math.cos(z)) <= z

    lo, hi = -(k + 1.0), 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if z_wins(mid):
            hi = mid
        else:
            lo = mid
    grid = np.float32 if getattr(dtype, "itemsize", 8) == 4 else np.float64
    t = grid(hi)
    while not z_wins(float(t)):
        t = np.nextafter(t, grid(np.inf))
    while z_wins(float(np.nextafter(t, grid(-np.inf)))):
        t = np.nextafter(t, grid(-np.inf))
    return float(t)


def sinerelu_reference(x: object, epsilon: float = DEFAULT_EPSILON, form: Form = "piecewise") -> np.ndarray:
    """SineReLU of `x`, computed in float64.

    >>> sinerelu_reference([1.0, 0.0], epsilon=0.5).tolist()
    [1.0, -0.5]
    """
    check_form(form)
    z = np.asarray(x, dtype=np.float64)
    negative = epsilon * (np.sin(z) - np.cos(z))
    if form == "max":
        return np.maximum(negative, z)
    return np.where(z > 0, z, negative)


def sinerelu_grad_reference(x: object, epsilon: float = DEFAULT_EPSILON, form: Form = "piecewise") -> np.ndarray:
    """Derivative of SineReLU with respect to its input, in float64.

    For the max form, the derivative follows whichever branch is larger (the z branch on ties, like
    keras-contrib's TensorFlow `maximum`, which sends the gradient to its first argument only when it is larger).
    """
    check_form(form)
    z = np.asarray(x, dtype=np.float64)
    negative_grad = epsilon * (np.cos(z) + np.sin(z))
    if form == "max":
        negative = epsilon * (np.sin(z) - np.cos(z))
        return np.where(negative > z, negative_grad, 1.0)
    return np.where(z > 0, 1.0, negative_grad)
