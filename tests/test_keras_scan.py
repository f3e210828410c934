"""The Keras scan on a zoo whose dead, dormant and gradient-dead units are known by construction (tests/keras_zoo.py).

In-process tests run on the TensorFlow backend; the torch backend and the CLI run in fresh processes (slow).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

import deadneuron  # noqa: E402
from deadneuron import DeadNeuronError  # noqa: E402
from deadneuron.keras import backend  # noqa: E402

from . import keras_zoo  # noqa: E402
from .conftest import last_line, run_cli  # noqa: E402

if keras.backend.backend() != "tensorflow":  # pragma: no cover - the subprocess tests cover other backends
    pytest.skip("in-process Keras tests run on the TensorFlow backend", allow_module_level=True)


@pytest.fixture(scope="module")
def zoo() -> dict[str, keras_zoo.ZooModel]:
    return {name: build() for name, build in keras_zoo.BUILDERS.items()}


def assert_matches(report: deadneuron.Report, expected: dict[str, keras_zoo.Expect]) -> None:
    assert [layer.name for layer in report.layers] == list(expected)
    for layer in report.layers:
        want = expected[layer.name]
        got = (layer.kind, layer.units, layer.unit_axis, layer.dead_units, layer.dormant_units, layer.grad_dead_units)
        assert got == (want.kind, want.units, want.unit_axis, want.dead, want.dormant_units, want.grad_dead), layer.name


def state_of(model: keras.Model) -> dict:
    """Everything a scan might disturb: weights, trainable flags, instance attributes that wrappers replace."""
    layers = model._flatten_layers(include_self=True, recursive=True)
    return {
        "weights": [np.array(v.numpy()) for v in model.weights],
        "trainable": [layer.trainable for layer in layers],
        "patched": [(vars(layer).get("call"), vars(layer).get("activation")) for layer in layers],
        "ops": [vars(op).get("call") for op in getattr(model, "operations", [])],
        "compiled": [vars(model).get(name) for name in ("predict_function", "train_function", "test_function")],
    }


def assert_untouched(before: dict, after: dict) -> None:
    assert len(before["weights"]) == len(after["weights"])
    for a, b in zip(before["weights"], after["weights"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert before["trainable"] == after["trainable"]
    for key in ("patched", "ops", "compiled"):
        assert len(before[key]) == len(after[key])
        assert all(_same(a, b) for a, b in zip(before[key], after[key], strict=True)), key


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(x is y for x, y in zip(a, b, strict=True))
    return a is b


# --------------------------------------------------------------------------------------- known by construction


@pytest.mark.parametrize("name", ["mlp", "cnn", "nested", "subclassed", "channels_first", "kinds"])
def test_zoo_units_known_by_construction(zoo, name):
    model = zoo[name]
    report = deadneuron.scan(model.model, model.x, batch_size=16)
    assert report.framework == "keras" and report.loss == "probe" and report.samples == len(model.x)
    assert_matches(report, model.sites)
    assert all(layer.stats.grad_samples == len(model.x) for layer in report.layers)


def test_statistics_match_a_numpy_reference(zoo):
    """Every field of both MLP sites against a float64 forward and backward written out by hand (MSE loss)."""
    model = zoo["mlp"].model
    x = zoo["mlp"].x
    y = np.random.default_rng(3).standard_normal((len(x), 4)).astype("float32")
    report = deadneuron.scan(model, (x, y), batch_size=24)
    assert report.loss == "mse"
    (w1, b1), (w2, b2), (w3, b3) = (
        [np.asarray(v.numpy(), np.float64) for v in model.get_layer(n).weights] for n in ("dense_relu", "hidden", "out")
    )
    z1 = x @ w1 + b1
    a1 = np.maximum(z1, 0)
    z2 = a1 @ w2 + b2
    a2 = np.maximum(z2, 0)
    out = a2 @ w3 + b3
    g2 = (2 * (out - y) @ w3.T) * (z2 > 0)
    g1 = (g2 @ w2.T) * (z1 > 0)
    for name, z, a, g in (("dense_relu", z1, a1, g1), ("relu_layer", z2, a2, g2)):
        stats = report.layer(name).stats
        assert stats.samples == stats.grad_samples == len(x)
        np.testing.assert_array_equal(stats.fired, (a != 0).sum(0))
        np.testing.assert_array_equal(stats.positive, (z > 0).sum(0))
        np.testing.assert_array_equal(stats.grad_nonzero, (g != 0).sum(0))
        np.testing.assert_array_equal(stats.nonfinite, np.zeros(a.shape[1]))
        np.testing.assert_allclose(stats.max_abs, np.abs(a).max(0), rtol=1e-5)
        np.testing.assert_allclose(stats.inactive_sum, (a == 0).sum(0))
        np.testing.assert_allclose(stats.grad_abs_sum, np.abs(g).sum(0), rtol=1e-4, atol=1e-5)


def test_batching_does_not_change_the_statistics(zoo):
    """Sums and maxima: one batch or many give the same numbers (the stream merges exactly). A task loss, since
    the probe draws its cotangents per batch."""
    model = zoo["cnn"]
    targets = np.random.default_rng(5).standard_normal((len(model.x), 3)).astype("float32")
    whole = deadneuron.scan(model.model, (model.x, targets), batch_size=64)
    pieces = deadneuron.scan(model.model, (model.x, targets), batch_size=7)
    for a, b in zip(whole.layers, pieces.layers, strict=True):
        for field in ("fired", "positive", "grad_nonzero", "nonfinite"):
            np.testing.assert_array_equal(getattr(a.stats, field), getattr(b.stats, field))
        for field in ("max_abs", "inactive_sum", "grad_abs_sum"):
            np.testing.assert_allclose(getattr(a.stats, field), getattr(b.stats, field), rtol=1e-4, atol=1e-6)
        assert a.stats.positions == b.stats.positions == 64


def test_loss_none_has_null_gradient_fields(zoo):
    model = zoo["mlp"]
    report = deadneuron.scan(model.model, model.x, loss="none")
    data = json.loads(report.to_json())
    assert data["loss"] == "none" and data["totals"]["grad_dead"] is None
    assert all(layer["grad_dead"] is None and layer["grad_dead_units"] is None for layer in data["layers"])
    assert [layer["dead_units"] for layer in data["layers"]] == [[3, 7], [2]]


def test_unit_axis_override(zoo):
    model = zoo["channels_first"]
    report = deadneuron.scan(model.model, model.x, unit_axis=-1, loss="none")
    assert [(layer.unit_axis, layer.units) for layer in report.layers] == [(3, 6), (3, 6)]
    with pytest.raises(DeadNeuronError, match="unit_axis=0 does not fit site 'conv_cf'"):
        deadneuron.scan(model.model, model.x, unit_axis=0)


def test_inspect_lists_sites_without_data(zoo):
    sites = deadneuron.inspect(zoo["cnn"].model)
    assert [(s.name, s.kind, s.units, s.unit_axis) for s in sites] == [
        (name, e.kind, e.units, e.unit_axis) for name, e in zoo["cnn"].sites.items()
    ]
    with pytest.raises(DeadNeuronError, match="cannot tell the input shape of Subclassed"):
        deadneuron.inspect(zoo["subclassed"].model)
    assert [s.name for s in deadneuron.inspect(zoo["subclassed"].model, input_shape=(5,))] == ["d1", "block/act"]


def test_thresholds_and_non_finite_units():
    """A unit stuck at 1e-3 is dead only with atol above it; a unit that overflows is nonfinite, never dead."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu", name="h"),
                              keras.layers.Dense(2, name="out")])
    hidden = model.get_layer("h")
    kernel, bias = hidden.kernel.numpy(), hidden.bias.numpy()
    kernel[:, 0], bias[0] = 0.0, 1e-3
    kernel[:, 3], bias[3] = 0.0, np.inf
    hidden.kernel.assign(kernel)
    hidden.bias.assign(bias)
    x = np.random.default_rng(0).standard_normal((16, 3)).astype("float32")
    plain = deadneuron.scan(model, x, loss="none").layer("h")
    assert plain.dead_units == [] and plain.nonfinite == 1 and plain.stats.nonfinite.tolist() == [0, 0, 0, 16]
    assert plain.stats.max_abs[3] == 0.0  # non-finite values are not maxima
    loose = deadneuron.scan(model, x, loss="none", atol=1e-2)
    assert loose.layer("h").dead_units == [0] and any("non-finite" in w for w in loose.warnings)


