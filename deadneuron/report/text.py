"""Presentation of reports: rich renderables, plain text (a colourless rich console) and the summary prose."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .comparison import Comparison
    from .layers import LayerReport, Report


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _count(count: int | None, total: int) -> str:
    if count is None:
        return "-"
    return f"{count}/{total} ({_pct(count / total if total else 0.0)})"


def layer_row(layer: LayerReport) -> list[str]:
    rate = layer.firing_rate
    return [
        layer.name,
        layer.kind,
        str(layer.units),
        _count(layer.dead, layer.units),
        _count(layer.dormant, layer.units),
        _count(layer.grad_dead, layer.units),
        f"{rate['min']:.2f} / {rate['median']:.2f} / {rate['max']:.2f}",
        _pct(layer.inactive_rate),
    ]


COLUMNS = ["site", "kind", "units", "dead", "dormant", "grad-dead", "firing min/med/max", "inactive/sample"]


def summary_lines(report: Report) -> list[str]:
    """Plain-language reading of the totals: dead units versus the per-sample inactive rate."""
    lines = [
        f"{report.samples} samples, {len(report.layers)} activation sites, {report.units} units; "
        f"gradients: {report.loss if report.loss != 'none' else 'not taken'}.",
        f"Dead (output zero on every sample): {_count(report.dead, report.units)}. "
        f"Dormant (pre-activation never > 0): {_count(report.dormant, report.units)}.",
    ]
    if report.grad_dead is not None:
        lines.append(
            f"Gradient-dead (no gradient reaches the unit on any sample): {_count(report.grad_dead, report.units)}."
        )
    if report.layers and report.units:
        mean_inactive = sum(layer.inactive_rate * layer.units for layer in report.layers) / report.units
        lines.append(
            f"On a typical sample {_pct(mean_inactive)} of outputs are zero: normal sparsity (about half at ReLU "
            "init), not deadness."
        )
    if report.samples and report.samples < 100:
        lines.append(
            f"Only {report.samples} samples were scanned: a unit that fires rarely may look dead; scan more data."
        )
    return lines


def report_renderables(report: Report) -> Iterator[Any]:
    from rich.table import Table
    from rich.text import Text

    title = f"deadneuron: {report.model} ({report.framework})"
    table = Table(title=title, title_justify="left", show_lines=False)
    for i, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if i < 2 else "right", no_wrap=i == 0)
    for layer in report.layers:
        style = "bold red" if layer.dead else ("yellow" if layer.grad_dead else "")
        table.add_row(*layer_row(layer), style=style)
    yield table
    for line in summary_lines(report):
        yield Text(line)
    for name in report.unobserved:
        yield Text(f"not observed: {name}", style="yellow")
    for warning in report.warnings:
        yield Text(f"warning: {warning}", style="bold yellow")


def render_text(renderable: Any, width: int = 120) -> str:
    """Render anything rich can render to plain text on a fixed-width, colourless console."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, highlight=False)
    console.print(renderable)
    return buffer.getvalue().rstrip("\n")


def _before_after(before: int | None, after: int | None, units: int) -> str:
    def one(count: int | None) -> str:
        return "-" if count is None else f"{count} ({_pct(count / units if units else 0.0)})"

    return f"{one(before)} -> {one(after)}"


def comparison_renderables(comparison: Comparison) -> Iterator[Any]:
    from rich.table import Table
    from rich.text import Text

    before = comparison.before
    eps = ", ".join(f"{k} {v:g}" for k, v in comparison.epsilon.items())
    table = Table(
        title=f"deadneuron: {before.model} ({before.framework}), ReLU -> {comparison.to} ({eps})",
        title_justify="left",
    )
    for i, column in enumerate(["site", "units", "dead", "dormant", "grad-dead", "dead-unit grad / live"]):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for site in comparison.sites:
        b, a = site.before, site.after
        ratio = "-" if site.gradient_ratio is None else f"{site.gradient_ratio:.2g}"
        table.add_row(
            b.name, str(b.units), _before_after(b.dead, a.dead, b.units), _before_after(b.dormant, a.dormant, b.units),
            _before_after(b.grad_dead, a.grad_dead, b.units), ratio,
        )
    total = before.units
    table.add_row(
        "total", str(total), _before_after(before.dead, comparison.after.dead, total),
        _before_after(before.dormant, comparison.after.dormant, total),
        _before_after(before.grad_dead, comparison.after.grad_dead, total),
        "-" if comparison.gradient_ratio is None else f"{comparison.gradient_ratio:.2g}", style="bold",
    )
    yield table
    for line in comparison.verdict():
        yield Text(line)
    for warning in comparison.before.warnings + comparison.after.warnings:
        yield Text(f"warning: {warning}", style="bold yellow")
