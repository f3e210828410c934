"""Keras SineReLU: parity with the numpy reference, gradients, saving, keras-contrib files and safe loading.

In-process tests run on the TensorFlow backend (gradients under tf.GradientTape); the torch backend and the
fresh-process reloads run in subprocesses.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

if keras.backend.backend() != "tensorflow":  # pragma: no cover - a subprocess test covers the torch backend
    pytest.skip(
        "these tests use tf.GradientTape: run them with KERAS_BACKEND=tensorflow", allow_module_level=True
    )

import h5py  # noqa: E402  (a Keras dependency)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import array_shapes, arrays  # noqa: E402

from deadneuron import DeadNeuronError, sinerelu_reference  # noqa: E402
from deadneuron.core.sinerelu import Form, sinerelu_grad_reference  # noqa: E402
from deadneuron.keras import SineReLU, custom_objects, sinerelu  # noqa: E402
from deadneuron.keras.loading import load_model  # noqa: E402
from deadneuron.keras.sinerelu import GRAPH_MIN_ELEMENTS, _generic_kernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EPSILONS = (0.0, 0.0025, 0.025, 0.25, 0.9)  # 0.9: eps*sqrt(2) > 1, the max form's other backward rule
FORMS: tuple[Form, ...] = ("piecewise", "max")
# The implementations: eager ops (small tensors), one graph per pass (large eager tensors), inlined into a
# tf.function, and the keras.ops kernel that the torch and JAX backends use.
PATHS = ("eager", "eager-large", "tf.function", "keras.ops")


def grid() -> np.ndarray:
    """A dense float32 grid with the jump at 0, tiny values on both sides and large arguments."""
    parts: list[Any] = [
        np.linspace(-30, 30, 60_001),
        np.linspace(-0.01, 0.01, 2_001),
        # No subnormals: TensorFlow's CPU kernels flush them to zero, so a positive subnormal z takes the
        # z <= 0 branch (f = -eps), as any rounding at the jump would.
        [0.0, -0.0, 1e-30, -1e-30, 1e-37, -1e-37],
        -np.logspace(-8, 4, 500),
        np.logspace(-8, 4, 500),
    ]
    return np.concatenate(parts).astype(np.float32)


def tolerance(z: np.ndarray, epsilon: float) -> np.ndarray:
    """float32 rounding of eps*sqrt(2)*sin(z - pi/4): the shift rounds to ulp(|z| + 1), then a few ulps; and
    values below float32's smallest normal, which TensorFlow flushes to zero."""
    relative = 4 * epsilon * math.sqrt(2) * (np.abs(z.astype(np.float64)) + 1) * 2.0**-23
    return relative + np.finfo(np.float32).tiny


def near_max_form_crossing(z: np.ndarray, epsilon: float) -> np.ndarray:
    """Where the max form's two branches are within rounding, so float32 and float64 may pick differently."""
    z64 = z.astype(np.float64)
    return np.abs(epsilon * (np.sin(z64) - np.cos(z64)) - z64) <= 1e-6


def run(path: str, z: np.ndarray, upstream: np.ndarray, epsilon: float, form: Form) -> tuple[Any, Any]:
    """SineReLU of `z` and the vector-Jacobian product with `upstream`, through one implementation."""
    x, v = tf.constant(z), tf.constant(upstream)
    if path == "keras.ops":
        kernel = _generic_kernel(epsilon, form)
    else:

        def kernel(t: Any) -> Any:
            return sinerelu(t, epsilon, form)

    def both(t: Any) -> tuple[Any, Any]:
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = kernel(t)
        return y, tape.gradient(y, t, output_gradients=v)

    if path == "tf.function":
        y, g = tf.function(both, autograph=False)(x)
    else:
        y, g = both(x)
    return y.numpy(), g.numpy()


