"""The PyTorch side of `compare` (design.md, issue 5): the swapped model to scan, predictions, fine-tuning.

The framework-free glue (the scans, the revival counts, the Comparison) lives in `deadneuron.api.compare`.

- `scannable_swap`: an `nn.Module` is swapped as `swap` does; an `ExportedProgram` is swapped into a graph module
  whose SineReLUs are submodules at the ReLUs' module paths, so that the scan sees them under the same names (`swap`
  of a program writes plain aten ops instead, which run without deadneuron and which a scan folds back into sites).
- `predictions`: argmax agreement and relative L2 drift of the first floating output, in eval mode, streamed: two
  sums and two counts live on the device, one host transfer at the end.
- `finetune`: copies of both models trained `steps` steps with Adam(lr), in train mode where the model allows it (a
  torch.export graph keeps the mode it was exported in), on the same batches in data order (cycling), with the same
  seed for anything random in the forward pass (dropout). Adam because it is how most models are trained and how the
  sample models died; it also means a small SineReLU gradient still moves a weight by about `lr`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeadNeuronError
from . import adapter
from .swap import _copy, _Options, swap, swap_graph_module

__all__ = ["finetune", "predictions", "sample_shape", "scannable_swap"]


def scannable_swap(model: Any, *, epsilons: dict[str, float], form: str) -> Any:
    if isinstance(model, torch.export.ExportedProgram):
        from ..options import check_include
        from ..reference import check_form

        options = _Options(dict(epsilons), check_form(form), check_include("relu"))  # type: ignore[arg-type]
        return swap_graph_module(model.module(), options)
    return swap(model, epsilon_conv=epsilons["conv"], epsilon_dense=epsilons["dense"], form=form)  # type: ignore[arg-type]


def sample_shape(model: Any, input_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    """One sample's shape for random inputs: the user's, else the program's example input (the swapped graph
    module no longer carries it), else None (the scan finds one or says what is missing)."""
    if input_shape is not None:
        return tuple(input_shape)
    if isinstance(model, torch.export.ExportedProgram):
        return adapter._runnable(model, None).example_shape
    return None


def _first_output(run: Any, x: torch.Tensor) -> torch.Tensor:
    outputs = adapter._output_tensors(adapter._forward(run, x))
    if not outputs:
        raise DeadNeuronError("the model returns no floating-point tensor; expected outputs to compare")
    return outputs[0]


def predictions(
    model: Any,
    swapped: Any,
    data: Any,
    *,
    batch_size: int,
    labels: Any,
    samples: int | None,
    input_shape: Sequence[int] | None,
    seed: int,
) -> tuple[float | None, float | None]:
    """(agreement, drift) of `swapped` against `model` over the data, both in eval mode without gradients."""
    before, after = adapter._runnable(model, None), adapter._runnable(swapped, None)
    squared_diff = squared_norm = None
    total = 0
    classifier = True
    agreed: torch.Tensor | None = None
    with adapter._preserved(before.module), adapter._preserved(after.module), torch.no_grad():
        for x, _, valid in adapter.run_batches(
            before,
            data,
            batch_size=batch_size,
            labels=labels,
            samples=samples,
            input_shape=input_shape,
            seed=seed,
        ):
            a = _first_output(before, x)[:valid].double()
            b = _first_output(after, x)[:valid].double()
            diff, norm = (b - a).square().sum(), a.square().sum()
            squared_diff = diff if squared_diff is None else squared_diff + diff
            squared_norm = norm if squared_norm is None else squared_norm + norm
            classifier = classifier and a.ndim >= 2 and a.shape[-1] > 1
            if classifier:
                same = (a.argmax(-1) == b.argmax(-1)).reshape(valid, -1).all(1).sum()
                agreed = same if agreed is None else agreed + same
            total += valid
    if squared_diff is None or squared_norm is None:
        return None, None
    norm_value = float(squared_norm)
    drift = (float(squared_diff) / norm_value) ** 0.5 if norm_value > 0 else None
    agreement = float(agreed) / total if classifier and agreed is not None and total else None
    return agreement, drift


def _training_copy(model: Any) -> nn.Module:
    module = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    trained = _copy(module)
    for p in trained.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    try:
        trained.train()
    except NotImplementedError:  # a torch.export graph: the mode was fixed at export
        pass
    return trained


def _task_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(out, y.long())
    return F.mse_loss(out, y.reshape(out.shape).to(out.dtype))


def finetune(
    model: Any,
    swapped: Any,
    data: Any,
    *,
    steps: int,
    lr: float,
    loss: str,
    batch_size: int,
    labels: Any,
    samples: int | None,
    input_shape: Sequence[int] | None,
    seed: int,
) -> tuple[nn.Module, nn.Module]:
    """Copies of `model` and `swapped`, each trained `steps` Adam steps on the same batches."""
    trained = []
    for source in (model, swapped):
        module = _training_copy(source)
        run = adapter._runnable(module, None)
        if isinstance(model, torch.export.ExportedProgram):
            original = adapter._runnable(model, None)
            run.example_shape, run.static_batch = original.example_shape, original.static_batch
        optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
        done = 0
        kind: str | None = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            while done < steps:
                seen = False
                for x, y, valid in adapter.run_batches(
                    run,
                    data,
                    batch_size=batch_size,
                    labels=labels,
                    samples=samples,
                    input_shape=input_shape,
                    seed=seed,
                ):
                    seen = True
                    if y is None:
                        raise DeadNeuronError(
                            "fine-tuning needs labels; pass data with labels (a .npz with 'y', an (x, y) "
                            "pair "
                            "or labels=...) or drop finetune_steps"
                        )
                    if kind is None:
                        kind = adapter._resolve_loss(loss, y)
                    out = _first_output(run, x)[:valid]
                    value = _task_loss(kind, out, y[:valid])
                    optimizer.zero_grad(set_to_none=True)
                    value.backward()
                    optimizer.step()
                    done += 1
                    if done >= steps:
                        break
                if not seen:
                    raise DeadNeuronError("no samples to fine-tune on; expected at least one batch")
        trained.append(module)
    return trained[0], trained[1]
