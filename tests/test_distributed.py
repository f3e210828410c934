"""Several processes, one report: torchrun with 2 CPU ranks (gloo) equals one process, and the rank-sharded
scan reproduces the single-process statistics exactly, gradient magnitudes included."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deadneuron.core import engine  # noqa: E402
from deadneuron.core.options import ScanOptions  # noqa: E402
from deadneuron.core.stats import FIELDS  # noqa: E402
from deadneuron.data import Dataset, shard_bounds  # noqa: E402
from deadneuron.torch.accumulate import collect  # noqa: E402
from deadneuron.torch.backend import BACKEND, with_probe  # noqa: E402
from deadneuron.torch.distributed import Grid, launched  # noqa: E402

from . import torch_zoo as zoo  # noqa: E402
from .conftest import ROOT  # noqa: E402


def _sharded_stats(model, data, *, world, batch_size, samples=None, input_shape=None, seed=0):
    """What the ranks of a torchrun scan compute before the all-reduce, merged on the host."""
    run = BACKEND.prepare(model, None)
    total = len(data) if data is not None else samples
    grid_size = run.static_batch or batch_size
    shapes = (run.sample_shapes(input_shape) or []) if data is None else []
    merged = None
    for rank in range(world):
        start, stop = shard_bounds(total, rank, world)
        grid = Grid(total, grid_size, start, stop, run.static_batch is not None, seed + 1)
        kept = []
        engine.scan(
            with_probe(lambda _, grid=grid: grid.probe), model, grid.batches(data, shapes, seed, run.vocabulary),
            ScanOptions(batch_size=batch_size, input_shape=input_shape, seed=seed),
            reduce=lambda accs, kept=kept: kept.extend(accs) or accs,
        )
        stats = [s for _, s in collect(kept)]
        merged = stats if merged is None else [a.merge(b) for a, b in zip(merged, stats, strict=True)]
    return merged


def _single_stats(model, data, *, batch_size, samples=None, input_shape=None, seed=0):
    kept = []
    engine.scan(
        BACKEND, model, data, ScanOptions(batch_size=batch_size, samples=samples, input_shape=input_shape, seed=seed),
        reduce=lambda accs: kept.extend(accs) or accs,
    )
    return [s for _, s in collect(kept)]


def _assert_same(single, sharded):
    assert len(single) == len(sharded)
    for a, b in zip(single, sharded, strict=True):
        assert (a.samples, a.grad_samples) == (b.samples, b.grad_samples)
        for name, (dtype, _) in FIELDS.items():
            x, y = getattr(a, name), getattr(b, name)
            if dtype == "int64":
                assert np.array_equal(x, y), name
            else:  # float32 batch sums added in another order: rounding only
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_probe_matches_one_process_exactly(world):
    """Each sample's cotangent is the one a single process draws for it, whatever the shard boundaries."""
    x = np.random.default_rng(1).standard_normal((45, 8)).astype(np.float32)
    model = zoo.mlp()
    single = _single_stats(model, Dataset(x), batch_size=16)
    _assert_same(single, _sharded_stats(model, Dataset(x), world=world, batch_size=16))


def test_sharded_random_inputs_and_static_batch_program():
    program = torch.export.export(zoo.cnn().eval(), (torch.randn(4, 3, 8, 8),))  # a static batch of 4
    single = _single_stats(program, None, batch_size=4, samples=19)
    _assert_same(single, _sharded_stats(program, None, world=2, batch_size=4, samples=19, input_shape=(3, 8, 8)))


def test_sharded_random_token_ids_match_one_process():
    """`--samples N` under torchrun draws token ids for a token model, as one process does (not floats)."""
    pytest.importorskip("transformers")
    from . import hf_zoo

    model = hf_zoo.build("opt")
    single = _single_stats(model, None, batch_size=4, samples=10)
    _assert_same(single, _sharded_stats(model, None, world=2, batch_size=4, samples=10))


def test_launched_reads_torchrun_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched() == (1, 2, 1)


def _run(args, nproc=None):
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc else []
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, *launcher, "-m", "deadneuron", *args], capture_output=True, text=True, cwd=ROOT,
        env=env, timeout=300,
    )


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    x = np.random.default_rng(2).standard_normal((53, 8)).astype(np.float32)
    y = np.random.default_rng(3).integers(0, 4, 53)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    state = tmp_path / "mlp.pt"
    torch.save(zoo.mlp().state_dict(), state)
    program = tmp_path / "cnn.pt2"
    torch.export.save(
        torch.export.export(zoo.cnn().eval(), (torch.randn(2, 3, 8, 8),),
                            dynamic_shapes=({0: torch.export.Dim("batch")},)),
        program,
    )
    cases = {
        "state": [str(state), "--arch", "tests/torch_zoo.py:MLP", "--data", str(data), "--batch-size", "16"],
        "probe": [str(state), "--arch", "tests/torch_zoo.py:MLP", "--data", str(data), "--loss", "probe"],
        "pt2": [str(program), "--samples", "37", "--batch-size", "8"],
    }
    for name, args in cases.items():
        one, two = tmp_path / f"{name}1.json", tmp_path / f"{name}2.json"
        single = _run(["scan", *args, "--json", str(one)])
        assert single.returncode == 0, single.stderr
        ranks = _run(["scan", *args, "--json", str(two)], nproc=2)
        assert ranks.returncode == 0, ranks.stderr
        assert one.read_text() == two.read_text(), name
        assert ranks.stdout.count("activation sites") == single.stdout.count("activation sites") == 1, name
