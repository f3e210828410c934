from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300):
    """Run `python -m deadneuron ARGS` in a fresh process, as a user would."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "deadneuron", *args],
        capture_output=True, text=True, cwd=cwd or ROOT, env=full_env, timeout=timeout,
    )


def run_cli_without(module: str, *args: str, timeout: float = 300):
    """`run_cli` in a fresh process where `import module` fails, as on a machine without that package."""
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from deadneuron.cli import main\n"
        f"sys.exit(main({list(args)!r}))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def timm_loaded(monkeypatch):
    """timm's activation modules in sys.modules, as `import timm` leaves them (tests/timm_fakes.py)."""
    from .timm_fakes import register

    register(monkeypatch)
