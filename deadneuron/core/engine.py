"""The scan, written once for every framework: plan the batches, resolve the loss, run the step loop, report.

A backend (`deadneuron.torch.backend`, `deadneuron.keras.backend`) supplies primitives only: it owns its model
type (`prepare`), moves a batch to the model's device (`place`), and watches the sites of one scan (`watch`: a
context manager that prepares the model, hooks its sites, and restores both on exit, also on failure), where one
`step` runs a batch with its loss and `collect` turns the per-site statistics into host `SiteStats`. The
`reduce` hook sits between the two: the identity in one process, the all-reduce across ranks in
`deadneuron.torch.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from itertools import chain
from typing import Any, Protocol

from ..errors import DeadNeuronError
from ..report import Report, SiteInfo
from .options import ResolvedLoss, ScanOptions, SwapOptions, resolve_loss
from .plan import Batch, Shape, Source, check_labelled, host_batches
from .stats import SiteStats

Progress = Callable[[int], None]
# Every site's on-device statistics in, the ones the report is built from out.
Reduce = Callable[[list[Any]], list[Any]]


class Watch(Protocol):
    """The sites of one scan while it runs (a backend's hooks or wrappers and its accumulators)."""

    warnings: list[str]
    unobserved: list[str]

    def step(self, batch: Batch) -> None:
        """Run one batch: forward, the loss and its gradient unless the loss is "none", statistics on device."""

    def sites(self) -> list[SiteInfo]:
        """The sites seen so far, in order of first execution."""

    def accumulators(self) -> list[Any]:
        """Every site's on-device statistics, in order of first execution."""

    def collect(self, accumulators: list[Any]) -> list[tuple[SiteInfo, SiteStats]]:
        """The statistics as host arrays, in one transfer."""


class Run(Protocol):
    """A model made ready for scanning by its backend."""

    display: str  # the model's name in the report
    warnings: list[str]
    static_batch: int | None  # a program exported with a fixed batch size scans in batches of exactly that size
    example_shape: Shape | None  # one sample's shape, when the model carries an example input
    vocabulary: int | None  # random inputs are token ids in [0, vocabulary) (a model that starts with an embedding)
    source: Source

    def sample_shapes(self, input_shape: Shape | None) -> list[Shape] | None:
        """One sample's shape per model input for random inputs; None when the model does not say."""

    def place(self, batch: Batch) -> Iterator[Batch]:
        """`batch` on the model's device and dtype (one batch, or several when a static batch size cuts it)."""

    def class_labels(self, y: Any) -> bool:
        """Whether labels name classes (integer indices, or one-hot float rows: `core.plan.is_one_hot`) rather than
        regression targets."""

    def own_loss(self, batch: Batch) -> bool:
        """Whether the model computes its own loss from the batch's labels (a transformers model given keyword
        inputs and `labels=`); that loss is then the task loss."""

    def watch(self, options: ScanOptions, loss: ResolvedLoss, first: Batch) -> AbstractContextManager[Watch]:
        """Prepare the model and watch its sites; on exit everything is as it was."""

    def evaluating(self) -> AbstractContextManager[Any]:
        """Inference mode without gradients for `output`; on exit the model as it was."""

    def output(self, x: Any) -> Any:
        """The model's first floating-point output on a batch."""

    def drift_sums(self, a: Any, b: Any, classifier: bool) -> tuple[Any, Any, Any]:
        """sum((b - a)^2), sum(a^2) and, for class scores, the samples whose argmax agrees (else None): device
        scalars, added up across batches by `core.compare.Agreement`."""


@dataclass(frozen=True)
class Backend:
    """One framework's primitives (`torch.backend.BACKEND`, `keras.backend.BACKEND`)."""

    framework: str  # "torch" or "keras", as the report's JSON says
    no_sites: str  # the warning of a scan that saw no site
    prepare: Callable[[Any, str | None], Run]  # (model, display name or None) -> the model ready to scan
    load_model: Callable[..., Any]  # (path, *, arch, unsafe_pickle, unsafe_deserialization) -> model
    swap: Callable[[Any, SwapOptions], Any]  # a new model with its sites replaced by SineReLU; the model untouched
    swap_file: Callable[[Any, str, SwapOptions], int]  # write the swap of a loaded model file; the sites swapped
    swap_for_scan: Callable[[Any, SwapOptions], Any]  # a swap whose sites a scan names as the original's
    # (model, batches, *, loss, lr, seed) -> a copy trained one Adam step per batch on the task loss
    train: Callable[..., Any]


_NEEDS_SHAPE = {
    "scan": "random inputs need the shape of one sample; pass input_shape (CLI: --input-shape 3,32,32) or real data",
    "inspect": "inspect needs the shape of one sample to run the model once; pass --input-shape (e.g. 3,32,32)",
}


def batches(run: Run, data: Any, labels: Any, options: ScanOptions, purpose: str = "scan") -> Iterator[Batch]:
    """The batches of `data` for `run`, on its device; random inputs shaped from the model when `data` is None."""

    def shapes() -> Sequence[Shape]:
        found = run.sample_shapes(options.input_shape)
        if found is None:
            raise DeadNeuronError(_NEEDS_SHAPE[purpose])
        return found

    plan = host_batches(
        data, labels, options, shapes=shapes, source=run.source, batch_size=run.static_batch, vocabulary=run.vocabulary
    )
    for batch in plan:
        yield from run.place(batch)


def scan(
    backend: Backend,
    model: Any,
    data: Any,
    options: ScanOptions,
    *,
    labels: Any = None,
    progress: Progress | None = None,
    name: str | None = None,
    reduce: Reduce | None = None,
) -> Report:
    """Dead, dormant and gradient-dead units of every activation site of `model` on `data` (design.md)."""
    run = backend.prepare(model, name)
    stream = batches(run, data, labels, options)
    first = next(stream, None)
    if first is None:
        raise DeadNeuronError("no samples: the data is empty; expected at least one sample")
    labelled = first.y is not None
    loss: ResolvedLoss = (
        "none"
        if not options.gradients
        else resolve_loss(
            options.loss, labelled, labelled and run.class_labels(first.y), labelled and run.own_loss(first)
        )
    )
    with run.watch(options, loss, first) as watch:
        for batch in chain([first], stream):
            check_labelled(batch, labelled)
            watch.step(batch)
            if progress is not None:
                progress(batch.valid)
        accumulators = watch.accumulators()
        sites = watch.collect(reduce(accumulators) if reduce is not None else accumulators)
        warnings = [*run.warnings, *watch.warnings]
        unobserved = list(watch.unobserved)
    if not sites:
        # Sites that ran but could not be read (a mixture of experts' activation) are not "none known".
        warnings.append(
            backend.no_sites if not unobserved
            else f"no activation site could be observed; see the {len(unobserved)} listed as not observed"
        )
    return Report.build(
        framework=backend.framework,
        model=run.display,
        loss=loss,
        sites=sites,
        atol=options.atol,
        gtol=options.gtol,
        warnings=warnings,
        unobserved=unobserved,
    )


def inspect(backend: Backend, model: Any, input_shape: Sequence[int] | None = None) -> list[SiteInfo]:
    """The activation sites of `model` in order of first execution, from one forward pass on two random inputs."""
    shape = tuple(input_shape) if input_shape is not None else None
    options = ScanOptions(batch_size=2, loss="none", samples=2, input_shape=shape)
    run = backend.prepare(model, None)
    first = next(batches(run, None, None, options, purpose="inspect"))
    with run.watch(options, "none", first) as watch:
        if not watch.sites():  # a backend that learns its sites while they run (torch hooks) needs one pass;
            watch.step(first)  # Keras found them when it started watching, and its step would trace for nothing
        return watch.sites()
