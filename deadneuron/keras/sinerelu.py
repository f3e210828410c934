"""SineReLU for Keras 3: the `sinerelu` function and the serializable `SineReLU` layer (design.md).

f(z) = z for z > 0 and eps*sqrt(2)*sin(z - pi/4) (= eps*(sin z - cos z)) for z <= 0; `form="max"` is
keras-contrib's max(eps*(sin z - cos z), z), computed with keras-contrib's own expression so that its models
match bit for bit. The piecewise form uses one transcendental per element per pass; the backward pass
keeps only the input: f'(z) = eps*sqrt(2)*cos(z - pi/4) on the negative branch.

`SineReLU` is a `keras.layers.Layer` registered as "deadneuron>SineReLU". A Layer instance is also a callable
that Keras serializes with its config, so `Dense(8, activation=SineReLU(0.025))` keeps epsilon and form
through a `.keras` or `.h5` save (a registered plain function is saved by name only: its epsilon is lost).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import keras

from ..core.sinerelu import DEFAULT_EPSILON, Form, check_epsilon, check_form
from ..core.sinerelu import max_form_crossing as _max_form_crossing
from . import fused

# sin z - cos z = sqrt(2) sin(z - pi/4) and cos z + sin z = sqrt(2) cos(z - pi/4): one transcendental.
_SHIFT = math.pi / 4

Kernel = Callable[[Any], Any]


def _branch_rule(form: str, crossing: float | None) -> str:
    """Where the backward pass takes the sine branch's slope.

    "z<=0" (piecewise), "z<z*" (max form, z* known) or "sine>z" (max form with eps*sqrt(2) >= 1: recompute the
    forward's comparison, at the cost of one more sine).
    """
    if form == "piecewise":
        return "z<=0"
    return "z<z*" if crossing is not None else "sine>z"


@functools.lru_cache(maxsize=64)
def _kernel(epsilon: float, form: str, backend: str) -> Kernel:
    """The custom-gradient function of one (epsilon, form) on one Keras backend (cached: layers share it)."""
    if backend == "tensorflow":
        return _tensorflow_kernel(epsilon, form)
    return _generic_kernel(epsilon, form)


def _generic_kernel(epsilon: float, form: str) -> Kernel:
    """keras.ops version: any backend whose `keras.ops.custom_gradient` works (TensorFlow, torch, JAX)."""
    ops = keras.ops
    scale = epsilon * math.sqrt(2)
    crossing = _max_form_crossing(epsilon) if form == "max" else None
    branch = _branch_rule(form, crossing)

    def sine_branch_mask(z: Any) -> Any:
        if branch == "z<=0":
            return ops.less_equal(z, 0)
        if branch == "z<z*":
            return ops.less(z, crossing)
        return ops.greater(ops.multiply(ops.sin(ops.subtract(z, _SHIFT)), scale), z)

    @ops.custom_gradient
    def apply(z: Any) -> Any:
        if form == "max":
            # keras-contrib's own expression, op for op, so that its models compute bit for bit as they did.
            out = ops.maximum(ops.multiply(epsilon, ops.subtract(ops.sin(z), ops.cos(z))), z)
        else:
            out = ops.where(ops.greater(z, 0), z, ops.multiply(ops.sin(ops.subtract(z, _SHIFT)), scale))

        # The torch backend passes the cotangent as `upstream=`; TensorFlow and JAX pass it positionally.
        def grad(*args: Any, upstream: Any = None) -> Any:
            if upstream is None:
                (upstream,) = args
            slope = ops.multiply(ops.cos(ops.subtract(z, _SHIFT)), scale)
            return ops.where(sine_branch_mask(z), ops.multiply(upstream, slope), upstream)

        return out, grad

    return apply


# Eager calls on at least this many elements run as a graph, smaller ones as eager ops: a graph call costs
# ~0.4 ms here and saves ~3.5 ns per element (eager ops vs graph, measured at 64K and 16M elements).
GRAPH_MIN_ELEMENTS = 1 << 18


def _tensorflow_kernel(epsilon: float, form: str) -> Kernel:
    """TensorFlow version of the same maths, faster than the keras.ops one (docs/benchmarks.md).

    In a graph (a model's train or predict function, a user's tf.function), float32 tensors of the piecewise
    form from `fused.MIN_ELEMENTS` elements run one XLA-compiled loop per direction (`fused.py`); smaller ones,
    other dtypes and the max form run the ops below, inlined into the graph. Why not keras.ops for those:
    `tf.where` is SelectV2, about twice the cost of same-shape `Select` on CPU. Large eager calls run the same
    ops as a graph (`tf.function` without XLA, so that no eager call waits for a compile per size), where
    TensorFlow reuses the buffers of intermediates instead of allocating and page-faulting a fresh tensor per op.
    """
    import tensorflow as tf

    scale = epsilon * math.sqrt(2)
    crossing = _max_form_crossing(epsilon) if form == "max" else None
    branch = _branch_rule(form, crossing)

    def large_and_eager(z: Any) -> bool:
        return (
            tf.executing_eagerly()
            and z.shape.num_elements() is not None
            and (z.shape.num_elements() >= GRAPH_MIN_ELEMENTS)
        )

    # The max form multiplies by epsilon itself (keras-contrib's expression), the piecewise form by eps*sqrt(2).
    factor = epsilon if form == "max" else scale

    @tf.custom_gradient
    def apply(z: Any) -> Any:
        if fused.applies(z, form):
            # In a graph (a Keras train/predict function, a tf.function): one XLA-compiled loop per direction.
            def fused_grad(upstream: Any) -> Any:
                return fused.backward(z, upstream, scale)

            return fused.forward(z, scale), fused_grad
        if large_and_eager(z):
            # Flattened, so that one trace per dtype serves every shape.
            graph = _tensorflow_graph("forward", z.dtype.name, form)
            out = tf.reshape(graph(tf.reshape(z, [-1]), tf.constant(factor, z.dtype)), tf.shape(z))
        else:
            out = _tensorflow_forward(tf, z, factor, form)

        # The closure keeps `z` alone alive for the backward pass; the rest is recomputed.
        def grad(upstream: Any) -> Any:
            if large_and_eager(z):
                graph = _tensorflow_graph("backward", z.dtype.name, branch)
                flat = graph(
                    tf.reshape(z, [-1]),
                    tf.reshape(upstream, [-1]),
                    tf.constant(scale, z.dtype),
                    tf.constant(crossing or 0.0, z.dtype),
                )
                return tf.reshape(flat, tf.shape(z))
            return _tensorflow_backward(tf, z, upstream, scale, crossing, branch)

        return out, grad

    return apply


def _tensorflow_forward(tf: Any, z: Any, factor: Any, form: str) -> Any:
    """`factor` is eps*sqrt(2) for the piecewise form, eps for the max form."""
    if form == "max":
        # keras-contrib's expression op for op (two transcendentals): its models must compute bit for bit as
        # they did; the max form is the compatibility path, the piecewise form the fast one.
        return tf.maximum(factor * (tf.sin(z) - tf.cos(z)), z)
    return tf.raw_ops.Select(condition=tf.greater(z, 0), x=z, y=tf.sin(z - _SHIFT) * factor)


def _tensorflow_backward(tf: Any, z: Any, upstream: Any, scale: Any, crossing: Any, branch: str) -> Any:
    if branch == "z<=0":
        sine_branch = tf.less_equal(z, 0)
    elif branch == "z<z*":
        sine_branch = tf.less(z, crossing)
    else:
        sine_branch = tf.greater(tf.sin(z - _SHIFT) * scale, z)
    slope = tf.cos(z - _SHIFT) * scale
    return tf.raw_ops.Select(condition=sine_branch, x=upstream * slope, y=upstream)


@functools.cache
def _tensorflow_graph(direction: str, dtype: str, rule: str) -> Any:
    """The forward (`rule`: the form) or backward (`rule`: the branch rule) pass as a graph on flat tensors.

    Epsilon is a tensor argument, so there is one graph per dtype and rule, never one per layer; traced with
    an explicit signature, it never retraces (nor warns about it) when the batch shape changes.
    """
    import tensorflow as tf

    vector, scalar = tf.TensorSpec([None], dtype), tf.TensorSpec([], dtype)
    if direction == "forward":

        def forward(z: Any, scale: Any) -> Any:
            return _tensorflow_forward(tf, z, scale, rule)

        return tf.function(forward, jit_compile=False, autograph=False).get_concrete_function(vector, scalar)

    def backward(z: Any, upstream: Any, scale: Any, crossing: Any) -> Any:
        return _tensorflow_backward(tf, z, upstream, scale, crossing, rule)

    return tf.function(backward, jit_compile=False, autograph=False).get_concrete_function(
        vector, vector, scalar, scalar
    )


def sinerelu(x: Any, epsilon: float = DEFAULT_EPSILON, form: Form = "piecewise") -> Any:
    """SineReLU of a tensor on the current Keras backend, with its custom gradient.

    TensorFlow's CPU kernels flush subnormal floats to zero, so there a positive subnormal input (< 1.2e-38 in
    float32) takes the z <= 0 branch and gives -eps.

    >>> import numpy as np
    >>> np.round(keras.ops.convert_to_numpy(sinerelu(np.array([1.0, 0.0]), epsilon=0.5)), 6).tolist()
    [1.0, -0.5]
    """
    kernel = _kernel(check_epsilon(epsilon), check_form(form), keras.backend.backend())
    x = keras.ops.convert_to_tensor(x)
    if not _is_float(x):
        x = keras.ops.cast(x, keras.config.floatx())
    return kernel(x)


def _is_float(x: Any) -> bool:
    return "float" in keras.backend.standardize_dtype(x.dtype)


@keras.saving.register_keras_serializable(package="deadneuron")
class SineReLU(keras.layers.Layer):
    """SineReLU as a layer, or as the `activation=` of a Dense or Conv layer.

    `form="piecewise"` (default) is the article's definition; `form="max"` is keras-contrib's. A config
    without a `form` key was written by keras-contrib's `SineReLU` (ours always writes it), so `from_config`
    reads it as the max form: `.h5` files trained with keras-contrib load with `custom_objects()` and compute
    as before.

    >>> SineReLU(0.025).get_config()["epsilon"]
    0.025
    """

    def __init__(self, epsilon: float = DEFAULT_EPSILON, form: Form = "piecewise", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = check_epsilon(epsilon)
        self.form: Form = check_form(form)  # type: ignore[assignment]
        self.supports_masking = True

    def call(self, inputs: Any) -> Any:
        return sinerelu(inputs, self.epsilon, self.form)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "epsilon": self.epsilon, "form": self.form}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SineReLU:
        config = dict(config)
        config.setdefault("form", "max")  # keras-contrib's config: {"epsilon": ...} and base keys only
        return cls(**config)

    def __repr__(self) -> str:
        return f"SineReLU(epsilon={self.epsilon}, form={self.form!r})"


def custom_objects() -> dict[str, Any]:
    """Objects to pass as `custom_objects=` when loading: maps keras-contrib's class name 'SineReLU' to ours.

    Our own files name the class "deadneuron>SineReLU" and need only `import deadneuron.keras`.
    """
    return {"SineReLU": SineReLU}
