"""Per-site statistics kept on the model's device as Keras variables, reduced with `keras.ops`.

One `SiteAccumulator` per site holds the fields of `stats.FIELDS` and the sample counters. `update` reduces one
batch's pre-activation, output and gradient to per-unit numbers and adds them in place, so no activation is kept and
nothing goes to the host until `to_stats()`, once per report. The same code runs inside a `tf.function` (TensorFlow
backend) and eagerly under `torch.no_grad` (torch backend).

Cost: the reductions are memory-bound, so `update` makes few passes over the full activation. The positions of each
(sample, unit) are reduced first (the fraction of positions firing, max |a|, max z, max |g|, sum |g|); everything
else is computed on those (samples, units) summaries. A NaN or an Inf in a (sample, unit) makes that max |a|
non-finite, which is how non-finite outputs are counted (max propagates NaN on both backends); such a sample adds
nothing to `max_abs`. |Inf| > atol counts as firing and a NaN as not firing: such units are `nonfinite`, never dead.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from ..core.stats import FIELDS, GRADIENT_FIELDS, SiteStats
from ..report import SiteInfo

# Rows of the forward and gradient sum variables, in `stats.FIELDS` order; the max fields (`max_abs`) are variables of
# their own. Sums of 0/1 per batch are exact in float32 below 2**24 samples.
_FORWARD_ROWS = tuple(n for n, (_, how) in FIELDS.items() if how == "sum" and n not in GRADIENT_FIELDS)
_GRAD_ROWS = tuple(n for n, (_, how) in FIELDS.items() if how == "sum" and n in GRADIENT_FIELDS)


class SiteAccumulator:
    def __init__(self, info: SiteInfo, rank: int, positions: int) -> None:
        self.info = info
        self.rank = rank
        self.positions = positions
        # every axis but the batch (0) and the unit axis: reducing them leaves (samples, units)
        self.position_axes = tuple(i for i in range(1, rank) if i != info.unit_axis)
        units = info.units

        def variable(shape: tuple[int, ...], dtype: str, name: str) -> Any:
            return keras.Variable(np.zeros(shape, dtype), trainable=False, name=f"deadneuron_{name}")

        self.forward = variable((len(_FORWARD_ROWS), units), "float64", "forward")
        self.gradient = variable((len(_GRAD_ROWS), units), "float64", "gradient")
        self.max_abs = variable((units,), "float64", "max_abs")
        self.samples = variable((), "int64", "samples")
        self.grad_samples = variable((), "int64", "grad_samples")

    def _per_sample(self, t: Any, how: str) -> Any:
        """(samples, units) summary of a full activation-shaped tensor over its positions."""
        if not self.position_axes:
            return t
        reduce = {"max": ops.max, "mean": ops.mean, "sum": ops.sum}[how]
        return reduce(t, axis=self.position_axes)

    def update(self, z: Any, a: Any, g: Any, atol: float, gtol: float) -> None:
        z, a = _as_rank(z, self.rank), _as_rank(a, self.rank)
        magnitude = ops.abs(ops.cast(a, "float32"))
        active = self._per_sample(ops.cast(magnitude > atol, "float32"), "mean")  # fraction of positions firing
        largest = self._per_sample(magnitude, "max")
        finite = ops.isfinite(largest)
        top = self._per_sample(ops.cast(z, "float32"), "max")
        batch = ops.shape(a)[0]
        forward = {
            "fired": ops.sum(ops.cast(active > 0, "float32"), axis=0),
            "positive": ops.sum(ops.cast(top > 0, "float32"), axis=0),
            "nonfinite": ops.sum(ops.cast(ops.logical_not(finite), "float32"), axis=0),
            "inactive_sum": ops.cast(batch, "float32") - ops.sum(active, axis=0),  # sum of the fractions at zero
        }
        self.forward.assign_add(ops.cast(ops.stack([forward[name] for name in _FORWARD_ROWS]), "float64"))
        largest = ops.max(ops.where(finite, largest, 0.0), axis=0)
        self.max_abs.assign(ops.maximum(self.max_abs, ops.cast(largest, "float64")))
        self.samples.assign_add(ops.cast(batch, "int64"))
        if g is None:
            return
        g = ops.abs(ops.cast(_as_rank(g, self.rank), "float32"))
        gradient = {
            "grad_nonzero": ops.sum(ops.cast(self._per_sample(g, "max") > gtol, "float32"), axis=0),
            "grad_abs_sum": ops.sum(self._per_sample(g, "sum"), axis=0),
        }
        self.gradient.assign_add(ops.cast(ops.stack([gradient[name] for name in _GRAD_ROWS]), "float64"))
        self.grad_samples.assign_add(ops.cast(batch, "int64"))

    def to_stats(self) -> SiteStats:
        forward = _host(self.forward)
        gradient = _host(self.gradient)
        arrays = {name: forward[i] for i, name in enumerate(_FORWARD_ROWS)}
        arrays.update({name: gradient[i] for i, name in enumerate(_GRAD_ROWS)})
        for name, (dtype, _) in FIELDS.items():
            if dtype == "int64" and name in arrays:  # counts summed in floating point: exact, made integers again
                arrays[name] = np.rint(arrays[name]).astype(np.int64)
        return SiteStats(
            units=self.info.units,
            samples=int(_host(self.samples)),
            grad_samples=int(_host(self.grad_samples)),
            positions=self.positions,
            max_abs=_host(self.max_abs),
            **arrays,
        )


def _host(variable: Any) -> np.ndarray:
    """A variable's value as a numpy array: read as a tensor first, since numpy 2 warns about (and, for
    MirroredVariables, fails on) converting the variable object itself."""
    return np.asarray(ops.convert_to_numpy(ops.convert_to_tensor(variable)))


def _as_rank(t: Any, rank: int) -> Any:
    """A (samples,) activation is one unit per sample: give it a unit axis."""
    return ops.expand_dims(t, -1) if rank == 2 and len(t.shape) == 1 else t
