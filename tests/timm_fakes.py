"""timm's activation modules as this test suite writes them: timm cannot be installed here (it needs torchvision,
whose wheels do not load with the pinned CPU torch), so these modules carry timm's module path, class names and
formulas (our own code, not timm's), and `register` puts them where `import timm` would (the `timm_loaded` fixture
of conftest.py). Their forwards call functional activations inside (`F.relu6`, `F.gelu`): the module is the site and
those inner calls must not be sites of their own, in the eager model nor in its `.pt2`.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn
from torch.nn import functional as F

TIMM_MODULE = "timm.layers.activations"


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class HardSwish(nn.Module):
    """x * relu6(x + 3) / 6, with timm's in-place steps: the gate is divided in place, and with `inplace=True` the
    product is written into the input."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        gate = F.relu6(x + 3.0).div_(6.0)
        return x.mul_(gate) if self.inplace else x * gate


class HardMish(nn.Module):
    def forward(self, x):
        return 0.5 * x * (x + 2.0).clamp(min=0.0, max=2.0)


class GELU(nn.Module):
    def forward(self, x):
        return F.gelu(x)


CLASSES = (Swish, HardSwish, HardMish, GELU)


def register(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `import timm` leaves in sys.modules, for these four classes (undone by `monkeypatch`)."""
    module = types.ModuleType(TIMM_MODULE)
    for cls in CLASSES:
        cls.__module__ = TIMM_MODULE
        setattr(module, cls.__name__, cls)
    for name in ("timm", "timm.layers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, TIMM_MODULE, module)
