"""Data files: memory-mapped, validated, with one-line errors for every mistake."""

from __future__ import annotations

import numpy as np
import pytest

from deadneuron.data import array_batches, as_dataset, limit, load_data_file, shard
from deadneuron.errors import DeadNeuronError


def test_npz_members_are_memory_mapped(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    y = np.arange(6)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data_file(tmp_path / "d.npz")
    assert isinstance(data.x, np.memmap)
    np.testing.assert_array_equal(data.x, x)
    np.testing.assert_array_equal(data.y, y)


def test_compressed_npz_still_loads(tmp_path):
    x = np.ones((3, 2), np.float32)
    np.savez_compressed(tmp_path / "d.npz", x=x)
    np.testing.assert_array_equal(load_data_file(tmp_path / "d.npz").x, x)


def test_npy_batches_and_shards(tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    np.save(tmp_path / "d.npy", x)
    data = load_data_file(tmp_path / "d.npy")
    batches = [b for b, _ in array_batches(data, 4)]
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), x)
    parts = [shard(data, r, 3).x for r in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), x)
    assert len(limit(data, 5)) == 5


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "data file not found"),
        (lambda p: np.savez(p, z=np.ones(3)), "has no array named 'x' (it has: z)"),
        (lambda p: np.savez(p, x=np.zeros((0, 3))), "the inputs are empty"),
        (lambda p: np.savez(p, x=np.array(["a", "b"])), "holds <U1 values; expected numbers"),
        (lambda p: np.savez(p, x=np.ones((3, 2)), y=np.ones(2)), "2 labels for 3 inputs"),
        (lambda p: np.savez(p, x=np.array([{}, {}], dtype=object)), "Python objects"),
        (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "corrupt or truncated"),
    ],
)
def test_bad_data_files(tmp_path, make, message):
    path = tmp_path / "d.npz"
    make(path)
    with pytest.raises(DeadNeuronError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_data_file(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("1,2")
    with pytest.raises(DeadNeuronError, match="unknown data format '.csv'"):
        load_data_file(path)


def test_arrays_and_pairs_become_datasets():
    x, y = np.ones((4, 2)), np.arange(4)
    assert len(as_dataset(x)) == 4
    assert as_dataset((x, y)).y is y
    assert as_dataset([x]) is None
    with pytest.raises(DeadNeuronError, match="batch size must be positive"):
        next(array_batches(as_dataset(x), 0))
