"""Options, checked once for both frameworks: a scan's (`ScanOptions`), a swap's (`SwapOptions`: target, kinds,
epsilon per site kind) and a comparison's fine-tuning (`TuneOptions`).

Users pass plain strings and numbers; the API builds the frozen option objects once and every layer below reads
them, so nothing is validated twice.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict, get_args

from ..errors import DeadNeuronError
from .sinerelu import Form, check_epsilon, check_form

if TYPE_CHECKING:
    from typing_extensions import Unpack

# The gradient source of a scan (design.md, "Loss for gradients"): `auto` picks the model's own loss when it computes
# one from the labels (a transformers model), else ce/mse from the labels, else probe.
Loss = Literal["auto", "ce", "mse", "model", "probe", "none"]
LOSSES: tuple[str, ...] = get_args(Loss)
# What `auto` and the labels resolve to: the loss a report names.
ResolvedLoss = Literal["ce", "mse", "model", "probe", "none"]

SWAP_TARGETS: tuple[str, ...] = ("sinerelu",)
# Kinds a swap may replace; ReLU6 and the leaky variants only when asked (`include=`): they are not plain ReLUs.
SWAPPABLE_KINDS: tuple[str, ...] = ("relu", "relu6", "leaky_relu")
# The article's MNIST settings: 0.0025 after convolutions, 0.025 after dense layers.
DEFAULT_EPSILON_CONV = 0.0025
DEFAULT_EPSILON_DENSE = 0.025


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ScanOptions:
    """How a scan runs, validated once (`DeadNeuronError` for a bad value)."""

    batch_size: int = 64
    loss: Loss = "auto"
    atol: float = 0.0
    gtol: float = 0.0
    unit_axis: int | None = None
    samples: int | None = None  # at most this many samples; without data, this many random inputs
    input_shape: tuple[int, ...] | None = None  # one sample's shape, for random inputs
    seed: int = 0  # random inputs draw from `seed`, the gradient probe from `seed + 1`

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise DeadNeuronError(f"unknown loss {self.loss!r}; expected one of {', '.join(LOSSES)}")
        for name, value in (("atol", self.atol), ("gtol", self.gtol)):
            if not _number(value) or value < 0:
                raise DeadNeuronError(
                    f"thresholds must be >= 0: {name} must be a finite number >= 0, received {value!r}"
                )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise DeadNeuronError(
                f"batch size must be positive: batch_size must be an integer >= 1, received {self.batch_size!r}"
            )
        if self.samples is not None and self.samples <= 0:
            raise DeadNeuronError(f"samples must be positive, received {self.samples}")
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))

    @property
    def gradients(self) -> bool:
        return self.loss != "none"


class ScanKeywords(TypedDict, total=False):
    """The keyword options of `deadneuron.scan` as users pass them (defaults and meaning: `ScanOptions`)."""

    batch_size: int
    loss: str
    atol: float
    gtol: float
    unit_axis: int | None
    samples: int | None
    input_shape: Sequence[int] | None
    seed: int


class SwapKeywords(TypedDict, total=False):
    """The keyword options of `deadneuron.swap` as users pass them (defaults and meaning: `SwapOptions.make`)."""

    to: str
    epsilon: float | None
    epsilon_conv: float | None
    epsilon_dense: float | None
    form: str
    include: Sequence[str] | str


class LoadKeywords(TypedDict, total=False):
    """How `deadneuron.load_model` may open a file: `arch` for a PyTorch state dict; the two opt-ins that let a
    file run code (`unsafe_pickle` for torch, `unsafe_deserialization` for Keras)."""

    arch: str | None
    unsafe_pickle: bool
    unsafe_deserialization: bool


class CompareKeywords(ScanKeywords, SwapKeywords, total=False):
    """The keyword options of `deadneuron.compare`: a scan's and a swap's."""


def scan_options(**options: Unpack[ScanKeywords]) -> ScanOptions:
    """`ScanOptions` from the API's plain keyword arguments (a `TypeError` names an unknown one)."""
    return ScanOptions(**options)  # type: ignore[arg-type]  # __post_init__ makes input_shape a tuple


def split_options(options: CompareKeywords) -> tuple[ScanOptions, SwapOptions]:
    """A comparison's keyword options as the scans' and the swap's."""
    swapping = {key: value for key, value in options.items() if key in SwapKeywords.__optional_keys__}
    scanning = {key: value for key, value in options.items() if key not in swapping}
    return scan_options(**scanning), SwapOptions.make(**swapping)  # type: ignore[arg-type]


def resolve_loss(loss: str, labelled: bool, class_labels: bool, own_loss: bool = False) -> ResolvedLoss:
    """The loss a scan takes its gradient from, decided once from the first batch's labels (`class_labels`: integer
    indices or one-hot rows; `own_loss`: the model computes its own loss from them)."""
    if loss == "auto":
        if own_loss:
            return "model"
        return ("ce" if class_labels else "mse") if labelled else "probe"
    if loss == "model" and not own_loss:
        raise DeadNeuronError(
            "loss='model' takes the loss the model computes from its labels; expected a model that takes labels= "
            "(a transformers model) and batches of keyword inputs with 'labels'; use loss='ce', 'mse' or 'probe'"
        )
    if loss in ("ce", "mse") and not labelled:
        raise DeadNeuronError(
            f"loss={loss!r} needs labels; received data without labels (--loss {loss} needs labels too); pass "
            "data with labels (a .npz with key 'y', an (x, y) pair) or use loss='probe' (--loss probe)"
        )
    return loss  # type: ignore[return-value]


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
    return {
        "conv": check_epsilon(DEFAULT_EPSILON_CONV if conv is None else conv, "conv"),
        "dense": check_epsilon(DEFAULT_EPSILON_DENSE if dense is None else dense, "dense"),
    }


@dataclass(frozen=True)
class SwapOptions:
    """What a swap does: the epsilon after convolutions and after dense layers, the form, the kinds replaced."""

    epsilons: dict[str, float]
    form: Form = "piecewise"
    include: tuple[str, ...] = ("relu",)
    to: str = "sinerelu"

    @classmethod
    def make(cls, **options: Unpack[SwapKeywords]) -> SwapOptions:
        """From plain keywords: `to="sinerelu"`, `epsilon` (both kinds) or `epsilon_conv`/`epsilon_dense` (default
        0.0025/0.025), `form="piecewise"`, `include=("relu",)`."""
        unknown = sorted(set(options) - SwapKeywords.__optional_keys__)
        if unknown:
            known = ", ".join(sorted(SwapKeywords.__optional_keys__))
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}; expected one of {known}")
        return cls(
            resolve_epsilons(options.get("epsilon"), options.get("epsilon_conv"), options.get("epsilon_dense")),
            check_form(options.get("form", "piecewise")),
            check_include(options.get("include", ("relu",))),
            check_to(options.get("to", "sinerelu")),
        )


@dataclass(frozen=True)
class TuneOptions:
    """A comparison's fine-tuning: `steps` Adam steps at learning rate `lr` (none by default)."""

    steps: int = 0
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise DeadNeuronError(f"finetune_steps must be an integer >= 0, received {self.steps!r}")
        if self.steps and not (_number(self.lr) and self.lr > 0):
            raise DeadNeuronError(f"the learning rate must be > 0, received {self.lr!r}")
        object.__setattr__(self, "lr", float(self.lr))

    def check_loss(self, loss: str) -> None:
        if self.steps and loss in ("probe", "none"):
            raise DeadNeuronError(
                f"fine-tuning trains on the task loss; received loss={loss!r}; use loss='auto', 'ce' or 'mse' with "
                "labels"
            )
