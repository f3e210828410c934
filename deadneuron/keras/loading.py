"""Load `.keras` and `.h5` models safely: uncompiled, in safe mode, with both SineReLUs known.

Keras' own errors for a refused or broken file are long and name internals (a TypeError about
`Sequential.from_config`, an h5py OSError); here each becomes one `DeadNeuronError` that says what happened,
what was expected and how to fix it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import threading
import zipfile
from typing import Any

import keras
import numpy as np

from ..errors import DeadNeuronError
from .sinerelu import custom_objects

SUFFIXES = (".keras", ".h5", ".hdf5")
UNSAFE_FLAG = "--unsafe-deserialization (Python: unsafe_deserialization=True)"


def load_model(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    unsafe_pickle: bool = False,
    unsafe_deserialization: bool = False,
) -> Any:
    """Load a Keras model file uncompiled and, unless `unsafe_deserialization`, without running its code.

    `unsafe_pickle` is accepted for the backend protocol and has no effect: Keras files hold no pickles (their
    risk, Lambda layers, is what `unsafe_deserialization` opts into). `arch` is for PyTorch state dicts.
    """
    del unsafe_pickle  # a PyTorch notion; see the docstring
    path = os.fspath(path)
    if arch is not None:
        raise DeadNeuronError(
            f"--arch applies to PyTorch state dicts, but {path} is a Keras file, which holds its own "
            "architecture; drop --arch"
        )
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise DeadNeuronError(
            f"cannot load {path} as a Keras model; expected a file ending in {', '.join(SUFFIXES)}"
        )
    if not os.path.isfile(path):
        raise DeadNeuronError(f"Keras model file not found: {path}; expected an existing {suffix} file")
    if suffix == ".keras":
        check_archive(path)
    budget = VariableBudget(path, 2 * os.path.getsize(path) + UNSAVED_ALLOWANCE)
    with tempfile.TemporaryDirectory(prefix="deadneuron-") as scratch:
        try:
            readable = _with_input_layer(path, scratch) if suffix != ".keras" else path
            with budget:
                model = keras.models.load_model(
                    readable, compile=False, safe_mode=not unsafe_deserialization, custom_objects=custom_objects()
                )
        except Exception as error:  # ValueError, TypeError, KeyError, OSError...: sorted in _explain
            if budget.exceeded is not None:  # Keras may wrap our error in its own
                raise budget.exceeded from error
            raise _explain(path, suffix, error) from error
    if not isinstance(model, keras.Model):
        raise DeadNeuronError(
            f"{path} holds a {type(model).__name__}, not a Keras model; expected a saved model"
        )
    return model


# A model's variables that its file does not hold (seed generators, counters) may add this much to its weights.
UNSAVED_ALLOWANCE = 256 << 20


class VariableBudget:
    """While a model loads: every Keras variable's size is counted when its shape is fixed, before its value is
    allocated, and the load stops once the model needs more than `limit` bytes. Keras builds every layer of the
    config and fills it with initial values before it reads the weights and compares shapes, so a config that
    asks for a Dense layer of ten million units would take 20 GB, whatever the file holds.

    Keras offers no hook there, so `Variable._validate_shape` is wrapped while any load runs. The budget counts the
    variables of its own thread only: another thread's model (a user training while a file loads) is neither
    counted nor refused, and loads in two threads that end in any order leave Keras as it was."""

    def __init__(self, path: str, limit: int) -> None:
        self.path, self.limit, self.used = path, limit, 0
        self.exceeded: DeadNeuronError | None = None
        self._outer: VariableBudget | None = None

    def __enter__(self) -> VariableBudget:
        _patch(+1)
        self._outer = getattr(_BUDGET, "current", None)
        _BUDGET.current = self
        return self

    def __exit__(self, *exc: object) -> None:
        _BUDGET.current = self._outer
        _patch(-1)

    def count(self, variable: Any, shape: Any) -> None:
        try:
            itemsize = np.dtype(variable._dtype).itemsize
        except TypeError:  # bfloat16 and the like
            itemsize = 4
        self.used += math.prod(int(n) for n in shape) * itemsize
        if self.used > self.limit:
            self.exceeded = DeadNeuronError(
                f"{self.path}: its model config asks for {self.used:,} bytes of variables or more (a "
                f"{tuple(shape)} variable among them), more than twice the file's size; refused (building it "
                "would exhaust memory); expected the config saved with these weights"
            )
            raise self.exceeded


_BUDGET = threading.local()  # .current: the VariableBudget of the load running in this thread
_PATCH_LOCK = threading.Lock()
_PATCH: dict[str, Any] = {"loads": 0, "original": None}  # loads in progress in all threads; Keras's own method


def _patch(change: int) -> None:
    """One more (+1) or one fewer (-1) load in progress: the first wraps `Variable._validate_shape`, the last puts
    Keras's own back."""
    from keras.src.backend.common.variables import Variable

    with _PATCH_LOCK:
        if change > 0 and _PATCH["loads"] == 0:
            original = _PATCH["original"] = Variable._validate_shape

            def counted(variable: Any, shape: Any) -> Any:
                shape = original(variable, shape)
                budget = getattr(_BUDGET, "current", None)
                if budget is not None:
                    budget.count(variable, shape)
                return shape

            Variable._validate_shape = counted
        _PATCH["loads"] += change
        if change < 0 and _PATCH["loads"] == 0:
            Variable._validate_shape = _PATCH["original"]