def test_an_unbuilt_model_is_scanned_with_a_warning():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(4, activation="relu", name="h"), keras.layers.Dense(2)])
    with pytest.raises(DeadNeuronError, match="cannot tell the input shape of Sequential"):
        deadneuron.scan(model, samples=8)
    report = deadneuron.scan(model, samples=8, input_shape=(3,))
    assert [layer.name for layer in report.layers] == ["h"]
    assert any("had not been built" in warning for warning in report.warnings)


def test_lambda_and_recurrent_activations_are_listed_as_unobserved():
    inputs = keras.Input((5, 3))
    x = keras.layers.LSTM(4, activation="relu", return_sequences=True, name="lstm")(inputs)
    x = keras.layers.Lambda(lambda t: keras.ops.relu(t), name="lam")(x)
    x = keras.layers.Dense(6, activation="relu", name="d")(x)
    model = keras.Model(inputs, x)
    report = deadneuron.scan(model, samples=8, loss="none")
    assert [layer.name for layer in report.layers] == ["d"]
    assert report.layers[0].unit_axis == 2 and report.layers[0].stats.positions == 5
    assert [entry.split(" ")[0] for entry in report.unobserved] == ["lstm", "lam"]


# ------------------------------------------------------------------------------------------- losses and data


def test_integer_labels_take_cross_entropy_on_the_logits_of_a_softmax_output():
    """Saturated softmax, every label wrong: CE on clipped probabilities would give no gradient at all; on the
    captured logits every alive unit gets one."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="relu", name="h"),
         keras.layers.Dense(3, activation="softmax", name="probs")]
    )
    hidden, probs = model.get_layer("h"), model.get_layer("probs")
    hidden.kernel.assign(np.abs(hidden.kernel.numpy()))  # positive inputs and weights: every unit fires
    probs.kernel.assign(0.01 * probs.kernel.numpy())
    probs.bias.assign(np.array([500.0, 0.0, 0.0], "float32"))  # probabilities exactly (1, 0, 0)
    x = np.abs(np.random.default_rng(0).standard_normal((32, 4))).astype("float32")
    labels = np.full(32, 2)  # never the predicted class
    report = deadneuron.scan(model, x, labels=labels)
    assert report.loss == "ce"
    layer = report.layer("h")
    assert layer.dead_units == [] and layer.grad_dead_units == []
    assert layer.stats.grad_abs_sum.min() > 0


def test_tf_data_pydataset_and_random_samples(zoo):
    import tensorflow as tf

    model = zoo["nested"]
    labels = np.arange(len(model.x)) % 2
    dataset = tf.data.Dataset.from_tensor_slices((model.x, labels)).batch(10)
    report = deadneuron.scan(model.model, dataset)
    assert report.loss == "ce" and report.samples == len(model.x)
    assert [layer.dead_units for layer in report.layers] == [[4], [4], [3]]

    class Batches(keras.utils.PyDataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int):
            return model.x[index * 16 : (index + 1) * 16]

    seen: list[int] = []
    report = deadneuron.scan(model.model, Batches(), samples=40, progress=seen.append)
    assert report.samples == 40 and seen == [16, 16, 8] and report.loss == "probe"
    report = deadneuron.scan(model.model, samples=50, batch_size=20, seed=3)
    assert report.samples == 50
    assert [layer.dead_units for layer in report.layers] == [[4], [4], [3]]


@pytest.mark.parametrize(
    "data, options, message",
    [
        (np.zeros((4, 7), "float32"), {}, r"the data's samples have shape \(7\), the model expects \(8\)"),
        (np.zeros((0, 8), "float32"), {}, "the inputs are empty"),
        ([], {}, "the data is empty"),
        (np.zeros((4, 8), "float32"), {"loss": "ce"}, "loss='ce' needs labels"),
        ((np.zeros((4, 8), "float32"), np.array([0, 1, 2, 9])), {}, "labels run from 0 to 9, but the model has 4"),
        ((np.zeros((4, 8), "float32"), np.zeros((4, 3), "float32")), {}, r"targets of shape \(3\) per sample do not"),
        ((np.zeros((4, 8), "float32"), np.zeros((4, 2), "int64")), {}, r"integer labels of shape \(2\) per sample"),
        (None, {}, "no data: pass data"),
        ("missing.npz", {}, "data file not found"),
        (object(), {}, "cannot read data of type object"),
    ],
)
def test_user_errors_are_one_line(zoo, data, options, message):
    with pytest.raises(DeadNeuronError, match=message) as caught:
        deadneuron.scan(zoo["mlp"].model, data, **options)
    assert "\n" not in str(caught.value)


def test_task_loss_on_a_model_with_two_outputs_is_refused():
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="relu")(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(2)(hidden), keras.layers.Dense(2)(hidden)])
    with pytest.raises(DeadNeuronError, match="a model with 2 outputs; a task loss needs one output"):
        deadneuron.scan(model, (np.zeros((4, 3), "float32"), np.zeros(4, "int64")))
    assert deadneuron.scan(model, np.ones((4, 3), "float32")).loss == "probe"  # the probe covers every output


# ---------------------------------------------------------------------------------------- the model as found


def test_model_untouched_after_a_scan(zoo):
    model = zoo["cnn"].model
    x = zoo["cnn"].x
    expected = model.predict(x, verbose=0)  # compiles a predict function before the scan
    before = state_of(model)
    deadneuron.scan(model, x, batch_size=32)
    assert_untouched(before, state_of(model))
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)
    model.predict_function = None  # a function compiled afterwards sees no wrapper either
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)


@pytest.mark.parametrize("name", ["subclassed", "nested"])
def test_model_untouched_after_a_failed_scan(zoo, name):
    model = zoo[name]

    def batches():
        yield model.x[:8]
        raise RuntimeError("the data source broke")

    before = state_of(model.model)
    with pytest.raises(RuntimeError, match="the data source broke"):
        deadneuron.scan(model.model, batches())
    assert_untouched(before, state_of(model.model))
    # and a later scan sees the same sites, once each
    assert_matches(deadneuron.scan(model.model, model.x), model.sites)


def test_adapter_is_chosen_by_model_type(zoo):
    from deadneuron.api import framework_of

    assert framework_of(zoo["mlp"].model) == "keras"
    assert framework_of(zoo["subclassed"].model) == "keras"


# ------------------------------------------------------------------------------------ fresh processes (slow)


@pytest.fixture(scope="module")
def saved(zoo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras_files")
    zoo["cnn"].model.save(folder / "cnn.keras")
    zoo["mlp"].model.save(folder / "mlp.h5")
    np.save(folder / "cnn_x.npy", zoo["cnn"].x)
    np.savez(folder / "mlp.npz", x=zoo["mlp"].x, y=np.arange(len(zoo["mlp"].x)) % 4)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("model_file, data_file, zoo_name, loss", [
    ("cnn.keras", "cnn_x.npy", "cnn", "probe"),
    ("mlp.h5", "mlp.npz", "mlp", "ce"),
])
def test_cli_scans_saved_files_in_a_fresh_process(zoo, saved, model_file, data_file, zoo_name, loss):
    result = run_cli("scan", str(saved / model_file), "--data", str(saved / data_file), "--json", "-")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["framework"] == "keras" and data["model"] == model_file and data["loss"] == loss
    expected = zoo[zoo_name].sites
    assert [layer["name"] for layer in data["layers"]] == list(expected)
    for layer in data["layers"]:
        want = expected[layer["name"]]
        assert (layer["dead_units"], layer["grad_dead_units"], layer["unit_axis"]) == (
            want.dead, want.grad_dead, want.unit_axis
        )


@pytest.mark.slow
def test_cli_inspect_and_refusal(saved, tmp_path):
    result = run_cli("inspect", str(saved / "cnn.keras"))
    assert result.returncode == 0, result.stderr
    assert "3 activation sites" in result.stdout and "conv" in result.stdout
    result = run_cli("scan", str(saved / "cnn.keras"), "--data", str(saved / "mlp.npz"))
    assert result.returncode == 2
    assert last_line(result.stderr).startswith("deadneuron: error: the data's samples have shape (8)")


@pytest.mark.slow
def test_torch_backend_finds_the_same_units(zoo, saved):
    """A .keras saved under TensorFlow, scanned under KERAS_BACKEND=torch: the same sites and units."""
    expected = deadneuron.scan(zoo["cnn"].model, zoo["cnn"].x).to_dict()
    result = run_cli(
        "scan", str(saved / "cnn.keras"), "--data", str(saved / "cnn_x.npy"), "--json", "-",
        env={"KERAS_BACKEND": "torch"},
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    keys = ("name", "kind", "units", "unit_axis", "dead_units", "dormant_units", "grad_dead_units")
    assert [{k: layer[k] for k in keys} for layer in data["layers"]] == [
        {k: layer[k] for k in keys} for layer in expected["layers"]
    ]
    for got, want in zip(data["layers"], expected["layers"], strict=True):
        assert got["inactive_rate"] == pytest.approx(want["inactive_rate"], rel=1e-4)


@pytest.mark.slow
def test_torch_backend_live_models_in_a_fresh_process(tmp_path):
    """Zoo models built under the torch backend (nn.Modules too) are scanned as Keras, subclassed and nested too."""
    script = tmp_path / "scan_torch.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(os.path.dirname(os.path.dirname(__file__)))!r})\n"
        "import torch, deadneuron\n"
        "from tests import keras_zoo\n"
        "out = {}\n"
        "for name in ('subclassed', 'nested', 'channels_first', 'kinds'):\n"
        "    zoo = keras_zoo.BUILDERS[name]()\n"
        "    assert isinstance(zoo.model, torch.nn.Module)\n"
        "    report = deadneuron.scan(zoo.model, zoo.x, batch_size=16)\n"
        "    ok = [(l.name, l.kind, l.units, l.unit_axis, l.dead_units, l.dormant_units, l.grad_dead_units) ==\n"
        "          (n, e.kind, e.units, e.unit_axis, e.dead, e.dormant_units, e.grad_dead)\n"
        "          for l, (n, e) in zip(report.layers, zoo.sites.items())]\n"
        "    out[name] = [report.framework, len(report.layers) == len(zoo.sites), all(ok)]\n"
        "print(json.dumps(out))\n"
    )
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(last_line(result.stdout)) == {
        name: ["keras", True, True] for name in ("subclassed", "nested", "channels_first", "kinds")
    }


def test_backend_load_model_refuses_arch(saved):
    with pytest.raises(DeadNeuronError, match="drop --arch"):
        backend.BACKEND.load_model(str(saved / "cnn.keras"), arch="x.py:Net")


# ------------------------------------------------------------------------------------------- tracing the step


class CountingModel(keras.Model):
    """A subclassed model whose `call` runs once per eager call and once per trace: it counts the scan's traces.
    `by_batch` reshapes with the static batch size, which a trace for any batch size cannot know."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.extra = keras.layers.ReLU(name="only_once")
        self.head = keras.layers.Dense(3)
        self.calls = 0
        self.by_batch = False
        self.extra_in_discovery = False

    def call(self, x):
        self.calls += 1
        h = self.hidden(x)
        if self.by_batch:
            h = keras.ops.reshape(h, (x.shape[0], -1))
        if self.extra_in_discovery and x.shape[0] == 2:  # only in the eager discovery pass on two samples
            h = self.extra(h)
        return self.head(h)


