"""What DeadNeuronMonitor with default settings costs a training step (issue 8 target: at most 5%).

Blocks of `--steps` training steps (a window of the default size: its hooks, sampled steps and one window end),
bare and monitored, interleaved for `--rounds` rounds; the figure is the median per-step time of each and the
ratio of the medians, plus the median of the per-round ratios. Run: `python benchmarks/monitor.py`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from deadneuron.torch import DeadNeuronMonitor
from deadneuron.torch.monitor import DEFAULT_EVERY, DEFAULT_WINDOW


def mlp() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return model, torch.randn(64, 20)


def cnn() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    return model, torch.randn(64, 1, 8, 8)


def block(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, steps: int,
          monitored: bool) -> float:
    monitor = DeadNeuronMonitor(model) if monitored else None
    if monitor is not None:
        monitor.start()
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step()
    elapsed = time.perf_counter() - start
    if monitor is not None:
        monitor.stop()
    return elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=DEFAULT_WINDOW)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), every={DEFAULT_EVERY}, window={DEFAULT_WINDOW}, "
          f"{args.steps} steps a block, {args.rounds} interleaved rounds")
    print("| model | bare step (ms, median) | monitored step (ms, median) | ratio of medians "
          "| median per-round ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    accounts: list[tuple[str, tuple[float, float, float, float]]] = []
    for name, build in (("MLP 20-64-32-10, batch 64", mlp), ("CNN 1-8-16 conv, 8x8, batch 64", cnn)):
        torch.manual_seed(0)
        model, x = build()
        y = torch.randint(0, 10, (x.shape[0],))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        block(model, x, y, opt, 200, False)  # warm-up
        block(model, x, y, opt, 200, True)
        bare, watched, ratios = [], [], []
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            times = {m: block(model, x, y, opt, args.steps, m) for m in order}
            bare.append(times[False])
            watched.append(times[True])
            ratios.append(times[True] / times[False])
        b, w = statistics.median(bare), statistics.median(watched)
        print(f"| {name} | {1e3 * b:.3f} | {1e3 * w:.3f} | {w / b:.3f} | {statistics.median(ratios):.3f} |")
        accounts.append((name, accounting(model, x, y, opt, args.rounds)))
    print("\nPer-step accounting: one monitor left running, each step timed by its position in the sampling cycle;")
    print("the extra of a cycle is what its attaching, hooked and following steps cost over an unhooked step;")
    print("the cost adds one window end per window.")
    print("| model | unhooked step (us) | hooked step (us) | cycle extra (us) | window end (us) | cost |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (plain, hooked, extra, end) in accounts:
        cost = (extra * DEFAULT_WINDOW / DEFAULT_EVERY + end) / (plain * DEFAULT_WINDOW)
        print(f"| {name} | {plain:.0f} | {hooked:.0f} | {extra:.0f} | {end:.0f} | {100 * cost:.1f}% |")


def accounting(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, cycles: int
) -> tuple[float, float, float, float]:
    """(median unhooked step, hooked step, extra per sampling cycle, window end), in microseconds."""
    monitor = DeadNeuronMonitor(model, window=10**9).start()
    per_position: list[list[float]] = [[] for _ in range(DEFAULT_EVERY)]

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        monitor.step()

    step()  # position 0 of the first cycle: hooked
    for _ in range(cycles):
        for i in range(DEFAULT_EVERY):  # position i is step k with k % every == i + 1
            start = time.perf_counter()
            step()
            per_position[i].append(1e6 * (time.perf_counter() - start))
    medians = [statistics.median(times) for times in per_position]
    plain = statistics.median(medians[:-2])  # the last two positions attach the hooks and run the hooked step
    start = time.perf_counter()
    monitor._end_window()  # noqa: SLF001 (what a window end costs, timed alone: the first one holds the data)
    end = 1e6 * (time.perf_counter() - start)
    monitor.stop()
    # The positions that differ by construction: the step whose step() attaches the hooks, the hooked step and
    # the step after it (detached in the hooked step's step(), cold caches); the other 197 only add noise.
    extra = medians[-2] + medians[-1] + medians[0] - 3 * plain
    return plain, medians[-1], extra, end


if __name__ == "__main__":
    main()
