"""Keras scan cost against a plain forward+backward, and memory against the number of samples.

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/scan_keras.py [--samples 4096] [--batch-size 128] [--repeats 3]

Baseline: a `tf.function` step that runs the model under a GradientTape, takes the probe loss sum(v * f(x)) with
v ~ N(0, I) drawn in the graph, and computes the gradient of every trainable weight: what one training step costs
without the optimizer. The scan: `deadneuron.scan(model, x)` with the probe loss, over the same batches.
Best of `--repeats`. "steady": the scan from the end of its first batch to the end of its last, against the
baseline's warm step over as many batches. "whole": the scan call as a user sees it (survey, one eager discovery
pass on two samples, tracing its step, all batches), against a freshly made baseline step, tracing included.

Memory: peak resident memory (VmHWM) after scans of growing sample counts drawn batch by batch (`samples=N`, no data
held), in one process; flat means the scan keeps O(units) state whatever N is.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import deadneuron  # noqa: E402


def cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same")(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(128, activation="relu")(x)
    outputs = layers.Dense(10)(x)
    return keras.Model(inputs, outputs, name="cnn")


def mlp() -> keras.Model:
    keras.utils.set_random_seed(0)
    layers = keras.layers
    return keras.Sequential(
        [keras.Input((784,)), layers.Dense(512, activation="relu"), layers.Dense(256), layers.ReLU(),
         layers.Dense(128, activation="relu"), layers.Dense(10)],
        name="mlp",
    )


def baseline_step(model: keras.Model):
    @tf.function(reduce_retracing=True)
    def step(x):
        with tf.GradientTape() as tape:
            out = model(x, training=False)
            loss = tf.reduce_sum(out * tf.random.normal(tf.shape(out)))
        return tape.gradient(loss, model.trainable_weights)

    return step


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def best(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return min(a[0], b[0]), min(a[1], b[1])


INF = (float("inf"), float("inf"))


def run_baseline(step, batches) -> tuple[float, float]:
    start = clock()
    for batch in batches:
        grads = step(batch)
    _ = grads[0].numpy()
    return since(start)


def run_scan(model: keras.Model, x: np.ndarray, batch_size: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(whole call, steady window): the window runs from the end of the first batch to the end of the last."""
    marks: list[tuple[float, float]] = []
    start = clock()
    deadneuron.scan(model, x, batch_size=batch_size, progress=lambda n: marks.append(clock()))
    whole = since(start)
    return whole, (marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1])


def compare(model: keras.Model, x: np.ndarray, batch_size: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU) seconds of each, the baseline and the scan interleaved so that load hits both alike."""
    batches = [tf.constant(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    run_baseline(baseline_step(model), batches)  # warm up the runtime
    deadneuron.scan(model, x, batch_size=batch_size)
    times = {"cold": INF, "warm": INF, "whole": INF, "steady": INF}
    for _ in range(repeats):
        step = baseline_step(model)
        times["cold"] = best(times["cold"], run_baseline(step, batches))
        times["warm"] = best(times["warm"], run_baseline(step, batches))
        whole, steady = run_scan(model, x, batch_size)
        times["whole"] = best(times["whole"], whole)
        times["steady"] = best(times["steady"], steady)
    # the steady window spans one batch fewer than a baseline run: scale the baseline to the same batch count
    n = len(batches)
    times["warm_window"] = (times["warm"][0] * (n - 1) / n, times["warm"][1] * (n - 1) / n)
    return times


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", type=int, nargs="*", default=[2048, 8192, 32768])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"keras {keras.__version__}, tensorflow {tf.__version__}, {os.cpu_count()} CPUs; "
          f"{args.samples} samples, batch {args.batch_size}, best of {args.repeats}")
    print("Seconds as wall / CPU (process time, all threads); ratios on CPU time, which load from other processes "
          "disturbs least.")
    print()
    print("| model | fwd+bwd, warm | fwd+bwd incl. tracing | scan, steady | scan, whole call | steady / warm | "
          "whole / incl. tracing |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for build, shape in ((mlp, (784,)), (cnn, (32, 32, 3))):
        model = build()
        x = rng.standard_normal((args.samples, *shape), dtype=np.float32)
        t = compare(model, x, args.batch_size, args.repeats)

        def show(key: str, t: dict[str, tuple[float, float]] = t) -> str:
            return f"{t[key][0]:.2f} / {t[key][1]:.2f}"

        print(f"| {model.name} | {show('warm')} | {show('cold')} | {show('steady')} | {show('whole')} | "
              f"{t['steady'][1] / t['warm_window'][1]:.2f}x | {t['whole'][1] / t['cold'][1]:.2f}x |")
    model = cnn()
    print()
    print("| samples (cnn, random inputs) | peak RSS after the scan (MiB) |")
    print("| --- | --- |")
    print(f"| before | {peak_rss_mib():.0f} |")
    for n in args.memory:
        deadneuron.scan(model, samples=n, batch_size=args.batch_size)
        print(f"| {n} | {peak_rss_mib():.0f} |")


if __name__ == "__main__":
    main()
