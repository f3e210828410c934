"""A report, a comparison or a training history as one self-contained HTML page, for sharing.

No script, no stylesheet or font from elsewhere, no network: the charts are inline SVG (`charts.py`, matplotlib) and
the style sheet is in the page. Without matplotlib the page keeps its tables and says what to install.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable

from . import charts
from .comparison import Comparison
from .history import FRACTIONS, History
from .layers import Report
from .text import COLUMNS, UNITS_SHOWN, layer_row, site_units, summary_lines

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 72rem; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { padding: 0.3rem 0.7rem; border-bottom: 1px solid #ddd; text-align: right; }
th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
tr.dead td { color: #b00020; font-weight: 600; }
tr.grad-dead td { color: #8a6d00; }
p.warning, p.note { color: #8a6d00; font-weight: 600; }
figure.chart { margin: 1.5rem 0; }
figure.chart svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9rem; }
"""

esc = html.escape


def _figure(chart: charts.Chart | None) -> str:
    if chart is None:
        return ""
    return (
        f'<figure class="chart" data-view="{chart.view}">{chart.svg}'
        f"<figcaption>{esc(chart.caption)}</figcaption></figure>"
    )


def _charts(draw: Iterable[Callable[[], charts.Chart | None]]) -> str:
    if not charts.available():
        return (
            f'<p class="note">Charts need matplotlib, which is not installed: {esc(charts.INSTALL)} '
            "(or pip install matplotlib), then write the page again.</p>"
        )
    return "\n".join(_figure(make()) for make in draw)


def _unit_paragraphs(report: Report, limit: int | None) -> list[str]:
    """Which units of each site are dead, dormant or gradient-dead: the first `limit` of each state, and where that
    leaves some out, every one of them in a <details> element (no script: the browser folds it)."""
    parts = []
    for layer in report.layers:
        shown = site_units(layer, limit)
        if shown is None:
            continue
        parts.append(f'<p class="units">units of {esc(layer.name)}: {esc(shown)}</p>')
        every = site_units(layer, None)
        if every != shown:
            parts.append(
                f"<details><summary>all units of {esc(layer.name)}</summary><p>{esc(every or '')}</p></details>"
            )
    return parts


def _report_section(report: Report, heading: str | None = None, units: int | None = UNITS_SHOWN) -> str:
    parts = [f"<h2>{esc(heading)}</h2>" if heading else ""]
    parts.append("<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in COLUMNS) + "</tr></thead><tbody>")
    for layer in report.layers:
        css = "dead" if layer.dead else ("grad-dead" if layer.grad_dead else "")
        cells = "".join(f"<td>{esc(cell)}</td>" for cell in layer_row(layer))
        parts.append(f'<tr class="{css}">{cells}</tr>')
    parts.append("</tbody></table>")
    parts.extend(_unit_paragraphs(report, units))
    parts.extend(f"<p>{esc(line)}</p>" for line in summary_lines(report))
    parts.extend(f'<p class="warning">not observed: {esc(name)}</p>' for name in report.unobserved)
    parts.extend(f'<p class="warning">warning: {esc(w)}</p>' for w in report.warnings)
    return "\n".join(parts)


def _history_table(history: History) -> str:
    sites = history.sites
    head = [history.axis, *(f"{f} (all)" for f in FRACTIONS), *(f"dead: {site}" for site in sites)]
    rows = []
    for window in history.windows:
        keys = [*FRACTIONS, *(f"dead_fraction/{site}" for site in sites)]
        values = [f"{100 * window.figures[k]:.1f}%" if k in window.figures else "-" for k in keys]
        rows.append("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in [str(window.step), *values]) + "</tr>")
    header = "".join(f"<th>{esc(c)}</th>" for c in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def to_html(result: Report | Comparison | History, units: int | None = UNITS_SHOWN) -> str:
    """A Report, a Comparison or a callback's History (`monitor.history()`) as a page; the dead, dormant and
    gradient-dead units of each site are named, the first `units` of each (all when None) and the rest folded."""
    if isinstance(result, Comparison):
        title = f"deadneuron: {result.before.model} ({result.before.framework}), ReLU -> {result.to}"
        body = "\n".join(
            [
                "".join(f"<p>{esc(line)}</p>" for line in result.verdict()),
                _charts([lambda: charts.comparison_chart(result), lambda: charts.revival_chart(result)]),
                _report_section(result.before, "Before (ReLU)", units),
                _report_section(result.after, f"After ({result.to})", units),
            ]
        )
    elif isinstance(result, History):
        title = f"deadneuron: {result.model} during training"
        body = _charts([lambda: charts.history_chart(result)]) + "\n" + _history_table(result)
    else:
        title = f"deadneuron: {result.model} ({result.framework})"
        body = _charts([lambda: charts.units_chart(result), lambda: charts.firing_chart(result)])
        body += "\n" + _report_section(result, units=units)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>{esc(title)}</h1>\n{body}\n</body></html>\n"
    )

