"""Every user mistake: exit code 2 and one line on stderr that says what happened, what was expected and how to
fix it; never a traceback, never an "internal error". In-process (`deadneuron.cli.main`) for speed; a few cases
again in a fresh process, as a user runs them."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deadneuron.cli import main  # noqa: E402

from . import torch_zoo as zoo  # noqa: E402
from .conftest import run_cli  # noqa: E402

MLP = "tests/torch_zoo.py:MLP"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Name -> path of every file the table below refers to."""
    d = tmp_path_factory.mktemp("errors")
    f = {}

    def path(name):
        f[name] = d / name
        return f[name]

    torch.save(zoo.mlp().state_dict(), path("mlp.pt"))
    torch.save(zoo.cnn().state_dict(), path("cnn.pt"))
    torch.export.save(
        torch.export.export(zoo.mlp().eval(), (torch.randn(2, 8),), dynamic_shapes=({0: torch.export.Dim("b")},)),
        path("mlp.pt2"),
    )
    from safetensors.torch import save_file

    save_file(zoo.mlp().state_dict(), path("mlp.safetensors"))
    for name in ("mlp.pt2", "mlp.pt", "mlp.safetensors"):
        data = f[name].read_bytes()
        path(f"cut_{name}").write_bytes(data[: len(data) // 2])
    rng = np.random.default_rng(0)
    np.savez(path("good.npz"), x=rng.standard_normal((10, 8)).astype("f4"), y=rng.integers(0, 4, 10))
    np.savez(path("shape.npz"), x=rng.standard_normal((10, 5)).astype("f4"))
    np.savez(path("empty.npz"), x=np.zeros((0, 8), "f4"))
    np.save(path("empty.npy"), np.zeros((0, 8), "f4"))
    np.savez(path("nox.npz"), inputs=np.zeros((3, 8), "f4"))
    np.savez(path("text.npz"), x=np.array([["a"] * 8] * 3))
    np.savez(path("labels.npz"), x=rng.standard_normal((10, 8)).astype("f4"), y=np.zeros(7, "i8"))
    np.savez(path("classes.npz"), x=rng.standard_normal((10, 8)).astype("f4"), y=np.full(10, 9))
    nan = rng.standard_normal((10, 8)).astype("f4")
    nan[3, :] = np.nan
    np.savez(path("nan.npz"), x=nan)
    np.save(path("objects.npy"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path("zero.npy").write_bytes(b"")
    path("model.onnx").write_bytes(b"onnx")
    path("noext").write_bytes(b"?")
    path("notes.txt").write_text("not data")
    path("broken_import.py").write_text("import no_such_module_xyz\n")
    path("syntax.py").write_text("def (:\n")
    path("returns_int.py").write_text("def Net():\n    return 3\n")
    path("needs_args.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self, width):\n        super().__init__()\n"
    )
    (d / "folder").mkdir()
    f["folder"] = d / "folder"
    f["missing"] = d / "missing.pt2"
    f["nodir"] = d / "nodir" / "out.json"
    return f


# (case id, argv with {name} for files, exit code, regex on the one stderr line (after "deadneuron: error: "))
CASES = [
    ("missing file", "scan {missing} --samples 4", 2, r"model file not found: .*missing.pt2"),
    ("unknown format", "scan {model.onnx} --samples 4", 2, r"unknown model format '.onnx'.*expected one of .pt2"),
    ("no extension", "inspect {noext}", 2, r"unknown model format '\(no extension\)'"),
    ("folder as model", "inspect {folder}", 2, r"unknown model format|is a folder"),
    ("truncated .pt2", "scan {cut_mlp.pt2} --samples 4", 2, r"not a torch.export archive.*truncated"),
    ("truncated .pt", f"scan {{cut_mlp.pt}} --arch {MLP} --samples 4", 2, r"cannot read .*corrupt or truncated"),
    ("truncated .safetensors", f"scan {{cut_mlp.safetensors}} --arch {MLP} --samples 4", 2,
     r"cannot read .*cut_mlp.safetensors as safetensors"),
    ("text as .pt", f"scan {{notes.txt}} --arch {MLP} --samples 4", 2, r"unknown model format '.txt'"),
    ("state dict without --arch", "inspect {mlp.pt}", 2, r"is a state dict .*expected --arch FILE.py:NAME"),
    ("wrong shape .pt2", "scan {mlp.pt2} --data {shape.npz}", 2,
     r"batch of shape \(10, 5\).*expected samples of shape \(8,\)"),
    ("wrong shape module", f"scan {{mlp.pt}} --arch {MLP} --data {{shape.npz}}", 2,
     r"batch of shape \(10, 5\).*Linear\(8, ...\): expected 8 features"),
    ("wrong --input-shape", f"scan {{mlp.pt}} --arch {MLP} --samples 4 --input-shape 5", 2,
     r"batch of shape \(4, 5\).*expected 8 features"),
    ("empty .npz", "scan {mlp.pt2} --data {empty.npz}", 2, r"the inputs are empty \(shape \(0, 8\)\)"),
    ("empty .npy", "scan {mlp.pt2} --data {empty.npy}", 2, r"the inputs are empty"),
    ("zero-byte .npy", "scan {mlp.pt2} --data {zero.npy}", 2, r"cannot read data file .*corrupt or truncated"),
    ("npz without x", "scan {mlp.pt2} --data {nox.npz}", 2, r"has no array named 'x' \(it has: inputs\).*savez"),
    ("non-numeric data", "scan {mlp.pt2} --data {text.npz}", 2, r"x holds <U1 values; expected numbers"),
    ("object array", "scan {mlp.pt2} --data {objects.npy}", 2, r"holds Python objects, which are refused"),
    ("labels of wrong length", "scan {mlp.pt2} --data {labels.npz}", 2, r"7 labels for 10 inputs"),
    ("class out of range", "scan {mlp.pt2} --data {classes.npz}", 2, r"labels run from 9 to 9 .* 4 outputs"),
    ("missing data file", "scan {mlp.pt2} --data {missing}", 2, r"data file not found"),
    ("unknown data format", "scan {mlp.pt2} --data {notes.txt}", 2, r"unknown data format '.txt'"),
    ("no data", "scan {mlp.pt2}", 2, r"no data: pass --data PATH .* or --samples N"),
    ("arch does not import", "scan {mlp.pt} --arch {broken_import.py}:Net --samples 4", 2,
     r"failed to import: ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("arch syntax error", "scan {mlp.pt} --arch {syntax.py}:Net --samples 4", 2, r"failed to import: SyntaxError"),
    ("arch module missing", "scan {mlp.pt} --arch nopkg_xyz.models:Net --samples 4", 2,
     r"--arch module 'nopkg_xyz.models' is not importable"),
    ("arch file missing", "scan {mlp.pt} --arch tests/absent.py:Net --samples 4", 2, r"--arch file not found"),
    ("arch names nothing", "scan {mlp.pt} --arch tests/torch_zoo.py:Nope --samples 4", 2,
     r"defines no callable 'Nope'; module classes there: CNN, MLP, Tokens"),
    ("arch not a module", "scan {mlp.pt} --arch {returns_int.py}:Net --samples 4", 2,
     r"Net\(\) returned a int; expected a torch.nn.Module"),
    ("arch needs arguments", "scan {mlp.pt} --arch {needs_args.py}:Net --samples 4", 2,
     r"calling Net\(\) failed: TypeError.*takes no arguments"),
    ("arch malformed", "scan {mlp.pt} --arch MLP --samples 4", 2, r"is not FILE.py:NAME or pkg.module:NAME"),
    ("state dict does not fit", f"scan {{cnn.pt}} --arch {MLP} --samples 4", 2,
     r"missing keys fc1.weight.*unexpected keys conv1.weight"),
    ("samples zero", "scan {mlp.pt2} --samples 0", 2, r"--samples must be positive"),
    ("batch size zero", "scan {mlp.pt2} --samples 4 --batch-size 0", 2, r"batch size must be positive"),
    ("unknown loss", "scan {mlp.pt2} --samples 4 --loss hinge", 2, r"unknown loss 'hinge'; expected one of"),
    ("negative atol", "scan {mlp.pt2} --samples 4 --atol -1", 2, r"thresholds must be >= 0"),
    ("fail-over range", "scan {mlp.pt2} --samples 4 --fail-over 2", 2, r"--fail-over takes a fraction"),
    ("ce without labels", "scan {mlp.pt2} --samples 4 --loss ce", 2, r"--loss ce needs labels"),
    ("unit axis", "scan {mlp.pt2} --data {good.npz} --unit-axis 7", 2, r"unit_axis 7 does not fit site"),
    ("bad input shape", "scan {mlp.pt2} --samples 4 --input-shape a,b", 2, r"--input-shape 'a,b' is not a shape"),
    ("json folder missing", "scan {mlp.pt2} --samples 4 --json {nodir}", 2, r"--json .*does not exist"),
    ("html is a folder", "scan {mlp.pt2} --samples 4 --html {folder}", 2, r"--html .* is a folder"),
    ("swap onto itself", "swap {mlp.pt2} -o {mlp.pt2}", 2, r"is the input file"),
    ("swap a state dict", f"swap {{mlp.pt}} --arch {MLP} -o {{folder}}/x.pt", 2, r"holds weights only"),
]


def _argv(template, files):
    """`{name}` -> the path of that file (names hold dots, so not str.format)."""
    return [re.sub(r"\{([^}]+)\}", lambda m: str(files[m.group(1)]), part) for part in template.split()]


@pytest.mark.parametrize("template, code, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error(files, capsys, template, code, message):
    result = main(_argv(template, files))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert result == code, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("deadneuron: error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_nan_data_counts_nonfinite_not_dead_and_warns(files, capsys):
    assert main(["scan", str(files["mlp.pt2"]), "--data", str(files["nan.npz"]), "--json", "-"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    first = report["layers"][0]
    assert first["nonfinite"] == first["units"] and first["dead"] == 0
    assert any("non-finite" in w for w in report["warnings"])
    assert main(["scan", str(files["mlp.pt2"]), "--data", str(files["nan.npz"])]) == 0
    assert "non-finite" in " ".join(capsys.readouterr().out.split())


def test_debug_shows_the_traceback(files, capsys):
    assert main(["scan", str(files["mlp.pt2"]), "--data", str(files["labels.npz"]), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("deadneuron: error: ")


def test_usage_error_is_exit_2(files, capsys):
    assert main(["scan", str(files["mlp.pt2"]), "--bogus"]) == 2
    assert "No such option: --bogus" in capsys.readouterr().err


# Keras -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    d = tmp_path_factory.mktemp("keras_errors")
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(5, activation="relu")(inputs)))
    f = {}
    for suffix in (".keras", ".h5"):
        f[suffix] = d / f"m{suffix}"
        model.save(f[suffix])
        data = f[suffix].read_bytes()
        f[f"cut{suffix}"] = d / f"cut{suffix}"
        f[f"cut{suffix}"].write_bytes(data[: len(data) // 2])
    np.savez(d / "shape.npz", x=np.zeros((4, 7), "f4"))
    np.savez(d / "labels.npz", x=np.zeros((4, 6), "f4"), y=np.zeros(3, "i8"))
    np.savez(d / "empty.npz", x=np.zeros((0, 6), "f4"))
    f["shape"], f["labels"], f["empty"] = d / "shape.npz", d / "labels.npz", d / "empty.npz"
    return f


KERAS_CASES = [
    ("truncated .keras", "scan {cut.keras} --samples 4", r"cut.keras: the file is damaged or not a Keras model"),
    ("truncated .h5", "scan {cut.h5} --samples 4", r"cut.h5: the file is damaged or not a Keras model"),
    ("wrong shape", "scan {.keras} --data {shape}", r"samples have shape \(7\), the model expects \(6\)"),
    ("wrong shape .h5", "scan {.h5} --data {shape}", r"samples have shape \(7\), the model expects \(6\)"),
    ("labels of wrong length", "scan {.keras} --data {labels}", r"3 labels for 4 inputs"),
    ("empty data", "scan {.keras} --data {empty}", r"the inputs are empty"),
    ("arch on a keras file", f"scan {{.keras}} --arch {MLP} --samples 4", r"--arch applies to PyTorch state dicts"),
]


@pytest.mark.parametrize("template, message", [c[1:] for c in KERAS_CASES], ids=[c[0] for c in KERAS_CASES])
def test_keras_user_error(keras_files, capsys, template, message):
    result = main(_argv(template, keras_files))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert result == 2, lines
    assert len(lines) == 1 and lines[0].startswith("deadneuron: error: "), lines
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing file", "truncated .pt", "state dict does not fit", "wrong shape .pt2"])
def test_user_error_in_a_fresh_process(files, case):
    template, code, message = next(c[1:] for c in CASES if c[0] == case)
    result = run_cli(*_argv(template, files))
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr
