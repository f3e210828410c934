"""The host data plan: whatever the user passed as data, as batches of at most `samples` samples, framework-free.

Accepted: None (random standard-normal inputs, drawn batch by batch from the seed), a path, an array, an (x, y)
pair of arrays (`deadneuron.data`: memory-mapped, read one batch at a time), a framework tensor or a pair of them
(sliced), a mapping of a model's keyword inputs (`input_ids`, `attention_mask`, ..., labels under 'labels'; arrays
or tensors, sliced key by key), or any iterable of batches (DataLoader, tf.data, a list; `data.split_batch` reads
each item: a tensor, an (x, y) pair whose x may be a tuple of positional inputs, or a mapping). A backend
says how to turn its tensors into something this module can slice (`Source`), and moves each batch to its device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import data as datamod
from ..errors import DeadNeuronError
from .options import ScanOptions

Shape = tuple[int, ...]


@dataclass
class Batch:
    """One batch: inputs (an array or tensor, or a list/dict of them), labels or None, and how many samples are
    real (a static-batch program pads the last batch; `valid` never counts the padding)."""

    x: Any
    y: Any
    valid: int


@dataclass(frozen=True)
class Source:
    """What a backend tells the plan about its own types.

    `host`: the user's data with framework-only kinds turned into ones the plan reads (None when unchanged);
    `size`: the number of samples in a batch's inputs; `take`: the first n samples of a batch's inputs.
    """

    size: Callable[[Any], int]
    take: Callable[[Any, int], Any]
    host: Callable[[Any], Any] | None = None


def leading(x: Any) -> int:
    """Samples in a batch of arrays or tensors (the first leaf's leading axis)."""
    first = x
    while isinstance(first, (list, tuple, dict)) and first:
        first = next(iter(first.values())) if isinstance(first, dict) else first[0]
    shape = getattr(first, "shape", None)
    if shape is None or len(shape) == 0:
        raise DeadNeuronError(
            f"a batch holds a {type(first).__name__} without a batch axis; expected arrays or tensors shaped "
            "(batch, ...)"
        )
    return int(shape[0])


def first_rows(x: Any, n: int) -> Any:
    """The first `n` samples of a batch of arrays or tensors (lists and dicts of them too)."""
    if isinstance(x, dict):
        return {key: first_rows(value, n) for key, value in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(first_rows(value, n) for value in x)
    return x[:n]


PLAIN = Source(size=leading, take=first_rows)


# One random sample may take this much: a 3-D volume of 512**3 values does; an input shape declared by a file
# (a .pt2's example input stored as an expanded view, a Keras input layer) may ask for any size at no cost.
RANDOM_SAMPLE_LIMIT = 1 << 30


def random_inputs(
    samples: int, shapes: Sequence[Shape], batch_size: int, seed: int, vocabulary: int | None = None
) -> Iterator[Any]:
    """`samples` standard-normal float32 inputs in batches, drawn batch by batch from `seed` (never all held at
    once). One array per shape; a single shape gives a plain array. The same draw whatever the backend, so
    `deadneuron.torch.distributed` can replay it rank by rank."""
    for shape in shapes:
        size = int(np.prod(shape, dtype=object)) * 8  # float32 or int64: at most 8 bytes a value
        if size > RANDOM_SAMPLE_LIMIT:
            raise DeadNeuronError(
                f"random inputs of shape {tuple(shape)} would take {size:,} bytes a sample, more than "
                f"{RANDOM_SAMPLE_LIMIT:,}; refused (a model file declares its own input shape: a crafted one could "
                "exhaust memory); pass real data with --data, or a smaller --input-shape"
            )
    rng = np.random.default_rng(seed)
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        xs = [
            rng.standard_normal((n, *shape), dtype=np.float32)
            if vocabulary is None
            else rng.integers(0, vocabulary, (n, *shape), dtype=np.int64)
            for shape in shapes
        ]
        yield xs[0] if len(xs) == 1 else xs


def limited(items: Iterable[tuple[Any, Any]], samples: int | None, source: Source = PLAIN) -> Iterator[Batch]:
    """The one sample limiter: batches until `samples` samples have passed (the last one cut); empty ones skipped."""
    remaining = samples
    for x, y in items:
        size = source.size(x)
        if remaining is not None and size > remaining:
            x, y, size = source.take(x, remaining), (None if y is None else y[:remaining]), remaining
        if size == 0:
            continue
        yield Batch(x, y, size)
        if remaining is not None:
            remaining -= size
            if remaining <= 0:
                return


def is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, np.ndarray)


def host_batches(
    data: Any,
    labels: Any,
    options: ScanOptions,
    *,
    shapes: Callable[[], Sequence[Shape]],
    source: Source = PLAIN,
    batch_size: int | None = None,
    vocabulary: int | None = None,
) -> Iterator[Batch]:
    """The batches of one scan, on the host (or where the user's tensors live); at most `options.samples` samples.

    `shapes()` gives one sample's shape per model input for random inputs (called only when `data` is None);
    `vocabulary`: random inputs are token ids in [0, vocabulary) rather than standard-normal floats (a model that
    starts with an embedding); `batch_size` overrides the options' (a program exported with a static batch size).
    """
    size = batch_size or options.batch_size
    samples = options.samples
    if data is None:
        if samples is None:
            raise DeadNeuronError(
                "no data: pass data (an array, a tensor, a DataLoader or a .npz/.npy path), or "
                "samples=N for N random inputs"
            )
        items: Iterable[tuple[Any, Any]] = (
            (x, None) for x in random_inputs(samples, shapes(), size, options.seed, vocabulary)
        )
        yield from limited(items, samples, source)
        return
    if source.host is not None:
        data = source.host(data)
    dataset = datamod.validate(data) if isinstance(data, datamod.Dataset) else datamod.as_dataset(data, labels)
    if dataset is not None:
        if labels is not None and dataset.y is None:
            dataset = datamod.validate(datamod.Dataset(dataset.x, np.asarray(labels), dataset.source))
        yield from limited(datamod.array_batches(datamod.limit(dataset, samples), size), samples, source)
        return
    if isinstance(data, Mapping):  # keyword inputs held as tensors (numpy ones became a Dataset above)
        x, y = datamod.split_mapping(data, "the data")
        y = y if labels is None else labels
        n = leading(x)
        if y is not None and len(y) != n:
            raise DeadNeuronError(f"{len(y)} labels for {n} inputs; expected one label per input")
        parts = ((datamod.rows(x, i, i + size), None if y is None else y[i : i + size]) for i in range(0, n, size))
        yield from limited(parts, samples, source)
        return
    if is_tensor(data) or (isinstance(data, tuple) and len(data) == 2 and is_tensor(data[0])):
        x, y = (data, labels) if is_tensor(data) else (data[0], data[1] if labels is None else labels)
        if len(x.shape) == 0 or x.shape[0] == 0:
            raise DeadNeuronError(f"the inputs are empty (shape {tuple(x.shape)}); expected at least one sample")
        if y is not None and len(y) != len(x):
            raise DeadNeuronError(f"{len(y)} labels for {len(x)} inputs; expected one label per input")
        slices = ((x[i : i + size], None if y is None else y[i : i + size]) for i in range(0, len(x), size))
        yield from limited(slices, samples, source)
        return
    if not datamod.is_iterable_of_batches(data):
        raise DeadNeuronError(
            f"cannot read data of type {type(data).__name__}; expected an array, a tensor, an (x, y) pair, an "
            "iterable of batches (DataLoader, tf.data.Dataset) or a path to a .npz/.npy"
        )
    if labels is not None:
        raise DeadNeuronError(
            "labels= goes with array data; a dataset or an iterable of batches carries its own labels as (x, y) pairs"
        )
    yield from limited((datamod.split_batch(item) for item in data), samples, source)


def check_labelled(batch: Batch, labelled: bool) -> None:
    """Labels on every batch or on none: the loss was resolved from the first batch."""
    if (batch.y is not None) != labelled:
        raise DeadNeuronError("some batches carry labels and some do not; expected labels on every batch or on none")


def is_one_hot(y: np.ndarray) -> bool:
    """Float labels that are one-hot rows over their last axis (every value 0 or 1, one 1 per row), as
    `keras.utils.to_categorical` makes them: class labels, for which `loss="auto"` takes cross-entropy, not MSE."""
    if y.ndim < 2 or y.shape[-1] < 2 or y.size == 0 or not np.issubdtype(y.dtype, np.floating):
        return False
    return bool(np.isin(y, (0.0, 1.0)).all() and (y.sum(axis=-1) == 1).all())
