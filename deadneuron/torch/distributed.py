"""Several processes, one report: shard the samples by rank, all-reduce the statistics, report on rank 0.

Statistics merge by sum and max (`stats.FIELDS`), so `torch.distributed.all_reduce` combines ranks exactly.
`torchrun --nproc-per-node K -m deadneuron scan ...` lands here (design.md, "Distributed"):

- the process group comes from torchrun's environment (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`...); it
  is created when none exists (gloo for a model on the CPU, NCCL on CUDA) and destroyed at the end if created here;
- rank r scans the contiguous block `data.shard_bounds(N, r, K)` of the samples, in batches cut on the same grid
  as a single-process scan (batch k holds samples [kB, (k+1)B)); random inputs are drawn as one process draws
  them and each rank keeps its block;
- the gradient probe draws v for a sample exactly as a single process does for that sample, so the result is the
  same report as one process (tested with two CPU processes).

`all_reduce_sites` is the reusable piece (the scan here, the training monitor and the Lightning callback use it):
every rank's `SiteAccumulator`s in, the combined ones out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from .. import data as datamod
from ..core import engine
from ..core.options import ScanOptions
from ..core.plan import Shape, random_inputs
from ..core.stats import COUNTERS, FIELDS
from ..errors import DeadNeuronError
from ..report import Report, SiteInfo
from .accumulate import SiteAccumulator
from .backend import prepare, with_probe

__all__ = ["all_reduce_sites", "is_distributed", "launched", "process_group", "rank_zero", "scan", "world"]


def launched() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun with more than one process; None otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise DeadNeuronError(
            f"WORLD_SIZE, RANK and LOCAL_RANK must be integers ({error}); start several processes with "
            "torchrun --nproc-per-node K -m deadneuron ..."
        ) from error
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise DeadNeuronError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); start with torchrun")
    return rank, world, local


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """(rank, world size) of the default process group; created from torchrun's environment when there is none
    (the backend picked by `device`) and destroyed on exit if it was created here."""
    if not dist.is_available():
        raise DeadNeuronError("this PyTorch build has no torch.distributed; scan in one process")
    created = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise DeadNeuronError(
                "WORLD_SIZE is set but MASTER_ADDR/MASTER_PORT are not; start several processes with "
                "torchrun --nproc-per-node K -m deadneuron scan ..."
            )
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        created = True
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_zero() -> bool:
    """True on rank 0 of the process group, and in a single process."""
    return world()[0] == 0


def is_distributed() -> bool:
    """True when a process group of more than one rank is initialised."""
    return world()[1] > 1


def _group_device(accumulators: Sequence[Any], group: Any) -> torch.device:
    if accumulators:
        return accumulators[0].fields["fired"].device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sites(
    accumulators: Sequence[SiteAccumulator], *, atol: float, gtol: float, group: Any = None
) -> list[SiteAccumulator]:
    """Every rank's sites combined: new accumulators holding the sum/max (`stats.FIELDS`) over ranks; the
    inputs are left as they are. Without a process group of several ranks, the inputs themselves.

    Sites are matched by name; a site that some rank never ran (data-dependent control flow) counts from the
    ranks that ran it, and sites come in rank 0's order of first execution, then the others' in rank order.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1:
        return list(accumulators)
    device = _group_device(accumulators, group)
    infos = [acc.info.to_dict() for acc in accumulators]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, infos, group=group)
    order: dict[str, SiteInfo] = {}
    for rank, rank_infos in enumerate(gathered):
        for item in rank_infos:
            info = SiteInfo(str(item["name"]), str(item["kind"]), int(item["units"]), int(item["unit_axis"]))
            known = order.setdefault(info.name, info)
            if known.units != info.units:
                raise DeadNeuronError(
                    f"site {info.name} has {known.units} units on one rank and {info.units} on rank {rank}; "
                    "expected the same model on every rank"
                )
    mine = {acc.info.name: acc for acc in accumulators}
    combined = []
    for name, info in order.items():
        acc = SiteAccumulator(info, device, atol=atol, gtol=gtol)
        source = mine.get(name)
        if source is not None:
            for field_name, tensor in acc.fields.items():
                tensor.copy_(source.fields[field_name])
            for counter in COUNTERS:
                setattr(acc, counter, getattr(source, counter))
            acc.positions = source.positions
        combined.append(acc)
    _reduce_in_place(combined, device, group)
    return combined


def _reduce_in_place(accumulators: Sequence[SiteAccumulator], device: torch.device, group: Any) -> None:
    """Three collectives for the fields whatever the number of sites (int sums, float sums, float maxima),
    one for the counters, one for the positions; on the tensors' own device (CUDA for NCCL)."""
    if not accumulators:
        return
    groups: dict[tuple[str, str], list[torch.Tensor]] = {}
    for acc in accumulators:
        for name, (dtype, merge) in FIELDS.items():
            groups.setdefault((dtype, merge), []).append(acc.fields[name])
    for (_, reduction), tensors in groups.items():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM if reduction == "sum" else dist.ReduceOp.MAX, group=group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    counters = torch.tensor(
        [getattr(acc, name) for acc in accumulators for name in COUNTERS], dtype=torch.int64, device=device
    )
    dist.all_reduce(counters, op=dist.ReduceOp.SUM, group=group)
    positions = torch.tensor([acc.positions for acc in accumulators], dtype=torch.int64, device=device)
    dist.all_reduce(positions, op=dist.ReduceOp.MAX, group=group)
    values, peaks = counters.tolist(), positions.tolist()
    for i, acc in enumerate(accumulators):
        for j, name in enumerate(COUNTERS):
            setattr(acc, name, int(values[i * len(COUNTERS) + j]))
        acc.positions = int(peaks[i])