def _counting(seed: int = 0) -> tuple[CountingModel, np.ndarray]:
    keras.utils.set_random_seed(seed)
    model = CountingModel()
    x = np.random.default_rng(seed).standard_normal((40, 5)).astype("float32")
    model(x[:2])
    return model, x


def _same_stats(a: deadneuron.Report, b: deadneuron.Report) -> None:
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    for x, y in zip(a.layers, b.layers, strict=True):
        assert (x.stats.samples, x.stats.grad_samples) == (y.stats.samples, y.stats.grad_samples)
        for field in ("fired", "positive", "grad_nonzero", "nonfinite"):
            np.testing.assert_array_equal(getattr(x.stats, field), getattr(y.stats, field))
        for field in ("max_abs", "inactive_sum", "grad_abs_sum"):
            np.testing.assert_allclose(getattr(x.stats, field), getattr(y.stats, field), rtol=1e-5, atol=1e-6)


def test_a_last_smaller_batch_reuses_the_traced_step():
    """One trace serves every batch size: batches of 16, 16 and 8 call the model twice (the eager discovery pass
    and one trace); a retrace for the last batch would cost a deep model several batches' time."""
    model, x = _counting()
    y = np.random.default_rng(1).standard_normal((len(x), 3)).astype("float32")
    model.calls = 0
    report = deadneuron.scan(model, (x, y), batch_size=16)
    assert model.calls == 2
    _same_stats(report, deadneuron.scan(model, (x, y), batch_size=40))


