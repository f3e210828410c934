"""PyTorch SineReLU against the numpy reference: values, gradients, in-place, dtypes, layouts, chunking."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from deadneuron import DeadNeuronError, sinerelu_reference
from deadneuron.core.sinerelu import sinerelu_grad_reference
from deadneuron.torch import SineReLU, sinerelu

impl = importlib.import_module("deadneuron.torch.sinerelu")  # the attribute `sinerelu` is the function

EPSILONS = [0.0025, 0.025, 0.5]
FORMS = ["piecewise", "max"]
FLOATS = [torch.float32, torch.float64]


def crossing(epsilon: float) -> float:
    """The max form's crossing point z* (eps*(sin z - cos z) = z), in float64."""
    lo, hi = -(epsilon * math.sqrt(2) + 1), 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if epsilon * (math.sin(mid) - math.cos(mid)) <= mid else (mid, hi)
    return hi


def grid(dtype: torch.dtype, epsilon: float) -> torch.Tensor:
    """A dense grid over [-10, 10], the band (-0.01, 0.01), both zeros, and the ulps around z*."""
    np_dtype = np.float32 if dtype != torch.float64 else np.float64
    z_star = np_dtype(crossing(epsilon))
    around = [z_star]
    for direction in (np.inf, -np.inf):
        t = z_star
        for _ in range(4):
            t = np.nextafter(t, np_dtype(direction))
            around.append(t)
    parts = [
        np.linspace(-10, 10, 20_001),
        np.linspace(-0.01, 0.01, 2_001),
        np.array([0.0, -0.0, 1e-30, -1e-30, 50.0, -50.0]),
        np.array(around, dtype=np.float64),
    ]
    return torch.from_numpy(np.concatenate(parts).astype(np_dtype)).to(dtype)


def allowed_error(z: np.ndarray, expected: np.ndarray, epsilon: float, dtype: torch.dtype) -> np.ndarray:
    """Rounding slack: a few units in the last place of the result, plus the rounding of z - pi/4 that the
    sine branch amplifies by eps*sqrt(2), plus underflow (a subnormal epsilon)."""
    finfo = torch.finfo(dtype)
    return 4 * finfo.eps * (np.abs(expected) + epsilon * math.sqrt(2) * (np.abs(z) + 1)) + finfo.tiny


def assert_matches(actual: torch.Tensor, expected: np.ndarray, z: np.ndarray, epsilon: float) -> None:
    got = actual.detach().double().numpy()
    bound = allowed_error(z, expected, epsilon, actual.dtype)
    error = np.abs(got - expected)
    worst = int(np.argmax(error - bound))
    assert np.all(error <= bound), f"z={z[worst]!r}: got {got[worst]!r}, expected {expected[worst]!r}"


