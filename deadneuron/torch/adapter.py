"""The PyTorch adapter (docs/architecture.md): `load_model`, `scan`, `inspect`.

A scan runs the model in eval mode (BatchNorm uses its running statistics and leaves them alone, dropout is off:
the scan is deterministic and every sample's gradient is its own), with PyTorch's fused transformer fast path
switched off so that every activation runs, and puts everything back afterwards, also when it fails: the train/eval
flag of every submodule, requires_grad, `.grad`, buffers, the fast-path switch, and no hooks.

Gradients are taken with `torch.autograd.grad` with respect to the trainable parameters (the inputs when nothing is
trainable), so no parameter's `.grad` is touched; the per-site hooks read dL/d(pre-activation) as it passes.
The loss is summed over samples (never averaged), so a sample's gradient does not depend on the batch it came in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeadNeuronError
from ..report import Report, SiteInfo
from .accumulate import collect
from .batches import Batch, Target, batches
from .loading import load_model as _load_model
from .sites import SiteWatcher, fold_sinerelu, graph_sites

__all__ = ["inspect", "load_model", "scan"]

Progress = Callable[[int], None]
# The probe's cotangents for one batch: (output tensors, valid samples) -> one v per output, rows past
# `valid` zero. `deadneuron.torch.distributed` passes one that draws by global sample position.
Probe = Callable[[list[torch.Tensor], int], list[torch.Tensor]]
# Called with every site's accumulator once the batches are done; returns those the report is built from
# (`deadneuron.torch.distributed` returns them all-reduced across ranks).
Finalize = Callable[[list[Any]], list[Any]]


def batch_probe(seed: int) -> Probe:
    """v ~ N(0, I) for each output of each batch, drawn in batch order from one generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)

    def draw(outputs: list[torch.Tensor], valid: int) -> list[torch.Tensor]:
        vs = []
        for t in outputs:
            v = torch.randn(t.shape, generator=generator).to(device=t.device, dtype=t.dtype)
            if valid < t.shape[0]:
                v[valid:] = 0
            vs.append(v)
        return vs

    return draw


def load_model(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    unsafe_pickle: bool = False,
    unsafe_deserialization: bool = False,
) -> Any:
    """A `.pt2` as an `ExportedProgram`; a state dict with `arch` (or a pickled module) as an `nn.Module`."""
    return _load_model(os.fspath(path), arch=arch, unsafe_pickle=unsafe_pickle)


@dataclass
class _Runnable:
    """What a scan runs, and what the model itself says about its inputs."""

    module: nn.Module
    display: str
    graph_names: list[str] | None = None
    unobserved: list[str] = field(default_factory=list)
    example_shape: tuple[int, ...] | None = None  # one sample's shape
    example_dtype: torch.dtype | None = None
    static_batch: int | None = None


def _runnable(model: Any, name: str | None) -> _Runnable:
    if isinstance(model, torch.export.ExportedProgram):
        module = model.module()  # a new graph module each call: folding leaves `model` as it was
        fold_sinerelu(module)  # SineReLUs that `deadneuron swap` wrote out in aten ops become sites again
        run = _Runnable(module, name or "ExportedProgram")
        run.graph_names, run.unobserved = graph_sites(module)
        args = model.example_inputs[0] if model.example_inputs else ()
        if args and isinstance(args[0], torch.Tensor):
            run.example_shape = tuple(args[0].shape[1:])
            run.example_dtype = args[0].dtype
        placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
        value = placeholders[0].meta.get("val") if placeholders else None
        if isinstance(value, torch.Tensor) and value.ndim and isinstance(value.shape[0], int):
            run.static_batch = int(value.shape[0])  # exported without a dynamic batch dimension
        return run
    if isinstance(model, torch.jit.ScriptModule):
        raise DeadNeuronError(
            "TorchScript modules cannot be hooked; expected an nn.Module or a torch.export program: re-export it "
            "with torch.export.export(model, example_inputs)"
        )
    if not isinstance(model, nn.Module):
        raise DeadNeuronError(f"cannot scan a {type(model).__name__}; expected a torch.nn.Module or an ExportedProgram")
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module):  # torch.compile: hooks fire only on the original module
        model = original
    run = _Runnable(model, name or type(model).__name__)
    if isinstance(model, torch.fx.GraphModule) and any("nn_module_stack" in node.meta for node in model.graph.nodes):
        run.graph_names, run.unobserved = graph_sites(model)
    return run


