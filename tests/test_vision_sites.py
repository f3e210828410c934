"""Torchvision-style CNNs as users have them (torchvision itself cannot load here: its wheels need C ops that the
pinned CPU torch lacks), written in the test: a ResNet BasicBlock whose one in-place ReLU is called twice, a
MobileNetV2 inverted residual with in-place ReLU6, a MobileNetV3 block with Hardswish and a squeeze-excite of ReLU
and Hardsigmoid. Units are forced dead, dormant or gradient-dead the way trained vision models lose them (a
BatchNorm scale of 0 with a negative shift; a zero classifier column), and every site is checked unit for unit
against plain hooks, through the API and through the CLI on an exported `.pt2`."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import deadneuron  # noqa: E402

from .conftest import run_cli  # noqa: E402


def conv_bn(cin: int, cout: int, kernel: int = 3, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


def silence(bn: nn.BatchNorm2d, channels: list[int], shift: float) -> None:
    """A BatchNorm scale of 0 and a shift: the channel is `shift` on every input."""
    with torch.no_grad():
        bn.weight[channels] = 0.0
        bn.bias[channels] = shift


class BasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c, c)
        self.relu = nn.ReLU(inplace=True)  # called twice, as torchvision does
        self.conv2, self.bn2 = conv_bn(c, c)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class InvertedResidualV2(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            *conv_bn(c, hidden, 1), nn.ReLU6(inplace=True),
            *conv_bn(hidden, hidden, 3, groups=hidden), nn.ReLU6(inplace=True),
            *conv_bn(hidden, c, 1),
        )

    def forward(self, x):
        return x + self.conv(x)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int) -> None:
        super().__init__()
        self.fc1, self.relu = nn.Conv2d(c, squeeze, 1), nn.ReLU()
        self.fc2, self.gate = nn.Conv2d(squeeze, c, 1), nn.Hardsigmoid()

    def forward(self, x):
        scale = self.gate(self.fc2(self.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class InvertedResidualV3(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(*conv_bn(c, hidden, 1), nn.Hardswish())
        self.depthwise = nn.Sequential(*conv_bn(hidden, hidden, 3, groups=hidden), nn.Hardswish())
        self.se = SqueezeExcite(hidden, 4)
        self.project = nn.Sequential(*conv_bn(hidden, c, 1))

    def forward(self, x):
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class TinyVision(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(BasicBlock(8))
        self.block2 = InvertedResidualV2(8, 16)
        self.block3 = InvertedResidualV3(8, 16)
        self.head = nn.Sequential(*conv_bn(8, 12, 1), nn.Hardswish())
        self.classifier = nn.Linear(12, classes)
        silence(self.stem[1], [2], -1.0)  # stem channel 2: dead (ReLU of -1)
        silence(self.layer1[0].bn1, [0], -1.0)  # the block's first ReLU call, channel 0: dead
        silence(self.layer1[0].bn2, [2], -10.0)  # second call, channel 2: -10 + the dead stem channel 2 = dead
        silence(self.block2.conv[1], [3, 4], -1.0)  # expand ReLU6 channels 3, 4: dead
        silence(self.block3.expand[1], [5], -5.0)  # Hardswish(-5) = 0: dead
        with torch.no_grad():
            self.block3.se.fc1.weight[1] = 0.0  # squeeze-excite ReLU unit 1: dead
            self.block3.se.fc1.bias[1] = -1.0
            self.classifier.weight[:, 7] = 0.0  # head channel 7 feeds nothing: gradient-dead

    def forward(self, x):
        x = self.block3(self.block2(self.layer1(self.stem(x))))
        return self.classifier(self.head(x).mean(dim=(2, 3)))


# Per site (in execution order): units forced into each state; the hooks may find more on random weights.
FORCED = {
    "stem.2": {"dead": {2}},
    "layer1.0.relu": {"dead": {0}},
    "layer1.0.relu#2": {"dead": {2}},
    "block2.conv.2": {"dead": {3, 4}},
    "block2.conv.5": {},
    "block3.expand.2": {"dead": {5}},
    "block3.depthwise.2": {},
    "block3.se.relu": {"dead": {1}},
    "head.2": {"grad_dead": {7}},
}
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish)


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, set[int]]]:
    """Plain hooks on every activation module, one entry per call (`name`, `name#2`): dead = output 0 everywhere,
    dormant = input <= 0 everywhere, gradient-dead = no gradient reaches the input (the pre-activation). The input is
    copied before an in-place module overwrites it; its gradient hook is placed before the overwrite."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    pending: list[str] = []
    handles = []

    def units(mask: torch.Tensor) -> set[int]:
        return set(torch.nonzero(mask.all(dim=(0, 2, 3))).flatten().tolist())

    for name, module in model.named_modules():
        if not isinstance(module, ACTIVATIONS):
            continue

        def pre(module, args, name=name):
            calls[name] = calls.get(name, 0) + 1
            site = name if calls[name] == 1 else f"{name}#{calls[name]}"
            pending.append(site)
            found[site] = {"input": args[0].detach().clone()}
            args[0].register_hook(lambda g, site=site: found[site].__setitem__("grad", g.detach()))

        def post(module, args, out):
            found[pending.pop()]["output"] = out.detach().clone()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    F.cross_entropy(model(x), y).backward()
    for handle in handles:
        handle.remove()
    model.zero_grad()
    return {
        site: {"dead": units(t["output"] == 0), "dormant": units(t["input"] <= 0), "grad_dead": units(t["grad"] == 0)}
        for site, t in found.items()
    }


@pytest.fixture(scope="module")
def vision():
    torch.manual_seed(0)
    model = TinyVision().eval()
    x, y = torch.randn(24, 3, 12, 12), torch.randint(0, 5, (24,))
    expected = reference(model, x, y)
    assert list(expected) == list(FORCED), "the hooks saw the sites in another order"
    for site, states in FORCED.items():
        for state, units in states.items():
            assert units <= expected[site][state], (site, state)
    return model, x, y, expected


def _check(layers: list[dict], expected: dict[str, dict[str, set[int]]]) -> None:
    assert [layer["name"] for layer in layers] == list(expected)
    for layer in layers:
        for state in ("dead", "dormant", "grad_dead"):
            assert set(layer[f"{state}_units"]) == expected[layer["name"]][state], (layer["name"], state)


def test_the_scan_of_a_torchvision_style_cnn_matches_plain_hooks(vision):
    model, x, y, expected = vision
    report = deadneuron.scan(model, (x, y), batch_size=8, loss="ce")
    assert report.unobserved == []
    _check(json.loads(report.to_json())["layers"], expected)
    kinds = {layer.name: layer.kind for layer in report.layers}
    assert kinds["block2.conv.2"] == "relu6" and kinds["block3.expand.2"] == "hardswish"
    assert "block3.se.gate" not in kinds  # a gate (Hardsigmoid) is not a unit nonlinearity


@pytest.mark.slow
def test_the_cli_scan_of_the_exported_cnn_matches_plain_hooks(vision, tmp_path):
    model, x, y, expected = vision
    program = torch.export.export(model, (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "vision.pt2")
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    result = run_cli(
        "scan", str(tmp_path / "vision.pt2"), "--data", str(tmp_path / "data.npz"), "--batch-size", "8", "--json", "-"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["loss"] == "ce" and report["unobserved"] == []
    _check(report["layers"], expected)
