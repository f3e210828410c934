"""The CUDA paths in one short run, for a session that is lent a GPU (prepared on CPU; nothing here needs one to pass).

Checks, on the first CUDA device:
1. SineReLU (`deadneuron.torch.sinerelu`) in float32/float64/float16/bfloat16, both forms, out of place and in place:
   values and gradients against the float64 numpy reference, within the dtype's rounding.
2. A scan with gradients of the by-construction zoo (tests/torch_zoo.py) on the GPU finds exactly the dead, dormant
   and gradient-dead units it finds on the CPU (and that EXPECTED lists), with the statistics on the device.
3. `deadneuron.compare` and a few `DeadNeuronMonitor` steps run on the GPU model.
4. Timing (CUDA events, median of interleaved rounds) on 16M float32: SineReLU against torch.relu and the naive
   `where` composition, forward and forward+backward.
5. The training-step ratio (issue 15): benchmarks/train_step.py's LeNet-5 step, ReLU against `deadneuron.swap`'s
   SineReLU, default settings, batch 32 and 128: in PyTorch on the device (CUDA events; the median of the per-round
   ratios and their interquartile range), and in Keras in a child process (`train_on_batch`, Keras's default
   `jit_compile="auto"`, which turns XLA on where TensorFlow sees a GPU, and `jit_compile=False`; TensorFlow picks
   the GPU itself when its build has CUDA; the summary says which device it used).

    python benchmarks/cuda_check.py              # prints a JSON summary; also written to $OUT/cuda_check.json
    python benchmarks/cuda_check.py --device cpu # checks 1-3 and 5 (3 rounds) on the CPU: a dry run of the script

Exits 0 with {"cuda": false} where there is no GPU; exits 1 when a check fails (the summary says which).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_step import torch_lenet5, torch_step  # noqa: E402

import deadneuron  # noqa: E402
from deadneuron import sinerelu_reference  # noqa: E402
from deadneuron.core.sinerelu import sinerelu_grad_reference  # noqa: E402
from deadneuron.torch import DeadNeuronMonitor, sinerelu  # noqa: E402
from tests import torch_zoo  # noqa: E402

EPSILON = 0.0025
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check_sinerelu(device: torch.device) -> dict[str, float]:
    """Worst error relative to max(1, |reference|) per dtype/form/mode; raises if above the dtype's tolerance."""
    grid = np.concatenate([np.linspace(-10, 10, 100_001), np.linspace(-0.01, 0.01, 2001), [0.0, -0.0, 50.0, -50.0]])
    worst: dict[str, float] = {}
    for dtype, tolerance in TOLERANCE.items():
        x = torch.tensor(grid, dtype=dtype, device=device)
        z = x.double().cpu().numpy()  # the grid as rounded to dtype
        for form in ("piecewise", "max"):
            leaf = x.clone().requires_grad_()
            y = sinerelu(leaf, EPSILON, form)  # type: ignore[arg-type]
            (grad,) = torch.autograd.grad(y.sum(), leaf)
            inplace = x.clone()
            sinerelu(inplace, EPSILON, form, inplace=True)  # type: ignore[arg-type]
            for mode, got, want in (
                ("value", y, sinerelu_reference(z, EPSILON, form)),
                ("grad", grad, sinerelu_grad_reference(z, EPSILON, form)),
                ("inplace", inplace, sinerelu_reference(z, EPSILON, form)),
            ):
                error = np.abs(got.detach().double().cpu().numpy() - want) / np.maximum(1.0, np.abs(want))
                key = f"{str(dtype).removeprefix('torch.')}/{form}/{mode}"
                worst[key] = float(error.max())
                if not worst[key] <= tolerance:
                    raise AssertionError(f"{key}: worst relative error {worst[key]:.3g} > {tolerance:.3g}")
            assert y.device == device and grad.device == device
    return worst


def units(report: deadneuron.Report) -> dict[str, tuple[list[int], list[int], list[int] | None]]:
    return {layer.name: (layer.dead_units, layer.dormant_units, layer.grad_dead_units) for layer in report.layers}


def check_scan(device: torch.device) -> dict[str, object]:
    found: dict[str, object] = {}
    for name, factory in torch_zoo.FACTORIES.items():  # mlp, cnn, tokens (a TransformerEncoderLayer)
        x = torch.randn(64, *torch_zoo.SAMPLE_SHAPE[name], generator=torch.Generator().manual_seed(0))
        on_cpu = units(deadneuron.scan(factory(), x, batch_size=16))  # the probe loss, as tests/test_torch_scan.py
        on_gpu = units(deadneuron.scan(factory().to(device), x, batch_size=16))
        expected = {site: tuple(lists) for site, lists in torch_zoo.EXPECTED[name].items()}
        if on_gpu != on_cpu:
            raise AssertionError(f"{name}: GPU scan {on_gpu} differs from the CPU scan {on_cpu}")
        for site, lists in expected.items():
            if tuple(on_gpu[site]) != lists:
                raise AssertionError(f"{name}/{site}: GPU scan found {on_gpu[site]}, constructed {lists}")
        found[name] = on_gpu
    return found


