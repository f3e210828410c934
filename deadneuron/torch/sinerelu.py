"""SineReLU for PyTorch (design.md, "SineReLU"): `sinerelu` and the module `SineReLU`.

f(z) = z for z > 0 and eps*(sin z - cos z) = eps*sqrt(2)*sin(z - pi/4) for z <= 0, so f(0) = -eps;
`form="max"` is keras-contrib's max(eps*(sin z - cos z), z).

How it is fast in eager PyTorch (numbers in docs/benchmarks.md): on CPU the naive
`torch.where(x > 0, x, eps*(sin - cos))` spends most of its time allocating and page-faulting full-size
temporaries and in `torch.where`. Here a 1-D view of the input is processed in chunks that fit in L2, with a
few chunk-sized scratch buffers reused for the whole tensor, every op writing through `out=` or in place, and
branch selection done by multiplying with 0/1 float masks. Only the output (and in backward the gradient) is
allocated at full size, as for torch.relu. One transcendental per element per pass: sin(z - pi/4) forward,
cos(z - pi/4) backward. The backward recomputes from the saved input, the only tensor saved.

By default CPU float32/float64 tensors skip all that: one fused C loop per direction, built at install time
(`fused.py`, `_fused.c`), takes the whole tensor. `deadneuron.torch.compile_kernels()` (opt-in, older, `kernels.py`)
builds TorchInductor kernels that, once built, are asked first. This eager path runs whatever neither takes (other
dtypes and devices, an install without a C compiler, after a failure, or inside `kernels.suspended()`).

On other devices the same ops run on the whole tensor at once (chunking only helps a CPU cache), and under
torch.compile/torch.export a plain composition is traced instead, which the compiler fuses itself.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.overrides import handle_torch_function, has_torch_function_unary

from ..core.sinerelu import DEFAULT_EPSILON, Form, check_form
from ..core.sinerelu import check_epsilon as _check_epsilon
from ..core.sinerelu import max_form_crossing as _max_form_crossing
from ..errors import DeadNeuronError
from . import fused, kernels
from .pool import scratch_vectors

__all__ = ["SineReLU", "sinerelu"]

_QUARTER_PI = math.pi / 4
_SQRT2 = math.sqrt(2.0)
# 256K elements: each of the two threads works on 128K-element halves of a chunk, so its share of the
# input, scratch, mask and output chunks (4 x 512 KiB) stays in its 2 MiB L2 on this machine, and there are
# few enough ops per tensor (64 chunks x 6 ops for 16M elements) that per-op dispatch and the OpenMP
# hand-off between threads stay small next to the memory traffic. It beat 64K in interleaved runs here;
# 128K to 2M were within the noise of a shared machine.
CHUNK_ELEMENTS = 1 << 18
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES = (torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in _HALF_DTYPES:
        # Half types compute in float32 (as PyTorch's own kernels do): z - pi/4 in bfloat16 would lose most of
        # the negative branch's digits.
        return torch.float32
    if not dtype.is_floating_point:
        raise DeadNeuronError(
            f"SineReLU needs a floating-point tensor; received dtype {dtype}; convert the input with .float()"
        )
    return dtype


def _memory_order(t: Tensor) -> tuple[int, ...] | None:
    """Permutation of dims that lists `t`'s elements in memory order, or None when `t` is not dense.

    Dense non-contiguous tensors (channels_last feature maps, transposes) are then processed without a copy.
    """
    if t.is_contiguous():
        return tuple(range(t.dim()))
    strides, sizes = t.stride(), t.shape
    perm = tuple(sorted(range(t.dim()), key=lambda d: (-strides[d], -sizes[d])))
    return perm if t.permute(perm).is_contiguous() else None


def _flat(t: Tensor, perm: tuple[int, ...]) -> Tensor:
    # reshape, not view: a gradient may come with other strides than the input; it is copied into order then.
    if t.is_contiguous() and perm == tuple(range(t.dim())):
        return t.view(-1)  # the common case, without permute's cost on small tensors
    return t.permute(perm).reshape(-1)


# numpy's SIMD sin/cos for float32 and float64 run ~2.4x faster than torch's CPU kernels on one thread here
# (8.9 ms against 21 ms for 16M float32 elements; torch on 2 threads: 14.5 ms), and they are the dominant cost
# of SineReLU on CPU. The scratch chunk is shared with numpy without a copy.
_NUMPY_DTYPES = (torch.float32, torch.float64)


def _sin_(s: Tensor) -> Tensor:
    if s.device.type == "cpu" and s.dtype in _NUMPY_DTYPES:
        view = s.numpy()
        with np.errstate(invalid="ignore"):  # sin(-inf) is nan, as in torch, which does not warn
            np.sin(view, out=view)
        return s
    return s.sin_()


def _cos_(s: Tensor) -> Tensor:
    if s.device.type == "cpu" and s.dtype in _NUMPY_DTYPES:
        view = s.numpy()
        with np.errstate(invalid="ignore"):  # cos(-inf) is nan, as in torch, which does not warn
            np.cos(view, out=view)
        return s
    return s.cos_()


def _chunk_size(t: Tensor) -> int:
    return min(t.numel(), CHUNK_ELEMENTS) if t.device.type == "cpu" else t.numel()


def _forward_flat(src: Tensor, dst: Tensor, epsilon: float, form: str) -> None:
    """dst = SineReLU(src) for 1-D tensors of one length; dst may be src (in place)."""
    n = src.numel()
    if n == 0:
        return
    k = epsilon * math.sqrt(2.0)
    done = kernels.forward(src, dst, k, form)  # whole pieces, when compile_kernels() has built a kernel
    if not done and fused.forward(src, dst, k, form):
        return
    if done:
        src, dst, n = src[done:], dst[done:], n - done
        if n == 0:
            return
    ctype = _compute_dtype(src.dtype)
    upcast = ctype != src.dtype
    chunk = _chunk_size(src)
    count = 1 + (form == "piecewise") + 2 * upcast
    with scratch_vectors(count, chunk, CHUNK_ELEMENTS, ctype, src.device) as taken:
        scratch = taken[0]
        mask = taken[1] if form == "piecewise" else None
        src_buf, dst_buf = (taken[-2], taken[-1]) if upcast else (None, None)
        _forward_chunks(src, dst, k, n, chunk, scratch, mask, src_buf, dst_buf)


def _forward_chunks(
    src: Tensor, dst: Tensor, k: float, n: int, chunk: int, scratch: Tensor, mask: Tensor | None,
    src_buf: Tensor | None, dst_buf: Tensor | None,
) -> None:
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m = stop - start
        z, out, s = src[start:stop], dst[start:stop], scratch[:m]
        if src_buf is not None and dst_buf is not None:
            z = src_buf[:m].copy_(z)
            out = dst_buf[:m]
        if mask is None:
            torch.sub(z, _QUARTER_PI, out=s)
            _sin_(s).mul_(k)
            torch.maximum(s, z, out=out)
        else:
            q = mask[:m]
            # The sine sees min(z, 0): +inf must not become sin(inf) = nan, which the mask cannot zero.
            torch.clamp(z, max=0.0, out=s)
            _sin_(s.sub_(_QUARTER_PI))
            torch.le(z, 0.0, out=q)
            # out may alias z: z is read for the last time here.
            torch.clamp(z, min=0.0, out=out)
            out.addcmul_(s, q, value=k)
        if dst_buf is not None:
            dst[start:stop].copy_(out)


def _backward_flat(src: Tensor, grad: Tensor, dst: Tensor, epsilon: float, form: str) -> None:
    """dst = grad * SineReLU'(src) for 1-D tensors of one length."""
    n = src.numel()
    if n == 0:
        return
    k = epsilon * math.sqrt(2.0)
    ctype = _compute_dtype(src.dtype)
    upcast = ctype != src.dtype or grad.dtype != src.dtype
    crossing = 0.0 if form == "piecewise" else _max_form_crossing(epsilon, ctype)
    if crossing is not None:
        done = kernels.backward(src, grad, dst, k, crossing, form)
        if not done and fused.backward(src, grad, dst, k, crossing, form):
            return
        if done:
            src, grad, dst, n = src[done:], grad[done:], dst[done:], n - done
            if n == 0:
                return
    chunk = _chunk_size(src)
    count = 3 + (crossing is None) + 3 * upcast
    with scratch_vectors(count, chunk, CHUNK_ELEMENTS, ctype, src.device) as taken:
        scratch, linear, sine = taken[:3]
        branch = taken[3] if crossing is None else None
        src_buf, grad_buf, dst_buf = (taken[-3], taken[-2], taken[-1]) if upcast else (None, None, None)
        _backward_chunks(
            src, grad, dst, k, n, chunk, crossing, form, scratch, linear, sine, branch, src_buf, grad_buf, dst_buf
        )


