"""The public API: `scan`, `compare`, `swap`, `inspect`, `load_model`. The framework is picked from the model's type.

Keras comes first: a Keras model on the torch backend is also an `nn.Module` and must be scanned as Keras.
A framework is looked up in `sys.modules`, never imported just to test a type.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .core import engine
from .core.compare import compare as compare_with
from .core.options import SwapOptions, TuneOptions, scan_options, split_options
from .errors import DeadNeuronError

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .core.engine import Backend
    from .core.options import CompareKeywords, LoadKeywords, ScanKeywords, SwapKeywords
    from .report import Comparison, Report, SiteInfo

Progress = Callable[[int], None]

TORCH_SUFFIXES = (".pt2", ".pt", ".pth", ".bin", ".safetensors", ".ckpt")
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def framework_of(model: Any) -> str:
    """ "keras" or "torch" for a live model; DeadNeuronError for anything else."""
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
    raise DeadNeuronError(
        f"unknown model format {suffix or '(no extension)'!r} for {os.fspath(path)}; expected one of {known}"
    )


def backend(framework: str) -> Backend:
    """The scan engine's backend for a framework; importing it imports the framework."""
    try:
        if framework == "keras":
            from .keras.backend import BACKEND as keras_backend

            return keras_backend
        from .torch.backend import BACKEND as torch_backend

        return torch_backend
    except ImportError as error:
        if error.name in ("torch", "tensorflow", "keras"):
            extra = "torch" if framework == "torch" else "tensorflow"
            raise DeadNeuronError(
                f"{framework} is not installed; install it with: pip install 'deadneuron[{extra}]'"
            ) from error
        raise


def load_model(path: str | os.PathLike[str], **options: Unpack[LoadKeywords]) -> Any:
    """Load a saved model safely: `.pt2`, a state dict with `arch`, `.keras`, `.h5`, or a transformers directory
    (`save_pretrained`: config.json and safetensors weights, no code from it run) (see design.md).

    Options: `arch` (a PyTorch state dict's architecture, FILE.py:NAME or pkg.module:NAME), `unsafe_pickle`
    (a fully pickled torch module: runs code from the file), `unsafe_deserialization` (Keras without safe_mode).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_transformers_dir(path)
    framework = framework_of_path(path)
    if not os.path.exists(path):
        raise DeadNeuronError(f"model file not found: {path}")
    from .filekind import check

    check(path, os.path.splitext(path)[1])  # the content matches the name, told before a framework is imported
    return backend(framework).load_model(path, **options)


def load_transformers_dir(path: str) -> Any:
    """The model of a transformers directory (`deadneuron.torch.hf`); a folder that is none is refused."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DeadNeuronError(
            f"{path} is a folder without config.json; expected a model file or a transformers model directory "
            "written by model.save_pretrained(path) (config.json and model.safetensors)"
        )
    backend("torch")  # the friendly message when torch is missing
    from .torch.hf import load_pretrained

    return load_pretrained(path)


def scan(
    model: Any,
    data: Any = None,
    *,
    labels: Any = None,
    progress: Progress | None = None,
    name: str | None = None,
    **options: Unpack[ScanKeywords],
) -> Report:
    """Scan `model` on `data` and return the Report of dead, dormant and gradient-dead units per site.

    `data` may be an array, a tensor, an (x, y) pair, an iterable of batches (DataLoader, tf.data, PyDataset) or
    a path to a `.npz`/`.npy`. Without data, `samples` standard-normal inputs are drawn from the model's input
    spec (or `input_shape`, one sample's shape). Options (`deadneuron.core.options.ScanOptions`): `batch_size=64`,
    `loss="auto"` (`ce`, `mse`, `probe`, `none`), `atol=0.0`, `gtol=0.0`, `unit_axis=None`, `samples=None`,
    `input_shape=None`, `seed=0`. `progress(n)` is called with each batch's sample count; `name` names the model.
    """
    checked = scan_options(**options)
    return engine.scan(backend(framework_of(model)), model, data, checked, labels=labels, progress=progress, name=name)


def scan_ranks(
    model: Any, data: Any, *, progress: Progress | None = None, name: str | None = None, **options: Unpack[ScanKeywords]
) -> Report:
    """`scan` in every process torchrun started, each on its shard of the samples; every rank gets the report of
    one process (`deadneuron.torch.distributed`). `data` is a `deadneuron.data.Dataset` or None."""
    checked = scan_options(**options)
    if framework_of(model) != "torch":
        raise DeadNeuronError(
            "torchrun shards PyTorch scans; this is a Keras model: scan it in one process (python -m deadneuron "
            "scan ...), or in training with deadneuron.keras.DeadNeuronCallback under a tf.distribute strategy"
        )
    from .torch.distributed import scan as scan_sharded

    return scan_sharded(model, data, checked, progress=progress, name=name)