def inputs_for(path: str) -> tuple[np.ndarray, np.ndarray]:
    z = grid()
    if path == "eager-large":
        repeats = -(-GRAPH_MIN_ELEMENTS // z.size) + 1
        z = np.tile(z, repeats)[: (z.size * repeats) // 4 * 4].reshape(4, -1)  # 2-D: the graph path flattens
        assert z.size >= GRAPH_MIN_ELEMENTS
    else:
        assert z.size < GRAPH_MIN_ELEMENTS
    upstream = np.random.default_rng(0).standard_normal(z.shape).astype(np.float32)
    return z, upstream


def assert_within(
    actual: np.ndarray, expected: np.ndarray, bound: np.ndarray, z: np.ndarray, what: str
) -> None:
    error = np.abs(actual.astype(np.float64) - expected)
    worst = int(np.argmax(error - bound))
    assert np.all(error <= bound), (
        f"{what}: at z={z.flat[worst]!r} got {actual.flat[worst]!r}, expected {expected.flat[worst]!r}"
    )


# ------------------------------------------------------------------------------------------ the maths


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("epsilon", EPSILONS)
def test_forward_matches_reference(path: str, form: Form, epsilon: float) -> None:
    z, upstream = inputs_for(path)
    y, _ = run(path, z, upstream, epsilon, form)
    assert y.dtype == np.float32 and y.shape == z.shape
    assert_within(y, sinerelu_reference(z, epsilon, form), tolerance(z, epsilon), z, f"{form} eps={epsilon}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("epsilon", EPSILONS)
def test_gradient_matches_reference(path: str, form: Form, epsilon: float) -> None:
    z, upstream = inputs_for(path)
    _, g = run(path, z, upstream, epsilon, form)
    expected = upstream * sinerelu_grad_reference(z, epsilon, form)
    keep = ~near_max_form_crossing(z, epsilon) if form == "max" else np.ones(z.shape, bool)
    bound = np.abs(upstream) * tolerance(z, epsilon) + 1e-12
    assert_within(g[keep], expected[keep], bound[keep], z[keep], f"grad {form} eps={epsilon}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("epsilon", (0.0025, 0.025, 0.5))
def test_value_and_slope_at_zero(path: str, epsilon: float) -> None:
    z = np.array([0.0, -0.0, 1e-7, -1e-7], np.float32)
    ones = np.ones_like(z)
    y, g = run(path if path != "eager-large" else "eager", z, ones, epsilon, "piecewise")
    # f(0) = -eps: the piecewise form jumps by eps at 0; f'(0) = eps*(cos 0 + sin 0) = eps.
    np.testing.assert_allclose(y[:2], -epsilon, rtol=1e-6)
    np.testing.assert_allclose(g[:2], epsilon, rtol=1e-6)
    assert y[2] == np.float32(1e-7) and g[2] == 1.0
    np.testing.assert_allclose(y[3], epsilon * (math.sin(-1e-7) - math.cos(-1e-7)), rtol=1e-6)
    # keras-contrib's max form is continuous there: max(-eps, 0) = 0, on the z branch.
    y_max, g_max = run("eager", z, ones, epsilon, "max")
    assert y_max[0] == 0.0 and g_max[0] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    z=arrays(
        np.float32,
        array_shapes(min_dims=1, max_dims=3, max_side=16),
        elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
    ),
    epsilon=st.one_of(st.just(0.0), st.floats(1e-6, 0.5)),
)
def test_properties(z: np.ndarray, epsilon: float) -> None:
    upstream = np.ones_like(z)
    piecewise, slope = run("eager", z, upstream, epsilon, "piecewise")
    maximum, _ = run("eager", z, upstream, epsilon, "max")
    bound = tolerance(z, epsilon)
    assert_within(piecewise, sinerelu_reference(z, epsilon), bound, z, "piecewise")
    assert_within(maximum, sinerelu_reference(z, epsilon, "max"), bound, z, "max")
    positive = z > 0
    # Identity above 0, exactly; a bounded sine below.
    assert np.array_equal(piecewise[positive], z[positive]) and np.all(slope[positive] == 1.0)
    assert np.all(np.abs(piecewise[~positive]) <= math.sqrt(2) * epsilon * (1 + 1e-6))
    assert np.all(np.abs(slope[~positive]) <= math.sqrt(2) * epsilon * (1 + 1e-6))
    # The max form never goes below z, and equals the piecewise form outside (z*, 0], z* ~ -eps/(1-eps).
    assert np.all(maximum >= z)
    outside = positive | (z < -2 * epsilon - 1e-6)
    # (to float32 rounding: the max form evaluates keras-contrib's expression, the piecewise form the sqrt(2) one)
    limit = 2 * np.broadcast_to(bound, z.shape)
    assert np.all(np.abs(maximum - piecewise)[outside] <= limit[outside])


def test_integer_input_is_cast_to_floatx() -> None:
    y = sinerelu(np.array([2, 0, -1]), epsilon=0.5)
    assert keras.backend.standardize_dtype(y.dtype) == keras.config.floatx()
    np.testing.assert_allclose(y.numpy(), sinerelu_reference([2, 0, -1], 0.5), rtol=1e-6)


def test_torch_keras_and_numpy_agree() -> None:
    torch = pytest.importorskip("torch")
    try:
        torch_sinerelu = importlib.import_module("deadneuron.torch.sinerelu").sinerelu
    except (ImportError, AttributeError) as error:
        pytest.skip(f"deadneuron.torch.sinerelu is not available yet ({error})")
    z = grid()
    for form in FORMS:
        for epsilon in (0.0025, 0.025, 0.25):
            y_keras, g_keras = run("eager", z, np.ones_like(z), epsilon, form)
            x = torch.tensor(z, requires_grad=True)
            y_torch = torch_sinerelu(x, epsilon=epsilon, form=form)
            y_torch.sum().backward()
            expected = sinerelu_reference(z, epsilon, form)
            bound = tolerance(z, epsilon)
            assert_within(y_torch.detach().numpy(), expected, bound, z, f"torch {form} eps={epsilon}")
            assert_within(
                y_keras, y_torch.detach().numpy().astype(np.float64), 2 * bound, z, "keras vs torch"
            )
            keep = ~near_max_form_crossing(z, epsilon) if form == "max" else np.ones(z.shape, bool)
            assert_within(
                g_keras[keep],
                x.grad.numpy()[keep].astype(np.float64),
                2 * bound[keep] + 1e-12,
                z[keep],
                "grad",
            )


# ------------------------------------------------------------------------------------------ the layer


def test_config_round_trip_keeps_epsilon_and_form() -> None:
    layer = SineReLU(epsilon=0.025, form="max", name="sine")
    config = layer.get_config()
    assert (config["epsilon"], config["form"], config["name"]) == (0.025, "max", "sine")
    clone = SineReLU.from_config(config)
    assert (clone.epsilon, clone.form, clone.name) == (0.025, "max", "sine")
    assert SineReLU().form == "piecewise" and SineReLU().epsilon == 0.0025
    # keras-contrib's config has no `form`: it computed the max form.
    assert SineReLU.from_config({"name": "sine_re_lu_1", "trainable": True, "epsilon": 0.01}).form == "max"
    assert custom_objects() == {"SineReLU": SineReLU}


@pytest.mark.parametrize("epsilon", (-0.1, math.nan, math.inf, "big", None))
def test_bad_epsilon_is_refused(epsilon: Any) -> None:
    with pytest.raises(DeadNeuronError, match="epsilon must be a finite number >= 0"):
        SineReLU(epsilon=epsilon)
    with pytest.raises(DeadNeuronError, match="epsilon must be a finite number >= 0"):
        sinerelu(np.zeros(2, np.float32), epsilon=epsilon)


def test_bad_form_is_refused() -> None:
    with pytest.raises(DeadNeuronError, match="unknown SineReLU form 'sine'; expected one of piecewise, max"):
        SineReLU(form="sine")  # type: ignore[arg-type]


def test_layer_trains_in_a_compiled_step() -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation=SineReLU(0.025)),
            SineReLU(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(1).standard_normal((32, 6)).astype(np.float32)
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, x[:, :1], epochs=2, batch_size=16, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    assert all(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def reload_summary(paths: list[str], x: Any) -> dict[str, Any]:
    """Load each file with keras.models.load_model and with ours; the outputs and every SineReLU's config.

    Self-contained (its source also runs in a fresh process), and it relies on `import deadneuron.keras` alone
    for keras.models.load_model to find "deadneuron>SineReLU".
    """
    import keras

    import deadneuron.keras  # noqa: F401  (registers SineReLU)
    from deadneuron.keras.loading import load_model

    summary = {}
    for path in paths:
        plain = keras.models.load_model(path, compile=False)
        for how, model in (("keras", plain), ("ours", load_model(path))):
            sines = [layer for layer in model.layers if type(layer).__name__ == "SineReLU"]
            sines += [getattr(layer, "activation", None) for layer in model.layers]
            configs = [sine.get_config() for sine in sines if type(sine).__name__ == "SineReLU"]
            summary[f"{path} {how}"] = {
                "outputs": keras.ops.convert_to_numpy(model(x)).tolist(),
                "sines": sorted([c["epsilon"], c["form"]] for c in configs),
            }
    return summary


def saved_model_model(tmp_path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """SineReLU as a Conv2D and a Dense activation and as a layer, saved to .keras and .h5."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, activation=SineReLU(0.0025, form="max"))(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(8, activation=SineReLU(epsilon=0.025))(h)
    h = SineReLU(epsilon=0.025, name="sine_layer")(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    x = np.random.default_rng(2).standard_normal((5, 6, 6, 2)).astype(np.float32)
    paths = [str(tmp_path / "model.keras"), str(tmp_path / "model.h5")]
    for path in paths:
        model.save(path)
    return paths, x, model.predict(x, verbose=0)


def check_reloaded(summary: dict[str, Any], expected: np.ndarray) -> None:
    assert len(summary) == 4
    for key, loaded in summary.items():
        np.testing.assert_allclose(np.array(loaded["outputs"]), expected, rtol=1e-6, atol=1e-6, err_msg=key)
        assert loaded["sines"] == [[0.0025, "max"], [0.025, "piecewise"], [0.025, "piecewise"]], key


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 240) -> str:
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_saved_model_reloads_with_epsilon_and_form(tmp_path: Path) -> None:
    paths, x, expected = saved_model_model(tmp_path)
    check_reloaded(reload_summary(paths, x), expected)


@pytest.mark.slow  # ~5 s of TensorFlow start-up on an idle 2-core machine, 10-13 s when it is shared
def test_saved_model_reloads_in_a_fresh_process(tmp_path: Path) -> None:
    paths, x, expected = saved_model_model(tmp_path)
    np.save(tmp_path / "x.npy", x)
    code = "\n".join(
        [
            "import json, numpy as np",
            "from typing import Any",
            textwrap.dedent(inspect.getsource(reload_summary)),
            f"print(json.dumps(reload_summary({paths!r}, np.load({str(tmp_path / 'x.npy')!r}))))",
        ]
    )
    check_reloaded(json.loads(run_python(code)), expected)


@pytest.mark.slow
def test_torch_backend_function_gradient_and_reload(tmp_path: Path) -> None:
    """KERAS_BACKEND=torch: the keras.ops kernel (torch passes `upstream=`) and a .keras saved under TF."""
    pytest.importorskip("torch")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation=SineReLU(0.25)), SineReLU()]
    )
    x = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    code = textwrap.dedent(
        f"""
        import json, numpy as np, torch, keras
        from deadneuron.keras import sinerelu
        from deadneuron.keras.loading import load_model
        from deadneuron.core.sinerelu import sinerelu_reference, sinerelu_grad_reference
        assert keras.backend.backend() == "torch"
        z = np.linspace(-10, 10, 4001).astype(np.float32)
        report = {{}}
        for form in ("piecewise", "max"):
            x = torch.tensor(z, requires_grad=True)
            y = sinerelu(x, epsilon=0.25, form=form)
            y.backward(torch.ones_like(y))
            keep = np.abs(0.25 * (np.sin(z) - np.cos(z)) - z) > 1e-6
            report[form] = [
                float(np.abs(y.detach().numpy() - sinerelu_reference(z, 0.25, form)).max()),
                float(np.abs(x.grad.numpy() - sinerelu_grad_reference(z, 0.25, form))[keep].max()),
            ]
        model = load_model({str(tmp_path / "model.keras")!r})
        out = keras.ops.convert_to_numpy(model(np.load({str(tmp_path / "x.npy")!r})))
        report["reload"] = float(np.abs(out - np.load({str(tmp_path / "y.npy")!r})).max())
        print(json.dumps(report))
        """
    )
    report = json.loads(run_python(code, env={"KERAS_BACKEND": "torch"}))
    for form in FORMS:
        assert report[form][0] < 1e-6 and report[form][1] < 1e-6, report
    assert report["reload"] < 1e-6, report


# ------------------------------------------------------------------------------------- keras-contrib files


def write_keras_contrib_h5(path: Path, epsilon: float, weights: list[np.ndarray]) -> None:
    """An .h5 as Keras 2.2.4 wrote it for Sequential([Dense(6, input_shape=(4,)), SineReLU(eps), Dense(3)]).

    keras-contrib's SineReLU stores epsilon as a float32 (`K.cast_to_floatx`) and its config is the base
    Layer's keys (name, trainable; no dtype on a layer that is not the first) plus `epsilon`: no `form`.
    """
    kernel_1, bias_1, kernel_2, bias_2 = weights

    def dense(name: str, units: int, first: bool) -> dict[str, Any]:
        config: dict[str, Any] = {"name": name, "trainable": True}
        if first:
            config.update(batch_input_shape=[None, 4], dtype="float32")
        config.update(
            units=units,
            activation="linear",
            use_bias=True,
            kernel_initializer={
                "class_name": "VarianceScaling",
                "config": {"scale": 1.0, "mode": "fan_avg", "distribution": "uniform", "seed": None},
            },
            bias_initializer={"class_name": "Zeros", "config": {}},
            kernel_regularizer=None,
            bias_regularizer=None,
            activity_regularizer=None,
            kernel_constraint=None,
            bias_constraint=None,
        )
        return {"class_name": "Dense", "config": config}

    sine = {
        "class_name": "SineReLU",
        "config": {"name": "sine_re_lu_1", "trainable": True, "epsilon": epsilon},
    }
    model_config = {
        "class_name": "Sequential",
        "config": {
            "name": "sequential_1",
            "layers": [dense("dense_1", 6, True), sine, dense("dense_2", 3, False)],
        },
    }
    layers = {
        "dense_1": [("kernel:0", kernel_1), ("bias:0", bias_1)],
        "sine_re_lu_1": [],
        "dense_2": [("kernel:0", kernel_2), ("bias:0", bias_2)],
    }
    with h5py.File(path, "w") as file:
        file.attrs["keras_version"] = b"2.2.4"
        file.attrs["backend"] = b"tensorflow"
        file.attrs["model_config"] = json.dumps(model_config).encode("utf-8")
        group = file.create_group("model_weights")
        group.attrs["layer_names"] = np.array([name.encode() for name in layers], dtype="S")
        group.attrs["backend"] = b"tensorflow"
        group.attrs["keras_version"] = b"2.2.4"
        for name, values in layers.items():
            layer_group = group.create_group(name)
            layer_group.attrs["weight_names"] = np.array(
                [f"{name}/{w}".encode() for w, _ in values], dtype="S"
            )
            for weight, value in values:
                layer_group.create_dataset(f"{name}/{weight}", data=value)


def test_keras_contrib_h5_loads_and_computes_the_max_form(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    weights = [
        (rng.standard_normal((4, 6)) * 0.5).astype(np.float32),
        (rng.standard_normal(6) * 0.1).astype(np.float32),
        rng.standard_normal((6, 3)).astype(np.float32),
        rng.standard_normal(3).astype(np.float32),
    ]
    epsilon = float(np.float32(0.25))  # a large epsilon, so that the two forms differ visibly
    path = tmp_path / "contrib.h5"
    write_keras_contrib_h5(path, epsilon, weights)

    model = load_model(path)
    sine = model.layers[1]
    assert isinstance(sine, SineReLU) and (sine.epsilon, sine.form) == (epsilon, "max")
    assert tuple(model.input_shape) == (None, 4)

    x = rng.standard_normal((256, 4)).astype(np.float32)
    pre = x.astype(np.float64) @ weights[0] + weights[1]
    as_contrib = sinerelu_reference(pre, epsilon, "max") @ weights[2] + weights[3]
    as_piecewise = sinerelu_reference(pre, epsilon, "piecewise") @ weights[2] + weights[3]
    np.testing.assert_allclose(model.predict(x, verbose=0), as_contrib, rtol=1e-5, atol=1e-5)
    assert np.abs(as_piecewise - as_contrib).max() > 0.1  # the test tells the forms apart


def test_keras3_port_of_keras_contrib_layer_loads_from_h5(tmp_path: Path) -> None:
    """A Keras 3 model that used a port of keras-contrib's class (same name, same config) saved as .h5."""

    class ContribSineReLU(keras.layers.Layer):  # type: ignore[name-defined,misc]  # keras-contrib's maths and config keys, for the file only
        def __init__(self, epsilon: float = 0.0025, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.epsilon = epsilon

        def call(self, z: Any) -> Any:
            return keras.ops.maximum(self.epsilon * (keras.ops.sin(z) - keras.ops.cos(z)), z)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "epsilon": float(self.epsilon)}

    ContribSineReLU.__name__ = ContribSineReLU.__qualname__ = "SineReLU"  # the class name the file records
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(7), ContribSineReLU(epsilon=0.3), keras.layers.Dense(2)]
    )
    x = np.random.default_rng(5).standard_normal((64, 5)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    path = tmp_path / "port.h5"
    model.save(path)
    with h5py.File(path, "r") as file:
        layers = json.loads(file.attrs["model_config"])["config"]["layers"]
    assert [entry["class_name"] for entry in layers][2] == "SineReLU"
    assert "form" not in layers[2]["config"] and layers[2]["config"]["epsilon"] == 0.3

    loaded = load_model(path)
    assert isinstance(loaded.layers[1], SineReLU) and loaded.layers[1].form == "max"
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=0, atol=0)  # bit for bit


@pytest.mark.parametrize("size", (1000, GRAPH_MIN_ELEMENTS + 3))
@pytest.mark.parametrize("epsilon", (0.0025, 0.025, 0.3))
def test_max_form_is_bitwise_keras_contrib(size: int, epsilon: float) -> None:
    """keras-contrib's expression, op for op, on both the eager path and the large-tensor graph path."""
    import tensorflow as tf

    z = tf.constant(np.random.default_rng(size).normal(0, 0.3, size).astype(np.float32))
    contrib = tf.maximum(np.float32(epsilon) * (tf.sin(z) - tf.cos(z)), z)
    ours = sinerelu(z, epsilon, "max")
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(contrib))
    generic = _generic_kernel(epsilon, "max")(z)
    np.testing.assert_array_equal(np.asarray(generic), np.asarray(contrib))


# ------------------------------------------------------------------------------------------ safe loading


def lambda_model() -> Any:
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0)(inputs))