def _backward_chunks(
    src: Tensor, grad: Tensor, dst: Tensor, k: float, n: int, chunk: int, crossing: float | None, form: str,
    scratch: Tensor, linear: Tensor, sine: Tensor, branch: Tensor | None,
    src_buf: Tensor | None, grad_buf: Tensor | None, dst_buf: Tensor | None,
) -> None:
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m = stop - start
        z, g, out = src[start:stop], grad[start:stop], dst[start:stop]
        s, p, q = scratch[:m], linear[:m], sine[:m]
        if src_buf is not None and grad_buf is not None and dst_buf is not None:
            z, g, out = src_buf[:m].copy_(z), grad_buf[:m].copy_(g), dst_buf[:m]
        if crossing is None:
            # Max form with k > 1: the winner is not a threshold on z, so recompute the sine branch.
            h = branch[:m]  # type: ignore[index]
            torch.sub(z, _QUARTER_PI, out=h)
            _sin_(h).mul_(k)
            torch.sub(z, _QUARTER_PI, out=s)
            torch.ge(z, h, out=p)
            torch.lt(z, h, out=q)
        else:
            # Where the linear branch wins the sine branch is masked out, so clamping its argument changes
            # nothing there and keeps +inf away from cos (nan * 0 is nan).
            torch.clamp(z, max=crossing, out=s)
            s.sub_(_QUARTER_PI)
            if form == "piecewise":
                torch.gt(z, 0.0, out=p)
                torch.le(z, 0.0, out=q)
            else:
                torch.ge(z, crossing, out=p)
                torch.lt(z, crossing, out=q)
        _cos_(s)
        # p + k*cos*q picks 1 or k*cos(z - pi/4) exactly (the masks are 0/1), with no torch.where.
        p.addcmul_(s, q, value=k)
        torch.mul(g, p, out=out)
        if dst_buf is not None:
            dst[start:stop].copy_(out)


