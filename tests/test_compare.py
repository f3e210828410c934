"""`compare`: the same data before and after the swap, predictions, fine-tuning, and the CLI (issue 5)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import deadneuron  # noqa: E402
from deadneuron import DeadNeuronError  # noqa: E402
from deadneuron.report import COMPARISON_SCHEMA  # noqa: E402

from . import torch_zoo as zoo  # noqa: E402
from .conftest import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


def inputs(name: str, n: int = 64) -> torch.Tensor:
    return torch.randn(n, *zoo.SAMPLE_SHAPE[name], generator=torch.Generator().manual_seed(3))


def test_compare_pairs_sites_and_measures_predictions():
    model = zoo.mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs("mlp")
    comparison = deadneuron.compare(model, x, batch_size=16)
    assert comparison.epsilon == {"conv": 0.0025, "dense": 0.025}
    assert [s.before.name for s in comparison.sites] == ["act1", "act2"]
    assert comparison.before.dead == 3 and comparison.after.dead == 0 and comparison.after.dormant == 3
    # Drift and agreement by hand, from the two models' outputs.
    with torch.no_grad():
        a, b = model.eval()(x).double(), deadneuron.swap(model).eval()(x).double()
    assert comparison.output_drift == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-6)
    assert comparison.agreement == pytest.approx(float((a.argmax(1) == b.argmax(1)).double().mean()))
    ratio = comparison.gradient_ratio
    assert (
        ratio is not None and 0 < ratio < 1
    )  # the formerly dead units get some gradient, less than live ones
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    data = json.loads(comparison.to_json())
    assert data["schema"] == COMPARISON_SCHEMA and data["revival"] is None


def test_finetune_needs_labels_and_a_task_loss():
    model = zoo.mlp()
    with pytest.raises(DeadNeuronError, match="fine-tuning needs labels"):
        deadneuron.compare(model, inputs("mlp"), finetune_steps=2)
    with pytest.raises(DeadNeuronError, match="fine-tuning trains on the task loss"):
        deadneuron.compare(model, inputs("mlp"), finetune_steps=2, loss="probe")
    with pytest.raises(DeadNeuronError, match="can be read once"):
        deadneuron.compare(model, (b for b in [inputs("mlp")]))


def test_finetune_trains_copies_and_counts_revived_units():
    model = zoo.mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs("mlp", 128)
    y = torch.randint(0, 4, (128,), generator=torch.Generator().manual_seed(0))
    comparison = deadneuron.compare(model, (x, y), finetune_steps=20, lr=0.05, batch_size=32)
    revival = comparison.revival
    assert revival is not None and revival["optimizer"] == "adam" and revival["steps"] == 20
    assert revival["formerly_dead"] == 3
    assert revival["revived_relu"] == 0  # a dead ReLU unit gets no gradient: training cannot move it
    assert 0 <= revival["revived_sinerelu"] <= 3
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert "fine-tuning steps" in str(comparison)


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_cli_compare_on_the_torch_sample():
    model = SAMPLES / "digits_cnn.pt2"
    digest = _hash(model)
    done = run_cli("compare", str(model), "--data", str(SAMPLES / "digits_heldout.npz"), "--json", "-")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["schema"] == COMPARISON_SCHEMA and data["to"] == "sinerelu"
    expected = json.loads((SAMPLES / "expected.json").read_text())["torch"]
    assert [s["dead"][0] for s in data["sites"]] == [layer["dead"] for layer in expected["layers"]]
    assert data["after"]["totals"]["dead"] == 0 and data["after"]["totals"]["grad_dead"] == 0
    assert data["after"]["totals"]["dormant"] == data["before"]["totals"]["dead"]
    assert data["agreement"] > 0.95 and 0 < data["output_drift"] < 0.1
    assert _hash(model) == digest


@pytest.mark.slow
def test_cli_compare_on_the_keras_sample():
    done = run_cli(
        "compare",
        str(SAMPLES / "digits_cnn.keras"),
        "--data",
        str(SAMPLES / "digits_heldout_nhwc.npz"),
        "--json",
        "-",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout)
    assert data["schema"] == COMPARISON_SCHEMA and data["before"]["framework"] == "keras"
    assert data["after"]["totals"]["dead"] == 0
    assert data["after"]["totals"]["dormant"] == data["before"]["totals"]["dead"] > 0


@pytest.mark.slow
def test_cli_swap_and_compare_finetune(tmp_path):
    out = tmp_path / "swapped.pt2"
    done = run_cli("swap", str(SAMPLES / "digits_cnn.pt2"), "--to", "sinerelu", "-o", str(out))
    assert done.returncode == 0 and "3 ReLU sites swapped" in done.stdout, done.stderr
    assert torch.export.load(out).module()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    done = run_cli("swap", str(SAMPLES / "digits_cnn.pt2"), "--to", "tanh", "-o", str(out))
    assert done.returncode == 2 and "expected one of sinerelu" in done.stderr
    done = run_cli(
        "compare",
        str(SAMPLES / "digits_cnn.pt2"),
        "--data",
        str(SAMPLES / "digits_heldout.npz"),
        "--samples",
        "128",
        "--finetune-steps",
        "3",
        "--json",
        "-",
    )
    assert done.returncode == 0, done.stderr
    revival = json.loads(done.stdout)["revival"]
    assert revival["steps"] == 3 and revival["formerly_dead"] > 0


def test_cli_swap_of_a_state_dict_writes_nothing(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(zoo.mlp().state_dict(), path)
    done = run_cli("swap", str(path), "--arch", "tests/torch_zoo.py:MLP", "-o", str(tmp_path / "out.pt"))
    assert done.returncode == 2 and "model = deadneuron.swap(model)" in done.stderr
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.slow
def test_keras_compare_with_finetune_on_a_zoo_model():
    keras = pytest.importorskip("keras")
    from . import keras_zoo

    z = keras_zoo.sequential_mlp()
    before = [w.copy() for w in z.model.get_weights()]
    y = np.random.default_rng(0).integers(0, 4, len(z.x))
    comparison = deadneuron.compare(z.model, (z.x, y), finetune_steps=4, lr=0.01, batch_size=16)
    assert comparison.before.framework == "keras" and comparison.before.dead == 3
    assert comparison.after.dead == 0 and comparison.after.dormant == 3
    assert comparison.agreement is not None and comparison.output_drift is not None
    revival = comparison.revival
    assert revival is not None and revival["formerly_dead"] == 3 and revival["revived_relu"] == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, z.model.get_weights(), strict=False))
    assert keras.ops.convert_to_numpy(z.model(z.x)).shape == (len(z.x), 4)


def test_keras_drift_of_a_softmax_classifier_is_taken_on_its_logits():
    """A model that ends in a softmax: drift on the logits (the softmax's input), which a sub-model gives us here
    independently; on the probabilities it would read near 0 where argmaxes move."""
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(4)
    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    logits = keras.layers.Dense(5, name="logits")(hidden)
    model = keras.Model(inputs, keras.layers.Softmax(name="probs")(logits))
    x = np.random.default_rng(0).standard_normal((64, 12)).astype("float32")
    comparison = deadneuron.compare(model, x, batch_size=16)
    swapped = deadneuron.swap(model)
    before = np.asarray(keras.Model(model.inputs, model.get_layer("logits").output)(x), np.float64)
    after = np.asarray(keras.Model(swapped.inputs, swapped.get_layer("logits").output)(x), np.float64)
    expected = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert comparison.output_drift == pytest.approx(expected, rel=1e-5)
    probabilities = np.linalg.norm(np.asarray(swapped(x)) - np.asarray(model(x))) / np.linalg.norm(np.asarray(model(x)))
    assert abs(comparison.output_drift - probabilities) > 1e-3 * expected  # not the probabilities' drift
    assert comparison.agreement == pytest.approx(float((before.argmax(1) == after.argmax(1)).mean()))
