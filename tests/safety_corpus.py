"""Crafted model and data files that try to run code, write files or exhaust memory, built from scratch.

Every payload is harmless: it creates (or overwrites) a marker file in the corpus folder, and the tests assert
that no marker appears and no file changes. `build(folder)` returns the cases; `python -m tests.safety_corpus
FOLDER` builds them and runs each through the CLI in a fresh process, printing a Markdown table (exit code,
stderr lines, payload ran, peak memory of the process); run it on two checkouts (PYTHONPATH) to compare.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "pwned"
VICTIM = "victim.txt"  # an existing file a payload tries to overwrite
VICTIM_TEXT = b"untouched\n"
BOMB_BYTES = 1 << 30  # what a bomb expands to: 1 GiB from about 1 MB on disk


@dataclass
class Case:
    label: str  # the attack, in a few words
    path: Path
    args: list[str]  # after the model path
    expect: int = 2  # 2: refused; 0: loads cleanly and the payload does not run
    message: str = ""  # regex on the one stderr line
    bomb: bool = False  # compare peak memory with the normal scan in `baseline`
    baseline: list[str] = field(default_factory=list)  # argv of the normal scan of the same model
    # the corpus folder is on sys.path, as the current folder is for `python -m deadneuron` run there: a payload
    # module lying next to the file could be imported
    importable: bool = False


class Payload:
    """Unpickling this runs a shell command that creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def touch_code(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


# zip surgery -----------------------------------------------------------------------------------------------------
Edit = Callable[[str, bytes], "bytes | list[bytes] | None"]


def rewrite(src: Path, dst: Path, edit: Edit | None = None, add: list[tuple[str, Any]] | None = None) -> Path:
    """Copy the zip `src` to `dst`, `edit(name, data)` per member (names relative to a .pt2's folder; None
    drops the member, a list writes each copy under the same name), then `add` members: (name, bytes) or
    (name, ("bomb", fill byte, prefix))."""
    with zipfile.ZipFile(src) as source, zipfile.ZipFile(dst, "w") as target, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point of some cases
        first = source.namelist()[0]
        prefix = first.split("/")[0] + "/" if "/" in first else ""
        for info in source.infolist():
            data = source.read(info)
            name = info.filename[len(prefix) :]
            data = edit(name, data) if edit else data
            for copy in data if isinstance(data, list) else [] if data is None else [data]:
                target.writestr(info, copy)  # a list: the same name several times
        for name, data in add or []:
            if isinstance(data, tuple):
                write_bomb(target, prefix + name, *data[1:])
            else:
                target.writestr(zipfile.ZipInfo(prefix + name), data)
    return dst


def write_bomb(archive: zipfile.ZipFile, name: str, fill: bytes = b"\0", head: bytes = b"") -> None:
    """A deflated member of BOMB_BYTES (`head`, then `fill` repeated), written in chunks: ~1 MB on disk."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    chunk = fill * (1 << 20)
    with archive.open(info, "w", force_zip64=True) as member:
        member.write(head)
        left = BOMB_BYTES - len(head)
        while left > 0:
            member.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)


def edit_program(edit: Callable[[dict[str, Any]], None]) -> Edit:
    def apply(name: str, data: bytes) -> bytes:
        if name != "models/model.json":
            return data
        document = json.loads(data)
        edit(document)
        return json.dumps(document).encode()

    return apply


def first_node(document: dict[str, Any], target: str) -> dict[str, Any]:
    return next(n for n in document["graph_module"]["graph"]["nodes"] if n["target"] == target)


# .pt2 ------------------------------------------------------------------------------------------------------------
def good_pt2(folder: Path) -> Path:
    import torch

    from tests import torch_zoo as zoo

    path = folder / "good.pt2"
    if not path.exists():
        program = torch.export.export(
            zoo.mlp().eval(), (torch.randn(4, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
        )
        torch.export.save(program, path)
    return path


def native_library(folder: Path, marker: Path) -> bytes:
    """A shared library whose constructor creates the marker (needs a C compiler; else ELF-looking bytes)."""
    source = folder / "evil.c"
    source.write_text(
        '#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
        f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
    )
    library = folder / "evil.so"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler and subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)]).returncode == 0:
        return library.read_bytes()
    return b"\x7fELF" + b"\0" * 60


def i0x10_pickle(marker: Path) -> bytes:
    """A pickle that pickletools cannot read (INT '0x10') but the C unpickler runs: it calls os.system."""
    command = f"touch {marker}".encode()
    return b"I0x10\n0c" + os.name.encode() + b"\nsystem\n(V" + command + b"\ntR."


def pt2_cases(folder: Path, bombs: bool) -> list[Case]:
    import torch

    good = good_pt2(folder)
    marker, victim = folder / MARKER, folder / VICTIM
    scan = ["scan", "--samples", "4"]
    cases: list[Case] = []

    def case(label: str, edit: Edit | None = None, add: list[tuple[str, Any]] | None = None, **kw: Any) -> None:
        path = rewrite(good, folder / (label.replace(" ", "_").replace("/", "_") + ".pt2"), edit, add)
        cases.append(Case(label, path, kw.pop("args", scan), **kw))

    def guards(code: str) -> Callable[[dict[str, Any]], None]:
        return lambda document: document.update(guards_code=[code])

    case("guards_code expression", edit_program(guards(f"{touch_code(marker)} is None")), expect=0)
    case(
        "guards_code break-out",
        # closes torch's generated guard function: the payload would run at load time, in ExportedProgram.module()
        edit_program(guards(f"True #\n)\n{touch_code(marker)}\ndef _y(*args):\n  (True")),
        expect=0,
    )

    def from_file(path: Path, shared: bool) -> Callable[[dict[str, Any]], None]:
        def edit(document: dict[str, Any]) -> None:
            node = first_node(document, "torch.ops.aten.relu.default")
            node["target"] = "torch.ops.aten.from_file.default"
            node["inputs"] = [
                {"name": "filename", "arg": {"as_string": str(path)}, "kind": 1},
                {"name": "shared", "arg": {"as_bool": shared}, "kind": 1},
                {"name": "size", "arg": {"as_int": 64}, "kind": 1},
            ]

        return edit

    case("aten.from_file creates a file", edit_program(from_file(marker, True)), message="from_file")
    case("aten.from_file overwrites a file", edit_program(from_file(victim, True)), message="from_file")

    def target(name: str) -> Callable[[dict[str, Any]], None]:
        return lambda document: first_node(document, "torch.ops.aten.relu.default").update(target=name)

    case("non-operator target", edit_program(target("builtins.exec")), message="not a PyTorch compute operator")
    case("operator outside aten", edit_program(target("torch.ops.profiler._record_function_enter.default")),
         message="outside the allowed namespaces")
    def power_bomb(name: str, data: bytes) -> bytes:
        if name != "models/model.json":
            return data
        return re.sub(rb'"expr_str": "([^"]+)"', rb'"expr_str": "\1 + 0*2**2**2**40"', data, count=1)

    case("shape expression power bomb", power_bomb, message="a power of a power")
    case("AOTInductor native library", add=[("data/aotinductor/model/model.so", native_library(folder, marker))],
         message="AOTInductor")
    case("TorchScript code member", add=[("code/__torch__.py", b"import os\n")], message="TorchScript or Python code")

    program = zipfile.ZipFile(good).read(f"{good.stem}/models/model.json")
    buffer = io.BytesIO()
    torch.save((Payload(marker),), buffer)
    payload = buffer.getvalue()
    # torch's zip reader takes the first copy, Python's the last: a check that reads the last is fooled
    case("duplicate zip entry", lambda n, d: [payload, d] if n == "data/sample_inputs/model.pt" else d,
         message="appears twice")
    dotdot = "data/constants/opaque_obj_0/../tensor_0"
    case("opaque_obj_0/../tensor_0 name", add=[(dotdot, pickle.dumps(Payload(marker)))], message="'..'")

    def opaque() -> Edit:
        def edit(name: str, content: bytes) -> bytes:
            if name == "data/constants/model_constants_config.json":
                config = json.loads(content)
                config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                            "tensor_meta": None}
                return json.dumps(config).encode()
            return content

        return edit

    case("opaque object (I0x10 pickle)", opaque(), add=[("data/constants/opaque_obj_0", i0x10_pickle(marker))],
         message="custom Python or TorchBind object")

    def sample_inputs(data: bytes) -> Edit:
        return lambda name, content: data if name == "data/sample_inputs/model.pt" else content

    def weight_sizes(name: str, data: bytes) -> bytes:
        if name != "data/weights/model_weights_config.json":
            return data
        config = json.loads(data)
        first = next(iter(config["config"].values()))
        first["tensor_meta"]["sizes"][0] = {"as_expr": {"expr_str": "s0", "hint": None}}
        return json.dumps(config).encode()

    case("weight of symbolic size", weight_sizes, message="damaged or hand-edited.*Only as_int")
    shared = torch.zeros(1)
    for _ in range(64):  # 2 kB on disk; 2**64 leaves to whatever walks the tree
        shared = (shared, shared)
    buffer = io.BytesIO()
    torch.save(((shared,), {}), buffer)
    case("sample inputs of 2**64 shared leaves", sample_inputs(buffer.getvalue()), message="more than 100,000 values")
    # an example input stored as an expanded view (one value on disk) and a graph that accepts its width: random
    # inputs of that shape would take 10 GB a sample
    wide_input = io.BytesIO()
    torch.save(((torch.zeros(1, 1).expand(4, 1_250_000_000),), {}), wide_input)

    def wide_program(document: dict[str, Any]) -> None:
        meta = document["graph_module"]["graph"]["tensor_values"]["x"]
        meta["sizes"][1], meta["strides"][0] = {"as_int": 1_250_000_000}, {"as_int": 1_250_000_000}

    def wide(name: str, data: bytes) -> bytes:
        return sample_inputs(wide_input.getvalue())(name, edit_program(wide_program)(name, data))

    case("example input of 10 GB a sample", wide, message="would take 10,000,000,000 bytes a sample")
    case("sample inputs I0x10 pickle", sample_inputs(i0x10_pickle(marker)), message="sample_inputs")
    case("sample inputs torch.save payload", sample_inputs(payload), message="sample_inputs")

    cases += name_cases(folder, good, marker)
    cases += spec_cases(folder, good, marker)
    if not bombs:
        return cases
    baseline = ["scan", str(good), "--samples", "4"]
    for member, fill, head, label in (
        ("data/weights/weight_0", b"\0", b"", "weight"),
        ("models/model.json", b" ", program, "program JSON"),
        ("data/sample_inputs/model.pt", b"\0", b"", "sample inputs"),
    ):
        case(f"zip bomb: {label}", lambda name, data, member=member: None if name == member else data,
             add=[(member, ("bomb", fill, head))], bomb=True, baseline=baseline, message="expands to")
    return cases


def name_cases(folder: Path, good: Path, marker: Path) -> list[Case]:
    """Text of the program that torch's deserializer turns into code: names it writes into generated Python,
    operators it resolves from dotted paths, symbol indices it counts up to."""
    shell = f"touch {marker}"
    assert "." not in shell  # a parameter name is split at dots: the payload holds none
    cases: list[Case] = []

    def case(label: str, edit: Edit, message: str, command: str = "scan") -> None:
        path = rewrite(good, folder / (re.sub(r"[^A-Za-z0-9]+", "_", label) + ".pt2"), edit)
        cases.append(Case(label, path, [command, "--samples", "4"] if command == "scan" else [command],
                          message=message))

    def rename(old: str, new: str, where: str) -> Callable[[Any], Any]:
        def walk(value: Any) -> Any:
            if isinstance(value, dict):
                return {(new if k == old else k): walk(v) for k, v in value.items()}
            if isinstance(value, list):
                return [walk(v) for v in value]
            return new if value == old else value

        return lambda document: document["graph_module"].update(
            {key: walk(document["graph_module"][key]) for key in where.split()}
        )

    # a graph input named `x=CODE`: torch writes `def forward(self, ..., x=CODE):` and runs it building the graph
    case("input name is a default argument", edit_program(rename("x", f"x=__import__('os').system({shell!r})",
                                                                 "graph signature")),
         "name .*which is not a Python identifier", command="inspect")

    # a parameter name closes torch's unescaped `getattr(self, "NAME")` and calls os.system
    evil = f'training"), getattr(__import__("os"), "system")("{shell}"), getattr(self, "training'

    def parameter(name: str, data: bytes) -> bytes:
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"][evil] = config["config"].pop("fc1.weight")
            return json.dumps(config).encode()
        return edit_program(rename("fc1.weight", evil, "signature"))(name, data)

    case("parameter name breaks out of getattr", parameter, "parameter name .*not a module path")
    case("forward argument name", edit_program(lambda d: d["graph_module"]["module_call_graph"][0]["signature"]
                                               .update(forward_arg_names=[f"x=__import__('os').system({shell!r})"])),
         "forward argument name")

    def higher_order(operator: str, *arguments: dict[str, Any]) -> Edit:
        def edit(document: dict[str, Any]) -> None:
            graph = document["graph_module"]["graph"]
            graph["tensor_values"]["evil"] = graph["tensor_values"]["linear"]
            graph["nodes"].insert(0, {
                "target": "torch.ops.higher_order.wrap_with_set_grad_enabled",
                "inputs": [{"name": "", "arg": a, "kind": 1}
                           for a in ({"as_bool": True}, {"as_operator": operator}, *arguments)],
                "outputs": [{"as_tensor": {"name": "evil"}}], "metadata": {}, "is_hop_single_tensor_return": True,
                "name": "evil",
            })

        return edit_program(edit)

    # a higher-order op calls the operator it is given: any function reachable from `torch`, or a refused op
    case("higher-order op calls os.system", higher_order("torch.serialization.os.system", {"as_string": shell}),
         "torch.serialization.os.system, which is not a PyTorch compute operator as an argument")
    case("higher-order op calls aten.from_file",
         higher_order("torch.ops.aten.from_file.default", {"as_string": str(marker)}, {"as_bool": True},
                      {"as_int": 64}),
         "aten.from_file.default .*as an argument")
    # torch's deserializer counts to the largest unbacked symbol of the range constraints, one step at a time
    case("range constraint on symbol u99999999999",
         edit_program(lambda d: d["range_constraints"].update(u99999999999={"min_val": 0, "max_val": None})),
         "symbol 'u99999999999', whose index is larger", command="inspect")
    return cases


def spec_cases(folder: Path, good: Path, marker: Path) -> list[Case]:
    """The program's input and output trees (pytree specs): torch's parser imports the module that an `__enum__`
    object in a node's context names, and looks node types up by name."""
    (folder / "corpus_payload.py").write_text(f"{touch_code(marker)}\nclass Key(dict):\n    pass\n")

    def spec(key: str, change: Callable[[dict[str, Any]], None]) -> Edit:
        def edit(document: dict[str, Any]) -> None:
            signature = document["graph_module"]["module_call_graph"][0]["signature"]
            parsed = json.loads(signature[key])
            change(parsed[1])
            signature[key] = json.dumps(parsed)

        return edit_program(edit)

    def enum_key(node: dict[str, Any]) -> None:  # the inputs' kwargs dict gets one key that imports the payload
        kwargs = node["children_spec"][1]
        kwargs["context"] = json.dumps([{"__enum__": True, "fqn": "corpus_payload:Key", "name": "x"}])

    def output_type(name: str) -> Callable[[dict[str, Any]], None]:
        return lambda node: node.update(type=name)

    cases = []
    for label, edit, message in (
        ("input tree context imports a module", spec("in_spec", enum_key), "a context holding a dict"),
        ("output tree of type os.system", spec("out_spec", output_type("os.system")), "outputs are a os.system"),
        ("output tree of type builtins.eval", spec("out_spec", output_type("builtins.eval")), "builtins.eval"),
        ("output tree of a transformers module outside models",
         spec("out_spec", output_type("transformers.commands.serving.ServeCommand")), "not a transformers"),
    ):
        path = rewrite(good, folder / (label.replace(" ", "_").replace(".", "_") + ".pt2"), edit)
        cases.append(Case(label, path, ["scan", "--samples", "4"], message=message, importable=True))
    return cases


def state_dict_cases(folder: Path, bombs: bool) -> list[Case]:
    import torch

    from tests import torch_zoo as zoo

    marker = folder / MARKER
    good = folder / "weights.pt"
    torch.save(zoo.mlp().state_dict(), good)
    scan = ["scan", "--arch", "tests/torch_zoo.py:MLP", "--samples", "4"]
    payload = pickle.dumps(Payload(marker), protocol=2)
    cases = [
        Case("state dict: duplicate data.pkl", rewrite(good, folder / "duplicate.pt",
                                                        lambda n, d: [payload, d] if n == "data.pkl" else d),
             scan, message="appears twice"),
    ]
    if bombs:
        first = next(n for n in zipfile.ZipFile(good).namelist() if n.endswith("/data/0"))
        record = first.split("/", 1)[1]
        cases.append(Case("zip bomb: state dict member",
                          rewrite(good, folder / "bomb.pt", lambda n, d: None if n == record else d,
                                  add=[(record, ("bomb", b"\0", b""))]),
                          scan, message="compressed", bomb=True, baseline=["scan", str(good), *scan[1:]]))
    return cases


# data and Keras files --------------------------------------------------------------------------------------------
SAMPLES = Path(__file__).resolve().parents[1] / "deadneuron" / "samples"


def npz_member(archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], body: int | bytes) -> None:
    """A deflated .npy member declaring float32 `shape`; `body` is its data, or a byte count of zeros."""
    import numpy as np

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w", force_zip64=True) as member:
        member.write(header.getvalue())
        if isinstance(body, bytes):
            member.write(body)
            return
        chunk = b"\0" * (1 << 20)
        while body > 0:
            member.write(chunk[: min(body, len(chunk))])
            body -= len(chunk)


