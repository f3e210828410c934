"""Whatever the user passed as data, as (x, y, valid) batches on the model's device.

Arrays and files go through `deadneuron.data` (memory-mapped, read one batch at a time); tensors are sliced;
iterables of batches (DataLoaders) are consumed as they come. A program exported with a static batch size gets
batches of exactly that size: the last one is padded and `valid` says how many of its samples are real.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import data as datamod
from ..errors import DeadNeuronError

Batch = tuple[torch.Tensor, "torch.Tensor | None", int]


@dataclass
class Target:
    """Where and how batches go: device, floating dtype, and an optional static batch size."""

    device: torch.device
    dtype: torch.dtype
    static_batch: int | None = None


def _to_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise DeadNeuronError(f"{what} holds {value.dtype} values; expected numbers (float or int)")
        if not value.flags.writeable or not value.flags.c_contiguous:
            value = np.array(value)  # one batch read into memory (from a memory map)
        return torch.from_numpy(value)
    try:
        return torch.as_tensor(value)
    except Exception as error:
        raise DeadNeuronError(
            f"cannot turn {what} of type {type(value).__name__} into a tensor; expected an array or a tensor"
        ) from error


def _place(x: Any, y: Any, target: Target) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = _to_tensor(x, "a batch of inputs")
    x = x.to(device=target.device, dtype=target.dtype if x.is_floating_point() else None)
    if y is not None:
        y = _to_tensor(y, "a batch of labels")
        y = y.to(device=target.device, dtype=target.dtype if y.is_floating_point() else torch.long)
    return x, y


def _slices(x: Any, y: Any, batch_size: int) -> Iterator[tuple[Any, Any]]:
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], None if y is None else y[start : start + batch_size]


def _random(samples: int, shape: Sequence[int], batch_size: int, seed: int) -> Iterator[tuple[Any, Any]]:
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        yield torch.randn((n, *shape), generator=generator), None


def _limited(source: Iterator[tuple[Any, Any]], samples: int | None) -> Iterator[tuple[Any, Any]]:
    seen = 0
    for x, y in source:
        if samples is not None:
            if seen >= samples:
                return
            if seen + len(x) > samples:
                keep = samples - seen
                x, y = x[:keep], None if y is None else y[:keep]
        seen += len(x)
        yield x, y


def batches(
    data: Any,
    *,
    labels: Any,
    batch_size: int,
    samples: int | None,
    input_shape: Sequence[int] | None,
    seed: int,
    target: Target,
) -> Iterator[Batch]:
    """(x, y, valid) batches on the target device; DeadNeuronError for data it cannot use."""
    if batch_size <= 0:
        raise DeadNeuronError(f"batch size must be positive, received {batch_size}")
    if samples is not None and samples <= 0:
        raise DeadNeuronError(f"samples must be positive, received {samples}")
    size = target.static_batch or batch_size
    dataset = data if isinstance(data, datamod.Dataset) else datamod.as_dataset(data, labels)
    source: Iterator[tuple[Any, Any]]
    if data is None:
        if samples is None:
            raise DeadNeuronError(
                "no data: pass data (an array, a tensor, a DataLoader or a .npz/.npy path), or "
                "samples=N for N random inputs"
            )
        if input_shape is None:
            raise DeadNeuronError(
                "random inputs need the shape of one sample; pass input_shape (CLI: --input-shape "
                "3,32,32) or real data"
            )
        source = _random(samples, input_shape, size, seed)
    elif dataset is not None:
        dataset = datamod.limit(dataset, samples)
        source = datamod.array_batches(dataset, size)
    elif isinstance(data, torch.Tensor) or (
        isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor)
    ):
        x, y = (
            (data, labels)
            if isinstance(data, torch.Tensor)
            else (data[0], data[1] if labels is None else labels)
        )
        if x.ndim == 0 or len(x) == 0:
            raise DeadNeuronError(
                f"the inputs are empty (shape {tuple(x.shape)}); expected at least one sample"
            )
        if y is not None and len(y) != len(x):
            raise DeadNeuronError(f"{len(y)} labels for {len(x)} inputs; expected one label per input")
        source = _limited(_slices(x, y, size), samples)
    elif datamod.is_iterable_of_batches(data):
        source = _limited((datamod.split_batch(item) for item in data), samples)
    else:
        raise DeadNeuronError(
            f"cannot read data of type {type(data).__name__}; expected an array, a tensor, an (x, y) pair, an "
            "iterable of batches (DataLoader) or a path to a .npz/.npy"
        )
    yielded = False
    for x, y in source:
        x, y = _place(x, y, target)
        if x.ndim == 0 or x.shape[0] == 0:
            continue
        for part in _static(x, y, target.static_batch):
            yielded = True
            yield part
    if not yielded:
        raise DeadNeuronError("no samples: the data is empty; expected at least one sample")


def _static(x: torch.Tensor, y: torch.Tensor | None, size: int | None) -> Iterator[Batch]:
    """Chunks of exactly `size` samples, the last padded by repeating its first sample; or the batch as it is."""
    if size is None:
        yield x, y, int(x.shape[0])
        return
    for start in range(0, int(x.shape[0]), size):
        xs = x[start : start + size]
        ys = None if y is None else y[start : start + size]
        valid = int(xs.shape[0])
        if valid < size:
            xs = torch.cat([xs, xs[:1].expand(size - valid, *xs.shape[1:])])
            if ys is not None:
                ys = torch.cat([ys, ys[:1].expand(size - valid, *ys.shape[1:])])
        yield xs, ys, valid
