"""Comparisons: the same data scanned before and after swapping ReLU for SineReLU, side by side.

Framework-free: the scan engine (`core/compare.py`) produces the two Reports and the prediction figures; this module
pairs the sites, measures how much gradient the formerly dead units receive, and renders the verdict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layers import COMPARISON_SCHEMA, LayerReport, Report
from .text import comparison_renderables, render_text

__all__ = ["COMPARISON_SCHEMA", "Comparison", "SiteComparison"]


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if values.size else None


@dataclass
class SiteComparison:
    """One site before and after the swap. `gradient_ratio`: median mean |gradient| of the units that were dead
    before, divided by that of the units that were alive, both measured after the swap (how much SineReLU really
    gives the dead units, relative to a working unit)."""

    before: LayerReport
    after: LayerReport
    gradient_ratio: float | None

    @classmethod
    def pair(cls, before: LayerReport, after: LayerReport) -> SiteComparison:
        split = gradients_after(before, after)
        ratio = None if split is None else _ratio(*split)
        return cls(before=before, after=after, gradient_ratio=ratio)

    def gradients(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Mean |gradient| per unit after the swap: (units dead before, units alive before); None without them."""
        return gradients_after(self.before, self.after)

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.name,
            "after": self.after.name,
            "kind_before": self.before.kind,
            "kind_after": self.after.kind,
            "units": self.before.units,
            "dead": [self.before.dead, self.after.dead],
            "dormant": [self.before.dormant, self.after.dormant],
            "grad_dead": [self.before.grad_dead, self.after.grad_dead],
            "formerly_dead_gradient_ratio": self.gradient_ratio,
        }


def gradients_after(before: LayerReport, after: LayerReport) -> tuple[np.ndarray, np.ndarray] | None:
    if before.stats is None or after.stats is None or before.units != after.units:
        return None
    grad = after.stats.mean_abs_grad
    if grad is None:
        return None
    dead = np.zeros(before.units, bool)
    dead[before.dead_units] = True
    return grad[dead], grad[~dead]


def _ratio(dead: np.ndarray, live: np.ndarray) -> float | None:
    dead_median, live_median = _median(dead), _median(live)
    if dead_median is None or not live_median:
        return None
    return dead_median / live_median


@dataclass
class Comparison:
    """Before and after reports on the same data, prediction agreement and drift, and optional fine-tuning."""

    to: str
    epsilon: dict[str, float]
    before: Report
    after: Report
    agreement: float | None  # fraction of samples whose argmax prediction is unchanged (classifiers)
    output_drift: float | None  # ||f_after(x) - f_before(x)|| / ||f_before(x)|| over all outputs
    revival: dict[str, Any] | None = None
    sites: list[SiteComparison] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        *,
        to: str,
        epsilon: dict[str, float],
        before: Report,
        after: Report,
        agreement: float | None,
        output_drift: float | None,
        revival: dict[str, Any] | None = None,
    ) -> Comparison:
        if len(before.layers) != len(after.layers):
            raise ValueError(
                f"the swapped model has {len(after.layers)} activation sites, the original {len(before.layers)}"
            )
        sites = [SiteComparison.pair(b, a) for b, a in zip(before.layers, after.layers, strict=True)]
        return cls(to, dict(epsilon), before, after, agreement, output_drift, revival, sites)

    @property
    def gradient_ratio(self) -> float | None:
        """Over all sites: median mean |gradient| of formerly dead units over that of live units, after the swap."""
        splits = [split for split in (site.gradients() for site in self.sites) if split is not None]
        if not splits:
            return None
        return _ratio(np.concatenate([dead for dead, _ in splits]), np.concatenate([live for _, live in splits]))

    def verdict(self) -> list[str]:
        """The plain-language reading of the comparison."""
        before, after = self.before, self.after
        lines = []
        if before.dead == 0:
            lines.append(
                f"No unit is dead under ReLU on these {before.samples} samples: SineReLU has nothing to revive."
            )
        else:
            still = after.grad_dead
            lines.append(
                f"{before.dead} of {before.units} units are dead under ReLU. After the swap {after.dead} are dead and "
                f"{after.dormant} dormant (would be dead under ReLU)"
                + ("." if still is None else f"; {still} still receive no gradient.")
            )
            ratio = self.gradient_ratio
            if ratio is not None:
                lines.append(
                    f"The formerly dead units now receive a gradient whose median is {ratio:.2g}x that of a live "
                    "unit: " + ("enough to move them." if ratio >= 0.1 else "small; they may revive slowly, if at all.")
                )
        if self.agreement is not None:
            lines.append(f"Predictions agree on {100 * self.agreement:.1f}% of samples (argmax).")
        if self.output_drift is not None:
            lines.append(f"Outputs move by {100 * self.output_drift:.2f}% (relative L2 norm).")
        if self.revival:
            r = self.revival
            lines.append(
                f"After {r['steps']} fine-tuning steps (lr {r['lr']}), ReLU revived {r['revived_relu']} and SineReLU "
                f"revived {r['revived_sinerelu']} of the {r['formerly_dead']} formerly dead units."
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": COMPARISON_SCHEMA,
            "to": self.to,
            "epsilon": dict(self.epsilon),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "agreement": self.agreement,
            "output_drift": self.output_drift,
            "revival": self.revival,
            "sites": [site.to_dict() for site in self.sites],
            "formerly_dead_gradient_ratio": self.gradient_ratio,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return render_text(self)

    def __rich_console__(self, console: Any, options: Any) -> Any:
        yield from comparison_renderables(self)
