"""Loading PyTorch model files without running code from them (design.md, "Model files").

- `.pt2` (torch.export): read by `deadneuron.torch.pt2`, which decides from allowlists (layout, operators,
  weights-only unpickling) and never calls `torch.export.load`.
- state dicts (`.pt`, `.pth`, `.bin`, `.ckpt` with a `state_dict` key, `.safetensors`) need `arch`: `FILE.py:NAME`
  or `pkg.module:NAME`, a class or a factory called without arguments.
- TorchScript archives are refused with a pointer to torch.export; a fully pickled module loads only with
  `unsafe_pickle=True`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import DeadNeuronError
from .pt2_program import weights_only_loads  # noqa: F401 (tests call it directly)

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_TORCHSCRIPT_HINT = (
    "re-save the model with torch.export: torch.export.save(torch.export.export(model, example_inputs), "
    "'model.pt2'), or save model.state_dict() and pass --arch"
)


def load_model(
    path: str, *, arch: str | None = None, unsafe_pickle: bool = False, unsafe_deserialization: bool = False
) -> Any:
    """An `ExportedProgram` for `.pt2`, an `nn.Module` (in eval mode as saved, weights loaded) otherwise."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".pt2":
        if arch is not None:
            raise DeadNeuronError(
                f"--arch applies to PyTorch state dicts, but {path} is a torch.export archive, which holds its own "
                "architecture; drop --arch"
            )
        return load_exported(path)
    if suffix not in STATE_DICT_SUFFIXES:
        raise DeadNeuronError(
            f"unknown PyTorch model format {suffix!r} for {path}; expected .pt2 or a state dict "
            f"({', '.join(STATE_DICT_SUFFIXES)})"
        )
    if suffix != ".safetensors" and _is_torchscript(path):
        raise DeadNeuronError(f"{path} is a TorchScript archive, which cannot be hooked; {_TORCHSCRIPT_HINT}")
    state: Any
    if suffix == ".safetensors":
        state = _load_safetensors(path)
    else:
        state = _torch_load(path, unsafe_pickle=unsafe_pickle)
        if isinstance(state, nn.Module):
            if arch is not None:
                raise DeadNeuronError(
                    f"{path} holds a whole pickled module; --arch is for state dicts: drop --arch"
                )
            return state
        state = _state_dict_of(state, path)
    if arch is None:
        raise DeadNeuronError(
            f"{path} is a state dict (weights without the architecture); expected --arch FILE.py:NAME or "
            "--arch pkg.module:NAME naming the model class or a factory that builds it"
        )
    model = build_arch(arch)
    load_weights(model, state, path)
    model.eval()
    return model


# .pt2 -----------------------------------------------------------------------------------------------------------
def load_exported(path: str) -> Any:
    """The ExportedProgram in a `.pt2`, read without `torch.export.load` (see deadneuron.torch.pt2)."""
    from .pt2 import load

    return load(path)


# state dicts ----------------------------------------------------------------------------------------------------
def _is_torchscript(path: str) -> bool:
    from ..archive import check_directory

    try:
        if not zipfile.is_zipfile(path):
            return False
        check_directory(path, what=path, expected="a file written by torch.save")
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False  # damaged: torch.load says so
    return any(n.endswith("constants.pkl") for n in names) or any("/code/" in n for n in names)


def _check_torch_zip(path: str) -> None:
    """A torch.save zip: the central-directory pass (deadneuron.archive) and every member stored, as torch.save
    writes them, so torch's own reader cannot read another copy of a name or inflate a member past the file."""
    from ..archive import ZIP_ERRORS, check_stored_zip_file

    try:
        is_zip = zipfile.is_zipfile(path)
    except ZIP_ERRORS:
        return
    if is_zip:
        check_stored_zip_file(path, kind="a torch.save file", expected="a file written by torch.save")


