"""Benchmark SineReLU on PyTorch (CPU): forward, forward+backward, and what each variant saves for backward.

Variants: torch.relu (the floor), `deadneuron.torch.sinerelu` by default (both forms: the fused loops when the
install built them, deadneuron/torch/fused.py) and its eager fallback (`kernels.suspended()`), the naive composition
`torch.where(x > 0, x, eps*(sin x - cos x))`, and keras-contrib's `max(eps*(sin x - cos x), x)` written as
torch ops with autograd's own backward. Every round times each variant once (interleaved, so that load from
other processes on a shared machine hits all of them alike); the table shows medians over rounds. Forward runs
under torch.no_grad (inference); forward+backward runs the forward with a leaf that requires grad and then
torch.autograd.grad with a fixed upstream gradient. Prints Markdown for docs/benchmarks.md, then runs
benchmarks/sinerelu_keras.py (the Keras half) when it exists, passing --quick on.

    python benchmarks/sinerelu.py            # 16M, 256K and 64K float32 elements, 9 rounds
    python benchmarks/sinerelu.py --quick    # 1M and 64K, 3 rounds: a smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timing import Step, measure  # benchmarks/timing.py: run as `python benchmarks/...`

from deadneuron.torch import fused, sinerelu
from deadneuron.torch.kernels import suspended

EPSILON = 0.0025
Activation = Callable[[torch.Tensor], torch.Tensor]


def naive_where(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, EPSILON * (torch.sin(x) - torch.cos(x)))


def default(x: torch.Tensor, form: str = "piecewise") -> torch.Tensor:
    return sinerelu(x, EPSILON, form=form)  # type: ignore[arg-type]


def eager(x: torch.Tensor) -> torch.Tensor:
    with suspended():  # the fallback where the fused loops were not built
        return sinerelu(x, EPSILON)


def keras_contrib_max(x: torch.Tensor) -> torch.Tensor:
    # keras_contrib.layers.SineReLU.call in torch ops: two transcendentals, autograd's gradients.
    return torch.maximum(EPSILON * (torch.sin(x) - torch.cos(x)), x)


RELU = "torch.relu"
OURS = "deadneuron sinerelu (piecewise)"
EAGER = "deadneuron sinerelu (piecewise, eager fallback)"
NAIVE = "naive where(x > 0, x, eps*(sin - cos))"
CONTRIB = "keras-contrib max(eps*(sin - cos), x)"
VARIANTS: dict[str, Activation] = {
    RELU: torch.relu,
    OURS: default,
    "deadneuron sinerelu (form='max')": lambda x: default(x, "max"),
    EAGER: eager,
    NAIVE: naive_where,
    CONTRIB: keras_contrib_max,
}


def forward_step(fn: Activation, x: torch.Tensor) -> Step:
    def step() -> object:
        with torch.no_grad():
            return fn(x)

    return step


def forward_backward_step(fn: Activation, x: torch.Tensor, upstream: torch.Tensor) -> Step:
    leaf = x.detach().requires_grad_()

    def step() -> object:
        (grad,) = torch.autograd.grad(fn(leaf), leaf, upstream)
        return grad

    return step


def saved_for_backward(fn: Activation, x: torch.Tensor) -> tuple[int, int]:
    """(tensors packed, bytes of the distinct storages they hold) by the autograd graph of one forward."""
    packed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t

    leaf = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(leaf)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in packed}
    return len(packed), sum(storages.values())


def run_keras_half(quick: bool) -> None:
    script = Path(__file__).with_name("sinerelu_keras.py")
    if not script.exists():
        print(f"\n({script.name} not found: Keras half skipped)")
        return
    print(f"\n## Keras half ({script.name})\n", flush=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, str(script), *(["--quick"] if quick else [])],
        env=env,
        capture_output=True,
        text=True,
    )
    print(result.stdout, end="")
    if result.returncode != 0:
        print(f"(exit code {result.returncode}; stderr tail:)\n{result.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M and 64K elements, 3 rounds (a smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9; --quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all CPUs)")
    parser.add_argument("--no-keras", action="store_true", help="skip benchmarks/sinerelu_keras.py")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="cpu: the process's CPU time on one thread (steadier on a busy machine); wall: the wall clock (default)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 9)
    sizes = [1 << 20, 1 << 16] if args.quick else [1 << 24, 1 << 18, 1 << 16]
    torch.set_num_threads(1 if args.clock == "cpu" else args.threads or os.cpu_count() or 1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch.set_num_threads({torch.get_num_threads()}), {args.clock} clock; float32 standard-normal input, "
        f"epsilon {EPSILON}; "
        f"median of {rounds} interleaved rounds; forward under no_grad, forward+backward via autograd.grad; "
        f"fused loops built: {fused.available()}; load average {os.getloadavg()[0]:.1f}"
    )
    print()
    print(
        "| elements | variant | forward ms | fwd vs relu | fwd+bwd ms | fwd+bwd vs relu "
        "| naive / this (fwd+bwd) | saved tensors | saved MB |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary: list[str] = []
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        x = torch.randn(size, generator=generator)
        upstream = torch.randn(size, generator=generator)
        steps: dict[str, Step] = {}
        for name, fn in VARIANTS.items():
            steps[f"{name}/fwd"] = forward_step(fn, x)
            steps[f"{name}/fb"] = forward_backward_step(fn, x, upstream)
        for step in steps.values():
            step()  # warm-up
        result = measure(steps, rounds, target_s=0.0 if size > 1 << 20 else 0.02, clock=clock)
        relu_f, relu_fb, naive_fb = result[f"{RELU}/fwd"], result[f"{RELU}/fb"], result[f"{NAIVE}/fb"]
        for name, fn in VARIANTS.items():
            fwd, fb = result[f"{name}/fwd"], result[f"{name}/fb"]
            count, nbytes = saved_for_backward(fn, x)
            print(
                f"| {size:,} | {name} | {fwd:.3f} | {fwd / relu_f:.2f}x | {fb:.3f} | {fb / relu_fb:.2f}x "
                f"| {naive_fb / fb:.2f}x | {count} | {nbytes / 2**20:.1f} |"
            )
        fwd, fb = result[f"{OURS}/fwd"], result[f"{OURS}/fb"]
        targeted = size == 1 << 24  # issue 2's targets are set on 16M elements
        relu_target, naive_target = (" (target <= 1.3x)", " (target >= 3x)") if targeted else ("", "")
        summary.append(
            f"{size:,} elements: deadneuron / torch.relu = {fwd / relu_f:.2f}x forward, {fb / relu_fb:.2f}x "
            f"forward+backward{relu_target}; naive / deadneuron = {result[f'{NAIVE}/fwd'] / fwd:.2f}x "
            f"forward, {naive_fb / fb:.2f}x forward+backward{naive_target}; keras-contrib / deadneuron = "
            f"{result[f'{CONTRIB}/fwd'] / fwd:.2f}x forward, "
            f"{result[f'{CONTRIB}/fb'] / fb:.2f}x forward+backward"
        )
        fwd, fb = result[f"{EAGER}/fwd"], result[f"{EAGER}/fb"]
        summary.append(
            f"{size:,} elements, eager fallback: deadneuron / torch.relu = {fwd / relu_f:.2f}x forward, "
            f"{fb / relu_fb:.2f}x forward+backward{relu_target}; naive / deadneuron = {naive_fb / fb:.2f}x "
            "forward+backward"
        )
    print()
    for line in summary:
        print(f"- {line}")
    if not args.no_keras:
        run_keras_half(args.quick)


if __name__ == "__main__":
    main()
