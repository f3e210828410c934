"""Benchmark SineReLU on Keras/TensorFlow: forward, and forward+backward under tf.GradientTape.

Compares `deadneuron.keras.sinerelu` with tf.nn.relu and with keras-contrib's formula
max(eps*(sin z - cos z), z) written as plain TensorFlow ops (what a keras-contrib model runs, with
TensorFlow's own gradients), and shows the backend-neutral keras.ops kernel that other backends use. Each
run times every variant in turn (interleaved, so that load from other processes hits all of them alike);
the table shows medians. Prints Markdown for docs/benchmarks.md.

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/sinerelu_keras.py          # 16M and 64K elements, 9 runs
    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/sinerelu_keras.py --quick  # 1M and 64K, 3 runs: a smoke test
    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/sinerelu_keras.py --graph  # each variant inside a tf.function

With --graph every variant runs inside a tf.function without XLA, as in a Keras train step: deadneuron's piecewise
form then takes its fused XLA loops (deadneuron/keras/fused.py), and one more row shows it with them turned off.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from timing import Step, measure  # noqa: E402  (benchmarks/timing.py)

from deadneuron.keras import fused, sinerelu  # noqa: E402
from deadneuron.keras.sinerelu import GRAPH_MIN_ELEMENTS, _generic_kernel  # noqa: E402

EPSILON = 0.0025


def keras_contrib_formula(z: tf.Tensor) -> tf.Tensor:
    # keras_contrib.layers.SineReLU.call, two transcendentals and TensorFlow's own gradients.
    return tf.maximum(EPSILON * (tf.sin(z) - tf.cos(z)), z)


def ours(z: tf.Tensor) -> tf.Tensor:
    return sinerelu(z, EPSILON)


OURS = "deadneuron sinerelu (piecewise)"
CONTRIB = "keras-contrib max(eps*(sin-cos), z)"
VARIANTS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "tf.nn.relu": tf.nn.relu,
    CONTRIB: keras_contrib_formula,
    OURS: ours,
    "deadneuron sinerelu (max, keras-contrib's form)": lambda z: sinerelu(z, EPSILON, "max"),
    # The kernel the torch and JAX backends get; on TensorFlow, `sinerelu` uses the faster one above.
    "deadneuron keras.ops kernel (other backends)": _generic_kernel(EPSILON, "piecewise"),
}


def forward_step(fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor) -> Step:
    return lambda: fn(x)


def forward_backward_step(fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, upstream: tf.Tensor) -> Step:
    def step() -> object:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return tape.gradient(y, x, output_gradients=upstream)

    return step


PLAIN = "deadneuron sinerelu (piecewise), fused loops off"


def graph_step(step: Step, plain: bool) -> Step:
    """`step` as a tf.function, traced now (with the fused loops off when `plain`)."""
    function = tf.function(step, autograph=False)
    fused.set_enabled(not plain)
    try:
        function()
    finally:
        fused.set_enabled(True)
    return function


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M and 64K elements, 3 runs (a smoke test)")
    parser.add_argument("--graph", action="store_true", help="each variant inside a tf.function (no XLA around it)")
    parser.add_argument("--runs", type=int, default=None, help="interleaved runs per measurement (default 9)")
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 9)
    sizes = [1 << 20, 1 << 16] if args.quick else [1 << 24, 1 << 16]

    rng = np.random.default_rng(0)
    print(
        f"TensorFlow {tf.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"intra-op threads {tf.config.threading.get_intra_op_parallelism_threads() or 'default'}; float32, "
        f"epsilon {EPSILON}, median of {runs} interleaved runs"
    )
    variants = dict(VARIANTS)
    if args.graph:
        variants[PLAIN] = ours
        print(
            "Graph mode: every variant inside a tf.function without XLA; deadneuron's piecewise form on float32 "
            f"from {fused.MIN_ELEMENTS} elements runs one XLA-compiled loop per direction (fused.py)."
        )
    else:
        print(
            "XLA: not used (jit_compile=False). tf.function: deadneuron's eager calls on >= "
            f"{GRAPH_MIN_ELEMENTS} elements run each pass as a graph (tf.function without XLA); smaller "
            "ones, and every other variant, run as eager ops."
        )
    print()
    print("| elements | variant | forward ms | forward+backward ms | fwd+bwd vs tf.nn.relu |")
    print("| ---: | --- | ---: | ---: | ---: |")
    summary = []
    for size in sizes:
        x = tf.constant(rng.standard_normal(size, dtype=np.float32))
        upstream = tf.constant(rng.standard_normal(size, dtype=np.float32))
        steps: dict[str, Step] = {}
        for name, fn in variants.items():
            steps[f"{name}/forward"] = forward_step(fn, x)
            steps[f"{name}/forward+backward"] = forward_backward_step(fn, x, upstream)
            if args.graph:
                for key in (f"{name}/forward", f"{name}/forward+backward"):
                    steps[key] = graph_step(steps[key], plain=name == PLAIN)
        for step in steps.values():
            step()  # warm-up: traces graphs, faults in the allocator's pages
        target_s = 0.02 if size < GRAPH_MIN_ELEMENTS else 0.0
        result = measure(steps, runs, target_s)
        relu_fb = result["tf.nn.relu/forward+backward"]
        for name in variants:
            fwd, fb = result[f"{name}/forward"], result[f"{name}/forward+backward"]
            print(f"| {size:,} | {name} | {fwd:.3f} | {fb:.3f} | {fb / relu_fb:.2f}x |")
        fwd, fb = result[f"{OURS}/forward"], result[f"{OURS}/forward+backward"]
        summary.append(
            f"{size:,} elements: keras-contrib formula / deadneuron = "
            f"{result[f'{CONTRIB}/forward'] / fwd:.2f}x forward, "
            f"{result[f'{CONTRIB}/forward+backward'] / fb:.2f}x forward+backward; "
            f"deadneuron / tf.nn.relu = {fwd / result['tf.nn.relu/forward']:.2f}x forward, "
            f"{fb / relu_fb:.2f}x forward+backward"
        )
    print()
    for line in summary:
        print(f"- {line}")


if __name__ == "__main__":
    main()
