"""One line on stderr and exit 2 for every user error, in both frameworks: files told by their content before a
framework is imported, finite thresholds, every failure of the user's --arch code, TensorFlow's start-up lines
kept off stderr, Ctrl-C as one line and exit 130, and a Python user's process left as it was."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deadneuron.cli import main  # noqa: E402

from . import torch_zoo as zoo  # noqa: E402
from .conftest import ROOT  # noqa: E402

SAMPLES = ROOT / "deadneuron" / "samples"
KERAS = SAMPLES / "digits_cnn.keras"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_errors")
    torch.save(zoo.mlp().state_dict(), d / "mlp.pt")
    torch.export.save(torch.export.export(zoo.mlp().eval(), (torch.randn(2, 8),)), d / "mlp.pt2")
    (d / "noise.npz").write_bytes(os.urandom(300))
    (d / "garbage.keras").write_bytes(b"\x00\x01abc")
    (d / "keras.pt2").write_bytes(KERAS.read_bytes())
    (d / "data.pt2").write_bytes((SAMPLES / "digits_heldout.npz").read_bytes())
    (d / "model.npz").write_bytes((d / "mlp.pt2").read_bytes())
    (d / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (d / "raises.py").write_text("raise RuntimeError('no GPU here')\n")
    (d / "needs.py").write_text("import no_such_dependency_xyz\n")
    np.savez(d / "good.npz", x=np.zeros((4, 8), "f4"))
    return d


CASES = [
    ("random bytes named .npz", "scan {mlp.pt2} --data {noise.npz}", r"noise.npz is not a numpy .npz archive"),
    (".keras renamed .pt2", "scan {keras.pt2} --samples 4",
     r"keras.pt2 is a Keras archive.*rename it to end in .keras"),
    ("5-byte .keras", "scan {garbage.keras} --samples 4", r"garbage.keras is not a Keras archive"),
    (".npz renamed .pt2", "inspect {data.pt2}", r"is a numpy .npz archive \(a data file.*--data"),
    (".pt2 renamed .npz", "scan {mlp.pt2} --data {model.npz}", r"is a torch.export archive \(a model file"),
    ("atol nan", "scan {mlp.pt2} --samples 4 --atol nan", r"atol must be a finite number >= 0, received nan"),
    ("gtol inf", "scan {mlp.pt2} --samples 4 --gtol inf", r"gtol must be a finite number >= 0, received inf"),
    ("--arch with a .pt2", "scan {mlp.pt2} --samples 4 --arch tests/torch_zoo.py:MLP",
     r"--arch applies to PyTorch state dicts, but .*mlp.pt2 is a torch.export archive.*drop --arch"),
    ("--arch sys:exit", "scan {mlp.pt} --samples 4 --arch sys:exit",
     r"calling exit\(\) failed: it called exit\(None\)"),
    ("--arch file exits", "scan {mlp.pt} --samples 4 --arch {exits.py}:Net", r"failed to import: it called exit\(3\)"),
    ("--arch file raises", "scan {mlp.pt} --samples 4 --arch {raises.py}:Net",
     r"failed to import: RuntimeError: no GPU here"),
    ("--arch names a missing package", "scan {mlp.pt} --samples 4 --arch {needs.py}:Net",
     r"No module named 'no_such_dependency_xyz'"),
    ("--arch module raises", "scan {mlp.pt} --samples 4 --arch tests.safety_raising:Net",
     r"--arch module 'tests.safety_raising' failed to import: RuntimeError: needs a GPU"),
]


def _argv(template, folder):
    return [re.sub(r"\{([^}]+)\}", lambda m: str(folder / m.group(1)), part) for part in template.split()]


@pytest.mark.parametrize("template, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line(files, capsys, template, message):
    code = main(_argv(template, files))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("deadneuron: error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert "check the warnings above" not in lines[0]


def test_files_are_told_apart_without_importing_a_framework(files):
    """In a fresh process: the refusal comes before torch or TensorFlow is imported."""
    probe = (
        "import sys; from deadneuron.cli import main\n"
        "codes = [main(a.split('|')) for a in sys.argv[1:]]\n"
        "print(codes, 'torch' in sys.modules, 'tensorflow' in sys.modules)\n"
    )
    argv = [
        f"scan|{files / 'garbage.keras'}|--samples|4",
        f"scan|{files / 'keras.pt2'}|--samples|4",
        f"inspect|{files / 'data.pt2'}",
    ]
    result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.split() == ["[2,", "2,", "2]", "False", "False"], result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 3


def test_main_leaves_the_process_as_it_found_it(files, capsys):
    before = (dict(os.environ), list(sys.meta_path), signal.getsignal(signal.SIGINT))
    main(_argv("scan {mlp.pt2} --samples 4 --atol nan", files))
    main(_argv("scan {mlp.pt2} --samples 4", files))
    capsys.readouterr()
    assert (dict(os.environ), list(sys.meta_path), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.slow
def test_keras_errors_are_one_line_without_tensorflow_noise(tmp_path):
    """TensorFlow prints absl and oneDNN lines when imported; the CLI keeps them off stderr (also without
    TF_CPP_MIN_LOG_LEVEL set), so a Keras error is one line like a PyTorch one."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 5), "f4"))
    for args in (["scan", str(KERAS), "--samples", "4", "--atol", "nan"],
                 ["scan", str(KERAS), "--data", str(tmp_path / "wrong.npz")]):
        result = subprocess.run([sys.executable, "-m", "deadneuron", *args], capture_output=True, text=True,
                                cwd=ROOT, env=env, timeout=300)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and lines[0].startswith("deadneuron: error: "), lines


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130():
    """SIGINT while the scan runs, and while the CLI is still importing: one line, exit 130, no traceback."""
    argv = [sys.executable, "-m", "deadneuron", "scan", str(SAMPLES / "digits_cnn.pt2"), "--samples", "2000000",
            "--batch-size", "8"]
    for delay in (0.3, 4.0):
        process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert process.returncode == 130, (delay, err)
        assert lines == ["deadneuron: interrupted"], (delay, err)


def test_readme_says_that_arch_runs_the_file():
    text = " ".join((ROOT / "README.md").read_text().split())
    assert re.search(r"`--arch FILE\.py:NAME` runs FILE\.py", text), "README's Safety section"
