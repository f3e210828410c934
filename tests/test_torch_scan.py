"""The PyTorch scan: sites, unit axes, dead/dormant/gradient-dead units known by construction, the model left as
found, merging, and the CLI on saved models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

import deadneuron  # noqa: E402
from deadneuron import DeadNeuronError  # noqa: E402
from deadneuron.report.text import render_text  # noqa: E402

from . import torch_zoo as zoo  # noqa: E402
from .conftest import ROOT, last_line, run_cli  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"


def inputs(name: str, n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *zoo.SAMPLE_SHAPE[name], generator=torch.Generator().manual_seed(seed))


def export(model: nn.Module, name: str):
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        example = (inputs(name, 4),)
        return torch.export.export(model.eval(), example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def check_expected(report, name: str, gradients: bool = True) -> None:
    expected = zoo.EXPECTED[name]
    assert [layer.name for layer in report.layers] == list(expected)
    for layer in report.layers:
        dead, dormant, grad_dead = expected[layer.name]
        assert layer.dead_units == dead, layer.name
        assert layer.dormant_units == dormant, layer.name
        assert layer.grad_dead_units == (grad_dead if gradients else None), layer.name
        assert layer.nonfinite == 0


# --- the zoo, live, exported and from a state dict ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(zoo.FACTORIES))
def test_live_model_finds_constructed_units(name):
    report = deadneuron.scan(zoo.FACTORIES[name](), inputs(name), batch_size=16)
    check_expected(report, name)
    assert report.framework == "torch" and report.loss == "probe" and report.samples == 64
    assert report.unobserved == [] and report.warnings == []


@pytest.mark.parametrize("name", list(zoo.FACTORIES))
def test_exported_program_finds_constructed_units(name, tmp_path):
    path = tmp_path / f"{name}.pt2"
    torch.export.save(export(zoo.FACTORIES[name](), name), path)
    program = deadneuron.load_model(path)
    report = deadneuron.scan(program, inputs(name), batch_size=16)
    check_expected(report, name)


@pytest.mark.parametrize("name", list(zoo.FACTORIES))
def test_state_dict_with_arch_finds_constructed_units(name, tmp_path):
    path = tmp_path / f"{name}.pt"
    torch.save(zoo.FACTORIES[name]().state_dict(), path)
    model = deadneuron.load_model(path, arch=f"tests/torch_zoo.py:{zoo.ARCH[name]}")
    check_expected(deadneuron.scan(model, inputs(name), batch_size=16), name)


def test_transformer_without_gradients_sees_the_site_and_restores_the_fast_path():
    model = zoo.tokens().eval()
    for p in model.parameters():
        p.requires_grad_(False)  # eval, no grad: the conditions of the fused fast path
    assert torch.backends.mha.get_fastpath_enabled()
    report = deadneuron.scan(model, inputs("tokens"), loss="none")
    check_expected(report, "tokens", gradients=False)
    assert report.to_dict()["totals"]["grad_dead"] is None
    assert torch.backends.mha.get_fastpath_enabled()


def test_unit_axes_follow_the_producer_and_can_be_overridden():
    report = deadneuron.scan(zoo.tokens(), inputs("tokens", 8), loss="none")
    assert (report.layers[0].unit_axis, report.layers[0].units) == (2, 16)  # (N, L, D) tokens out of a Linear

    class Conv1dNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 3)

        def forward(self, x):
            return F.relu(self.conv(x))

    report = deadneuron.scan(Conv1dNet(), torch.randn(8, 4, 10), loss="none")
    assert (report.layers[0].unit_axis, report.layers[0].units) == (1, 6)  # (N, C, L) out of a Conv1d
    report = deadneuron.scan(zoo.cnn(), inputs("cnn", 8), loss="none", unit_axis=-1)
    assert [(layer.unit_axis, layer.units) for layer in report.layers] == [(3, 8), (3, 8), (1, 6)]
    with pytest.raises(DeadNeuronError, match="unit_axis 0 does not fit site"):
        deadneuron.scan(zoo.mlp(), inputs("mlp", 8), unit_axis=0)


# --- functional calls, kinds and names ----------------------------------------------------------------------------
class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.gelu = nn.GELU()
        self.block = nn.Sequential(nn.Linear(6, 6), nn.SiLU())

    def forward(self, x):
        x = self.fc(x)
        a = torch.relu(x) + x.relu() + x.clone().relu_() + x.clamp(min=0) + torch.clamp_min(x, 0)
        b = F.leaky_relu(x, 0.1) + F.relu6(x) + F.silu(x) + F.elu(x) + x.clamp(min=0, max=1)  # last: no site
        return self.block(self.gelu(a + b))


def test_functional_calls_are_sites_and_a_module_is_never_counted_twice():
    report = deadneuron.scan(Functional(), torch.randn(16, 6))
    names = [(layer.name, layer.kind) for layer in report.layers]
    assert names == [
        ("relu()", "relu"),
        ("relu()#2", "relu"),
        ("relu()#3", "relu"),
        ("clamp()", "relu"),
        ("clamp_min()", "relu"),
        ("leaky_relu()", "leaky_relu"),
        ("relu6()", "relu6"),
        ("silu()", "silu"),
        ("elu()", "elu"),
        ("gelu", "gelu"),
        ("block.1", "silu"),
    ]


class FunctionalSineReLU(nn.Module):
    """deadneuron.torch.sinerelu called as a function, out of place and in place; units 0-2 of fc1 dormant by
    construction (zero incoming weights, negative bias), units 1 and 4 of fc2's output gradient-dead (zero
    outgoing weights)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(5, 3)
        with torch.no_grad():
            self.fc1.weight[:3] = 0.0
            self.fc1.bias[:3] = -1.0
            self.out.weight[:, [1, 4]] = 0.0

    def forward(self, x):
        from deadneuron.torch import sinerelu

        h = sinerelu(self.fc1(x), 0.025)
        return self.out(sinerelu(self.fc2(h), 0.025, inplace=True))


