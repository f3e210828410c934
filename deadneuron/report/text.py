"""Presentation of reports: rich renderables, plain text (a colourless rich console) and the summary prose.

The tables fit 80 columns for short site names: counts with their percentage, and the units' firing rates as a
bar of unicode blocks (see `firing_bar`) instead of columns of numbers.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.kinds import ZERO_REGION

if TYPE_CHECKING:
    from .comparison import Comparison
    from .layers import LayerReport, Report


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _count(count: int | None, total: int) -> str:
    if count is None:
        return "-"
    return f"{count}/{total} ({_pct(count / total if total else 0.0)})"


def _share(count: int | None, total: int) -> str:
    """A count and its percentage of `total` (the units column gives the total)."""
    return "-" if count is None else f"{count} ({_pct(count / total if total else 0.0)})"


#: Firing rates in (0, 1] by eighths; a unit that never fired (rate 0) is a dot.
BLOCKS = "▁▂▃▄▅▆▇█"
NEVER = "·"
BAR_WIDTH = 8


def firing_bar(rates: np.ndarray, width: int = BAR_WIDTH) -> str:
    """The units' firing rates, sorted from the lowest: character j is the rate of the unit at quantile
    (j + 0.5) / width, a dot when that unit never fired, else a block from ▁ (rate up to 1/8) to █ (above 7/8).
    Dots on the left are dead units; low blocks next to them are units close to dying.

    >>> firing_bar(np.array([0.0, 0.0, 0.1, 0.5, 1.0, 1.0, 1.0, 1.0]))
    '··▁▄████'
    """
    if rates.size == 0:
        return ""
    picked = np.quantile(rates, (np.arange(width) + 0.5) / width, method="inverted_cdf")
    levels = np.clip(np.ceil(picked * len(BLOCKS)).astype(int) - 1, 0, len(BLOCKS) - 1)
    return "".join(NEVER if rate <= 0 else BLOCKS[level] for rate, level in zip(picked, levels, strict=True))


def _firing(layer: LayerReport) -> str:
    if layer.stats is None:  # a report without per-unit statistics: the median alone
        return f"{layer.firing_rate['median']:.2f}"
    return firing_bar(layer.stats.firing_rate)


def layer_row(layer: LayerReport) -> list[str]:
    return [
        layer.name,
        layer.kind,
        str(layer.units),
        _share(layer.dead, layer.units),
        _share(layer.dormant, layer.units),
        _share(layer.grad_dead, layer.units),
        _firing(layer),
        _pct(layer.inactive_rate),
    ]


COLUMNS = ["site", "kind", "units", "dead", "dormant", "grad-dead", "firing", "inactive"]


# How many unit indices the console and the HTML page name per site and state by default; `--all-units` (limit
# None) names them all; the JSON always lists them all.
UNITS_SHOWN = 8


def few_units(units: list[int], limit: int | None = UNITS_SHOWN) -> str:
    """The first `limit` indices (all when `limit` is None) and how many more there are.

    >>> few_units(list(range(10)), 3)
    '0, 1, 2 and 7 more'
    """
    shown = units if limit is None else units[:limit]
    more = len(units) - len(shown)
    return ", ".join(map(str, shown)) + (f" and {more} more" if more else "")


def site_units(layer: LayerReport, limit: int | None = UNITS_SHOWN) -> str | None:
    """Which units of one site are dead, dormant but not dead, and gradient-dead although not dead (a dead unit of
    the ReLU family is gradient-dead too, so it is not listed twice); None when there are none."""
    dead = set(layer.dead_units)
    parts = [f"dead {few_units(layer.dead_units, limit)}"] if layer.dead_units else []
    dormant = [u for u in layer.dormant_units if u not in dead]
    if dormant:
        parts.append(f"dormant {few_units(dormant, limit)}")
    grad_dead = [u for u in layer.grad_dead_units or [] if u not in dead]
    if grad_dead:
        parts.append(f"grad-dead but not dead {few_units(grad_dead, limit)}")
    return "; ".join(parts) or None


def unit_lines(report: Report, limit: int | None = UNITS_SHOWN) -> list[str]:
    """`units of SITE: ...` for every site with a dead, dormant or gradient-dead unit (see `site_units`)."""
    lines = []
    for layer in report.layers:
        units = site_units(layer, limit)
        if units:
            lines.append(f"units of {layer.name}: {units}")
    return lines


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
    lines.extend(_sparsity_lines(report))
    if report.samples and report.samples < 100:
        lines.append(
            f"Only {report.samples} samples were scanned: a unit that fires rarely may look dead; scan more data."
        )
    return lines


def _sparsity_lines(report: Report) -> list[str]:
    """What the zeros mean. At ReLU-like sites (output exactly 0 on a half-line of inputs: `ZERO_REGION`) about half
    of the outputs are zero on a sample at init: normal sparsity, not deadness. Smooth activations (GELU, SiLU, ...,
    and SineReLU) are exactly zero almost nowhere, so their near-zero inactive rate says nothing either way; there the
    telling figure is dormant (pre-activation never > 0)."""
    hard = [layer for layer in report.layers if layer.kind in ZERO_REGION]
    smooth = sorted({layer.kind for layer in report.layers if layer.kind not in ZERO_REGION})
    lines = []
    units = sum(layer.units for layer in hard)
    if units:
        mean_inactive = sum(layer.inactive_rate * layer.units for layer in hard) / units
        family = "" if len(hard) == len(report.layers) else " at the ReLU-like sites"
        lines.append(
            f"On a typical sample {_pct(mean_inactive)} of outputs{family} are zero: normal sparsity (about half at "
            "ReLU init), not deadness."
        )
    if smooth:
        lines.append(
            f"{', '.join(smooth)} outputs are exactly zero almost nowhere: there a unit is dead only when its output "
            "is 0 on every sample; dormant (pre-activation never > 0) is the figure to read."
        )
    return lines


def _table() -> Any:
    """A table without side borders or padding at the edges, so eight columns fit 80 terminal columns (the title is
    a line of its own, not wrapped to the table's width)."""
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE_HEAVY, show_edge=False, pad_edge=False, collapse_padding=True)


