"""Per-unit statistics of one site, kept as tensors on the model's device and reduced inside hooks.

Each update first reduces a batch to one value per (sample, unit) along the positions (pixels, tokens), then sums
or maxes over the samples into the running fields of `stats.FIELDS`. Nothing leaves the device until `collect`,
which moves every site's fields to the host in one transfer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..core.kinds import NONNEGATIVE, SIGN_PRESERVING
from ..core.stats import COUNTERS, FIELDS, SiteStats
from ..report import SiteInfo

_INF = float("inf")


def unit_view(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, int]:
    """`t` as a 3-D (N, U, P) or (N, P, U) tensor and the dim that holds positions; a view whenever the
    memory layout allows (contiguous maps, channels_last maps, token sequences)."""
    n, ndim = t.shape[0], t.ndim
    if ndim == 1:
        return t.reshape(n, 1, 1), 2
    units = t.shape[axis]
    if axis == 1 and (ndim == 2 or t.is_contiguous()):
        return t.reshape(n, units, -1), 2
    moved = t.movedim(axis, -1) if axis != ndim - 1 else t
    return moved.reshape(n, -1, units), 1


class Scratch:
    """One reusable buffer for the elementwise temporaries of the hooks, shared by every site of a scan.

    A fresh activation-sized temporary per hook costs more than the reduction itself: on CPU, first-touch page
    faults of a 32 MB `sign()` result took 15 ms where writing into a warm buffer took 2 ms. Hooks run one at a
    time, so one buffer, grown to the largest activation, serves all sites; it lives as long as its watcher.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous tensor of `t`'s shape, dtype and device."""
        key = (t.device, t.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < t.numel():
            buffer = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
            self._buffers[key] = buffer
        return buffer[: t.numel()].view(t.shape)


class SiteAccumulator:
    """Running statistics of one activation site (one unit axis, one unit count) on one device."""

    def __init__(
        self, info: SiteInfo, device: torch.device, *, atol: float, gtol: float, scratch: Scratch | None = None
    ) -> None:
        self.info = info
        self.scratch = scratch
        self.atol = atol
        self.gtol = gtol
        float_dtype = torch.float32 if device.type == "mps" else torch.float64
        self.fields: dict[str, torch.Tensor] = {
            name: torch.zeros(
                info.units, dtype=torch.int64 if dtype == "int64" else float_dtype, device=device
            )
            for name, (dtype, _) in FIELDS.items()
        }
        self.samples = 0
        self.grad_samples = 0
        self.positions = 1
        self.sign_preserving = info.kind in SIGN_PRESERVING
        self.nonnegative = info.kind in NONNEGATIVE

    def state(self) -> dict[str, Any]:
        """The statistics as plain host values (a checkpoint's payload); one device-to-host copy per field."""
        return {
            **self.info.to_dict(),
            "samples": self.samples,
            "grad_samples": self.grad_samples,
            "positions": self.positions,
            "fields": {name: t.detach().cpu().clone() for name, t in self.fields.items()},
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], device: torch.device, *, atol: float, gtol: float
    ) -> SiteAccumulator:
        """An accumulator holding `state` (from `state()`) on `device`."""
        info = SiteInfo(str(state["name"]), str(state["kind"]), int(state["units"]), int(state["unit_axis"]))
        acc = cls(info, device, atol=atol, gtol=gtol)
        for name, t in acc.fields.items():
            t.copy_(torch.as_tensor(np.asarray(state["fields"][name])).to(t.dtype))
        acc.samples = int(state["samples"])
        acc.grad_samples = int(state["grad_samples"])
        acc.positions = int(state["positions"])
        return acc

    def _check(self, t: torch.Tensor) -> None:
        units = 1 if t.ndim == 1 else t.shape[self.info.unit_axis]
        if units != self.info.units:
            from ..errors import DeadNeuronError

            raise DeadNeuronError(
                f"site {self.info.name} changed size between batches; expected {self.info.units} units on axis "
                f"{self.info.unit_axis}, received shape {tuple(t.shape)}; scan batches of one input shape"
            )

    def pre(self, z: torch.Tensor, valid: int) -> None:
        """The pre-activation of a batch: counts samples with z > 0 (kinds whose output does not tell)."""
        if self.sign_preserving:
            return
        self._check(z)
        view, dim = unit_view(z.detach(), self.info.unit_axis)
        positive = view.amax(dim)[:valid] > 0
        self.fields["positive"] += positive.sum(0)

    def post(self, a: torch.Tensor, valid: int, real: torch.Tensor | None = None) -> None:
        """The output of a batch: fired, max |a|, non-finite, per-sample inactive fraction.

        `real`: (N, L, 1) True at the real tokens of an (N, L, D) site of a padded batch, whose padding `a` holds as
        0; a sample's inactive fraction is then taken over its real tokens (a sample that is all padding counts as
        inactive throughout, as one on which the unit never fired).
        Every op here costs a dispatch (a few microseconds) that a small model's step feels, so each per-sample
        quantity is computed once and reused."""
        self._check(a)
        view, dim = unit_view(a.detach(), self.info.unit_axis)
        positions = view.shape[dim]
        # max |a| per (sample, unit) from max a (kept: sign-preserving kinds read `positive` from it) and, for a
        # sign-changing kind, min a. NaN and Inf propagate through amax, amin and maximum, which is how non-finite
        # units are found. Not `linalg.vector_norm(ord=inf)`: on CPU it reduced a strided axis 10-25x slower than
        # amax and amin together (a BERT FFN's (32, 64, 1024): 5.9 ms against 0.48 ms; docs/benchmarks.md).
        top = view.amax(dim)[:valid]
        peak = top if self.nonnegative else torch.maximum(top, view.amin(dim)[:valid].neg_())
        # A 0/1 float map summed over positions: faster than count_nonzero or a bool sum on CPU, exact below
        # 2**24 positions; written into the shared scratch buffer when there is one.
        ones = self.scratch.like(view) if self.scratch is not None else torch.empty_like(view)
        if self.atol == 0.0:
            torch.sign(view, out=ones)
            if not self.nonnegative:
                ones.abs_()
        else:
            torch.abs(view, out=ones).gt_(self.atol)
        # zero positions per (sample, unit), NaN where non-finite; counted in float32 whatever the site's dtype: a
        # bfloat16 sum is exact only to 256 (301 ones summed to 300: a bf16 model's inactive rates were off)
        counted: Any = positions if real is None else real.sum(1)[:valid].clamp_(min=1).to(torch.float32)
        zeros = counted - ones.sum(dim, dtype=torch.float32)[:valid]
        nonfinite = peak.lt(_INF).logical_not_()  # peak >= 0: NaN and +inf fail `< inf` (2x faster than isfinite)
        f = self.fields
        fired = (peak > self.atol).sum(0)
        f["fired"] += fired
        if self.sign_preserving:
            if self.nonnegative and self.atol == 0.0:
                f["positive"] += fired  # relu, relu6: the output is > 0 exactly where the input is
            else:
                f["positive"] += (top > 0).sum(0)
        f["nonfinite"] += nonfinite.sum(0)
        wide = f["max_abs"].dtype
        torch.maximum(f["max_abs"], peak.masked_fill(nonfinite, 0).amax(0).to(wide), out=f["max_abs"])
        if real is None:
            f["inactive_sum"] += zeros.masked_fill_(nonfinite, 0).sum(0, dtype=wide).div_(positions)
        else:
            f["inactive_sum"] += zeros.masked_fill_(nonfinite, 0).to(wide).div_(counted.to(wide)).sum(0)
        self.samples += valid
        self.positions = positions

    def grad(self, g: torch.Tensor, valid: int) -> None:
        """dL/d(pre-activation) of a batch: samples with a nonzero gradient, sum |g|."""
        view, dim = unit_view(g, self.info.unit_axis)
        dtype = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else None
        # |g| into the scratch buffer, then plain reductions: `linalg.vector_norm(ord=1)` was ~9x slower on CPU.
        magnitude = self.scratch.like(view) if self.scratch is not None else torch.empty_like(view)
        torch.abs(view, out=magnitude)
        l1 = magnitude.sum(dim, dtype=dtype)[:valid]
        if self.gtol == 0.0:
            nonzero = l1 > 0
        else:
            nonzero = magnitude.amax(dim)[:valid] > self.gtol
        f = self.fields
        f["grad_nonzero"] += nonzero.sum(0)
        f["grad_abs_sum"] += l1.sum(0).to(f["grad_abs_sum"].dtype)


def collect(accumulators: Sequence[SiteAccumulator]) -> list[tuple[SiteInfo, SiteStats]]:
    """Every site's statistics as host arrays, with one device-to-host transfer for all of them."""
    if not accumulators:
        return []
    names = list(FIELDS)
    # float64 holds counts exactly up to 2**53 samples (MPS has no float64: float32 there).
    wide = accumulators[0].fields["max_abs"].dtype
    flat = torch.cat([acc.fields[name].to(wide) for acc in accumulators for name in names])
    host = flat.cpu().numpy().astype(np.float64)
    out: list[tuple[SiteInfo, SiteStats]] = []
    offset = 0
    for acc in accumulators:
        arrays: dict[str, Any] = {}
        for name in names:
            dtype = FIELDS[name][0]
            arrays[name] = host[offset : offset + acc.info.units].astype(dtype)
            offset += acc.info.units
        counters = {name: getattr(acc, name) for name in COUNTERS}
        out.append((acc.info, SiteStats(units=acc.info.units, positions=acc.positions, **counters, **arrays)))
    return out
