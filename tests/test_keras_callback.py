"""DeadNeuronCallback in real `fit` runs: tiny MLPs with units pinned dead by constraints and units that die under a
too-high learning rate; the figures in History, CSVLogger, TensorBoard and EarlyStopping against plain scans.

MirroredStrategy runs in a fresh process (logical devices must be configured before TensorFlow starts).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("keras")
pytest.importorskip("tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import deadneuron  # noqa: E402
from deadneuron import DeadNeuronError  # noqa: E402
from deadneuron.keras import DeadNeuronCallback  # noqa: E402

from .conftest import ROOT  # noqa: E402

if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("in-process Keras tests run on the TensorFlow backend", allow_module_level=True)

PINNED = (0, 1, 2)  # units of "hidden" held dead by the constraints: zero incoming weights, bias -1
HIGH_LR = 3.0  # kills most of "hidden2" within an epoch or two
LOW_LR = 0.05  # kills nothing beyond the pinned units

rng = np.random.default_rng(0)
X = rng.normal(size=(256, 8)).astype("float32")
Y = rng.integers(0, 3, 256)
PROBE = (X[:128], Y[:128])


class Pin(keras.constraints.Constraint):
    """Projects the chosen units' weights to `value` after every optimizer step, so they stay dead."""

    def __init__(self, units: tuple[int, ...], value: float) -> None:
        self.units, self.value = list(units), value

    def __call__(self, w: Any) -> Any:
        keep = np.ones(w.shape[-1], "float32")
        keep[self.units] = 0.0
        fill = np.zeros(w.shape[-1], "float32")
        fill[self.units] = self.value
        return w * keep + fill


