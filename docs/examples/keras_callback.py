"""Watch units die while a Keras model trains: DeadNeuronCallback on sklearn's digits.

Run: python docs/examples/keras_callback.py   (needs tensorflow and scikit-learn; a few seconds on a laptop CPU)

The learning rate is deliberately too high, so some ReLU units die within a few epochs. The callback comes first
in `callbacks=[...]`: keys it writes into `logs` reach only the callbacks after it (and History).
"""

from __future__ import annotations

import logging
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from deadneuron.keras import DeadNeuronCallback  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # shows the callback's INFO lines
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu", name="hidden1"),
            keras.layers.Dense(32, activation="relu", name="hidden2"),
            keras.layers.Dense(10, name="logits"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.5),  # too high on purpose
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    probe = (x[:256], y[:256])  # a fixed probe batch, scanned at the end of every epoch
    monitor = DeadNeuronCallback(probe, per_site=True, alert=0.2)
    with tempfile.TemporaryDirectory() as folder:
        csv_path = os.path.join(folder, "training.csv")
        history = model.fit(
            x, y, epochs=3, batch_size=32, verbose=0,
            callbacks=[monitor, keras.callbacks.CSVLogger(csv_path)],  # the callback first
        )
        with open(csv_path) as file:
            header = file.readline().strip()

    print("history keys:", ", ".join(sorted(history.history)))
    print("CSV columns: ", header)
    for epoch, value in enumerate(history.history["dead_fraction"]):
        print(f"epoch {epoch + 1}: dead_fraction={value:.3f}  grad_dead_fraction="
              f"{history.history['grad_dead_fraction'][epoch]:.3f}")
    report = monitor.last_report
    assert report is not None
    print()
    print(report)  # the same Report as deadneuron.scan(model, probe)
    print("probe accuracy:", float(np.mean(np.argmax(model.predict(probe[0], verbose=0), -1) == probe[1])))


if __name__ == "__main__":
    main()
