"""Keras SineReLU's fused loops (deadneuron/keras/fused.py): which calls take them, their values against the numpy
reference, a Keras training step through them against the plain ops, and a SavedModel export that calls them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

if keras.backend.backend() != "tensorflow":  # pragma: no cover - the fused loops are TensorFlow's
    pytest.skip("the fused loops are TensorFlow graphs: run with KERAS_BACKEND=tensorflow", allow_module_level=True)

from deadneuron import swap  # noqa: E402
from deadneuron.core.sinerelu import sinerelu_grad_reference, sinerelu_reference  # noqa: E402
from deadneuron.keras import SineReLU, fused, sinerelu  # noqa: E402

from .test_sinerelu_keras import grid, tolerance  # noqa: E402

pytestmark = pytest.mark.skipif(not fused.usable(), reason="this TensorFlow cannot compile XLA loops")


def called_functions(spec: Any, form: str = "piecewise") -> set[str]:
    """Names of the functions that a traced forward+backward of SineReLU on a tensor of `spec` calls."""

    def both(t: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = sinerelu(t, 0.0025, form)  # type: ignore[arg-type]
        return tape.gradient(y, t)

    graph = tf.function(both, autograph=False).get_concrete_function(spec).graph
    names = set()
    for op in graph.get_operations():
        if op.type in ("PartitionedCall", "StatefulPartitionedCall"):
            name = op.get_attr("f").name
            names.add(name.decode() if isinstance(name, bytes) else name)
    return names


def fused_calls(names: set[str]) -> list[str]:
    return sorted(n for n in names if "sinerelu_forward" in n or "sinerelu_backward" in n)


@pytest.mark.parametrize(
    "shape, dtype, form, fused_expected",
    [
        ((fused.MIN_ELEMENTS,), tf.float32, "piecewise", True),
        ((None, 28, 28, 6), tf.float32, "piecewise", True),  # unknown batch: counted as a batch of 32
        ((fused.MIN_ELEMENTS - 1,), tf.float32, "piecewise", False),
        ((None, 120), tf.float32, "piecewise", False),
        ((fused.MIN_ELEMENTS,), tf.float64, "piecewise", False),
        ((fused.MIN_ELEMENTS,), tf.float32, "max", False),  # keras-contrib's expression, op for op
    ],
)
def test_graphs_take_the_fused_loops_where_they_apply(
    shape: tuple[Any, ...], dtype: Any, form: str, fused_expected: bool
) -> None:
    calls = fused_calls(called_functions(tf.TensorSpec(shape, dtype), form))
    assert len(calls) == (2 if fused_expected else 0), calls  # forward and backward, or neither


def test_turned_off_graphs_take_the_plain_ops() -> None:
    spec = tf.TensorSpec((fused.MIN_ELEMENTS,), tf.float32)
    fused.set_enabled(False)
    try:
        assert not fused.enabled()
        assert fused_calls(called_functions(spec)) == []
    finally:
        fused.set_enabled(True)
    assert len(fused_calls(called_functions(spec))) == 2


def test_eager_calls_take_the_plain_ops() -> None:
    z = tf.random.normal([1 << 19])  # above sinerelu.GRAPH_MIN_ELEMENTS: runs a graph, without XLA
    assert not fused.applies(z, "piecewise")


@pytest.mark.parametrize("epsilon", [0.0, 0.0025, 0.025, 0.9])
def test_fused_loops_match_the_reference(epsilon: float) -> None:
    z = np.concatenate([grid(), -np.logspace(4, 5, 200).astype(np.float32), [np.inf, -np.inf, np.nan]])
    z = z.astype(np.float32)
    upstream = np.random.default_rng(0).standard_normal(z.shape).astype(np.float32)
    scale = epsilon * math.sqrt(2)
    y = tf.function(lambda t: fused.forward(t, scale))(tf.constant(z)).numpy()
    g = tf.function(lambda t, u: fused.backward(t, u, scale))(tf.constant(z), tf.constant(upstream)).numpy()
    finite = np.isfinite(z)
    bound = tolerance(z[finite], epsilon)
    with np.errstate(invalid="ignore"):
        expected_y = sinerelu_reference(z, epsilon)
        expected_g = upstream * sinerelu_grad_reference(z, epsilon)
    assert np.all(np.abs(y[finite] - expected_y[finite]) <= bound)
    assert np.all(np.abs(g[finite] - expected_g[finite]) <= np.abs(upstream[finite]) * bound + 1e-12)
    assert np.all(np.abs(y[finite & (z <= 0)]) <= scale * (1 + 1e-6))  # bounded however large |z| is
    # inf takes z; -inf and nan give nan forward; backward, as the plain ops: the slope where z <= 0, else upstream
    assert y[-3] == np.inf and np.isnan(y[-2]) and np.isnan(y[-1])
    assert g[-3] == upstream[-3] and np.isnan(g[-2]) and g[-1] == upstream[-1]


def lenet() -> Any:
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(6, 5, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 5, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(120, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def trained(model: Any, x: np.ndarray, y: np.ndarray, run_eagerly: bool, jit_compile: Any = "auto") -> list[Any]:
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=run_eagerly,
        jit_compile=jit_compile,
    )
    for _ in range(3):
        model.train_on_batch(x, y)
    return model.get_weights()


@pytest.mark.parametrize("jit_compile", ["auto", True])
def test_training_step_through_the_fused_loops_matches_the_plain_ops(jit_compile: Any) -> None:
    keras.utils.set_random_seed(0)
    swapped = swap(lenet())
    x = np.random.default_rng(0).standard_normal((32, 28, 28, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, 32)
    copies = []
    for _ in range(2):
        copy = keras.models.clone_model(swapped)
        copy.set_weights(swapped.get_weights())
        copies.append(copy)
    graph = trained(copies[0], x, y, run_eagerly=False, jit_compile=jit_compile)
    eager = trained(copies[1], x, y, run_eagerly=True)  # eager: the plain ops
    for a, b in zip(graph, eager, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not all(np.array_equal(a, b) for a, b in zip(graph, swapped.get_weights(), strict=True))


def test_exported_saved_model_calls_the_fused_loops(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(6, 5, padding="same"), SineReLU()])
    x = np.random.default_rng(0).standard_normal((4, 28, 28, 1)).astype(np.float32)
    model.export(str(tmp_path / "exported"), verbose=False)
    restored = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(restored.serve(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-7)
