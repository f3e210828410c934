"""Loading PyTorch model files without running code from them (design.md, "Model files").

- `.pt2` (torch.export): every pickle inside the archive is checked for globals outside torch's weights-only
  allow-list before loading, and the load itself runs with `torch.load` forced to `weights_only=True`, so the
  unpickling fallback of `torch.export.load` can never run a file's code. Archives with custom (TorchBind) objects
  are refused.
- state dicts (`.pt`, `.pth`, `.bin`, `.ckpt` with a `state_dict` key, `.safetensors`) need `arch`: `FILE.py:NAME`
  or `pkg.module:NAME`, a class or a factory called without arguments.
- TorchScript archives are refused with a pointer to torch.export; a fully pickled module loads only with
  `unsafe_pickle=True`.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import logging
import os
import pickle
import re
import sys
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import DeadNeuronError

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
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:  # ValueError: undecodable names
        raise DeadNeuronError(
            f"{path} is not a torch.export archive (not a zip file: damaged, truncated or another format); "
            "expected a file written by torch.export.save; copy or save it again"
        ) from error
    with archive:
        try:
            names = archive.namelist()
            if any("/code/" in n or n.endswith("constants.pkl") for n in names) and not any(
                n.endswith("models/model.json") or n.endswith("serialized_exported_program.json") for n in names
            ):
                raise DeadNeuronError(
                    f"{path} is a TorchScript archive, not a torch.export one; {_TORCHSCRIPT_HINT}"
                )
            for name in names:
                _check_member(archive, name, path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, KeyError, zlib.error) as error:
            raise DeadNeuronError(
                f"cannot read {path} as a torch.export archive (corrupt or truncated?): {_first_line(error)}; "
                "expected a file written by torch.export.save"
            ) from error
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its fallback warnings would break our one-line errors
    try:
        with _weights_only_loads():
            program = torch.export.load(path)
    except DeadNeuronError:
        raise
    except pickle.UnpicklingError as error:
        raise DeadNeuronError(
            f"{path} holds a pickle that is not plain tensors; refused (loading it could run "
            f"code): {_first_line(error)}"
        ) from error
    except Exception as error:
        raise DeadNeuronError(
            f"cannot load {path} as a torch.export program: {_first_line(error)}; expected a "
            "file written by torch.export.save with this torch version"
        ) from error
    finally:
        logger.setLevel(level)
    _check_targets(program, path)
    return program


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """During torch.export.load only: every torch.load is weights-only, whatever the caller asked for, and
    `sympy.sympify` reads only plain symbolic-shape expressions.

    torch.export.load retries a failed safe load with full unpickling, and it parses the shape expressions of
    the program's JSON with `sympy.sympify`, which evaluates Python; this closes both doors (the archive's
    expressions were already checked by `_check_member`; this also covers any path that check did not foresee).
    """
    import sympy

    original = torch.load
    original_sympify = sympy.sympify

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    def plain_sympify(a: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(a, str):
            problem = _unsafe_expression(a)
            if problem:
                raise DeadNeuronError(
                    f"a shape expression {a[:80]!r} holds {problem}, which is not a plain expression; refused "
                    "(parsing it would run Python code)"
                )
        return original_sympify(a, *args, **kwargs)

    torch.load = weights_only_load  # type: ignore[assignment]
    sympy.sympify = plain_sympify
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]
        sympy.sympify = original_sympify


# What a .pt2 may hold. Constants of these kinds load with `pickle.loads` / the TorchBind unpickler: refused.
_CODE_CONSTANTS = ("custom_obj", "opaque_obj")
# Names a symbolic-shape expression may call or mention (sympy's printed forms, torch's shape functions).
_SYMPY_NAMES = frozenset(
    """Symbol Integer Rational Float Add Mul Pow Max Min Mod floor ceiling Abs sqrt Eq Ne Lt Le Gt Ge
    StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not Xor Piecewise
    ExprCondPair oo zoo nan true false True False None""".split()
)
_SAFE_OPERATORS = frozenset("+ - * / // % ** ( ) , = == != < > <= >= & | ~ ^".split())
_PLAIN_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9.eE+\-/]+")
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")


def _shape_function_names() -> frozenset[str]:
    import sympy
    import torch.utils._sympy.functions as shape_functions  # the functions torch's own deserializer allows

    return frozenset(
        name
        for name in dir(shape_functions)
        if not name.startswith("_")
        and isinstance(getattr(shape_functions, name), type)
        and issubclass(getattr(shape_functions, name), sympy.Basic)
    )


def _unsafe_expression(text: str) -> str | None:
    """What makes `text` more than a symbolic-shape expression (an unknown name, attribute access, a
    string that is not a name or number), or None when it is plain."""
    import tokenize

    allowed = _SYMPY_NAMES | _shape_function_names()
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.string.strip()]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return "text that does not parse"
    for i, token in enumerate(tokens):
        if token.type == tokenize.NAME:
            keyword = i + 1 < len(tokens) and tokens[i + 1].string == "="
            if token.string in allowed or _SYMBOL_NAME.fullmatch(token.string):
                continue
            if keyword and re.fullmatch(r"[a-z]+", token.string):  # assumptions: positive=True, integer=True
                continue
            return f"the name {token.string!r}"
        if token.type == tokenize.NUMBER:
            continue
        if token.type == tokenize.STRING:
            body = token.string[1:-1] if token.string[:1] in "'\"" and token.string[-1:] == token.string[:1] else ""
            if _PLAIN_STRING.fullmatch(body):
                continue
            return f"the string {token.string[:40]}"
        if token.type == tokenize.OP and token.string in _SAFE_OPERATORS:
            continue
        if token.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            continue
        return f"{token.string[:20]!r}"
    return None


def _expressions(value: Any) -> Iterator[str]:
    """Every string of a program's JSON that torch.export.load hands to sympy: `expr_str` values and the
    keys of `range_constraints`."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "expr_str" and isinstance(item, str):
                yield item
            elif key == "range_constraints" and isinstance(item, dict):
                yield from (k for k in item if isinstance(k, str))
                yield from _expressions(item)
            else:
                yield from _expressions(item)
    elif isinstance(value, list):
        for item in value:
            yield from _expressions(item)


