"""Activation modules that torch.export writes out in primitive ops are one site each in the scan of the program
(`decomposed.fold_activation_scopes`): named and kinded as the eager scan names them, with the same units; a scope
that cannot be read as one activation stays listed as not observed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
activations = pytest.importorskip("transformers.activations")
from torch import nn  # noqa: E402

import deadneuron  # noqa: E402
from deadneuron.torch.decomposed import fold_activation_scopes  # noqa: E402

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


def _named(cls):
    """Recorded by torch.export under the name of transformers' SiLUActivation (the name alone is what a graph scan
    sees), while written in ops no scan can read as one activation."""
    cls.__module__, cls.__qualname__ = "transformers.activations", "SiLUActivation"
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


@pytest.mark.parametrize("activation", [_Scaled, _Summed])
def test_a_scope_that_is_not_one_activation_stays_not_observed(activation):
    model = nn.Sequential(nn.Linear(8, WIDTH), activation(), nn.Linear(WIDTH if activation is _Scaled else 1, 2))
    x = torch.randn(8, 8)
    program = torch.export.export(model.eval(), (x,))
    module = program.module()
    assert fold_activation_scopes(module) == 0
    report = deadneuron.scan(program, x)
    assert report.layers == []
    assert [entry.split(" ")[0] for entry in report.unobserved] == ["1"]
    assert "decomposed into primitive ops" in report.unobserved[0]
