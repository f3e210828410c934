"""keras.applications models as users have them (random init, nothing downloaded) against an independent check.

The check is plain Keras and numpy, not deadneuron: a feature model returns the input and the output of every
activation layer, and the per-unit numbers are counted from those arrays. A few units are forced dead through the
batch normalisation before their activation (scale 0, offset -10). The scan runs with labels (cross-entropy, so
the gradient step runs too) in batches that leave a smaller last batch.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

import deadneuron  # noqa: E402

if keras.backend.backend() != "tensorflow":  # pragma: no cover - the scan's torch-backend tests live elsewhere
    pytest.skip("in-process Keras tests run on the TensorFlow backend", allow_module_level=True)


def force_dead(model, norm: str, units: tuple[int, ...]) -> None:
    layer = model.get_layer(norm)
    gamma, beta = (np.array(v.numpy()) for v in (layer.gamma, layer.beta))
    gamma[list(units)], beta[list(units)] = 0.0, -10.0
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)


def is_relu_layer(layer) -> bool:
    if isinstance(layer, keras.layers.ReLU):
        return True
    if not isinstance(layer, keras.layers.Activation):
        return False
    return keras.saving.get_registered_name(layer.activation) == "relu"


def activation_layers(model) -> list[str]:
    """Names of the ReLU-family activation layers, in the model's (topological) order."""
    return [layer.name for layer in model.layers if is_relu_layer(layer)]


def check_against_feature_model(model, x: np.ndarray, labels: np.ndarray, batch_size: int, dead: dict) -> None:
    names = activation_layers(model)
    features = keras.Model(model.inputs, [[model.get_layer(n).input, model.get_layer(n).output] for n in names])
    pairs = features.predict(x, batch_size=batch_size, verbose=0)
    report = deadneuron.scan(model, x, labels=labels, batch_size=batch_size)
    assert report.loss == "ce"
    assert [layer.name for layer in report.layers] == names
    for name, (z, a) in zip(names, pairs, strict=True):
        z, a = np.asarray(z), np.asarray(a)
        positions = tuple(range(1, a.ndim - 1))  # channels last
        stats = report.layer(name).stats
        assert stats.samples == stats.grad_samples == len(x)
        np.testing.assert_array_equal(stats.fired, (np.abs(a) > 0).any(axis=positions).sum(0), err_msg=name)
        np.testing.assert_array_equal(stats.positive, (z > 0).any(axis=positions).sum(0), err_msg=name)
        np.testing.assert_allclose(stats.max_abs, np.abs(a).max(axis=(0, *positions)), rtol=1e-4, err_msg=name)
        expected_dead = [int(u) for u in np.flatnonzero((a == 0).all(axis=(0, *positions)))]
        assert report.layer(name).dead_units == expected_dead, name
        assert set(dead.get(name, ())) <= set(expected_dead), name  # the forced ones, at least


@pytest.mark.slow
def test_mobilenet_v2_matches_an_independent_feature_model():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=5)
    force_dead(model, "bn_Conv1", (0, 3))
    force_dead(model, "block_3_expand_BN", (5,))
    x = np.random.default_rng(0).standard_normal((24, 32, 32, 3)).astype("float32")
    labels = np.random.default_rng(1).integers(0, 5, len(x))
    check_against_feature_model(model, x, labels, 16, {"Conv1_relu": (0, 3), "block_3_expand_relu": (5,)})


@pytest.mark.slow
def test_resnet50_matches_an_independent_feature_model():
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=5)
    force_dead(model, "conv1_bn", (1, 2))
    force_dead(model, "conv3_block2_2_bn", (7,))
    x = np.random.default_rng(0).standard_normal((12, 32, 32, 3)).astype("float32")
    labels = np.random.default_rng(1).integers(0, 5, len(x))
    check_against_feature_model(model, x, labels, 8, {"conv1_relu": (1, 2), "conv3_block2_2_relu": (7,)})