def test_a_model_that_needs_its_batch_size_to_trace_is_traced_per_batch_size():
    model, x = _counting()
    y = np.random.default_rng(1).standard_normal((len(x), 3)).astype("float32")
    plain = deadneuron.scan(model, (x, y), batch_size=16)
    model.by_batch = True
    model.calls = 0
    report = deadneuron.scan(model, (x, y), batch_size=16)
    assert model.calls == 4  # discovery, the trace for any batch size that failed, then batches of 16 and of 8
    _same_stats(report, plain)


def test_a_site_seen_only_by_the_discovery_pass_adds_no_samples():
    """The step adds every site it recorded, in one update: a site that did not run in a batch adds nothing, and
    the others are counted as if it did not exist."""
    model, x = _counting()
    plain = deadneuron.scan(model, x, batch_size=16)
    model.extra_in_discovery = True
    report = deadneuron.scan(model, x, batch_size=16)
    first, extra = report.layers
    assert (first.name, extra.name) == (plain.layers[0].name, "only_once")
    assert extra.stats.samples == extra.stats.grad_samples == 0 and not extra.stats.fired.any()
    plain_first = plain.layers[0].stats
    assert first.stats.samples == first.stats.grad_samples == len(x)
    for field in ("fired", "positive", "grad_nonzero", "max_abs", "inactive_sum"):
        np.testing.assert_array_equal(getattr(first.stats, field), getattr(plain_first, field))