def _forward(x: Tensor, epsilon: float, form: str) -> Tensor:
    # The common case first, in the fewest Python steps (small tensors are many); compiled kernels, when asked for,
    # come first in _forward_flat.
    if not kernels.built_any():
        out = fused.new_forward(x, epsilon * _SQRT2, form)
        if out is not None:
            return out
    perm = _memory_order(x)
    if perm is None:
        x = x.contiguous()
        perm = tuple(range(x.dim()))
    out = torch.empty_like(x)  # preserve_format: a dense input's strides, so the same perm flattens it
    _forward_flat(_flat(x, perm), _flat(out, perm), epsilon, form)
    return out


def _forward_inplace(x: Tensor, epsilon: float, form: str) -> None:
    perm = _memory_order(x)
    if perm is not None:
        flat = _flat(x, perm)
        _forward_flat(flat, flat, epsilon, form)
        return
    # A non-dense view (a slice of a larger tensor): compute on a dense copy, then write back.
    dense = x.contiguous()
    flat = dense.view(-1)
    _forward_flat(flat, flat, epsilon, form)
    x.copy_(dense)


def _backward(x: Tensor, grad: Tensor, epsilon: float, form: str) -> Tensor:
    if form == "piecewise" and not kernels.built_any():  # as _forward
        grad_input = fused.new_backward(x, grad, epsilon * _SQRT2)
        if grad_input is not None:
            return grad_input
    perm = _memory_order(x)
    if perm is None:
        x = x.contiguous()
        perm = tuple(range(x.dim()))
    grad_input = torch.empty_like(x, dtype=grad.dtype)
    _backward_flat(_flat(x, perm), _flat(grad, perm), _flat(grad_input, perm), epsilon, form)
    return grad_input


class _SineReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, epsilon: float, form: str) -> Tensor:
        ctx.save_for_backward(x)
        ctx.epsilon, ctx.form = epsilon, form  # type: ignore[attr-defined]
        return _forward(x, epsilon, form)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is refused, as once_differentiable does
            return _backward_once(ctx, grad)
        # The common case skips once_differentiable's wrapper: the engine already runs this without grad mode.
        (x,) = ctx.saved_tensors
        return _backward(x, grad, ctx.epsilon, ctx.form), None, None


@once_differentiable
def _backward_once(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
    (x,) = ctx.saved_tensors
    return _backward(x, grad, ctx.epsilon, ctx.form), None, None


class _SineReLUInplaceFunction(torch.autograd.Function):
    """In-place SineReLU under autograd.

    The backward needs the input, and the negative branch cannot be inverted from the output (sin is not
    one-to-one), so the input is kept as a copy: the one saved tensor, made before it is overwritten. Under
    autograd in-place therefore saves no memory over out-of-place (the input of an out-of-place call is kept
    alive for backward just the same); it exists so that SineReLU(inplace=True) can replace
    nn.ReLU(inplace=True) anywhere. Without autograd it writes into the input with no full-size allocation.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, epsilon: float, form: str) -> Tensor:
        saved = x.clone()
        _forward_inplace(x, epsilon, form)
        ctx.mark_dirty(x)
        ctx.save_for_backward(saved)
        ctx.epsilon, ctx.form = epsilon, form  # type: ignore[attr-defined]
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return _backward(x, grad, ctx.epsilon, ctx.form), None, None


def _traceable(x: Tensor, epsilon: float, form: str) -> Tensor:
    # Under torch.compile/export: a composition the compiler fuses into one kernel; autograd's derivative of
    # it is SineReLU's (clamp passes the gradient at its bound, so f'(0) = eps, as in the Function).
    k = epsilon * math.sqrt(2.0)
    if form == "max":
        return torch.maximum(k * torch.sin(x - _QUARTER_PI), x)
    return torch.where(x > 0, x, k * torch.sin(torch.clamp(x, max=0.0) - _QUARTER_PI))


def sinerelu(
    x: Tensor, epsilon: float = DEFAULT_EPSILON, form: Form = "piecewise", inplace: bool = False
) -> Tensor:
    """SineReLU of `x`: z for z > 0, epsilon*(sin z - cos z) for z <= 0 (`form="max"`: keras-contrib's max).

    Any floating dtype and device; gradients flow through a custom backward that saves only the input.

    >>> sinerelu(torch.tensor([1.0, 0.0]), epsilon=0.5)
    tensor([ 1.0000, -0.5000])
    """
    return _apply(x, _check_epsilon(epsilon), check_form(form), inplace)


def _apply(x: Tensor, epsilon: float, form: str, inplace: bool) -> Tensor:
    """`sinerelu` with epsilon and form already checked (the module checks them once, in __init__)."""
    if x.dtype not in _FLOAT_DTYPES:
        _compute_dtype(x.dtype)  # refuses integer tensors
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        if inplace:
            # The clone is what the composition's backward keeps: x itself is overwritten here (as the eager
            # in-place Function keeps a copy); the compiler folds the copies into its fused loop.
            return x.copy_(_traceable(x.clone(), epsilon, form))
        return _traceable(x, epsilon, form)
    if has_torch_function_unary(x):
        # One call that a TorchFunctionMode (a scan's functional sites) or a tensor subclass sees whole, so that a
        # functional SineReLU is a site and its internal chunk ops are not taken for activations.
        return handle_torch_function(sinerelu, (x,), x, epsilon, form, inplace)  # type: ignore[no-any-return, arg-type]
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if inplace:
        if needs_grad:
            return _SineReLUInplaceFunction.apply(x, epsilon, form)  # type: ignore[no-any-return]
        _forward_inplace(x, epsilon, form)
        return x
    if needs_grad:
        return _SineReLUFunction.apply(x, epsilon, form)  # type: ignore[no-any-return]
    return _forward(x, epsilon, form)


class SineReLU(nn.Module):
    """SineReLU as a module; `inplace=True` makes it a drop-in for nn.ReLU(inplace=True).

    >>> SineReLU(epsilon=0.025)
    SineReLU(epsilon=0.025)
    """

    def __init__(
        self, epsilon: float = DEFAULT_EPSILON, form: Form = "piecewise", inplace: bool = False
    ) -> None:
        super().__init__()
        self.epsilon = _check_epsilon(epsilon)
        self.form: Form = check_form(form)  # type: ignore[assignment]
        self.inplace = bool(inplace)

    def forward(self, x: Tensor) -> Tensor:
        return _apply(x, self.epsilon, self.form, self.inplace)

    def extra_repr(self) -> str:
        parts = [f"epsilon={self.epsilon}"]
        if self.form != "piecewise":
            parts.append(f"form={self.form!r}")
        if self.inplace:
            parts.append("inplace=True")
        return ", ".join(parts)
