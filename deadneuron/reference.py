"""Numpy reference for SineReLU, in float64: the formula every framework implementation is tested against.

f(z) = z for z > 0, eps*(sin z - cos z) for z <= 0 ("piecewise", the article's definition);
keras-contrib shipped max(eps*(sin z - cos z), z) ("max"), which differs only on (z*, 0], z* ~ -eps/(1-eps).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .errors import DeadNeuronError

Form = Literal["piecewise", "max"]
FORMS: tuple[str, ...] = ("piecewise", "max")
DEFAULT_EPSILON = 0.0025


def check_form(form: str) -> str:
    if form not in FORMS:
        raise DeadNeuronError(f"unknown SineReLU form {form!r}; expected one of {', '.join(FORMS)}")
    return form


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
