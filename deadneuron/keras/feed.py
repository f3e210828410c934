"""What a Keras model says about its inputs, and what the host data plan (`deadneuron.core.plan`) needs to read
Keras data: tensors become numpy arrays, a `keras.utils.PyDataset` an iterable of its batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from ..core.plan import Batch, Shape, Source, is_tensor
from ..errors import DeadNeuronError


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


def _to_numpy(value: Any) -> Any:
    return keras.ops.convert_to_numpy(value) if is_tensor(value) else value


def _take(x: Any, n: int) -> Any:
    return keras.tree.map_structure(lambda t: t[:n], x)


def _host(data: Any) -> Any:
    if is_tensor(data):
        return _to_numpy(data)
    if isinstance(data, tuple) and len(data) == 2 and all(is_tensor(d) or d is None for d in data):
        return (_to_numpy(data[0]), _to_numpy(data[1]))
    if isinstance(data, keras.utils.PyDataset):
        return (data[i] for i in range(len(data)))
    return data


SOURCE = Source(size=_leading, take=_take, host=_host)


def sample_shapes(model: Any, input_shape: Shape | None) -> list[Shape]:
    """One sample's shape per model input, for random standard-normal inputs."""
    if input_shape is not None:
        return [tuple(int(d) for d in input_shape)]
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
    return [tuple(int(d) for d in shape) for shape, _ in specs]  # type: ignore[arg-type]


def _show(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


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