def check_compare_and_monitor(device: torch.device) -> dict[str, object]:
    model = torch_zoo.mlp().to(device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, *torch_zoo.SAMPLE_SHAPE["mlp"], generator=generator)
    classes = model(x[:1].to(device)).shape[-1]
    y = torch.randint(0, classes, (64,), generator=generator)
    comparison = deadneuron.compare(model, (x, y), finetune_steps=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    xs, ys = x.to(device), y.to(device)
    with DeadNeuronMonitor(model, every=1, window=4) as monitor:
        for _ in range(4):
            loss = torch.nn.functional.cross_entropy(model(xs), ys)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step()
    monitored = units(monitor.report())
    scanned = units(deadneuron.scan(model, (x, y), batch_size=64))
    if {k: v[:2] for k, v in monitored.items()} != {k: v[:2] for k, v in scanned.items()}:
        raise AssertionError(f"monitor {monitored} differs from a scan {scanned}")
    return {"compare_dead_after": comparison.after.dead, "monitor_sites": list(monitored)}


def time_samples(
    steps: dict[str, Callable[[], object]], rounds: int = 21, device: torch.device | None = None
) -> dict[str, list[float]]:
    """Milliseconds per round of each step, interleaved: CUDA events on a GPU, the wall clock on the CPU."""
    cuda = device is None or device.type == "cuda"
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(3):
            step()
    if cuda:
        torch.cuda.synchronize()
    for _ in range(rounds):
        for name, step in steps.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                step()
                samples[name].append((time.perf_counter() - begin) * 1e3)
    return samples


def time_ms(steps: dict[str, Callable[[], object]], rounds: int = 21) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in time_samples(steps, rounds).items()}


def timing(device: torch.device) -> dict[str, float]:
    x = torch.randn(1 << 24, device=device)
    upstream = torch.randn_like(x)

    def naive(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t > 0, t, EPSILON * (torch.sin(t) - torch.cos(t)))

    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": torch.relu, "sinerelu": lambda t: sinerelu(t, EPSILON), "naive": naive,
    }
    steps: dict[str, Callable[[], object]] = {}
    for name, fn in variants.items():
        def forward(fn: Callable[[torch.Tensor], torch.Tensor] = fn) -> object:
            with torch.no_grad():
                return fn(x)

        def both(fn: Callable[[torch.Tensor], torch.Tensor] = fn) -> object:
            leaf = x.detach().requires_grad_()
            return torch.autograd.grad(fn(leaf), leaf, upstream)

        steps[f"{name}/fwd"], steps[f"{name}/fwd+bwd"] = forward, both
    ms = time_ms(steps)
    result = {f"{k} ms": round(v, 4) for k, v in ms.items()}
    for part in ("fwd", "fwd+bwd"):
        result[f"sinerelu/relu {part}"] = round(ms[f"sinerelu/{part}"] / ms[f"relu/{part}"], 3)
        result[f"naive/sinerelu {part}"] = round(ms[f"naive/{part}"] / ms[f"sinerelu/{part}"], 3)
    return result


def ratio_summary(samples: dict[str, list[float]], name: str, base: str) -> dict[str, float]:
    """Median step times and the median (with quartiles) of the per-round ratio name/base."""
    ratios = np.array(samples[name]) / np.array(samples[base])
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    return {
        f"{base} ms": round(statistics.median(samples[base]), 4),
        f"{name} ms": round(statistics.median(samples[name]), 4),
        f"{name}/{base}": round(float(median), 3), f"{name}/{base} IQR": [round(float(q1), 3), round(float(q3), 3)],
    }


def train_step_ratio(device: torch.device, rounds: int) -> dict[str, object]:
    """LeNet-5 training step, ReLU against SineReLU by default, in PyTorch on `device`, then Keras in a child."""
    result: dict[str, object] = {}
    for batch in (32, 128):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 1, 28, 28, generator=generator).to(device)
        y = torch.randint(0, 10, (batch,), generator=generator).to(device)
        torch.manual_seed(0)
        relu = torch_lenet5().to(device)
        swapped = deadneuron.swap(relu)
        samples = time_samples({"relu": torch_step(relu, x, y), "sinerelu": torch_step(swapped, x, y)}, rounds, device)
        result[f"torch batch {batch}"] = ratio_summary(samples, "sinerelu", "relu")
    # Keras: its own process (TensorFlow and torch sharing a GPU's memory in one process is asking for trouble).
    command = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--framework", "keras", "--rounds",
               str(rounds), "--keras-jit", "auto", "False"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on the CPU in both frameworks
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
        result["keras"] = done.stdout.splitlines() if done.returncode == 0 else {
            "error": f"exit code {done.returncode}", "stderr": done.stderr[-3000:]}
    except (OSError, subprocess.TimeoutExpired) as error:
        result["keras"] = {"error": f"{type(error).__name__}: {error}"}
    return result


def main() -> int:
    # `--device cpu` runs checks 1-3 on the CPU: a dry run of this script where there is no GPU.
    on_cpu = sys.argv[1:] == ["--device", "cpu"]
    summary: dict[str, object] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    failed = False
    if torch.cuda.is_available() or on_cpu:
        device = torch.device("cpu" if on_cpu else "cuda")
        summary["device"] = "cpu (dry run)" if on_cpu else torch.cuda.get_device_name(device)
        checks: dict[str, Callable[[torch.device], object]] = {
            "sinerelu": check_sinerelu, "scan": check_scan, "compare_monitor": check_compare_and_monitor,
        }
        if not on_cpu:
            checks["timing"] = timing
        checks["train_step"] = lambda device: train_step_ratio(device, 3 if on_cpu else 41)
        for name, check in checks.items():
            try:
                summary[name] = {"ok": True, "result": check(device)}
            except Exception as error:  # noqa: BLE001 - report every check, then fail
                failed = True
                summary[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                                 "traceback": traceback.format_exc()[-3000:]}
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cuda_check.json").write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