# A .keras archive's JSON is parsed whole, and a compressed member is inflated whole: caps fixed before reading.
JSON_LIMIT = {"config.json": 16 << 20, "metadata.json": 1 << 20}
INFLATE_LIMIT = 64 << 20  # a compressed member may expand beyond this only at a plausible ratio
INFLATE_RATIO = 100


def check_archive(path: str) -> None:
    """Refuse a `.keras` zip that two readers could read differently or that expands far beyond its size: one
    pass over its central directory (deadneuron.archive), before Keras opens it."""
    from ..archive import open_zip

    expected = "a .keras archive written by model.save"
    if not zipfile.is_zipfile(path):
        return  # not a zip at all: Keras' loader fails, and _explain says so in its words
    with open_zip(path, what=path, kind="a Keras archive", expected=expected) as archive:
        for info in archive.infolist():
            limit = JSON_LIMIT.get(info.filename)
            if info.compress_type != zipfile.ZIP_STORED:
                limit = min(limit or INFLATE_LIMIT, max(INFLATE_LIMIT, INFLATE_RATIO * info.compress_size))
            if limit is not None and info.file_size > limit:
                raise DeadNeuronError(
                    f"{path}: the member {info.filename} expands to {info.file_size:,} bytes, more than the "
                    f"{limit:,} it may hold; refused (a small file that expands to this much is a zip bomb or a "
                    f"damaged file); expected {expected}"
                )


def _with_input_layer(path: str, scratch: str) -> str:
    """`path`, or a patched copy in `scratch` if it is a Keras 2.0-2.2 Sequential model (keras-contrib era).

    Those files give the first layer `batch_input_shape` instead of an InputLayer, and Keras 3 reads that as
    an input shape without the batch axis, so the model loads expecting one axis too many (inputs (None, 4)
    become (None, None, 4)). The copy declares the input as tf.keras 2 files do, which Keras 3 reads right.
    """
    import h5py  # a Keras dependency

    with h5py.File(path, "r") as file:
        raw = file.attrs.get("model_config")
    if raw is None:
        return path  # Keras says what is missing
    config = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    layers = config.get("config", {}).get("layers") if config.get("class_name") == "Sequential" else None
    if not layers or layers[0].get("class_name") == "InputLayer" or "module" in layers[0]:
        return path
    first = layers[0].get("config", {})
    if "batch_input_shape" not in first:
        return path
    input_layer = {
        "class_name": "InputLayer",
        "config": {
            "batch_input_shape": first.pop("batch_input_shape"),
            "dtype": first.get("dtype", "float32"),
            "sparse": False,
            "name": f"{first.get('name', 'layer')}_input",
        },
    }
    config["config"]["layers"] = [input_layer, *layers]
    patched = os.path.join(scratch, os.path.basename(path))
    shutil.copyfile(path, patched)
    with h5py.File(patched, "r+") as file:
        file.attrs["model_config"] = json.dumps(config).encode("utf-8")
    return patched


def _explain(path: str, suffix: str, error: Exception) -> DeadNeuronError:
    """One clear message for what Keras raised while loading `path`."""
    message = str(error)
    if "Lambda" in message and "safe_mode" in message:
        return DeadNeuronError(
            f"refused to load {path}: it contains a Lambda layer, whose Python code would run on load; "
            f"expected a model without Lambda layers. If you trust the file, pass {UNSAFE_FLAG}"
        )
    if "safe_mode" in message or "unsafe_deserialization" in message:
        return DeadNeuronError(
            f"refused to load {path}: it holds Python code that Keras runs only outside safe mode. If you "
            f"trust the file, pass {UNSAFE_FLAG}"
        )
    unknown = re.search(
        r"Unknown (?:layer|activation|object|initializer|regularizer|constraint)[^:]*: '?([^'.\s]+)", message
    )
    unknown = unknown or re.search(r"Could not locate (?:class|function) '([^']+)'", message)
    if unknown:
        name = unknown.group(1)
        return DeadNeuronError(
            f"cannot load {path}: it uses the custom Keras object {name!r}, which is not registered in this "
            "process; expected built-in Keras objects, deadneuron's SineReLU or keras-contrib's SineReLU. "
            f"Import the module that defines {name!r} (registered with "
            "keras.saving.register_keras_serializable), then load from Python: "
            "deadneuron.keras.loading.load_model"
        )
    corrupt = (
        isinstance(error, (OSError, zipfile.BadZipFile, KeyError, EOFError))
        or "accessible `.keras` zip file" in message
        or "No model config found" in message
    )
    if corrupt:
        if suffix == ".keras":
            expected = "a .keras zip archive written by model.save"
            # Keras says "File not found" for any file that is not a zip; this one exists: do not repeat it.
            detail = "not a zip archive" if "zip file" in message else _first_line(message)
        else:
            expected, detail = "an HDF5 file written by model.save", _first_line(message)
        return DeadNeuronError(
            f"cannot load {path}: the file is damaged or not a Keras model ({detail}); expected {expected}."
            " Check that the file was copied completely, or save the model again"
        )
    return DeadNeuronError(
        f"cannot load {path} with Keras {keras.__version__}: {type(error).__name__}: "
        f"{_first_line(message)}; expected a model saved by Keras 2 or 3 with model.save. Check that it "
        "loads with keras.models.load_model(path, compile=False)"
    )


def _first_line(message: str, limit: int = 200) -> str:
    line = message.strip().splitlines()[0] if message.strip() else "no message"
    return line if len(line) <= limit else line[: limit - 3] + "..."