def value_and_grad(x: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_()
    y = sinerelu(leaf, **kwargs)  # type: ignore[arg-type]
    (grad,) = torch.autograd.grad(y.sum(), leaf)
    return y.detach(), grad


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("epsilon", EPSILONS)
def test_values_and_gradients_match_the_reference(epsilon, form, dtype):
    x = grid(dtype, epsilon)
    z = x.double().numpy()
    y, grad = value_and_grad(x, epsilon=epsilon, form=form)
    assert y.dtype == grad.dtype == dtype
    assert_matches(y, sinerelu_reference(z, epsilon, form), z, epsilon)
    # The backward picks the max form's branch on the reference's own terms, so gradients match everywhere,
    # the ulps around the crossing included.
    assert_matches(grad, sinerelu_grad_reference(z, epsilon, form), z, epsilon)
    # Without autograd the same kernel runs with no Function around it.
    with torch.no_grad():
        assert torch.equal(sinerelu(x, epsilon, form), y)


@pytest.mark.parametrize("epsilon", EPSILONS)
def test_zero_is_minus_epsilon_and_the_jump(epsilon):
    y = sinerelu(torch.tensor([0.0, -0.0, 1e-7], dtype=torch.float64), epsilon)
    assert y[0].item() == pytest.approx(-epsilon, rel=1e-15)
    assert y[1].item() == pytest.approx(-epsilon, rel=1e-15)
    assert y[2].item() == 1e-7
    # keras-contrib's max form has no jump: max(-eps, 0) = 0.
    assert sinerelu(torch.tensor([0.0]), epsilon, "max").item() == 0.0


def test_large_epsilon_max_form_compares_branches_elementwise():
    # eps*sqrt(2) > 1: the sine branch can win at positive z (and at several places), so no single threshold.
    epsilon = 1.5
    x = torch.linspace(-10, 10, 4001, dtype=torch.float64)
    z = x.numpy()
    y, grad = value_and_grad(x, epsilon=epsilon, form="max")
    assert (sinerelu_reference(z, epsilon, "max")[z > 0] > z[z > 0]).any()
    assert_matches(y, sinerelu_reference(z, epsilon, "max"), z, epsilon)
    assert_matches(grad, sinerelu_grad_reference(z, epsilon, "max"), z, epsilon)


def test_non_finite_inputs_follow_the_reference():
    x = torch.tensor([math.inf, -math.inf, math.nan, 1.0])
    y, grad = value_and_grad(x, epsilon=0.025)
    with np.errstate(invalid="ignore"):
        expected = sinerelu_reference(x.numpy(), 0.025)
        expected_grad = sinerelu_grad_reference(x.numpy(), 0.025)
    np.testing.assert_array_equal(y.numpy(), expected.astype(np.float32))
    np.testing.assert_array_equal(grad.numpy(), expected_grad.astype(np.float32))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("epsilon", EPSILONS)
def test_gradcheck_away_from_the_jump_and_the_crossing(epsilon, form):
    generator = torch.Generator().manual_seed(0)
    x = torch.empty(64, dtype=torch.float64).uniform_(-6, 6, generator=generator)
    kink = 0.0 if form == "piecewise" else crossing(epsilon)
    x = torch.where((x - kink).abs() < 1e-2, x + 0.1, x).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sinerelu(t, epsilon, form), (x,))
    assert torch.autograd.gradcheck(lambda t: sinerelu(t.clone(), epsilon, form, inplace=True), (x,))
    # also through a dense non-contiguous layout
    square = x.detach()[:64].reshape(8, 8).t().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sinerelu(t, epsilon, form), (square,))


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    values=arrays(np.float32, st.integers(1, 300), elements=finite),
    epsilon=st.floats(0.0, 1.0),
    form=st.sampled_from(FORMS),
)
def test_property_parity_and_bounds(values, epsilon, form):
    z = values.astype(np.float64)
    y, grad = value_and_grad(torch.from_numpy(values), epsilon=epsilon, form=form)
    assert_matches(y, sinerelu_reference(z, epsilon, form), z, epsilon)
    out = y.double().numpy()
    k = epsilon * math.sqrt(2) * (1 + 1e-6)
    if form == "piecewise":
        assert np.all(out[z > 0] == z[z > 0])  # identity, bit for bit
        assert np.all(np.abs(out[z <= 0]) <= k)
        assert np.all(grad.numpy()[z > 0] == 1.0)
    else:
        assert np.all(out >= z)
        assert np.all(np.abs(out[z <= 0]) <= k)


def count_packs(fn) -> int:
    packs = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packs.append(t) or t, lambda t: t):
        fn()
    return len(packs)


@pytest.mark.parametrize("form", FORMS)
def test_backward_saves_one_tensor(form):
    x = torch.randn(1000, requires_grad=True)
    assert count_packs(lambda: sinerelu(x, 0.025, form)) == 1
    assert count_packs(lambda: sinerelu(x.clone(), 0.025, form, inplace=True)) == 1
    with torch.no_grad():
        assert count_packs(lambda: sinerelu(x, 0.025, form)) == 0


@pytest.mark.parametrize("form", FORMS)
def test_inplace_matches_out_of_place(form):
    x = torch.randn(3, 50, dtype=torch.float64)
    y, grad = value_and_grad(x, epsilon=0.025, form=form)
    leaf = x.clone().requires_grad_()
    inter = leaf * 1.0  # in-place needs a non-leaf, as for relu_
    out = sinerelu(inter, 0.025, form, inplace=True)
    assert out is inter
    assert torch.equal(out.detach(), y)
    (grad_inplace,) = torch.autograd.grad(out.sum(), leaf)
    assert torch.equal(grad_inplace, grad)
    # no autograd: the very tensor is overwritten
    plain = x.clone()
    pointer = plain.data_ptr()
    assert sinerelu(plain, 0.025, form, inplace=True) is plain
    assert plain.data_ptr() == pointer and torch.equal(plain, y)


