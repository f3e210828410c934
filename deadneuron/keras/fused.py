"""SineReLU's fused TensorFlow loops: each direction one XLA-compiled elementwise loop inside an ordinary TF graph.

Why: in a TensorFlow graph without XLA (Keras's default `jit_compile="auto"` on a CPU-only machine) SineReLU is five
kernels forward and six backward, each a full memory pass, and TensorFlow's own `Sin`/`Cos` cost ~1.3 ns per float32
element here (ReLU: fused into the convolution, its gradient one pass). Compiling the whole model with XLA does not
help: XLA's CPU `sin` is slower still (~10 ns per element). So each direction here is a small `tf.function` with
`jit_compile=True` that the surrounding (non-XLA) graph calls like one op: XLA fuses the branch test, the select and
a sine/cosine written as plain arithmetic (Cody-Waite reduction by pi/2, polynomials on [-pi/4, pi/4] fitted for
this module) into one vectorized loop, ~3x faster than the plain ops (docs/benchmarks.md, issue 15).

Scope: float32, piecewise form, graph mode (Keras's train/predict functions, a user's `tf.function`), tensors of at
least `MIN_ELEMENTS` elements; `usable()` also requires a TensorFlow built with XLA and, when a GPU is visible, a
CUDA or ROCm build (XLA's GPU backend). Everything else runs the plain TensorFlow ops in `sinerelu.py`. XLA compiles
each direction once per distinct element count (tensors are flattened, so layers of equal size share it), ~50-100 ms
each, at the first call with that size.

Values: the argument is reduced exactly as z - (q + 1/2)*pi/2 (no rounding of z - pi/4 first), so the result is
within ~1e-7 of float64's sin/cos on |z| <= 30, closer than `tf.sin(z - pi/4)`; for |z| above ~1e5 the reduction
loses bits as float32 itself does, and the result stays within eps*sqrt(2) (the reduced argument is clamped).
"""

from __future__ import annotations

import functools
import math
from typing import Any

__all__ = ["MIN_ELEMENTS", "applies", "backward", "forward", "usable"]

# Below this many elements the plain ops win: an XLA call costs ~15 us of CPU (~40 us wall on a busy machine) where
# the plain forward+backward at 3,840 elements costs ~26 us; from ~50K elements the fused loops are ~2x-3x faster.
MIN_ELEMENTS = 1 << 14

# An unknown dimension (a batch of None) counts as this many in `applies`: Keras's default batch size.
UNKNOWN_DIMENSION = 32


def _split(value: float, bits: int) -> float:
    """`value` rounded to `bits` significant bits, so that its product with a small integer is exact."""
    mantissa, exponent = math.frexp(value)
    return math.ldexp(round(mantissa * 2**bits), exponent - bits)


# pi/2 = P1 + P2 + P3: P1 and P2 short (exact products with q for |q| < 2^16 and 2^12), P3 the float32 rest.
_HALF_PI = math.pi / 2
_P1 = _split(_HALF_PI, 8)
_P2 = _split(_HALF_PI - _P1, 12)
_P3 = _HALF_PI - _P1 - _P2

# Least-squares fits on 4,000 Chebyshev nodes of [0, pi/4] (float64, rounded to float32):
# sin r = r + r*t*(S1 + t*(S2 + t*S3)), cos r = 1 + t*(C1 + t*(C2 + t*(C3 + t*C4))), t = r*r; both within 3e-9.
_S = (-0.16666655242443085, 0.008332204073667526, -0.00019520212663337588)
_C = (-0.5, 0.04166662320494652, -0.0013886808883398771, 2.4394103093072772e-05)


def _shifted_sin_cos(tf: Any, z: Any, want: str) -> Any:
    """sin(z - pi/4) (`want="sin"`) or cos(z - pi/4) (`want="cos"`) as elementwise arithmetic (XLA fuses it)."""
    # z - pi/4 = r + q*pi/2 with q an integer and |r| <= pi/4, so r = z - (q + 1/2)*pi/2.
    q = tf.round(z * (2 / math.pi) - 0.5)
    k = q + 0.5
    r = ((z - k * _P1) - k * _P2) - k * _P3
    r = tf.clip_by_value(r, -math.pi / 4, math.pi / 4)  # only huge |z| get past pi/4: keeps |result| <= 1
    t = r * r
    sin_r = r + r * t * (_S[0] + t * (_S[1] + t * _S[2]))
    cos_r = 1.0 + t * (_C[0] + t * (_C[1] + t * (_C[2] + t * _C[3])))
    quadrant = q - 4.0 * tf.floor(q * 0.25)  # q mod 4, in 0..3
    odd = tf.equal(quadrant, 1.0) | tf.equal(quadrant, 3.0)
    if want == "sin":  # sin(r + q*pi/2): sin r, cos r, -sin r, -cos r
        value = tf.where(odd, cos_r, sin_r)
        return tf.where(quadrant >= 2.0, -value, value)
    # cos(r + q*pi/2): cos r, -sin r, -cos r, sin r
    value = tf.where(odd, sin_r, cos_r)
    return tf.where(tf.equal(quadrant, 1.0) | tf.equal(quadrant, 2.0), -value, value)


@functools.cache
def _loops() -> tuple[Any, Any]:
    """The two compiled directions, on flat float32 vectors; `scale` (eps*sqrt(2)) is an argument, so every layer
    shares them. The branch tests are those of the plain ops: z > 0 takes z forward, z <= 0 the slope backward."""
    import tensorflow as tf

    vector, scalar = tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.float32)

    @tf.function(jit_compile=True, autograph=False, input_signature=[vector, scalar])
    def sinerelu_forward(z: Any, scale: Any) -> Any:
        return tf.where(z > 0, z, _shifted_sin_cos(tf, z, "sin") * scale)

    @tf.function(jit_compile=True, autograph=False, input_signature=[vector, vector, scalar])
    def sinerelu_backward(z: Any, upstream: Any, scale: Any) -> Any:
        return tf.where(z <= 0, upstream * (_shifted_sin_cos(tf, z, "cos") * scale), upstream)

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


def applies(z: Any, form: str) -> bool:
    """Whether `z` takes the fused loops: graph mode, float32, the piecewise form, large enough, and `usable()`."""
    import tensorflow as tf

    if form != "piecewise" or z.dtype != tf.float32 or tf.executing_eagerly() or z.shape.rank is None:
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
