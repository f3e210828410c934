"""The framework-free core: statistics merge exactly, verdicts follow the definitions, the JSON is the schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from deadneuron.core.stats import FIELDS, SiteStats
from deadneuron.report import REPORT_SCHEMA, Report, SiteInfo
from deadneuron.report.html import to_html


def stats_from_activations(pre: np.ndarray, grad: np.ndarray | None, atol: float = 0.0, gtol: float = 0.0) -> SiteStats:
    """Reference accumulation for a ReLU site over samples (N, units, positions), in plain numpy."""
    out = np.maximum(pre, 0.0)
    n, units, positions = pre.shape
    stats = SiteStats.empty(units)
    stats.samples = n
    stats.positions = positions
    finite = np.isfinite(out)
    stats.fired[:] = (np.abs(np.where(finite, out, 0)) > atol).any(axis=2).sum(axis=0)
    stats.positive[:] = (pre > 0).any(axis=2).sum(axis=0)
    stats.max_abs[:] = np.where(finite, np.abs(out), 0).max(axis=(0, 2))
    stats.nonfinite[:] = (~finite).any(axis=2).sum(axis=0)
    stats.inactive_sum[:] = (np.abs(out) <= atol).mean(axis=2).sum(axis=0)
    if grad is not None:
        stats.grad_samples = n
        stats.grad_nonzero[:] = (np.abs(grad) > gtol).any(axis=2).sum(axis=0)
        stats.grad_abs_sum[:] = np.abs(grad).sum(axis=(0, 2))
    return stats


activations = st.integers(2, 12).flatmap(
    lambda n: st.tuples(
        arrays(np.float64, (n, 3, 2), elements=st.sampled_from([-1.0, 0.0, 0.5, 2.0])),
        arrays(np.float64, (n, 3, 2), elements=st.sampled_from([0.0, 0.0, -0.25, 1.0])),
        st.integers(1, n - 1),
    )
)


@settings(max_examples=60, deadline=None)
@given(activations)
def test_merge_of_halves_equals_one_scan(case):
    pre, grad, cut = case
    whole = stats_from_activations(pre, grad)
    merged = stats_from_activations(pre[:cut], grad[:cut]).merge(stats_from_activations(pre[cut:], grad[cut:]))
    for name in FIELDS:
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name))
    assert merged.samples == whole.samples and merged.grad_samples == whole.grad_samples
    np.testing.assert_array_equal(merged.dead, whole.dead)
    np.testing.assert_array_equal(merged.grad_dead, whole.grad_dead)


@settings(max_examples=40, deadline=None)
@given(activations)
def test_merge_is_associative_and_commutative(case):
    pre, grad, cut = case
    a = stats_from_activations(pre[:cut], grad[:cut])
    b = stats_from_activations(pre[cut:], grad[cut:])
    c = stats_from_activations(pre, grad)
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    swapped = b.merge(a)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(left, name), getattr(right, name))
        np.testing.assert_allclose(getattr(a.merge(b), name), getattr(swapped, name))


def test_verdicts_follow_the_definitions():
    # unit 0: never positive (dead, dormant); unit 1: fires, no gradient (grad-dead); unit 2: NaN (nonfinite only)
    pre = np.array([[[-1.0], [2.0], [np.nan]], [[-3.0], [1.0], [1.0]]])
    grad = np.array([[[0.0], [0.0], [1.0]], [[0.0], [0.0], [1.0]]])
    stats = stats_from_activations(pre, grad)
    assert stats.dead.tolist() == [True, False, False]
    assert stats.dormant.tolist() == [True, False, False]
    assert stats.grad_dead.tolist() == [True, True, False]
    report = Report.build(framework="torch", model="m", loss="probe", sites=[(SiteInfo("act", "relu", 3, 1), stats)])
    layer = report.layers[0]
    assert (layer.dead_units, layer.grad_dead_units, layer.nonfinite) == ([0], [0, 1], 1)
    assert any("non-finite" in w for w in report.warnings)


def test_no_gradient_means_null_gradient_fields():
    stats = stats_from_activations(np.ones((4, 2, 1)), None)
    data = Report.build(
        framework="keras", model="m", loss="none", sites=[(SiteInfo("a", "relu", 2, 1), stats)]
    ).to_dict()
    assert data["layers"][0]["grad_dead"] is None and data["layers"][0]["grad_dead_units"] is None
    assert data["layers"][0]["grad_dead_fraction"] is None
    assert data["totals"]["grad_dead"] is None and data["totals"]["grad_dead_fraction"] is None


def test_json_follows_the_schema():
    pre = np.array([[[-1.0, -1.0], [1.0, -1.0]], [[-1.0, -2.0], [-1.0, 3.0]]])
    stats = stats_from_activations(pre, np.zeros_like(pre))
    report = Report.build(
        framework="torch",
        model="cnn",
        loss="probe",
        atol=0.0,
        gtol=0.0,
        sites=[(SiteInfo("conv.relu", "relu", 2, 1), stats), (SiteInfo("fc.relu", "relu", 2, 1), stats)],
    )
    data = json.loads(report.to_json())
    assert data["schema"] == REPORT_SCHEMA
    assert set(data) >= {"schema", "framework", "model", "samples", "loss", "thresholds", "layers", "totals"}
    layer = data["layers"][0]
    assert set(layer) == {
        "name",
        "kind",
        "units",
        "unit_axis",
        "dead",
        "dead_units",
        "dormant",
        "dormant_units",
        "grad_dead",
        "grad_dead_units",
        "nonfinite",
        "dead_fraction",
        "grad_dead_fraction",
        "inactive_rate",
        "firing_rate",
    }
    assert layer["dead_units"] == [0] and layer["dead_fraction"] == 0.5
    assert layer["firing_rate"] == {"min": 0.0, "median": 0.5, "max": 1.0}
    # zeros among the 4 outputs of each unit: 4 (unit 0) and 2 (unit 1) -> 6 of 8
    assert layer["inactive_rate"] == pytest.approx(6 / 8)
    assert data["totals"] == {
        "units": 4,
        "dead": 2,
        "dead_fraction": 0.5,
        "dormant": 2,
        "grad_dead": 4,
        "grad_dead_fraction": 1.0,
    }


def test_text_and_html_render_every_site():
    stats = stats_from_activations(np.array([[[-1.0], [1.0]]] * 3), None)
    report = Report.build(framework="torch", model="m<1>", loss="none", sites=[(SiteInfo("a", "relu", 2, 1), stats)])
    text = str(report)
    assert "1/2 (50.0%)" in text and "not deadness" in text
    page = to_html(report)
    assert page.startswith("<!doctype html>") and "m&lt;1&gt;" in page and "<script" not in page


def test_lookup_of_unknown_site_lists_the_sites():
    stats = stats_from_activations(np.ones((1, 1, 1)), None)
    report = Report.build(framework="torch", model="m", loss="none", sites=[(SiteInfo("a", "relu", 1, 1), stats)])
    with pytest.raises(KeyError, match="sites: a"):
        report.layer("b")


def test_comparison_pairs_sites_and_measures_revived_gradient():
    from deadneuron.report import COMPARISON_SCHEMA, Comparison

    pre = np.array([[[-1.0], [2.0], [1.0]], [[-2.0], [1.0], [3.0]]])
    before = stats_from_activations(pre, np.array([[[0.0], [1.0], [2.0]]] * 2))
    after = SiteStats.empty(3)
    after.samples = after.grad_samples = 2
    after.fired[:] = 2
    after.positive[:] = [0, 2, 2]
    after.grad_nonzero[:] = 2
    after.grad_abs_sum[:] = [0.02, 2.0, 4.0]  # the dead unit gets 1/100 of unit 1's gradient, 1/150 of the median
    site = SiteInfo("act", "relu", 3, 1)
    swapped = SiteInfo("act", "sinerelu", 3, 1)
    comparison = Comparison.build(
        to="sinerelu",
        epsilon={"dense": 0.025},
        before=Report.build(framework="torch", model="m", loss="probe", sites=[(site, before)]),
        after=Report.build(framework="torch", model="m", loss="probe", sites=[(swapped, after)]),
        agreement=1.0,
        output_drift=0.01,
    )
    assert comparison.gradient_ratio == pytest.approx(0.01 / 1.5)
    data = json.loads(comparison.to_json())
    assert data["schema"] == COMPARISON_SCHEMA
    assert data["before"]["totals"]["dead"] == 1 and data["after"]["totals"]["dead"] == 0
    assert data["after"]["totals"]["dormant"] == 1
    assert data["sites"][0]["dead"] == [1, 0]
    text = str(comparison)
    assert "1 of 3 units are dead under ReLU" in text and "Predictions agree on 100.0%" in text
    assert "Warning" not in text
    comparison.output_drift = 1.19  # a random-init model's near-zero outputs: the swap moves them 119%
    assert comparison.verdict()[-1].startswith("Warning: the swap moves the outputs by more than their own size")


def test_the_console_names_the_units_of_each_site():
    from deadneuron.report.text import UNITS_SHOWN, unit_lines

    pre = -np.ones((2, 12, 1))
    pre[:, 11] = 1.0  # units 0-10 never fire
    grad = np.ones((2, 12, 1))
    grad[:, 11] = 0.0  # unit 11 fires but receives no gradient
    site = (SiteInfo("act", "relu", 12, 1), stats_from_activations(pre, grad))
    report = Report.build(framework="torch", model="m", loss="probe", sites=[site])
    (line,) = unit_lines(report)
    dead = ", ".join(map(str, range(UNITS_SHOWN)))
    assert line == f"units of act: dead {dead} and {11 - UNITS_SHOWN} more; grad-dead but not dead 11"
    assert line in str(report)
