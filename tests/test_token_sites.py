"""Activations whose first axis folds the batch with the tokens ((N*L, D) rows, as OPT's FFN runs) are sites:
units on the feature axis, per-sample quantities per sequence; other layouts are listed as not observed."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import deadneuron  # noqa: E402

N, L, D, H = 6, 5, 8, 16


class FoldedFFN(nn.Module):
    """Embedding-free token model: (N, L, D) -> rows (N*L, D) -> Linear -> ReLU -> Linear -> (N, L, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, H)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(H, D)
        with torch.no_grad():
            self.fc1.weight[[0, 1]] = 0.0  # dead: pre-activation -1 on every token
            self.fc1.bias[[0, 1]] = -1.0
            self.fc1.weight[2] = 0.0  # alive (always 1) but gradient-dead: no outgoing weight
            self.fc1.bias[2] = 1.0
            self.fc2.weight[:, 2] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return self.fc2(self.act(self.fc1(rows))).view(x.shape)


def test_folded_rows_are_a_site_with_per_sequence_statistics():
    torch.manual_seed(0)
    model = FoldedFFN().eval()
    x = torch.randn(N, L, D)
    report = deadneuron.scan(model, x, batch_size=4)  # batches of 4 and 2 sequences: folds of 20 and 10 rows
    (layer,) = report.layers
    assert (layer.name, layer.units, report.samples) == ("act", H, N)
    assert layer.dead_units == [0, 1] and layer.dormant_units == [0, 1]
    assert layer.grad_dead_units == [0, 1, 2]
    # Per-sample quantities are per sequence: a unit fires on a sample when it fires on one of its tokens.
    with torch.no_grad():
        out = model.act(model.fc1(x.reshape(-1, D))).reshape(N, L, H)
    np.testing.assert_allclose(layer.stats.firing_rate, (out != 0).any(1).double().mean(0).numpy())
    assert layer.inactive_rate == pytest.approx(float((out == 0).double().mean()))
    assert not report.unobserved


class Routed(nn.Module):
    """Keeps a data-dependent subset of the token rows (as a mixture-of-experts router does): no batch axis."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, H)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, D)
        return self.act(self.fc(rows[:7])).sum()


def test_rows_that_do_not_fold_the_batch_are_listed_as_not_observed():
    report = deadneuron.scan(Routed(), torch.randn(N, L, D), batch_size=N, loss="none")
    assert not report.layers
    assert report.unobserved == ["act (its first axis is neither the batch (6) nor batch x tokens: shape (7, 16))"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_site_counts_its_inactive_positions_exactly(dtype):
    """601 positions per sample: a bfloat16 sum of the 0/1 map is exact only to 256 (float16: 2048 in 3001 below),
    so the inactive fraction was off by ~1e-3 per sample (301 ones summed to 300)."""
    torch.manual_seed(0)
    length = 601 if dtype == torch.bfloat16 else 3001
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).to(dtype).eval()
    x = torch.randn(3, length, 4).to(dtype)
    (layer,) = deadneuron.scan(model, x, loss="none").layers
    with torch.no_grad():
        out = model(x).float()
    np.testing.assert_allclose(layer.stats.inactive_sum, (out == 0).double().mean(1).sum(0).numpy(), rtol=1e-12)


def test_an_attention_mask_on_an_accelerator_is_used_without_reading_it():
    """Whether a mask has zeros is read on the host only for a CPU mask: on a GPU that read waited for the device at
    every training step of `DeadNeuronMonitor` (and every scan batch). A meta tensor stands for the device here: it
    has no values, so any read raises."""
    from deadneuron.torch.sites import real_tokens

    ones = torch.ones(2, 3, dtype=torch.long)
    assert real_tokens({"attention_mask": ones}, 2, nn.ReLU()) is None  # on the CPU, nothing padded: no mask at all
    on_device = real_tokens({"attention_mask": ones.to("meta")}, 2, nn.ReLU())
    assert on_device is not None and on_device.device.type == "meta" and on_device.shape == (2, 3)


def test_a_mask_of_ones_counts_as_no_mask():
    """What an accelerator's unread mask of ones gives: the statistics of the unmasked scan."""
    from deadneuron.report import SiteInfo
    from deadneuron.torch.accumulate import SiteAccumulator

    torch.manual_seed(1)
    a = torch.relu(torch.randn(4, 7, 5))
    plain, masked = (SiteAccumulator(SiteInfo("s", "relu", 5, 2), torch.device("cpu"), atol=0.0, gtol=0.0)
                     for _ in range(2))
    plain.post(a, 4)
    masked.post(a, 4, torch.ones(4, 7, 1, dtype=torch.bool))
    for name, value in plain.fields.items():
        torch.testing.assert_close(masked.fields[name], value, msg=name)
