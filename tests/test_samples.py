"""The bundled sample models load in their frameworks, and their dead units are those expected.json lists.

Dead units are recounted here with plain framework code (an FX interpreter over the exported torch program, a
Keras feature model), never with deadneuron itself, so these tests pin the samples, not the scanner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from .conftest import ROOT

SAMPLE_MODELS = ROOT / "sample_models"
PACKAGE_SAMPLES = ROOT / "deadneuron" / "samples"
SAMPLE_FILES = (
    "digits_cnn.pt2", "digits_cnn.keras", "digits_heldout.npz", "digits_heldout_nhwc.npz", "expected.json",
)
MAX_FOLDER_BYTES = 5 * 1024 * 1024


def expected() -> dict:
    return json.loads((PACKAGE_SAMPLES / "expected.json").read_text())


def dead_by_layer(result: dict) -> dict[str, list[int]]:
    return {layer["name"]: layer["dead_units"] for layer in result["layers"]}


def load_npz(name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(PACKAGE_SAMPLES / name) as f:
        return f["x"], f["y"]


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_package_copy_matches_sample_models(name):
    # The demo reads deadneuron/samples (package data); sample_models/ is what people browse. They must agree.
    assert (PACKAGE_SAMPLES / name).read_bytes() == (SAMPLE_MODELS / name).read_bytes()


@pytest.mark.parametrize("folder", [SAMPLE_MODELS, PACKAGE_SAMPLES], ids=["sample_models", "package"])
def test_folder_stays_small(folder):
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert size < MAX_FOLDER_BYTES, f"{folder} holds {size} bytes"


def test_heldout_data_in_both_layouts():
    x, y = load_npz("digits_heldout.npz")
    x_nhwc, y_nhwc = load_npz("digits_heldout_nhwc.npz")
    n = expected()["dataset"]["heldout_samples"]
    assert x.shape == (n, 1, 8, 8) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x_nhwc, x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y_nhwc, y)


def test_dead_share_is_real_in_both_models():
    for framework in ("torch", "keras"):
        result = expected()[framework]
        assert 0.15 <= result["totals"]["dead_fraction"] <= 0.5, framework
        assert result["totals"]["dead"] == sum(len(units) for units in dead_by_layer(result).values())
        assert result["heldout_accuracy"] > 0.5, framework


def test_torch_sample_loads_and_its_dead_units_match():
    torch = pytest.importorskip("torch")
    # torch.export.load may fall back to full unpickling; acceptable here, on our own committed file only.
    program = torch.export.load(PACKAGE_SAMPLES / "digits_cnn.pt2")
    assert tuple(program.example_inputs[0][0].shape) == (1, 1, 8, 8)
    module = program.module()
    x, y = load_npz("digits_heldout.npz")

    relu_ops = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}
    maxima: dict[str, np.ndarray] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.op == "call_function" and node.target in relu_ops:
                name = list(node.meta["nn_module_stack"].values())[-1][0]
                reduce_dims = [d for d in range(out.dim()) if d != 1]  # channels-first: units on axis 1
                maxima[name] = out.amax(dim=reduce_dims).numpy()
            return out

    with torch.no_grad():
        logits = Recorder(module).run(torch.from_numpy(x))
        assert module(torch.from_numpy(x[:1])).shape == (1, 10)  # any batch size, 1 included
        assert module(torch.from_numpy(x[:7])).shape == (7, 10)

    want = expected()["torch"]
    got = {name: [int(i) for i in np.flatnonzero(m == 0.0)] for name, m in maxima.items()}
    assert list(got) == [layer["name"] for layer in want["layers"]]  # order of execution
    assert got == dead_by_layer(want)
    assert [m.size for m in maxima.values()] == [layer["units"] for layer in want["layers"]]
    assert float((logits.argmax(1).numpy() == y).mean()) == pytest.approx(want["heldout_accuracy"], abs=1e-4)


def test_keras_sample_loads_and_its_dead_units_match():
    keras = pytest.importorskip("keras")
    model = keras.models.load_model(PACKAGE_SAMPLES / "digits_cnn.keras", compile=False)
    assert tuple(model.inputs[0].shape) == (None, 8, 8, 1)
    x, y = load_npz("digits_heldout_nhwc.npz")

    want = expected()["keras"]
    names = [layer["name"] for layer in want["layers"]]
    assert all(keras.saving.get_registered_name(model.get_layer(n).activation) == "relu" for n in names)
    features = keras.Model(model.inputs[0], [model.get_layer(n).output for n in names] + [model.outputs[0]])
    *site_outputs, logits = (np.asarray(t) for t in features(x, training=False))

    got = {}
    for name, out in zip(names, site_outputs, strict=True):
        unit_max = out.max(axis=tuple(range(out.ndim - 1)))  # channels-last: units on the last axis
        got[name] = [int(i) for i in np.flatnonzero(unit_max == 0.0)]
    assert got == dead_by_layer(want)
    assert [out.shape[-1] for out in site_outputs] == [layer["units"] for layer in want["layers"]]
    assert float((logits.argmax(1) == y).mean()) == pytest.approx(want["heldout_accuracy"], abs=1e-4)


@pytest.mark.slow
def test_regenerating_gives_the_committed_dead_units(tmp_path):
    # Same machine, same numbers: training runs on one thread with deterministic kernels. Another CPU's SIMD
    # kernels round differently, and 150 epochs carry that into the weights: regenerated on an Intel Xeon, the
    # files committed from an AMD Zen 4 came back with the same counts in every layer, but two of torch's relu3 units
    # traded places (48 dead instead of 50). So a few units per layer may differ across CPUs, never the counts
    # by more than one; expected.json records the margins (min_alive_max_output, max_dead_pre_activation) that the
    # committed counts hold by on the machine that made them.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, str(SAMPLE_MODELS / "make_samples.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SAMPLE_FILES)
    regenerated = json.loads((tmp_path / "expected.json").read_text())
    committed = expected()
    for framework in ("torch", "keras"):
        again, before = dead_by_layer(regenerated[framework]), dead_by_layer(committed[framework])
        assert again.keys() == before.keys(), framework
        units = {layer["name"]: layer["units"] for layer in committed[framework]["layers"]}
        for name, dead in before.items():
            moved = set(again[name]) ^ set(dead)
            assert len(moved) <= max(2, units[name] // 16), (framework, name, sorted(moved))
            assert abs(len(again[name]) - len(dead)) <= 1, (framework, name)
        totals = regenerated[framework]["totals"]
        assert totals["units"] == committed[framework]["totals"]["units"], framework
        assert abs(totals["dead"] - committed[framework]["totals"]["dead"]) <= len(before), framework
    for name in ("digits_heldout.npz", "digits_heldout_nhwc.npz"):
        assert (tmp_path / name).read_bytes() == (SAMPLE_MODELS / name).read_bytes(), name
