"""The pictures: the HTML page's charts (one per view, labelled, nothing fetched from elsewhere), the page without
matplotlib, the console's firing bars at 80 columns and without colour, and a real browser drawing the page."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deadneuron.cli import main
from deadneuron.core.stats import SiteStats
from deadneuron.core.window import WindowTracker
from deadneuron.report import Comparison, Report, SiteInfo
from deadneuron.report.html import to_html
from deadneuron.report.text import firing_bar, render_text
from tests.test_core import stats_from_activations

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models"
SITES = ("features.conv1.act", "block2/relu", "head.relu#2")


def _report(dead_per_site: tuple[int, ...] = (1, 3, 0), samples: int = 40, seed: int = 0) -> Report:
    """Three sites of 8 units; the first `dead` units of each never fire, unit 7 fires on few samples."""
    rng = np.random.default_rng(seed)
    sites = []
    for name, dead in zip(SITES, dead_per_site, strict=True):
        pre = rng.normal(size=(samples, 8, 3))
        pre[:, :dead] = -1.0
        pre[: samples - 2, 7] = -1.0  # nearly dead: fires on two samples
        grad = rng.normal(size=(samples, 8, 3))
        sites.append((SiteInfo(name, "relu", 8, 1), stats_from_activations(pre, grad)))
    return Report.build(framework="torch", model="zoo<net>", loss="probe", sites=sites)


def _comparison() -> Comparison:
    before = _report()
    after_sites = []
    for layer in before.layers:
        stats = SiteStats.empty(8)
        stats.samples = stats.grad_samples = 40
        stats.fired[:] = 40
        stats.positive[:] = 40
        stats.positive[layer.dead_units] = 0
        stats.grad_nonzero[:] = 40
        stats.grad_abs_sum[:] = 4.0
        stats.grad_abs_sum[layer.dead_units] = 0.04
        after_sites.append((SiteInfo(layer.name, "sinerelu", 8, 1), stats))
    after = Report.build(framework="torch", model="zoo<net>", loss="probe", sites=after_sites)
    return Comparison.build(
        to="sinerelu", epsilon={"conv": 0.0025}, before=before, after=after, agreement=1.0, output_drift=0.01
    )


def _history() -> object:
    tracker = WindowTracker("zoo<net>", axis="step")
    for window, dead in enumerate([(0, 1, 0), (1, 3, 0), (2, 5, 1)], start=1):
        tracker.close(_report(dead, seed=window), first_step=0, last_step=0, step=100 * window)
    return tracker.history


EXTERNAL = ("http", "src=", "<script", "@import", "url(http", "<link", "@font-face")


def _views(page: str) -> list[str]:
    return re.findall(r'<figure class="chart" data-view="([a-z]+)">', page)


def _chart(page: str, view: str) -> str:
    match = re.search(rf'<figure class="chart" data-view="{view}">(.*?)</figure>', page, re.DOTALL)
    assert match, view
    return match.group(1)


def _check_self_contained(page: str) -> None:
    for needle in EXTERNAL:
        assert needle not in page, needle


def test_a_report_page_has_the_units_and_firing_charts_labelled_with_its_sites():
    report = _report()
    page = to_html(report)
    assert _views(page) == ["units", "firing"]
    for view in ("units", "firing"):
        svg = _chart(page, view)
        assert svg.count("<svg") == 1
        for name in SITES:
            assert f">{name}<" in svg or f">{name.replace('#', '&#35;')}<" in svg, (view, name)
    assert "<text" in _chart(page, "units") and ">dead<" in _chart(page, "units")
    # The strips are an image matplotlib embeds as a data URI (nothing fetched), ids are kept apart per chart.
    assert 'href="data:image/png;base64,' in _chart(page, "firing")
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    assert "zoo&lt;net&gt;" in page and "features.conv1.act" in page.split("<table")[1]
    _check_self_contained(page)


def test_a_comparison_page_draws_before_against_after_and_the_revived_gradient():
    comparison = _comparison()
    page = to_html(comparison)
    assert _views(page) == ["comparison", "revival"]
    for view in ("comparison", "revival"):
        svg = _chart(page, view)
        assert "block2/relu" in svg and "features.conv1.act" in svg, view
    # head.relu#2 had no dead unit: no formerly dead units to compare, so it is left out of the revival chart.
    assert "head.relu" not in _chart(page, "revival") and "head.relu" in _chart(page, "comparison")
    assert "formerly dead units" in _chart(page, "revival") and "Before (ReLU)" in page
    _check_self_contained(page)


def test_a_history_page_draws_the_dead_fraction_over_steps_per_site():
    history = _history()
    page = to_html(history)
    assert _views(page) == ["history"]
    svg = _chart(page, "history")
    for name in SITES:
        assert name.split("#")[0] in svg
    assert ">step<" in svg and ">all sites<" in svg
    assert "<td>300</td>" in page  # the table of windows
    _check_self_contained(page)


def test_without_matplotlib_the_page_keeps_its_tables_and_says_what_to_install(tmp_path):
    # A child process in which `import matplotlib` fails, as on an install without the `plot` extra.
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from tests.test_pictures import _comparison, _history, _report\n"
        "from deadneuron.report.html import to_html\n"
        "import pathlib\n"
        "for name, result in (('report', _report()), ('comparison', _comparison()), ('history', _history())):\n"
        f"    pathlib.Path({str(tmp_path)!r}, name + '.html').write_text(to_html(result))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for name in ("report", "comparison", "history"):
        page = (tmp_path / f"{name}.html").read_text()
        assert "<svg" not in page and not _views(page), name
        assert "pip install &#x27;deadneuron[plot]&#x27;" in page, name
        assert "<table>" in page and "block2/relu" in page, name


def test_firing_bar_sorts_units_and_marks_the_never_fired():
    assert firing_bar(np.array([0.0, 0.0, 0.1, 0.5, 1.0, 1.0, 1.0, 1.0])) == "··▁▄████"
    assert firing_bar(np.array([1.0, 0.0])) == "····████"
    assert firing_bar(np.linspace(0.01, 1, 64)) == "▁▂▃▄▅▆▇█"
    assert firing_bar(np.array([])) == ""


def test_the_console_table_fits_80_columns_one_line_per_site():
    report = _report()
    text = render_text(report, width=80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line for line in lines if line.startswith(SITES)]
    assert len(rows) == 3  # no cell folded onto a second line
    assert rows[0].split()[:4] == ["features.conv1.act", "8", "1", "(12.5%)"]  # one kind: in the title
    assert "·" in rows[0] and "█" in rows[0]  # the bar: one dead unit, live ones
    comparison = render_text(_comparison(), width=80).splitlines()
    assert max(len(line) for line in comparison) <= 80
    assert [line.split()[:3] for line in comparison if line.startswith("block2")] == [["block2/relu", "8", "3"]]


COLOUR = re.compile(r"\x1b\[([0-9;]*)m")


def _coloured(text: str) -> bool:
    """Whether an SGR escape sets a foreground or background colour (bold alone is not colour)."""
    for params in COLOUR.findall(text):
        codes = [int(c) for c in params.split(";") if c]
        if any(30 <= c <= 49 or 90 <= c <= 107 for c in codes):
            return True
    return False


@pytest.mark.parametrize("how", ["default", "flag", "env"])
def test_no_color_flag_and_no_color_variable(how, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.setenv("FORCE_COLOR", "1")  # colour even though stdout is captured
    monkeypatch.delenv("NO_COLOR", raising=False)
    args = ["scan", str(SAMPLE / "digits_cnn.pt2"), "--data", str(SAMPLE / "digits_heldout.npz")]
    if how == "flag":
        args.append("--no-color")
    if how == "env":
        monkeypatch.setenv("NO_COLOR", "1")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "relu3" in out
    assert _coloured(out) == (how == "default")


@pytest.mark.slow
def test_a_real_browser_draws_the_page(tmp_path):
    """Headless Chromium (Debian's `chromium` package; .ci/run installs it) renders the page: the screenshot has
    the charts' colours, not a blank page."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium); .ci/run installs it")
    page = tmp_path / "report.html"
    page.write_text(to_html(_report()))
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1000,1200", f"--screenshot={shot}", page.as_uri(),
        ],
        check=True, capture_output=True, timeout=120,
    )
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[0] > 100 and pixels.std() > 0.05  # not one flat colour
    # The dead colour of the units chart (#d55e00) and the alive colour (#009e73) are on screen.
    for colour in ((0xD5, 0x5E, 0x00), (0x00, 0x9E, 0x73)):
        close = np.abs(pixels * 255 - np.array(colour)).max(axis=-1) < 12
        assert close.sum() > 200, colour
