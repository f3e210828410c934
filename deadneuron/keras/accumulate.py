"""Per-site statistics kept on the model's device as Keras variables, reduced with `keras.ops`.

`Accumulators` holds the statistics of every site of a scan in four variables (the per-unit sums of `stats.FIELDS`
as one matrix, `max_abs`, and the two sample counters, one entry per site); each `SiteAccumulator` is one site's
columns and entries. `update` reduces one batch's pre-activations, outputs and gradients to per-unit numbers and
adds them in place, so no activation is kept and nothing goes to the host until `collect`, once per report (one
transfer per variable). The same code runs inside a `tf.function` (TensorFlow backend) and eagerly under
`torch.no_grad` (torch backend).

Cost: the reductions are memory-bound, so a site makes few passes over its full activation. The positions of each
(sample, unit) are reduced first (the fraction of positions firing, max |a|, max z, max |g|, sum |g|); everything
else is computed on those (samples, units) summaries. A NaN or an Inf in a (sample, unit) makes that max |a|
non-finite, which is how non-finite outputs are counted (max propagates NaN on both backends); such a sample adds
nothing to `max_abs`. |Inf| > atol counts as firing and a NaN as not firing: such units are `nonfinite`, never dead.
Every site's per-unit results are joined and added to the variables once per batch: a traced step then holds a
few operations per site instead of a read, an add and a write of five variables per site, which is what made
tracing a step of a deep model (ResNet50: 49 sites) slow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops

from ..core.stats import FIELDS, SiteStats
from ..report import SiteInfo

# Rows of the sums matrix: the counts (0/1 per sample, summed; exact in float32 below 2**24 samples per batch), then
# the two float sums. Every "sum" field of `stats.FIELDS` is one row; `max_abs` is a variable of its own.
_COUNT_ROWS = ("fired", "positive", "nonfinite", "grad_nonzero")
_ROWS = (*_COUNT_ROWS, "inactive_sum", "grad_abs_sum")
assert sorted(_ROWS) == sorted(n for n, (_, how) in FIELDS.items() if how == "sum")

Record = tuple[str, Any, Any, Any]  # (site name, pre-activation, output, dL/d(pre-activation) or None)


class SiteShape(NamedTuple):
    """A site as the discovery pass found it: `rows` is the length of its first axis there (the batch, or batch
    times positions when a model folds them), which tells the sites that may be reduced together."""

    info: SiteInfo
    rank: int
    positions: int
    rows: int


class Summary(NamedTuple):
    """One site's batch as (samples, units) summaries; the gradient's are None when no gradient was taken."""

    active: Any  # fraction of the positions firing
    largest: Any  # max |a|
    top: Any  # max z
    grad_max: Any  # max |g|
    grad_sum: Any  # sum |g|
    batch: Any  # samples (rows) in the batch


class SiteAccumulator:
    """One site: its shape facts, its columns [start, stop) of the shared variables and its counter entry."""

    def __init__(self, found: SiteShape, start: int, index: int) -> None:
        info = self.info = found.info
        self.rank = found.rank
        self.positions = found.positions
        self.rows = found.rows
        self.start, self.stop, self.index = start, start + info.units, index
        # every axis but the batch (0) and the unit axis: reducing them leaves (samples, units)
        self.position_axes = tuple(i for i in range(1, self.rank) if i != info.unit_axis)

    def _per_sample(self, t: Any, how: str) -> Any:
        """(samples, units) summary of a full activation-shaped tensor over its positions."""
        if not self.position_axes:
            return t
        reduce = {"max": ops.max, "mean": ops.mean, "sum": ops.sum}[how]
        return reduce(t, axis=self.position_axes)

    def summarize(self, z: Any, a: Any, g: Any, atol: float) -> Summary:
        """One batch as (samples, units) summaries over the positions; what is left is done for many sites at once
        (`_per_unit`)."""
        z, a = _as_rank(z, self.rank), _as_rank(a, self.rank)
        magnitude = ops.abs(ops.cast(a, "float32"))
        active = self._per_sample(ops.cast(magnitude > atol, "float32"), "mean")  # fraction of positions firing
        largest = self._per_sample(magnitude, "max")
        top = self._per_sample(ops.cast(z, "float32"), "max")
        if g is None:
            return Summary(active, largest, top, None, None, ops.shape(a)[0])
        g = ops.abs(ops.cast(_as_rank(g, self.rank), "float32"))
        return Summary(active, largest, top, self._per_sample(g, "max"), self._per_sample(g, "sum"), ops.shape(a)[0])

    def stats(self, host: dict[str, np.ndarray]) -> SiteStats:
        """This site's `SiteStats` from the variables' host values (`Accumulators.host`)."""
        columns = slice(self.start, self.stop)
        arrays = {name: host["sums"][row, columns] for row, name in enumerate(_ROWS)}
        for name, (dtype, _) in FIELDS.items():
            if dtype == "int64" and name in arrays:  # counts summed in floating point: exact, made integers again
                arrays[name] = np.rint(arrays[name]).astype(np.int64)
        return SiteStats(
            units=self.info.units,
            samples=int(host["samples"][self.index]),
            grad_samples=int(host["grad_samples"][self.index]),
            positions=self.positions,
            max_abs=host["max_abs"][columns].copy(),
            **arrays,
        )


class Accumulators:
    """The statistics of every site of one scan, in order of first execution."""

    def __init__(self, sites: Sequence[SiteShape]) -> None:
        self.by_name: dict[str, SiteAccumulator] = {}
        start = 0
        for index, found in enumerate(sites):
            self.by_name[found.info.name] = SiteAccumulator(found, start, index)
            start += found.info.units
        self.units = start

        def variable(shape: tuple[int, ...], dtype: str, name: str) -> Any:
            return keras.Variable(np.zeros(shape, dtype), trainable=False, name=f"deadneuron_{name}")

        self.sums = variable((len(_ROWS), start), "float64", "sums")
        self.max_abs = variable((start,), "float64", "max_abs")
        self.samples = variable((len(sites),), "int64", "samples")
        self.grad_samples = variable((len(sites),), "int64", "grad_samples")

    def update(self, records: Sequence[Record], atol: float, gtol: float) -> None:
        """Add one batch: every recorded site that is watched; a site that did not run adds nothing.

        Sites whose first axis is the same (the batch, almost always) are joined along the units after the positions
        are reduced, and their per-unit numbers are computed once for the group: a traced step then holds about a
        dozen operations per site instead of forty (ResNet50: 0.41 s of tracing went to these reductions)."""
        groups: dict[tuple[Any, ...], list[tuple[SiteAccumulator, Summary]]] = {}
        for name, z, a, g in records:
            site = self.by_name.get(name)
            if site is None:
                continue
            summary = site.summarize(z, a, g, atol)
            static = a.shape[0] if len(a.shape) else None
            key = (static if static is not None else ("rows", site.rows), g is not None)
            groups.setdefault(key, []).append((site, summary))
        if not groups:
            return
        blocks: list[tuple[Any, Any, Any]] = []  # (count rows, sum rows, largest) per group, columns in `order`
        order: list[SiteAccumulator] = []
        batches: dict[str, tuple[Any, Any]] = {}  # site name -> (samples, samples with a gradient)
        for members in groups.values():
            blocks.append(_per_unit([summary for _, summary in members], gtol))
            batch = ops.cast(members[0][1].batch, "int64")
            graded = batch if members[0][1].grad_max is not None else ops.zeros((), "int64")
            for site, _ in members:
                order.append(site)
                batches[site.info.name] = (batch, graded)
        missing = [site for site in self.by_name.values() if site.info.name not in batches]
        if missing:  # sites that did not run in this trace: zero columns
            width = sum(site.info.units for site in missing)
            blocks.append((ops.zeros((len(_COUNT_ROWS), width)), ops.zeros((2, width)), ops.zeros((width,))))
            order.extend(missing)
        counts, sums, largest = (_join([block[i] for block in blocks], axis=-1) for i in range(3))
        table = ops.concatenate([counts, sums], axis=0)
        columns = [c for site in order for c in range(site.start, site.stop)]
        if columns != list(range(self.units)):  # groups out of site order: put the columns back in place
            place = np.argsort(np.asarray(columns, dtype=np.int64))
            table, largest = ops.take(table, place, axis=1), ops.take(largest, place, axis=0)
        zero = ops.zeros((), "int64")
        self.sums.assign_add(ops.cast(table, "float64"))
        self.max_abs.assign(ops.maximum(self.max_abs, ops.cast(largest, "float64")))
        self.samples.assign_add(ops.stack([batches.get(name, (zero, zero))[0] for name in self.by_name]))
        self.grad_samples.assign_add(ops.stack([batches.get(name, (zero, zero))[1] for name in self.by_name]))

    def reset(self) -> None:
        """Every statistic back to zero, as a new scan starts (the variables stay: a traced step holds them)."""
        for variable in (self.sums, self.max_abs, self.samples, self.grad_samples):
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def sites(self) -> list[SiteAccumulator]:
        return list(self.by_name.values())

    def host(self) -> dict[str, np.ndarray]:
        """Every variable as a numpy array, one transfer each."""
        return {name: _host(getattr(self, name)) for name in ("sums", "max_abs", "samples", "grad_samples")}


def _join(parts: list[Any], axis: int) -> Any:
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=axis)


def _per_unit(summaries: list[Summary], gtol: float) -> tuple[Any, Any, Any]:
    """Sites that share their first axis, joined along the units: the count rows (4, units), the float sums
    (2, units) and the largest finite |a| (units,) of the batch."""
    active, largest, top = (_join([getattr(s, f) for s in summaries], axis=1) for f in ("active", "largest", "top"))
    finite = ops.isfinite(largest)
    flags = [active > 0, top > 0, ops.logical_not(finite)]
    if summaries[0].grad_max is None:  # no gradient taken: its count row and sum are zero
        flags.append(ops.zeros_like(flags[0]))
        grad_abs = ops.zeros(ops.shape(active)[1:], "float32")
    else:
        flags.append(_join([s.grad_max for s in summaries], axis=1) > gtol)
        grad_abs = ops.sum(_join([s.grad_sum for s in summaries], axis=1), axis=0)
    counts = ops.sum(ops.cast(ops.stack(flags), "float32"), axis=1)
    inactive = ops.cast(summaries[0].batch, "float32") - ops.sum(active, axis=0)  # sum of the fractions at zero
    largest = ops.max(ops.where(finite, largest, 0.0), axis=0)
    return counts, ops.stack([inactive, grad_abs]), largest


def _host(variable: Any) -> np.ndarray:
    """A variable's value as a numpy array: read as a tensor first, since numpy 2 warns about (and, for
    MirroredVariables, fails on) converting the variable object itself."""
    return np.asarray(ops.convert_to_numpy(ops.convert_to_tensor(variable)))


def _as_rank(t: Any, rank: int) -> Any:
    """A (samples,) activation is one unit per sample: give it a unit axis."""
    return ops.expand_dims(t, -1) if rank == 2 and len(t.shape) == 1 else t
