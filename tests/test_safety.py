"""Untrusted files never run their code: every payload creates a marker file, and the marker must never appear.

Each crafted file goes through the CLI (`deadneuron.cli.main`, in this process: a payload that ran would leave
its marker all the same) and must end in exit code 2 with one line naming what was refused. A few go through
a fresh process as a user runs them. Opting in (`--unsafe-pickle`, `--unsafe-deserialization`) loads.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import zipfile

import pytest

torch = pytest.importorskip("torch")

from deadneuron.cli import main  # noqa: E402

from . import torch_zoo as zoo  # noqa: E402
from .conftest import last_line, run_cli  # noqa: E402


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    return code, lines, captured.out


def _refused(capsys, marker, *args, names=None):
    code, lines, out = _cli(capsys, *args)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("deadneuron: error: "), lines
    assert "Traceback" not in out
    if names:
        assert re.search(names, lines[0]), lines[0]
    assert not os.path.exists(marker), "the payload ran"
    return lines[0]


# PyTorch pickles ----------------------------------------------------------------------------------------------
def test_pickled_module_with_payload_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "whole.pt"
    torch.save({"model": zoo.mlp(), "hook": Payload(marker)}, path)
    line = _refused(capsys, marker, "scan", path, "--samples", 4, names=r"posix.system.*--unsafe-pickle")
    assert "tests.torch_zoo.MLP" in line
    _refused(capsys, marker, "inspect", path, names="posix.system")
    _refused(capsys, marker, "compare", path, "--samples", 4, names="posix.system")


def test_state_dict_with_payload_is_refused_also_with_arch(tmp_path, capsys):
    marker = tmp_path / "pwned"
    state = dict(zoo.mlp().state_dict())
    state["extra"] = Payload(marker)
    for suffix in (".pt", ".pth", ".bin", ".ckpt"):
        path = tmp_path / f"weights{suffix}"
        torch.save(state, path)
        _refused(capsys, marker, "scan", path, "--arch", "tests/torch_zoo.py:MLP", "--samples", 4,
                 names=r"holds pickled Python objects \(posix.system\)")


def test_plain_pickle_file_is_refused(tmp_path, capsys):
    """Not a torch zip at all: a bare pickle (legacy torch.save format) with a payload."""
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    _refused(capsys, marker, "scan", path, "--arch", "tests/torch_zoo.py:MLP", "--samples", 4)


def test_unsafe_pickle_is_the_only_way_and_its_help_says_why(tmp_path, capsys):
    path = tmp_path / "whole.pt"
    torch.save(zoo.mlp(), path)
    code, _, out = _cli(capsys, "inspect", path, "--unsafe-pickle", "--input-shape", "8")
    assert code == 0 and "act1" in out
    code, _, out = _cli(capsys, "scan", "--help")
    text = " ".join(out.split())
    assert re.search(r"--unsafe-pickle .*Unpickling runs code from the file: only for files you trust", text)
    assert re.search(r"--unsafe-deserialization .*Runs code stored in the file", text)


# .pt2: every place torch.export.load could run code --------------------------------------------------------------
def _program(tmp_path):
    good = tmp_path / "good.pt2"
    program = torch.export.export(
        zoo.mlp().eval(), (torch.randn(4, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, good)
    return good


def _rewrite(good, bad, edit):
    """Copy the archive `good` to `bad`, `edit(name, bytes) -> bytes | None` per member (None drops it);
    `edit(None, None)` may return {name: bytes} to add."""
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        prefix = src.namelist()[0].split("/")[0] + "/"
        for item in src.infolist():
            data = edit(item.filename[len(prefix):], src.read(item))
            if data is not None:
                dst.writestr(item, data)
        for name, data in (edit(None, None) or {}).items():
            dst.writestr(prefix + name, data)
    return bad


def _saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _crafts(good, marker):
    """(label, edit, expected message) for each way a .pt2 can smuggle code."""
    marker = str(marker)
    payload = _saved(Payload(marker))
    raw = pickle.dumps(Payload(marker), protocol=2)

    def sample_inputs(name, data):
        return payload if name == "data/sample_inputs/model.pt" else data

    def pickled_weight(name, data):
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            entry = next(iter(config["config"].values()))
            entry["use_pickle"] = True
            return json.dumps(config).encode()
        return payload if name == "data/weights/weight_0" else data

    def raw_weight(name, data):
        return pickled_weight(name, data) if name != "data/weights/weight_0" else raw

    def constant(kind):
        def edit(name, data):
            if name is None:
                return {f"data/constants/{kind}_0": raw}
            if name == "data/constants/model_constants_config.json":
                config = json.loads(data)
                config["config"]["evil"] = {
                    "path_name": f"{kind}_0", "is_param": False, "use_pickle": True, "tensor_meta": None
                }
                return json.dumps(config).encode()
            return data

        return edit

    def pickled_constant(name, data):
        if name is None:
            return {"data/constants/tensor_9": payload}
        if name == "data/constants/model_constants_config.json":
            config = json.loads(data)
            config["config"]["evil"] = {
                "path_name": "tensor_9", "is_param": False, "use_pickle": True, "tensor_meta": None
            }
            return json.dumps(config).encode()
        return data

    def legacy_weights(name, data):
        if name is None:
            return {"data/weights/model.pt": payload}
        return data

    def sympy_expression(name, data):
        if name == "models/model.json":
            text = data.decode()
            return text.replace("Symbol(", f"__import__('os').system('touch {marker}') + Symbol(", 1).encode()
        return data

    def graph_target(name, data):
        if name == "models/model.json":
            return data.replace(b'"torch.ops.aten.relu.default"', b'"torch.os.system"', 1)
        return data

    return [
        ("sample inputs", sample_inputs, r"member .*sample_inputs/model.pt.*posix.system"),
        ("pickled weight", pickled_weight, r"weight_0.*posix.system"),
        ("raw pickled weight", raw_weight, r"weight_0.*posix.system"),
        ("pickled constant", pickled_constant, r"tensor_9.*posix.system"),
        ("opaque object", constant("opaque_obj"), r"custom Python or TorchBind object"),
        ("TorchBind object", constant("custom_obj"), r"custom Python or TorchBind object"),
        ("legacy weights file", legacy_weights, r"weights/model.pt.*posix.system"),
        ("sympy expression", sympy_expression, r"shape expression .*__import__"),
        ("graph target", graph_target, r"system"),
    ]


def test_crafted_pt2_never_runs_its_payload(tmp_path, capsys):
    good = _program(tmp_path)
    assert _cli(capsys, "inspect", good)[0] == 0  # the untouched program loads
    for label, edit, message in _crafts(good, tmp_path / "pwned"):
        bad = _rewrite(good, tmp_path / f"{label.replace(' ', '_')}.pt2", edit)
        marker = tmp_path / "pwned"
        line = _refused(capsys, marker, "scan", bad, "--samples", 4)
        assert re.search(message, line), (label, line)


def test_sympify_guard_holds_without_the_archive_check(tmp_path):
    """Defence in depth: even called directly under our load context, torch.export.load cannot evaluate a
    crafted shape expression."""
    from deadneuron import DeadNeuronError
    from deadneuron.torch.loading import weights_only_loads

    marker = tmp_path / "pwned"
    label, edit, _ = next(c for c in _crafts(_program(tmp_path), marker) if c[0] == "sympy expression")
    bad = _rewrite(tmp_path / "good.pt2", tmp_path / "expr.pt2", edit)
    with pytest.raises(Exception) as caught, weights_only_loads():
        torch.export.load(bad)
    assert isinstance(caught.value, DeadNeuronError) or "not a plain expression" in str(caught.value)
    assert not marker.exists()
    import sympy

    assert sympy.sympify.__module__.startswith("sympy")  # put back


def test_names_torch_allows_load(tmp_path, capsys):
    """The name rules refuse quotes, backslashes and white space, not the names models have: ModuleDict keys with
    dashes, Sequential indices, a module called twice (fc@1 in the module call graph)."""

    class Named(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleDict({"block-1": torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())})
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.fc(self.blocks["block-1"](x)))

    program = torch.export.export(Named().eval(), (torch.randn(4, 8),))
    torch.export.save(program, tmp_path / "named.pt2")
    code, lines, out = _cli(capsys, "inspect", tmp_path / "named.pt2")
    assert code == 0, lines
    assert "blocks.block-1.1" in out


@pytest.mark.parametrize("argument", [os.system, "aten.from_file"], ids=["a function", "a refused operator"])
def test_graph_check_refuses_an_operator_argument_without_the_json_check(argument):
    """Defence in depth: a graph torch built (whatever path led there) whose higher-order op is handed something
    to call other than an allowed operator is refused before it runs."""
    from deadneuron import DeadNeuronError
    from deadneuron.torch.pt2_program import check_graph

    program = torch.export.export(zoo.mlp().eval(), (torch.randn(4, 8),))
    check_graph(program, "good.pt2")  # the untouched program passes
    if argument == "aten.from_file":
        argument = torch.ops.aten.from_file.default
    graph = program.graph_module.graph
    with graph.inserting_before(next(iter(graph.nodes))):
        graph.call_function(torch.ops.higher_order.wrap_with_set_grad_enabled, (True, argument, "touch pwned"))
    with pytest.raises(DeadNeuronError, match=r"takes .* as an argument.*; refused"):
        check_graph(program, "crafted.pt2")


@pytest.mark.slow
def test_crafted_files_in_fresh_processes(tmp_path):
    marker = tmp_path / "pwned"
    whole = tmp_path / "whole.pt"
    torch.save(Payload(marker), whole)
    good = _program(tmp_path)
    label, edit, _ = next(c for c in _crafts(good, marker) if c[0] == "sympy expression")
    for path in (whole, _rewrite(good, tmp_path / "expr.pt2", edit)):
        result = run_cli("scan", str(path), "--samples", "4")
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert last_line(result.stderr).startswith("deadneuron: error: ")
        assert not marker.exists()


# Keras: Lambda layers -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lambda_models(tmp_path_factory):
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    folder = tmp_path_factory.mktemp("lambda")
    marker = folder / "pwned"
    touch = f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]"
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(6, activation="relu")(inputs)
    hidden = keras.layers.Lambda(eval(touch))(hidden)  # noqa: S307 (a test's own payload)
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    paths = []
    for suffix in (".keras", ".h5"):
        path = folder / f"lambda{suffix}"
        model.save(path)
        paths.append(path)
    marker.unlink(missing_ok=True)  # building the model ran the lambda; the files must not
    return paths, marker


def test_keras_lambda_is_refused_unless_opted_in(lambda_models, capsys):
    paths, marker = lambda_models
    before = {path: path.read_bytes() for path in paths}
    for path in paths:
        _refused(capsys, marker, "scan", path, "--samples", 4,
                 names=r"Lambda layer.*--unsafe-deserialization")
        _refused(capsys, marker, "inspect", path, names="Lambda")
    for path in paths:  # the opt-in loads and runs the model (the payload then runs: the user asked for it)
        code, lines, out = _cli(capsys, "inspect", path, "--unsafe-deserialization")
        assert code == 0, lines
        assert "activation sites" in out
    assert marker.exists()
    assert {path: path.read_bytes() for path in paths} == before  # the files themselves are never written


# The user's file is never written -------------------------------------------------------------------------------
def test_model_file_is_byte_identical_after_every_command(tmp_path, capsys):
    import numpy as np

    state = tmp_path / "mlp.pt"
    torch.save(zoo.mlp().state_dict(), state)
    program = _program(tmp_path)
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((12, 8)).astype("f4"), y=rng.integers(0, 4, 12))
    arch = ["--arch", "tests/torch_zoo.py:MLP"]
    commands = {
        program: [["scan", "--data", data], ["inspect"], ["compare", "--data", data],
                  ["compare", "--data", data, "--finetune-steps", 2], ["swap", "-o", tmp_path / "out.pt2"],
                  ["scan", "--data", data, "--batch-size", 0]],  # a failing command too
        state: [["scan", *arch, "--data", data], ["inspect", *arch], ["compare", *arch, "--data", data],
                ["scan", "--arch", "tests/torch_zoo.py:CNN", "--samples", 4]],
    }
    for path, runs in commands.items():
        before = (path.read_bytes(), path.stat().st_mtime_ns)
        for extra in runs:
            main([str(extra[0]), str(path), *map(str, extra[1:])])
            capsys.readouterr()
            assert (path.read_bytes(), path.stat().st_mtime_ns) == before, (path.name, extra)


# Saved transformers directories ----------------------------------------------------------------------------------
@pytest.fixture
def gpt2_dir(tmp_path):
    hf_zoo = pytest.importorskip("tests.hf_zoo")
    pytest.importorskip("transformers")
    hf_zoo.build("gpt2").save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _edit_config(folder, **changes):
    file = folder / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.mark.parametrize(
    "changes, message",
    [
        # transformers would allocate and initialize every tensor these describe (hundreds of GB), weights or not
        ({"n_layer": 200, "n_embd": 8192, "n_inner": 32768}, r"describes a model of .* bytes, but its weights hold"),
        # a million small blocks: gigabytes of Python objects before any tensor, stopped by counting them
        ({"n_layer": 1_000_000}, r"more than 10,448 modules, parameters and buffers, but its weights hold 28"),
        ({"n_positions": 4_000_000}, r"describes a model of 512,081,024 bytes, but its weights hold"),
        ({"vocab_size": 10**9}, r"describes a model of .* bytes, but its weights hold"),
        # an `org/repo` attention implementation is a kernel transformers downloads from the Hub and loads
        ({"attn_implementation": "kernels-community/flash-attn"}, r"sets attn_implementation to 'kernels-commu"),
        ({"attn_implementation": {"text_config": "evil/kernel"}}, r"attn_implementation\[.text_config.\] to .evil"),
    ],
    ids=["layers", "a million layers", "positions", "vocabulary", "hub kernel", "hub kernel per sub-config"],
)
def test_transformers_configs_that_would_exhaust_memory_or_fetch_code_are_refused(gpt2_dir, capsys, changes,
                                                                                   message):
    _edit_config(gpt2_dir, **changes)
    line = _refused(capsys, gpt2_dir / "pwned", "inspect", gpt2_dir, names=message)
    assert "refused" in line or "never runs" in line


def test_a_transformers_weights_file_whose_header_claims_more_than_the_file_is_refused(gpt2_dir, capsys):
    weights = gpt2_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes((1 << 40).to_bytes(8, "little") + data[8:])
    _refused(capsys, gpt2_dir / "pwned", "inspect", gpt2_dir, names=r"header claims 1,099,511,627,776 bytes")
    assert _cli(capsys, "inspect", gpt2_dir)[0] == 2