def run_batches(
    run: _Runnable,
    data: Any,
    *,
    batch_size: int,
    labels: Any,
    samples: int | None,
    input_shape: Sequence[int] | None,
    seed: int,
) -> Iterator[Batch]:
    """The (x, y, valid) batches of `data` for `run`, on its device and dtype; random inputs shaped from
    `input_shape`, the program's example input or the first layer when `data` is None."""
    device, dtype = _device_dtype(run.module, run.example_dtype)
    shape = tuple(input_shape) if input_shape is not None else (run.example_shape or _guess_sample_shape(run.module))
    return batches(
        data,
        labels=labels,
        batch_size=batch_size,
        samples=samples,
        input_shape=shape,
        seed=seed,
        target=Target(device, dtype, run.static_batch),
    )


def _device_dtype(module: nn.Module, fallback: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device, fallback or torch.get_default_dtype()
    return torch.device("cpu"), fallback or torch.get_default_dtype()


def _guess_sample_shape(module: nn.Module) -> tuple[int, ...] | None:
    """One sample's shape when the first layer says it (a Linear); None otherwise."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return (sub.in_features,)
        if any(True for _ in sub.parameters(recurse=False)):
            return None
    return None


def _expected_input(run: _Runnable) -> str:
    if run.example_shape is not None:
        return f"expected samples of shape {run.example_shape} (the program's example input)"
    for sub in run.module.modules():
        if isinstance(sub, nn.Linear):
            return (
                f"the first layer is Linear({sub.in_features}, ...): expected {sub.in_features} features on the "
                "last axis"
            )
        if isinstance(sub, nn.modules.conv._ConvNd):
            return (
                f"the first layer is {type(sub).__name__} with {sub.in_channels} input channels: expected "
                f"(N, {sub.in_channels}, ...)"
            )
        if any(True for _ in sub.parameters(recurse=False)):
            break
    return "expected inputs the model accepts"


@contextmanager
def _preserved(module: nn.Module) -> Iterator[None]:
    """Eval mode, no transformer fast path; afterwards the model exactly as it was found."""
    training = [(m, m.training) for m in module.modules()]
    params = list(module.parameters())
    requires_grad = [(p, p.requires_grad) for p in params]
    grads = [(p, p.grad) for p in params]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        try:
            module.eval()
        except NotImplementedError:  # graph modules from torch.export: the mode was fixed at export
            pass
        yield
    finally:
        if mha is not None and fastpath is not None:
            mha.set_fastpath_enabled(fastpath)
        for m, flag in training:
            m.training = flag
        for p, flag in requires_grad:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for p, grad in grads:
            if p.grad is not grad:
                p.grad = grad
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)


def _resolve_loss(loss: str, y: torch.Tensor | None) -> str:
    if loss == "auto":
        if y is None:
            return "probe"
        return "mse" if y.is_floating_point() else "ce"
    if loss in ("ce", "mse") and y is None:
        raise DeadNeuronError(
            f"--loss {loss} needs labels; pass data with labels (a .npz with 'y', an (x, y) pair) or use --loss probe"
        )
    return loss


def _output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    elif hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return [out.logits]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _output_tensors(item)]
    return []


def _task_loss(
    kind: str, out: Any, y: torch.Tensor | None, valid: int, probe: Probe, first: bool
) -> torch.Tensor | None:
    outputs = _output_tensors(out)
    if not outputs:
        return None
    if kind == "probe":
        total: torch.Tensor | None = None
        for t, v in zip(outputs, probe(outputs, valid), strict=True):
            term = (v * t).sum()
            total = term if total is None else total + term
        return total
    if y is None:  # _resolve_loss asked for labels; a later batch of an iterable came without them
        raise DeadNeuronError(f"--loss {kind} needs labels on every batch; a batch came without labels")
    main, y = outputs[0][:valid], y[:valid]
    if kind == "ce":
        if main.ndim < 2 or tuple(y.shape) != (main.shape[0], *main.shape[2:]):
            raise DeadNeuronError(
                f"cross-entropy needs logits (N, C, ...) and class labels (N, ...); received outputs "
                f"{tuple(main.shape)} and labels {tuple(y.shape)}; pass integer class labels or --loss mse/probe"
            )
        if first:
            low, high = int(y.min()), int(y.max())  # once per scan, not per batch
            if low < 0 or high >= main.shape[1]:
                raise DeadNeuronError(
                    f"labels run from {low} to {high} but the model has {main.shape[1]} outputs; "
                    f"expected class indices in [0, {main.shape[1] - 1}]"
                )
        return F.cross_entropy(main, y.long(), reduction="sum")
    if y.numel() != main.numel():
        raise DeadNeuronError(
            f"targets of shape {tuple(y.shape)} do not fit outputs of shape {tuple(main.shape)}; "
            "expected one target per output value for --loss mse"
        )
    return F.mse_loss(main, y.reshape(main.shape).to(main.dtype), reduction="sum")


def _forward(run: _Runnable, x: torch.Tensor) -> Any:
    try:
        return run.module(x)
    except DeadNeuronError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
        text = str(error).strip().splitlines()
        raise DeadNeuronError(
            f"the model failed on a batch of shape {tuple(x.shape)}: {text[0] if text else type(error).__name__}; "
            f"{_expected_input(run)}; check the data or --input-shape"
        ) from error


@dataclass
class _Scanned:
    watcher: SiteWatcher
    loss: str
    warnings: list[str]


def _scan(
    run: _Runnable,
    data: Any,
    *,
    batch_size: int,
    labels: Any,
    loss: str,
    atol: float,
    gtol: float,
    unit_axis: int | None,
    samples: int | None,
    input_shape: Sequence[int] | None,
    seed: int,
    progress: Progress | None,
    probe: Probe | None = None,
) -> _Scanned:
    module = run.module
    if (
        data is None
        and run.example_shape is not None
        and input_shape is not None
        and tuple(input_shape) != run.example_shape
    ):
        raise DeadNeuronError(
            f"--input-shape {tuple(input_shape)} does not fit the program; expected samples of "
            f"shape {run.example_shape} (its example input)"
        )
    stream = run_batches(
        run, data, batch_size=batch_size, labels=labels, samples=samples, input_shape=input_shape, seed=seed
    )
    gradients = loss != "none"
    warnings: list[str] = []
    if run.static_batch is not None:
        warnings.append(
            f"the program was exported with a static batch of {run.static_batch}: scanned in batches "
            "of that size (export with a dynamic batch dimension for speed)"
        )
    watcher = SiteWatcher(
        module,
        atol=atol,
        gtol=gtol,
        unit_axis=unit_axis,
        gradients=gradients,
        graph_names=run.graph_names,
        unobserved=run.unobserved,
    )
    probe = probe or batch_probe(seed + 1)
    resolved: str | None = "none" if not gradients else None
    with _preserved(module), watcher:
        for x, y, valid in stream:
            n = int(x.shape[0])
            first = resolved is None
            if resolved is None:
                resolved = _resolve_loss(loss, y)
            if not gradients:
                with torch.no_grad(), watcher.forward(n, valid):
                    _forward(run, x)
            else:
                _gradient_step(run, watcher, x, y, valid, resolved, probe, first, warnings)
            if progress is not None:
                progress(valid)
    return _Scanned(watcher, resolved or "none", warnings)


def _gradient_step(
    run: _Runnable,
    watcher: SiteWatcher,
    x: torch.Tensor,
    y: torch.Tensor | None,
    valid: int,
    loss: str,
    probe: Probe,
    first: bool,
    warnings: list[str],
) -> None:
    module = run.module
    params = [p for p in module.parameters() if p.requires_grad]
    if not params and not x.is_floating_point():
        # Integer inputs into a frozen model: no graph would be built. Trainable for this scan only
        # (`_preserved` puts requires_grad back).
        params = [p for p in module.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
    leaf = None
    with torch.enable_grad():
        if not params and x.is_floating_point():
            # A frozen model: differentiate with respect to the inputs instead. (With trainable parameters the
            # inputs are left out: their gradient would cost the first layer's backward-data pass.)
            leaf = x.detach().requires_grad_(True)
            x = leaf.clone()  # the model may write into its input in place; a leaf would refuse that
        with watcher.forward(int(x.shape[0]), valid):
            out = _forward(run, x)
        objective = _task_loss(loss, out, y, valid, probe, first)
        inputs = ([leaf] if leaf is not None else []) + params
        if objective is None or not objective.requires_grad or not inputs:
            message = "no gradient taken: the model's output does not depend on anything differentiable"
            if message not in warnings:
                warnings.append(message)
            return
        torch.autograd.grad(objective, inputs, allow_unused=True)


def scan(
    model: Any,
    data: Any = None,
    *,
    batch_size: int = 64,
    labels: Any = None,
    loss: str = "auto",
    atol: float = 0.0,
    gtol: float = 0.0,
    unit_axis: int | None = None,
    samples: int | None = None,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    name: str | None = None,
    probe: Probe | None = None,
    finalize: Finalize | None = None,
) -> Report:
    """Dead, dormant and gradient-dead units of every activation site of a PyTorch model (design.md).

    `probe` and `finalize` are for `deadneuron.torch.distributed`: the probe's cotangents by global sample
    position, and the all-reduce of the statistics before the report.
    """
    run = _runnable(model, name)
    scanned = _scan(
        run,
        data,
        batch_size=batch_size,
        labels=labels,
        loss=loss,
        atol=atol,
        gtol=gtol,
        unit_axis=unit_axis,
        samples=samples,
        input_shape=input_shape,
        seed=seed,
        progress=progress,
        probe=probe,
    )
    watcher = scanned.watcher
    accumulators = list(watcher.accumulators.values())
    if finalize is not None:
        accumulators = finalize(accumulators)
    warnings = scanned.warnings + watcher.warnings
    if not accumulators:
        warnings.append(
            "no activation sites ran: the model calls none of the activations deadneuron knows "
            "(ReLU family, GELU, SiLU, ... as modules or functions)"
        )
    return Report.build(
        framework="torch",
        model=run.display,
        loss=scanned.loss,
        sites=collect(accumulators),
        atol=atol,
        gtol=gtol,
        warnings=warnings,
        unobserved=watcher.unobserved,
    )


def inspect(model: Any, *, input_shape: Sequence[int] | None = None) -> list[SiteInfo]:
    """The activation sites of `model` in order of first execution, from one forward pass on random inputs."""
    run = _runnable(model, None)
    shape = tuple(input_shape) if input_shape is not None else (run.example_shape or _guess_sample_shape(run.module))
    if shape is None:
        raise DeadNeuronError(
            "inspect needs the shape of one sample to run the model once; pass --input-shape (e.g. 3,32,32)"
        )
    scanned = _scan(
        run,
        None,
        batch_size=2,
        labels=None,
        loss="none",
        atol=0.0,
        gtol=0.0,
        unit_axis=None,
        samples=2,
        input_shape=shape,
        seed=0,
        progress=None,
    )
    return scanned.watcher.collect_infos()