@pytest.mark.parametrize("suffix", (".keras", ".h5"))
def test_lambda_model_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"lambda{suffix}"
    lambda_model().save(path)
    with pytest.raises(
        DeadNeuronError, match=r"refused to load .*contains a Lambda layer.*--unsafe-deserializ"
    ):
        load_model(path)


def test_lambda_model_loads_when_the_user_opts_in(tmp_path: Path) -> None:
    path = tmp_path / "lambda.keras"
    lambda_model().save(path)
    model = load_model(path, unsafe_deserialization=True)
    np.testing.assert_allclose(model.predict(np.ones((1, 3), np.float32), verbose=0), 2.0)


@pytest.mark.parametrize("suffix", (".keras", ".h5"))
def test_damaged_file_is_one_clear_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not a model" * 10)
    with pytest.raises(
        # The .keras message comes from the safe loader's archive check (docs/safety.md), the .h5 one from Keras's.
        DeadNeuronError,
        match=r"(damaged or not a Keras model|is not a Keras archive).*expected .*(save the model again|model\.save)",
    ):
        load_model(path)


def test_unknown_custom_layer_is_named(tmp_path: Path) -> None:
    @keras.saving.register_keras_serializable(package="deadneuron_tests")
    class Doubler(keras.layers.Layer):  # type: ignore[name-defined,misc]
        def call(self, x: Any) -> Any:
            return x * 2.0

    path = tmp_path / "custom.keras"
    keras.Sequential([keras.Input((3,)), Doubler()]).save(path)
    # Unregistered again, as in a process that never imported the module that defines it.
    del keras.saving.get_custom_objects()["deadneuron_tests>Doubler"]
    with pytest.raises(
        DeadNeuronError, match=r"custom Keras object 'Doubler'.*not registered.*Import the module"
    ):
        load_model(path)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DeadNeuronError, match=r"Keras model file not found: .*absent\.keras"):
        load_model(tmp_path / "absent.keras")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(DeadNeuronError, match=r"expected a file ending in \.keras, \.h5, \.hdf5"):
        load_model(tmp_path / "model.onnx")
    with pytest.raises(DeadNeuronError, match="--arch applies to PyTorch state dicts"):
        load_model(tmp_path / "absent.keras", arch="net.py:Net")
