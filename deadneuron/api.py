"""The public API: `scan`, `compare`, `swap`, `inspect`, `load_model`. The framework is picked from the model's type.

Keras comes first: a Keras model on the torch backend is also an `nn.Module` and must be scanned as Keras.
A framework is looked up in `sys.modules`, never imported just to test a type.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .errors import DeadNeuronError

if TYPE_CHECKING:
    from .report import Report, SiteInfo

Progress = Callable[[int], None]

TORCH_SUFFIXES = (".pt2", ".pt", ".pth", ".bin", ".safetensors", ".ckpt")
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def framework_of(model: Any) -> str:
    """"keras" or "torch" for a live model; DeadNeuronError for anything else."""
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, (keras.Model, keras.layers.Layer)):
        return "keras"
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(model, torch.nn.Module):
            return "torch"
        export = sys.modules.get("torch.export")
        if export is not None and isinstance(model, export.ExportedProgram):
            return "torch"
    raise DeadNeuronError(
        f"cannot scan a {type(model).__module__}.{type(model).__qualname__}; expected a torch.nn.Module, a "
        "torch.export.ExportedProgram or a Keras model"
    )


def framework_of_path(path: str | os.PathLike[str]) -> str:
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix in KERAS_SUFFIXES:
        return "keras"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    known = ", ".join(TORCH_SUFFIXES + KERAS_SUFFIXES)
    raise DeadNeuronError(f"unknown model format {suffix or '(no extension)'!r} for {os.fspath(path)}; expected one of {known}")


def adapter(framework: str) -> ModuleType:
    """The adapter module of a framework; importing it imports the framework."""
    name = {"torch": "deadneuron.torch.adapter", "keras": "deadneuron.keras.adapter"}[framework]
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if error.name in ("torch", "tensorflow", "keras"):
            extra = "torch" if framework == "torch" else "tensorflow"
            raise DeadNeuronError(
                f"{framework} is not installed; install it with: pip install 'deadneuron[{extra}]'"
            ) from error
        raise


def load_model(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    unsafe_pickle: bool = False,
    unsafe_deserialization: bool = False,
) -> Any:
    """Load a saved model safely: `.pt2`, a state dict with `arch`, `.keras` or `.h5` (see design.md)."""
    path = os.fspath(path)
    framework = framework_of_path(path)
    if not os.path.exists(path):
        raise DeadNeuronError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise DeadNeuronError(f"{path} is a folder; expected a model file")
    return adapter(framework).load_model(
        path, arch=arch, unsafe_pickle=unsafe_pickle, unsafe_deserialization=unsafe_deserialization
    )


def scan(
    model: Any,
    data: Any = None,
    *,
    batch_size: int = 64,
    labels: Any = None,
    loss: str = "auto",
    atol: float = 0.0,
    gtol: float = 0.0,
    unit_axis: int | None = None,
    samples: int | None = None,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    name: str | None = None,
) -> Report:
    """Scan `model` on `data` and return the Report of dead, dormant and gradient-dead units per site.

    `data` may be an array, a tensor, an (x, y) pair, an iterable of batches (DataLoader, tf.data, PyDataset) or
    a path to a `.npz`/`.npy`. Without data, `samples` standard-normal inputs are drawn from the model's input
    spec (or `input_shape`, one sample's shape).
    """
    if loss not in LOSSES:
        raise DeadNeuronError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if atol < 0 or gtol < 0:
        raise DeadNeuronError(f"thresholds must be >= 0, received atol={atol}, gtol={gtol}")
    framework = framework_of(model)
    return adapter(framework).scan(
        model,
        data,
        batch_size=batch_size,
        labels=labels,
        loss=loss,
        atol=atol,
        gtol=gtol,
        unit_axis=unit_axis,
        samples=samples,
        input_shape=input_shape,
        seed=seed,
        progress=progress,
        name=name,
    )


def inspect(model: Any, *, input_shape: Sequence[int] | None = None) -> list[SiteInfo]:
    """The activation sites of `model` in order of first execution (one forward pass on random inputs)."""
    return adapter(framework_of(model)).inspect(model, input_shape=input_shape)


LOSSES = ("auto", "ce", "mse", "probe", "none")


def compare(model: Any, data: Any = None, *, to: str = "sinerelu", **options: Any) -> Any:
    """Scan `model` and its SineReLU swap on the same data (issue 5: not built yet)."""
    from .errors import NotBuiltError

    raise NotBuiltError("compare is not built yet (it lands with the compare/swap work); use scan for now")


def swap(model: Any, *, to: str = "sinerelu", epsilon: float | None = None, **options: Any) -> Any:
    """A new model with every ReLU site replaced by SineReLU (issue 5: not built yet)."""
    from .errors import NotBuiltError

    raise NotBuiltError("swap is not built yet (it lands with the compare/swap work)")


def swap_file(model: Any, output: Any, **options: Any) -> str:
    from .errors import NotBuiltError

    raise NotBuiltError("swap is not built yet (it lands with the compare/swap work)")
