"""SineReLU's default CPU path: one fused C loop per direction (`_fused.c`), built once when the package is installed.

The eager path (`sinerelu.py`) runs six elementwise torch ops and numpy's sin or cos per cache-sized chunk; this runs
one loop (load, one transcendental, select, store) over the whole tensor, with glibc's vector sin/cos where the build
found them. `setup.py` builds it as an optional extension: where no C compiler was found the package installs without
it and SineReLU stays eager (`available()` says which). Nothing is compiled at import or on a call, no thread outlives
a call (large tensors are split over `torch.get_num_threads()` threads that end before it returns, so a fork never
meets a running pool), and importing it costs a shared-library load.

It takes contiguous CPU float32/float64 tensors of one dtype and size (whole tensors, or the flat views `sinerelu.py`
makes of dense ones in another memory order); anything else,
and the max form with epsilon*sqrt(2) > 1 in backward, stays eager. `kernels.suspended()` turns it off in a block.
Values: the eager path's maths (same clamp before the transcendental, same branch choice, nan and inf alike), within a
few ulps of it, since the sine is not numpy's: float32 on x86-64 with FMA uses `_fused.c`'s own (within 2 eps of the
float64 sine for every float32 argument it serves, tests/test_sinerelu_sine.py; `use_sine` switches), everything else
glibc's libmvec (<= 4 ulps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels

try:
    from . import _fused  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler, or a platform the build did not support
    _fused = None

__all__ = [
    "SINES",
    "available",
    "backward",
    "forward",
    "new_backward",
    "new_forward",
    "run_backward",
    "run_forward",
    "takes",
    "use_sine",
]

# The float32 loops' sine/cosine (float64 always uses libmvec): "libmvec" (glibc's vector sinf/cosf, or the libm),
# "own-avx2" / "own-avx512" (_fused.c's own, for x86-64 with FMA: the default where the CPU has it).
SINES = ("libmvec", "own-avx2", "own-avx512")

# Below this many elements (4 MiB of float32) one thread does the whole call. Starting and joining a thread costs
# ~20 us on a quiet core and far more when the cores are busy (DataLoader workers, other processes): on this shared
# 2-core machine two threads were slower than one at every size up to 600K elements. From 1M elements up each thread
# has >= ~0.25 ms of work, and at 16M the threads also share the first-touch page faults of the output.
PARALLEL_MIN = 1 << 20
_DTYPES = (torch.float32, torch.float64)


def available() -> bool:
    """Whether the fused loops were built with this installation (`pip install` found a C compiler)."""
    return _fused is not None


def use_sine(name: str | None = None) -> str:
    """The float32 sine now in use (one of SINES); with `name`, switch to it (or to the best this CPU has below it)
    and return the previous one. For tests and benchmarks that compare the two; the default is the best."""
    if _fused is None:
        raise RuntimeError("the fused loops were not built")
    previous = _fused.set_sine(-1 if name is None else SINES.index(name))
    return SINES[previous]


def takes(x: Tensor) -> bool:
    """Whether the loops can take `x` as it is: a contiguous CPU float32/float64 tensor, outside `suspended()`."""
    # Cheap checks only: this runs on every call, small tensors included (`is_cpu`, not `device.type`).
    return _fused is not None and x.is_cpu and x.dtype in _DTYPES and x.is_contiguous() and not kernels.is_suspended()


def new_forward(x: Tensor, k: float, form: str) -> Tensor | None:
    """SineReLU(x) in a new tensor, or None when the loops do not take `x` (as `takes`): the whole default forward in
    one call, since small tensors are many and each Python step costs ~0.1-1 us next to a ~2 us loop."""
    if _fused is None or not x.is_cpu or x.dtype not in _DTYPES or not x.is_contiguous() or kernels.is_suspended():
        return None
    out = torch.empty_like(x)
    n = x.numel()
    _fused.forward(x.data_ptr(), out.data_ptr(), n, k, x.dtype == torch.float64, form == "max", _threads(n))
    return out


def new_backward(x: Tensor, grad: Tensor, k: float) -> Tensor | None:
    """grad * SineReLU'(x) (piecewise form) in a new tensor, or None when the loops do not take both (as `backward`)."""
    if (
        _fused is None
        or not x.is_cpu
        or x.dtype not in _DTYPES
        or grad.dtype != x.dtype
        or not x.is_contiguous()
        or not grad.is_contiguous()
        or not grad.is_cpu
        or kernels.is_suspended()
    ):
        return None
    out = torch.empty_like(x)
    n = x.numel()
    _fused.backward(
        x.data_ptr(), grad.data_ptr(), out.data_ptr(), n, k, 0.0, x.dtype == torch.float64, False, _threads(n)
    )
    return out


def _threads(n: int) -> int:
    return torch.get_num_threads() if n >= PARALLEL_MIN else 1


def forward(src: Tensor, dst: Tensor, k: float, form: str) -> bool:
    """dst = SineReLU(src) (`k` = epsilon*sqrt(2); dst may be src); False, doing nothing, when it does not apply."""
    if not (takes(src) and _like(dst, src)):
        return False
    run_forward(src, dst, k, form)
    return True


def backward(src: Tensor, grad: Tensor, dst: Tensor, k: float, crossing: float, form: str) -> bool:
    """dst = grad * SineReLU'(src), the linear branch starting at `crossing`; False when it does not apply."""
    if not (takes(src) and _like(grad, src) and _like(dst, src)):
        return False
    run_backward(src, grad, dst, k, crossing, form)
    return True


def _like(t: Tensor, src: Tensor) -> bool:
    return t.dtype == src.dtype and t.is_cpu and t.is_contiguous() and t.numel() == src.numel()


def run_forward(src: Tensor, dst: Tensor, k: float, form: str) -> None:
    """`forward` for tensors already known to qualify (`takes(src)`, dst contiguous, same dtype and size)."""
    n = src.numel()
    _fused.forward(src.data_ptr(), dst.data_ptr(), n, k, src.dtype == torch.float64, form == "max", _threads(n))


def run_backward(src: Tensor, grad: Tensor, dst: Tensor, k: float, crossing: float, form: str) -> None:
    """`backward` for tensors already known to qualify."""
    n = src.numel()
    _fused.backward(
        src.data_ptr(),
        grad.data_ptr(),
        dst.data_ptr(),
        n,
        k,
        crossing,
        src.dtype == torch.float64,
        form == "max",
        _threads(n),
    )