class Grid:
    """This rank's block of samples, cut on the single-process batch grid, and the probe that matches it.

    The batch iterator records which global batch (and which of its rows) it just yielded; the probe, called
    for that batch after its forward pass, replays the single-process generator up to that batch and keeps
    those rows, so every sample gets the v it gets in one process.
    """

    def __init__(self, total: int, grid: int, start: int, stop: int, static: bool, seed: int) -> None:
        self.total, self.grid, self.start, self.stop, self.static = total, grid, start, stop, static
        self.current = (0, 0, 0)  # (global batch, first row, row past the last) of the batch in flight
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0  # global batches whose v the generator has produced

    def blocks(self) -> Iterator[tuple[int, int, int]]:
        """(global batch k, lo, hi): samples [lo, hi) of this rank that fall in batch k."""
        if self.start >= self.stop:
            return
        for k in range(self.start // self.grid, (self.stop - 1) // self.grid + 1):
            lo, hi = max(k * self.grid, self.start), min((k + 1) * self.grid, self.stop)
            if lo < hi:
                yield k, lo, hi

    def batches(
        self, dataset: datamod.Dataset | None, shapes: Sequence[Shape], seed: int, vocabulary: int | None = None
    ) -> Iterator[Any]:
        """This rank's batches: its rows of `dataset`, or of the single-process random draw (token ids in
        [0, vocabulary) for a model that takes them)."""
        if dataset is not None:
            for k, lo, hi in self.blocks():
                part = datamod.Dataset(
                    datamod.rows(dataset.x, lo, hi), None if dataset.y is None else dataset.y[lo:hi], dataset.source
                )
                for x, y in datamod.array_batches(part, hi - lo):
                    self.current = (k, lo - k * self.grid, hi - k * self.grid)
                    yield x if y is None else (x, y)
            return
        wanted = {k: (lo, hi) for k, lo, hi in self.blocks()}
        last = max(wanted, default=-1)
        for k, x in enumerate(random_inputs(self.total, shapes, self.grid, seed, vocabulary)):  # one process's draw
            if k in wanted:
                lo, hi = wanted[k]
                self.current = (k, lo - k * self.grid, hi - k * self.grid)
                yield x[lo - k * self.grid : hi - k * self.grid]
            if k >= last:
                return

    def rows(self, k: int) -> int:
        return self.grid if self.static else min(self.grid, self.total - k * self.grid)

    def probe(self, outputs: list[torch.Tensor], valid: int) -> list[torch.Tensor]:
        k, first, past = self.current
        drawn: list[torch.Tensor] = []
        while self.drawn <= k:
            rows = self.rows(self.drawn)
            drawn = [
                torch.randn(
                    (rows, *t.shape[1:]) if t.ndim and t.shape[0] >= valid else t.shape, generator=self.generator
                )
                for t in outputs
            ]
            self.drawn += 1
        vs = []
        for t, full in zip(outputs, drawn, strict=True):
            if not t.ndim or full.shape[0] != self.rows(k):
                vs.append(full.to(device=t.device, dtype=t.dtype))
                continue
            v = torch.zeros(t.shape, dtype=t.dtype, device=t.device)
            v[: past - first] = full[first:past].to(device=t.device, dtype=t.dtype)
            vs.append(v)
        return vs


def scan(
    model: Any,
    data: datamod.Dataset | None,
    options: ScanOptions,
    *,
    progress: Callable[[int], None] | None = None,
    name: str | None = None,
) -> Report:
    """The single-process report of `model` on `data` (or `options.samples` random inputs), computed by every rank
    of the process group on its block of the samples. Every rank returns the full report; print it on rank 0."""
    run = prepare(model, name)
    device = run.device
    shapes: list[Shape] = []
    if data is not None:
        data = datamod.limit(data, options.samples)
        total = len(data)
    else:
        if options.samples is None:
            raise DeadNeuronError("no data: pass --data PATH, or --samples N for N random inputs")
        total = options.samples
        shapes = run.sample_shapes(options.input_shape) or []
        if not shapes:
            raise DeadNeuronError(
                "random inputs need the shape of one sample; pass --input-shape (e.g. 3,32,32) or --data"
            )
    with process_group(device) as (rank, world):
        if total < world:
            raise DeadNeuronError(
                f"{total} samples cannot be shared by {world} processes; expected at least one sample per "
                "process: pass more data or start fewer processes"
            )
        start, stop = datamod.shard_bounds(total, rank, world)
        size = run.static_batch or options.batch_size
        grid = Grid(total, size, start, stop, run.static_batch is not None, options.seed + 1)

        def reduce(accumulators: list[Any]) -> list[Any]:
            _agree(device, failed=False)
            return all_reduce_sites(accumulators, atol=options.atol, gtol=options.gtol)

        try:
            return engine.scan(
                with_probe(lambda seed: grid.probe),
                model,
                grid.batches(data, shapes, options.seed, run.vocabulary),
                replace(options, samples=None),
                progress=progress if rank == 0 else None,
                name=name,
                reduce=reduce,
            )
        except _OtherRankFailed:
            raise
        except BaseException:  # tell the other ranks, then fail here too
            _agree(device, failed=True)
            raise


class _OtherRankFailed(DeadNeuronError):
    pass


def _agree(device: torch.device, *, failed: bool) -> None:
    """A collective every rank reaches after its local scan: raise on all ranks if any rank failed."""
    flag = torch.tensor([1 if failed else 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) and not failed:
        raise _OtherRankFailed("another process of the scan failed (its error is on its stderr)")