def data_cases(folder: Path, bombs: bool) -> list[Case]:
    import numpy as np

    marker = folder / MARKER
    model = str(SAMPLES / "digits_cnn.pt2")
    cases = []
    noise = folder / "noise.npz"
    noise.write_bytes(bytes(range(256)) * 4)
    cases.append(Case("random bytes named .npz", Path(model), ["scan", "--data", str(noise)],
                      message="is not a numpy .npz archive"))
    pickled = folder / "objects.npz"
    np.savez(pickled, x=np.array([Payload(marker)], dtype=object))
    cases.append(Case(".npz with a pickle payload", Path(model), ["scan", "--data", str(pickled)],
                      message="Python objects"))
    huge = folder / "huge_shape.npz"
    with zipfile.ZipFile(huge, "w") as archive:
        npz_member(archive, "x.npy", (10**12, 1, 8, 8), b"\0" * 1024)
    cases.append(Case(".npz declaring a huge shape", Path(model), ["scan", "--data", str(huge)],
                      message="declares shape"))
    for label, shape in (("huge", (10**12, 1, 8, 8)), ("overflowing", (2**62, 2**62))):
        header = io.BytesIO()  # numpy's own size check overflows (and warns on stderr) on the second
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
        declared = folder / f"{label}_shape.npy"
        declared.write_bytes(header.getvalue() + b"\0" * 1024)
        cases.append(Case(f".npy declaring a {label} shape", Path(model), ["scan", "--data", str(declared)],
                          message=r"declares shape .* but holds 1,024 bytes"))
    # the end record declares a 64 MiB central directory, which Python's zip reader would read whole
    directory = folder / "directory.npz"
    np.savez(directory, x=np.zeros((4, 1, 8, 8), np.float32))
    data = bytearray(directory.read_bytes())
    end = data.rindex(b"PK\x05\x06")
    data[end + 12 : end + 16] = (64 << 20).to_bytes(4, "little")
    directory.write_bytes(bytes(data))
    cases.append(Case(".npz declaring a 64 MiB zip directory", Path(model), ["scan", "--data", str(directory)],
                      message="zip directory is 67,108,864 bytes"))
    if bombs:
        many = folder / "members.npz"  # 300,000 empty members: a 30 MB file, some 200 MB once read
        np.savez(many, x=np.zeros((4, 1, 8, 8), np.float32))
        with zipfile.ZipFile(many, "a") as archive:
            for i in range(300_000):
                archive.writestr(zipfile.ZipInfo(f"{i}.npy"), b"")
        cases.append(Case(".npz of 300,000 members", Path(model), ["scan", "--data", str(many)],
                          message="zip directory is", bomb=True,
                          baseline=["scan", model, "--data", str(SAMPLES / "digits_heldout.npz")]))
        bomb = folder / "bomb.npz"
        rows = BOMB_BYTES // (64 * 4)
        with zipfile.ZipFile(bomb, "w") as archive:
            npz_member(archive, "x.npy", (rows, 1, 8, 8), BOMB_BYTES)
        baseline = ["scan", model, "--data", str(SAMPLES / "digits_heldout.npz")]
        cases.append(Case("zip bomb: .npz", Path(model), ["scan", "--data", str(bomb)], message="compressed",
                          bomb=True, baseline=baseline))
        cases.append(Case("zip bomb: .npz with --samples 64", Path(model),
                          ["scan", "--data", str(bomb), "--samples", "64"], expect=0, bomb=True, baseline=baseline))
    return cases


