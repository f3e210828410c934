"""The package root stays light, and the CLI turns every user error into one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deadneuron.cli import main

from .conftest import last_line, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_import_and_help_load_no_framework():
    code = (
        "import sys, deadneuron, deadneuron.cli\n"
        "from deadneuron.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_version_prints_the_package_version_and_loads_no_framework():
    import deadneuron

    code = (
        "import sys\n"
        "from deadneuron.cli import main\n"
        "code = main(['--version'])\n"
        "print(code, sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines() == [f"deadneuron {deadneuron.__version__}", "0 []"]


def test_help_answers_fast():
    start = time.perf_counter()
    result = run_cli("--help")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "scan" in result.stdout and "compare" in result.stdout
    # a whole interpreter start included; well under a second on an idle 2-core machine
    assert elapsed < 3.0


def test_missing_model_is_one_line(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "absent.pt2"), "--samples", "4"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"deadneuron: error: model file not found: {tmp_path / 'absent.pt2'}"


def test_unknown_format_is_one_line(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model format '.onnx'" in err and "expected one of .pt2" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["scan", "m.pt2"], "no data: pass --data PATH"),
        (["scan", "m.pt2", "--samples", "0"], "--samples must be positive"),
        (["scan", "m.pt2", "--samples", "2", "--fail-over", "1.5"], "--fail-over takes a fraction between 0 and 1"),
        (["scan", "m.pt2", "--samples", "2", "--input-shape", "3,a"], "is not a shape"),
    ],
)
def test_bad_flags_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_usage_error_exit_2():
    result = run_cli("scan")
    assert result.returncode == 2
    assert "Missing argument" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_traceback(tmp_path, capsys):
    assert main(["--debug", "scan", str(tmp_path / "absent.pt2"), "--samples", "4"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and last_line(err).startswith("deadneuron: error:")


def test_python_dash_m_works():
    result = run_cli("inspect", "--help")
    assert result.returncode == 0, result.stderr
    assert "activation sites" in result.stdout


@pytest.mark.slow
def test_the_prepared_gpu_check_runs_dry_on_the_cpu():
    # benchmarks/cuda_check.py is the one script a session lent a GPU runs; keep it working where there is none.
    done = subprocess.run(
        [sys.executable, "benchmarks/cuda_check.py", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert [summary[check]["ok"] for check in ("sinerelu", "scan", "compare_monitor")] == [True, True, True]
