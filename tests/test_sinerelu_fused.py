"""SineReLU's default fused CPU loops (deadneuron/torch/_fused.c via fused.py): same values and gradients as the numpy
reference and the eager path, split over threads that end with the call, and torch.compile still sees one graph.

The loops are built by `pip install -e .` (setup.py, optional); a checkout that was not installed that way (or a
machine without a C compiler) runs the eager path, which test_sinerelu_torch.py covers, and skips the tests here
that need the build.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

from deadneuron import sinerelu_reference
from deadneuron.core.sinerelu import sinerelu_grad_reference
from deadneuron.torch import SineReLU, sinerelu
from deadneuron.torch import fused as fused_module
from deadneuron.torch.kernels import suspended

from .test_sinerelu_kernels import assert_same_specials_then_matches, values_and_grad
from .test_sinerelu_torch import grid

built = pytest.mark.skipif(
    not fused_module.available(), reason="the fused loops were not built: run `pip install -e .` (needs a C compiler)"
)


def long_grid(dtype: torch.dtype, epsilon: float) -> torch.Tensor:
    """The grid with nan and +-inf, repeated past PARALLEL_MIN to an odd length: threads split it unevenly."""
    base = torch.cat([torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype), grid(dtype, epsilon)])
    n = fused_module.PARALLEL_MIN + 4099
    return base.repeat(n // base.numel() + 1)[:n].contiguous()


# Each case runs ~1M elements through three paths and the float64 reference (1-3 s here): one quick case runs by
# default, the whole matrix with the slow tests.
CASES = [
    pytest.param(epsilon, form, dtype, threads, marks=() if (epsilon, dtype, threads) == (0.025, torch.float32, 2)
                 else pytest.mark.slow)
    for epsilon in (0.0025, 0.025, 0.5)
    for form in ("piecewise", "max")
    for dtype in (torch.float32, torch.float64)
    for threads in (1, 2, 3)
]


@built
@pytest.mark.parametrize(("epsilon", "form", "dtype", "threads"), CASES)
def test_fused_loops_match_the_reference_and_the_eager_path(epsilon, form, dtype, threads):
    x = long_grid(dtype, epsilon)
    z = x.double().numpy()
    k = epsilon * math.sqrt(2)
    out = torch.empty_like(x)
    assert fused_module.forward(x, out, k, form)  # the loops really take it
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, grad = values_and_grad(x, epsilon, form)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, y, rtol=0, atol=0, equal_nan=True)
    with np.errstate(invalid="ignore"):
        expected, expected_grad = sinerelu_reference(z, epsilon, form), sinerelu_grad_reference(z, epsilon, form)
    assert_same_specials_then_matches(y, expected, z, epsilon)
    # At z = -inf which branch of the max form "won" is moot (test_sinerelu_kernels.py); the eager path is the
    # judge there, below.
    finite_z = np.isfinite(z)
    assert_same_specials_then_matches(grad[torch.from_numpy(finite_z)], expected_grad[finite_z], z[finite_z], epsilon)
    with suspended():
        eager_y, eager_grad = values_and_grad(x, epsilon, form)
    finite = eager_y.isfinite()
    torch.testing.assert_close(y[finite], eager_y[finite], rtol=4 * torch.finfo(dtype).eps, atol=0)
    torch.testing.assert_close(grad.nan_to_num(), eager_grad.nan_to_num(), rtol=4 * torch.finfo(dtype).eps, atol=0)


@built
def test_in_place_channels_last_and_views_take_the_fused_loops():
    x = torch.randn(4, 3, 16, 16)
    expected = sinerelu_reference(x.numpy())
    channels_last = x.to(memory_format=torch.channels_last)
    np.testing.assert_allclose(sinerelu(channels_last).numpy(), expected, rtol=1e-6, atol=1e-9)
    inplace = x.clone()
    assert sinerelu(inplace, inplace=True) is inplace
    np.testing.assert_allclose(inplace.numpy(), expected, rtol=1e-6, atol=1e-9)
    strided = x[:, :, :, ::2]  # not dense: copied, then the loops
    np.testing.assert_allclose(sinerelu(strided).numpy(), expected[:, :, :, ::2], rtol=1e-6, atol=1e-9)


@built
def test_what_the_loops_do_not_take_stays_eager():
    k = 0.0025 * math.sqrt(2)
    half = torch.randn(100, dtype=torch.bfloat16)
    assert not fused_module.forward(half, torch.empty_like(half), k, "piecewise")
    x = torch.randn(100)
    assert not fused_module.forward(x[::2], torch.empty(50), k, "piecewise")  # strided
    assert not fused_module.backward(x, x.double(), torch.empty(100), k, 0.0, "piecewise")  # mixed dtypes
    with suspended():
        assert not fused_module.forward(x, torch.empty(100), k, "piecewise")
    np.testing.assert_allclose(sinerelu(half).float().numpy(), sinerelu_reference(half.float().numpy()), rtol=1e-2)


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@built
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_no_thread_outlives_a_call():
    x = torch.randn(fused_module.PARALLEL_MIN * 4, requires_grad=True)
    torch.set_num_threads(2)  # before counting: setting it starts a thread of torch's own (the test failed alone)
    torch.relu(x).sum().backward()  # torch's own pool starts here, not counted against the loops
    before = _os_threads()
    sinerelu(x).sum().backward()
    assert _os_threads() == before


def _lenet_like() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), SineReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 8), SineReLU(0.025),
        torch.nn.Linear(8, 3), SineReLU(0.025, form="max", inplace=True),
    )


@pytest.mark.slow  # dynamo tracing and aot_eager: ~7 s here
def test_torch_compile_sees_one_graph_with_no_break():
    import torch._dynamo

    torch.manual_seed(0)
    model = _lenet_like()
    x = torch.randn(5, 1, 8, 8)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-8)
    grads = torch.autograd.grad(compiled(x).sum(), list(model.parameters()))
    expected = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


def test_create_graph_gives_the_gradient_and_refuses_a_second_derivative():
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sinerelu(x).sum(), x, create_graph=True)
    np.testing.assert_allclose(grad.detach().numpy(), sinerelu_grad_reference(x.detach().numpy()), rtol=1e-12)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):  # never a silent zero
        grad.sum().backward()
