"""What a PyTorch scan differentiates: the model's floating outputs, and the loss on them (the task loss with labels,
the model's own loss, or the random-cotangent probe). Losses are sums over the batch's real samples, so a
sample's gradient does not depend on the batch it came in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DeadNeuronError

__all__ = ["Probe", "batch_probe", "first_output", "output_tensors", "own_loss", "task_loss"]

# The probe's cotangents for one batch: (output tensors, valid samples) -> one v per output, rows past
# `valid` zero. `deadneuron.torch.distributed` passes one that draws by global sample position.
Probe = Callable[[list[torch.Tensor], int], list[torch.Tensor]]


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


def output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):  # a transformers ModelOutput too; its `loss` is no output to probe or compare
        out = [value for key, value in out.items() if key != "loss"]
    elif hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return [out.logits]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in output_tensors(item)]
    return []


def own_loss(out: Any) -> torch.Tensor:
    """The scalar `loss` a model returns when it is given labels (a transformers `ModelOutput`)."""
    own = getattr(out, "loss", None)
    if not isinstance(own, torch.Tensor) or own.ndim != 0:
        raise DeadNeuronError(
            "the model returned no loss although it was given labels; expected a scalar `loss` in its output; "
            "use --loss ce, mse or probe"
        )
    return own


def task_loss(
    kind: str, out: Any, y: torch.Tensor | None, valid: int, probe: Probe, first: bool
) -> torch.Tensor | None:
    if kind == "model":
        # The model's own loss is a mean over its samples or tokens: times the samples, so that its scale matches
        # a loss summed over samples as the others are.
        return own_loss(out) * valid
    outputs = output_tensors(out)
    if not outputs:
        return None
    if kind == "probe":
        total: torch.Tensor | None = None
        for t, v in zip(outputs, probe(outputs, valid), strict=True):
            term = (v * t).sum()
            total = term if total is None else total + term
        return total
    if y is None:  # the engine checks that every batch has labels when the first had
        raise DeadNeuronError(f"--loss {kind} needs labels on every batch; a batch came without labels")
    main, y = outputs[0][:valid], y[:valid]
    if kind == "ce":
        if y.is_floating_point() and main.ndim == 2 and tuple(y.shape) == tuple(main.shape):
            # one-hot (or soft) targets over the classes: the same loss as their class indices when one-hot
            return F.cross_entropy(main, y.to(main.dtype), reduction="sum")
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


def first_output(out: Any) -> torch.Tensor:
    outputs = output_tensors(out)
    if not outputs:
        raise DeadNeuronError("the model returns no floating-point tensor; expected outputs to compare")
    return outputs[0]
