"""What one scan found, per site and in total: `SiteInfo`, `LayerReport`, `Report` (JSON, text and rich).

The JSON layout is the public `deadneuron.report/1` schema of design.md; fields are added, never renamed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..core.stats import SiteStats
from .text import render_text, report_renderables

REPORT_SCHEMA = "deadneuron.report/1"
COMPARISON_SCHEMA = "deadneuron.comparison/1"


@dataclass(frozen=True)
class SiteInfo:
    """One activation site: a call of a nonlinearity in the forward pass (design.md, "Definitions")."""

    name: str
    kind: str  # "relu", "relu6", "leaky_relu", "gelu", "sinerelu", ...
    units: int
    unit_axis: int  # axis of the activation tensor that indexes units, as a non-negative index

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "units": self.units, "unit_axis": self.unit_axis}


def _indices(mask: np.ndarray | None) -> list[int] | None:
    return None if mask is None else [int(i) for i in np.flatnonzero(mask)]


def _fraction(count: int | None, total: int) -> float | None:
    if count is None:
        return None
    return count / total if total else 0.0


class _Counts(Protocol):
    @property
    def units(self) -> int: ...
    @property
    def dead(self) -> int: ...
    @property
    def dormant(self) -> int: ...
    @property
    def grad_dead(self) -> int | None: ...


class _Fractions:
    """The three fractions of units, from the counts of a layer or of a whole report."""

    @property
    def dead_fraction(self: _Counts) -> float:
        return _fraction(self.dead, self.units) or 0.0

    @property
    def dormant_fraction(self: _Counts) -> float:
        return _fraction(self.dormant, self.units) or 0.0

    @property
    def grad_dead_fraction(self: _Counts) -> float | None:
        return _fraction(self.grad_dead, self.units)


@dataclass
class LayerReport(_Fractions):
    """The verdict for one site. `stats` keeps the raw per-unit statistics (not part of the JSON)."""

    name: str
    kind: str
    units: int
    unit_axis: int
    dead_units: list[int]
    dormant_units: list[int]
    grad_dead_units: list[int] | None
    nonfinite: int
    inactive_rate: float
    firing_rate: dict[str, float]
    stats: SiteStats | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_stats(cls, site: SiteInfo, stats: SiteStats) -> LayerReport:
        rate = stats.firing_rate
        summary = (
            {"min": float(rate.min()), "median": float(np.median(rate)), "max": float(rate.max())}
            if rate.size
            else {"min": 0.0, "median": 0.0, "max": 0.0}
        )
        return cls(
            name=site.name,
            kind=site.kind,
            units=site.units,
            unit_axis=site.unit_axis,
            dead_units=_indices(stats.dead) or [],
            dormant_units=_indices(stats.dormant) or [],
            grad_dead_units=_indices(stats.grad_dead),
            nonfinite=int((stats.nonfinite > 0).sum()),
            inactive_rate=stats.inactive_rate,
            firing_rate=summary,
            stats=stats,
        )

    @property
    def dead(self) -> int:
        return len(self.dead_units)

    @property
    def dormant(self) -> int:
        return len(self.dormant_units)

    @property
    def grad_dead(self) -> int | None:
        return None if self.grad_dead_units is None else len(self.grad_dead_units)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "units": self.units,
            "unit_axis": self.unit_axis,
            "dead": self.dead,
            "dead_units": self.dead_units,
            "dormant": self.dormant,
            "dormant_units": self.dormant_units,
            "grad_dead": self.grad_dead,
            "grad_dead_units": self.grad_dead_units,
            "nonfinite": self.nonfinite,
            "dead_fraction": self.dead_fraction,
            "grad_dead_fraction": self.grad_dead_fraction,
            "inactive_rate": self.inactive_rate,
            "firing_rate": dict(self.firing_rate),
        }


@dataclass
class Report(_Fractions):
    """What one scan found. `str(report)` is the plain-text table; rich renders it as a styled table."""

    framework: str
    model: str
    samples: int
    loss: str
    layers: list[LayerReport]
    atol: float = 0.0
    gtol: float = 0.0
    warnings: list[str] = field(default_factory=list)
    unobserved: list[str] = field(default_factory=list)  # sites that exist but could not be watched

    @classmethod
    def build(
        cls,
        *,
        framework: str,
        model: str,
        loss: str,
        sites: Sequence[tuple[SiteInfo, SiteStats]],
        atol: float = 0.0,
        gtol: float = 0.0,
        warnings: Iterable[str] = (),
        unobserved: Iterable[str] = (),
    ) -> Report:
        layers = [LayerReport.from_stats(site, stats) for site, stats in sites]
        samples = max((stats.samples for _, stats in sites), default=0)
        warnings = list(warnings)
        bad = [layer.name for layer in layers if layer.nonfinite]
        if bad:
            warnings.append(
                f"non-finite outputs (NaN or Inf) at {', '.join(bad)}: those units are counted as nonfinite, "
                "not dead; check the data and the weights"
            )
        return cls(
            framework=framework,
            model=model,
            samples=samples,
            loss=loss,
            layers=layers,
            atol=atol,
            gtol=gtol,
            warnings=warnings,
            unobserved=list(unobserved),
        )

    # Totals over all sites
    @property
    def units(self) -> int:
        return sum(layer.units for layer in self.layers)

    @property
    def dead(self) -> int:
        return sum(layer.dead for layer in self.layers)

    @property
    def dormant(self) -> int:
        return sum(layer.dormant for layer in self.layers)

    @property
    def grad_dead(self) -> int | None:
        counts = [layer.grad_dead for layer in self.layers]
        if not counts or any(c is None for c in counts):
            return None
        return sum(c for c in counts if c is not None)

    def layer(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        names = ", ".join(layer.name for layer in self.layers) or "none"
        raise KeyError(f"no site named {name!r}; sites: {names}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "framework": self.framework,
            "model": self.model,
            "samples": self.samples,
            "loss": self.loss,
            "thresholds": {"atol": self.atol, "gtol": self.gtol},
            "layers": [layer.to_dict() for layer in self.layers],
            "totals": {
                "units": self.units,
                "dead": self.dead,
                "dead_fraction": self.dead_fraction,
                "dormant": self.dormant,
                "grad_dead": self.grad_dead,
                "grad_dead_fraction": self.grad_dead_fraction,
            },
            "warnings": list(self.warnings),
            "unobserved": list(self.unobserved),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return render_text(self)

    def __rich_console__(self, console: Any, options: Any) -> Any:
        yield from report_renderables(self)