def test_sites_with_a_folded_first_axis_are_reduced_apart_and_put_back_in_place():
    """Sites whose first axis is the batch are reduced together (`accumulate.Accumulators.update` joins them along
    the units); a site between them that runs on (batch*tokens, features) rows is a group of its own, and its
    columns go back between theirs. Every field of the three sites against a float64 forward and backward written
    out by hand (MSE loss), and the sample counts: rows for the folded site."""
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable("deadneuron_tests")
    class Fold(keras.layers.Layer):
        def call(self, x):
            return ops.reshape(x, (-1, x.shape[-1]))

    @keras.saving.register_keras_serializable("deadneuron_tests")
    class Unfold(keras.layers.Layer):
        def call(self, x):
            return ops.reshape(x, (-1, 4 * x.shape[-1]))

    keras.utils.set_random_seed(7)
    inputs = keras.Input((4, 5))
    first = keras.layers.Dense(6, activation="relu", name="first")  # (N, 4, 6): batch first
    folded = keras.layers.Dense(3, activation="relu", name="folded")  # (N*4, 3): token rows first
    last = keras.layers.Dense(5, activation="relu", name="last")  # (N, 5)
    out = keras.layers.Dense(2, name="out")
    outputs = out(last(Unfold()(folded(Fold()(first(inputs))))))
    model = keras.Model(inputs, outputs)
    keras_zoo.force_units(first, dead=(0,))
    keras_zoo.force_units(folded, dead=(1,), positive=True)
    keras_zoo.force_units(last, dead=(2,), positive=True)
    keras_zoo.cut_outgoing(out, (3,))
    n = 40
    x = np.random.default_rng(2).standard_normal((n, 4, 5)).astype("float32")
    y = np.random.default_rng(3).standard_normal((n, 2)).astype("float32")
    report = deadneuron.scan(model, (x, y), batch_size=16)  # 16, 16, 8: a smaller last batch too
    assert [layer.name for layer in report.layers] == ["first", "folded", "last"]

    names = ("first", "folded", "last", "out")
    w = {name: [np.asarray(v.numpy(), np.float64) for v in model.get_layer(name).weights] for name in names}
    z1 = x @ w["first"][0] + w["first"][1]
    a1 = np.maximum(z1, 0)
    z2 = a1.reshape(-1, 6) @ w["folded"][0] + w["folded"][1]
    a2 = np.maximum(z2, 0)
    z3 = a2.reshape(n, 12) @ w["last"][0] + w["last"][1]
    a3 = np.maximum(z3, 0)
    g3 = (2 * (a3 @ w["out"][0] + w["out"][1] - y) @ w["out"][0].T) * (z3 > 0)
    g2 = (g3 @ w["last"][0].T).reshape(-1, 3) * (z2 > 0)
    g1 = (g2 @ w["folded"][0].T).reshape(n, 4, 6) * (z1 > 0)
    # per sample and unit over the positions (the 4 tokens of `first`), as design.md counts them
    for name, z, a, g, rows in (
        ("first", z1.max(1), np.abs(a1), np.abs(g1), n),
        ("folded", z2, np.abs(a2)[:, None], np.abs(g2)[:, None], 4 * n),
        ("last", z3, np.abs(a3)[:, None], np.abs(g3)[:, None], n),
    ):
        stats = report.layer(name).stats
        assert stats.samples == stats.grad_samples == rows, name
        np.testing.assert_array_equal(stats.fired, (a.max(1) > 0).sum(0))
        np.testing.assert_array_equal(stats.positive, (z > 0).sum(0))
        np.testing.assert_array_equal(stats.grad_nonzero, (g.max(1) > 0).sum(0))
        np.testing.assert_allclose(stats.max_abs, a.max((0, 1)), rtol=1e-5)
        np.testing.assert_allclose(stats.inactive_sum, (a == 0).mean(1).sum(0), rtol=1e-6)
        np.testing.assert_allclose(stats.grad_abs_sum, g.sum((0, 1)), rtol=1e-4, atol=1e-5)
    assert report.layer("first").dead_units == [0]
    assert report.layer("folded").dead_units == [1]
    assert report.layer("last").dead_units == [2]
    assert 3 in report.layer("last").grad_dead_units


