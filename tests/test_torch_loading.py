"""Loading PyTorch files safely: .pt2 without running pickled code, state dicts with --arch, refusals."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import zipfile

import pytest

torch = pytest.importorskip("torch")

import deadneuron  # noqa: E402
from deadneuron import DeadNeuronError  # noqa: E402
from deadneuron.torch.loading import weights_only_loads  # noqa: E402

from . import torch_zoo as zoo  # noqa: E402
from .conftest import last_line, run_cli  # noqa: E402


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _mlp_state(tmp_path, name="mlp.pt", state=None):
    path = tmp_path / name
    torch.save(zoo.mlp().state_dict() if state is None else state, path)
    return path


@pytest.mark.parametrize("arch", ["tests/torch_zoo.py:MLP", "tests.torch_zoo:MLP", "tests.torch_zoo:mlp"])
def test_state_dict_with_arch_as_file_module_or_factory(tmp_path, arch):
    model = deadneuron.load_model(_mlp_state(tmp_path), arch=arch)
    assert type(model).__name__ == "MLP" and not model.training  # a file import is its own module
    assert torch.equal(model.fc1.weight, zoo.mlp().fc1.weight)


def test_checkpoint_safetensors_and_prefixes(tmp_path):
    from safetensors.torch import save_file

    state = zoo.mlp().state_dict()
    ckpt = tmp_path / "run.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in state.items()}}, ckpt)
    sft = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, sft)
    ddp = _mlp_state(tmp_path, "ddp.bin", {f"module.{k}": v for k, v in state.items()})
    for path in (ckpt, sft, ddp):
        model = deadneuron.load_model(path, arch="tests/torch_zoo.py:MLP")
        assert torch.equal(model.fc2.bias, state["fc2.bias"]), path


@pytest.mark.parametrize(
    "arch, message",
    [
        (None, "is a state dict .* expected --arch FILE.py:NAME"),
        ("tests/torch_zoo.py:CNN", "missing keys conv1.weight.*unexpected keys fc1.weight"),
        ("tests/absent.py:MLP", "--arch file not found: tests/absent.py"),
        ("no_such_package.models:MLP", "--arch module 'no_such_package.models' is not importable"),
        ("tests/torch_zoo.py:Nope", "defines no callable 'Nope'; module classes there: CNN, MLP, Tokens"),
        ("MLP", "is not FILE.py:NAME or pkg.module:NAME"),
    ],
)
def test_state_dict_errors(tmp_path, arch, message):
    with pytest.raises(DeadNeuronError, match=message):
        deadneuron.load_model(_mlp_state(tmp_path), arch=arch)


def test_shape_mismatch_is_named(tmp_path):
    state = zoo.mlp().state_dict()
    state["fc3.weight"] = torch.zeros(5, 12)
    with pytest.raises(
        DeadNeuronError, match=r"shape mismatch at fc3.weight \(expected \(4, 12\), received \(5, 12\)\)"
    ):
        deadneuron.load_model(_mlp_state(tmp_path, state=state), arch="tests/torch_zoo.py:MLP")


def test_pickled_module_needs_unsafe_pickle(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(zoo.mlp(), path)
    with pytest.raises(
        DeadNeuronError, match=r"pickled Python objects \(.*tests.torch_zoo.MLP.*--unsafe-pickle"
    ):
        deadneuron.load_model(path)
    assert isinstance(deadneuron.load_model(path, unsafe_pickle=True), zoo.MLP)


def test_checkpoint_with_python_objects_names_the_global(tmp_path):
    path = _mlp_state(
        tmp_path, "ck.pt", {"state_dict": zoo.mlp().state_dict(), "args": argparse.Namespace(lr=1)}
    )
    with pytest.raises(DeadNeuronError, match=r"argparse.Namespace"):
        deadneuron.load_model(path, arch="tests/torch_zoo.py:MLP")


def test_torchscript_is_refused_with_a_pointer_to_torch_export(tmp_path):
    path = tmp_path / "scripted.pt"
    with pytest.warns(Warning):
        torch.jit.save(torch.jit.trace(zoo.mlp(), torch.randn(2, 8)), path)
    with pytest.raises(DeadNeuronError, match="TorchScript archive.*torch.export"):
        deadneuron.load_model(path, arch="tests/torch_zoo.py:MLP")


def _crafted_pt2(tmp_path, marker):
    """A valid .pt2 whose sample-inputs pickle runs a shell command when fully unpickled."""
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(zoo.mlp().eval(), (torch.randn(2, 8),)), good)
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = buffer.getvalue() if item.filename.endswith("sample_inputs/model.pt") else src.read(item)
            dst.writestr(item, data)
    return bad


def test_crafted_pt2_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    bad = _crafted_pt2(tmp_path, marker)
    with pytest.raises(DeadNeuronError, match=r"refers to posix.system.*refused"):
        deadneuron.load_model(bad)
    # Even past the check, torch.export.load's unpickling fallback is closed while we load.
    with pytest.raises((pickle.UnpicklingError, RuntimeError)), weights_only_loads():
        torch.export.load(bad)
    assert not marker.exists()
    assert torch.load is torch.serialization.load


def test_not_a_pt2(tmp_path):
    path = tmp_path / "junk.pt2"
    path.write_bytes(b"not a zip")
    with pytest.raises(DeadNeuronError, match="not a torch.export archive"):
        deadneuron.load_model(path)


@pytest.mark.slow
def test_cli_state_dict_and_refusals_in_fresh_processes(tmp_path):
    path = _mlp_state(tmp_path)
    ok = run_cli("scan", str(path), "--arch", "tests/torch_zoo.py:MLP", "--samples", "32", "--json", "-")
    assert ok.returncode == 0, ok.stderr
    assert '"dead_units": [\n        3,\n        7\n      ]' in ok.stdout
    whole = tmp_path / "whole.pt"
    torch.save(zoo.mlp(), whole)
    refused = run_cli("inspect", str(whole))
    assert refused.returncode == 2 and "--unsafe-pickle" in last_line(refused.stderr)
    assert len(refused.stderr.strip().splitlines()) == 1
    marker = tmp_path / "pwned"
    crafted = run_cli("inspect", str(_crafted_pt2(tmp_path, marker)))
    assert crafted.returncode == 2 and "posix.system" in crafted.stderr and not marker.exists()
