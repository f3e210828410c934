"""A LeNet-5 training step with ReLU and with SineReLU, default settings, in PyTorch and in Keras, side by side.

The article (Rodrigues, 2018) trained LeNet-5 with SineReLU in 4h15 against 3h45 with ReLU (1.13x). This measures
the same question on this machine for one optimizer step: LeNet-5 (conv 6@5x5 'same', pool, conv 16@5x5, pool, 120,
84, 10; ReLU after each conv and hidden dense layer) on 28x28 inputs, SGD with momentum, cross-entropy; the SineReLU
model is `deadneuron.swap` of the ReLU one (epsilon 0.0025 after convolutions, 0.025 after dense layers), called
with no other setting: what a user gets by default.

- PyTorch: eager `loss.backward(); optimizer.step()`. Columns: ReLU, SineReLU by default (the fused loops when the
  install built them, `deadneuron/torch/fused.py`), the eager fallback (`kernels.suspended()`) for reference, and,
  where the loops use their own float32 sine, the same loops with libmvec's (`fused.use_sine("libmvec")`).
- Keras (TensorFlow backend, in a child process): `model.train_on_batch` after `model.compile(...)` with Keras's
  default `jit_compile="auto"` (Keras turns XLA off on a CPU-only machine: the step is a TF graph without XLA, in
  which SineReLU's conv activations run its own small XLA-compiled loops, `deadneuron/keras/fused.py`), and the
  same models compiled with `jit_compile=True` (XLA) as a second pair.

Steps run interleaved, one step of each variant per round, after warm-up. Per round the SineReLU step is divided by
the ReLU step of the same round; the table shows the median of those paired ratios and their interquartile range
(min-max would mostly show the other processes on a shared machine), and the median step times.

    python benchmarks/train_step.py                  # batch 32 and 128, 41 rounds, both frameworks
    python benchmarks/train_step.py --clock cpu      # CPU time on one thread: steadier on a shared machine
    python benchmarks/train_step.py --rounds 11 --batches 32   # quicker
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

Step = Callable[[], object]
TARGET = 1.13  # the article's ratio (issue 15's target)


# "wall": the wall clock, the frameworks' default thread counts (what a user gets). "cpu": the process's CPU time with
# one thread per framework pool: what the step costs in work, which other processes on a shared machine barely
# disturb (they stretch the wall clock of a multithreaded step, above all OpenMP's barriers, by 2x-10x here).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(steps: dict[str, Step], rounds: int, clock: str, warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds of every step in every round; each round runs each step once, in the given order."""
    now = CLOCKS[clock]
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            begin = now()
            step()
            times[name].append((now() - begin) * 1e3)
    return times


def paired(times: dict[str, list[float]], name: str, base: str) -> str:
    """Median of the per-round ratios name/base, with their interquartile range."""
    ratios = np.array(times[name]) / np.array(times[base])
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    return f"{median:.2f}x ({q1:.2f}-{q3:.2f})"


def median_ms(times: dict[str, list[float]], name: str) -> str:
    return f"{statistics.median(times[name]):.2f}"


# PyTorch ------------------------------------------------------------------------------------------------------------


def torch_lenet5():  # noqa: ANN201 - torch is imported by the framework that runs
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def torch_step(model, x, y, eager: bool = False, sine: str | None = None) -> Step:  # noqa: ANN001
    """One SGD step; `eager`: inside kernels.suspended(); `sine`: the fused loops' float32 sine for this step
    (fused.use_sine), restored after it."""
    import torch
    from torch import nn

    from deadneuron.torch import fused
    from deadneuron.torch.kernels import suspended

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if eager:
            with suspended():
                nn.functional.cross_entropy(model(x), y).backward()
        elif sine is not None:
            before = fused.use_sine(sine)
            try:
                nn.functional.cross_entropy(model(x), y).backward()
            finally:
                fused.use_sine(before)
        else:
            nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def run_torch(batches: list[int], rounds: int, clock: str) -> None:
    import torch

    import deadneuron
    from deadneuron.torch import fused

    if clock == "cpu":
        torch.set_num_threads(1)
    print(
        f"PyTorch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, fused loops "
        f"built: {fused.available()}; {clock} clock, median of {rounds} interleaved steps"
    )
    print()
    # The fused loops with libmvec's sine instead of their own (where the CPU has one): what the own sine saves, in the
    # same run.
    own = fused.available() and fused.use_sine() != "libmvec"
    libmvec = " | libmvec sine ms | libmvec sine / ReLU (IQR)" if own else ""
    print(
        "| batch | ReLU step ms | SineReLU step ms | SineReLU / ReLU (IQR) | eager fallback ms "
        f"| eager fallback / ReLU (IQR){libmvec} |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if own else ""))
    for batch in batches:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        torch.manual_seed(0)
        relu = torch_lenet5()
        swapped = deadneuron.swap(relu)
        times = interleaved(
            {
                "relu": torch_step(copy.deepcopy(relu), x, y),
                "sinerelu": torch_step(copy.deepcopy(swapped), x, y),
                "eager": torch_step(copy.deepcopy(swapped), x, y, eager=True),
                **({"libmvec": torch_step(copy.deepcopy(swapped), x, y, sine="libmvec")} if own else {}),
            },
            rounds,
            clock,
        )
        extra = f" {median_ms(times, 'libmvec')} | {paired(times, 'libmvec', 'relu')} |" if own else ""
        print(
            f"| {batch} | {median_ms(times, 'relu')} | {median_ms(times, 'sinerelu')} | "
            f"{paired(times, 'sinerelu', 'relu')} | {median_ms(times, 'eager')} | {paired(times, 'eager', 'relu')} |"
            + extra,
            flush=True,
        )


# Keras --------------------------------------------------------------------------------------------------------------


def keras_lenet5():  # noqa: ANN201
    import keras

    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(6, 5, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 5, activation="relu"), keras.layers.MaxPooling2D(),
            keras.layers.Flatten(), keras.layers.Dense(120, activation="relu"),
            keras.layers.Dense(84, activation="relu"), keras.layers.Dense(10),
        ]
    )