def test_functional_sinerelu_is_one_site_per_call():
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    report = deadneuron.scan(FunctionalSineReLU(), (x, y))
    assert [(layer.name, layer.kind) for layer in report.layers] == [("sinerelu()", "sinerelu"),
                                                                      ("sinerelu()#2", "sinerelu")]
    assert report.unobserved == []  # its internal clamp/chunk ops are not taken for sites
    first, second = report.layers
    assert first.dead_units == [] and first.dormant_units == [0, 1, 2]  # SineReLU(z <= 0) is not 0
    assert second.grad_dead_units == [1, 4]


class ViewInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc(x)
        F.relu(h[:, :3], inplace=True)  # in place on a view: its input's hook never fires
        return self.out(h)


def reference_site(model, fc, x, y, transform):
    """Per-unit gradient statistics of `transform(fc(x))` computed directly with retain_grad."""
    z = fc(x)
    z.retain_grad()
    captured = {}

    def hook(module, args, output):
        return transform(z) if module is fc else output

    handle = fc.register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        handle.remove()
    F.cross_entropy(out, y, reduction="sum").backward()
    captured["grad"] = z.grad.detach()
    model.zero_grad(set_to_none=True)
    return captured["grad"]


def test_gradients_match_a_retain_grad_reference():
    model = zoo.mlp()
    x = inputs("mlp", 32)
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(3))
    z = model.fc1(x)
    z.retain_grad()
    out = model.fc3(model.act2(model.fc2(torch.relu(z))))
    F.cross_entropy(out, y, reduction="sum").backward()
    expected = z.grad.abs().sum(0).double().numpy()
    model.zero_grad(set_to_none=True)
    report = deadneuron.scan(model, (x, y), batch_size=8)
    assert report.loss == "ce"
    stats = report.layer("act1").stats
    np.testing.assert_allclose(stats.grad_abs_sum, expected, rtol=1e-5, atol=1e-7)
    assert stats.grad_samples == 32
    np.testing.assert_array_equal(stats.grad_nonzero, (z.grad != 0).sum(0).numpy())


def test_inplace_relu_on_a_view_takes_the_gradient_from_the_output():
    torch.manual_seed(4)
    model = ViewInplace()
    x = torch.randn(16, 5)
    y = torch.randint(0, 2, (16,))
    report = deadneuron.scan(model, (x, y))
    layer = report.layer("relu()")
    assert (layer.units, report.warnings) == (3, [])
    h = model.fc(x)
    h.retain_grad()
    h2 = h.clone()
    h2[:, :3] = torch.relu(h[:, :3])
    F.cross_entropy(model.out(h2), y, reduction="sum").backward()
    np.testing.assert_allclose(
        layer.stats.grad_abs_sum, h.grad[:, :3].abs().sum(0).double().numpy(), rtol=1e-5
    )


def test_nonfinite_outputs_are_counted_not_dead():
    x = inputs("mlp", 16)
    x[3, 0] = float("nan")
    report = deadneuron.scan(zoo.mlp(), x, loss="none")
    layer = report.layer("act1")
    assert layer.nonfinite > 0
    assert not set(layer.dead_units) - {3, 7}
    assert any("non-finite" in w for w in report.warnings)


