"""What DeadNeuronMonitor with default settings costs a training step (target: at most 5%), in each usage.

Blocks of `--steps` training steps (a window of the default size: its hooks, sampled steps and one window end),
bare and monitored, interleaved for `--rounds` rounds (the order rotates each round). Monitored usages: the loop
calls `monitor.step()` ("step() calls"); the loop has no monitor call and the monitor counts training forwards
("no calls"); the monitor counts `optimizer.step()`s (`optimizer=`). The figure is the median per-step time of each
and the ratio of the medians to the bare loop's, plus the median of the per-round ratios.
Run: `python benchmarks/monitor.py`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

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


#: The clock: wall time by default; `--clock cpu` takes this process's CPU time, which other processes on a shared
#: machine disturb far less (they still share caches and memory bandwidth).
clock = time.perf_counter

USAGES = {"step": "step() calls", "forward": "no calls", "optimizer": "optimizer="}


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, steps: int,
          monitor: DeadNeuronMonitor | None = None) -> float:
    """Seconds per training step over `steps` steps; `monitor.step()` after each when a monitor is given."""
    start = clock()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step()
    return (clock() - start) / steps


def block(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, steps: int,
          usage: str | None) -> float:
    """Seconds per training step over `steps` steps, bare (`usage=None`) or monitored in one of USAGES."""
    if usage is None:
        return train(model, x, y, opt, steps)
    monitor = DeadNeuronMonitor(model, optimizer=opt if usage == "optimizer" else None).start()
    seconds = train(model, x, y, opt, steps, monitor if usage == "step" else None)
    monitor.stop(close=False)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=DEFAULT_WINDOW)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunks", type=int, default=400, help="alternating chunks for the step counters' cost")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--no-blocks", action="store_true", help="only the accounting and the counters")
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), every={DEFAULT_EVERY}, window={DEFAULT_WINDOW}, "
          f"{args.steps} steps a block, {args.rounds} interleaved rounds, {args.clock} clock")
    print("| model | usage | bare step (ms, median) | monitored step (ms, median) | ratio of medians "
          "| median per-round ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    accounts: list[tuple[str, tuple[float, float, float, float]]] = []
    counters: list[tuple[str, str, float, float]] = []
    forwards: list[tuple[str, tuple[float, ...]]] = []
    variants: list[str | None] = [None, *USAGES]
    for name, build in (("MLP 20-64-32-10, batch 64", mlp), ("CNN 1-8-16 conv, 8x8, batch 64", cnn)):
        torch.manual_seed(0)
        model, x = build()
        y = torch.randint(0, 10, (x.shape[0],))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for usage in variants:  # warm-up
            block(model, x, y, opt, 200, usage)
        times: dict[str | None, list[float]] = {usage: [] for usage in variants}
        ratios: dict[str, list[float]] = {usage: [] for usage in USAGES}
        for r in range(0 if args.no_blocks else args.rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            measured = {usage: block(model, x, y, opt, args.steps, usage) for usage in order}
            for usage, seconds in measured.items():
                times[usage].append(seconds)
            for usage in USAGES:
                ratios[usage].append(measured[usage] / measured[None])
        for usage, label in USAGES.items() if not args.no_blocks else ():
            bare = statistics.median(times[None])
            watched = statistics.median(times[usage])
            print(f"| {name} | {label} | {1e3 * bare:.3f} | {1e3 * watched:.3f} | {watched / bare:.3f} "
                  f"| {statistics.median(ratios[usage]):.3f} |")
        accounts.append((name, accounting(model, x, y, opt, args.rounds)))
        counters.extend((name, usage, *counter_cost(model, x, y, opt, usage, args.chunks)) for usage in COUNTERS)
        forwards.append((name, forward_counter_cost(model, x)))
    print("\nPer-step accounting (step() calls): one monitor left running, each step timed by its position in the")
    print("sampling cycle; the extra of a cycle is what its attaching, hooked and following steps cost over an")
    print("unhooked step; the cost adds one window end per window.")
    print("| model | unhooked step (us) | hooked step (us) | cycle extra (us) | window end (us) | cost |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (plain, hooked, extra, end) in accounts:
        cost = (extra * DEFAULT_WINDOW / DEFAULT_EVERY + end) / (plain * DEFAULT_WINDOW)
        print(f"| {name} | {plain:.0f} | {hooked:.0f} | {extra:.0f} | {end:.0f} | {100 * cost:.1f}% |")
    print(f"\nStep counters without step() calls: {CHUNK}-step chunks, bare and with the counter alone (nothing")
    print(f"sampled), alternating {args.chunks} times; the median per-chunk difference. Their cost adds to the cost")
    print("above, since the sampled steps' work is the same in every usage.")
    print("| model | usage | bare step (us) | counter (us per step) | counter | total cost |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    totals = {name: (extra * DEFAULT_WINDOW / DEFAULT_EVERY + end) / (plain * DEFAULT_WINDOW)
              for name, (plain, _, extra, end) in accounts}
    for name, usage, bare_us, extra_us in counters:
        share = extra_us / bare_us
        print(f"| {name} | {USAGES[usage]} | {bare_us:.0f} | {extra_us:.1f} | {100 * share:.1f}% "
              f"| {100 * (share + totals[name]):.1f}% |")
    print("\nThe step counter on one forward call (autograd on): bare, with a no-op pre-hook, with the counter.")
    print("| model | bare forward (us) | no-op hook (us) | counter (us) | counter extra (us) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (bare_us, noop_us, counter_us) in forwards:
        print(f"| {name} | {bare_us:.1f} | {noop_us:.1f} | {counter_us:.1f} | {counter_us - bare_us:.1f} |")


COUNTERS = ("forward", "optimizer")
CHUNK = 25


def counter_cost(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, usage: str,
                 chunks: int) -> tuple[float, float]:
    """(median bare step, median extra per step of the step counter alone), in microseconds: a monitor that never
    samples after its first step, started and stopped around its chunks (outside the timing)."""
    monitor = DeadNeuronMonitor(model, every=10**9, window=10**9, optimizer=opt if usage == "optimizer" else None)

    def run(steps: int) -> float:
        return 1e6 * train(model, x, y, opt, steps)

    monitor.start()
    run(2)  # step 0, the only sampled one, and the step that takes its hooks off
    monitor.stop(close=False)
    def counted() -> float:
        monitor.start()
        seconds = run(CHUNK)
        monitor.stop(close=False)
        return seconds

    bare, extra = [], []
    for chunk in range(chunks):
        if chunk % 2:  # alternate which goes first, so that an order effect cancels
            with_counter, plain = counted(), run(CHUNK)
        else:
            plain, with_counter = run(CHUNK), counted()
        bare.append(plain)
        extra.append(with_counter - plain)
    return statistics.median(bare), statistics.median(extra)


def forward_counter_cost(model: nn.Module, x: torch.Tensor, rounds: int = 150, calls: int = 200) -> tuple[float, ...]:
    """Microseconds per forward call (autograd on, no backward): (bare, any pre-hook, the monitor's step counter),
    medians over `rounds` alternating runs of `calls` calls. Any forward hook takes nn.Module's slower call path;
    the counter adds its own Python on top."""

    def run() -> float:
        start = clock()
        for _ in range(calls):
            model(x)
        return 1e6 * (clock() - start) / calls

    def hooked(start: Any, stop: Any) -> float:
        handle = start()
        try:
            return run()
        finally:
            stop(handle)

    monitor = DeadNeuronMonitor(model, every=10**9, window=10**9)
    monitor.start()
    run()  # step 0, the only sampled one
    monitor.stop(close=False)
    noop = (lambda: model.register_forward_pre_hook(lambda module, args: None), lambda handle: handle.remove())
    counter = (monitor.start, lambda _: monitor.stop(close=False))
    times: list[list[float]] = [[], [], []]
    for _ in range(rounds):
        for i, measure in enumerate((run, lambda: hooked(*noop), lambda: hooked(*counter))):
            times[i].append(measure())
    return tuple(statistics.median(t) for t in times)


def accounting(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, cycles: int
) -> tuple[float, float, float, float]:
    """(median unhooked step, hooked step, extra per sampling cycle, window end), in microseconds."""
    monitor = DeadNeuronMonitor(model, window=10**9).start()
    per_position: list[list[float]] = [[] for _ in range(DEFAULT_EVERY)]

    def step() -> None:
        train(model, x, y, opt, 1, monitor)

    step()  # position 0 of the first cycle: hooked
    for _ in range(cycles):
        for i in range(DEFAULT_EVERY):  # position i is step k with k % every == i + 1
            start = clock()
            step()
            per_position[i].append(1e6 * (clock() - start))
    medians = [statistics.median(times) for times in per_position]
    plain = statistics.median(medians[:-2])  # the last two positions attach the hooks and run the hooked step
    start = clock()
    monitor._end_window()  # noqa: SLF001 (what a window end costs, timed alone: the first one holds the data)
    end = 1e6 * (clock() - start)
    monitor.stop(close=False)
    # The positions that differ by construction: the step whose step() attaches the hooks, the hooked step and
    # the step after it (detached in the hooked step's step(), cold caches); the other 197 only add noise.
    extra = medians[-2] + medians[-1] + medians[0] - 3 * plain
    return plain, medians[-1], extra, end


if __name__ == "__main__":
    main()