def _torch_load(path: str, *, unsafe_pickle: bool) -> Any:
    _check_torch_zip(path)
    if unsafe_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise DeadNeuronError(f"cannot unpickle {path}: {_first_line(error)}") from error
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as error:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            unsafe = []
        offending = f" ({', '.join(sorted(unsafe))})" if unsafe else ""
        raise DeadNeuronError(
            f"{path} holds pickled Python objects{offending}, not just tensors; refused (unpickling runs code "
            "from the file); save model.state_dict() and pass --arch, or pass --unsafe-pickle if you trust the file"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise DeadNeuronError(
            f"cannot read {path} as a PyTorch file (corrupt or truncated?): {_first_line(error)}"
        ) from error


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise DeadNeuronError(
            "reading .safetensors needs the safetensors package: pip install safetensors"
        ) from error
    try:
        return load_file(path, device="cpu")
    except Exception as error:
        raise DeadNeuronError(f"cannot read {path} as safetensors: {_first_line(error)}") from error


def _state_dict_of(obj: Any, path: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                return inner
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
    raise DeadNeuronError(
        f"{path} holds a {type(obj).__name__}, not a state dict; expected a dict of tensors (model.state_dict()) "
        "or a checkpoint with a 'state_dict' key"
    )


def build_arch(arch: str) -> nn.Module:
    """Instantiate `FILE.py:NAME` or `pkg.module:NAME` (a class or a factory called without arguments)."""
    where, sep, name = arch.rpartition(":")
    if not sep or not where or not name:
        raise DeadNeuronError(
            f"--arch {arch!r} is not FILE.py:NAME or pkg.module:NAME; e.g. --arch models.py:Net"
        )
    if where.endswith(".py") or os.sep in where or "/" in where:
        if not os.path.isfile(where):
            raise DeadNeuronError(
                f"--arch file not found: {where}; expected a Python file that defines {name}"
            )
        module_name = f"_deadneuron_arch_{abs(hash(os.path.abspath(where)))}"
        spec = importlib.util.spec_from_file_location(module_name, where)
        if spec is None or spec.loader is None:
            raise DeadNeuronError(f"--arch {where} cannot be imported as Python; expected a .py file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look classes up here
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as error:  # exit() in the user's file too: never a silent exit 0
            sys.modules.pop(module_name, None)
            raise DeadNeuronError(f"--arch {where} failed to import: {_what_failed(error)}") from error
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise DeadNeuronError(
                f"--arch module {where!r} is not importable ({_first_line(error)}); expected an "
                "installed module or FILE.py:NAME"
            ) from error
        except (Exception, SystemExit) as error:
            raise DeadNeuronError(f"--arch module {where!r} failed to import: {_what_failed(error)}") from error
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        available = sorted(
            k
            for k, v in vars(module).items()
            if not k.startswith("_") and (isinstance(v, type) and issubclass(v, nn.Module))
        )
        raise DeadNeuronError(
            f"--arch {arch}: {where} defines no callable {name!r}; module classes there: "
            f"{', '.join(available) or 'none'}"
        )
    try:
        model = factory()
    except (Exception, SystemExit) as error:  # --arch sys:exit must not end the command with exit 0
        raise DeadNeuronError(
            f"--arch {arch}: calling {name}() failed: {_what_failed(error)}; expected a class or factory that "
            "takes no arguments and returns a torch.nn.Module"
        ) from error
    if not isinstance(model, nn.Module):
        raise DeadNeuronError(
            f"--arch {arch}: {name}() returned a {type(model).__name__}; expected a torch.nn.Module"
        )
    return model


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    state = _strip_prefix(state, expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise DeadNeuronError(
            f"{path} does not match the --arch model: {'; '.join(parts)}; check that --arch names "
            "the architecture these weights were saved from"
        )
    wrong = [
        f"{k} (expected {tuple(expected[k].shape)}, received {tuple(state[k].shape)})"
        for k in expected
        if tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    if wrong:
        raise DeadNeuronError(
            f"{path} does not match the --arch model: shape mismatch at {_few(wrong)}; check the "
            "architecture's sizes"
        )
    model.load_state_dict(dict(state), strict=True)


def _strip_prefix(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, Any]
) -> Mapping[str, torch.Tensor]:
    """Checkpoints from DDP (`module.`) or Lightning (`model.`) prefix every key; drop a prefix that all share."""
    if set(state) == set(expected) or not state:
        return state
    for prefix in ("module.", "model.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix) :]: v for k, v in state.items()}
            if set(stripped) == set(expected):
                return stripped
    return state


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _what_failed(error: BaseException) -> str:
    """'ModuleNotFoundError: No module named 'x'', or 'it called exit(3)' for a SystemExit."""
    if isinstance(error, SystemExit):
        return f"it called exit({error.code!r})"
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
