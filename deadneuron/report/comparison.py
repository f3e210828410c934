"""Comparisons: the same data scanned before and after swapping ReLU for SineReLU, side by side.

Framework-free: the scan engine (`core/compare.py`) produces the two Reports and the prediction figures; this module
pairs the sites, measures how much gradient the formerly dead units receive, and renders the verdict.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
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
        split = gradients_after(before, after) if before.kind != after.kind else None
        ratio = None if split is None else _ratio(*split)
        return cls(before=before, after=after, gradient_ratio=ratio)

    @property
    def swapped(self) -> bool:
        """Whether the swap replaced this site's activation (its kind changed)."""
        return self.before.kind != self.after.kind

    def gradients(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Mean |gradient| per unit after the swap: (units dead before, units alive before); None without them or
        when the site was left alone (its gradients say nothing about a swap)."""
        return gradients_after(self.before, self.after) if self.swapped else None

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


def _reason(reasons: Mapping[str, str] | None, kind: str) -> str:
    if reasons is None:
        return ""
    try:
        return reasons[kind]  # a defaultdict answers every kind
    except KeyError:
        return ""


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
    # Sites the swap left alone, and why: [{"site": name, "kind": kind, "reason": text}] (`core.compare`).
    left_alone: list[dict[str, str]] = field(default_factory=list)

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
        reasons: Mapping[str, str] | None = None,
    ) -> Comparison:
        """`reasons`: why a site was left alone, by kind (sites whose kind is missing get a generic reason)."""
        if len(before.layers) != len(after.layers):
            raise ValueError(
                f"the swapped model has {len(after.layers)} activation sites, the original {len(before.layers)}"
            )
        sites = [SiteComparison.pair(b, a) for b, a in zip(before.layers, after.layers, strict=True)]
        left = [
            {"site": site.before.name, "kind": site.before.kind, "reason": _reason(reasons, site.before.kind)}
            for site in sites
            if not site.swapped
        ]
        return cls(to, dict(epsilon), before, after, agreement, output_drift, revival, sites, left)

    @property
    def swapped(self) -> list[SiteComparison]:
        """The sites whose activation the swap replaced."""
        return [site for site in self.sites if site.swapped]

    def swap_summary(self) -> str:
        """One line: what was swapped (sites and kinds) and what was left alone, grouped by kind, with the reason."""
        swapped = Counter(site.before.kind for site in self.swapped)
        left: dict[str, list[dict[str, str]]] = {}
        for entry in self.left_alone:
            left.setdefault(entry["kind"], []).append(entry)
        alone = "; ".join(
            f"{len(entries)} {kind} site{'s' if len(entries) != 1 else ''}"
            + (f" ({entries[0]['reason']})" if entries[0]["reason"] else "")
            for kind, entries in left.items()
        )
        if not swapped:
            found = f"left alone: {alone}" if alone else "the model has no activation site"
            return f"Nothing was swapped for {self.to}; {found}."
        done = ", ".join(f"{count} {kind}" for kind, count in swapped.items())
        count = sum(swapped.values())
        return (
            f"Swapped {count} site{'s' if count != 1 else ''} for {self.to} ({done})"
            + (f"; left alone: {alone}." if alone else "; nothing left alone.")
        )

    @property
    def gradient_ratio(self) -> float | None:
        """Over all swapped sites: the median, over the formerly dead units, of each one's mean |gradient| after the
        swap divided by the median of the live units of its own site. Each unit is measured against its own site:
        gradient magnitudes differ between sites by orders of magnitude (1e-8 in Xception's middle blocks, 1e-3
        near its head), and one pool of all sites' units would set a few dead units of a loud site against the
        live units of quiet ones (a ratio of 2e4 where every site's own ratio is about 1). With one site this is
        that site's ratio."""
        scaled = []
        for split in (site.gradients() for site in self.sites):
            if split is None:
                continue
            dead, live = split
            live_median = _median(live)
            if dead.size and live_median:
                scaled.append(dead / live_median)
        return _median(np.concatenate(scaled)) if scaled else None

    def verdict(self) -> list[str]:
        """The plain-language reading of the comparison: what was swapped, then what the swap changed there."""
        lines = [self.swap_summary()]
        swapped = self.swapped
        if not swapped:
            lines.append("Both scans are of the same model: there is no swap to judge, so no revival verdict.")
            return lines
        dead = sum(site.before.dead for site in swapped)
        units = sum(site.before.units for site in swapped)
        if dead == 0:
            lines.append(
                f"No unit of the swapped sites is dead on these {self.before.samples} samples: SineReLU has nothing "
                "to revive."
            )
        else:
            grad_dead = [site.after.grad_dead for site in swapped]
            still = None if any(g is None for g in grad_dead) else sum(g for g in grad_dead if g is not None)
            lines.append(
                f"{dead} of {units} units are dead under ReLU (at the swapped sites). After the swap "
                f"{sum(site.after.dead for site in swapped)} are dead and {sum(site.after.dormant for site in swapped)}"
                " dormant (would be dead under ReLU)"
                + ("." if still is None else f"; {still} still receive no gradient.")
            )
            ratio = self.gradient_ratio
            if ratio is not None:
                lines.append(
                    f"The formerly dead units now receive a gradient whose median is {ratio:.2g}x that of a live "
                    "unit: " + ("enough to move them." if ratio >= 0.1 else "small; they may revive slowly, if at all.")
                )
        if self.agreement is not None:
            lines.append(
                f"Predictions agree on {100 * self.agreement:.1f}% of positions (argmax per sample, or per token "
                "of a sequence output)."
            )
        if self.output_drift is not None:
            lines.append(f"Outputs move by {100 * self.output_drift:.2f}% (relative L2 norm).")
            if self.output_drift >= 1.0:
                # The change is larger than the outputs themselves: near-zero outputs (a random-init model whose
                # head is barely driven) make agreement a coin toss and the relative drift meaningless.
                lines.append(
                    "Warning: the swap moves the outputs by more than their own size, so the original outputs are "
                    "near zero or the swap remakes the model; agreement and drift say little here (scan a trained "
                    "model, or compare the dead units only)."
                )
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
            "swapped": [
                {"site": site.before.name, "kind": site.before.kind, "to": site.after.kind} for site in self.swapped
            ],
            "left_alone": [dict(entry) for entry in self.left_alone],
            "formerly_dead_gradient_ratio": self.gradient_ratio,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return render_text(self)

    def __rich_console__(self, console: Any, options: Any) -> Any:
        yield from comparison_renderables(self)
