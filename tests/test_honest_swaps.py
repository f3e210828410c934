"""A comparison says what it swapped and what it left alone, and why; with nothing swapped it gives no revival
verdict. ReLU6 (a clipped ReLU) is left alone unless `include` asks for it, then swapped for an uncapped SineReLU."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import deadneuron  # noqa: E402
from deadneuron import DeadNeuronError  # noqa: E402

from .conftest import run_cli  # noqa: E402


class MobileBlocks(nn.Module):
    """MobileNetV2-style: convolutions with ReLU6, a Hardswish, a linear head; unit 0 of the first ReLU6 is dead
    (zero incoming weights, bias -1)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU6(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.ReLU6()
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.act3 = nn.Hardswish()
        self.head = nn.Linear(4, 5)
        with torch.no_grad():
            self.conv1.weight[0] = 0.0
            self.conv1.bias[0] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act3(self.conv3(self.act2(self.conv2(self.act1(self.conv1(x))))))
        return self.head(h.mean((2, 3)))


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.gelu = nn.GELU()
        self.fc3 = nn.Linear(16, 3)
        with torch.no_grad():
            self.fc1.weight[:2] = 0.0
            self.fc1.bias[:2] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.gelu(self.fc2(self.relu(self.fc1(x)))))


def images(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_nothing_swapped_says_so_and_gives_no_revival_verdict():
    comparison = deadneuron.compare(MobileBlocks().eval(), images())
    data = comparison.to_dict()
    assert data["swapped"] == []
    assert [(e["site"], e["kind"]) for e in data["left_alone"]] == [
        ("act1", "relu6"), ("act2", "relu6"), ("act3", "hardswish"),
    ]
    assert "clipped ReLU" in data["left_alone"][0]["reason"] and "include relu6" in data["left_alone"][0]["reason"]
    assert "not a ReLU" in data["left_alone"][2]["reason"]
    verdict = comparison.verdict()
    assert verdict[0].startswith("Nothing was swapped for sinerelu; left alone: 2 relu6 sites (a clipped ReLU")
    assert "no revival verdict" in verdict[1]
    text = "\n".join(verdict)
    assert "formerly dead" not in text and "revive" not in text.replace("no revival verdict", "")
    assert data["formerly_dead_gradient_ratio"] is None
    assert comparison.agreement == 1.0 and comparison.output_drift == 0.0  # the same model, measured


def test_relu6_is_swapped_uncapped_when_included():
    model = MobileBlocks().eval()
    comparison = deadneuron.compare(model, images(), include=("relu", "relu6"))
    data = comparison.to_dict()
    assert data["swapped"] == [
        {"site": "act1", "kind": "relu6", "to": "sinerelu"},
        {"site": "act2", "kind": "relu6", "to": "sinerelu"},
    ]
    assert [e["kind"] for e in data["left_alone"]] == ["hardswish"]
    assert comparison.verdict()[0] == (
        "Swapped 2 sites for sinerelu (2 relu6); left alone: 1 hardswish site (not a ReLU: SineReLU replaces the "
        "ReLU family only)."
    )
    assert comparison.before.layers[0].dead_units == [0] and comparison.after.layers[0].dead_units == []
    assert comparison.gradient_ratio is not None
    # uncapped: the swapped model lets values above 6 through where ReLU6 clipped them
    swapped = deadneuron.swap(model, include="relu6")
    big = torch.full((1, 3, 8, 8), 50.0)
    with torch.no_grad():
        assert swapped.act1(model.conv1(big)).max() > 6 >= model.act1(model.conv1(big).clone()).max()


def test_a_partial_swap_judges_only_the_swapped_sites():
    comparison = deadneuron.compare(Mixed().eval(), torch.randn(32, 6, generator=torch.Generator().manual_seed(2)))
    data = comparison.to_dict()
    assert data["swapped"] == [{"site": "relu", "kind": "relu", "to": "sinerelu"}]
    assert data["left_alone"] == [
        {"site": "gelu", "kind": "gelu", "reason": "not a ReLU: SineReLU replaces the ReLU family only"}
    ]
    assert [site["formerly_dead_gradient_ratio"] is None for site in data["sites"]] == [False, True]
    assert comparison.verdict()[1].startswith("2 of 16 units are dead under ReLU (at the swapped sites).")


@pytest.mark.slow
def test_cli_compare_include_and_unknown_kind(tmp_path):
    model = MobileBlocks().eval()
    torch.save(model.state_dict(), tmp_path / "mobile.pt")
    arch = "tests.test_honest_swaps:MobileBlocks"
    result = run_cli(
        "compare", str(tmp_path / "mobile.pt"), "--arch", arch, "--input-shape", "3,8,8", "--samples", "8",
        "--include", "relu,relu6", "--json", "-",
    )
    assert result.returncode == 0, result.stderr
    assert [e["kind"] for e in json.loads(result.stdout)["swapped"]] == ["relu6", "relu6"]
    result = run_cli(
        "compare", str(tmp_path / "mobile.pt"), "--arch", arch, "--input-shape", "3,8,8", "--samples", "8",
        "--include", "gelu",
    )
    assert result.returncode == 2
    assert "cannot swap 'gelu'; include takes kinds from relu, relu6, leaky_relu" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_include_is_checked_in_the_api():
    with pytest.raises(DeadNeuronError, match="cannot swap 'tanh'"):
        deadneuron.compare(Mixed(), torch.randn(4, 6), include="tanh")


def test_compare_of_a_static_batch_program_rebatches_like_scan(tmp_path):
    # exported without a dynamic batch dimension: both the program and its swap run in padded batches of 4
    program = torch.export.export(Mixed().eval(), (torch.randn(4, 6),))
    torch.export.save(program, tmp_path / "static.pt2")
    comparison = deadneuron.compare(deadneuron.load_model(tmp_path / "static.pt2"), torch.randn(10, 6))
    assert comparison.before.samples == comparison.after.samples == 10
    assert [entry["kind"] for entry in comparison.to_dict()["swapped"]] == ["relu"]
    assert comparison.output_drift is not None and comparison.output_drift > 0