# --- the model is left as found ------------------------------------------------------------------------------------
def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grad": {name: p.grad for name, p in model.named_parameters()},
    }


def assert_untouched(model, before):
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(after["grad"][k] is before["grad"][k] for k in before["grad"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
        assert not module._backward_pre_hooks


def prepared_cnn():
    model = zoo.cnn().train()  # train mode: BatchNorm would update its running statistics
    model.fc.eval()  # a mixed mode, to see it put back per submodule
    model.conv1.weight.requires_grad_(False)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    return model


def test_model_untouched_after_a_scan():
    model = prepared_cnn()
    before = snapshot(model)
    deadneuron.scan(model, inputs("cnn", 32), batch_size=8)
    deadneuron.scan(model, inputs("cnn", 32), batch_size=8, loss="none")
    assert_untouched(model, before)


def test_model_untouched_after_a_failing_scan():
    model = prepared_cnn()
    before = snapshot(model)
    with pytest.raises(DeadNeuronError, match=r"failed on a batch of shape \(4, 5, 8, 8\).*3 input channels"):
        deadneuron.scan(model, torch.randn(4, 5, 8, 8))
    assert_untouched(model, before)
    assert torch.backends.mha.get_fastpath_enabled()


# --- merging ---------------------------------------------------------------------------------------------------------
@settings(max_examples=8, deadline=None)
@given(split=st.integers(min_value=1, max_value=39), batch=st.integers(min_value=1, max_value=16))
def test_two_halves_merge_to_one_scan(split, batch):
    model = zoo.mlp()
    x = inputs("mlp", 40, seed=5)
    y = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(6))
    whole = deadneuron.scan(model, (x, y), batch_size=batch)
    first = deadneuron.scan(model, (x[:split], y[:split]), batch_size=batch)
    second = deadneuron.scan(model, (x[split:], y[split:]), batch_size=7)
    for layer in whole.layers:
        merged = first.layer(layer.name).stats.merge(second.layer(layer.name).stats)
        stats = layer.stats
        assert (merged.samples, merged.grad_samples) == (stats.samples, stats.grad_samples) == (40, 40)
        for field in ("fired", "positive", "grad_nonzero", "nonfinite"):
            np.testing.assert_array_equal(getattr(merged, field), getattr(stats, field), err_msg=field)
        # sums and maxima agree to float rounding: a matmul's result may differ in the last bit with the batch size
        for field in ("grad_abs_sum", "inactive_sum", "max_abs"):
            np.testing.assert_allclose(getattr(merged, field), getattr(stats, field), rtol=1e-5, atol=1e-6)


# --- data and losses -------------------------------------------------------------------------------------------------
def test_data_forms_agree(tmp_path):
    x = inputs("mlp", 40)
    y = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(1))
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    seen = []
    reports = [
        deadneuron.scan(zoo.mlp(), (x, y)),
        deadneuron.scan(zoo.mlp(), (x.numpy(), y.numpy())),
        deadneuron.scan(zoo.mlp(), loader),
        deadneuron.scan(zoo.mlp(), str(tmp_path / "d.npz"), progress=seen.append),
    ]
    assert sum(seen) == 40
    first = reports[0].to_dict()
    for report in reports[1:]:
        assert report.to_dict()["layers"] == first["layers"]
    assert first["loss"] == "ce"
    assert deadneuron.scan(zoo.mlp(), loader, samples=20).samples == 20
    assert deadneuron.scan(zoo.mlp(), (x, y.float()[:, None].expand(40, 4))).loss == "mse"


def test_random_inputs_need_a_shape_and_are_reproducible():
    with pytest.raises(DeadNeuronError, match="random inputs need the shape of one sample"):
        deadneuron.scan(zoo.cnn(), samples=8)
    a = deadneuron.scan(zoo.cnn(), samples=8, input_shape=(3, 8, 8), seed=3).to_dict()
    b = deadneuron.scan(zoo.cnn(), samples=8, input_shape=(3, 8, 8), seed=3).to_dict()
    assert a == b and a["samples"] == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"data": torch.zeros(0, 8)}, "the inputs are empty"),
        ({"data": torch.randn(4, 8), "loss": "ce"}, "--loss ce needs labels"),
        (
            {"data": (torch.randn(4, 8), torch.tensor([0, 1, 2, 9]))},
            r"labels run from 0 to 9 but the model has 4",
        ),
        ({"data": torch.randn(4, 9)}, r"failed on a batch of shape \(4, 9\).*expected 8 features"),
        ({"data": object()}, "cannot read data of type object"),
        ({"data": []}, "no samples"),
    ],
)
def test_user_errors_are_dead_neuron_errors(kwargs, message):
    with pytest.raises(DeadNeuronError, match=message):
        deadneuron.scan(zoo.mlp(), **kwargs)


