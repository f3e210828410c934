"""A `.pt2` (torch.export) reader that decides what to load from allowlists, and never calls `torch.export.load`.

`torch.export.load` can run code from a crafted file: the program's `guards_code` strings are `exec`'d by
`ExportedProgram.module()`, a shared library under `data/aotinductor/` is loaded, `opaque_obj_*` constants go to
`pickle.loads`, pickles that fail the safe load are retried with full unpickling, and its zip reader and Python's
disagree on duplicated names. Here:

1. one pass over the zip's central directory refuses duplicate, `..`, absolute and NUL-bearing names, and every
   member outside the torch.export layout (AOTInductor packages, shared objects, TorchScript code, pickled or
   custom-object constants, extra models);
2. every member is read in chunks against a cap fixed before reading (tensor members may not expand beyond what
   their tensors need, JSON members are capped), so a small file cannot grow to gigabytes;
3. the program's JSON is checked before torch sees it: every graph target is a compute operator of an allowed
   namespace, every symbolic-shape expression a plain one; `guards_code` is dropped (never exec'd);
4. tensors are built from the raw bytes, the one pickle (the sample inputs) is read by torch's weights-only
   unpickler, the one that checks it is the one that loads it;
5. torch's deserializer gets these checked pieces, and the graph it builds is checked again: every call is an
   operator whose schema takes tensors, scalars, lists, dtypes and the like (a `str` only where it is a mode or
   a message), placeholders hold tensors or numbers, and no text can reach generated code as a new line.
"""

from __future__ import annotations

import io
import json
import math
import operator
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..archive import ZIP_ERRORS, check_stored_zip, open_zip, read_member, read_member_into
from ..errors import DeadNeuronError

EXPECTED = "a file written by torch.export.save"
JSON_LIMIT = 64 << 20  # model.json of a large transformer is a few MB
CONFIG_LIMIT = 16 << 20
SAMPLE_INPUTS_LIMIT = 256 << 20
# torch.export.save stores members uncompressed; a compressed one (re-zipped, or crafted) may expand only this
# far, so a small file cannot grow to the caps above in memory.
INFLATE_LIMIT = 8 << 20
SMALL_LIMIT = 4096  # archive_format, byteorder, versions
MODEL = "model"  # torch.export.save names its one program "model"

# Members every archive holds, beside the program, its weights, constants and sample inputs.
_FIXED = frozenset(
    {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id", "version"}
)
_PAYLOAD_NAME = re.compile(r"(weight|tensor)_[0-9]+")

# Graph targets that are not aten-style operators: the scalar shape arithmetic torch.export emits.
_SCALAR_OPS = frozenset(
    """add sub mul truediv floordiv mod pow neg pos eq ne lt le gt ge and_ or_ xor not_ lshift rshift getitem
    trunc abs sym_int sym_float sym_max sym_min sym_ite sym_not sym_sqrt _sym_sqrt sym_sum floor ceil""".split()
)
_SCALAR_HOMES = {"_operator": operator, "operator": operator, "math": math, "torch": torch}
_HIGHER_ORDER = frozenset({"cond", "while_loop", "map_impl", "wrap_with_set_grad_enabled"})
_OPERATOR_NAMESPACES = frozenset({"aten", "prims"})
OWN_NAMESPACE = "deadneuron"  # ops our package registers (a swapped .pt2 may call them)
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_OPERATOR_TARGET = re.compile(rf"torch\.ops\.({_NAME})\.({_NAME})(?:\.({_NAME}))?")
_SCALAR_TARGET = re.compile(r"(_operator|operator|math|torch)\.([A-Za-z_][A-Za-z0-9_]*)")

# Schema argument types an allowed operator may take: data, never names of files, storages or objects.
_SAFE_ARG_TYPES = frozenset(
    """Tensor int SymInt float bool number Scalar complex ScalarType Layout Device MemoryFormat Generator
    Dimname NoneType SymBool SymFloat""".split()
)
# `str` arguments that select a mode or carry a message; any other `str` (a file name...) is refused.
_SAFE_STR_ARGS = frozenset(
    """approximate assert_msg rounding_mode equation indexing interpolation mode norm ord p pad_mode padding
    padding_side reduce side UPLO driver""".split()
)
_TYPE_WRAPPER = re.compile(r"^(?:Optional|List)\[(.*)\]$")
# Characters that end a line of Python source: text holding them could leave a comment in generated code.
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00]")


