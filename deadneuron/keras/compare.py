"""The Keras side of `compare` (design.md, issue 5): the swapped model to scan, predictions, fine-tuning.

The framework-free glue (the scans, the revival counts, the Comparison) lives in `deadneuron.api.compare`.

- `predictions`: argmax agreement and relative L2 drift of the model's (single) output, `training=False`.
- `finetune`: copies of both models (clones with the weights copied, or deep copies of subclassed models), compiled
  with Adam(lr) and trained with `train_on_batch` on the same batches in data order (cycling). The loss is
  sparse/categorical cross-entropy for integer/one-hot labels (on logits unless the model ends in a softmax or
  sigmoid) or MSE for float targets, as in a scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from ..errors import DeadNeuronError
from .adapter import _is_integer, resolve_loss
from .feed import batches
from .sites import output_activation
from .swap import _clonable
from .swap import swap as _swap

__all__ = ["finetune", "predictions", "sample_shape", "scannable_swap"]


def scannable_swap(model: Any, *, epsilons: dict[str, float], form: str) -> Any:
    return _swap(model, epsilon_conv=epsilons["conv"], epsilon_dense=epsilons["dense"], form=form)  # type: ignore[arg-type]


def sample_shape(model: Any, input_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    return tuple(input_shape) if input_shape is not None else None


def _output(model: Any, x: Any) -> np.ndarray:
    leaves = keras.tree.flatten(model(x, training=False))
    if not leaves:
        raise DeadNeuronError("the model returns no output to compare")
    return np.asarray(keras.ops.convert_to_numpy(leaves[0]), dtype=np.float64)


def predictions(
    model: Any,
    swapped: Any,
    data: Any,
    *,
    batch_size: int,
    labels: Any,
    samples: int | None,
    input_shape: Sequence[int] | None,
    seed: int,
) -> tuple[float | None, float | None]:
    squared_diff = squared_norm = 0.0
    agreed = total = 0
    classifier = True
    for batch in batches(
        model, data, labels=labels, batch_size=batch_size, samples=samples, input_shape=input_shape, seed=seed
    ):
        a, b = _output(model, batch.x), _output(swapped, batch.x)
        squared_diff += float(np.square(b - a).sum())
        squared_norm += float(np.square(a).sum())
        classifier = classifier and a.ndim >= 2 and a.shape[-1] > 1
        if classifier:
            agreed += int((a.argmax(-1) == b.argmax(-1)).reshape(len(a), -1).all(1).sum())
        total += batch.size
    if not total:
        return None, None
    drift = (squared_diff / squared_norm) ** 0.5 if squared_norm > 0 else None
    return (agreed / total if classifier else None), drift


def _training_copy(model: Any) -> Any:
    if _clonable(model):
        trained = keras.models.clone_model(model, recursive=True)
        trained.set_weights(model.get_weights())
        return trained
    from .swap import _deep_copy

    return _deep_copy(model)


def _loss(kind: str, y: Any, model: Any) -> Any:
    if kind == "mse":
        return keras.losses.MeanSquaredError()
    from_logits = output_activation(model) is None
    if np.ndim(y) >= 2 and not _is_integer(y) and np.shape(y)[-1] > 1:
        return keras.losses.CategoricalCrossentropy(from_logits=from_logits)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def finetune(
    model: Any,
    swapped: Any,
    data: Any,
    *,
    steps: int,
    lr: float,
    loss: str,
    batch_size: int,
    labels: Any,
    samples: int | None,
    input_shape: Sequence[int] | None,
    seed: int,
) -> tuple[Any, Any]:
    trained = []
    for source in (model, swapped):
        copy_ = _training_copy(source)
        done = 0
        compiled = False
        while done < steps:
            seen = False
            for batch in batches(
                model,
                data,
                labels=labels,
                batch_size=batch_size,
                samples=samples,
                input_shape=input_shape,
                seed=seed,
            ):
                seen = True
                if batch.y is None:
                    raise DeadNeuronError(
                        "fine-tuning needs labels; pass data with labels (a .npz with 'y', an (x, y) pair or "
                        "labels=...) or drop finetune_steps"
                    )
                if not compiled:
                    kind = resolve_loss(loss, True, _is_integer(batch.y))
                    copy_.compile(
                        optimizer=keras.optimizers.Adam(learning_rate=lr), loss=_loss(kind, batch.y, copy_)
                    )
                    compiled = True
                copy_.train_on_batch(batch.x, batch.y)
                done += 1
                if done >= steps:
                    break
            if not seen:
                raise DeadNeuronError("no samples to fine-tune on; expected at least one batch")
        trained.append(copy_)
    return trained[0], trained[1]
