"""The Keras adapter: `load_model`, `scan` and `inspect` (docs/architecture.md, "The adapter contract").

A scan wraps every candidate site (`sites.py`), runs one eager pass on two samples of the first batch to learn the
sites in order of first execution and their shapes, then streams the batches through one step per batch: forward
under a gradient tape, the loss, dL/d(pre-activation) for every site at once, and the per-unit reductions added into
Keras variables (`accumulate.py`). On TensorFlow the step is a `tf.function`; on the torch backend it runs eagerly
with `torch.autograd.grad`. The JAX backend is refused. The wrappers are removed in `finally`.

Loss rules (design.md): with labels, cross-entropy on logits for integer labels and MSE for float targets; without,
the random-cotangent probe L = sum_n <v_n, f(x_n)> with v ~ N(0, I) drawn from `seed`. Losses are sums over samples,
so a sample's gradient does not depend on the batch size. When a Sequential or Functional model ends in a softmax or
sigmoid, its input is captured during the scan and the cross-entropy is taken on those logits (probabilities clipped
by a loss would zero the gradient of confident samples); for a subclassed model the output is taken as the logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from typing import Any

import keras
import numpy as np
from keras import ops

from ..errors import DeadNeuronError
from ..report import Report, SiteInfo
from .accumulate import SiteAccumulator
from .feed import Batch, batches, check_shapes, random_batches
from .sites import Recorder, Watch, output_activation, survey

Progress = Callable[[int], None]
_COMPILED = ("predict_function", "train_function", "test_function")
_MISSING = object()


def load_model(
    path: str, *, arch: str | None = None, unsafe_pickle: bool = False, unsafe_deserialization: bool = False
) -> Any:
    """A `.keras`/`.h5` model loaded with compile=False and safe_mode on (see `deadneuron.keras.loading`)."""
    from .loading import load_model as load

    return load(path, arch=arch, unsafe_pickle=unsafe_pickle, unsafe_deserialization=unsafe_deserialization)


def _backend() -> str:
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "torch"):
        raise DeadNeuronError(
            f"Keras models on the {backend} backend cannot be scanned yet; expected KERAS_BACKEND=tensorflow or "
            "torch: save the model and scan the file under one of those"
        )
    return backend


# ---------------------------------------------------------------------------------------------------- losses


def _is_integer(y: Any) -> bool:
    dtype = getattr(y, "dtype", None)
    if dtype is None:
        return False
    return keras.backend.standardize_dtype(dtype).startswith(("int", "uint", "bool"))


def resolve_loss(loss: str, labelled: bool, integer_labels: bool) -> str:
    if loss == "auto":
        return ("ce" if integer_labels else "mse") if labelled else "probe"
    if loss in ("ce", "mse") and not labelled:
        raise DeadNeuronError(
            f"loss={loss!r} needs labels; pass labels (a .npz with key 'y', an (x, y) pair) or use loss='probe'"
        )
    return loss


def _single_output(outputs: Any) -> Any:
    leaves = keras.tree.flatten(outputs)
    if len(leaves) != 1:
        raise DeadNeuronError(
            f"labels were given for a model with {len(leaves)} outputs; a task loss needs one output: use "
            "loss='probe' (--loss probe)"
        )
    return leaves[0]


def loss_value(kind: str, outputs: Any, y: Any, logits: Any, generator: Any) -> Any:
    """The scalar whose gradient the scan takes: a sum over samples (see the module docstring)."""
    if kind == "probe":
        total = None
        for output in keras.tree.flatten(outputs):
            if not keras.backend.is_float_dtype(keras.backend.standardize_dtype(output.dtype)):
                continue
            noise = keras.random.normal(ops.shape(output), seed=generator)
            term = ops.sum(ops.cast(output, "float32") * noise)
            total = term if total is None else total + term
        return total
    output = _single_output(outputs)
    if kind == "mse":
        target = ops.reshape(ops.cast(y, "float32"), ops.shape(output))
        return ops.sum(ops.square(ops.cast(output, "float32") - target))
    scores = ops.cast(logits if logits is not None else output, "float32")
    if scores.shape[-1] == 1 or len(scores.shape) == 1:  # one score per sample: binary cross-entropy
        target = ops.reshape(ops.cast(y, "float32"), ops.shape(scores))
        return ops.sum(ops.binary_crossentropy(target, scores, from_logits=True))
    if not _is_integer(y) and len(y.shape) == len(scores.shape):  # one-hot or soft targets
        return ops.sum(ops.categorical_crossentropy(ops.cast(y, "float32"), scores, from_logits=True))
    y = ops.cast(y, "int32")
    if len(y.shape) == len(scores.shape):
        y = ops.squeeze(y, axis=-1)
    return ops.sum(ops.sparse_categorical_crossentropy(y, scores, from_logits=True))


def _check_targets(kind: str, y: Any, output_shape: tuple[int, ...]) -> None:
    """Labels that cannot fit the output give a device error mid-scan; say it plainly first, from host shapes."""
    if kind not in ("ce", "mse") or y is None:
        return
    if any(d is None for d in (*y.shape[1:], *output_shape[1:])):
        return  # free dimensions: the model will say
    y_shape, out_shape = tuple(int(d) for d in y.shape[1:]), tuple(int(d) for d in output_shape[1:])
    if kind == "mse" or not _is_integer(y):
        if int(np.prod(y_shape)) != int(np.prod(out_shape)):
            raise DeadNeuronError(
                f"targets of shape {_show(y_shape)} per sample do not fit outputs of shape {_show(out_shape)}; "
                f"expected one target per output value for loss={kind!r}, or integer class labels for 'ce'"
            )
        return
    classes = out_shape[-1] if out_shape else 1
    if y_shape not in (out_shape[:-1], (*out_shape[:-1], 1)):
        raise DeadNeuronError(
            f"integer labels of shape {_show(y_shape)} per sample do not fit outputs of shape {_show(out_shape)}; "
            f"expected one class index per sample (shape {_show(out_shape[:-1])})"
        )
    if isinstance(y, np.ndarray) and y.size and classes > 1:
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            raise DeadNeuronError(
                f"labels run from {low} to {high}, but the model has {classes} outputs; expected class indices in "
                f"0..{classes - 1}"
            )


def _show(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


# ----------------------------------------------------------------------------------------------- discovery


def _to_tensors(x: Any) -> Any:
    return keras.tree.map_structure(ops.convert_to_tensor, x)


def _unit_axis(rank: int, channels_first: bool, override: int | None, name: str) -> int:
    if override is None:
        return 1 if channels_first and rank >= 3 else rank - 1
    axis = override + rank if override < 0 else override
    if not 1 <= axis < rank:
        raise DeadNeuronError(
            f"unit_axis={override} does not fit site {name!r}, whose activations have {rank} axes (axis 0 is the "
            f"batch); expected 1..{rank - 1} or -1"
        )
    return axis


def discover(
    model: Any, batch: Batch, recorder: Recorder, unit_axis: int | None
) -> tuple[list[tuple[SiteInfo, int, int]], Any]:
    """Sites in order of first execution as (SiteInfo, rank, positions), and the outputs, from one eager pass."""
    recorder.begin()
    x = _to_tensors(keras.tree.map_structure(lambda t: t[:2], batch.x))
    try:
        outputs = model(x, training=False)
    except DeadNeuronError:
        raise
    except Exception as error:  # the model refused the data: a user error, with the model's own words
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise DeadNeuronError(
            f"the model failed on the first batch ({type(error).__name__}: {first_line}); check that the data "
            "matches the model's input"
        ) from error
    found = []
    for name, _, a, candidate in recorder.records:
        shape = tuple(int(d) for d in a.shape)
        if len(shape) == 1:
            shape = (*shape, 1)
        rank = len(shape)
        if rank < 2:
            continue
        axis = _unit_axis(rank, candidate.channels_first, unit_axis, name)
        units = shape[axis]
        positions = int(np.prod(shape[1:], dtype=np.int64)) // max(units, 1)
        found.append((SiteInfo(name=name, kind=candidate.kind, units=units, unit_axis=axis), rank, positions))
    recorder.clear()
    return found, outputs


# ---------------------------------------------------------------------------------------------------- steps


def _tensorflow_step(
    model: Any, recorder: Recorder, accumulators: dict[str, SiteAccumulator], kind: str, atol: float, gtol: float,
    generator: Any,
) -> Callable[[Any, Any], None]:
    import tensorflow as tf

    def step(x: Any, y: Any) -> None:
        recorder.begin()
        if kind == "none":
            model(x, training=False)
            grads = [None] * len(recorder.records)
        else:
            # Only the pre-activations are gradient sources: no weight gradient is computed.
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                recorder.expose = lambda z: (tape.watch(z), z)[1]
                try:
                    outputs = model(x, training=False)
                finally:
                    recorder.expose = lambda z: z
                loss = loss_value(kind, outputs, y, recorder.logits, generator)
            sources = [record[1] for record in recorder.records]
            grads = tape.gradient(loss, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        for (name, z, a, _), g in zip(recorder.records, grads, strict=True):
            if name in accumulators:
                accumulators[name].update(z, a, g, atol, gtol)
        recorder.clear()  # the records are graph tensors of this trace: never keep them

    return tf.function(step, reduce_retracing=True)


def _torch_step(
    model: Any, recorder: Recorder, accumulators: dict[str, SiteAccumulator], kind: str, atol: float, gtol: float,
    generator: Any,
) -> Callable[[Any, Any], None]:
    import torch

    def expose(z: Any) -> Any:
        # a pre-activation that needs no gradient has no watched site upstream: detaching it cuts nothing
        return z if z.requires_grad else z.detach().requires_grad_(True)

    def step(x: Any, y: Any) -> None:
        recorder.begin()
        try:
            if kind == "none":
                with torch.no_grad():
                    model(x, training=False)
                grads: list[Any] = [None] * len(recorder.records)
            else:
                recorder.expose = expose
                try:
                    outputs = model(x, training=False)
                finally:
                    recorder.expose = lambda z: z
                loss = loss_value(kind, outputs, y, recorder.logits, generator)
                sources = [record[1] for record in recorder.records]
                found: Sequence[Any] = (None,) * len(sources)
                if loss is not None and loss.requires_grad and sources:
                    found = torch.autograd.grad(loss, sources, allow_unused=True)
                grads = [torch.zeros_like(z) if g is None else g for z, g in zip(sources, found, strict=True)]
            with torch.no_grad():
                for (name, z, a, _), g in zip(recorder.records, grads, strict=True):
                    if name in accumulators:
                        accumulators[name].update(z.detach(), a.detach(), g, atol, gtol)
        finally:
            recorder.clear()

    return step


# ------------------------------------------------------------------------------------------------ the scan


def _snapshot(model: Any) -> dict[str, Any]:
    return {attribute: vars(model).get(attribute, _MISSING) for attribute in _COMPILED}


def _restore(model: Any, saved: dict[str, Any]) -> None:
    """Compiled predict/train/test functions exactly as they were: none left traced with a wrapper inside."""
    for attribute, before in saved.items():
        if before is _MISSING:
            vars(model).pop(attribute, None)
        else:
            vars(model)[attribute] = before


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
) -> Report:
    """Scan a Keras model: dead, dormant and gradient-dead units per activation site (see the module docstring)."""
    backend = _backend()
    feed: Iterator[Batch] = batches(
        model, data, labels=labels, batch_size=batch_size, samples=samples, input_shape=input_shape, seed=seed
    )
    first = next(feed, None)
    if first is None:
        raise DeadNeuronError("the data is empty: no batch came out of it; expected at least one sample")
    check_shapes(model, first)
    labelled = first.y is not None
    kind = resolve_loss(loss, labelled, labelled and _is_integer(first.y))
    warnings: list[str] = []
    if not model.built:
        warnings.append(
            "the model had not been built (never called): the scan built it, so it saw freshly initialised weights"
        )
    found = survey(model)
    candidates = list(found.candidates)
    logits = output_activation(model) if kind == "ce" else None
    if logits is not None:
        candidates.append(logits)
    recorder = Recorder()
    saved = _snapshot(model)
    accumulators: dict[str, SiteAccumulator] = {}
    try:
        with Watch(candidates, recorder):
            sites, outputs = discover(model, first, recorder, unit_axis)
            output_shape = tuple(_single_output(outputs).shape) if kind in ("ce", "mse") else ()
            accumulators = {info.name: SiteAccumulator(info, rank, positions) for info, rank, positions in sites}
            generator = keras.random.SeedGenerator(seed) if kind == "probe" else None
            make_step = _tensorflow_step if backend == "tensorflow" else _torch_step
            step = make_step(model, recorder, accumulators, kind, atol, gtol, generator)
            for batch in chain([first], feed):
                if (batch.y is not None) != labelled:
                    raise DeadNeuronError(
                        "some batches carry labels and some do not; expected labels on every batch or on none"
                    )
                if kind in ("ce", "mse"):
                    _check_targets(kind, batch.y, output_shape)
                    y = ops.convert_to_tensor(batch.y)
                else:
                    y = None
                step(_to_tensors(batch.x), y)
                if progress is not None:
                    progress(batch.size)
    finally:
        _restore(model, saved)
    if not accumulators:
        warnings.append(
            "no activation sites found: the model has no ReLU-family or smooth-rectifier activation that can be "
            "watched (activations called inside a subclassed model's own call() are invisible)"
        )
    return Report.build(
        framework="keras",
        model=name or type(model).__name__,
        loss=kind,
        sites=[(accumulator.site, accumulator.to_stats()) for accumulator in accumulators.values()],
        atol=atol,
        gtol=gtol,
        warnings=warnings,
        unobserved=found.unobserved,
    )


def inspect(model: Any, *, input_shape: Sequence[int] | None = None) -> list[SiteInfo]:
    """The sites of `model` in order of first execution, from one eager pass on two random samples."""
    _backend()
    first = next(random_batches(model, 2, 2, input_shape, seed=0))
    check_shapes(model, first)
    recorder = Recorder()
    saved = _snapshot(model)
    try:
        with Watch(survey(model).candidates, recorder):
            sites, _ = discover(model, first, recorder, None)
    finally:
        _restore(model, saved)
    return [info for info, _, _ in sites]