def refuse(where: str, problem: str, fix: str = f"expected {EXPECTED}") -> DeadNeuronError:
    """'WHERE PROBLEM; refused (...); FIX', the one line for a file the allowlists do not admit."""
    what = f"{where} {problem}".strip().rstrip(";:,")
    return DeadNeuronError(f"{what}; refused (loading it could run code or exhaust memory); {fix}")


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


# Names a symbolic-shape expression may call or mention (sympy's printed forms, torch's shape functions).
_SYMPY_NAMES = frozenset(
    """Symbol Integer Rational Float Add Mul Pow Max Min Mod floor ceiling Abs sqrt Eq Ne Lt Le Gt Ge
    StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not Xor Piecewise
    ExprCondPair oo zoo nan true false True False None""".split()
)
_PLAIN_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9.eE+\-/]+")
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")
# Functions that raise to a power: like `**`, their exponent must be small, or parsing could take forever.
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift", "RShift"})
_EXPRESSION_LIMIT = 4096
_EXPONENT_LIMIT = 64


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
    """What makes `text` more than a symbolic-shape expression, or None when it is plain.

    A strict grammar on Python's own parse of the text: numbers, symbol names, the sympy and torch shape
    functions, arithmetic and comparisons; no attribute access, no other names, no strings but plain names.
    Powers take a small literal or a symbol as exponent and do not nest, so parsing cannot blow up
    (`2**2**2**40` would take forever to evaluate)."""
    import ast

    if len(text) > _EXPRESSION_LIMIT:
        return f"{len(text)} characters (more than {_EXPRESSION_LIMIT})"
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "text that does not parse"
    allowed = _SYMPY_NAMES | _shape_function_names()

    def has_power(node: ast.AST) -> bool:
        return any(
            (isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow))
            or (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _POWERS)
            for n in ast.walk(node)
        )

    def power_problem(base: ast.AST, exponent: ast.AST) -> str | None:
        if has_power(base) or has_power(exponent):
            return "a power of a power"
        if isinstance(exponent, ast.UnaryOp) and isinstance(exponent.op, (ast.USub, ast.UAdd)):
            exponent = exponent.operand
        if isinstance(exponent, ast.Name):
            return None
        if isinstance(exponent, ast.Constant) and isinstance(exponent.value, (int, float)):
            return None if abs(exponent.value) <= _EXPONENT_LIMIT else f"the exponent {exponent.value}"
        return "a computed exponent"

    binary = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd, ast.BitOr)
    compare = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
    for node in ast.walk(tree):
        unary = (ast.USub, ast.UAdd, ast.Not, ast.Invert)
        plain = (ast.Expression, ast.Load, ast.keyword, ast.Compare, ast.Tuple)  # tuples: Piecewise's pairs
        if isinstance(node, (*plain, *binary, *compare, *unary)):
            continue
        if isinstance(node, ast.BinOp):
            if not isinstance(node.op, binary):
                return f"the operator {type(node.op).__name__}"
            if isinstance(node.op, ast.Pow) and (problem := power_problem(node.left, node.right)):
                return problem
        elif isinstance(node, ast.UnaryOp):
            continue  # its operator is one of `unary` or refused as a node of its own
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in allowed:
                return f"a call of {ast.unparse(node.func)[:40]!r}"
            for keyword in node.keywords:
                value = keyword.value
                if not (keyword.arg and re.fullmatch(r"[a-z]+", keyword.arg) and isinstance(value, ast.Constant)
                        and isinstance(value.value, bool)):
                    return f"the argument {ast.unparse(keyword)[:40]!r}"
            if node.func.id in _POWERS and len(node.args) == 2 and (problem := power_problem(*node.args)):
                return problem
        elif isinstance(node, ast.Name):
            if node.id not in allowed and not _SYMBOL_NAME.fullmatch(node.id):
                return f"the name {node.id!r}"
        elif isinstance(node, ast.Constant):
            constant = node.value
            if isinstance(constant, str) and not _PLAIN_STRING.fullmatch(constant):
                return f"the string {constant[:40]!r}"
            if isinstance(constant, int) and not isinstance(constant, bool) and abs(constant) > 2**64:
                return f"the number {str(constant)[:20]}..."
            if not isinstance(constant, (str, int, float, type(None))):
                return f"the constant {constant!r:.40}"
        else:
            return f"{type(node).__name__.lower()} syntax"
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