def inspect(model: Any, *, input_shape: Sequence[int] | None = None) -> list[SiteInfo]:
    """The activation sites of `model` in order of first execution (one forward pass on random inputs)."""
    return engine.inspect(backend(framework_of(model)), model, input_shape)


def swap(model: Any, **options: Unpack[SwapKeywords]) -> Any:
    """A new model with every ReLU site replaced by SineReLU; the original is untouched.

    Epsilon per site: 0.0025 after convolutions, 0.025 after dense layers (the article's MNIST settings);
    `epsilon` sets both. `include` adds ReLU6 (`"relu6"`) and leaky ReLUs (`"leaky_relu"`) to the swap.
    A PyTorch `nn.Module` comes back as an `nn.Module` (functional relu calls swapped too), an
    `ExportedProgram` as an `ExportedProgram` that runs without deadneuron; a Keras model as a Keras model of the
    same kind. Options: `to="sinerelu"`, `epsilon`, `epsilon_conv`, `epsilon_dense`, `form="piecewise"`,
    `include=("relu",)`.
    """
    return backend(framework_of(model)).swap(model, SwapOptions.make(**options))


STATE_DICT_SWAP = (
    "{path} holds weights only, and a swap changes no weight: SineReLU replaces the activations, which live "
    "in the code. Swap in code where the model is built: `model = deadneuron.swap(model)` (it also swaps "
    "functional relu calls); no file was written"
)


def swap_file(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    unsafe_pickle: bool = False,
    unsafe_deserialization: bool = False,
    **swapping: Unpack[SwapKeywords],
) -> str:
    """Write a swapped copy of a saved model in the input's format; return what was done, in one line.

    `.pt2` -> `.pt2` that `torch.export.load` reads without deadneuron; `.keras`/`.h5` -> `.keras` (or `.h5`
    when `output_path` says so) that loads once `deadneuron.keras` is imported. A state dict is refused with
    the one line that swaps in code (its weights would not change). The input file is never modified.
    """
    options = SwapOptions.make(**swapping)
    epsilons = options.epsilons
    source, target = os.fspath(model_path), os.fspath(output_path)
    if os.path.isdir(source):
        raise DeadNeuronError(STATE_DICT_SWAP.format(path=source))
    framework = framework_of_path(source)
    suffix = os.path.splitext(source)[1].lower()
    out_suffix = os.path.splitext(target)[1].lower()
    if framework == "torch" and suffix != ".pt2":
        if not os.path.exists(source):
            raise DeadNeuronError(f"model file not found: {source}")
        raise DeadNeuronError(STATE_DICT_SWAP.format(path=source))
    allowed = (".pt2",) if framework == "torch" else (".keras", ".h5")
    if out_suffix not in allowed:
        raise DeadNeuronError(
            f"cannot write a {suffix} model's swap to {target}; expected an output path ending in "
            f"{' or '.join(allowed)}"
        )
    if os.path.exists(source) and os.path.exists(target) and os.path.samefile(source, target):
        raise DeadNeuronError(f"{target} is the input file; choose another path (the input is never modified)")
    model = load_model(source, arch=arch, unsafe_pickle=unsafe_pickle, unsafe_deserialization=unsafe_deserialization)
    count = backend(framework).swap_file(model, target, options)
    if count == 0:
        return f"wrote {target}: no ReLU site found in {source}, so the copy computes the same as the input"
    return (
        f"wrote {target}: {count} ReLU site{'s' if count != 1 else ''} swapped for SineReLU (epsilon "
        f"{epsilons['conv']} after convolutions, {epsilons['dense']} after dense layers)"
    )


def compare(
    model: Any,
    data: Any = None,
    *,
    finetune_steps: int = 0,
    lr: float = 1e-3,
    labels: Any = None,
    progress: Progress | None = None,
    name: str | None = None,
    **options: Unpack[CompareKeywords],
) -> Comparison:
    """Scan `model` and its SineReLU swap on the same data; prediction agreement, output drift, and optionally
    how many formerly dead units `finetune_steps` of training revive under each activation.

    Both scans use the same batches, loss and probe seed, so every difference comes from the swap. With
    `finetune_steps=K` (labels needed), copies of both models train K steps with Adam(lr) on the same batches,
    in data order, cycling over the data; `revival` then counts the formerly dead units (dead under ReLU
    before training) that are no longer dormant after training, for each model. Options: those of `scan` and of
    `swap` (`to="sinerelu"`, `epsilon`, `epsilon_conv`, `epsilon_dense`, `form`, `include`); the comparison says
    which sites were swapped and why the others were left alone.
    """
    scanning, swapping = split_options(options)
    tuning = TuneOptions(finetune_steps, lr)
    chosen = backend(framework_of(model))
    return compare_with(chosen, model, data, scanning, swapping, tuning, labels=labels, progress=progress, name=name)
