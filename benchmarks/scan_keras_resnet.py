"""Keras ResNet50 scan against a plain traced forward+backward under GradientTape (issue 11).

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/scan_keras_resnet.py [--samples 256] [--batch-size 64] [--repeats 3]

Model: `keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)` (random init, nothing
downloaded; 49 ReLU sites, softmax head). Data: `--samples` standard-normal images, the same batches for both.

Baseline: a `tf.function` (made fresh each repeat, so its first call traces) that runs the model under a
GradientTape on one batch, takes the scan's probe loss sum(v * f(x)) with v ~ N(0, I) drawn in the graph, and
computes the gradient of every trainable weight: one training step without the optimizer. The scan:
`deadneuron.scan(model, x, batch_size=...)` with the probe loss (no labels), over the same batches.

Both are timed per call and split in two: "first" is the time to the end of the first batch (the baseline's
tracing and first step; the scan's survey, eager discovery pass on two samples, tracing and first step), "steady"
the rest (every later batch). Wall and process CPU time (all threads) are both printed; the verdict uses CPU time,
which other processes' load disturbs least. The baseline and the scan alternate within each repeat; the median of
the repeats is kept. The last row sets the whole scan call against the baseline's warm step over every batch (a
step traced beforehand): the strictest reading of the target.

`--grappler` adds a third contender to each repeat: the scan with TensorFlow's graph optimiser on, as before
`deadneuron/keras/graph.py` turned it off for the scan's step on CPU (the A/B behind that choice).
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from scan_keras import baseline_step, clock  # noqa: E402  (benchmarks/scan_keras.py: the same baseline step)

import deadneuron  # noqa: E402
from deadneuron.keras import graph  # noqa: E402

TARGET = 1.3
Times = dict[str, tuple[float, float]]  # "first"/"steady"/"whole" -> (wall, cpu) seconds


def resnet(classes: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=classes)


def split(start: tuple[float, float], marks: list[tuple[float, float]]) -> Times:
    """First batch (from `start`) and the steady rest (from the first mark to the last)."""
    first = (marks[0][0] - start[0], marks[0][1] - start[1])
    steady = (marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1])
    return {"first": first, "steady": steady, "whole": (first[0] + steady[0], first[1] + steady[1])}


def run_baseline(model: keras.Model, batches: list[tf.Tensor]) -> Times:
    start = clock()
    step = baseline_step(model)
    marks = []
    for batch in batches:
        grads = step(batch)
        _ = grads[-1].numpy()  # the step has finished: as the scan's progress callback marks a finished batch
        marks.append(clock())
    return split(start, marks)


def run_scan(model: keras.Model, x: np.ndarray, batch_size: int, grappler: bool = False) -> Times:
    marks: list[tuple[float, float]] = []
    graph.GRAPPLER_ON_CPU = grappler
    start = clock()
    try:
        deadneuron.scan(model, x, batch_size=batch_size, loss="probe", progress=lambda n: marks.append(clock()))
    finally:
        graph.GRAPPLER_ON_CPU = False
    end = clock()
    times = split(start, marks)
    times["whole"] = (end[0] - start[0], end[1] - start[1])  # the report is built after the last batch
    return times


def median(runs: list[Times]) -> Times:
    return {
        key: (statistics.median(r[key][0] for r in runs), statistics.median(r[key][1] for r in runs)) for key in runs[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--grappler", action="store_true", help="also time the scan with Grappler on (A/B)")
    args = parser.parse_args()
    model = resnet(args.classes)
    x = np.random.default_rng(0).standard_normal((args.samples, 64, 64, 3), dtype=np.float32)
    batches = [tf.constant(x[i : i + args.batch_size]) for i in range(0, len(x), args.batch_size)]
    print(
        f"keras {keras.__version__}, tensorflow {tf.__version__}, {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; ResNet50 64x64x3, {args.samples} images, batch "
        f"{args.batch_size} ({len(batches)} batches); median of {args.repeats} interleaved repeats"
    )
    run_baseline(model, batches)  # warm up the runtime and the weights
    deadneuron.scan(model, x[: args.batch_size], batch_size=args.batch_size, loss="probe")
    base: list[Times] = []
    scan: list[Times] = []
    with_grappler: list[Times] = []
    for _ in range(args.repeats):
        base.append(run_baseline(model, batches))
        scan.append(run_scan(model, x, args.batch_size))
        if args.grappler:
            with_grappler.append(run_scan(model, x, args.batch_size, grappler=True))
    b, s = median(base), median(scan)
    print("Seconds as wall / CPU (process time, all threads); ratios on CPU time (wall in brackets).")
    print()
    print("| part | fwd+bwd under GradientTape | scan | scan / fwd+bwd | target |")
    print("| --- | --- | --- | --- | --- |")
    labels = {"first": "first batch (tracing)", "steady": "later batches (steady)", "whole": "whole call"}
    for key, label in labels.items():
        target = f"<= {TARGET}" if key != "first" else ""
        print(
            f"| {label} | {b[key][0]:.2f} / {b[key][1]:.2f} | {s[key][0]:.2f} / {s[key][1]:.2f} | "
            f"{s[key][1] / b[key][1]:.2f}x ({s[key][0] / b[key][0]:.2f}x) | {target} |"
        )
    # the strictest reading: the whole scan call against a step that was traced before the batches came
    n = len(batches)
    warm = tuple(v * n / (n - 1) for v in b["steady"]) if n > 1 else b["whole"]
    print(
        f"| whole call against an already traced step ({n} batches) | {warm[0]:.2f} / {warm[1]:.2f} | "
        f"{s['whole'][0]:.2f} / {s['whole'][1]:.2f} | {s['whole'][1] / warm[1]:.2f}x "
        f"({s['whole'][0] / warm[0]:.2f}x) | |"
    )
    if with_grappler:
        g = median(with_grappler)
        print()
        print("| part | scan, Grappler on | scan (Grappler off on CPU) | off / on |")
        print("| --- | --- | --- | --- |")
        for key, label in labels.items():
            print(
                f"| {label} | {g[key][0]:.2f} / {g[key][1]:.2f} | {s[key][0]:.2f} / {s[key][1]:.2f} | "
                f"{s[key][1] / g[key][1]:.2f}x ({s[key][0] / g[key][0]:.2f}x) |"
            )
    print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
