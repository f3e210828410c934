"""Corrupt files never end in a traceback: random bytes, truncations and flipped bytes of real model and data
files give exit code 2 and one line (or 0 when what is left still loads), never 3 ("internal error").

In-process (`deadneuron.cli.main`) and seeded. The default run takes a few offsets per format; `-m slow` many.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deadneuron.cli import main  # noqa: E402

from . import torch_zoo as zoo  # noqa: E402

MLP = "tests/torch_zoo.py:MLP"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """suffix -> (bytes of a real file, argv template with {path})."""
    d = tmp_path_factory.mktemp("fuzz_src")
    made = {}
    pt2 = d / "m.pt2"
    torch.export.save(
        torch.export.export(zoo.mlp().eval(), (torch.randn(2, 8),), dynamic_shapes=({0: torch.export.Dim("b")},)),
        pt2,
    )
    made[".pt2"] = (pt2.read_bytes(), ["inspect", "{path}"])
    state = d / "m.pt"
    torch.save(zoo.mlp().state_dict(), state)
    made[".pt"] = (state.read_bytes(), ["inspect", "{path}", "--arch", MLP])
    from safetensors.torch import save_file

    sft = d / "m.safetensors"
    save_file(zoo.mlp().state_dict(), sft)
    made[".safetensors"] = (sft.read_bytes(), ["inspect", "{path}", "--arch", MLP])
    rng = np.random.default_rng(0)
    npz, npy = d / "d.npz", d / "d.npy"
    np.savez(npz, x=rng.standard_normal((12, 8)).astype("f4"), y=rng.integers(0, 4, 12))
    np.save(npy, rng.standard_normal((12, 8)).astype("f4"))
    made[".npz"] = (npz.read_bytes(), ["scan", str(pt2), "--data", "{path}", "--loss", "none"])
    made[".npy"] = (npy.read_bytes(), ["scan", str(pt2), "--data", "{path}", "--loss", "none"])
    try:
        import keras
    except ImportError:
        return made
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(5, activation="relu")(inputs)))
    for suffix in (".keras", ".h5"):
        path = d / f"k{suffix}"
        model.save(path)
        made[suffix] = (path.read_bytes(), ["inspect", "{path}"])
    return made


def _variants(data: bytes, rng: random.Random, cuts: int, flips: int) -> list[tuple[str, bytes]]:
    n = len(data)
    out = [("empty", b""), ("random", rng.randbytes(rng.randint(1, 4096))), ("first byte", data[:1])]
    offsets = sorted({int(n * f) for f in (0.05, 0.5, 0.95)} | {rng.randrange(1, n) for _ in range(cuts)})
    out += [(f"cut at {k}", data[:k]) for k in offsets]
    for _ in range(flips):
        at = rng.randrange(n)
        out.append((f"flip at {at}", data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]))
    out.append(("random tail", data[: n // 2] + rng.randbytes(n - n // 2)))
    return out


def _fuzz(originals, suffix, tmp_path, capsys, cuts, flips, seed):
    if suffix not in originals:
        pytest.skip(f"no {suffix} writer here")
    data, template = originals[suffix]
    rng = random.Random(f"{seed}{suffix}")
    for label, variant in _variants(data, rng, cuts, flips):
        path = tmp_path / f"f{suffix}"
        path.write_bytes(variant)
        code = main([part.replace("{path}", str(path)) for part in template])
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        where = f"{suffix} {label}: {lines}"
        assert code in (0, 2), where
        assert "Traceback" not in captured.err + captured.out, where
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("deadneuron: error: "), where


SUFFIXES = [".pt2", ".pt", ".safetensors", ".keras", ".h5", ".npz", ".npy"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_corrupt_files_end_in_one_line(originals, suffix, tmp_path, capsys):
    _fuzz(originals, suffix, tmp_path, capsys, cuts=3, flips=3, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_corrupt_files_end_in_one_line_thoroughly(originals, suffix, tmp_path, capsys):
    _fuzz(originals, suffix, tmp_path, capsys, cuts=40, flips=60, seed=1)
