"""The opt-in compiled SineReLU kernels (deadneuron.torch.compile_kernels): same values and gradients as the numpy
reference and the eager path, whole pieces through the kernel and the tail eager, and eager for good on failure.

Building takes seconds per dtype and form (TorchInductor, gcc), so these tests are `slow`; the module builds the
kernels once and forgets them at the end, so that every other test runs the eager path.
"""

from __future__ import annotations

import math
import shutil
import warnings

import numpy as np
import pytest
import torch

from deadneuron import DeadNeuronError, sinerelu_reference
from deadneuron.core.sinerelu import sinerelu_grad_reference
from deadneuron.torch import clear_kernels, compile_kernels, kernel_status, sinerelu
from deadneuron.torch import kernels as kernel_module
from deadneuron.torch.kernels import PIECES, suspended

from .test_sinerelu_torch import assert_matches, grid, impl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def built():
    clear_kernels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a failed build is reported by the status below
        status = compile_kernels(dtypes=("float32", torch.float64), forms=("piecewise", "max"))
    if "ready" not in status.values() and not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        pytest.skip(f"no C++ compiler for TorchInductor: {status}")
    assert status == {f"{d}/{f}": "ready" for d in ("float32", "float64") for f in ("piecewise", "max")}, status
    yield
    clear_kernels()


SMALL = PIECES[-1]


