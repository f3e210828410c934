"""`deadneuron demo` runs the main job on the bundled samples and shows real dead units."""

from __future__ import annotations

import json

import pytest

from deadneuron.demo import SAMPLES, run_demo

from .conftest import run_cli


def expected_dead(framework: str) -> int:
    return json.loads((SAMPLES / "expected.json").read_text())[framework]["totals"]["dead"]


def test_demo_cli_shows_dead_units_and_the_comparison():
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    dead = expected_dead("torch")
    assert f"Dead (output zero on every sample): {dead}/112" in result.stdout
    assert f"{dead} of 112 units are dead under ReLU" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_keras():
    from rich.console import Console

    console = Console(width=120, color_system=None, record=True)
    assert run_demo("keras", console=console) == 0
    text = console.export_text()
    assert f"Dead (output zero on every sample): {expected_dead('keras')}/112" in text


def test_demo_unknown_framework_is_a_user_error(capsys):
    from deadneuron.cli import main

    assert main(["demo", "--framework", "jax"]) == 2
    assert "unknown framework 'jax' for the demo; expected one of torch, keras" in capsys.readouterr().err
