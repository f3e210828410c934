"""`deadneuron demo`: scan the bundled sample model on its held-out digits, then compare it with its SineReLU swap.

The samples are package data (`deadneuron/samples/`), made by `sample_models/make_samples.py`: small CNNs trained
on scikit-learn's digits at a too-high learning rate, so about a third of their ReLU units really are dead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import DeadNeuronError

SAMPLES = Path(__file__).resolve().parent / "samples"
# framework -> (model file, held-out data in that framework's layout)
SAMPLE_FILES = {
    "torch": ("digits_cnn.pt2", "digits_heldout.npz"),
    "keras": ("digits_cnn.keras", "digits_heldout_nhwc.npz"),
}


def sample_paths(framework: str) -> tuple[Path, Path]:
    if framework not in SAMPLE_FILES:
        raise DeadNeuronError(
            f"unknown framework {framework!r} for the demo; expected one of {', '.join(SAMPLE_FILES)}"
        )
    model, data = (SAMPLES / name for name in SAMPLE_FILES[framework])
    for path in (model, data):
        if not path.exists():
            raise DeadNeuronError(f"the bundled sample {path} is missing; reinstall deadneuron")
    return model, data


def run_demo(framework: str = "torch", *, console: Any = None) -> int:
    """Scan and compare the bundled sample of `framework`; print both reports to `console`."""
    from rich.console import Console
    from rich.rule import Rule

    from . import api
    from .data import load_data_file

    console = console or Console()
    model_path, data_path = sample_paths(framework)
    model = api.load_model(model_path)
    data = load_data_file(data_path)
    console.print(Rule(f"deadneuron scan {model_path.name} --data {data_path.name}"))
    report = api.scan(model, data, name=model_path.name)
    console.print(report)
    console.print(Rule(f"deadneuron compare {model_path.name} --to sinerelu"))
    comparison = api.compare(model, data, to="sinerelu", name=model_path.name)
    console.print(comparison)
    console.print(
        "\nNext: scan your own model with `deadneuron scan MODEL --data DATA.npz` "
        "(or `--samples N` for random inputs); `deadneuron --help` lists the commands."
    )
    return 0
