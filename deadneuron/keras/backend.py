"""The Keras backend of the scan engine (`deadneuron.core.engine`): the primitives a scan needs from Keras.

A scan wraps every candidate site (`sites.py`), runs one eager pass on two samples of the first batch to learn the
sites in order of first execution and their shapes, then streams the batches through one step per batch: forward
under a gradient tape, the loss, dL/d(pre-activation) for every site at once, and the per-unit reductions added into
Keras variables (`accumulate.py`). On TensorFlow the step is a `tf.function`; on the torch backend it runs eagerly
with `torch.autograd.grad`. The JAX backend is refused. The wrappers are removed in `finally`.

Loss rules (design.md): with labels, cross-entropy on logits for class labels (integers or one-hot rows) and MSE for
other float targets; without, the random-cotangent probe L = sum_n <v_n, f(x_n)> with v ~ N(0, I) drawn from `seed`.
Losses are sums over samples, so a sample's gradient does not depend on the batch size. When a Sequential or
Functional model ends in a softmax or sigmoid, its input is captured during the scan and the cross-entropy is taken
on those logits (probabilities clipped by a loss would zero the gradient of confident samples); for a subclassed
model the output is taken as the logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras import ops

from ..core.engine import Backend
from ..core.options import ResolvedLoss, ScanOptions
from ..core.plan import Batch, Shape, is_one_hot
from ..core.stats import SiteStats
from ..errors import DeadNeuronError
from ..report import SiteInfo
from .accumulate import Accumulators, SiteAccumulator, SiteShape
from .feed import SOURCE, check_shapes, sample_shapes
from .graph import step_options
from .loading import load_model
from .sites import Recorder, Watch, output_activation, survey
from .swap import copy_model, swap_file, swap_model

__all__ = ["BACKEND", "KerasRun", "is_integer", "loss_value", "prepare", "train"]

_COMPILED = ("predict_function", "train_function", "test_function")
_MISSING = object()


def _backend() -> str:
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "torch"):
        raise DeadNeuronError(
            f"Keras models on the {backend} backend cannot be scanned yet; expected KERAS_BACKEND=tensorflow or "
            "torch: save the model and scan the file under one of those"
        )
    return backend


# ---------------------------------------------------------------------------------------------------- losses


def is_integer(y: Any) -> bool:
    dtype = getattr(y, "dtype", None)
    if dtype is None:
        return False
    return keras.backend.standardize_dtype(dtype).startswith(("int", "uint", "bool"))


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
    if not is_integer(y) and len(y.shape) == len(scores.shape):  # one-hot or soft targets
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
    if kind == "mse" or not is_integer(y):
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
) -> tuple[list[SiteShape], Any]:
    """Sites in order of first execution, with their shapes, and the outputs, from one eager pass."""
    recorder.begin()
    x = keras.tree.map_structure(lambda t: t[:2], batch.x)
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
        info = SiteInfo(name=name, kind=candidate.kind, units=units, unit_axis=axis)
        found.append(SiteShape(info, rank, positions, rows=shape[0]))
    recorder.clear()
    return found, outputs


# ---------------------------------------------------------------------------------------------------- steps


def _exposed_forward(model: Any, x: Any, recorder: Recorder, expose: Callable[[Any], Any]) -> Any:
    """The model's outputs, with every site's pre-activation passed through `expose` (made a gradient source)."""
    recorder.expose = expose
    try:
        return model(x, training=False)
    finally:
        recorder.expose = lambda z: z


def _tensorflow_step(watch: KerasWatch) -> Callable[[Any, Any], None]:
    """One batch as a `tf.function`: forward under a tape that watches only the pre-activations, the loss, every
    site's gradient at once, the statistics added into the accumulators' variables."""
    import tensorflow as tf

    model, recorder, accumulators, kind, generator = watch.parts()
    atol, gtol = watch.atol, watch.gtol

    def step(x: Any, y: Any) -> None:
        recorder.begin()
        if kind == "none":
            model(x, training=False)
            grads = [None] * len(recorder.records)
        else:
            # Only the pre-activations are gradient sources: no weight gradient is computed.
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                outputs = _exposed_forward(model, x, recorder, lambda z: (tape.watch(z), z)[1])
                loss = loss_value(kind, outputs, y, recorder.logits, generator)
            sources = [record[1] for record in recorder.records]
            grads = tape.gradient(loss, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        records = [(name, z, a, g) for (name, z, a, _), g in zip(recorder.records, grads, strict=True)]
        accumulators.update(records, atol, gtol)
        recorder.clear()  # the records are graph tensors of this trace: never keep them

    # No autograph: the step has no tensor-dependent Python control flow, and Keras layers are called unconverted
    # anyway; converting this code and the reductions only made tracing slower.
    traced = tf.function(step, autograph=False)

    def any_batch(t: Any) -> Any:
        if isinstance(t, tf.Tensor) and t.shape.rank:
            return tf.TensorSpec((None, *t.shape[1:]), t.dtype)
        return t

    traced_once = False
    options = step_options()

    def run(x: Any, y: Any) -> None:
        # Trace once for any batch size: a last, smaller batch then reuses the step (a retrace of a deep model costs
        # several batches). A model that needs its batch size while tracing (`x.shape[0]` in a reshape) is traced
        # anew for each batch size it gets, by a fresh function that has not seen the failed trace.
        nonlocal traced, traced_once
        if not traced_once:
            traced_once = True
            try:
                traced.get_concrete_function(*tf.nest.map_structure(any_batch, (x, y)))
            except Exception:
                recorder.clear()
                traced = tf.function(step, autograph=False)
        with options():
            traced(x, y)

    return run


def _torch_step(watch: KerasWatch) -> Callable[[Any, Any], None]:
    """One batch, eagerly on Keras's torch backend, with `torch.autograd.grad` for the sites' gradients."""
    import torch

    model, recorder, accumulators, kind, generator = watch.parts()
    atol, gtol = watch.atol, watch.gtol

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
                outputs = _exposed_forward(model, x, recorder, expose)
                loss = loss_value(kind, outputs, y, recorder.logits, generator)
                sources = [record[1] for record in recorder.records]
                found: Sequence[Any] = (None,) * len(sources)
                if loss is not None and loss.requires_grad and sources:
                    found = torch.autograd.grad(loss, sources, allow_unused=True)
                grads = [torch.zeros_like(z) if g is None else g for z, g in zip(sources, found, strict=True)]
            with torch.no_grad():
                records = [
                    (name, z.detach(), a.detach(), g)
                    for (name, z, a, _), g in zip(recorder.records, grads, strict=True)
                ]
                accumulators.update(records, atol, gtol)
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


@dataclass
class KerasRun:
    """A Keras model ready to scan; Keras models carry no example input and no static batch size."""

    model: Any
    display: str
    warnings: list[str] = field(default_factory=list)
    static_batch: int | None = None
    example_shape: Shape | None = None
    vocabulary: int | None = None  # Keras models take the inputs their spec says: random inputs are floats
    source: Any = SOURCE

    def evaluating(self) -> AbstractContextManager[Any]:
        return nullcontext()  # `output` calls the model with training=False, and no tape records it

    def output(self, x: Any) -> Any:
        """The first output, compared before and after a swap; for a model that ends in a softmax or sigmoid, its
        logits (the input of that layer, as the scan's cross-entropy takes them): probabilities of a random-init
        classifier are nearly uniform, so their drift read ~0 while every argmax moved (Xception: 0.2%, agreement
        0%)."""
        logits, found = output_activation(self.model), None
        if logits is not None:
            recorder = Recorder()
            with Watch([logits], recorder):
                outputs = self.model(x, training=False)
                found = recorder.logits  # the watch clears its recorder on leaving
        else:
            outputs = self.model(x, training=False)
        leaves = keras.tree.flatten(outputs)
        if not leaves:
            raise DeadNeuronError("the model returns no output to compare")
        if found is not None and tuple(found.shape) == tuple(leaves[0].shape):
            return found
        return leaves[0]

    def drift_sums(self, a: Any, b: Any, classifier: bool) -> tuple[Any, Any, Any]:
        a, b = ops.cast(a, "float64"), ops.cast(b, "float64")
        agreed = None
        if classifier:
            same = ops.equal(ops.argmax(a, axis=-1), ops.argmax(b, axis=-1))
            agreed = ops.sum(ops.cast(same, "int64"))  # per position (token, pixel)
        return ops.sum(ops.square(b - a)), ops.sum(ops.square(a)), agreed

    def sample_shapes(self, input_shape: Shape | None) -> list[Shape] | None:
        return sample_shapes(self.model, input_shape)

    def class_labels(self, y: Any) -> bool:
        return is_integer(y) or is_one_hot(np.asarray(ops.convert_to_numpy(y)))  # once per scan

    def own_loss(self, batch: Batch) -> bool:
        return False  # Keras models take no labels in their call

    def place(self, batch: Batch) -> Iterator[Batch]:
        check_shapes(self.model, batch)
        yield Batch(_to_tensors(batch.x), batch.y, batch.valid)

    @contextmanager
    def watch(self, options: ScanOptions, loss: ResolvedLoss, first: Batch) -> Iterator[KerasWatch]:
        model = self.model
        found = survey(model)
        candidates = list(found.candidates)
        logits = output_activation(model) if loss == "ce" else None
        if logits is not None:
            candidates.append(logits)
        steps = _STEPS.get()
        key = steps.key(model, candidates, options, loss, first) if steps is not None else None
        kept = steps.watches.get(key) if steps is not None and key is not None else None
        saved = _snapshot(model)
        try:
            if kept is not None:  # the same sites and inputs as a scan this owner made before: its traced step
                kept.reset()
                with Watch(candidates, kept.recorder):  # wrapped as then, should the step trace again
                    yield kept
                return
            recorder = Recorder()
            with Watch(candidates, recorder):
                sites, outputs = discover(model, first, recorder, options.unit_axis)
                watch = KerasWatch(self, recorder, sites, outputs, loss, options, found.unobserved)
                if steps is not None and key is not None:
                    steps.watches[key] = watch
                yield watch
        finally:
            _restore(model, saved)


class Steps:
    """Traced scan steps kept across the scans of one owner: `DeadNeuronCallback` scans the same probe of the same
    model every epoch, and tracing the step (and discovering the sites) cost more than scanning a small probe.

    A kept step is used again only for the same model object, the same watched layers with the same `call` and
    `activation` objects, the same options and loss, and inputs of the same shapes past the batch and dtypes; its
    statistics variables and the probe's seed state are reset first, so each scan reports what a fresh one would.
    The owner clears it when training starts (a model may be edited between two `fit` calls, never during one)."""

    def __init__(self) -> None:
        self.watches: dict[tuple[Any, ...], KerasWatch] = {}

    @contextmanager
    def active(self) -> Iterator[None]:
        """Scans in this block (this thread or task) keep their steps here and use the ones kept."""
        token = _STEPS.set(self)
        try:
            yield
        finally:
            _STEPS.reset(token)

    def key(
        self, model: Any, candidates: list[Any], options: ScanOptions, loss: ResolvedLoss, first: Batch
    ) -> tuple[Any, ...] | None:
        def signature(t: Any) -> Any:
            shape = getattr(t, "shape", None)
            dtype = getattr(t, "dtype", None)
            if shape is None or dtype is None:
                return None
            return tuple(None if d is None else int(d) for d in tuple(shape)[1:]), str(dtype)

        inputs = [signature(t) for t in keras.tree.flatten(first.x)]
        labels = [signature(t) for t in keras.tree.flatten(first.y)] if first.y is not None else []
        if any(s is None for s in (*inputs, *labels)):
            return None
        watched = tuple((id(c.obj), c.attribute, c.kind, c.role, c.path, _held(c.obj, c.attribute)) for c in candidates)
        return (id(model), watched, options, loss, tuple(inputs), tuple(labels))

    def clear(self) -> None:
        self.watches.clear()


_STEPS: ContextVar[Steps | None] = ContextVar("deadneuron_keras_steps", default=None)


def _held(obj: Any, attribute: str) -> int:
    """The identity of what `obj.attribute` holds: its instance value (a fused `activation`), else the class's
    (a layer's `call`); a bound method is made anew at each access and has no identity to keep."""
    value = vars(obj).get(attribute, _MISSING)
    if value is _MISSING:
        value = inspect.getattr_static(type(obj), attribute, None)
    return id(value)


class KerasWatch:
    """The wrapped sites of one scan, their accumulators (Keras variables) and the compiled step."""

    def __init__(
        self,
        run: KerasRun,
        recorder: Recorder,
        sites: list[SiteShape],
        outputs: Any,
        loss: ResolvedLoss,
        options: ScanOptions,
        unobserved: list[str],
    ) -> None:
        self.model = run.model
        self.recorder = recorder
        self.loss = loss
        self.atol, self.gtol = options.atol, options.gtol
        self.warnings: list[str] = []
        self.unobserved = unobserved
        self.output_shape = tuple(_single_output(outputs).shape) if loss in ("ce", "mse") else ()
        self.table = Accumulators(sites)
        self.generator = keras.random.SeedGenerator(options.seed) if loss == "probe" else None
        self._seed_state = ops.convert_to_numpy(self.generator.state) if self.generator is not None else None
        self._step = (_tensorflow_step if _backend() == "tensorflow" else _torch_step)(self)

    def reset(self) -> None:
        """As a fresh scan starts: statistics zero, the probe's random stream from its seed again."""
        self.table.reset()
        if self.generator is not None:
            self.generator.state.assign(self._seed_state)

    def parts(self) -> tuple[Any, Recorder, Accumulators, ResolvedLoss, Any]:
        """What a step closes over: the model, the recorder, the accumulators, the loss, the probe's seed."""
        return self.model, self.recorder, self.table, self.loss, self.generator

    def step(self, batch: Batch) -> None:
        y = None
        if self.loss in ("ce", "mse"):
            _check_targets(self.loss, batch.y, self.output_shape)
            y = ops.convert_to_tensor(batch.y)
        self._step(batch.x, y)

    def sites(self) -> list[SiteInfo]:
        return [accumulator.info for accumulator in self.table.sites()]

    def accumulators(self) -> list[SiteAccumulator]:
        return self.table.sites()

    def collect(self, accumulators: list[Any]) -> list[tuple[SiteInfo, SiteStats]]:
        host = self.table.host()
        return [(accumulator.info, accumulator.stats(host)) for accumulator in accumulators]


def _training_loss(kind: ResolvedLoss, y: Any, model: Any) -> Any:
    """The Keras loss a fine-tuning compiles: MSE, or (sparse) categorical cross-entropy, on logits unless the
    model ends in a softmax or sigmoid."""
    if kind == "mse":
        return keras.losses.MeanSquaredError()
    from_logits = output_activation(model) is None
    if np.ndim(y) >= 2 and not is_integer(y) and np.shape(y)[-1] > 1:
        return keras.losses.CategoricalCrossentropy(from_logits=from_logits)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def train(model: Any, batches: Iterator[Batch], *, loss: ResolvedLoss, lr: float, seed: int) -> Any:
    """A copy of `model` (a clone with the weights, or a deep copy of a subclassed model), compiled with Adam(lr)
    and trained with one `train_on_batch` per batch."""
    trained = copy_model(model)
    compiled = False
    for batch in batches:
        if not compiled:
            trained.compile(
                optimizer=keras.optimizers.Adam(learning_rate=lr), loss=_training_loss(loss, batch.y, trained)
            )
            compiled = True
        trained.train_on_batch(batch.x, batch.y)
    return trained


NO_SITES = (
    "no activation sites found: the model has no ReLU-family or smooth-rectifier activation that can be watched "
    "(activations called inside a subclassed model's own call() are invisible)"
)


def prepare(model: Any, name: str | None) -> KerasRun:
    """`model` ready to scan (TensorFlow or torch as Keras backend)."""
    _backend()
    run = KerasRun(model, name or type(model).__name__)
    if not model.built:
        run.warnings.append(
            "the model had not been built (never called): the scan built it, so it saw freshly initialised weights"
        )
    return run


BACKEND = Backend("keras", NO_SITES, prepare, load_model, swap_model, swap_file, swap_model, train)
