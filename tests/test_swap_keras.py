"""`swap` for Keras: clones of Sequential/Functional/nested models, live swaps of subclassed ones."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import deadneuron  # noqa: E402
from deadneuron import DeadNeuronError, sinerelu_reference  # noqa: E402
from deadneuron.keras import SineReLU  # noqa: E402

from . import keras_zoo as zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "digits_cnn.keras"
CONV, DENSE = 0.0025, 0.025


def weights(layer):
    kernel, bias = (np.asarray(keras.ops.convert_to_numpy(w), np.float64) for w in layer.weights)
    return kernel, bias


def dense(layer, x):
    kernel, bias = weights(layer)
    return x @ kernel + bias


def close(a, b):
    np.testing.assert_allclose(np.asarray(keras.ops.convert_to_numpy(a), np.float64), b, rtol=2e-5, atol=2e-6)


def test_sequential_equals_a_hand_written_sinerelu_network():
    z = zoo.sequential_mlp()
    swapped = deadneuron.swap(z.model)
    assert isinstance(swapped, keras.Sequential)
    assert isinstance(swapped.get_layer("relu_layer"), SineReLU)
    m = z.model
    h = sinerelu_reference(dense(m.get_layer("dense_relu"), z.x), DENSE)
    h = sinerelu_reference(dense(m.get_layer("hidden"), h), DENSE)
    close(swapped(z.x), dense(m.get_layer("out"), h))


def test_functional_graph_with_raw_relu_op_is_rebuilt():
    z = zoo.functional_cnn()
    swapped = deadneuron.swap(z.model, epsilon=0.05)
    outputs = z.model(z.x).numpy()
    assert not np.allclose(keras.ops.convert_to_numpy(swapped(z.x)), outputs)
    # The same network with SineReLU(0.05) written in by hand, layer for layer, with the same weights.
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation=SineReLU(0.05))(inputs)
    x = keras.layers.Conv2D(5, 3, padding="same")(x)
    x = SineReLU(0.05)(x)
    x = keras.layers.Conv2D(4, 1)(x)
    x = SineReLU(0.05)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    by_hand = keras.Model(inputs, keras.layers.Dense(3)(x))
    by_hand.set_weights(z.model.get_weights())
    close(swapped(z.x), keras.ops.convert_to_numpy(by_hand(z.x)).astype(np.float64))
    np.testing.assert_array_equal(z.model(z.x).numpy(), outputs)  # the original is untouched


@pytest.mark.parametrize("name", ["sequential_mlp", "functional_cnn", "nested", "subclassed"])
def test_dead_units_become_dormant_but_keep_gradient(name):
    z = getattr(zoo, name)()
    before = [w.copy() for w in z.model.get_weights()]
    report = deadneuron.scan(deadneuron.swap(z.model), z.x, loss="probe")
    assert [layer.name for layer in report.layers] == list(z.sites)
    for layer, expect in zip(report.layers, z.sites.values(), strict=False):
        assert layer.kind == "sinerelu" and layer.dead == 0
        assert layer.dormant_units == expect.dormant_units
        assert layer.grad_dead_units == sorted(set(expect.grad_dead) - set(expect.dead))
    assert all(np.array_equal(a, b) for a, b in zip(before, z.model.get_weights(), strict=False))


def test_subclassed_model_is_swapped_on_a_copy():
    z = zoo.subclassed()
    swapped = deadneuron.swap(z.model)
    assert z.model.d1.activation is keras.activations.relu or "relu" in str(z.model.d1.activation)
    assert isinstance(z.model.block.act, keras.layers.ReLU)
    assert isinstance(swapped.d1.activation, SineReLU) and swapped.d1.activation.epsilon == DENSE
    assert isinstance(swapped.block.act, SineReLU)
    m = z.model
    h = sinerelu_reference(dense(m.d1, z.x), DENSE)
    h = sinerelu_reference(dense(m.block.d2, h), DENSE)
    close(swapped(z.x), dense(m.head, h))


def test_epsilon_per_site_kind():
    z = zoo.functional_cnn()
    swapped = deadneuron.swap(z.model, epsilon_conv=0.01, epsilon_dense=0.3)
    assert swapped.get_layer("conv").activation.epsilon == 0.01
    assert swapped.get_layer("act").epsilon == 0.01  # after conv2
    with pytest.raises(DeadNeuronError, match="expected one of sinerelu"):
        deadneuron.swap(z.model, to="gelu")


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_swapped_keras_file_loads_in_a_fresh_process(tmp_path):
    out = tmp_path / "swapped.keras"
    digest = _hash(SAMPLE)
    message = deadneuron.api.swap_file(SAMPLE, out)
    assert _hash(SAMPLE) == digest and "3 ReLU sites swapped" in message
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    expected = keras.ops.convert_to_numpy(deadneuron.swap(deadneuron.load_model(SAMPLE))(x))
    np.savez(tmp_path / "io.npz", x=x, y=expected)
    script = (
        "import numpy as np, keras, deadneuron.keras\n"
        f"io = np.load({str(tmp_path / 'io.npz')!r})\n"
        f"model = keras.models.load_model({str(out)!r}, compile=False)\n"
        "assert [type(l.activation).__name__ for l in model.layers if hasattr(l, 'activation')][:3] == "
        "['SineReLU'] * 3\n"
        "out = keras.ops.convert_to_numpy(model(io['x']))\n"
        "np.testing.assert_allclose(out, io['y'], rtol=1e-6, atol=1e-6)\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": ""},
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
