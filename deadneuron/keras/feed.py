"""Batches for a Keras scan: whatever the user passed, as (x, y) pairs with the sample count known on the host.

Accepted: None (random standard-normal inputs shaped from the model), a path, an array, an (x, y) pair, a tensor,
a `tf.data.Dataset`, a `keras.utils.PyDataset`, or any iterable of batches (`data.split_batch` reads each item).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from .. import data as core
from ..errors import DeadNeuronError


@dataclass
class Batch:
    x: Any  # an array or tensor, or a list/dict of them for multi-input models
    y: Any  # labels or None
    size: int  # samples in this batch, known without touching the device


def input_specs(model: Any) -> list[tuple[tuple[int | None, ...], str]] | None:
    """(per-sample shape, dtype) of each model input, or None when the model does not say (subclassed, unbuilt)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        return None
    return [(tuple(t.shape[1:]), str(t.dtype)) for t in inputs]


def _leading(x: Any) -> int:
    first = keras.tree.flatten(x)[0]
    shape = getattr(first, "shape", None)
    if shape is None or len(shape) == 0:
        raise DeadNeuronError(
            f"a batch holds a {type(first).__name__} without a batch axis; expected arrays or tensors shaped "
            "(batch, ...)"
        )
    size = shape[0]
    return int(size) if size is not None else int(keras.ops.shape(first)[0])


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, np.ndarray)


def _to_numpy(value: Any) -> Any:
    return keras.ops.convert_to_numpy(value) if _is_tensor(value) else value


def _take(x: Any, n: int) -> Any:
    return keras.tree.map_structure(lambda t: t[:n], x)


def random_batches(
    model: Any, samples: int, batch_size: int, input_shape: Sequence[int] | None, seed: int
) -> Iterator[Batch]:
    """`samples` standard-normal inputs, drawn batch by batch from `seed` (never all held at once)."""
    if input_shape is not None:
        shapes = [tuple(int(d) for d in input_shape)]
    else:
        specs = input_specs(model)
        if specs is None:
            raise DeadNeuronError(
                f"cannot tell the input shape of {type(model).__name__} (a subclassed or unbuilt model); pass "
                "input_shape=(...) (--input-shape) with one sample's shape, or pass data"
            )
        for shape, dtype in specs:
            if not dtype.startswith(("float", "bfloat")):
                raise DeadNeuronError(
                    f"the model takes {dtype} inputs, which random standard-normal samples cannot stand for; pass "
                    "data (--data PATH)"
                )
            if any(d is None for d in shape):
                raise DeadNeuronError(
                    f"the model's input shape {_show(shape)} has free dimensions; pass input_shape=(...) "
                    "(--input-shape) with one sample's full shape, or pass data"
                )
        shapes = [tuple(int(d) for d in shape) for shape, _ in specs]  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        xs = [rng.standard_normal((n, *shape), dtype=np.float32) for shape in shapes]
        yield Batch(xs[0] if len(xs) == 1 else xs, None, n)


def _show(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def batches(
    model: Any,
    data: Any,
    *,
    labels: Any,
    batch_size: int,
    samples: int | None,
    input_shape: Sequence[int] | None,
    seed: int,
) -> Iterator[Batch]:
    """The batches of one scan; at most `samples` samples when it is given."""
    if batch_size <= 0:
        raise DeadNeuronError(f"batch size must be positive, received {batch_size}")
    if samples is not None and samples <= 0:
        raise DeadNeuronError(f"samples must be positive, received {samples}")
    if data is None:
        if samples is None:
            raise DeadNeuronError("no data: pass data (an array, a dataset or a .npz/.npy path) or samples=N")
        yield from random_batches(model, samples, batch_size, input_shape, seed)
        return
    if _is_tensor(data):
        data = _to_numpy(data)
    elif isinstance(data, tuple) and len(data) == 2 and all(_is_tensor(d) or d is None for d in data):
        data = (_to_numpy(data[0]), _to_numpy(data[1]))
    if isinstance(data, core.Dataset):
        dataset: core.Dataset | None = core.validate(data)
    else:
        dataset = core.as_dataset(data, labels)
    if dataset is not None:
        if labels is not None and dataset.y is None:
            dataset = core.validate(core.Dataset(dataset.x, np.asarray(labels), dataset.source))
        for x, y in core.array_batches(core.limit(dataset, samples), batch_size):
            yield Batch(x, y, int(x.shape[0]))
        return
    if labels is not None:
        raise DeadNeuronError(
            "labels= goes with array data; a dataset or an iterable of batches carries its own labels as (x, y) pairs"
        )
    if isinstance(data, keras.utils.PyDataset):
        items: Any = (data[i] for i in range(len(data)))
    elif core.is_iterable_of_batches(data):
        items = data
    else:
        raise DeadNeuronError(
            f"cannot read data of type {type(data).__name__}; expected an array, an (x, y) pair, a tensor, a "
            "tf.data.Dataset, a PyDataset, an iterable of batches or a .npz/.npy path"
        )
    remaining = samples
    for item in items:
        x, y = core.split_batch(item)
        size = _leading(x)
        if remaining is not None and size > remaining:
            x, y, size = _take(x, remaining), (None if y is None else y[:remaining]), remaining
        if size == 0:
            continue
        yield Batch(x, y, size)
        if remaining is not None:
            remaining -= size
            if remaining <= 0:
                return


def check_shapes(model: Any, batch: Batch) -> None:
    """A one-line error when the data's samples do not fit the model's declared input."""
    specs = input_specs(model)
    if specs is None or isinstance(batch.x, dict):  # inputs by name: Keras matches them to the model itself
        return
    xs = keras.tree.flatten(batch.x)
    if len(xs) != len(specs):
        raise DeadNeuronError(
            f"the model takes {len(specs)} inputs, the data gives {len(xs)} per batch; pass one array per model input"
        )
    for (expected, _), x in zip(specs, xs, strict=True):
        received = tuple(int(d) for d in x.shape[1:])
        fits = len(expected) == len(received) and all(
            e is None or e == r for e, r in zip(expected, received, strict=True)
        )
        if not fits:
            raise DeadNeuronError(
                f"the data's samples have shape {_show(received)}, the model expects {_show(expected)} per sample "
                "(None: any size); pass data shaped like the model's input"
            )
