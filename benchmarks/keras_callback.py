"""What `DeadNeuronCallback` costs a Keras `fit`, with each epoch's scan reusing the step the first one traced
(the default) and with a step traced afresh for every scan (as before session 5).

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/keras_callback.py [--epochs 6] [--rounds 5]

Model: a small CNN (two 3x3 convolutions, 16 and 32 channels, a 64-unit dense layer, 10 logits) on scikit-learn's
bundled digits (1,797 images of 8x8), Adam, batch 64; the callback scans a 256-sample labelled probe after every
epoch. Per round, three fits of a freshly built model alternate: without the callback, with it, and with it but no
step kept between epochs. Printed: the median wall time of each over the rounds, and the callback's extra time
per epoch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import nullcontext

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from deadneuron.keras import DeadNeuronCallback  # noqa: E402


def build() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    digits = load_digits()
    x, y = (digits.images[..., None] / 16).astype("float32"), digits.target
    probe = (x[:256], y[:256])

    def fit(variant: str) -> float:
        model = build()
        callbacks = []
        if variant != "plain":
            callback = DeadNeuronCallback(probe, verbose=0)
            if variant == "fresh step":
                callback._steps.active = nullcontext  # no step kept: each scan traces its own
            callbacks.append(callback)
        start = time.perf_counter()
        model.fit(x, y, epochs=args.epochs, batch_size=64, verbose=0, callbacks=callbacks)
        return time.perf_counter() - start

    variants = ["plain", "callback", "fresh step"]
    fit("callback")  # warm up the runtime
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % 3 :] + variants[: r % 3]:
            times[v].append(fit(v))
    median = {v: statistics.median(t) for v, t in times.items()}
    print(
        f"keras {keras.__version__}, {os.cpu_count()} CPUs; digits CNN, {args.epochs} epochs of {len(x)} images, "
        f"probe of 256 scanned after each; median of {args.rounds} rounds (wall clock)"
    )
    print()
    print("| fit | seconds | vs plain | callback per epoch (s) |")
    print("| --- | --- | --- | --- |")
    for v in variants:
        extra = (median[v] - median["plain"]) / args.epochs
        print(f"| {v} | {median[v]:.2f} | {median[v] / median['plain']:.2f}x | {extra:.3f} |")
    print(f"\nper-round times: { {v: [round(t, 2) for t in ts] for v, ts in times.items()} }")


if __name__ == "__main__":
    main()