def test_inplace_on_a_strided_view_under_autograd():
    def through_view(a: torch.Tensor) -> torch.Tensor:
        y = a * 1.0
        sinerelu(y[:, ::2], 0.5, inplace=True)  # the view is not dense: computed on a copy, written back
        return y

    a = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a = torch.where(a.abs() < 1e-2, a + 0.1, a).requires_grad_()
    assert torch.autograd.gradcheck(through_view, (a,))


def test_inplace_on_a_leaf_that_requires_grad_is_refused_like_relu():
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        sinerelu(x, inplace=True)


def small_net(activation: type[nn.Module] | None = None, **kwargs: object) -> nn.Sequential:
    torch.manual_seed(0)
    act = (lambda: activation(**kwargs)) if activation else (lambda: nn.ReLU(inplace=True))
    layers = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), act(), nn.Conv2d(8, 4, 3), act(), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(4 * 4 * 4, 3))


def test_replaces_inplace_relu_in_a_net():
    reference = small_net(SineReLU, epsilon=0.025, inplace=False)
    net = small_net()
    for index, module in enumerate(net):
        if isinstance(module, nn.ReLU):
            net[index] = SineReLU(epsilon=0.025, inplace=True)
    x = torch.randn(5, 3, 8, 8)
    grads = []
    for model in (reference, net):
        model.train()
        loss = model(x).square().sum()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def two_layer_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 8), SineReLU(0.025, form="max"), nn.Linear(8, 2), SineReLU(inplace=True)
    )


def test_module_round_trips_through_save_and_state_dict(tmp_path):
    model = two_layer_model()
    x = torch.randn(3, 4)
    expected = model(x)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)  # our own file, written just above
    assert repr(loaded[1]) == "SineReLU(epsilon=0.025, form='max')"
    assert repr(loaded[3]) == "SineReLU(epsilon=0.0025, inplace=True)"
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    fresh = two_layer_model()
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", FORMS)
def test_half_precision(dtype, form):
    epsilon = 0.025
    x = grid(dtype, epsilon)[::7]
    z = x.double().numpy()
    y, grad = value_and_grad(x, epsilon=epsilon, form=form)
    assert y.dtype == grad.dtype == dtype
    assert_matches(y, sinerelu_reference(z, epsilon, form), z, epsilon)
    assert_matches(grad, sinerelu_grad_reference(z, epsilon, form), z, epsilon)
    inplace = x.clone()
    sinerelu(inplace, epsilon, form, inplace=True)
    assert torch.equal(inplace, y)


def test_non_contiguous_inputs():
    base = torch.randn(6, 8, 10, 12)
    expected = sinerelu(base.contiguous(), 0.025)
    channels_last = base.contiguous(memory_format=torch.channels_last)
    out = sinerelu(channels_last, 0.025)
    assert out.is_contiguous(memory_format=torch.channels_last)  # no copy: the layout is kept
    assert torch.equal(out, expected)
    assert torch.equal(sinerelu(base.transpose(1, 3), 0.025), expected.transpose(1, 3))
    assert torch.equal(sinerelu(base[:, ::2, 1:], 0.025), expected[:, ::2, 1:])
    # in place on a strided view writes through to its base and nothing else
    work = base.clone()
    sinerelu(work[:, ::2], 0.025, inplace=True)
    assert torch.equal(work[:, ::2], expected[:, ::2]) and torch.equal(work[:, 1::2], base[:, 1::2])
    # an upstream gradient with other strides than the input
    leaf = channels_last.clone().requires_grad_()
    upstream = torch.randn(6, 12, 10, 8).transpose(1, 3)
    (grad,) = torch.autograd.grad(sinerelu(leaf, 0.025), leaf, upstream)
    reference = sinerelu_grad_reference(base.double().numpy(), 0.025) * upstream.double().numpy()
    np.testing.assert_allclose(grad.double().numpy(), reference, rtol=1e-6, atol=1e-7)
    assert sinerelu(torch.tensor(-1.0), 0.5).shape == ()
    assert sinerelu(torch.empty(0, 3)).shape == (0, 3)