def test_the_step_options_hold_in_this_thread_only_and_are_put_back():
    """keras/graph.py: the scan's step runs without Grappler on CPU through TensorFlow's per-thread call options,
    set around each call: another thread, the calls after it, and a call that raises keep their configuration."""
    import threading

    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    from deadneuron.keras.graph import step_options

    if tf.config.list_logical_devices("GPU"):  # pragma: no cover - Grappler stays on where a GPU is visible
        pytest.skip("the step keeps TensorFlow's defaults with a GPU")

    def lean() -> bool:
        proto = config_pb2.ConfigProto()
        proto.ParseFromString(context.context().function_call_options.config_proto_serialized)
        return proto.graph_options.rewrite_options.disable_meta_optimizer

    before = context.context().function_call_options.config_proto_serialized
    options = step_options()
    seen: dict[str, bool] = {}
    with options():
        seen["inside"] = lean()
        other = threading.Thread(target=lambda: seen.__setitem__("other thread", lean()))
        other.start()
        other.join()
    seen["after"] = lean()
    with pytest.raises(ValueError, match="boom"), options():
        raise ValueError("boom")
    seen["after an error"] = lean()
    assert seen == {"inside": True, "other thread": False, "after": False, "after an error": False}
    assert context.context().function_call_options.config_proto_serialized == before


