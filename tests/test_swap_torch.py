"""`swap` for PyTorch: modules, functional calls and torch.export programs (issue 5)."""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import deadneuron  # noqa: E402
import deadneuron.api  # noqa: E402  (deadneuron.api.swap_file below; `import deadneuron` does not load it)
from deadneuron import DeadNeuronError  # noqa: E402
from deadneuron.torch import SineReLU  # noqa: E402

from . import torch_zoo as zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "digits_cnn.pt2"
CONV, DENSE = 0.0025, 0.025


def formula(z: torch.Tensor, eps: float) -> torch.Tensor:
    """SineReLU written out by hand, in float64: z for z > 0, eps*(sin z - cos z) otherwise."""
    z = z.double()
    return torch.where(z > 0, z, eps * (torch.sin(z) - torch.cos(z)))


def lin(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ layer.weight.double().T + layer.bias.double()


def conv(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=layer.padding)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    np.testing.assert_allclose(a.detach().double().numpy(), b.detach().double().numpy(), rtol=2e-5, atol=2e-6)


def test_mlp_equals_a_hand_written_sinerelu_network():
    model = zoo.mlp().eval()
    swapped = deadneuron.swap(model)
    x = torch.randn(32, 8)
    expected = lin(model.fc3, formula(lin(model.fc2, formula(lin(model.fc1, x), DENSE)), DENSE))
    close(swapped(x), expected)
    assert isinstance(swapped.act1, SineReLU) and swapped.act1.epsilon == DENSE


def test_cnn_in_place_module_used_twice_and_functional_relu_are_swapped():
    model = zoo.cnn().eval()
    swapped = deadneuron.swap(model).eval()
    assert isinstance(swapped.relu, SineReLU) and swapped.relu.inplace and swapped.relu.epsilon == CONV
    x = torch.randn(4, 3, 8, 8)
    bn = model.bn
    h = formula(conv(model.conv1, x), CONV)
    h = conv(model.conv2, h)
    h = (h - bn.running_mean.double()[:, None, None]) / torch.sqrt(
        bn.running_var.double()[:, None, None] + bn.eps
    )
    h = formula(h * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None], CONV)
    h = formula(lin(model.fc, h.mean((2, 3))), DENSE)  # F.relu after the Linear fc: the dense epsilon
    expected = lin(model.head, h)
    close(swapped(x), expected)
    with torch.no_grad():
        close(swapped(x), expected)
    out = swapped(x.requires_grad_())
    out.sum().backward()  # the in-place SineReLU used twice works under autograd
    assert x.grad is not None and torch.isfinite(x.grad).all()