def report_renderables(report: Report, units: int | None = UNITS_SHOWN) -> Iterator[Any]:
    """The console report: title, table, the units of each site (the first `units` indices of each state; all when
    None), the summary, unobserved sites and warnings."""
    from rich.text import Text

    # One kind for every site (the common case) goes into the title, leaving the width to the site names.
    kinds = {layer.kind for layer in report.layers}
    one_kind = f", every site {next(iter(kinds))}" if len(kinds) == 1 else ""
    yield Text(f"deadneuron: {report.model} ({report.framework}{one_kind})", style="bold")
    shown = [i for i in range(len(COLUMNS)) if not (one_kind and COLUMNS[i] == "kind")]
    table = _table()
    for i in shown:
        table.add_column(COLUMNS[i], justify="left" if i < 2 else "right", overflow="fold", no_wrap=i > 0)
    for layer in report.layers:
        style = "bold red" if layer.dead else ("yellow" if layer.grad_dead else "")
        row = layer_row(layer)
        table.add_row(*(row[i] for i in shown), style=style)
    yield table
    for line in unit_lines(report, units):
        yield Text(line)
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


def _before_after(before: int | None, after: int | None) -> str:
    return f"{'-' if before is None else before} -> {'-' if after is None else after}"


def comparison_unit_lines(comparison: Comparison, limit: int | None = UNITS_SHOWN) -> list[str]:
    """Per site with dead units before or after the swap: which were dead before, which are dead after."""
    lines = []
    for site in comparison.sites:
        b, a = site.before, site.after
        if not (b.dead_units or a.dead_units):
            continue
        before = few_units(b.dead_units, limit) if b.dead_units else "none"
        after = few_units(a.dead_units, limit) if a.dead_units else "none"
        lines.append(f"units of {b.name}: dead under {b.kind} {before}; dead after the swap {after}")
    return lines


def renderables(result: Report | Comparison, units: int | None = UNITS_SHOWN) -> Any:
    """A report or a comparison as one rich renderable, naming the first `units` units of each state per site (all
    when None); `print(report)` and rich's `console.print(report)` use the default."""
    from rich.console import Group

    from .comparison import Comparison  # imported here: comparison.py imports this module

    if isinstance(result, Comparison):
        return Group(*comparison_renderables(result, units))
    return Group(*report_renderables(result, units))


def comparison_renderables(comparison: Comparison, units: int | None = UNITS_SHOWN) -> Iterator[Any]:
    from rich.text import Text

    before = comparison.before
    eps = ", ".join(f"{k} {v:g}" for k, v in comparison.epsilon.items())
    yield Text(f"deadneuron: {before.model} ({before.framework}), ReLU -> {comparison.to} ({eps})", style="bold")
    table = _table()
    # As in the scan's table, a long site name folds and the counts never do ("11 -> 11" cut into three lines is
    # unreadable): a transformers path (`roberta.encoder.layer.0.intermediate.intermediate_act_fn`) on 80 columns.
    # The ratio's header may wrap; its values are short.
    columns = ["site", "units", "dead", "dormant", "grad-dead", "dead-unit grad / live"]
    for i, column in enumerate(columns):
        table.add_column(
            column, justify="left" if i == 0 else "right", overflow="fold", no_wrap=0 < i < len(columns) - 1
        )
    for site in comparison.sites:
        b, a = site.before, site.after
        ratio = "-" if site.gradient_ratio is None else f"{site.gradient_ratio:.2g}"
        table.add_row(
            b.name, str(b.units), _before_after(b.dead, a.dead), _before_after(b.dormant, a.dormant),
            _before_after(b.grad_dead, a.grad_dead), ratio,
        )
    total = before.units
    table.add_row(
        "total", str(total), _before_after(before.dead, comparison.after.dead),
        _before_after(before.dormant, comparison.after.dormant),
        _before_after(before.grad_dead, comparison.after.grad_dead),
        "-" if comparison.gradient_ratio is None else f"{comparison.gradient_ratio:.2g}", style="bold",
    )
    yield table
    for line in comparison_unit_lines(comparison, units):
        yield Text(line)
    for line in comparison.verdict():
        yield Text(line)
    for warning in dict.fromkeys(comparison.before.warnings + comparison.after.warnings):  # each once, in order
        yield Text(f"warning: {warning}", style="bold yellow")