def _check_member(archive: zipfile.ZipFile, name: str, path: str) -> None:
    """Refuse an archive member that would run code when torch.export.load reads it."""
    where = f"{path} (member {name})"
    base = name.rsplit("/", 1)[-1]
    if "/constants/" in name and base.startswith(_CODE_CONSTANTS):
        raise DeadNeuronError(
            f"{where} is a custom Python or TorchBind object, which loads by unpickling code; refused: expected "
            "plain tensors; export a model without custom objects"
        )
    data = archive.read(name)
    if name.endswith(".json"):
        _check_json(data, where)
        return
    if data[:2] == b"PK":
        _refuse_unsafe_globals(io.BytesIO(data), where)
        return
    unsafe = _raw_pickle_globals(data)
    if unsafe:
        raise DeadNeuronError(
            f"{where} is a pickle that refers to {', '.join(sorted(unsafe))}, which is not plain tensor data; "
            "refused (unpickling it could run code); re-save the file with torch.export.save"
        )


def _check_json(data: bytes, where: str) -> None:
    try:
        document = json.loads(data)
    except ValueError:
        return  # not ours to judge: torch.export.load reports a damaged program
    if isinstance(document, dict) and isinstance(document.get("config"), dict):  # a payload config
        for fqn, meta in document["config"].items():
            target = meta.get("path_name", "") if isinstance(meta, dict) else ""
            if isinstance(target, str) and target.startswith(_CODE_CONSTANTS):
                raise DeadNeuronError(
                    f"{where}: constant {fqn!r} is a custom Python or TorchBind object ({target}), which loads by "
                    "unpickling code; refused: expected plain tensors; export a model without custom objects"
                )
    for expression in _expressions(document):
        problem = _unsafe_expression(expression)
        if problem:
            raise DeadNeuronError(
                f"{where}: the shape expression {expression[:80]!r} holds {problem}, which is not a plain "
                "symbolic expression; refused (torch.export.load would evaluate it as Python code)"
            )


def _raw_pickle_globals(data: bytes) -> set[str]:
    """The globals a plain (non-zip) pickle would import, read from its opcodes without unpickling it; empty
    when `data` is not a pickle or imports nothing."""
    import pickletools

    found: set[str] = set()
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                found.add(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL":
                found.add(".".join(strings[-2:]) if len(strings) >= 2 else "(a computed global)")
            elif opcode.name.startswith("EXT"):
                found.add("(an extension-registry global)")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a whole pickle (raw tensor bytes): nothing that unpickles
        return set()
    return found


_SAFE_SCALAR_OPS = frozenset(
    """add sub mul truediv floordiv mod pow neg pos eq ne lt le gt ge and_ or_ lshift rshift getitem trunc
    sym_int sym_float sym_max sym_min sym_ite sym_not sym_sqrt _sym_sqrt floor ceil""".split()
)


def _check_targets(program: Any, path: str) -> None:
    """Every call in the loaded graphs is an operator or a scalar shape op: nothing else can run on a scan."""
    import math
    import operator

    for graph_module in program.graph_module.modules():
        graph = getattr(graph_module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
                continue
            name = getattr(target, "__name__", "")
            home = next(
                (m for m in (operator, math, torch) if getattr(m, name, None) is target), None
            )
            if home is not None and name in _SAFE_SCALAR_OPS:
                continue
            raise DeadNeuronError(
                f"{path} calls {getattr(target, '__module__', '?')}.{name or target!r} in its graph, which is not "
                "a PyTorch operator; refused (running it could do anything); expected a program from "
                "torch.export.save"
            )


def _refuse_unsafe_globals(source: Any, where: str) -> None:
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # not a torch.save zip: torch.load(weights_only=True) will judge it
        return
    if unsafe:
        raise DeadNeuronError(
            f"{where} refers to {', '.join(sorted(unsafe))}, which is not plain tensor data; refused (unpickling "
            "it could run code); re-save the file from trusted code with torch.export.save or a state dict"
        )


# state dicts ----------------------------------------------------------------------------------------------------
def _is_torchscript(path: str) -> bool:
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False  # damaged: torch.load says so
    return any(n.endswith("constants.pkl") for n in names) or any("/code/" in n for n in names)


def _torch_load(path: str, *, unsafe_pickle: bool) -> Any:
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
        except Exception as error:
            sys.modules.pop(module_name, None)
            raise DeadNeuronError(
                f"--arch {where} failed to import: {type(error).__name__}: {_first_line(error)}"
            ) from error
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise DeadNeuronError(
                f"--arch module {where!r} is not importable ({_first_line(error)}); expected an "
                "installed module or FILE.py:NAME"
            ) from error
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
    except Exception as error:
        raise DeadNeuronError(
            f"--arch {arch}: calling {name}() failed: {type(error).__name__}: "
            f"{_first_line(error)}; expected a class or factory that takes no arguments"
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


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