class Functional(nn.Module):
    """Every functional spelling of ReLU, in place or not; a ReLU6 and a leaky ReLU left alone by default."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.conv = nn.Conv1d(1, 2, 1)
        self.six = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.fc1(x))
        b = self.fc2(a).relu()
        c = F.relu(b * 2.0, inplace=True)
        d = (c - 0.5).clamp(min=0)
        e = (d - 0.1).relu_()
        f = torch.clamp_min(e - 0.2, 0)
        g = self.conv(f[:, None, :])
        g = F.relu(g)
        return F.leaky_relu(self.six(g.flatten(1) - 1.0), 0.1)


def functional_expected(model: Functional, x: torch.Tensor) -> torch.Tensor:
    a = formula(lin(model.fc1, x), DENSE)
    c = formula(lin(model.fc2, a), DENSE)
    c = formula(c * 2.0, DENSE)
    d = formula(c - 0.5, DENSE)
    e = formula(d - 0.1, DENSE)
    f = formula(e - 0.2, DENSE)
    g = F.conv1d(f[:, None, :], model.conv.weight.double(), model.conv.bias.double())
    g = formula(g, CONV).flatten(1) - 1.0
    return F.leaky_relu(F.relu6(g), 0.1)


def test_every_functional_spelling_is_swapped_and_the_model_runs_normally():
    torch.manual_seed(0)
    model = Functional()
    swapped = deadneuron.swap(model)
    x = torch.randn(16, 6)
    # Called normally, outside any context manager, with and without gradients.
    close(swapped(x), functional_expected(model, x))
    with torch.no_grad():
        close(swapped(x), functional_expected(model, x))
    leaf = x.clone().requires_grad_(True)
    swapped(leaf).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    # A copy of the swapped model stays swapped (the wrapped forward is rebound to the copy).
    again = copy.deepcopy(swapped)
    close(again(x), functional_expected(model, x))
    assert isinstance(swapped.six, nn.ReLU6)


def test_relu6_and_leaky_only_on_request():
    torch.manual_seed(0)
    model = Functional()
    swapped = deadneuron.swap(model, include=("relu", "relu6", "leaky_relu"))
    assert isinstance(swapped.six, SineReLU)
    x = torch.randn(8, 6)
    report = deadneuron.scan(swapped, x, loss="none")
    assert all(layer.kind == "sinerelu" for layer in report.layers)
    with pytest.raises(DeadNeuronError, match="include takes kinds from relu, relu6, leaky_relu"):
        deadneuron.swap(model, include=("gelu",))


def test_options_are_validated_and_epsilon_sets_both():
    model = zoo.cnn()
    swapped = deadneuron.swap(model, epsilon=0.1)
    assert swapped.relu.epsilon == 0.1 and swapped._deadneuron_functional.modules["dense"].epsilon == 0.1
    split = deadneuron.swap(model, epsilon_conv=0.01, epsilon_dense=0.2)
    assert split.relu.epsilon == 0.01 and split._deadneuron_functional.modules["dense"].epsilon == 0.2
    with pytest.raises(DeadNeuronError, match="expected one of sinerelu"):
        deadneuron.swap(model, to="tanh")
    with pytest.raises(DeadNeuronError, match="either epsilon or epsilon_conv"):
        deadneuron.swap(model, epsilon=0.1, epsilon_conv=0.2)
    with pytest.raises(DeadNeuronError, match="finite number >= 0"):
        deadneuron.swap(model, epsilon=-1.0)


def test_the_original_is_untouched():
    model = zoo.cnn().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    before = model(x)
    model.train()
    deadneuron.swap(model)
    assert model.training and "forward" not in vars(model)
    assert isinstance(model.relu, nn.ReLU)
    assert not hasattr(model, "_deadneuron_functional")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.eval()
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("name", sorted(zoo.FACTORIES))
def test_dead_units_become_dormant_but_keep_gradient(name):
    model = zoo.FACTORIES[name]()
    x = torch.randn(64, *zoo.SAMPLE_SHAPE[name], generator=torch.Generator().manual_seed(3))
    report = deadneuron.scan(deadneuron.swap(model), x, loss="probe")
    expected = list(zoo.EXPECTED[name].values())
    assert len(report.layers) == len(expected)
    for layer, (dead, dormant, grad_dead) in zip(report.layers, expected, strict=False):
        assert layer.kind == "sinerelu"
        assert layer.dead == 0
        assert layer.dormant_units == dormant
        # Formerly dead units now get gradient; units whose signal goes nowhere stay gradient-dead.
        assert layer.grad_dead_units == sorted(set(grad_dead) - set(dead))


def test_transformer_fast_path_cannot_skip_the_swapped_activation():
    model = zoo.tokens().eval()
    swapped = deadneuron.swap(model).eval()
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        fast = swapped(x)
    slow = swapped(x.requires_grad_())
    close(fast, slow)
    assert isinstance(swapped.layer.activation, SineReLU)


# torch.export
# ----------------------------------------------------------------------------------------------------
def sample_expected(program: torch.export.ExportedProgram, x: torch.Tensor) -> torch.Tensor:
    p = {k: v.double() for k, v in program.state_dict.items()}
    h = formula(F.conv2d(x.double(), p["conv1.weight"], p["conv1.bias"], padding=1), CONV)
    h = formula(F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=1), CONV)
    h = F.max_pool2d(h, 2).flatten(1)
    h = formula(h @ p["fc1.weight"].T + p["fc1.bias"], DENSE)
    return h @ p["fc2.weight"].T + p["fc2.bias"]


def test_exported_program_is_rewritten_into_aten_ops():
    program = torch.export.load(SAMPLE)
    swapped = deadneuron.swap(program)
    assert isinstance(swapped, torch.export.ExportedProgram)
    targets = {str(n.target) for n in swapped.graph_module.graph.nodes if n.op == "call_function"}
    assert not any("relu" in t for t in targets) and "aten.sin.default" in targets
    x = torch.randn(7, 1, 8, 8)
    close(swapped.module()(x), sample_expected(program, x))
    # The original program still computes ReLU.
    assert any(n.target is torch.ops.aten.relu.default for n in program.graph_module.graph.nodes)
    # The graph module of a program swaps into SineReLU submodules at the ReLUs' paths (what a scan names).
    module = deadneuron.swap(program.module())
    assert isinstance(module.relu1, SineReLU) and module.relu3.epsilon == DENSE
    close(module(x), sample_expected(program, x))


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.act(self.fc1(x)) - 0.1))


def test_exported_in_place_relu_is_swapped():
    torch.manual_seed(0)
    model = InPlace().eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    x = torch.randn(6, 4)
    expected = lin(model.fc2, formula(formula(lin(model.fc1, x), DENSE) - 0.1, DENSE))
    close(deadneuron.swap(program).module()(x), expected)
    close(deadneuron.swap(model)(x), expected)


class DigitsCNN(nn.Module):
    """The architecture of sample_models/digits_cnn.pt2 (sample_models/make_samples.py), as an eager module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.pool(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


def assert_same_sites(scanned, live, names) -> None:
    """Two reports measure the same sites: names, kinds, units, dead/dormant/grad-dead units, statistics."""
    assert [layer.name for layer in scanned.layers] == names
    assert [layer.name for layer in live.layers] == names
    assert not any("decomposed" in entry for entry in scanned.unobserved), scanned.unobserved
    for a, b in zip(scanned.layers, live.layers, strict=True):
        assert (a.kind, a.units, a.unit_axis) == (b.kind, b.units, b.unit_axis) == ("sinerelu", b.units, 1)
        assert a.dead_units == b.dead_units == []  # SineReLU's output is never exactly 0
        assert a.dormant_units == b.dormant_units
        assert a.grad_dead_units == b.grad_dead_units and a.grad_dead_units is not None
        for field in ("fired", "positive", "grad_nonzero", "nonfinite"):
            np.testing.assert_array_equal(getattr(a.stats, field), getattr(b.stats, field), err_msg=field)
        for field in ("grad_abs_sum", "max_abs", "inactive_sum"):
            np.testing.assert_allclose(getattr(a.stats, field), getattr(b.stats, field), rtol=1e-5, err_msg=field)
    assert scanned.samples == live.samples and scanned.loss == live.loss


def test_swapped_pt2_scans_its_sinerelus_as_the_live_swapped_model(tmp_path):
    from deadneuron import api

    out = tmp_path / "swapped.pt2"
    api.swap_file(SAMPLE, out)  # what `deadneuron swap digits_cnn.pt2 --to sinerelu -o swapped.pt2` writes
    program = torch.export.load(out)
    assert all(n.op != "call_module" or n.target == "_guards_fn" for n in program.module().graph.nodes)
    live = DigitsCNN()
    live.load_state_dict(torch.export.load(SAMPLE).state_dict)
    live = deadneuron.swap(live.eval())
    data = ROOT / "sample_models" / "digits_heldout.npz"
    names = ["relu1", "relu2", "relu3"]
    scanned = deadneuron.scan(program, data, gtol=1e-6)
    assert_same_sites(scanned, deadneuron.scan(live, data, gtol=1e-6), names)
    assert scanned.dormant > 0 and scanned.layer("relu3").dormant_units  # the sample's dead ReLUs, now dormant
    # The graph module of the original program, swapped into SineReLU submodules, agrees too.
    graph_live = deadneuron.swap(torch.export.load(SAMPLE).module())
    assert_same_sites(scanned, deadneuron.scan(graph_live, data, gtol=1e-6), names)
    # inspect names the same sites; the loaded program itself keeps its aten ops (folding works on a copy).
    infos = deadneuron.inspect(program)
    assert [(i.name, i.kind, i.units) for i in infos] == [
        ("relu1", "sinerelu", 16),
        ("relu2", "sinerelu", 32),
        ("relu3", "sinerelu", 64),
    ]
    assert any(n.target is torch.ops.aten.sin.default for n in program.graph_module.graph.nodes)


@pytest.mark.parametrize("form", ["piecewise", "max"])
def test_swapped_program_in_place_and_max_form_fold_into_sites(form):
    from deadneuron.torch.decomposed import fold_sinerelu

    torch.manual_seed(0)
    model = InPlace().eval()
    batch = torch.export.Dim("batch", min=1)
    program = deadneuron.swap(
        torch.export.export(model, (torch.randn(2, 4),), dynamic_shapes=({0: batch},)), form=form
    )
    x = torch.randn(40, 4) * 3
    module = program.module()
    expected = module(x)
    # Both fold: the module (`act`, in place) and the functional relu, which keeps the name a scan gave the ReLU.
    assert fold_sinerelu(module) == 2
    close(module(x), expected)
    live = deadneuron.swap(model, form=form)
    scanned, measured = deadneuron.scan(program, x), deadneuron.scan(live, x)
    assert [layer.name for layer in scanned.layers] == ["act", "relu()"]
    assert scanned.unobserved == []
    # The live swap's functional call is a `sinerelu()` site; the program keeps the ReLU's name.
    for a, b in zip(scanned.layers, measured.layers, strict=True):
        assert (a.kind, a.units, a.dormant_units) == (b.kind, b.units, b.dormant_units)
        assert a.grad_dead_units == b.grad_dead_units
        assert a.kind == "sinerelu" and a.dead_units == []


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_swapped_pt2_loads_without_deadneuron(tmp_path):
    out = tmp_path / "swapped.pt2"
    digest = _hash(SAMPLE)
    message = deadneuron.api.swap_file(SAMPLE, out)
    assert _hash(SAMPLE) == digest and "3 ReLU sites swapped" in message
    x = torch.randn(5, 1, 8, 8)
    torch.save({"x": x, "y": sample_expected(torch.export.load(SAMPLE), x).float()}, tmp_path / "io.pt")
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    # -I -S: no user site, no .pth files (so not the editable install of deadneuron), no current folder.
    script = (
        f"import sys; sys.path.append({site_packages!r}); import importlib.util as u\n"
        "assert u.find_spec('deadneuron') is None, 'deadneuron is importable'\n"
        "import torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"out = torch.export.load({str(out)!r}).module()(io['x'])\n"
        "assert torch.allclose(out, io['y'], rtol=1e-4, atol=1e-5), (out - io['y']).abs().max()\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_state_dict_swap_explains_and_writes_nothing(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(zoo.mlp().state_dict(), path)
    digest = _hash(path)
    with pytest.raises(DeadNeuronError, match=r"weights only.*model = deadneuron.swap\(model\)"):
        deadneuron.api.swap_file(path, tmp_path / "out.pt", arch="tests/torch_zoo.py:MLP")
    assert _hash(path) == digest and not (tmp_path / "out.pt").exists()
    with pytest.raises(DeadNeuronError, match="ending in .pt2"):
        deadneuron.api.swap_file(SAMPLE, tmp_path / "out.keras")


class FunctionalDormant(nn.Module):
    """F.relu after fc1, whose units 0-2 are dead by construction (zero incoming weights, negative bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        with torch.no_grad():
            self.fc1.weight[:3] = 0.0
            self.fc1.bias[:3] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def test_saved_swapped_program_keeps_a_functional_relu_as_a_site(tmp_path):
    from deadneuron import api

    torch.manual_seed(0)
    original = tmp_path / "functional.pt2"
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(
        torch.export.export(FunctionalDormant().eval(), (torch.randn(2, 4),), dynamic_shapes=({0: batch},)), original
    )
    swapped = tmp_path / "swapped.pt2"
    api.swap_file(original, swapped)
    x = torch.randn(50, 4)
    before, after = deadneuron.scan(torch.export.load(original), x), deadneuron.scan(torch.export.load(swapped), x)
    assert [(layer.name, layer.kind, layer.dead_units) for layer in before.layers] == [("relu()", "relu", [0, 1, 2])]
    assert [(layer.name, layer.kind, layer.dead_units, layer.dormant_units) for layer in after.layers] == [
        ("relu()", "sinerelu", [], [0, 1, 2])
    ]
    assert after.unobserved == []
    # The tag is node metadata, not a module: unflattening the saved program adds no module for the call.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation inside unflatten
        unflattened = torch.export.unflatten(torch.export.load(swapped))
    assert sorted(name for name, _ in unflattened.named_modules()) == ["", "fc1", "fc2"]


class FunctionalBlock(nn.Module):
    """A block that calls F.relu itself: only the swap's function mode can reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


def test_swapped_sequential_runs_and_keeps_its_shape():
    # A swap once registered its functional SineReLUs as a child, which nn.Sequential then ran as a layer.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), FunctionalBlock(), nn.Linear(6, 2))
    swapped = deadneuron.swap(model)
    assert len(swapped) == 4 and isinstance(swapped[-1], nn.Linear)
    assert [name for name, _ in swapped.named_modules()] == ["", "0", "1", "2", "2.fc", "3"]
    x = torch.randn(5, 4)
    expected = lin(model[3], formula(lin(model[2].fc, formula(lin(model[0], x), DENSE)), DENSE))
    close(swapped(x), expected)
    close(copy.deepcopy(swapped)(x), expected)
    report = deadneuron.scan(swapped, x)
    assert [(layer.name, layer.kind) for layer in report.layers] == [("1", "sinerelu"), ("2.sinerelu()", "sinerelu")]


def test_a_model_of_torch_nn_modules_only_runs_without_the_function_mode():
    # The mode costs a Python call per torch function of every forward (issue 15) and has nothing to swap here; the
    # test above keeps it where one module's own code calls F.relu.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    swapped = deadneuron.swap(model)
    assert not hasattr(swapped, "_deadneuron_functional") and "forward" not in vars(swapped)
    x = torch.randn(5, 4)
    expected = lin(model[4], formula(lin(model[2], formula(lin(model[0], x), DENSE)), DENSE))
    close(swapped(x), expected)
    report = deadneuron.scan(swapped, x)
    assert [(layer.name, layer.kind) for layer in report.layers] == [("1", "sinerelu"), ("3", "sinerelu")]
    hooked = copy.deepcopy(model)
    hooked[2].register_forward_hook(lambda module, args, out: F.relu(out))  # a hook's code may call F.relu too
    assert hasattr(deadneuron.swap(hooked), "_deadneuron_functional")
