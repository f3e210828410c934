"""The framework-free engine pieces: options checked once, the host data plan, the one max-form crossing, the one
repeated-site suffix, swap's shared rules. (The engine's scan and compare are tested through both backends in
test_torch_scan.py, test_keras_scan.py and test_compare.py.)"""

from __future__ import annotations

import dataclasses
import doctest
import math
import os

import numpy as np
import pytest

from deadneuron import DeadNeuronError
from deadneuron.core import kinds, options, plan, sinerelu, swap
from deadneuron.core.options import ScanOptions, SwapOptions, TuneOptions, resolve_loss, scan_options, split_options
from deadneuron.data import Dataset


@pytest.mark.parametrize("module", [kinds, options, swap])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


def test_scan_options_are_frozen_and_checked_when_built():
    built = scan_options(batch_size=8, input_shape=[3, 4], loss="probe")
    assert built.input_shape == (3, 4) and built.gradients
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.batch_size = 9  # type: ignore[misc]
    with pytest.raises(DeadNeuronError, match="unknown loss 'hinge'; expected one of auto, ce, mse"):
        ScanOptions(loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(DeadNeuronError, match="thresholds must be >= 0: gtol must be a finite number >= 0"):
        ScanOptions(gtol=math.nan)
    with pytest.raises(DeadNeuronError, match="batch size must be positive: batch_size must be an integer >= 1"):
        ScanOptions(batch_size=0)
    with pytest.raises(TypeError, match="labels"):
        scan_options(labels=[1])  # type: ignore[call-arg]


def test_swap_and_tune_options():
    assert SwapOptions.make().epsilons == {"conv": 0.0025, "dense": 0.025}
    assert SwapOptions.make(epsilon=0.1, form="max").epsilons == {"conv": 0.1, "dense": 0.1}
    with pytest.raises(TypeError, match="unexpected keyword argument 'epsilonn'"):
        SwapOptions.make(epsilonn=0.1)  # type: ignore[call-arg]
    scanning, swapping = split_options({"batch_size": 4, "epsilon_dense": 0.5, "seed": 3})
    assert (scanning.batch_size, scanning.seed, swapping.epsilons["dense"]) == (4, 3, 0.5)
    with pytest.raises(DeadNeuronError, match="finetune_steps must be an integer >= 0"):
        TuneOptions(steps=-1)
    with pytest.raises(DeadNeuronError, match="fine-tuning trains on the task loss"):
        TuneOptions(steps=2).check_loss("probe")


def test_one_loss_resolver_for_both_frameworks():
    resolved = [resolve_loss("auto", False, False), resolve_loss("auto", True, True), resolve_loss("auto", True, False)]
    assert resolved == ["probe", "ce", "mse"]
    with pytest.raises(DeadNeuronError, match="loss='ce' needs labels") as caught:
        resolve_loss("ce", False, False)
    assert "--loss ce needs labels" in str(caught.value)


def test_epsilon_is_checked_in_one_place():
    assert sinerelu.check_epsilon(np.float32(0.5)) == 0.5
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(DeadNeuronError, match="epsilon must be a finite number >= 0.*not finite and >= 0"):
            sinerelu.check_epsilon(bad)
    for bad in ("0.1", True, None):
        with pytest.raises(DeadNeuronError, match="epsilon must be a finite number >= 0.*must be a number"):
            sinerelu.check_epsilon(bad)


@pytest.mark.parametrize("epsilon", [0.0, 0.0025, 0.025, 0.3, 1 / math.sqrt(2)])
@pytest.mark.parametrize("grid", [np.float32, np.float64])
def test_max_form_crossing_is_where_the_branches_swap(epsilon, grid):
    """On the grid, z wins (eps*(sin z - cos z) <= z) from the crossing up and loses just below it; k = 1 included."""
    dtype = np.dtype(grid)
    crossing = sinerelu.max_form_crossing(epsilon, dtype)
    assert crossing is not None and crossing <= 0
    z = grid(crossing)
    below = np.nextafter(z, grid(-np.inf))
    assert epsilon * (math.sin(float(z)) - math.cos(float(z))) <= float(z)
    assert epsilon * (math.sin(float(below)) - math.cos(float(below))) > float(below)
    # the max form takes the z branch exactly from the crossing on, as the float64 reference says
    zs = np.linspace(-2.0, 1.0, 4001)
    chosen = sinerelu.sinerelu_reference(zs, epsilon, "max") == zs
    assert np.array_equal(chosen, zs >= crossing)


def test_max_form_crossing_gives_up_above_k_one():
    assert sinerelu.max_form_crossing(0.8) is None  # k = 0.8 * sqrt(2) > 1: several crossings are possible


def test_one_suffix_for_repeated_sites():
    calls: dict[str, int] = {}
    names = [kinds.repeated_site_name(base, calls) for base in ("a", "b", "a", "a.relu()", "a")]
    assert names == ["a", "b", "a#2", "a.relu()", "a#3"]


def test_the_sample_limiter_cuts_the_last_batch_and_skips_empty_ones():
    items = [(np.zeros((4, 2)), np.arange(4)), (np.zeros((0, 2)), None), (np.zeros((4, 2)), np.arange(4))]
    batches = list(plan.limited(items, 6))
    assert [b.valid for b in batches] == [4, 2] and batches[1].y.tolist() == [0, 1]
    assert [b.valid for b in plan.limited(items, None)] == [4, 4]


def test_host_batches_from_arrays_iterables_and_random_inputs():
    opts = ScanOptions(batch_size=4, samples=10, seed=1)
    x = np.arange(24, dtype=np.float32).reshape(12, 2)
    from_array = list(plan.host_batches(Dataset(x), None, opts, shapes=lambda: []))
    assert [b.valid for b in from_array] == [4, 4, 2]
    from_list = list(plan.host_batches([x[:5], x[5:]], None, opts, shapes=lambda: []))
    assert [b.valid for b in from_list] == [5, 5]
    drawn = [b.x for b in plan.host_batches(None, None, opts, shapes=lambda: [(3,)])]
    again = list(plan.random_inputs(10, [(3,)], 4, seed=1))
    assert [d.shape for d in drawn] == [(4, 3), (4, 3), (2, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(drawn, again, strict=True))
    with pytest.raises(DeadNeuronError, match="labels= goes with array data"):
        list(plan.host_batches([x], np.arange(12), opts, shapes=lambda: []))
    with pytest.raises(DeadNeuronError, match="cannot read data of type object"):
        list(plan.host_batches(object(), None, opts, shapes=lambda: []))


def test_nearest_layer_rule():
    assert swap.nearest([None, "conv", None, "dense", None], 2) == "conv"
    assert swap.nearest([None, "dense", "conv"], 0) == "dense"
    assert swap.nearest([None, None], 1) == "conv"


def test_write_then_rename_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "model.keras"

    def failing(path: str) -> None:
        with open(path, "w") as handle:
            handle.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        swap.write_then_rename(failing, str(target))
    assert os.listdir(tmp_path) == []
    swap.write_then_rename(lambda path: open(path, "w").close(), str(target))
    assert os.listdir(tmp_path) == ["model.keras"]
