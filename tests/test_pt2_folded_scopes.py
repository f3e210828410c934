"""Activation modules that torch.export writes out in primitive ops are one site each in the scan of the program
(`decomposed.fold_activation_scopes`): named and kinded as the eager scan names them, with the same units, also when
an activation op inside them is not the module's input to output (ReLUSquared's relu, a hard-swish's relu6); a swap
of the program leaves such a module whole, as the swap of the eager model does; a scope that cannot be read as one
activation stays listed as not observed."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
activations = pytest.importorskip("transformers.activations")
from torch import nn  # noqa: E402

import deadneuron  # noqa: E402
from deadneuron.api import swap_file  # noqa: E402
from deadneuron.torch.decomposed import fold_activation_scopes  # noqa: E402
from deadneuron.torch.kinds import function_spec  # noqa: E402

from .conftest import run_cli  # noqa: E402
from .timm_fakes import HardMish, HardSwish  # noqa: E402

WIDTH = 16
DEAD = {"act1": [0, 3], "act2": [5]}  # zero incoming weights and bias: the pre-activation is exactly 0


class Mlp(nn.Module):
    """Three tanh/sigmoid GELUs of transformers; `act2` is called twice (two sites: `act2`, `act2#2`)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.act1 = activations.NewGELUActivation()
        self.act2 = activations.FastGELUActivation()
        self.act3 = activations.QuickGELUActivation()
        self.head = nn.Linear(WIDTH, 3)
        with torch.no_grad():
            for name, units in DEAD.items():
                layer = self.fc1 if name == "act1" else self.fc2
                layer.weight[units] = 0.0
                layer.bias[units] = 0.0
            self.fc3.weight[:, 7] = 0.0  # unit 7 of act2 (first call) reaches nothing: gradient-dead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.fc2(self.act1(self.fc1(x))))
        return self.head(self.act3(self.act2(self.fc3(h))))


def _sites(report):
    return [(s.name, s.kind, s.dead_units, s.dormant_units, s.grad_dead_units) for s in report.layers]