# 1. layout ------------------------------------------------------------------------------------------------------
def _layout_problem(name: str) -> str:
    """Why `name` (inside the archive's folder) is outside the layout torch.export.save writes."""
    if name.startswith("data/aotinductor/") or name.endswith((".so", ".dll", ".dylib", ".pyd")):
        return "is a compiled AOTInductor package or native library, which loads machine code"
    if name.startswith("code/") or name.endswith(("constants.pkl", ".py")):
        return "is TorchScript or Python code"
    base = name.rsplit("/", 1)[-1]
    if base.startswith(("custom_obj", "opaque_obj")):
        return "is a custom Python or TorchBind object, which loads by unpickling code"
    return "is not part of the torch.export layout"


def _members(archive: zipfile.ZipFile, path: str) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """(folder prefix, name inside the folder -> entry); refuses an entry outside one folder or the layout
    (payload members are matched against their configs later)."""
    infos = archive.infolist()
    if not infos:
        raise refuse(f"{path} is an empty zip", "and not a torch.export archive")
    prefix = infos[0].filename.split("/", 1)[0] + "/"
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if info.is_dir():
            continue
        if not info.filename.startswith(prefix):
            raise refuse(f"{path} (member {info.filename})", f"lies outside the archive's folder {prefix}")
        name = info.filename[len(prefix) :]
        members[name] = info
    names = set(members)
    if any(n.startswith("code/") or n.endswith("constants.pkl") for n in names) and "models/model.json" not in names:
        raise DeadNeuronError(
            f"{path} is a TorchScript archive, not a torch.export one; re-save the model with torch.export: "
            "torch.export.save(torch.export.export(model, example_inputs), 'model.pt2'), or save "
            "model.state_dict() and pass --arch"
        )
    for name in sorted(names):
        known = (
            name in _FIXED
            or name == f"models/{MODEL}.json"
            or name == f"data/sample_inputs/{MODEL}.pt"
            or name in (f"data/weights/{MODEL}_weights_config.json", f"data/constants/{MODEL}_constants_config.json")
            or name.startswith("extra/")  # user text; never read
            or (name.startswith(("data/weights/", "data/constants/")) and _PAYLOAD_NAME.fullmatch(name.split("/")[-1]))
        )
        if not known:
            what = f"{path} (member {prefix + name})"
            problem = _layout_problem(name)
            if name in (f"data/weights/{MODEL}.pt", f"data/constants/{MODEL}.pt"):
                problem = "is a pickled weights file of the legacy format" + _pickle_globals_note(
                    archive, members[name]
                )
            raise refuse(what, problem)
    if f"models/{MODEL}.json" not in names:
        found = ", ".join(n for n in sorted(names) if n.startswith("models/")) or "none"
        raise DeadNeuronError(
            f"{path} holds no program models/{MODEL}.json (programs found: {found}); expected {EXPECTED}"
        )
    return prefix, members



def _pickle_globals_note(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    """' (it refers to posix.system)' for a refused pickle whose globals can be named without unpickling it; ''
    otherwise. For the message only: the decision to refuse was already taken."""
    if info.file_size > CONFIG_LIMIT:
        return ""
    try:
        data = archive.read(info)
        found = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)) if data[:2] == b"PK" else []
        if not found:
                        found = sorted(_raw_pickle_globals(data))
    except Exception:
        return ""
    return f" (it refers to {', '.join(found)})" if found else ""


