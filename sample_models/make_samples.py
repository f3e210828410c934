"""Train the sample models that `deadneuron demo` scans, deterministically.

Two small CNNs on scikit-learn's bundled digits (1,797 8x8 images), one in PyTorch and one in Keras, trained
the way dead ReLU units really arise: Adam at ten times its usual learning rate of 1e-3. Each still classifies
the held-out digits well, but a third of its ReLU units never fire on them.

    python sample_models/make_samples.py               # writes sample_models/ and deadneuron/samples/
    python sample_models/make_samples.py --out DIR     # writes DIR only (the regeneration test uses this)

The dead units are counted here with plain framework code (torch forward hooks, a Keras feature-extraction
model), independently of deadneuron, and written to expected.json: a unit (a channel of a conv map, a feature
of a dense layer) is dead when its ReLU output is exactly 0 at every position of every held-out sample.

Determinism: fixed seeds, one thread, deterministic algorithms (torch) and op determinism (TensorFlow). Two
runs on the same machine give the same numbers; another CPU (other SIMD kernels) could round differently.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Determinism wants one thread everywhere; set before numpy, torch or TensorFlow start their thread pools.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
PACKAGE_SAMPLES = HERE.parent / "deadneuron" / "samples"

SPLIT_SEED = 0
HELDOUT_FRACTION = 0.25

TORCH_SETTINGS: dict[str, Any] = {
    "seed": 1,
    "optimizer": "Adam",
    "lr": 0.01,
    "betas": [0.9, 0.999],
    "batch_size": 32,
    "epochs": 8,
    "init": "PyTorch default (Kaiming-uniform weights, uniform biases)",
}

KERAS_SETTINGS: dict[str, Any] = {
    "seed": 1,
    "optimizer": "Adam",
    "lr": 0.01,
    "beta_1": 0.9,
    "beta_2": 0.999,
    "batch_size": 32,
    "epochs": 8,
    "init": "Keras default (Glorot-uniform kernels, zero biases)",
}


def load_split() -> dict[str, np.ndarray]:
    """Digits scaled to [0, 1] (the raw pixels are 0..16), split 75/25 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # (N, 1, 8, 8), channels-first
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return {
        "x_train": np.ascontiguousarray(x_train), "y_train": y_train,
        "x_test": np.ascontiguousarray(x_test), "y_test": y_test,
    }


def dead_summary(layers: list[dict[str, Any]]) -> dict[str, Any]:
    units = sum(layer["units"] for layer in layers)
    dead = sum(layer["dead"] for layer in layers)
    return {"units": units, "dead": dead, "dead_fraction": round(dead / units, 4)}


def layer_entry(
    name: str, max_per_unit: np.ndarray, max_pre_per_unit: np.ndarray, unit_axis: int
) -> dict[str, Any]:
    """One ReLU site: per-unit maxima of its output and of its input over every position of every sample."""
    dead_units = [int(i) for i in np.flatnonzero(max_per_unit == 0.0)]
    alive = max_per_unit[max_per_unit > 0.0]
    dead_pre = max_pre_per_unit[max_per_unit == 0.0]
    return {
        "name": name,
        "kind": "relu",
        "units": int(max_per_unit.size),
        "unit_axis": unit_axis,
        "dead": len(dead_units),
        "dead_units": dead_units,
        "dead_fraction": round(len(dead_units) / max_per_unit.size, 4),
        # Margins against rounding flipping a unit on another CPU: the weakest live unit's largest output and
        # the largest pre-activation any dead unit reaches (both far from 0: the counts are robust).
        "min_alive_max_output": round(float(alive.min()), 4) if alive.size else None,
        "max_dead_pre_activation": round(float(dead_pre.max()), 4) if dead_pre.size else None,
    }


def torch_model() -> Any:
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.relu2 = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(32 * 4 * 4, 64)
            self.relu3 = nn.ReLU()
            self.fc2 = nn.Linear(64, 10)

        def forward(self, x: Any) -> Any:
            x = self.relu1(self.conv1(x))
            x = self.pool(self.relu2(self.conv2(x)))
            return self.fc2(self.relu3(self.fc1(self.flatten(x))))

    return DigitsCNN()


