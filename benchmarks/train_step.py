"""A LeNet-5 training step with ReLU, with SineReLU (eager) and with SineReLU after compile_kernels(), side by side.

The article (Rodrigues, 2018) trained LeNet-5 with SineReLU in 4h15 against 3h45 with ReLU (1.13x). This measures
the same question on this machine for one optimizer step: LeNet-5 (conv 6@5x5, pool, conv 16@5x5, pool, 120, 84,
10; ReLU after each conv and hidden dense layer) on 28x28 inputs, SGD with momentum, cross-entropy; the SineReLU
model is `deadneuron.swap` of the ReLU one (epsilon 0.0025 after convolutions, 0.025 after dense layers). Steps run
interleaved (one step of each variant per round), after warm-up; the table shows medians.

    python benchmarks/train_step.py                 # batch 128 and 512, 31 rounds
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

import deadneuron
from deadneuron.torch import compile_kernels
from deadneuron.torch.kernels import suspended


def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eager: bool):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if eager:
            with suspended():
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
        else:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--batches", type=int, nargs="*", default=[128, 512])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    status = compile_kernels()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch.set_num_threads({torch.get_num_threads()}); "
        f"LeNet-5 on 28x28 float32, SGD(momentum 0.9); median of {args.rounds} interleaved steps; "
        f"compile_kernels() took {time.perf_counter() - start:.1f} s ({status})"
    )
    print()
    print("| batch | ReLU step ms | SineReLU eager ms | SineReLU compiled ms | eager / ReLU | compiled / ReLU |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch in args.batches:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        torch.manual_seed(0)
        relu = lenet5()
        swapped = deadneuron.swap(relu)
        steps = {
            "relu": make_step(copy.deepcopy(relu), x, y, eager=False),
            "eager": make_step(copy.deepcopy(swapped), x, y, eager=True),
            "compiled": make_step(copy.deepcopy(swapped), x, y, eager=False),
        }
        times: dict[str, list[float]] = {name: [] for name in steps}
        for step in steps.values():
            for _ in range(3):
                step()
        for _ in range(args.rounds):
            for name, step in steps.items():
                begin = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - begin) * 1e3)
        ms = {name: statistics.median(values) for name, values in times.items()}
        print(
            f"| {batch} | {ms['relu']:.2f} | {ms['eager']:.2f} | {ms['compiled']:.2f} | "
            f"{ms['eager'] / ms['relu']:.2f}x | {ms['compiled'] / ms['relu']:.2f}x |"
        )


if __name__ == "__main__":
    main()
