"""The fused loops' own float32 sine and cosine (deadneuron/torch/_fused.c, x86-64 CPUs with FMA).

Through the shipped loops themselves, with k = 1 and a gradient of ones, so the forward returns sin(t) and the backward
cos(t) for the float32 argument t = min(z, 0) - pi/4 that the C code forms (numpy forms the same t in float32). Below
the bound every value is within 2 eps (relative) of the float64 sine of that t; beyond it (huge values, infinities,
nan) the element goes to the libm loops; an element's value never depends on its neighbours (nor on how threads split
the tensor), and in place and out of place agree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deadneuron.torch import fused

pytestmark = pytest.mark.skipif(not fused.available(), reason="the fused loops were not built (`pip install -e .`)")

QUARTER_PI = np.float32(math.pi / 4)
EPS = float(np.finfo(np.float32).eps)
BOUND = 65536.0  # FAST_BOUND in _fused.c


def own_sines() -> list[str]:
    """The own sines this CPU can run (none on a CPU without FMA, where the loops keep libmvec)."""
    if not fused.available():
        return []
    best = fused.use_sine()
    names = []
    for name in fused.SINES[1:]:
        fused.use_sine(name)
        if fused.use_sine(best) == name:  # set_sine clips to what the CPU has
            names.append(name)
    return names


@pytest.fixture(params=own_sines() or [pytest.param("none", marks=pytest.mark.skip("no own sine on this CPU"))])
def sine(request):
    previous = fused.use_sine(request.param)
    yield request.param
    fused.use_sine(previous)


def loops(x: np.ndarray, inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(sin t, cos t) from the forward and backward loops for float32 inputs x (k = 1, gradient 1)."""
    z = torch.from_numpy(x)
    out = z.clone() if inplace else torch.empty_like(z)
    fused.run_forward(out if inplace else z, out, 1.0, "piecewise")
    grad = torch.empty_like(z)
    fused.run_backward(z, torch.ones_like(z), grad, 1.0, 0.0, "piecewise")
    return out.numpy(), grad.numpy()


def argument(x: np.ndarray) -> np.ndarray:
    return (np.minimum(x, np.float32(0)) - QUARTER_PI).astype(np.float32)


def worst_relative_error(got: np.ndarray, exact: np.ndarray) -> float:
    """The largest |got - exact| / |exact|, in float32 eps (2^-23)."""
    return float(np.max(np.abs(got.astype(np.float64) - exact) / np.abs(exact)) / EPS)


def floats_between(low: float, high: float, stride: int) -> np.ndarray:
    """Every `stride`-th float32 from -low down to -high (low < high, both positive)."""
    first, last = np.float32(-low).view(np.uint32), np.float32(-high).view(np.uint32)
    return np.arange(int(first), int(last) + 1, stride, dtype=np.uint32).view(np.float32)


def near_multiples_of_half_pi(spread: int) -> np.ndarray:
    """The inputs whose t lies within `spread` floats of each multiple of pi/2 down to -BOUND, where a reduction
    that loses digits would show: sin and cos are both near zero somewhere here."""
    t = -np.arange(1, int(BOUND / (math.pi / 2)) + 1) * (math.pi / 2)
    base = t.astype(np.float32).view(np.int32)
    steps = np.arange(-spread, spread + 1, dtype=np.int32)
    t32 = (base[:, None] + steps[None, :]).ravel().view(np.float32)
    return (t32 + QUARTER_PI).astype(np.float32)  # z whose t = z - pi/4 is (within a rounding of) t32


def check(x: np.ndarray, limit: float) -> None:
    t = argument(x).astype(np.float64)
    s, c = loops(x)
    assert worst_relative_error(s, np.sin(t)) <= limit
    assert worst_relative_error(c, np.cos(t)) <= limit


def test_own_sine_is_within_2_eps_of_float64_on_a_dense_sample(sine):
    x = np.concatenate(
        [
            floats_between(0.5, BOUND, 61),  # every 61st float of the fast range
            near_multiples_of_half_pi(8),
            np.linspace(-0.5, 0, 100_001, dtype=np.float32),
            np.array([-0.0, 0.0, -1e-30, -1e-38, -1e-45], dtype=np.float32),  # zeros, tiny, subnormal
        ]
    )
    check(x, 2.0)


def test_own_and_libmvec_loops_agree_within_4_eps(sine):
    x = np.concatenate([floats_between(0.5, 1000.0, 7), near_multiples_of_half_pi(2)[:20_000]])
    own_s, own_c = loops(x)
    fused.use_sine("libmvec")
    try:
        lib_s, lib_c = loops(x)
    finally:
        fused.use_sine(sine)
    assert worst_relative_error(own_s, lib_s.astype(np.float64)) <= 4
    assert worst_relative_error(own_c, lib_c.astype(np.float64)) <= 4


SPECIALS = {700: -BOUND * 1.01, 1600: -1e30, 2100: -3.4e38, 2900: -math.inf, 3500: math.nan, 4321: math.inf}


def with_specials() -> np.ndarray:
    x = np.random.default_rng(0).normal(size=5000).astype(np.float32) * 10
    for i, v in SPECIALS.items():
        x[i] = v
    return x


@pytest.mark.parametrize("inplace", [False, True])
def test_values_beyond_the_bound_inf_and_nan_take_libm(sine, inplace):
    x = with_specials()
    s, c = loops(x, inplace)
    assert np.isnan(s[[2900, 3500]]).all() and np.isnan(c[[2900, 3500]]).all()  # nan stays nan, -inf gives nan
    assert s[4321] == math.inf and c[4321] == 1.0  # +inf is on the linear branch
    finite = np.isfinite(x) & (x <= 0)
    t = argument(x[finite]).astype(np.float64)
    assert worst_relative_error(s[finite], np.sin(t)) <= 4  # huge arguments too (libm's full reduction)
    assert worst_relative_error(c[finite], np.cos(t)) <= 4


def test_an_elements_value_does_not_depend_on_its_neighbours(sine):
    x = with_specials()
    s, c = loops(x)
    for i in [*SPECIALS, 0, 1, 511, 512, 699, 701, 1023, 2899, 2901, 4999]:  # specials and their blocks' neighbours
        alone_s, alone_c = loops(x[i : i + 1].copy())
        np.testing.assert_array_equal(alone_s, s[i : i + 1])
        np.testing.assert_array_equal(alone_c, c[i : i + 1])


def test_in_place_writes_what_out_of_place_returns(sine):
    x = np.random.default_rng(1).normal(size=1537).astype(np.float32) * 3  # not a multiple of the block
    x[600] = math.nan  # one block through the buffer and libm, the others straight through the own sine
    out_of_place, _ = loops(x)
    in_place, _ = loops(x, inplace=True)
    np.testing.assert_array_equal(in_place, out_of_place)


@pytest.mark.slow  # every float32 from -0.5 to -2^16 (1.4e8 values, ~40 s a sine here)
def test_own_sine_is_within_2_eps_of_float64_everywhere_below_the_bound(sine):
    binade = 1 << 23
    first, last = int(np.float32(-0.5).view(np.uint32)), int(np.float32(-BOUND).view(np.uint32))
    for start in range(first, last + 1, binade):
        bits = np.arange(start, min(start + binade, last + 1), dtype=np.uint32)
        check(bits.view(np.float32), 2.0)
