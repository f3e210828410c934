"""Which units: the console and the HTML page name the dead, dormant and gradient-dead units of each site (the first
few by default, all with `--all-units`), a comparison names them before and after the swap, the summary reads zeros
by activation kind, and comparison tables of real models keep each site on one line at 120 columns."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deadneuron.core.stats import SiteStats  # noqa: E402
from deadneuron.report import Report, SiteInfo  # noqa: E402
from deadneuron.report.text import UNITS_SHOWN, summary_lines  # noqa: E402

from .conftest import run_cli  # noqa: E402

DEAD = list(range(3, 23))  # 20 units forced dead in the hidden layer: more than UNITS_SHOWN


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 32)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(32, 4)
        with torch.no_grad():
            self.fc1.weight[DEAD] = 0.0  # zero incoming weights and a negative bias: never fires
            self.fc1.bias[DEAD] = -1.0
            self.fc1.bias[[u for u in range(32) if u not in DEAD]] = 0.5  # the rest fire on most inputs

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("units")
    torch.manual_seed(0)
    model = Mlp().eval()
    program = torch.export.export(model, (torch.randn(4, 6),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "mlp.pt2")
    np.savez(folder / "data.npz", x=np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32))
    return folder


def _units_line(stdout: str, site: str = "act") -> str:
    """The `units of SITE:` line, joined again where the console wrapped it at 120 columns."""
    text = " ".join(stdout.split())
    found = re.search(rf"(units of {site}: .*?) (?=units of |Swapped |Nothing |\d+ samples, )", text)
    assert found, stdout
    return found.group(1)


def _listed(text: str) -> list[int]:
    return [int(u) for u in re.findall(r"\d+", text.split(" and ")[0])]


@pytest.mark.slow
def test_scan_names_the_first_units_and_all_of_them_with_a_flag(saved):
    base = ["scan", str(saved / "mlp.pt2"), "--data", str(saved / "data.npz"), "--loss", "none"]
    result = run_cli(*base, "--html", str(saved / "few.html"))
    assert result.returncode == 0, result.stderr
    line = _units_line(result.stdout)
    assert line.startswith("units of act: dead ")
    assert _listed(line.split("dead ", 1)[1]) == DEAD[:UNITS_SHOWN]
    assert line.endswith(f"and {len(DEAD) - UNITS_SHOWN} more")

    result = run_cli(*base, "--all-units", "--html", str(saved / "all.html"))
    assert result.returncode == 0, result.stderr
    line = _units_line(result.stdout)
    assert line == "units of act: dead " + ", ".join(map(str, DEAD))

    # The page names the first few and folds the whole list into a <details> element; with --all-units it shows
    # them all at once.
    page = (saved / "few.html").read_text()
    shown = re.search(r'<p class="units">units of act: dead ([^<]*)</p>', page)
    assert shown and _listed(shown.group(1)) == DEAD[:UNITS_SHOWN]
    folded = re.search(r"<details><summary>all units of act</summary><p>dead ([^<]*)</p></details>", page)
    assert folded and _listed(folded.group(1)) == DEAD
    page = (saved / "all.html").read_text()
    assert "<details>" not in page
    assert f'<p class="units">units of act: dead {", ".join(map(str, DEAD))}</p>' in page


@pytest.mark.slow
def test_compare_names_the_dead_units_before_and_after_the_swap(saved):
    result = run_cli("compare", str(saved / "mlp.pt2"), "--data", str(saved / "data.npz"), "--all-units")
    assert result.returncode == 0, result.stderr
    line = _units_line(result.stdout)
    assert line == f"units of act: dead under relu {', '.join(map(str, DEAD))}; dead after the swap none"


def _stats(pre: np.ndarray, post: np.ndarray) -> SiteStats:
    """The per-unit counts of one site from its pre-activations and outputs (samples, units, positions)."""
    n, units, positions = pre.shape
    stats = SiteStats.empty(units)
    stats.samples, stats.positions = n, positions
    stats.fired[:] = (post != 0).any(axis=2).sum(axis=0)
    stats.positive[:] = (pre > 0).any(axis=2).sum(axis=0)
    stats.max_abs[:] = np.abs(post).max(axis=(0, 2))
    stats.inactive_sum[:] = (post == 0).mean(axis=2).sum(axis=0)
    return stats


def _report(kinds: list[str]) -> Report:
    sites = []
    rng = np.random.default_rng(0)
    for i, kind in enumerate(kinds):
        pre = rng.standard_normal((40, 10, 1))
        post = np.maximum(pre, 0.0) if kind == "relu" else pre * 0.5 * (1 + np.tanh(pre))  # gelu-like: never 0
        sites.append((SiteInfo(f"s{i}", kind, 10, 1), _stats(pre, post)))
    return Report.build(framework="torch", model="m", loss="none", sites=sites)


def test_zeros_are_read_by_kind():
    (relu,) = [line for line in summary_lines(_report(["relu", "relu"])) if "normal sparsity" in line]
    assert relu.startswith("On a typical sample") and "of outputs are zero" in relu

    lines = summary_lines(_report(["gelu", "gelu"]))
    assert not any("normal sparsity" in line for line in lines)  # a GELU output is exactly zero almost nowhere
    assert any(line.startswith("gelu outputs are exactly zero almost nowhere") for line in lines)

    lines = summary_lines(_report(["relu", "gelu"]))
    (mixed,) = [line for line in lines if "normal sparsity" in line]
    assert "of outputs at the ReLU-like sites are zero" in mixed
    # the rate is that of the ReLU site alone (about half), not diluted by the GELU site's zero rate
    rate = float(re.search(r"([\d.]+)% of outputs", mixed).group(1))
    assert 35 < rate < 65


@pytest.mark.slow
def test_comparison_tables_of_a_transformers_model_fit_120_columns(tmp_path):
    pytest.importorskip("transformers")
    from . import hf_zoo as zoo

    model = zoo.build("opt")
    model.save_pretrained(tmp_path / "opt")
    np.savez(tmp_path / "ids.npz", input_ids=zoo.token_ids(16).numpy())
    result = run_cli("compare", str(tmp_path / "opt"), "--data", str(tmp_path / "ids.npz"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 120
    for i in range(zoo.LAYERS):
        name = zoo.ACTIVATION_PATH["opt"].format(i=i)
        (row,) = [line for line in lines if line.startswith(name + " ")]
        assert re.fullmatch(rf"{re.escape(name)}\s+{zoo.FFN}\s+\d+ -> \d+\s+\d+ -> \d+\s+\d+ -> \d+\s+\S+", row)
