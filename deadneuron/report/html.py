"""A report as one self-contained HTML page (no scripts, no external assets), for sharing."""

from __future__ import annotations

import html
from typing import Any

from .comparison import Comparison
from .text import COLUMNS, layer_row, summary_lines

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { padding: 0.3rem 0.7rem; border-bottom: 1px solid #ddd; text-align: right; }
th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
tr.dead td { color: #b00020; font-weight: 600; }
tr.grad-dead td { color: #8a6d00; }
p.warning { color: #8a6d00; font-weight: 600; }
"""


def _report_section(report: Any, heading: str | None = None) -> str:
    esc = html.escape
    parts = [f"<h2>{esc(heading)}</h2>" if heading else ""]
    parts.append("<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in COLUMNS) + "</tr></thead><tbody>")
    for layer in report.layers:
        css = "dead" if layer.dead else ("grad-dead" if layer.grad_dead else "")
        cells = "".join(f"<td>{esc(cell)}</td>" for cell in layer_row(layer))
        parts.append(f'<tr class="{css}">{cells}</tr>')
    parts.append("</tbody></table>")
    parts.extend(f"<p>{esc(line)}</p>" for line in summary_lines(report))
    parts.extend(f'<p class="warning">not observed: {esc(name)}</p>' for name in report.unobserved)
    parts.extend(f'<p class="warning">warning: {esc(w)}</p>' for w in report.warnings)
    return "\n".join(parts)


def to_html(result: Any) -> str:
    """A Report, or anything with `html_sections()` (a Comparison), as a page."""
    esc = html.escape
    if isinstance(result, Comparison):
        title = f"deadneuron: {result.before.model}"
        verdict = "".join(f"<p>{esc(line)}</p>" for line in result.verdict())
        before = _report_section(result.before, "Before (ReLU)")
        body = verdict + before + _report_section(result.after, f"After ({result.to})")
    else:
        title = f"deadneuron: {result.model} ({result.framework})"
        body = _report_section(result)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>{esc(title)}</h1>\n{body}\n</body></html>\n"
    )