def test_a_loads_variable_budget_counts_its_own_thread_only():
    """keras/loading.VariableBudget wraps Keras's `Variable._validate_shape` while a file loads: a variable made
    meanwhile by another thread (a user's training) was counted against the file's budget and refused with the
    file's error, and two loads that ended out of order left the wrapper of the first in Keras for good."""
    import threading

    from keras.src.backend.common.variables import Variable

    from deadneuron.keras.loading import VariableBudget

    keras_own = Variable._validate_shape
    entered, done = threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def loading() -> None:
        with VariableBudget("small.keras", limit=1_000) as budget:
            keras.Variable(np.zeros((10,), "float32"))  # its own: counted
            entered.set()
            done.wait(10)
            seen["used"] = budget.used

    worker = threading.Thread(target=loading)
    worker.start()
    try:
        assert entered.wait(10)
        other = VariableBudget("other.keras", limit=1 << 30).__enter__()  # a second load, in this thread
        keras.Variable(np.zeros((1000, 1000), "float32"))  # 4 MB in this thread: not the small file's
        assert other.used == 4_000_000
    finally:
        done.set()
        worker.join(10)
    other.__exit__(None, None, None)  # the loads end in the order they began: the worker's first
    assert seen == {"used": 40}
    assert Variable._validate_shape is keras_own
    with pytest.raises(DeadNeuronError, match=r"small.keras: its model config asks for 4,000,000 bytes"), \
            VariableBudget("small.keras", limit=1_000):
        keras.Variable(np.zeros((1000, 1000), "float32"))
    assert Variable._validate_shape is keras_own