def build(lr: float = HIGH_LR, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(
                32, activation="relu", name="hidden",
                kernel_constraint=Pin(PINNED, 0.0), bias_constraint=Pin(PINNED, -1.0),
            ),
            keras.layers.Dense(16, activation="relu", name="hidden2"),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    model.compile(keras.optimizers.SGD(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class KeepWeights(keras.callbacks.Callback):
    """The weights after each epoch, to rebuild the model of that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: dict[int, list[np.ndarray]] = {}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.weights[epoch] = [np.array(w) for w in self.model.get_weights()]


def fit(model: keras.Model, callbacks: list, epochs: int = 3, seed: int = 0) -> keras.callbacks.History:
    keras.utils.set_random_seed(seed)
    return model.fit(X, Y, epochs=epochs, batch_size=32, callbacks=callbacks, verbose=0)


def test_history_equals_a_scan_after_each_epoch() -> None:
    model = build(HIGH_LR)
    callback, kept = DeadNeuronCallback(PROBE, per_site=True), KeepWeights()
    history = fit(model, [callback, kept]).history
    assert sorted(callback.reports) == [0, 1, 2]
    for epoch, weights in kept.weights.items():
        twin = build(HIGH_LR)
        twin.set_weights(weights)
        report = deadneuron.scan(twin, PROBE)
        assert callback.reports[epoch].to_dict() == report.to_dict()
        assert history["dead_fraction"][epoch] == report.dead_fraction
        assert history["dormant_fraction"][epoch] == report.dormant / report.units
        assert history["grad_dead_fraction"][epoch] == report.grad_dead_fraction
        for layer in report.layers:
            assert history[f"dead_fraction/{layer.name}"][epoch] == layer.dead_fraction
        assert set(PINNED) <= set(report.layer("hidden").dead_units)
    # the too-high learning rate killed units beyond the pinned ones
    assert callback.last_report is callback.reports[2]
    assert callback.last_report.layer("hidden2").dead > 0
    assert history["dead_fraction"][-1] > len(PINNED) / 48
    # The history the over-time chart draws holds the same figures, per site for all three fractions.
    figures = callback.history()
    assert figures.series("dead_fraction") == ([0, 1, 2], history["dead_fraction"])
    assert figures.series("dead_fraction", "hidden2")[1] == history["dead_fraction/hidden2"]
    assert figures.series("dormant_fraction", "hidden")[1][0] == callback.reports[0].layer("hidden").dormant_fraction


def test_training_is_unchanged_by_the_scans() -> None:
    watched, plain = build(HIGH_LR), build(HIGH_LR)
    train_function_before = None

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            nonlocal train_function_before
            train_function_before = train_function_before or self.model.train_function
            assert self.model.train_function is train_function_before  # compiled step kept across scans

    history = fit(watched, [DeadNeuronCallback(PROBE, per_site=True, alert=0.9), Spy()], epochs=3).history
    baseline = fit(plain, [], epochs=3).history
    assert history["loss"] == baseline["loss"]
    for a, b in zip(watched.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_no_per_batch_hook_is_overridden() -> None:
    base = keras.callbacks.Callback
    for hook in dir(base):
        if "batch" in hook and hook.startswith("on_"):
            assert getattr(DeadNeuronCallback, hook) is getattr(base, hook), hook


def test_csv_logger_gets_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    callback = DeadNeuronCallback(PROBE, per_site=True)
    history = fit(build(HIGH_LR), [callback, keras.callbacks.CSVLogger(str(path))]).history
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3
    for key in ("dead_fraction", "dormant_fraction", "grad_dead_fraction", "dead_fraction/hidden",
                "dead_fraction/hidden2"):
        assert [float(row[key]) for row in rows] == history[key], key


@pytest.mark.parametrize("mode", ["min", "max"])
def test_early_stopping_monitors_dead_fraction(mode: str) -> None:
    # At a low learning rate only the pinned units are dead: the figure never improves, so patience 1 stops at
    # the second epoch whichever way "better" points.
    early = keras.callbacks.EarlyStopping(monitor="dead_fraction", mode=mode, patience=1)
    history = fit(build(LOW_LR), [DeadNeuronCallback(PROBE), early], epochs=6).history
    assert len(history["loss"]) == 2
    assert early.stopped_epoch == 1
    assert early.best == history["dead_fraction"][0] == len(PINNED) / 48


def test_callbacks_before_it_do_not_see_its_keys() -> None:
    early = keras.callbacks.EarlyStopping(monitor="dead_fraction", mode="min", patience=1)
    with pytest.warns(UserWarning, match="dead_fraction"):
        history = fit(build(LOW_LR), [early, DeadNeuronCallback(PROBE)], epochs=3).history
    assert len(history["loss"]) == 3  # it never saw the key, so it never stopped
    assert len(history["dead_fraction"]) == 3  # History, always last, did


def test_tensorboard_writes_the_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = DeadNeuronCallback(PROBE, per_site=True)
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path), write_graph=False)
    history = fit(build(HIGH_LR), [callback, board]).history
    events = EventAccumulator(str(tmp_path / "train"), size_guidance={"tensors": 0})
    events.Reload()
    for key in ("dead_fraction", "dormant_fraction", "grad_dead_fraction", "dead_fraction/hidden2"):
        tag = f"epoch_{key}"
        assert tag in events.Tags()["tensors"], events.Tags()
        written = {event.step: float(tf.make_ndarray(event.tensor_proto)) for event in events.Tensors(tag)}
        assert written == pytest.approx(dict(enumerate(history[key])), abs=1e-7), key


def test_alert_warns_once() -> None:
    callback = DeadNeuronCallback(PROBE, alert=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(build(LOW_LR), [callback], epochs=3)
    alerts = [w for w in caught if "deadneuron:" in str(w.message)]
    assert len(alerts) == 1, [str(w.message) for w in caught]
    assert issubclass(alerts[0].category, UserWarning)
    assert "6.2% of units are dead after epoch 1 (alert=0.05): hidden 3/32" in str(alerts[0].message)


def test_alert_stays_quiet_below_the_threshold() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(build(LOW_LR), [DeadNeuronCallback(PROBE, alert=0.5)], epochs=2)
    assert not [w for w in caught if "deadneuron:" in str(w.message)]


def test_every_n_epochs_scans_the_first_epoch_then_every_nth() -> None:
    callback = DeadNeuronCallback(PROBE, every_n_epochs=2)
    history = fit(build(LOW_LR), [callback], epochs=5).history
    assert sorted(callback.reports) == [0, 2, 4]
    assert len(history["dead_fraction"]) == 3
    assert len(history["loss"]) == 5


def test_changes_between_scans_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    callback = DeadNeuronCallback(PROBE)
    seen: dict[int, tuple[dict, dict]] = {}

    class Changes(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seen[epoch] = (dict(callback.newly_dead), dict(callback.revived))

    with caplog.at_level(logging.INFO, logger="deadneuron.keras"):
        fit(build(HIGH_LR), [callback, Changes()], epochs=3)
    messages = [record.getMessage() for record in caplog.records if record.name == "deadneuron.keras"]
    first = callback.reports[0]
    percent = f"{100 * first.dead_fraction:.1f}%"
    assert messages[0] == f"epoch 1: {first.dead} of 48 units dead ({percent}) on 128 probe samples"
    assert seen[0][0]["hidden"][:3] == list(PINNED)  # at the first scan every dead unit is newly dead
    changed = 0
    for epoch in (1, 2):
        before, after = callback.reports[epoch - 1], callback.reports[epoch]
        died, revived = {}, {}
        for layer in after.layers:
            now, then = set(layer.dead_units), set(before.layer(layer.name).dead_units)
            if now - then:
                died[layer.name] = sorted(now - then)
            if then - now:
                revived[layer.name] = sorted(then - now)
        assert seen[epoch] == (died, revived)
        if died or revived:
            changed += 1
            assert any(m.startswith(f"epoch {epoch + 1}: ") and "newly dead" in m for m in messages)
    assert changed  # the too-high learning rate killed units after the first epoch


def test_verbose_zero_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="deadneuron.keras"):
        fit(build(HIGH_LR), [DeadNeuronCallback(PROBE, verbose=0)], epochs=2)
    assert not [record for record in caplog.records if record.name == "deadneuron.keras"]


def test_a_tf_data_probe_gives_the_same_figures() -> None:
    dataset = tf.data.Dataset.from_tensor_slices(PROBE).batch(50)
    from_array, from_dataset = DeadNeuronCallback(PROBE), DeadNeuronCallback(dataset)
    fit(build(HIGH_LR), [from_array, from_dataset], epochs=2)
    for epoch in (0, 1):
        assert from_array.reports[epoch].to_dict()["totals"] == from_dataset.reports[epoch].to_dict()["totals"]


def test_an_infinite_probe_is_refused() -> None:
    dataset = tf.data.Dataset.from_tensor_slices(PROBE).batch(32).repeat()
    with pytest.raises(DeadNeuronError, match="infinite"):
        fit(build(LOW_LR), [DeadNeuronCallback(dataset)], epochs=1)


def test_without_gradients_there_is_no_grad_dead_key() -> None:
    history = fit(build(LOW_LR), [DeadNeuronCallback(PROBE[0], loss="none")], epochs=1).history
    assert "grad_dead_fraction" not in history
    assert history["dead_fraction"] == [len(PINNED) / 48]


def test_probe_without_labels_uses_the_random_cotangent() -> None:
    callback = DeadNeuronCallback(PROBE[0])
    history = fit(build(LOW_LR), [callback], epochs=1).history
    assert callback.reports[0].loss == "probe"
    assert history["grad_dead_fraction"] == [len(PINNED) / 48]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs must be an integer >= 1"),
        ({"every_n_epochs": 1.5}, "every_n_epochs must be an integer >= 1"),
        ({"loss": "xent"}, "unknown loss 'xent'; expected one of auto, ce, mse, model, probe, none"),
        ({"alert": 1.5}, r"expected a number in \[0, 1\)"),
        ({"atol": -1.0}, "atol must be a finite number >= 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ],
)
def test_bad_options_are_refused_at_construction(options: dict, match: str) -> None:
    with pytest.raises(DeadNeuronError, match=match):
        DeadNeuronCallback(PROBE, **options)


def test_a_missing_probe_is_refused() -> None:
    with pytest.raises(DeadNeuronError, match="needs a probe"):
        DeadNeuronCallback(None)


MIRRORED = textwrap.dedent(
    """
    import json, os, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    import deadneuron
    from deadneuron.keras import DeadNeuronCallback

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = rng.integers(0, 3, 256)
    probe = (x[:96], y[:96])

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(32, activation="relu", name="hidden"),
            keras.layers.Dense(16, activation="relu", name="hidden2"),
            keras.layers.Dense(3, name="logits"),
        ])
        model.compile(keras.optimizers.SGD(3.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        kernel, bias = model.get_layer("hidden").get_weights()
        kernel[:, :3], bias[:3] = 0.0, -1.0  # dead, and no gradient can revive them
        model.get_layer("hidden").set_weights([kernel, bias])
        return model

    class KeepWeights(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.weights = {}
        def on_epoch_end(self, epoch, logs=None):
            self.weights[epoch] = self.model.get_weights()

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = {"replicas": strategy.num_replicas_in_sync, "runs": {}}
    for where in ("fit outside scope", "fit inside scope"):
        with strategy.scope():
            model = build()
        callback, kept = DeadNeuronCallback(probe, per_site=True), KeepWeights()
        keras.utils.set_random_seed(0)
        if where == "fit inside scope":
            with strategy.scope():
                history = model.fit(x, y, epochs=2, batch_size=64, callbacks=[callback, kept], verbose=0)
        else:
            history = model.fit(x, y, epochs=2, batch_size=64, callbacks=[callback, kept], verbose=0)
        single = []
        for epoch in (0, 1):
            twin = build()  # one device, no strategy
            twin.set_weights(kept.weights[epoch])
            single.append(deadneuron.scan(twin, probe).to_dict())
        result["runs"][where] = {
            "mirrored": [callback.reports[epoch].to_dict() for epoch in (0, 1)],
            "single": single,
            "history": {k: v for k, v in history.history.items() if k != "loss"},
            "variable": type(model.weights[0].value).__name__,
        }
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.slow
def test_mirrored_strategy_equals_one_device() -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["replicas"] == 2
    for where, run in result["runs"].items():
        assert "Mirrored" in run["variable"], where  # the weights really were distributed
        assert run["mirrored"] == run["single"], where
        for epoch, report in enumerate(run["single"]):
            assert run["history"]["dead_fraction"][epoch] == report["totals"]["dead_fraction"], where
            assert run["history"]["grad_dead_fraction"][epoch] == report["totals"]["grad_dead_fraction"], where
        assert run["mirrored"][0]["layers"][0]["dead_units"][:3] == [0, 1, 2], where  # not trivially zero


@pytest.mark.slow
def test_the_example_runs() -> None:
    pytest.importorskip("sklearn")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "keras_callback.py")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "history keys: accuracy, dead_fraction, dead_fraction/hidden1, dead_fraction/hidden2, dormant_fraction, " \
        "grad_dead_fraction, loss" in done.stdout
    assert "CSV columns:  epoch,accuracy,dead_fraction," in done.stdout


def test_each_epoch_reuses_the_first_traced_step_and_reports_a_fresh_scan() -> None:
    """The probe loss draws its cotangents from the seed: a kept step must restart that stream and zero its
    statistics, or later epochs would differ from a fresh scan (grad_abs_sum, grad_nonzero)."""
    model = build(HIGH_LR)
    callback, kept = DeadNeuronCallback(PROBE[0]), KeepWeights()
    seen: list[int] = []

    class Count(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seen.append(len(callback._steps.watches))

    fit(model, [callback, kept, Count()])
    assert seen == [1, 1, 1]  # one step, traced at the first epoch, run at every epoch
    for epoch, weights in kept.weights.items():
        twin = build(HIGH_LR)
        twin.set_weights(weights)
        fresh = deadneuron.scan(twin, PROBE[0])
        assert callback.reports[epoch].to_dict() == fresh.to_dict()
        for a, b in zip(callback.reports[epoch].layers, fresh.layers, strict=True):
            for name, value in vars(b.stats).items():
                np.testing.assert_array_equal(getattr(a.stats, name), value, err_msg=f"{epoch} {b.name} {name}")
    assert callback._steps.watches == {}  # let go when training ends


def test_a_model_edited_between_two_fits_is_scanned_as_it_is_now() -> None:
    model = build(LOW_LR)
    callback = DeadNeuronCallback(PROBE)
    fit(model, [callback], epochs=1)
    assert callback.reports[0].layer("hidden2").kind == "relu"
    model.get_layer("hidden2").activation = keras.activations.leaky_relu
    model.compile(keras.optimizers.SGD(LOW_LR), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fit(model, [callback], epochs=1)
    assert callback.reports[0].layer("hidden2").kind == "leaky_relu"
    assert callback.reports[0].to_dict() == deadneuron.scan(model, PROBE).to_dict()
