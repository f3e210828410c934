"""Activation modules of timm are sites, looked up by module and class name in `sys.modules` (never imported).

timm cannot be installed here, so the modules are the suite's own with timm's module path, class names and formulas
(tests/timm_fakes.py, registered by the `timm_loaded` fixture), built into a torchvision-style CNN. Their forwards
call functional activations (`F.relu6`, `F.gelu`) inside: the module is the site and those inner calls must not be
sites of their own. Dead, dormant and gradient-dead units are forced by construction and checked against plain hooks.
"""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import deadneuron  # noqa: E402

from .timm_fakes import GELU, HardMish, HardSwish, Swish  # noqa: E402


class Net(nn.Module):
    """conv-act x3, pool, dense-act, dense; with units forced per site (see FORCED)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), HardSwish()
        self.conv2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), HardMish()
        self.conv3, self.act3 = nn.Conv2d(8, 8, 3, padding=1), Swish()
        self.fc1, self.act4 = nn.Linear(8, 16), GELU()
        self.fc2 = nn.Linear(16, 3)
        with torch.no_grad():
            for layer, units, bias in (
                (self.conv1, [1, 2], -5.0),  # hard-swish(-5) = 0: dead and dormant
                (self.conv2, [0], -5.0),  # hard-mish(-5) = 0: dead and dormant
                (self.conv3, [4], -5.0),  # swish(-5) ~ -0.033: dormant, not dead
                (self.fc1, [3], -5.0),  # gelu(-5) ~ -1.4e-6: dormant, not dead
                (self.fc1, [7], 0.0),  # gelu(0) = 0: dead and dormant
            ):
                layer.weight[units] = 0.0
                layer.bias[units] = bias
            self.fc1.bias[10] = 3.0  # fires on every sample...
            self.fc2.weight[:, 10] = 0.0  # ...but nothing downstream reads it: gradient-dead

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        x = self.act3(self.conv3(x))
        x = x.mean(dim=(2, 3))
        return self.fc2(self.act4(self.fc1(x)))


SITES = {"act1": "hardswish", "act2": "hard_mish", "act3": "silu", "act4": "gelu"}


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, set[int]]]:
    """Dead (output 0 everywhere), dormant (input <= 0 everywhere) and gradient-dead (gradient 0 everywhere) units
    of each activation module, from plain hooks; the gradient is the one reaching the unit's pre-activation (the
    activation's input), as in docs/design.md; units on axis 1."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    handles = []

    def units(mask: torch.Tensor) -> set[int]:
        dims = [d for d in range(mask.dim()) if d != 1]
        return set(torch.nonzero(mask.all(dim=dims) if dims else mask).flatten().tolist())

    for name in SITES:
        module = model.get_submodule(name)

        def pre(module, args, name=name):
            seen.setdefault(name, {})["input"] = args[0].detach()
            args[0].register_hook(lambda g, name=name: seen[name].__setitem__("grad", g.detach()))

        def post(module, args, out, name=name):
            seen[name]["output"] = out.detach()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    F.cross_entropy(model(x), y).backward()
    for handle in handles:
        handle.remove()
    return {
        name: {
            "dead": units(found["output"] == 0),
            "dormant": units(found["input"] <= 0),
            "grad_dead": units(found["grad"] == 0),
        }
        for name, found in seen.items()
    }


@pytest.mark.usefixtures("timm_loaded")
def test_timm_activation_modules_are_sites_with_the_forced_units():
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 3, (32,))
    report = deadneuron.scan(model, (x, y), batch_size=16, loss="ce")
    assert {layer.name: layer.kind for layer in report.layers} == SITES  # no site for F.relu6/F.gelu inside them
    assert report.unobserved == []
    expected = _reference(model, x, y)
    assert expected["act1"]["dead"] >= {1, 2} and expected["act2"]["dead"] >= {0}
    assert 4 in expected["act3"]["dormant"] - expected["act3"]["dead"]
    assert {3, 7} <= expected["act4"]["dormant"] and 7 in expected["act4"]["dead"] and 3 not in expected["act4"]["dead"]
    assert 10 in expected["act4"]["grad_dead"] and expected["act1"]["grad_dead"] >= {1, 2}  # hard-swish'(-5) = 0
    for layer in report.layers:
        want = expected[layer.name]
        assert set(layer.dead_units) == want["dead"], layer.name
        assert set(layer.dormant_units) == want["dormant"], layer.name
        assert set(layer.grad_dead_units) == want["grad_dead"], layer.name


def test_without_timm_loaded_they_are_plain_modules():
    """Nothing is imported to look for them: outside sys.modules the same classes are not sites, and their inner
    functional calls are (`act1.relu6()`, ...)."""
    assert not any(name == "timm" or name.startswith("timm.") for name in sys.modules)
    report = deadneuron.scan(Net(), torch.randn(8, 3, 8, 8), loss="none")
    names = [layer.name for layer in report.layers]
    assert "act1" not in names and "act1.relu6()" in names
    assert "timm" not in sys.modules