def keras_step(model, x, y, jit_compile: object) -> Step:  # noqa: ANN001
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return lambda: model.train_on_batch(x, y)


CLOCKS_HELP = "wall: wall clock, default threads (default); cpu: process CPU time, one thread per pool"
JIT_SETTINGS = {"auto": "auto", "True": True, "False": False}


def run_keras(batches: list[int], rounds: int, settings: list[str], clock: str) -> None:
    import keras
    import tensorflow as tf

    import deadneuron

    if clock == "cpu":
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)

    gpus = tf.config.list_logical_devices("GPU")
    print(
        f"Keras {keras.__version__}, TensorFlow {tf.__version__}, backend {keras.backend.backend()}, on "
        f"{'GPU ' + gpus[0].name if gpus else 'CPU'}; {clock} clock"
        f"{' (one intra-op and one inter-op thread)' if clock == 'cpu' else ''}, median of {rounds} interleaved "
        "train_on_batch steps"
    )
    print()
    print(
        "| batch | compile | XLA in use | ReLU step ms | SineReLU step ms | SineReLU / ReLU (IQR) |"
    )
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    for batch in batches:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, 28, 28, 1)).astype("float32")
        y = rng.integers(0, 10, batch)
        keras.utils.set_random_seed(0)
        relu = keras_lenet5()
        swapped = deadneuron.swap(relu)
        steps: dict[str, Step] = {}
        xla: dict[str, bool] = {}
        for setting in settings:
            for name, model in (("relu", relu), ("sinerelu", swapped)):
                clone = keras.models.clone_model(model)
                clone.set_weights(model.get_weights())
                steps[f"{name}/{setting}"] = keras_step(clone, x, y, JIT_SETTINGS[setting])
                xla[setting] = bool(clone.jit_compile)
        times = interleaved(steps, rounds, clock)
        for setting in settings:
            label = '"auto" (default)' if setting == "auto" else setting
            print(
                f"| {batch} | jit_compile={label} | {xla[setting]} | {median_ms(times, f'relu/{setting}')} | "
                f"{median_ms(times, f'sinerelu/{setting}')} | "
                f"{paired(times, f'sinerelu/{setting}', f'relu/{setting}')} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--batches", type=int, nargs="*", default=[32, 128])
    parser.add_argument("--framework", choices=["both", "torch", "keras"], default="both")
    parser.add_argument(
        "--keras-jit", nargs="*", choices=list(JIT_SETTINGS), default=["auto", "True"],
        help="Keras compile(jit_compile=...) settings to measure (default: Keras's default 'auto', and XLA)",
    )
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help=CLOCKS_HELP)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; target SineReLU/ReLU <= {TARGET}x")
    print()
    if args.framework in ("both", "torch"):
        run_torch(args.batches, args.rounds, args.clock)
        print()
    if args.framework == "keras":
        run_keras(args.batches, args.rounds, args.keras_jit, args.clock)
    elif args.framework == "both":
        # A child process: TensorFlow's and torch's thread pools in one process would share the two cores unfairly.
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
        command = [sys.executable, __file__, "--framework", "keras", "--rounds", str(args.rounds), "--clock",
                   args.clock, "--keras-jit", *args.keras_jit, "--batches", *map(str, args.batches)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        print("\n".join(result.stdout.splitlines()[2:-1]))  # without the child's first and last lines (load)
        if result.returncode != 0:
            print(f"(Keras half failed, exit code {result.returncode}:)\n{result.stderr[-2000:]}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
