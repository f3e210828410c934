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
3. the program's JSON is checked before torch sees it: every graph target, and every operator passed as an
   argument, is a compute operator of an allowed namespace, every symbolic-shape expression a plain one (symbols
   of small index), every name torch's code generator writes into Python a plain name; `guards_code` is dropped
   (never exec'd);
4. tensors are built from the raw bytes, the one pickle (the sample inputs) is read by torch's weights-only
   unpickler, the one that checks it is the one that loads it, and its tree is counted (shared objects too);
5. torch's deserializer gets these checked pieces, and the graph it builds is checked again: every call is an
   operator whose schema takes tensors, scalars, lists, dtypes and the like (a `str` only where it is a mode or
   a message), placeholders hold tensors or numbers, and no text can reach generated code as a new line.

Steps 3 and 5, what the program itself may hold, live in `pt2_program.py`; the trees of the program's inputs and
outputs, whose text torch's parser would resolve into Python types (importing modules a crafted context names), are
checked in `pt2_specs.py` (a transformers ModelOutput is admitted by a strict rule). What torch's deserializer logs
is kept, not printed, and put into the one-line error when it fails. This module reads the archive.
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
import zipfile
from typing import Any

import torch

from ..archive import ZIP_ERRORS, check_stored_zip, open_zip, read_member, read_member_into
from ..errors import DeadNeuronError
from .pt2_program import (
    EXPECTED,
    MODEL,
    PATH_PART,
    check_graph,
    check_inputs_spec,
    check_program_json,
    refuse,
    weights_only_loads,
)
from .pt2_specs import check_specs

JSON_LIMIT = 64 << 20  # model.json of a large transformer is a few MB
CONFIG_LIMIT = 16 << 20
SAMPLE_INPUTS_LIMIT = 256 << 20
SAMPLE_INPUTS_NODES = 100_000  # values in the example inputs' tree (a model takes a few tensors)
# torch.export.save stores members uncompressed; a compressed one (re-zipped, or crafted) may expand only this
# far, so a small file cannot grow to the caps above in memory.
INFLATE_LIMIT = 8 << 20
SMALL_LIMIT = 4096  # archive_format, byteorder, versions

# Members every archive holds, beside the program, its weights, constants and sample inputs.
_FIXED = frozenset(
    {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id", "version"}
)
_PAYLOAD_NAME = re.compile(r"(weight|tensor)_[0-9]+")
# A parameter, buffer or constant name: torch writes its parts into generated Python between quotes
_FQN = re.compile(rf"{PATH_PART}(?:\.{PATH_PART})*")
# What torch warns when the Python it generates from a graph does not compile (a crafted argument's text)
_UNCOMPILED = "Unable to execute the generated python source code"


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
        if not (isinstance(fqn, str) and _FQN.fullmatch(fqn)):
            raise refuse(f"{where} names the tensor {str(fqn)[:60]!r}", "(not a module path)")
        file = meta.path_name
        label = f"{path} (member {prefix}data/{folder}/{file}, for {fqn!r})"
        if not isinstance(file, str) or not _PAYLOAD_NAME.fullmatch(file):
            raise refuse(label, _layout_problem(f"data/{folder}/{file}"))
        if meta.use_pickle:
            info = members.get(f"data/{folder}/{file}")
            note = _pickle_globals_note(archive, info) if info is not None else ""
            raise refuse(
                label,
                f"is stored as a pickle{note}, not as plain tensor data",
                "re-save the file with torch.export.save from plain tensors",
            )
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
            tensors[meta.path_name],
            deserialize_size(tm.sizes),
            deserialize_stride(tm.strides),
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
        raise refuse(
            where,
            f"holds a pickle that is not plain tensor data{_pickle_globals_note(archive, info)}",
            "re-save the file with torch.export.save",
        ) from error
    except Exception as error:
        raise DeadNeuronError(f"cannot read {where}: {_first_line(error)}; expected {EXPECTED}") from error
    if not (isinstance(inputs, tuple) and len(inputs) == 2):
        raise DeadNeuronError(f"{where} holds a {type(inputs).__name__}, not (args, kwargs); expected {EXPECTED}")
    # A pickle can share one object many times: 64 nested pairs of the same pair are 2 kB on disk and 2**64
    # leaves to anything that walks them (torch's deserializer and the scan do). Count every visit, up to a cap.
    visits, stack = 0, [inputs]
    while stack:
        item = stack.pop()
        visits += 1
        if visits > SAMPLE_INPUTS_NODES:
            raise refuse(where, f"holds more than {SAMPLE_INPUTS_NODES:,} values (a pickle that repeats one "
                         "object)", "re-save the file with torch.export.save")
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return inputs


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
            check_specs(document, path)
            _, state_dict = _payloads(archive, members, prefix, "weights", path)
            _, constants = _payloads(archive, members, prefix, "constants", path)
            example_inputs = _sample_inputs(archive, members, path)
        except RecursionError as error:
            raise refuse(f"{path} holds JSON nested too deeply", "to read") from error
        except (KeyError, TypeError, AttributeError, IndexError, OverflowError, ValueError, AssertionError) as error:
            raise DeadNeuronError(
                f"cannot read {path} as a torch.export archive (damaged or hand-edited?): {type(error).__name__}: "
                f"{_first_line(error)}; expected {EXPECTED}"
            ) from error
        except ZIP_ERRORS as error:
            raise DeadNeuronError(
                f"cannot read {path} as a torch.export archive (corrupt or truncated?): {_first_line(error)}; "
                f"expected {EXPECTED}"
            ) from error
    heard = _TorchExportLog()
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, document)
        with weights_only_loads(), heard, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # torch's warnings are kept, not printed: a user error stays one line
            try:
                program = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, example_inputs)
            finally:
                heard.records += [_first_line(Exception(str(w.message))) for w in caught]
        if any(_UNCOMPILED in record for record in heard.records):
            raise refuse(f"{path}: its graph does not compile to Python", "", f"expected {EXPECTED}")
    except DeadNeuronError:
        raise
    except Exception as error:
        said = f"; torch.export logged: {heard.first()}" if heard.first() else ""
        failure = DeadNeuronError(
            f"cannot load {path} as a torch.export program: {type(error).__name__}: {_first_line(error)}{said}; "
            f"expected {EXPECTED} with this torch version ({torch.__version__})"
        )
        if heard.records:  # all of them, in the chain of causes that --debug prints
            logged = RuntimeError("torch.export logged:\n" + "\n".join(heard.records))
            logged.__cause__ = error
            raise failure from logged
        raise failure from error
    program._guards_code = []
    check_graph(program, path)
    check_inputs_spec(program, path)
    return program


class _TorchExportLog(logging.Handler):
    """While deserializing: torch.export's log records are kept here instead of printed, so a user error stays
    one line, and the first of them goes into that line (all of them into its chain of causes, which --debug
    prints with the traceback)."""

    NAMES = ("torch.export", "torch._export")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append(_first_line(Exception(record.getMessage())))
        except Exception:  # a record whose arguments do not format: keep what it was about
            self.records.append(str(record.msg)[:160])

    def first(self) -> str:
        return self.records[0] if self.records else ""

    def __enter__(self) -> _TorchExportLog:
        # torch's logging setup gives some of these loggers their own stderr handler and stops propagation:
        # each one, and the two roots, writes here instead while deserializing
        names = {*self.NAMES, *(n for n in logging.Logger.manager.loggerDict if n.startswith(self.NAMES))}
        self.saved = []
        for name in sorted(names):
            logger = logging.getLogger(name)
            if name in self.NAMES or logger.handlers or not logger.propagate:
                self.saved.append((logger, logger.handlers[:], logger.propagate))
                logger.handlers = [self]
                logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        for logger, handlers, propagate in self.saved:
            logger.handlers = handlers
            logger.propagate = propagate


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
