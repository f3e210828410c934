"""`compare`, written once for every framework: scan a model and its SineReLU swap on the same batches, measure
how far the predictions move, and optionally how many formerly dead units fine-tuning revives under each.

Agreement and drift stream: each batch adds three device scalars (squared difference, squared norm, samples whose
argmax agrees) to running sums, and one host transfer at the end turns them into two numbers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from itertools import chain
from typing import Any

from ..errors import DeadNeuronError
from ..report import Comparison, Report
from .engine import Backend, Progress, Run, batches, scan
from .options import ResolvedLoss, ScanOptions, SwapOptions, TuneOptions, resolve_loss
from .plan import Batch


class Agreement:
    """Streaming argmax agreement and relative L2 drift of a swapped model's first output against the original's.

    Agreement counts positions: one per sample for (N, C) class scores, one per token for (N, L, V) token scores
    (a language model's next-token prediction), one per pixel for dense predictions."""

    def __init__(self) -> None:
        self.squared_diff: Any = None
        self.squared_norm: Any = None
        self.agreed: Any = None
        self.total = 0
        self.classifier = True  # argmax agreement only means something for class scores (more than one)

    def update(self, run: Run, a: Any, b: Any, valid: int) -> None:
        self.classifier = self.classifier and len(a.shape) >= 2 and int(a.shape[-1]) > 1
        diff, norm, agreed = run.drift_sums(a, b, self.classifier)
        self.squared_diff = diff if self.squared_diff is None else self.squared_diff + diff
        self.squared_norm = norm if self.squared_norm is None else self.squared_norm + norm
        if agreed is not None:
            self.agreed = agreed if self.agreed is None else self.agreed + agreed
        positions = 1
        for size in tuple(a.shape)[1:-1]:
            positions *= int(size)
        self.total += valid * positions

    def result(self) -> tuple[float | None, float | None]:
        """(agreement, drift): None where nothing was measured, or for agreement when the output is no classifier."""
        if self.squared_diff is None or self.squared_norm is None or not self.total:
            return None, None
        norm = float(self.squared_norm)
        drift = (float(self.squared_diff) / norm) ** 0.5 if norm > 0 else None
        agreement = float(self.agreed) / self.total if self.classifier and self.agreed is not None else None
        return agreement, drift


def predictions(
    run: Run, swapped: Run, data: Any, labels: Any, options: ScanOptions
) -> tuple[float | None, float | None]:
    """(agreement, drift) of `swapped` against `run` over the data, both in inference mode without gradients."""
    agreement = Agreement()
    with run.evaluating(), swapped.evaluating():
        for batch in batches(run, data, labels, options):
            a, b = run.output(batch.x)[: batch.valid], swapped.output(batch.x)[: batch.valid]
            agreement.update(run, a, b, batch.valid)
    return agreement.result()


def training_batches(run: Run, data: Any, labels: Any, options: ScanOptions, steps: int) -> Iterator[Batch]:
    """`steps` labelled batches in data order, cycling over the data."""
    done = 0
    while done < steps:
        seen = False
        for batch in batches(run, data, labels, options):
            seen = True
            if batch.y is None:
                raise DeadNeuronError(
                    "fine-tuning needs labels; pass data with labels (a .npz with 'y', an (x, y) pair or labels=...) "
                    "or drop finetune_steps"
                )
            yield batch
            done += 1
            if done >= steps:
                return
        if not seen:
            raise DeadNeuronError("no samples to fine-tune on; expected at least one batch")


def _finetuned(
    backend: Backend, run: Run, model: Any, data: Any, labels: Any, options: ScanOptions, tune: TuneOptions
) -> Any:
    stream = training_batches(run, data, labels, options, tune.steps)
    first = next(stream)
    # a model that computes its own loss from labels (transformers) trains on it, as its scans take it
    loss: ResolvedLoss = resolve_loss(options.loss, True, run.class_labels(first.y), run.own_loss(first))
    return backend.train(model, chain([first], stream), loss=loss, lr=tune.lr, seed=options.seed)


def check_reiterable(data: Any) -> None:
    """compare reads the data several times: a one-shot iterator (a generator) is empty the second time."""
    if isinstance(data, Iterator):
        raise DeadNeuronError(
            f"compare reads the data several times, but a {type(data).__name__} can be read once; expected an "
            "array, a tensor, a path, or a re-iterable loader (a list of batches, a DataLoader)"
        )


def left_alone_reasons(include: tuple[str, ...]) -> dict[str, str]:
    """Why a site of each kind is left alone by a swap of the kinds `include` (design.md, "Honest swaps").

    ReLU6 is a clipped ReLU: its cap at 6 is part of the model (MobileNet's, quantization-friendly), and SineReLU
    has none, so it is swapped only when asked (`include`), and then for an uncapped SineReLU."""
    reasons = {
        "relu6": "a clipped ReLU: its cap at 6 is part of the model; include relu6 to swap it for an uncapped SineReLU",
        "leaky_relu": "already passes a gradient below 0; include leaky_relu to swap it",
        "sinerelu": "already SineReLU",
    }
    for kind in include:
        reasons[kind] = "of a kind the swap replaces, but out of its reach here (e.g. decomposed in an exported graph)"
    return defaultdict(lambda: "not a ReLU: SineReLU replaces the ReLU family only", reasons)


def revived(before: Report, trained: Report) -> int:
    """Units dead in `before` that are not dormant in `trained` (paired by site order and unit index)."""
    count = 0
    for old, new in zip(before.layers, trained.layers, strict=False):
        if old.units != new.units:
            continue
        count += len(set(old.dead_units) - set(new.dormant_units))
    return count


def compare(
    backend: Backend, model: Any, data: Any, options: ScanOptions, swap: SwapOptions, tune: TuneOptions, *,
    labels: Any = None, progress: Progress | None = None, name: str | None = None,
) -> Comparison:
    """The `Comparison` of `model` and its swap (see `deadneuron.compare`)."""
    tune.check_loss(options.loss)
    check_reiterable(data)
    run = backend.prepare(model, None)
    if options.input_shape is None and run.example_shape is not None:
        # the swapped graph module of a program no longer carries the program's example input
        options = replace(options, input_shape=run.example_shape)
    swapped = backend.swap_for_scan(model, swap)
    display = name or run.display
    before = scan(backend, model, data, options, labels=labels, progress=progress, name=display)
    after = scan(backend, swapped, data, options, labels=labels, progress=progress, name=f"{display} ({swap.to})")
    agreement, drift = predictions(run, backend.prepare(swapped, None), data, labels, options)
    revival = None
    if tune.steps:
        trained = [_finetuned(backend, run, m, data, labels, options, tune) for m in (model, swapped)]
        relu_after, swap_after = (scan(backend, m, data, options, labels=labels, name=display) for m in trained)
        revival = {
            "steps": tune.steps,
            "lr": tune.lr,
            "optimizer": "adam",
            "batch_size": options.batch_size,
            "formerly_dead": before.dead,
            "revived_relu": revived(before, relu_after),
            "revived_sinerelu": revived(before, swap_after),
        }
    return Comparison.build(
        to=swap.to,
        epsilon=dict(swap.epsilons),
        before=before,
        after=after,
        agreement=agreement,
        output_drift=drift,
        revival=revival,
        reasons=left_alone_reasons(swap.include),
    )
