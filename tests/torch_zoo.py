"""Small PyTorch models whose dead and gradient-dead units are known by construction.

- dead: zero incoming weights and a negative bias (the pre-activation is -1 on every input);
- alive but gradient-dead: zero incoming weights, a positive bias (always 1) and zero outgoing weights.

The classes (`MLP`, `CNN`, `Tokens`) are plain architectures for `--arch tests/torch_zoo.py:NAME`; the factories
(`mlp()`, `cnn()`, `tokens()`) build them with the construction applied. `EXPECTED[name]` lists, per site in
order of execution, the (dead, dormant, grad_dead) unit indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _kill(layer: nn.Module, units: list[int]) -> None:
    """Zero incoming weights and bias -1: the units' pre-activation is -1 whatever the input."""
    with torch.no_grad():
        layer.weight[units] = 0.0
        layer.bias[units] = -1.0


def _constant(layer: nn.Module, units: list[int]) -> None:
    """Zero incoming weights and bias +1: the units always fire (output 1)."""
    with torch.no_grad():
        layer.weight[units] = 0.0
        layer.bias[units] = 1.0


def _mute(layer: nn.Module, units: list[int]) -> None:
    """Zero outgoing weights: nothing downstream depends on these inputs of `layer`."""
    with torch.no_grad():
        layer.weight[:, units] = 0.0


def _lift(layer: nn.Module, amount: float = 0.3) -> None:
    # A positive bias everywhere keeps the randomly initialised units firing on most inputs.
    with torch.no_grad():
        layer.bias.add_(amount)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(16, 12)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


def mlp() -> MLP:
    torch.manual_seed(0)
    model = MLP()
    _lift(model.fc1)
    _lift(model.fc2)
    _kill(model.fc1, [3, 7])
    _constant(model.fc1, [5])
    _mute(model.fc2, [5])
    _kill(model.fc2, [0])
    _constant(model.fc2, [11])
    _mute(model.fc3, [11])
    return model


class CNN(nn.Module):
    """A functional relu and one in-place ReLU module used twice (torchvision style), with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.bn(self.conv2(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(F.relu(self.fc(x)))


def cnn() -> CNN:
    torch.manual_seed(1)
    model = CNN()
    _lift(model.conv1)
    _lift(model.conv2)
    _lift(model.fc, 1.0)
    _kill(model.conv1, [2])
    _constant(model.conv1, [5])
    _mute(model.conv2, [5])
    _kill(model.conv2, [6])  # BatchNorm in eval mode at init is (almost) the identity: still -1
    _constant(model.conv2, [1])
    _mute(model.fc, [1])
    _kill(model.fc, [4])
    _constant(model.fc, [0])
    _mute(model.head, [0])
    return model


class Tokens(nn.Module):
    """PyTorch's own TransformerEncoderLayer (a functional relu on (N, L, D) tokens), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True, activation="relu"
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


def tokens() -> Tokens:
    torch.manual_seed(2)
    model = Tokens()
    _lift(model.layer.linear1)
    _kill(model.layer.linear1, [2, 9])
    _constant(model.layer.linear1, [4])
    _mute(model.layer.linear2, [4])
    return model


FACTORIES = {"mlp": mlp, "cnn": cnn, "tokens": tokens}
ARCH = {"mlp": "MLP", "cnn": "CNN", "tokens": "Tokens"}
SAMPLE_SHAPE = {"mlp": (8,), "cnn": (3, 8, 8), "tokens": (5, 8)}

# per site: (dead, dormant, grad_dead)
EXPECTED: dict[str, dict[str, tuple[list[int], list[int], list[int]]]] = {
    "mlp": {
        "act1": ([3, 7], [3, 7], [3, 5, 7]),
        "act2": ([0], [0], [0, 11]),
    },
    "cnn": {
        "relu": ([2], [2], [2, 5]),
        "relu#2": ([6], [6], [1, 6]),
        "relu()": ([4], [4], [0, 4]),
    },
    "tokens": {
        "layer.relu()": ([2, 9], [2, 9], [2, 4, 9]),
    },
}