def torch_dead_layers(model: Any, x: np.ndarray) -> list[dict[str, Any]]:
    """Per-unit max of each ReLU's output over the held-out batch, by forward hooks (channels on axis 1)."""
    import torch
    from torch import nn

    maxima: dict[str, Any] = {}
    pre_maxima: dict[str, Any] = {}
    handles = []

    def unit_max(t: Any) -> Any:
        return t.detach().amax(dim=[d for d in range(t.dim()) if d != 1])

    def make_hooks(name: str) -> tuple[Any, Any]:
        def pre_hook(module: Any, inputs: Any) -> None:
            pre_maxima[name] = unit_max(inputs[0])

        def hook(module: Any, inputs: Any, output: Any) -> None:
            maxima[name] = unit_max(output)

        return pre_hook, hook

    try:
        for name, module in model.named_modules():
            if isinstance(module, nn.ReLU):
                pre_hook, hook = make_hooks(name)
                handles.append(module.register_forward_pre_hook(pre_hook))
                handles.append(module.register_forward_hook(hook))
        with torch.no_grad():
            model(torch.from_numpy(x))
    finally:
        for handle in handles:
            handle.remove()
    return [layer_entry(name, m.numpy(), pre_maxima[name].numpy(), 1) for name, m in maxima.items()]


def make_torch(data: dict[str, np.ndarray], out_dirs: list[Path]) -> dict[str, Any]:
    import torch
    from torch import nn

    s = TORCH_SETTINGS
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(s["seed"])
    model = torch_model()
    opt = torch.optim.Adam(model.parameters(), lr=s["lr"], betas=tuple(s["betas"]))
    loss_fn = nn.CrossEntropyLoss()
    x_train, y_train = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    shuffle = torch.Generator().manual_seed(s["seed"])
    model.train()
    for _ in range(s["epochs"]):
        order = torch.randperm(len(x_train), generator=shuffle)
        for start in range(0, len(order), s["batch_size"]):
            idx = order[start:start + s["batch_size"]]
            opt.zero_grad()
            loss_fn(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    model.eval()

    with torch.no_grad():
        logits = model(torch.from_numpy(data["x_test"]))
    accuracy = float((logits.argmax(1).numpy() == data["y_test"]).mean())
    layers = torch_dead_layers(model, data["x_test"])

    # Traced with a batch of 2 (a batch of 1 would specialise the batch dimension to 1), then stored with the
    # (1, 1, 8, 8) example input that tools read the input shape from; the program takes any batch size.
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: batch},))
    program.example_inputs = ((torch.zeros(1, 1, 8, 8),), {})
    first, *others = out_dirs
    torch.export.save(program, first / "digits_cnn.pt2")
    for out in others:
        shutil.copyfile(first / "digits_cnn.pt2", out / "digits_cnn.pt2")
    return {
        "file": "digits_cnn.pt2",
        "data": "digits_heldout.npz",
        "heldout_accuracy": round(accuracy, 4),
        "layers": layers,
        "totals": dead_summary(layers),
        "training": {**s, "loss": "cross-entropy", "train_samples": len(x_train)},
    }