# 2-4. reading the pieces ----------------------------------------------------------------------------------------
def _cap(info: zipfile.ZipInfo, limit: int) -> int:
    """A member's cap: `limit` when stored (its bytes are on disk), at most INFLATE_LIMIT when compressed."""
    return limit if info.compress_type == zipfile.ZIP_STORED else min(limit, INFLATE_LIMIT)


def _json(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path: str) -> Any:
    where = f"{path} (member {info.filename})"
    data = read_member(archive, info, limit=_cap(info, limit), what=path)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        raise DeadNeuronError(f"{where} is not valid JSON (damaged file?); expected {EXPECTED}") from error


def _payloads(
    archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], prefix: str, folder: str, path: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The payload config of `folder` ("weights" or "constants") and the tensors it describes, built from raw
    bytes. Every file the config names must exist and every payload file must be named; nothing is unpickled."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import (
        _dict_to_dataclass,
        deserialize_scalar_type,
        deserialize_size,
        deserialize_storage_offset,
        deserialize_stride,
    )

    config_name = f"data/{folder}/{MODEL}_{folder}_config.json"
    present = {n for n in members if n.startswith(f"data/{folder}/") and n != config_name}
    if config_name not in members:
        if present:
            raise refuse(f"{path}", f"holds data/{folder}/ files without {config_name}")
        return {}, {}
    document = _json(archive, members[config_name], CONFIG_LIMIT, path)
    where = f"{path} (member {prefix}{config_name})"
    try:
        config = _dict_to_dataclass(schema.PayloadConfig, document)
    except Exception as error:
        raise DeadNeuronError(f"{where} is not a payload config: {_first_line(error)}; expected {EXPECTED}") from error
    tensors: dict[str, torch.Tensor] = {}
    needed: dict[str, int] = {}
    for fqn, meta in config.config.items():
        file = meta.path_name
        label = f"{path} (member {prefix}data/{folder}/{file}, for {fqn!r})"
        if not isinstance(file, str) or not _PAYLOAD_NAME.fullmatch(file):
            raise refuse(label, _layout_problem(f"data/{folder}/{file}"))
        if meta.use_pickle:
            info = members.get(f"data/{folder}/{file}")
            note = _pickle_globals_note(archive, info) if info is not None else ""
            raise refuse(label, f"is stored as a pickle{note}, not as plain tensor data",
                         "re-save the file with torch.export.save from plain tensors")
        if meta.tensor_meta is None:
            raise DeadNeuronError(f"{label} has no tensor description; expected {EXPECTED}")
        tm = meta.tensor_meta
        dtype = deserialize_scalar_type(tm.dtype)
        sizes, strides = deserialize_size(tm.sizes), deserialize_stride(tm.strides)
        offset = deserialize_storage_offset(tm.storage_offset)
        if any(s < 0 for s in (*sizes, *strides, offset)):
            raise DeadNeuronError(f"{label} has a negative size, stride or offset; expected {EXPECTED}")
        extent = 0 if 0 in sizes else offset + 1 + sum((n - 1) * s for n, s in zip(sizes, strides, strict=False))
        element = torch.empty((), dtype=dtype).element_size()
        needed[file] = max(needed.get(file, 0), extent * element)
        tensors.setdefault(file, torch.empty(0, dtype=dtype))  # the storage's dtype: the first view's
    missing = [f for f in needed if f"data/{folder}/{f}" not in members]
    if missing:
        raise DeadNeuronError(f"{path}: {folder} config names missing files {', '.join(missing[:5])}; damaged file?")
    unnamed = sorted(present - {f"data/{folder}/{f}" for f in needed})
    if unnamed:
        raise refuse(f"{path} (member {prefix}{unnamed[0]})", f"is not named by {config_name}")
    for file, view in tensors.items():
        info = members[f"data/{folder}/{file}"]
        where = f"{path} (member {info.filename})"
        # A stored member holds no more than its bytes on disk; a compressed one may expand only to what its
        # tensors need. Either way memory stays within the file's size or the model's own size.
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > needed[file]:
            raise refuse(where, f"expands to {info.file_size:,} bytes, more than the {needed[file]:,} its tensors need")
        if info.file_size < needed[file]:
            raise DeadNeuronError(
                f"{where} holds {info.file_size:,} bytes, its tensors need {needed[file]:,}; damaged file?"
            )
        element = view.element_size()
        if info.file_size % element:
            raise DeadNeuronError(f"{where}: {info.file_size} bytes is not a whole number of {view.dtype} elements")
        storage = torch.empty(info.file_size // element, dtype=view.dtype)
        if storage.numel():
            read_member_into(archive, info, storage.view(torch.uint8).numpy().data, what=path)
        tensors[file] = storage
    out: dict[str, torch.Tensor] = {}
    for fqn, meta in config.config.items():
        tm = meta.tensor_meta
        view = torch.as_strided(
            tensors[meta.path_name], deserialize_size(tm.sizes), deserialize_stride(tm.strides),
            deserialize_storage_offset(tm.storage_offset),
        )
        out[fqn] = torch.nn.Parameter(view, requires_grad=tm.requires_grad) if meta.is_param else view
    return document, out


def _sample_inputs(archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], path: str) -> Any:
    """The example inputs, unpickled by torch's weights-only unpickler: the allowlist that loads them is the
    one that checks them. None when the archive has none."""
    import io
    import pickle

    info = members.get(f"data/sample_inputs/{MODEL}.pt")
    if info is None:
        return None
    data = read_member(archive, info, limit=_cap(info, SAMPLE_INPUTS_LIMIT), what=path)
    where = f"{path} (member {info.filename})"
    if not data:
        return None
    check_stored_zip(data, what=where, expected="a torch.save file of tensors")
    try:
        inputs = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise refuse(where, f"holds a pickle that is not plain tensor data{_pickle_globals_note(archive, info)}",
                     "re-save the file with torch.export.save") from error
    except Exception as error:
        raise DeadNeuronError(f"cannot read {where}: {_first_line(error)}; expected {EXPECTED}") from error
    if not (isinstance(inputs, tuple) and len(inputs) == 2):
        raise DeadNeuronError(f"{where} holds a {type(inputs).__name__}, not (args, kwargs); expected {EXPECTED}")
    return inputs


