"""One-hot float labels (`keras.utils.to_categorical`) are class labels: `loss="auto"` takes the cross-entropy on
them, as on their class indices, in both frameworks and through the CLI; other float targets keep MSE."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deadneuron.core.plan import is_one_hot

from .conftest import ROOT, run_cli


def test_is_one_hot():
    eye = np.eye(4, dtype=np.float32)[[0, 3, 1, 1]]
    assert is_one_hot(eye) and is_one_hot(eye.astype(np.float64)) and is_one_hot(eye.reshape(2, 2, 4))
    assert not is_one_hot(eye.astype(np.int64))  # integer rows are not float targets (and not class indices)
    assert not is_one_hot(eye * 0.5)  # soft
    assert not is_one_hot(np.zeros((4, 4), np.float32))  # no class
    assert not is_one_hot(np.ones((4, 2), np.float32))  # two classes at once
    assert not is_one_hot(np.ones((4, 1), np.float32))  # one column: a binary target, not a class row
    assert not is_one_hot(np.zeros((0, 3), np.float32))
    assert not is_one_hot(np.array([0.0, 1.0, 0.0], np.float32))  # one axis: a target per sample


def _same_statistics(a, b):
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    for x, y in zip(a.layers, b.layers, strict=True):
        assert (x.dead_units, x.dormant_units, x.grad_dead_units) == (y.dead_units, y.dormant_units, y.grad_dead_units)
        for name in ("fired", "positive", "grad_nonzero", "nonfinite"):
            np.testing.assert_array_equal(getattr(x.stats, name), getattr(y.stats, name))
        np.testing.assert_allclose(x.stats.grad_abs_sum, y.stats.grad_abs_sum, rtol=1e-5, atol=1e-7)


def test_torch_one_hot_labels_take_the_cross_entropy_of_their_indices():
    torch = pytest.importorskip("torch")
    import deadneuron

    from . import torch_zoo

    model = torch_zoo.mlp()
    x = torch.randn(48, *torch_zoo.SAMPLE_SHAPE["mlp"], generator=torch.Generator().manual_seed(3))
    classes = model(x[:1]).shape[-1]
    y = torch.arange(48) % classes
    one_hot = torch.nn.functional.one_hot(y, classes).float()
    by_index = deadneuron.scan(model, (x, y), batch_size=16)
    by_row = deadneuron.scan(model, (x, one_hot), batch_size=16)
    regression = deadneuron.scan(model, (x, one_hot * 0.9), batch_size=16)
    assert by_index.loss == by_row.loss == "ce" and regression.loss == "mse"
    _same_statistics(by_row, by_index)


def test_keras_one_hot_labels_take_the_cross_entropy_of_their_indices():
    keras = pytest.importorskip("keras")
    import deadneuron

    from . import keras_zoo

    zoo = keras_zoo.functional_cnn()
    classes = int(zoo.model.outputs[0].shape[-1])
    y = np.arange(len(zoo.x)) % classes
    one_hot = keras.utils.to_categorical(y, classes).astype("float32")
    by_index = deadneuron.scan(zoo.model, (zoo.x, y), batch_size=16)
    by_row = deadneuron.scan(zoo.model, (zoo.x, one_hot), batch_size=16)
    assert by_index.loss == by_row.loss == "ce"
    _same_statistics(by_row, by_index)


@pytest.mark.slow
def test_cli_reads_one_hot_labels_from_an_npz_as_classes(tmp_path):
    pytest.importorskip("torch")
    with np.load(ROOT / "sample_models/digits_heldout.npz") as f:
        x, y = f["x"], f["y"]
    data = tmp_path / "one_hot.npz"
    np.savez(data, x=x, y=np.eye(10, dtype=np.float32)[y])
    result = run_cli("scan", "sample_models/digits_cnn.pt2", "--data", str(data), "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["loss"] == "ce"
    reference = json.loads(run_cli("scan", "sample_models/digits_cnn.pt2", "--data", "sample_models/digits_heldout.npz",
                                   "--json", "-").stdout)
    assert [layer["grad_dead_units"] for layer in report["layers"]] == [
        layer["grad_dead_units"] for layer in reference["layers"]
    ]
