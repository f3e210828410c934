"""SineReLU's fused TensorFlow loops: each direction one XLA-compiled elementwise loop inside an ordinary TF graph.

Why: in a TensorFlow graph without XLA (Keras's default `jit_compile="auto"` on a CPU-only machine) SineReLU is five
kernels forward and six backward, each a full memory pass, and TensorFlow's own `Sin`/`Cos` cost ~1.3 ns per float32
element here (ReLU: fused into the convolution, its gradient one pass). Compiling the whole model with XLA does not
help: XLA's CPU `sin` is slower still (~10 ns per element). So each direction here is a small `tf.function` with
`jit_compile=True` that the surrounding (non-XLA) graph calls like one op: XLA fuses the branch test, the select and
a sine written as plain arithmetic (Cody-Waite reduction by pi, an odd polynomial on [-pi/2, pi/2] fitted for this
module) into one vectorized loop, ~3x faster than the plain ops (docs/benchmarks.md, issue 15).

Scope: float32, piecewise form, graph mode (Keras's train/predict functions, a user's `tf.function`), tensors of at
least `MIN_ELEMENTS` elements; `usable()` also requires a TensorFlow built with XLA and, when a GPU is visible, a
CUDA or ROCm build (XLA's GPU backend). Everything else runs the plain TensorFlow ops in `sinerelu.py`. XLA compiles
each direction once per distinct element count (tensors are flattened, so layers of equal size share it), ~50-100 ms
each, at the first call with that size.

Values: the argument is reduced as z - (m ± 1/4)*pi (no rounding of z ± pi/4 first), so the result is within
~1.2e-7 of float64's sin/cos on |z| <= 30, closer than `tf.sin(z - pi/4)` (6e-7); for |z| above ~5e4 the reduction
loses bits as float32 itself does, and the result stays within eps*sqrt(2) (the reduced argument is clamped).
"""

from __future__ import annotations

import functools
import math
from typing import Any

__all__ = ["MIN_ELEMENTS", "applies", "backward", "enabled", "forward", "set_enabled", "usable"]

# Below this many elements the plain ops win: an XLA call costs ~15 us of CPU (~40 us wall on a busy machine) where
# the plain forward+backward at 3,840 elements costs ~26 us; from ~50K elements the fused loops are ~2x-3x faster.
MIN_ELEMENTS = 1 << 14

# An unknown dimension (a batch of None) counts as this many in `applies`: Keras's default batch size.
UNKNOWN_DIMENSION = 32


def _split(value: float, bits: int) -> float:
    """`value` rounded to `bits` significant bits, so that its product with a small integer is exact."""
    mantissa, exponent = math.frexp(value)
    return math.ldexp(round(mantissa * 2**bits), exponent - bits)


# pi = P1 + P2 + P3: P1 and P2 short (exact products with the quarter-integers k below for |k| < 2^14 and 2^10), P3
# the float32 rest.
_P1 = _split(math.pi, 8)
_P2 = _split(math.pi - _P1, 12)
_P3 = math.pi - _P1 - _P2

# A least-squares fit on 4,000 Chebyshev nodes of [0, pi/2] (float64, then rounded to float32):
# sin r = r + r*t*(S1 + t*(S2 + t*(S3 + t*S4))), t = r*r, within 2.1e-8.
_S = (-0.16666661202907562, 0.008333097212016582, -0.00019811726815532893, 2.6101802177436184e-06)


def _sin_shifted(tf: Any, z: Any, quarter: float) -> Any:
    """sin(z + quarter*pi/4) for quarter = -1 (sin(z - pi/4), forward) or +1 (= cos(z - pi/4), backward), as
    elementwise arithmetic that XLA fuses into one loop."""
    # z + quarter*pi/4 = r + m*pi, m an integer, |r| <= pi/2, so r = z - (m - quarter/4)*pi, reduced in three parts.
    m = tf.round(z * (1 / math.pi) + quarter * 0.25)
    k = m - quarter * 0.25
    r = ((z - k * _P1) - k * _P2) - k * _P3
    r = tf.clip_by_value(r, -math.pi / 2, math.pi / 2)  # only huge |z| get past pi/2: keeps |result| <= 1
    t = r * r
    sin_r = r + r * t * (_S[0] + t * (_S[1] + t * (_S[2] + t * _S[3])))
    odd = m - 2.0 * tf.floor(m * 0.5)  # sin(r + m*pi) = (-1)^m sin r
    return tf.where(odd > 0.5, -sin_r, sin_r)


@functools.cache
def _loops() -> tuple[Any, Any]:
    """The two compiled directions, on flat float32 vectors; `scale` (eps*sqrt(2)) is an argument, so every layer
    shares them. The branch tests are those of the plain ops: z > 0 takes z forward, z <= 0 the slope backward."""
    import tensorflow as tf

    vector, scalar = tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.float32)

    @tf.function(jit_compile=True, autograph=False, input_signature=[vector, scalar])
    def sinerelu_forward(z: Any, scale: Any) -> Any:
        return tf.where(z > 0, z, _sin_shifted(tf, z, -1.0) * scale)

    @tf.function(jit_compile=True, autograph=False, input_signature=[vector, vector, scalar])
    def sinerelu_backward(z: Any, upstream: Any, scale: Any) -> Any:
        return tf.where(z <= 0, upstream * (_sin_shifted(tf, z, 1.0) * scale), upstream)

    return sinerelu_forward, sinerelu_backward


@functools.cache
def usable() -> bool:
    """Whether this TensorFlow can compile the loops: built with XLA, and CPU-only or built for CUDA/ROCm."""
    import tensorflow as tf

    if not tf.test.is_built_with_xla():
        return False
    if tf.config.list_physical_devices("GPU"):  # e.g. a Metal plugin's GPU: XLA cannot compile for it
        return bool(tf.test.is_built_with_cuda() or tf.test.is_built_with_rocm())
    return True


_enabled = [True]


def set_enabled(flag: bool) -> None:
    """Turn the fused loops on (default) or off for graphs traced from now on (traced ones keep what they have).

    Off, every SineReLU runs the plain ops: for a program that must not compile at run time, e.g. one that serves
    many different batch sizes, where each new size would compile the loops once.
    """
    _enabled[0] = bool(flag)


def enabled() -> bool:
    return _enabled[0]


def applies(z: Any, form: str) -> bool:
    """Whether `z` takes the fused loops: enabled, graph mode, float32, the piecewise form, large enough, and
    `usable()`."""
    import tensorflow as tf

    if (
        not _enabled[0]
        or form != "piecewise"
        or z.dtype != tf.float32
        or tf.executing_eagerly()
        or z.shape.rank is None
    ):
        return False
    elements = math.prod(UNKNOWN_DIMENSION if size is None else size for size in z.shape.as_list())
    return elements >= MIN_ELEMENTS and usable()


def forward(z: Any, scale: float) -> Any:
    """SineReLU (piecewise) of a float32 tensor; `scale` = eps*sqrt(2)."""
    import tensorflow as tf

    flat = _loops()[0](tf.reshape(z, [-1]), tf.constant(scale, tf.float32))
    return tf.reshape(flat, tf.shape(z))


def backward(z: Any, upstream: Any, scale: float) -> Any:
    """upstream * SineReLU'(z) (piecewise) of float32 tensors."""
    import tensorflow as tf

    flat = _loops()[1](tf.reshape(z, [-1]), tf.reshape(upstream, [-1]), tf.constant(scale, tf.float32))
    return tf.reshape(flat, tf.shape(z))
