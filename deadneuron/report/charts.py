"""The report's charts as inline SVG, drawn with matplotlib (the optional extra `deadneuron[plot]`).

Why matplotlib: it is the plotting library of the scientific Python stack, already present where people train
torch or Keras models, and its SVG backend writes vector output we can inline in the page: no script, no font file,
no network. Text stays text (`svg.fonttype: none`), so the labels are searchable and the page stays small; raster
parts (the firing-rate strips) are embedded as data URIs by matplotlib itself. It is imported only when a chart is
drawn, never by `import deadneuron`, and without it the page keeps its tables (see `html.py`).

Each function returns one `Chart`: its view name, a caption and the SVG markup, or None when the data has nothing to
draw (no gradient taken, no formerly dead unit, no window yet).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .comparison import Comparison
    from .history import History
    from .layers import LayerReport, Report

INSTALL = "pip install 'deadneuron[plot]'"

#: Okabe-Ito colours (distinguishable with the common colour-vision deficiencies).
DEAD, DORMANT, GRAD_DEAD, ALIVE, OTHER = "#d55e00", "#e69f00", "#cc79a7", "#009e73", "#0072b2"


@dataclass(frozen=True)
class Chart:
    view: str  # "units", "firing", "comparison", "revival", "history"
    caption: str
    svg: str  # markup to inline in an HTML page

    def standalone(self) -> str:
        """The chart as an SVG file (an inline SVG takes its namespace from the page; a file must declare it)."""
        return self.svg.replace("<svg", '<svg xmlns="http://www.w3.org/2000/svg"', 1)


def available() -> bool:
    """Whether matplotlib can be imported (the charts need it; the page's tables do not)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(rows: int) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(7.5, 1.3 + 0.32 * max(rows, 1)), layout="constrained")


def _svg(figure: Any, view: str) -> str:
    """The figure as SVG markup to inline in HTML: no XML prolog or DOCTYPE (which name external DTDs), no
    namespace URLs, and ids prefixed with the view so that several charts on one page never share one."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "deadneuron"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg)
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.DOTALL)
    svg = svg.replace("xlink:href=", "href=")
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{view}-\1"', svg)
    svg = re.sub(r'href="#([^"]+)"', rf'href="#{view}-\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{view}-\1)", svg)
    return svg.replace("<svg", f'<svg role="img" aria-label="{view} chart"', 1)


def _names(layers: list[LayerReport]) -> list[str]:
    return [layer.name for layer in layers]


def _category_counts(layer: LayerReport) -> tuple[int, int, int, int]:
    """Disjoint counts: dead; dormant but not dead (leaky and smooth activations); gradient-dead but firing; alive."""
    dead = set(layer.dead_units)
    dormant = set(layer.dormant_units) - dead
    grad_dead = set(layer.grad_dead_units or ()) - dead - dormant
    return len(dead), len(dormant), len(grad_dead), layer.units - len(dead) - len(dormant) - len(grad_dead)


def _horizontal(ax: Any, names: list[str]) -> None:
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()  # first site on top, as in the table
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(_percent())
    ax.grid(axis="x", alpha=0.3)


def _legend(ax: Any) -> None:
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize="small")


def _percent() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0)


def units_chart(report: Report) -> Chart | None:
    """Per site: the fractions of its units that are dead, dormant, gradient-dead and alive, as a stacked bar."""
    layers = [layer for layer in report.layers if layer.units]
    if not layers:
        return None
    counts = np.array([_category_counts(layer) for layer in layers], dtype=float)
    shares = counts / np.array([layer.units for layer in layers], dtype=float)[:, None]
    figure = _figure(len(layers))
    ax = figure.add_subplot()
    left = np.zeros(len(layers))
    labels = ("dead", "dormant (not dead)", "gradient-dead (firing)", "alive")
    for column, (label, colour) in enumerate(zip(labels, (DEAD, DORMANT, GRAD_DEAD, ALIVE), strict=True)):
        ax.barh(range(len(layers)), shares[:, column], left=left, color=colour, label=label, height=0.7)
        left += shares[:, column]
    _horizontal(ax, _names(layers))
    ax.set_xlabel("share of the site's units")
    ax.set_title(f"Units per site ({report.model})", loc="left")
    _legend(ax)
    caption = "Each site's units: dead (never fired), dormant, gradient-dead (fire but receive no gradient), alive."
    return Chart("units", caption, _svg(figure, "units"))


STRIP = 256  # columns per site in the firing-rate strips: quantiles of its units, whatever its width


def firing_chart(report: Report) -> Chart | None:
    """Per site, its units' firing rates sorted from the lowest, as a colour strip; dead units are red."""
    layers = [layer for layer in report.layers if layer.stats is not None and layer.units]
    if not layers:
        return None
    from matplotlib import colormaps

    quantiles = (np.arange(STRIP) + 0.5) / STRIP
    rows = np.stack(
        [np.quantile(layer.stats.firing_rate, quantiles, method="inverted_cdf") for layer in layers if layer.stats]
    )
    figure = _figure(len(layers))
    ax = figure.add_subplot()
    # Rate 0 (dead) falls under vmin and takes the `under` colour; a barely firing unit is the darkest blue.
    colours = colormaps["viridis"].with_extremes(under=DEAD)
    image = ax.imshow(
        rows, aspect="auto", interpolation="nearest", cmap=colours, vmin=1e-9, vmax=1.0,
        extent=(0.0, 1.0, len(layers) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(layers)), _names(layers))
    ax.xaxis.set_major_formatter(_percent())
    ax.set_xlabel("units of the site, sorted by firing rate (red: never fired)")
    ax.set_title("Firing rate of each unit (fraction of samples on which it fired)", loc="left")
    figure.colorbar(image, ax=ax, extend="min", label="firing rate", fraction=0.05, pad=0.02)
    caption = "Sorted firing rates per site: red units never fired; dark units next to them fire rarely and may die."
    return Chart("firing", caption, _svg(figure, "firing"))


def comparison_chart(comparison: Comparison) -> Chart | None:
    """Per site: dead and dormant shares before the swap against dead and gradient-dead shares after it."""
    sites = [site for site in comparison.sites if site.before.units]
    if not sites:
        return None
    names = [site.before.name for site in sites]
    series = [
        ("dead before (ReLU)", [site.before.dead_fraction for site in sites], DEAD),
        (f"dead after ({comparison.to})", [site.after.dead_fraction for site in sites], OTHER),
        (f"dormant after ({comparison.to})", [site.after.dormant_fraction for site in sites], DORMANT),
        (f"gradient-dead after ({comparison.to})", [site.after.grad_dead_fraction or 0.0 for site in sites], GRAD_DEAD),
    ]
    figure = _figure(2 * len(sites))
    ax = figure.add_subplot()
    height = 0.8 / len(series)
    for i, (label, values, colour) in enumerate(series):
        offsets = np.arange(len(sites)) - 0.4 + (i + 0.5) * height
        ax.barh(offsets, values, height=height, color=colour, label=label)
    _horizontal(ax, names)
    ax.set_xlabel("share of the site's units")
    ax.set_title(f"Before and after the swap to {comparison.to}", loc="left")
    _legend(ax)
    caption = (
        f"Per site, before the swap and after it: dormant after the swap are the units that would still be dead "
        f"under ReLU; gradient-dead after it are those {comparison.to} does not reach."
    )
    return Chart("comparison", caption, _svg(figure, "comparison"))


def revival_chart(comparison: Comparison) -> Chart | None:
    """Per site, after the swap: median mean |gradient| of the units that were dead against that of the live."""
    rows = []
    for site in comparison.sites:
        split = site.gradients()
        if split is not None and split[0].size and split[1].size:
            rows.append((site.before.name, float(np.median(split[0])), float(np.median(split[1]))))
    if not rows:
        return None
    figure = _figure(2 * len(rows))
    ax = figure.add_subplot()
    positions = np.arange(len(rows))
    floor = min([v for _, dead, live in rows for v in (dead, live) if v > 0], default=1e-12) / 10
    ax.barh(positions - 0.2, [max(r[1], floor) for r in rows], height=0.4, color=DEAD, label="formerly dead units")
    ax.barh(positions + 0.2, [max(r[2], floor) for r in rows], height=0.4, color=ALIVE, label="live units")
    ax.set_xscale("log")
    ax.set_yticks(positions, [name for name, _, _ in rows])
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(f"median mean |dL/d(pre-activation)| per unit after the swap to {comparison.to} (log scale)")
    ax.set_title("Gradient reaching the formerly dead units", loc="left")
    _legend(ax)
    caption = "How much gradient the units that were dead under ReLU now receive, against the units that were alive."
    return Chart("revival", caption, _svg(figure, "revival"))


def history_chart(history: History) -> Chart | None:
    """The dead fraction of each site (and in total) at the end of each window."""
    if not history.windows:
        return None
    figure = _figure(8)
    ax = figure.add_subplot()
    for site in history.sites:
        steps, values = history.series("dead_fraction", site)
        ax.plot(steps, values, marker="o", markersize=3, label=site)
    steps, values = history.series("dead_fraction")
    ax.plot(steps, values, color="black", linewidth=2.5, linestyle="--", label="all sites")
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(_percent())
    ax.grid(alpha=0.3)
    ax.set_xlabel(history.axis)
    ax.set_ylabel("dead units")
    ax.set_title(f"Dead units over training ({history.model})", loc="left")
    _legend(ax)
    caption = f"The share of each site's units that were dead in each window, by {history.axis}."
    return Chart("history", caption, _svg(figure, "history"))