@pytest.mark.parametrize("form", FORMS)
def test_chunked_path_equals_the_small_path(form):
    chunk = impl.CHUNK_ELEMENTS
    x = torch.randn(3 * chunk + 123, generator=torch.Generator().manual_seed(1))
    upstream = torch.randn_like(x)
    leaf = x.clone().requires_grad_()
    y = sinerelu(leaf, 0.025, form)
    (grad,) = torch.autograd.grad(y, leaf, upstream)
    pieces = torch.split(torch.arange(x.numel()), 1000)  # far below one chunk: one pass each
    small = torch.cat([sinerelu(x[i], 0.025, form) for i in pieces])
    small_grad = torch.cat([impl._backward(x[i], upstream[i], 0.025, form) for i in pieces])
    torch.testing.assert_close(y.detach(), small, rtol=2e-7, atol=1e-10)
    torch.testing.assert_close(grad, small_grad, rtol=2e-7, atol=1e-10)


@pytest.mark.parametrize("form", FORMS)
def test_traced_composition_has_the_same_values_and_gradients(form):
    # What torch.compile and torch.export see instead of the chunked Function.
    x = grid(torch.float64, 0.025)
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(impl._traceable(leaf, 0.025, form).sum(), leaf)
    z = x.numpy()
    assert_matches(impl._traceable(x, 0.025, form), sinerelu_reference(z, 0.025, form), z, 0.025)
    keep = np.abs(z - (0.0 if form == "piecewise" else crossing(0.025))) > 1e-12  # maximum splits ties
    np.testing.assert_allclose(grad.numpy()[keep], sinerelu_grad_reference(z, 0.025, form)[keep], rtol=1e-12)


def test_export_traces_the_composition():
    model = nn.Sequential(nn.Linear(4, 4), SineReLU(0.025))
    x = torch.randn(2, 4)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": -0.1}, "finite and >= 0"),
        ({"epsilon": math.nan}, "finite and >= 0"),
        ({"epsilon": math.inf}, "finite and >= 0"),
        ({"epsilon": "0.1"}, "must be a number"),
        ({"epsilon": True}, "must be a number"),
        ({"form": "tanh"}, "unknown SineReLU form 'tanh'; expected one of piecewise, max"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(DeadNeuronError, match=match):
        sinerelu(torch.zeros(2), **kwargs)
    with pytest.raises(DeadNeuronError, match=match):
        SineReLU(**kwargs)


def test_integer_input_is_refused():
    with pytest.raises(DeadNeuronError, match="floating-point tensor; received dtype torch.int64"):
        sinerelu(torch.arange(3))


def test_docstrings_run():
    result = doctest.testmod(impl, extraglobs={"torch": torch})
    assert result.attempted >= 2 and result.failed == 0


def test_numpy_and_integer_epsilons_are_accepted():
    assert SineReLU(np.float32(0.5)).epsilon == 0.5
    assert SineReLU(0).epsilon == 0.0
    torch.testing.assert_close(sinerelu(torch.tensor([-1.0, 2.0]), 0), torch.tensor([0.0, 2.0]))


def test_pooled_scratch_survives_inference_mode_threads_and_reuse():
    # The CPU scratch vectors are pooled per thread; the first ones may be made inside inference mode and must still
    # be writable outside it, and threads must not share them.
    import threading

    x = torch.randn(3 * impl.CHUNK_ELEMENTS + 5)
    z_ref = x.double().numpy()
    expected = sinerelu_reference(z_ref, 0.025)
    failures: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            with torch.inference_mode():
                y = sinerelu(x, 0.025)
            for _ in range(5):
                leaf = x.clone().requires_grad_()
                z = sinerelu(leaf, 0.025)
                (grad,) = torch.autograd.grad(z.sum(), leaf)
                assert_matches(z, expected, z_ref, 0.025)
                assert_matches(grad, sinerelu_grad_reference(z_ref, 0.025), z_ref, 0.025)
            assert_matches(y, expected, z_ref, 0.025)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_the_scratch_pool_stays_bounded_however_many_threads_call():
    import threading

    from deadneuron.torch import pool

    x = torch.randn(impl.CHUNK_ELEMENTS + 1)
    barrier = threading.Barrier(12)

    def work() -> None:
        barrier.wait()
        for _ in range(3):
            sinerelu(x.clone().requires_grad_()).sum().backward()

    threads = [threading.Thread(target=work) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kept = pool._free[(torch.float32, impl.CHUNK_ELEMENTS)]
    assert 0 < len(kept) <= pool.KEPT
    assert len({vector.data_ptr() for vector in kept}) == len(kept)  # no vector is in the pool twice