def keras_model() -> Any:
    import keras

    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(64, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(10, name="fc2")(x)  # logits
    return keras.Model(inputs, outputs, name="digits_cnn")


KERAS_RELU_LAYERS = ("conv1", "conv2", "fc1")


def keras_dead_layers(model: Any, x: np.ndarray) -> list[dict[str, Any]]:
    """Per-unit max of each fused ReLU's output on the held-out batch, by a feature model (channels-last)."""
    import keras

    features = keras.Model(model.inputs[0], [model.get_layer(n).output for n in KERAS_RELU_LAYERS])
    outputs = features(x, training=False)
    # The pre-activations: each layer in turn with its fused ReLU switched off for one call.
    pre_outputs = []
    for i, name in enumerate(KERAS_RELU_LAYERS):
        layer = model.get_layer(name)
        try:
            layer.activation = keras.activations.linear
            pre_outputs.append(features(x, training=False)[i])
        finally:
            layer.activation = keras.activations.relu
    layers = []
    for name, out, pre in zip(KERAS_RELU_LAYERS, outputs, pre_outputs, strict=True):
        out, pre = np.asarray(out), np.asarray(pre)
        channels_last = tuple(range(out.ndim - 1))
        layers.append(layer_entry(name, out.max(axis=channels_last), pre.max(axis=channels_last), -1))
    return layers


def make_keras(data: dict[str, np.ndarray], out_dirs: list[Path]) -> dict[str, Any]:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    s = KERAS_SETTINGS
    keras.utils.set_random_seed(s["seed"])
    tf.config.experimental.enable_op_determinism()
    model = keras_model()
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=s["lr"], beta_1=s["beta_1"], beta_2=s["beta_2"]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x_train = data["x_train"].transpose(0, 2, 3, 1).copy()
    x_test = data["x_test"].transpose(0, 2, 3, 1).copy()
    model.fit(
        x_train, data["y_train"], batch_size=s["batch_size"], epochs=s["epochs"], shuffle=True, verbose=0
    )

    logits = np.asarray(model(x_test, training=False))
    accuracy = float((logits.argmax(1) == data["y_test"]).mean())
    layers = keras_dead_layers(model, x_test)
    # Saved as a fresh, uncompiled copy: no optimizer state in the file (the demo loads with compile=False).
    clean = keras_model()
    clean.set_weights(model.get_weights())
    first, *others = out_dirs
    clean.save(first / "digits_cnn.keras")
    for out in others:
        shutil.copyfile(first / "digits_cnn.keras", out / "digits_cnn.keras")
    return {
        "file": "digits_cnn.keras",
        "data": "digits_heldout_nhwc.npz",
        "heldout_accuracy": round(accuracy, 4),
        "layers": layers,
        "totals": dead_summary(layers),
        "training": {**s, "loss": "cross-entropy", "train_samples": len(x_train)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, action="append",
        help="folder to write into (repeatable); default: sample_models/ and deadneuron/samples/",
    )
    args = parser.parse_args(argv)
    out_dirs: list[Path] = args.out or [HERE, PACKAGE_SAMPLES]
    for out in out_dirs:
        out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    data = load_split()
    x_nhwc = data["x_test"].transpose(0, 2, 3, 1)
    for out in out_dirs:
        np.savez_compressed(out / "digits_heldout.npz", x=data["x_test"], y=data["y_test"])
        np.savez_compressed(out / "digits_heldout_nhwc.npz", x=x_nhwc, y=data["y_test"])

    results = {"torch": make_torch(data, out_dirs), "keras": make_keras(data, out_dirs)}
    expected = {
        "schema": "deadneuron.samples/1",
        "dataset": {
            "name": "sklearn.datasets.load_digits",
            "scaling": "pixels / 16 -> [0, 1]",
            "split": f"train_test_split(test_size={HELDOUT_FRACTION}, random_state={SPLIT_SEED}, stratify=y)",
            "heldout_samples": int(len(data["y_test"])),
        },
        "dead_definition": "ReLU output exactly 0 at every position of every held-out sample",
        **results,
    }
    text = json.dumps(expected, indent=2) + "\n"
    for out in out_dirs:
        (out / "expected.json").write_text(text)

    for framework, result in results.items():
        totals = result["totals"]
        print(f"{framework}: held-out accuracy {result['heldout_accuracy']:.3f}; "
              f"dead {totals['dead']}/{totals['units']} ({totals['dead_fraction']:.1%})")
        for layer in result["layers"]:
            print(f"  {layer['name']:<6} {layer['dead']:>3}/{layer['units']:<3} dead  {layer['dead_units']}")
    print(f"written to {', '.join(str(o) for o in out_dirs)} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
