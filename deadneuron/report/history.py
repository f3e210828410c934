"""`History`: the figures of a training callback's windows (monitor, Lightning) or scanned epochs (Keras), in order.

Each entry holds the fractions a callback logs (`dead_fraction`, `dormant_fraction`, `grad_dead_fraction`) in total
and per site (`dead_fraction/<site>`), so the over-time chart draws exactly what reached the logs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

HISTORY_SCHEMA = "deadneuron.history/1"

#: The figures of one window, in total and per site (`<field>/<site>`): fractions of units in [0, 1].
FRACTIONS = ("dead_fraction", "dormant_fraction", "grad_dead_fraction")


@dataclass(frozen=True)
class Window:
    """One window's figures. `step`: steps done at its end (monitor, Lightning), or the 0-based epoch (Keras)."""

    step: int
    figures: dict[str, float]
    sites: tuple[str, ...]


@dataclass
class History:
    """Per-window figures of one training run; `deadneuron.report.html.to_html(history)` draws them over time."""

    model: str
    axis: str  # what `Window.step` counts: "step" or "epoch"
    windows: list[Window] = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        """Every site seen in any window, in order of first appearance."""
        seen: dict[str, None] = {}
        for window in self.windows:
            seen.update(dict.fromkeys(window.sites))
        return list(seen)

    def series(self, fraction: str, site: str | None = None) -> tuple[list[int], list[float]]:
        """(steps, values) of one figure, total (`site=None`) or of one site; windows without it are left out."""
        if fraction not in FRACTIONS:
            raise KeyError(f"unknown figure {fraction!r}; expected one of {', '.join(FRACTIONS)}")
        key = fraction if site is None else f"{fraction}/{site}"
        points = [(w.step, w.figures[key]) for w in self.windows if key in w.figures]
        return [step for step, _ in points], [value for _, value in points]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": HISTORY_SCHEMA,
            "model": self.model,
            "axis": self.axis,
            "windows": [{"step": w.step, "sites": list(w.sites), "figures": dict(w.figures)} for w in self.windows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        windows = [Window(int(w["step"]), dict(w["figures"]), tuple(w["sites"])) for w in data["windows"]]
        return cls(model=data["model"], axis=data["axis"], windows=windows)