# 3. the program's JSON -----------------------------------------------------------------------------------------
def _walk_nodes(value: Any) -> Any:
    """Every serialized graph node (a dict with `target`, `inputs`, `outputs`) anywhere in `value`."""
    if isinstance(value, dict):
        if "target" in value and "inputs" in value and "outputs" in value:
            yield value
        for item in value.values():
            yield from _walk_nodes(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk_nodes(item)


def own_operator(name: str) -> bool:
    """True when `deadneuron::name` is an operator our package registered in this process."""
    import importlib

    for module in ("deadneuron.torch.sinerelu", "deadneuron.torch.kernels"):
        try:
            importlib.import_module(module)  # registering our ops, if this version has any
        except ImportError:
            pass
    return bool(torch._C._jit_get_schemas_for_operator(f"{OWN_NAMESPACE}::{name}"))


def target_problem(target: str) -> str | None:
    """Why a serialized graph target is not an allowed operator, or None when it is."""
    if not isinstance(target, str):
        return "a target that is not a name"
    match = _OPERATOR_TARGET.fullmatch(target)
    if match:
        namespace, name, overload = match.groups()
        if namespace == "higher_order" and name in _HIGHER_ORDER and overload is None:
            return None
        if namespace not in _OPERATOR_NAMESPACES and not (namespace == OWN_NAMESPACE and own_operator(name)):
            allowed = ", ".join(sorted(_OPERATOR_NAMESPACES | {OWN_NAMESPACE}))
            return f"the operator {target}, outside the allowed namespaces ({allowed})"
        try:
            op = getattr(getattr(getattr(torch.ops, namespace), name), overload or "default")
        except (AttributeError, RuntimeError):
            return f"the operator {target}, which this torch does not define"
        problem = schema_problem(op)
        return f"the operator {target} ({problem})" if problem else None
    match = _SCALAR_TARGET.fullmatch(target)
    if match and match.group(2) in _SCALAR_OPS:
        return None
    return f"{target}, which is not a PyTorch compute operator"


def check_program_json(document: Any, path: str) -> None:
    """Refuse a program whose graph calls anything but allowed operators, or whose shape expressions are more
    than plain symbolic arithmetic; drop `guards_code` (Python source that torch would exec)."""
    if not isinstance(document, dict) or not isinstance(document.get("graph_module"), dict):
        raise DeadNeuronError(f"{path}: models/{MODEL}.json is not a serialized program; expected {EXPECTED}")
    document["guards_code"] = []  # never exec'd: module() regenerates the input checks from the signature
    for node in _walk_nodes(document["graph_module"]):
        problem = target_problem(node["target"])
        if problem:
            raise refuse(f"{path} calls {problem}", "in its graph", "expected a program of PyTorch operators")
    custom = document["graph_module"].get("graph", {}).get("custom_obj_values")
    if custom:
        raise refuse(f"{path} uses custom (TorchBind) objects", "", "export a model without custom objects")
    for expression in _expressions(document):
        problem = _unsafe_expression(expression)
        if problem:
            raise DeadNeuronError(
                f"{path}: the shape expression {expression[:80]!r} holds {problem}, which is not a plain symbolic "
                f"expression; refused (torch's loader would evaluate it as Python code); expected {EXPECTED}"
            )


# 5. the graph torch built ----------------------------------------------------------------------------------------
def _base_types(text: str) -> list[str]:
    """'Optional[List[Tensor]]' -> ['Tensor']; 'Tuple[int, int]' -> ['int', 'int']."""
    while (match := _TYPE_WRAPPER.match(text)) is not None:
        text = match.group(1)
    if text.startswith("Tuple[") and text.endswith("]"):
        return [t for part in text[6:-1].split(",") for t in _base_types(part.strip())]
    return [text]


def schema_problem(op: Any) -> str | None:
    """Why the schema of OpOverload `op` takes something other than data, or None."""
    for argument in op._schema.arguments:
        for base in _base_types(str(argument.type)):
            if base == "str" and argument.name in _SAFE_STR_ARGS:
                continue
            if base not in _SAFE_ARG_TYPES:
                return f"its argument {argument.name!r} is a {argument.type}"
    return None


def check_graph(program: Any, path: str) -> None:
    """Every node of every graph is a placeholder, an output, a subgraph reference or a call of an allowed
    operator; placeholders hold tensors or numbers; metadata text cannot break a line of generated code."""
    import torch.fx

    for graph_module in program.graph_module.modules():
        graph = getattr(graph_module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            trace = node.meta.get("stack_trace")
            if isinstance(trace, str):  # kept for site names; every line break becomes a plain newline
                node.meta["stack_trace"] = _LINE_BREAKS.sub("\n", trace)
            if node.op in ("placeholder", "output"):
                value = node.meta.get("val")
                if node.op == "placeholder" and isinstance(value, str):
                    raise refuse(f"{path}: the input {node.name!r} is a string constant", "in its graph")
                continue
            subgraph = getattr(graph_module, str(node.target), None) if node.op == "get_attr" else None
            if isinstance(subgraph, torch.fx.GraphModule):
                continue
            if node.op != "call_function":
                raise refuse(f"{path}: the graph node {node.name!r} is a {node.op}", "",
                             "expected a program of PyTorch operators")
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                namespace = target.namespace
                allowed = namespace in _OPERATOR_NAMESPACES or (
                    namespace == OWN_NAMESPACE and own_operator(target._schema.name.split("::")[-1])
                )
                problem = None if allowed else "its namespace is not allowed"
                problem = problem or schema_problem(target)
                if problem:
                    raise refuse(f"{path} calls {target} in its graph:", problem,
                                 "expected a program of PyTorch compute operators")
                continue
            if isinstance(target, torch._ops.HigherOrderOperator) and target.name() in _HIGHER_ORDER:
                continue
            name = getattr(target, "__name__", "")
            home = next((m for m in _SCALAR_HOMES.values() if getattr(m, name, None) is target), None)
            if home is not None and name in _SCALAR_OPS:
                continue
            raise refuse(
                f"{path} calls {getattr(target, '__module__', '?')}.{name or target!r} in its graph, which is not "
                "a PyTorch operator;", "", "expected a program of PyTorch compute operators"
            )


def _check_inputs_spec(program: Any, path: str) -> None:
    """The inputs' tree holds tuples, lists and dicts keyed by plain names: its paths become generated code."""
    from torch.utils import _pytree as pytree

    spec = program.call_spec.in_spec
    if spec is None:
        return
    stack = [spec]
    while stack:
        node = stack.pop()
        if node.type not in (tuple, list, dict, type(None)) and not node.is_leaf():
            raise refuse(f"{path}: its inputs are a {getattr(node.type, '__name__', node.type)}", "",
                         "expected tensors in tuples, lists or dicts")
        if node.type is dict:
            for key in node.context:
                if not (isinstance(key, int) or (isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_.\-]*", key))):
                    raise refuse(f"{path}: an input is keyed by {str(key)[:40]!r}", "")
        stack.extend(node.children())
    del pytree


# the whole ------------------------------------------------------------------------------------------------------
def load(path: str) -> Any:
    """The ExportedProgram in `path`, read by the allowlists above; DeadNeuronError for anything else."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    with open_zip(path, what=path, kind="a torch.export archive", expected=EXPECTED) as archive:
        try:
            prefix, members = _members(archive, path)
            if "archive_format" in members:
                fmt = read_member(archive, members["archive_format"], limit=SMALL_LIMIT, what=path)
                if fmt.strip() != b"pt2":
                    raise DeadNeuronError(f"{path} says its format is {fmt[:20]!r}, not pt2; expected {EXPECTED}")
            document = _json(archive, members[f"models/{MODEL}.json"], JSON_LIMIT, path)
            check_program_json(document, path)
            _, state_dict = _payloads(archive, members, prefix, "weights", path)
            _, constants = _payloads(archive, members, prefix, "constants", path)
            example_inputs = _sample_inputs(archive, members, path)
        except RecursionError as error:
            raise refuse(f"{path} holds JSON nested too deeply", "to read") from error
        except (KeyError, TypeError, AttributeError, IndexError, OverflowError) as error:  # malformed configs
            raise DeadNeuronError(
                f"cannot read {path} as a torch.export archive (damaged or hand-edited?): {type(error).__name__}: "
                f"{_first_line(error)}; expected {EXPECTED}"
            ) from error
        except ZIP_ERRORS as error:
            raise DeadNeuronError(
                f"cannot read {path} as a torch.export archive (corrupt or truncated?): {_first_line(error)}; "
                f"expected {EXPECTED}"
            ) from error
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, document)
        with _weights_only_loads(), _quiet_torch_export():
            program = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, example_inputs)
    except DeadNeuronError:
        raise
    except Exception as error:
        raise DeadNeuronError(
            f"cannot load {path} as a torch.export program: {type(error).__name__}: {_first_line(error)}; "
            f"expected {EXPECTED} with this torch version ({torch.__version__})"
        ) from error
    program._guards_code = []
    check_graph(program, path)
    _check_inputs_spec(program, path)
    return program


class _quiet_torch_export:
    """torch.export's loggers at ERROR while deserializing: their warnings would break our one-line errors."""

    def __enter__(self) -> None:
        import logging

        names = ("torch.export", "torch._export", "torch._export.serde.serialize")
        self.loggers = [logging.getLogger(n) for n in names]
        self.levels = [logger.level for logger in self.loggers]
        for logger in self.loggers:
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for logger, level in zip(self.loggers, self.levels, strict=True):
            logger.setLevel(level)


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
