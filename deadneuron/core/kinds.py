"""Activation kinds, named the same for both frameworks, and how a site that runs several times is named.

A *kind* is the activation's name in reports (`relu`, `relu6`, `leaky_relu`, `gelu`, `sinerelu`, ...). Each backend
maps its own classes and functions onto these names (`torch/kinds.py`, `keras/sites.py`).
"""

from __future__ import annotations

from collections.abc import MutableMapping

# Unit nonlinearities whose zero region makes "dead" meaningful: the ReLU family and the smooth rectifiers.
SITE_KINDS = frozenset(
    {
        "relu", "relu6", "relu2", "leaky_relu", "prelu", "rrelu", "elu", "selu", "celu", "gelu", "gelu_tanh",
        "quick_gelu", "silu", "hardswish", "hard_mish", "softplus", "squareplus", "sparse_plus", "mish", "sinerelu",
    }
)
# Output nonlinearities: never sites; a softmax or sigmoid that ends a Keras model is watched for its logits.
LOGIT_KINDS = frozenset({"softmax", "sigmoid"})
# Kinds whose output is > 0 exactly where the pre-activation is > 0 (for positive slopes): "dormant" can be read
# from the output, which is all that is left after an in-place call.
SIGN_PRESERVING = frozenset({"relu", "relu6", "relu2", "leaky_relu", "elu", "celu", "selu"})
# Kinds whose output is never negative: max |a| is max a.
NONNEGATIVE = frozenset({"relu", "relu6", "relu2"})
# Kinds that output exactly 0 on a whole half-line of inputs (z <= 0, or z <= -3 for hard-swish): a zero output is
# their off state, so zeros on a sample are normal sparsity. Other kinds (GELU, SiLU, SineReLU, ...) are exactly
# zero almost nowhere.
ZERO_REGION = NONNEGATIVE | {"hardswish", "hard_mish"}
# Other spellings of a kind (Keras names, registered names) -> the kind.
_ALIASES = {"swish": "silu", "hard_silu": "hardswish", "hard_swish": "hardswish", "leakyrelu": "leaky_relu"}


def canonical(name: str) -> str:
    """The kind an activation name stands for: `"deadneuron>SineReLU"` -> `sinerelu`, `swish` -> `silu`."""
    name = name.split(">")[-1].lower()  # registered names may carry a package prefix
    return _ALIASES.get(name, name)


def repeated_site_name(base: str, calls: MutableMapping[str, int]) -> str:
    """The name of one call of a site named `base`: `base` the first time in a forward pass, `base#k` the k-th
    time (docs/design.md: one site per call). `calls` counts the calls of each base name in this pass.

    >>> calls = {}
    >>> [repeated_site_name("relu", calls) for _ in range(3)]
    ['relu', 'relu#2', 'relu#3']
    """
    calls[base] = calls.get(base, 0) + 1
    return base if calls[base] == 1 else f"{base}#{calls[base]}"