def long_grid(dtype: torch.dtype, epsilon: float, tail: int = 1001) -> torch.Tensor:
    """One large piece, two small ones and a padded tail, each piece holding the whole grid (zeros, the band, the
    crossing)."""
    base = grid(dtype, epsilon)
    specials = torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype)
    base = torch.cat([specials, base])
    n = PIECES[0] + 2 * SMALL + tail
    return base.repeat(n // base.numel() + 1)[:n].contiguous()


def values_and_grad(x: torch.Tensor, epsilon: float, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(sinerelu(leaf, epsilon, form).sum(), leaf)  # type: ignore[arg-type]
    with torch.no_grad():
        return sinerelu(x, epsilon, form), grad  # type: ignore[arg-type]


def assert_same_specials_then_matches(actual: torch.Tensor, expected: np.ndarray, z: np.ndarray, epsilon: float):
    """nan and +-inf exactly where the reference has them; the finite values within its rounding bound."""
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(actual.double().numpy()[~finite], expected[~finite])
    assert_matches(actual[torch.from_numpy(finite)], expected[finite], z[finite], epsilon)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["piecewise", "max"])
@pytest.mark.parametrize("epsilon", [0.0025, 0.025, 0.5])
def test_kernels_match_the_reference_and_the_eager_path(epsilon, form, dtype):
    x = long_grid(dtype, epsilon)
    z = x.double().numpy()
    # The kernel really takes the whole pieces (and only them).
    out = torch.empty_like(x)
    k = epsilon * math.sqrt(2)
    assert kernel_module.forward(x, out, k, form) == x.numel()
    cross = 0.0 if form == "piecewise" else impl._max_form_crossing(epsilon, dtype)
    if cross is not None:  # eps*sqrt(2) <= 1; above it the max form's backward compares branches, eagerly
        assert kernel_module.backward(x, torch.ones_like(x), out, k, cross, form) == x.numel()
    with np.errstate(invalid="ignore"):
        expected, expected_grad = sinerelu_reference(z, epsilon, form), sinerelu_grad_reference(z, epsilon, form)
    y, grad = values_and_grad(x, epsilon, form)
    assert_same_specials_then_matches(y, expected, z, epsilon)
    # At z = -inf the max form's value is nan (sin(-inf)), and which branch "won" is moot: the reference says the
    # z branch, both torch paths give nan; the gradients of the two paths are compared below, infinities included.
    finite_z = np.isfinite(z)
    assert_same_specials_then_matches(grad[torch.from_numpy(finite_z)], expected_grad[finite_z], z[finite_z], epsilon)
    with suspended():
        eager_y, eager_grad = values_and_grad(x, epsilon, form)
    finite = torch.isfinite(eager_y)
    torch.testing.assert_close(y[finite], eager_y[finite], rtol=4 * torch.finfo(dtype).eps, atol=0)
    torch.testing.assert_close(grad.nan_to_num(), eager_grad.nan_to_num(), rtol=4 * torch.finfo(dtype).eps, atol=0)
    # In place, with and without autograd, writes what out-of-place returns.
    inplace = x.clone()
    sinerelu(inplace, epsilon, form, inplace=True)  # type: ignore[arg-type]
    assert torch.equal(inplace.nan_to_num(), y.nan_to_num())
    leaf = x.clone().requires_grad_()
    (inplace_grad,) = torch.autograd.grad(sinerelu(leaf * 1, epsilon, form, inplace=True).sum(), leaf)  # type: ignore
    assert torch.equal(inplace_grad.nan_to_num(), grad.nan_to_num())


def test_zero_maps_to_minus_epsilon_with_slope_epsilon_inside_a_piece():
    x = torch.zeros(SMALL + 3, requires_grad=True)  # a piece and a padded tail
    y = sinerelu(x, 0.025)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(y, torch.full_like(y, -0.025), rtol=1e-6, atol=0)
    assert torch.allclose(grad, torch.full_like(grad, 0.025), rtol=1e-6, atol=0)


def test_views_and_layouts_use_the_kernel_where_they_can():
    x = torch.randn(4, 64, 64, 128)  # 2M elements
    reference = sinerelu_reference(x.numpy(), 0.0025)
    channels_last = x.permute(0, 3, 1, 2)  # dense, not contiguous: flattened in memory order
    np.testing.assert_allclose(sinerelu(channels_last).permute(0, 2, 3, 1).numpy(), reference, rtol=1e-6, atol=1e-9)
    strided = x[:, :, :, ::2]  # not dense: copied, then the kernel
    np.testing.assert_allclose(sinerelu(strided).numpy(), reference[:, :, :, ::2], rtol=1e-6, atol=1e-9)
    offset = x.view(-1)[3 : 3 + SMALL + 5]  # a misaligned start
    out = torch.empty(SMALL + 9)[4:]
    assert kernel_module.forward(offset, out, 0.0025 * math.sqrt(2), "piecewise") == SMALL + 5
    np.testing.assert_allclose(out.numpy(), sinerelu_reference(offset.numpy()), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n", [1, 7, SMALL - 1, SMALL + 1])
def test_small_tensors_go_through_the_padded_piece(n):
    x = torch.randn(n) * 4
    x[0] = 0.0
    out, grad = torch.empty_like(x), torch.empty_like(x)
    k = 0.025 * math.sqrt(2)
    assert kernel_module.forward(x, out, k, "piecewise") == n
    assert kernel_module.backward(x, torch.ones_like(x), grad, k, 0.0, "piecewise") == n
    z = x.double().numpy()
    assert_matches(out, sinerelu_reference(z, 0.025), z, 0.025)
    assert_matches(grad, sinerelu_grad_reference(z, 0.025), z, 0.025)
    inplace = x.clone()
    assert kernel_module.forward(inplace, inplace, k, "piecewise") == n
    assert torch.equal(inplace, out)


def test_what_the_kernels_do_not_take_stays_eager():
    k = 0.0025 * math.sqrt(2)
    half = torch.randn(SMALL, dtype=torch.bfloat16)
    assert kernel_module.forward(half, torch.empty_like(half), k, "piecewise") == 0
    strided = torch.randn(2 * SMALL)[::2]
    assert kernel_module.forward(strided, torch.empty(SMALL), k, "piecewise") == 0
    empty = torch.empty(0)
    assert kernel_module.forward(empty, empty.clone(), k, "piecewise") == 0
    x = torch.randn(SMALL)
    with suspended():
        assert kernel_module.forward(x, torch.empty_like(x), k, "piecewise") == 0
    assert kernel_module.forward(x, torch.empty_like(x), k, "piecewise") == SMALL
    y = sinerelu(half)  # computed in float32 by the eager path, returned in bfloat16
    assert y.dtype == torch.bfloat16


def test_a_failing_kernel_warns_once_and_the_eager_path_finishes():
    key = (torch.float32, "piecewise")
    working = kernel_module._ready[key]

    def broken(*args):
        raise RuntimeError("kernel exploded")

    kernel_module._ready[key] = tuple(kernel_module._Kernels(size, broken, broken, broken) for size in PIECES)
    try:
        x = torch.randn(2 * SMALL)
        with pytest.warns(RuntimeWarning, match="piecewise are off.*call failed: RuntimeError: kernel exploded"):
            y = sinerelu(x)
        np.testing.assert_allclose(y.numpy(), sinerelu_reference(x.numpy()), rtol=1e-6, atol=1e-9)
        assert kernel_status()["float32/piecewise"].startswith("failed: a call failed")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning, and no kernel any more
            assert kernel_module.forward(x, torch.empty_like(x), 0.1, "piecewise") == 0
    finally:
        kernel_module._failed.pop(key, None)
        kernel_module._ready[key] = working


def test_a_failing_build_warns_and_reports(monkeypatch):
    def refuse(dtype, form):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(kernel_module, "_build", refuse)
    key = (torch.float64, "piecewise")
    working = kernel_module._ready.pop(key)
    try:
        with pytest.warns(RuntimeWarning, match="compiling failed: RuntimeError: no compiler here"):
            status = compile_kernels(dtypes=["float64"])
        assert status["float64/piecewise"] == "failed: compiling failed: RuntimeError: no compiler here"
        x = torch.randn(SMALL, dtype=torch.float64)
        np.testing.assert_allclose(sinerelu(x).numpy(), sinerelu_reference(x.numpy()), rtol=1e-12, atol=1e-15)
    finally:
        kernel_module._failed.pop(key, None)
        kernel_module._ready[key] = working


def test_background_build_then_ready():
    clear_kernels()
    try:
        status = compile_kernels(wait=False)
        assert status["float32/piecewise"] in ("building", "ready")
        x = torch.randn(SMALL)
        np.testing.assert_allclose(sinerelu(x).numpy(), sinerelu_reference(x.numpy()), rtol=1e-6, atol=1e-9)
        assert compile_kernels()["float32/piecewise"] == "ready"  # waits for the same build, starts no second one
    finally:
        compile_kernels(dtypes=("float32", "float64"), forms=("piecewise", "max"))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(DeadNeuronError, match="kernels exist for float32 and float64; received 'float16'"):
        compile_kernels(dtypes=["float16"])
    with pytest.raises(DeadNeuronError, match="form"):
        compile_kernels(forms=["triangle"])