def test_each_written_out_module_is_one_site_as_in_the_eager_scan():
    model = Mlp().eval()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    program = torch.export.export(model, (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert not [n for n in program.graph.nodes if "gelu" in str(n.target)]  # written out in primitive ops
    eager = deadneuron.scan(model, x, batch_size=8)
    report = deadneuron.scan(program, x, batch_size=8)
    assert report.unobserved == [] == eager.unobserved
    assert [(name, kind) for name, kind, *_ in _sites(report)] == [
        ("act1", "gelu_tanh"), ("act2", "gelu_tanh"), ("act2#2", "gelu_tanh"), ("act3", "quick_gelu"),
    ]
    assert _sites(report) == _sites(eager)
    assert report.layers[0].dead_units == DEAD["act1"] and 7 in report.layers[1].grad_dead_units
    # the folded program computes what the program computes
    module = program.module()
    assert fold_activation_scopes(module) == 4
    torch.testing.assert_close(module(x), program.module()(x))


def _named(cls, name="SiLUActivation"):
    """Recorded by torch.export under the name of one of transformers' activations (the name alone is what a graph
    scan sees), while written in ops no scan can read as one activation."""
    cls.__module__, cls.__qualname__ = "transformers.activations", name
    return cls


@_named
class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # reads a second tensor: its parameter
        return x * torch.sigmoid(x * self.scale)


@_named
class _Summed(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # changes the shape
        return (x * torch.sigmoid(x)).sum(-1, keepdim=True)


@_named
class _Overwrites(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # writes into its input, returns another tensor
        x.mul_(0.5)
        return x * torch.sigmoid(x)


class _ScaledSquare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # reads its parameter; its relu is not its input to output
        return torch.relu(x) ** 2 * self.scale


_named(_ScaledSquare, "ReLUSquaredActivation")


@pytest.mark.parametrize("activation", [_Scaled, _Summed, _Overwrites, _ScaledSquare])
def test_a_scope_that_is_not_one_activation_stays_not_observed(activation):
    model = nn.Sequential(nn.Linear(8, WIDTH), activation(), nn.Linear(1 if activation is _Summed else WIDTH, 2))
    x = torch.randn(8, 8)
    program = torch.export.export(model.eval(), (x,))
    module = program.module()
    assert fold_activation_scopes(module) == 0
    report = deadneuron.scan(program, x)
    assert report.layers == []
    assert [entry.split(" ")[0] for entry in report.unobserved] == ["1"]
    assert "decomposed into primitive ops" in report.unobserved[0]


def test_a_relu_inside_a_scope_that_does_not_fold_is_no_site_and_is_not_swapped():
    model = nn.Sequential(nn.Linear(8, WIDTH), _ScaledSquare(), nn.Linear(WIDTH, 2)).eval()
    x = torch.randn(8, 8)
    program = torch.export.export(model, (x,))
    assert _inner_ops(program, "1") == ["aten.relu.default"]
    report = deadneuron.scan(program, x)
    assert report.layers == [] and report.unobserved == ["1 (relu2 module decomposed into primitive ops in the "
                                                         "exported graph)"]
    swapped = deadneuron.swap(program)
    assert _inner_ops(swapped, "1") == ["aten.relu.default"]
    assert torch.equal(swapped.module()(x), program.module()(x))


# Activation modules with an activation op inside that is not theirs from input to output
# ------------------------------------------------------------------------------------------------------------------
INNER_SITES = [("act1", "relu2"), ("act2", "hardswish"), ("act3", "hardswish"), ("act4", "gelu"), ("act5", "hard_mish"),
               ("act6", "relu")]
LEFT_ALONE = [(name, kind) for name, kind in INNER_SITES if kind != "relu"]
INCLUDE = ("relu", "relu6")  # a swap of relu6 too: the hard-swishes' relu6 must stay


class Inner(nn.Module):
    """ReLUSquared (relu, then square), timm's HardSwish (relu6 of x + 3; in place too), ClippedGELU (gelu, then a
    clip), timm's HardMish (no activation op inside) and an nn.ReLU, the one site a swap replaces. Units forced by
    construction: dead (zero incoming weights, a negative bias) and gradient-dead (zero outgoing weights)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.ModuleList(nn.Linear(8 if i == 0 else WIDTH, WIDTH) for i in range(6))
        self.act1 = activations.ReLUSquaredActivation()
        self.act2, self.act3 = HardSwish(), HardSwish(inplace=True)
        self.act4 = activations.ClippedGELUActivation(-0.1, 0.5)
        self.act5, self.act6 = HardMish(), nn.ReLU()
        self.head = nn.Linear(WIDTH, 3)
        with torch.no_grad():
            for k, units, bias in ((0, [0, 3], -1.0), (1, [2], -5.0), (2, [1], -5.0), (3, [4], 0.0), (4, [6], -5.0),
                                   (5, [9], -1.0), (0, [7], 1.0), (1, [5], 1.0)):
                self.fc[k].weight[units] = 0.0
                self.fc[k].bias[units] = bias
            self.fc[1].weight[:, 7] = 0.0  # unit 7 of act1 fires (relu2(1) = 1) but reaches nothing
            self.fc[2].weight[:, 5] = 0.0  # unit 5 of act2 likewise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, act in zip(self.fc, (self.act1, self.act2, self.act3, self.act4, self.act5, self.act6), strict=True):
            x = act(layer(x))
        return self.head(x)


# (dead, gradient-dead): dead where the derivative is 0 there too (gelu'(0) = 1/2), and alive units reaching nothing
FORCED = {"act1": ([0, 3], [0, 3, 7]), "act2": ([2], [2, 5]), "act3": ([1], [1]), "act4": ([4], []),
          "act5": ([6], [6]), "act6": ([9], [9])}


def _full(report):
    """Each site's name, kind, units, unit lists and per-unit counts; the float statistics rounded."""
    return [
        (s.name, s.kind, s.units, s.dead_units, s.dormant_units, s.grad_dead_units, s.stats.fired.tolist(),
         s.stats.positive.tolist(), s.stats.grad_nonzero.tolist(), np.round(s.stats.max_abs, 5).tolist())
        for s in report.layers
    ]


@pytest.fixture
def inner(timm_loaded, tmp_path):
    """(eager model, its .pt2 saved with torch.export.save, (x, y), .npz of them)."""
    model = Inner().eval()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    program = torch.export.export(model, (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "inner.pt2")
    np.savez(tmp_path / "inner.npz", x=x.numpy(), y=y.numpy())
    return model, tmp_path / "inner.pt2", (x, y), tmp_path / "inner.npz"


def _inner_ops(program, path):
    """The activation ops the export wrote inside the module at `path`."""
    return [
        str(node.target) for node in program.graph.nodes
        if node.op == "call_function" and function_spec(node.target, tuple(node.args), dict(node.kwargs))
        and list(node.meta["nn_module_stack"].values())[-1][0] == path
    ]


def test_a_module_with_an_inner_activation_op_is_one_site_as_in_the_eager_scan(inner):
    model, path, data, _ = inner
    program = torch.export.load(path)
    # the premise: each holds an activation op that is not its own input to output
    assert [_inner_ops(program, f"act{k}") for k in range(1, 5)] == [
        ["aten.relu.default"], ["aten.relu6.default"], ["aten.relu6.default"], ["aten.gelu.default"]
    ]
    eager = deadneuron.scan(model, data, batch_size=16, loss="ce")
    report = deadneuron.scan(program, data, batch_size=16, loss="ce")
    assert report.unobserved == [] == eager.unobserved
    assert [(s.name, s.kind) for s in report.layers] == INNER_SITES
    assert _full(report) == _full(eager)
    for layer in report.layers:
        dead, grad_dead = FORCED[layer.name]
        assert set(dead) <= set(layer.dead_units) & set(layer.dormant_units), layer.name
        assert set(grad_dead) <= set(layer.grad_dead_units), layer.name
    assert max(report.layers[3].stats.max_abs) <= 0.5  # the clipped output, not the inner gelu's
    module = program.module()
    assert fold_activation_scopes(module) == 5  # all but the nn.ReLU, whose relu op is the site
    torch.testing.assert_close(module(data[0]), model(data[0].clone()))


@pytest.mark.slow
def test_cli_scan_compare_and_swap_of_the_file_in_a_fresh_process(inner, tmp_path):
    # no timm in those processes: the program's classes are known by name
    model, path, data, npz = inner
    result = run_cli("scan", str(path), "--data", str(npz), "--batch-size", "16", "--loss", "ce", "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    eager = deadneuron.scan(model, data, batch_size=16, loss="ce").to_dict()
    assert report["unobserved"] == []
    assert [(layer["name"], layer["kind"]) for layer in report["layers"]] == INNER_SITES
    fields = ("name", "kind", "units", "dead_units", "dormant_units", "grad_dead_units")
    assert [[layer[f] for f in fields] for layer in report["layers"]] == [
        [layer[f] for f in fields] for layer in eager["layers"]
    ]
    include = ["--include", ",".join(INCLUDE)]
    result = run_cli("compare", str(path), "--data", str(npz), "--loss", "ce", *include, "--json", "-")
    assert result.returncode == 0, result.stderr
    comparison = json.loads(result.stdout)
    assert comparison["swapped"] == [{"site": "act6", "kind": "relu", "to": "sinerelu"}]
    assert [(e["site"], e["kind"]) for e in comparison["left_alone"]] == LEFT_ALONE
    result = run_cli("swap", str(path), *include, "-o", str(tmp_path / "swapped.pt2"))
    assert result.returncode == 0, result.stderr
    assert "1 ReLU site swapped" in result.stdout
    torch.testing.assert_close(
        torch.export.load(tmp_path / "swapped.pt2").module()(data[0]),
        deadneuron.swap(model, include=INCLUDE)(data[0].clone()),
    )



def test_swap_and_compare_leave_those_modules_whole_as_the_eager_swap_does(inner, tmp_path):
    model, path, data, _ = inner
    program = torch.export.load(path)
    eager = deadneuron.compare(model, data, batch_size=16, loss="ce", include=INCLUDE).to_dict()
    from_file = deadneuron.compare(program, data, batch_size=16, loss="ce", include=INCLUDE).to_dict()
    assert from_file["swapped"] == eager["swapped"] == [{"site": "act6", "kind": "relu", "to": "sinerelu"}]
    assert from_file["left_alone"] == eager["left_alone"]
    assert [(e["site"], e["kind"]) for e in from_file["left_alone"]] == LEFT_ALONE
    assert all(e["reason"].startswith("not a ReLU") for e in from_file["left_alone"])
    assert from_file["output_drift"] == pytest.approx(eager["output_drift"], rel=1e-4)
    # the file's swap: one site, the modules around relu/relu6 ops untouched, the same model as the eager swap
    message = swap_file(path, tmp_path / "swapped.pt2", include=INCLUDE)
    assert "1 ReLU site swapped" in message
    swapped = torch.export.load(tmp_path / "swapped.pt2")
    live = deadneuron.swap(model, include=INCLUDE)
    torch.testing.assert_close(swapped.module()(data[0]), live(data[0].clone()))
    report = deadneuron.scan(swapped, data, batch_size=16, loss="ce")
    assert [(s.name, s.kind) for s in report.layers] == [*LEFT_ALONE, ("act6", "sinerelu")]
    assert _full(report) == _full(deadneuron.scan(live, data, batch_size=16, loss="ce"))


@pytest.mark.usefixtures("timm_loaded")
def test_the_eager_swap_leaves_the_relu_inside_a_module_of_another_kind():
    # ReLUSquared calls F.relu and HardSwish F.relu6: parts of a relu2 and a hardswish site, which a swap leaves
    model = nn.Sequential(nn.Linear(8, WIDTH), activations.ReLUSquaredActivation(), nn.Linear(WIDTH, WIDTH),
                          HardSwish(), nn.Linear(WIDTH, 3)).eval()
    x = torch.randn(16, 8)
    assert torch.equal(deadneuron.swap(model, include=INCLUDE)(x), model(x))
    comparison = deadneuron.compare(model, x, include=INCLUDE)
    assert comparison.output_drift == 0.0 and comparison.swapped == []


def test_a_program_in_core_aten_ops_scans_and_swaps_as_the_eager_model():
    # run_decompositions writes nn.Hardswish as add, clamp(min=0), clamp(max=6), mul, div: the clamp(min=0) is a
    # relu op whose input is x + 3; nn.Mish as exp, log1p, where, tanh, mul; nn.SELU as elu(x, alpha, scale)
    activations = (nn.Hardswish(), nn.Mish(), nn.SELU(), nn.GELU(approximate="tanh"), nn.ReLU())
    layers = [nn.Linear(8, WIDTH)]
    for act in activations:
        layers += [act, nn.Linear(WIDTH, WIDTH if act is not activations[-1] else 3)]
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        model[0].weight[2], model[0].bias[2] = 0.0, -5.0  # hard-swish(-5) = 0: dead
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    program = torch.export.export(model, (x[:8],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    program = program.run_decompositions()
    assert _inner_ops(program, "1") == ["aten.clamp.default"] and _inner_ops(program, "5") == ["aten.elu.default"]
    eager, report = deadneuron.scan(model, x, batch_size=8), deadneuron.scan(program, x, batch_size=8)
    assert [(s.name, s.kind) for s in report.layers] == [
        ("1", "hardswish"), ("3", "mish"), ("5", "selu"), ("7", "gelu_tanh"), ("9", "relu")
    ]
    assert _full(report) == _full(eager) and report.layers[0].dead_units == [2]
    before, after = (deadneuron.compare(m, x, batch_size=8).to_dict() for m in (model, program))
    assert after["swapped"] == before["swapped"] == [{"site": "9", "kind": "relu", "to": "sinerelu"}]
    assert after["left_alone"] == before["left_alone"]
    assert _inner_ops(deadneuron.swap(program), "1") == ["aten.clamp.default"]
