"""Streaming per-unit statistics of one activation site: sums and maxima only, so merging is exact.

Adapters keep the same fields as tensors on the model's device, reduce into them inside their hooks, and hand them
over once per report as numpy arrays (`SiteStats`). `FIELDS` says how each field merges, which is also how ranks are
all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Reduction = Literal["sum", "max"]

# name -> (dtype, how two partial states combine). Every field is a vector with one entry per unit.
FIELDS: dict[str, tuple[str, Reduction]] = {
    # samples on which the unit's output was nonzero (|a| > atol) at some position
    "fired": ("int64", "sum"),
    # samples on which the unit's pre-activation was > 0 at some position (would fire under ReLU)
    "positive": ("int64", "sum"),
    # samples on which dL/d(pre-activation) was nonzero (|g| > gtol) at some position
    "grad_nonzero": ("int64", "sum"),
    # sum over samples and positions of |dL/d(pre-activation)|
    "grad_abs_sum": ("float64", "sum"),
    # largest |a| seen (finite values only)
    "max_abs": ("float64", "max"),
    # samples on which the unit's output held a NaN or an Inf somewhere
    "nonfinite": ("int64", "sum"),
    # sum over samples of the fraction of the unit's positions at zero (|a| <= atol) on that sample
    "inactive_sum": ("float64", "sum"),
}

# Scalars per site: samples seen in the forward pass, and samples that also had a gradient taken.
COUNTERS: tuple[str, ...] = ("samples", "grad_samples")


@dataclass
class SiteStats:
    """Accumulated statistics of one site, as host arrays. Build empty ones with `SiteStats.empty(units)`."""

    units: int
    samples: int = 0
    grad_samples: int = 0
    positions: int = 1  # elements per unit per sample, as last seen (pixels, tokens); informative only
    fired: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    positive: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    grad_nonzero: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    grad_abs_sum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    max_abs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    nonfinite: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    inactive_sum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))

    @classmethod
    def empty(cls, units: int) -> SiteStats:
        arrays: dict[str, np.ndarray] = {name: np.zeros(units, dtype) for name, (dtype, _) in FIELDS.items()}
        return cls(units, **arrays)  # type: ignore[arg-type]  # FIELDS names the array fields

    def __post_init__(self) -> None:
        for name, (dtype, _) in FIELDS.items():
            value = np.asarray(getattr(self, name), dtype=dtype).reshape(-1)
            if value.size == 0 and self.units:
                value = np.zeros(self.units, dtype)
            if value.shape != (self.units,):
                raise ValueError(f"{name} has shape {value.shape}, expected ({self.units},)")
            setattr(self, name, value)

    def merge(self, other: SiteStats) -> SiteStats:
        """The statistics of both streams together: merge(A, B) equals one scan of A then B."""
        if other.units != self.units:
            raise ValueError(f"cannot merge a site of {self.units} units with one of {other.units}")
        arrays = {}
        for name, (_, how) in FIELDS.items():
            a, b = getattr(self, name), getattr(other, name)
            arrays[name] = a + b if how == "sum" else np.maximum(a, b)
        return SiteStats(
            units=self.units,
            samples=self.samples + other.samples,
            grad_samples=self.grad_samples + other.grad_samples,
            positions=max(self.positions, other.positions),
            **arrays,
        )

    # Derived per-unit verdicts (design.md, "Definitions"). Units with non-finite outputs are never dead.
    @property
    def finite(self) -> np.ndarray:
        return self.nonfinite == 0

    @property
    def dead(self) -> np.ndarray:
        return (self.fired == 0) & self.finite if self.samples else np.zeros(self.units, bool)

    @property
    def dormant(self) -> np.ndarray:
        return (self.positive == 0) & self.finite if self.samples else np.zeros(self.units, bool)

    @property
    def grad_dead(self) -> np.ndarray | None:
        if not self.grad_samples:
            return None
        return (self.grad_nonzero == 0) & self.finite

    @property
    def firing_rate(self) -> np.ndarray:
        return self.fired / self.samples if self.samples else np.zeros(self.units)

    @property
    def inactive_rate(self) -> float:
        """Mean over samples of the fraction of this site's unit-positions at zero (~0.5 for ReLU at init)."""
        if not self.samples or not self.units:
            return 0.0
        return float(self.inactive_sum.sum() / (self.samples * self.units))

    @property
    def mean_abs_grad(self) -> np.ndarray | None:
        """Mean |dL/d(pre-activation)| per unit, per sample and position."""
        if not self.grad_samples:
            return None
        return self.grad_abs_sum / (self.grad_samples * max(self.positions, 1))