def keras_cases(folder: Path, bombs: bool) -> list[Case]:
    good = SAMPLES / "digits_cnn.keras"
    scan = ["scan", "--samples", "4"]
    garbage = folder / "garbage.keras"
    garbage.write_bytes(b"\x00junk")
    renamed = folder / "keras_archive.pt2"
    shutil.copyfile(good, renamed)
    cases = [
        Case("5-byte garbage .keras", garbage, scan, message="is not a Keras archive"),
        Case(".keras renamed .pt2", renamed, scan, message="is a Keras archive"),
        Case("duplicate config.json in .keras",
             rewrite(good, folder / "duplicate.keras", lambda n, d: [d, d] if n == "config.json" else d), scan,
             message="appears twice"),
    ]

    def wide(name: str, data: bytes) -> bytes:  # Keras would fill a (512, 10**7) kernel (20 GB) before the weights
        if name != "config.json":
            return data
        config = json.loads(data)
        next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")["config"]["units"] = 10**7
        return json.dumps(config).encode()

    cases.append(Case("Dense of ten million units in .keras", rewrite(good, folder / "wide.keras", wide), scan,
                      message=r"asks for 20,480,019,200 bytes of variables"))

    def callback(name: str, data: bytes) -> bytes:  # a Keras class whose constructor makes a folder, as a layer
        if name != "config.json":
            return data
        config = json.loads(data)
        layers = config["config"]["layers"]
        layers[2] = {"module": "keras.callbacks", "class_name": "BackupAndRestore", "registered_name": None,
                     "config": {"backup_dir": str(folder / MARKER)}, "name": "x",
                     "inbound_nodes": layers[2]["inbound_nodes"]}
        return json.dumps(config).encode()

    cases.append(Case("Keras callback as a layer", rewrite(good, folder / "callback.keras", callback), scan,
                      message="could not be deserialized"))
    if bombs:
        baseline = ["scan", str(good), "--samples", "4"]
        config = zipfile.ZipFile(good).read("config.json")
        for member, head, label in (("config.json", config, "config.json"), ("model.weights.h5", b"", "weights")):
            path = rewrite(good, folder / f"bomb_{label}.keras", lambda n, d, m=member: None if n == m else d,
                           add=[(member, ("bomb", b" " if head else b"\0", head))])
            cases.append(Case(f"zip bomb: .keras {label}", path, scan, message="expands to", bomb=True,
                              baseline=baseline))
    return cases


