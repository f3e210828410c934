"""One window tracker for the three training callbacks (torch monitor, Lightning, Keras).

A callback ends a window with a `Report` (the monitor and Lightning every `window` steps and at epoch and training
ends, Keras at each scanned epoch). The tracker does what follows, the same way for all three: which units died or
revived since the previous window, the alert warned once, the figures to log under the documented keys, the history
the over-time chart draws, and the state a checkpoint keeps.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..report import Report
from ..report.history import FRACTIONS, History, Window


def figures(report: Report, *, prefix: str = "", per_site: Iterable[str] = ()) -> dict[str, float]:
    """The logged figures of one report: `dead_fraction`, `dormant_fraction` and `grad_dead_fraction` (absent when
    no gradient was taken) in total, and `<fraction>/<site>` for each fraction named in `per_site`; every key
    prefixed with `prefix`. Python floats in [0, 1]."""
    totals = {
        "dead_fraction": report.dead_fraction,
        "dormant_fraction": report.dormant_fraction,
        "grad_dead_fraction": report.grad_dead_fraction,
    }
    values = {f"{prefix}{key}": float(value) for key, value in totals.items() if value is not None}
    fractions = list(per_site)
    for layer in report.layers:
        for fraction in fractions:
            value = getattr(layer, fraction)
            if value is not None:
                values[f"{prefix}{fraction}/{layer.name}"] = float(value)
    return values


def _listing(units: dict[str, list[int]], limit: int = 8) -> str:
    if not units:
        return "none"
    return "; ".join(
        f"{name} [{', '.join(map(str, indices[:limit]))}{', ...' if len(indices) > limit else ''}] ({len(indices)})"
        for name, indices in units.items()
    )


@dataclass(frozen=True)
class WindowChanges:
    """What changed at the end of a window: unit indices per site that are dead now and were not in the previous
    window (`died`; every dead unit after the first window), and those dead before and alive now (`revived`)."""

    window: int  # 1-based index of the window that just ended
    first_step: int
    last_step: int
    died: dict[str, list[int]] = field(default_factory=dict)
    revived: dict[str, list[int]] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"window {self.window} (steps {self.first_step}-{self.last_step}) newly dead: {_listing(self.died)}; "
            f"revived: {_listing(self.revived)}"
        )


class WindowTracker:
    """Window-to-window bookkeeping of one training run (see the module docstring).

    `axis` says what the history's steps count ("step" or "epoch"); `alert` is the dead fraction above which
    `check_alert` warns, once per run.
    """

    def __init__(self, model: str, *, axis: str, alert: float | None = None) -> None:
        self.alert = alert
        self.alerted = False
        self.windows = 0  # completed windows
        self.previous_dead: dict[str, set[int]] | None = None
        self.history = History(model=model, axis=axis)

    def close(self, report: Report, *, first_step: int, last_step: int, step: int) -> WindowChanges:
        """End a window: its changes against the previous one; `step` is where the history places it."""
        dead = {layer.name: set(layer.dead_units) for layer in report.layers}
        previous = self.previous_dead or {}
        died = {name: sorted(units - previous.get(name, set())) for name, units in dead.items()}
        revived = {name: sorted(units - dead.get(name, set())) for name, units in previous.items()}
        self.previous_dead = dead
        self.windows += 1
        sites = tuple(layer.name for layer in report.layers)
        self.history.windows.append(Window(step, figures(report, per_site=FRACTIONS), sites))
        return WindowChanges(
            self.windows,
            first_step,
            last_step,
            {k: v for k, v in died.items() if v},
            {k: v for k, v in revived.items() if v},
        )

    @staticmethod
    def describe(report: Report, changes: WindowChanges, *, label: str, samples: str) -> str:
        """The log line of a window: the dead count, and after the first window what changed."""
        head = f"{label}: {report.dead} of {report.units} units dead ({100 * report.dead_fraction:.1f}%)"
        if changes.window == 1:
            return f"{head} on {report.samples} {samples} samples"
        return f"{head}; newly dead: {_listing(changes.died)}; revived: {_listing(changes.revived)}"

    def check_alert(self, report: Report, *, when: str, details: str, stacklevel: int) -> None:
        """Warn (`UserWarning`) the first time the dead fraction exceeds `alert`; `stacklevel` as seen by the
        caller of the method that calls this one (the user's code)."""
        if self.alert is None or self.alerted or report.dead_fraction <= self.alert:
            return
        self.alerted = True
        worst = sorted(report.layers, key=lambda layer: layer.dead_fraction, reverse=True)[:3]
        where = ", ".join(f"{layer.name} {layer.dead}/{layer.units}" for layer in worst if layer.dead)
        warnings.warn(
            f"deadneuron: {100 * report.dead_fraction:.1f}% of units are dead {when} (alert={self.alert:g}): "
            f"{where}. A lower learning rate, a different initialisation or SineReLU (deadneuron.compare) may help; "
            f"{details} has the details. This warning is shown once.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )

    # state for resuming ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "windows": self.windows,
            "alerted": self.alerted,
            "previous_dead": None
            if self.previous_dead is None
            else {name: sorted(units) for name, units in self.previous_dead.items()},
            "history": self.history.to_dict()["windows"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows = int(state["windows"])
        self.alerted = bool(state["alerted"])
        previous = state["previous_dead"]
        self.previous_dead = None if previous is None else {k: set(v) for k, v in previous.items()}
        history = {"model": self.history.model, "axis": self.history.axis, "windows": state.get("history", [])}
        self.history = History.from_dict(history)
