"""Reports and their pictures, framework-free (numpy; rich and matplotlib only when rendering).

- `layers`: `SiteInfo`, `LayerReport`, `Report`: what one scan found (the `deadneuron.report/1` JSON).
- `comparison`: `Comparison`: two reports of the same data, before and after a swap.
- `history`: `History`: the figures of a training callback's windows, in order.
- `text`: the rich tables and summary prose (and plain text on a fixed-width, colourless console).
- `charts`: the SVG charts (matplotlib, optional); `html`: the self-contained page.

Imports run one way, data -> text -> rich: `text` names the data classes for the type checker only, and `html`
and `charts` sit on top of both.
"""

from __future__ import annotations

from .comparison import Comparison, SiteComparison
from .layers import COMPARISON_SCHEMA, REPORT_SCHEMA, LayerReport, Report, SiteInfo

__all__ = [
    "COMPARISON_SCHEMA",
    "REPORT_SCHEMA",
    "Comparison",
    "LayerReport",
    "Report",
    "SiteComparison",
    "SiteInfo",
]