def build(folder: Path, *, bombs: bool = True) -> list[Case]:
    """Every case, its files written into `folder`; `bombs=False` leaves out the zip bombs (slow to write)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / VICTIM).write_bytes(VICTIM_TEXT)
    return (
        pt2_cases(folder, bombs)
        + state_dict_cases(folder, bombs)
        + data_cases(folder, bombs)
        + keras_cases(folder, bombs)
    )


# a report on the current checkout ---------------------------------------------------------------------------------
def run_child(argv: list[str], timeout: float = 300, path: Path | None = None) -> tuple[int, list[str], int]:
    """(exit code, non-empty stderr lines, peak RSS in MiB) of `python -m deadneuron ARGV` in a fresh process;
    `path` first on its sys.path."""
    probe = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'deadneuron', *sys.argv[1:]], capture_output=True, text=True)\n"
        "sys.stderr.write(r.stderr)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path), env.get("PYTHONPATH", "")) if p)
    # a session of its own: on a timeout the whole group goes, the probe and the `deadneuron` it started (killing
    # the probe alone left a hung load running for an hour)
    child = subprocess.Popen([sys.executable, "-c", probe, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return -1, [f"still running after {timeout:.0f} s: stopped"], 0
    code, rss_kib = stdout.split()[-2:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    return int(code), lines, int(rss_kib) // 1024


def main(folder: str) -> None:
    root = Path(folder)
    cases = build(root)
    print("| attack | exit | stderr lines | payload ran / file written | peak MiB (normal scan) |")
    print("|---|---|---|---|---|")
    baselines: dict[tuple[str, ...], int] = {}
    for case in cases:
        (root / MARKER).unlink(missing_ok=True)
        (root / VICTIM).write_bytes(VICTIM_TEXT)
        code, lines, rss = run_child([case.args[0], str(case.path), *case.args[1:]],
                                     path=root if case.importable else None)
        ran = (root / MARKER).exists() or (root / VICTIM).read_bytes() != VICTIM_TEXT
        memory = f"{rss}"
        if case.bomb:
            key = tuple(case.baseline)
            if key not in baselines:
                baselines[key] = run_child(case.baseline)[2]
            memory += f" ({baselines[key]})"
        first = lines[-1][:90].replace("|", "/") if lines else ""
        print(f"| {case.label} | {code} | {len(lines)}: {first} | {'YES' if ran else 'no'} | {memory} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "safety-corpus")
