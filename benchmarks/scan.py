"""Cost of a PyTorch scan against plain passes over the same batches, and peak memory against data size.

    python benchmarks/scan.py            # prints a markdown table (docs/benchmarks.md, "Scan (PyTorch)")

Targets (issue 3): scan with gradients <= 1.25x a plain forward+backward; forward-only scan <= 1.1x a plain
forward (a small CNN, 2048 images of 3x32x32); a 10x larger .npy raises peak RSS by < 10%.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

SAMPLES, BATCH, REPEATS = 2048, 128, 3


def small_cnn():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def timings() -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    import deadneuron

    torch.manual_seed(0)
    model = small_cnn().eval()
    x = torch.randn(SAMPLES, 3, 32, 32)
    y = torch.randint(0, 10, (SAMPLES,))

    def forward() -> None:
        with torch.no_grad():
            for i in range(0, SAMPLES, BATCH):
                model(x[i : i + BATCH])

    def forward_backward() -> None:
        for i in range(0, SAMPLES, BATCH):
            F.cross_entropy(model(x[i : i + BATCH]), y[i : i + BATCH], reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    runs = {
        "plain forward": forward,
        "scan, forward only": lambda: deadneuron.scan(model, x, batch_size=BATCH, loss="none"),
        "plain forward+backward": forward_backward,
        "scan with gradients": lambda: deadneuron.scan(model, (x, y), batch_size=BATCH),
    }
    best = {name: float("inf") for name in runs}
    forward()  # warm-up
    for _ in range(REPEATS):  # interleaved, best of REPEATS: the machine is shared
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def peak_rss_child(path: str) -> None:
    import resource

    import deadneuron

    model = small_cnn().eval()
    deadneuron.scan(model, path, batch_size=BATCH, loss="none")
    print(json.dumps({"peak_rss_kb": _peak_rss_kb(resource)}))


def _peak_rss_kb(resource: object) -> int:
    """This process's peak RSS. On Linux VmHWM belongs to the process image, whereas ru_maxrss survives exec:
    a child forked from a parent holding 600 MiB reports at least that, whatever it did itself."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # type: ignore[attr-defined]


def peak_rss(samples: int, folder: str) -> int:
    import numpy as np

    path = os.path.join(folder, f"x{samples}.npy")
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(samples, 3, 32, 32))
    rng = np.random.default_rng(0)
    for i in range(0, samples, 1024):
        array[i : i + 1024] = rng.standard_normal(array[i : i + 1024].shape, dtype=np.float32)
    array.flush()
    del array
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", path], capture_output=True, text=True, check=True
    ).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_rss_kb"])


def main() -> None:
    import torch

    best = timings()
    with tempfile.TemporaryDirectory() as folder:
        small, large = peak_rss(2048, folder), peak_rss(20480, folder)
    fb, f = best["plain forward+backward"], best["plain forward"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {SAMPLES} images 3x32x32, batch {BATCH}, "
        f"best of {REPEATS}\n"
    )
    print("| run | seconds | ratio | target |\n| --- | --- | --- | --- |")
    print(f"| plain forward | {f:.3f} | 1.00 | |")
    print(
        f"| scan, forward only (`loss='none'`) | {best['scan, forward only']:.3f} | "
        f"{best['scan, forward only'] / f:.2f} | <= 1.10 |"
    )
    print(f"| plain forward+backward | {fb:.3f} | 1.00 | |")
    print(
        f"| scan with gradients (CE on labels) | {best['scan with gradients']:.3f} | "
        f"{best['scan with gradients'] / fb:.2f} | <= 1.25 |"
    )
    print(
        f"\nPeak RSS of a forward-only scan of a memory-mapped .npy: 2048 images {small / 1024:.0f} MiB, "
        f"20480 images {large / 1024:.0f} MiB: +{100 * (large - small) / small:.1f}% (target < 10%)"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        peak_rss_child(sys.argv[2])
    else:
        main()