def test_inspect_lists_sites_without_data(tmp_path):
    sites = deadneuron.inspect(zoo.cnn(), input_shape=(3, 8, 8))
    assert [(s.name, s.kind, s.units, s.unit_axis) for s in sites] == [
        ("relu", "relu", 8, 1),
        ("relu#2", "relu", 8, 1),
        ("relu()", "relu", 6, 1),
    ]
    assert [s.name for s in deadneuron.inspect(zoo.mlp())] == ["act1", "act2"]  # shape from the first Linear
    with pytest.raises(DeadNeuronError, match="inspect needs the shape of one sample"):
        deadneuron.inspect(zoo.cnn())


def test_static_batch_program_pads_the_last_batch():
    program = torch.export.export(zoo.mlp().eval(), (inputs("mlp", 4),))
    report = deadneuron.scan(program, inputs("mlp", 10))
    check_expected(report, "mlp")
    assert report.samples == 10 and "static batch of 4" in report.warnings[0]


# --- rendering -------------------------------------------------------------------------------------------------------
def test_rich_report_golden():
    report = deadneuron.scan(zoo.cnn(), inputs("cnn", 128), batch_size=32, name="cnn.pt2")
    text = render_text(report, width=120)
    golden = GOLDEN / "torch_cnn_report.txt"
    if os.environ.get("DEADNEURON_UPDATE_GOLDEN") == "1":  # after an intended change of the rendering
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text + "\n")
    assert text == golden.read_text().rstrip("\n")


# --- the CLI on saved files, in fresh processes ------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torch_files")
    torch.export.save(export(zoo.cnn(), "cnn"), folder / "cnn.pt2")
    torch.save(zoo.cnn().state_dict(), folder / "cnn.pt")
    x = inputs("cnn", 48).numpy()
    y = np.random.default_rng(0).integers(0, 3, 48)
    np.savez(folder / "data.npz", x=x, y=y)
    np.save(folder / "bad.npy", np.zeros((4, 5, 8, 8), np.float32))
    return folder


@pytest.mark.slow
def test_cli_scan_pt2_json(saved):
    result = run_cli("scan", str(saved / "cnn.pt2"), "--data", str(saved / "data.npz"), "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == "deadneuron.report/1" and report["framework"] == "torch"
    assert report["model"] == "cnn.pt2" and report["samples"] == 48 and report["loss"] == "ce"
    assert [layer["name"] for layer in report["layers"]] == list(zoo.EXPECTED["cnn"])
    for layer in report["layers"]:
        dead, dormant, grad_dead = zoo.EXPECTED["cnn"][layer["name"]]
        assert (layer["dead_units"], layer["dormant_units"], layer["grad_dead_units"]) == (
            dead,
            dormant,
            grad_dead,
        )
        assert set(layer) >= {
            "kind",
            "units",
            "unit_axis",
            "dead",
            "dormant",
            "grad_dead",
            "nonfinite",
            "dead_fraction",
            "grad_dead_fraction",
            "inactive_rate",
            "firing_rate",
        }
    assert set(report["totals"]) == {
        "units",
        "dead",
        "dead_fraction",
        "dormant",
        "grad_dead",
        "grad_dead_fraction",
    }


@pytest.mark.slow
def test_cli_scan_state_dict_html_and_fail_over(saved, tmp_path):
    html = tmp_path / "report.html"
    result = run_cli(
        "scan",
        str(saved / "cnn.pt"),
        "--arch",
        "tests/torch_zoo.py:CNN",
        "--samples",
        "16",
        "--input-shape",
        "3,8,8",
        "--loss",
        "none",
        "--html",
        str(html),
        "--fail-over",
        "0.01",
    )
    assert result.returncode == 1, result.stderr
    assert "exceeds --fail-over 0.01" in last_line(result.stderr)
    assert "relu#2" in result.stdout and html.read_text().lstrip().lower().startswith("<!doctype html")


@pytest.mark.slow
def test_cli_inspect_and_user_errors(saved):
    result = run_cli("inspect", str(saved / "cnn.pt2"))
    assert result.returncode == 0, result.stderr
    assert "relu#2" in result.stdout and "relu()" in result.stdout
    bad = run_cli("scan", str(saved / "cnn.pt2"), "--data", str(saved / "bad.npy"))
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "expected" in bad.stderr, bad.stderr
    missing = run_cli("scan", str(saved / "cnn.pt"), "--samples", "4", "--input-shape", "3,8,8")
    assert missing.returncode == 2 and "--arch" in last_line(missing.stderr)
