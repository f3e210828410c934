"""Compiled CPU kernels for SineReLU: opt-in, built when asked, never on a call.

Superseded as the fast path by the fused C loops built at install time (`fused.py`), which SineReLU uses by default;
these remain for an install without them, and once built they are asked first.

The eager SineReLU (`sinerelu.py`) runs 6-7 elementwise passes per cache-sized chunk plus numpy's sin or cos, and
costs ~1.5-2x torch.relu forward and forward+backward on 16M float32 elements (docs/benchmarks.md). One fused
loop per direction (load z, one transcendental, select, store) is what closes that gap, and TorchInductor writes
that loop for us. It costs seconds of compilation per shape, so:

- `compile_kernels()` compiles kernels for four fixed 1-D lengths, `PIECES` (1M, 256K, 64K and 16K elements), per
  dtype and form: forward, in-place forward and backward, with epsilon (and the max form's crossing point) passed
  as 0-d tensors, so one compilation serves every epsilon and every tensor. A tensor runs as whole pieces, largest
  first, and its last < 16K elements are copied into a zero-padded 16K vector for one more call. Why several
  lengths (benchmarks/sinerelu.py, forward vs relu): with 256K pieces alone 16M elements took ~1.37x against ~1.2x
  with 1M pieces; with 1M and 16K pieces only, 256K and 64K tensors took ~11x (many small calls, each with its own
  OpenMP region) against ~5.6x with a piece of their size; the eager path takes 15-18x at those sizes.
- Nothing compiles unless `compile_kernels()` is called: by default (`wait=True`) it blocks until the kernels are
  built, at a moment the caller chooses; `wait=False` builds them on a daemon thread while SineReLU runs eagerly.
  Fork after a background build has finished, not during it (a DataLoader worker forked while the build thread holds
  a lock could wait on it forever): call with `wait=True` before starting worker processes.
- The graph is traced with make_fx and handed to `torch._inductor.compile`, not torch.compile: the result is a plain
  callable with no dynamo guards, so calling it can never trigger a recompilation. Its inputs are checked here
  instead (CPU, dtype, 1-D contiguous vectors); every call gets exactly one of the `PIECES` lengths.
- Any failure, while compiling or on a call, falls back to eager for good for that dtype and form, with one
  RuntimeWarning that names the cause; `kernel_status()` reports it. `clear_kernels()` forgets every kernel.

The kernels compute what the eager path computes (same clamp before the transcendental, same branch choice), within
a few float32 ulps: the transcendental comes from Sleef instead of numpy. They run on the OpenMP thread count that
was set when they were compiled.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.sinerelu import check_form
from ..errors import DeadNeuronError
from .pool import scratch_vectors

__all__ = ["PIECES", "clear_kernels", "compile_kernels", "kernel_status", "suspended"]

# Lengths the kernels are compiled for, largest first (4 MiB and 64 KiB of float32); see the module docstring.
PIECES = (1 << 20, 1 << 18, 1 << 16, 1 << 14)
_QUARTER_PI = math.pi / 4
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class _Kernels:
    size: int  # the one length they take
    forward: Callable[..., Any]  # (z, out, k)
    forward_: Callable[..., Any]  # (z, k): in place
    backward: Callable[..., Any]  # (z, g, out, k, crossing)


_ready: dict[tuple[torch.dtype, str], tuple[_Kernels, ...]] = {}  # one per PIECES length, largest first
_failed: dict[tuple[torch.dtype, str], str] = {}
_building: dict[tuple[torch.dtype, str], threading.Thread] = {}
_lock = threading.Lock()
_build_lock = threading.Lock()  # one build at a time: inductor's config patching is process-wide
_suspended = threading.local()  # per thread: `with suspended():` runs the eager path
_suspending = 0  # how many `suspended()` blocks are open, in all threads


def _piecewise_value(z: Tensor, k: Tensor) -> Tensor:
    return torch.where(z > 0, z, k * torch.sin(torch.clamp(z, max=0.0) - _QUARTER_PI))


def _max_value(z: Tensor, k: Tensor) -> Tensor:
    return torch.maximum(k * torch.sin(z - _QUARTER_PI), z)


def _graphs(form: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    value = _piecewise_value if form == "piecewise" else _max_value

    def forward(z: Tensor, out: Tensor, k: Tensor) -> tuple[()]:
        out.copy_(value(z, k))
        return ()

    def forward_(z: Tensor, k: Tensor) -> tuple[()]:
        z.copy_(value(z, k))
        return ()

    def backward(z: Tensor, g: Tensor, out: Tensor, k: Tensor, crossing: Tensor) -> tuple[()]:
        # The linear branch wins on z > 0 (piecewise) or z >= crossing (max form); the sine branch's argument is
        # clamped as in the eager path, which keeps +inf away from cos where that branch is not taken.
        linear = z > crossing if form == "piecewise" else z >= crossing
        out.copy_(torch.where(linear, g, g * (k * torch.cos(torch.minimum(z, crossing) - _QUARTER_PI))))
        return ()

    return forward, forward_, backward


def _build(dtype: torch.dtype, form: str) -> tuple[_Kernels, ...]:
    import torch._inductor
    import torch._inductor.config
    from torch.fx.experimental.proxy_tensor import make_fx

    forward, forward_, backward = _graphs(form)
    built = []
    # In this process: a pool of compile workers would fork from whatever thread is building.
    with torch._inductor.config.patch(compile_threads=1), torch.no_grad():
        for size in PIECES:
            z, g, out = (torch.zeros(size, dtype=dtype) for _ in range(3))
            k, crossing = torch.zeros((), dtype=dtype), torch.zeros((), dtype=dtype)
            compiled = []
            for fn, args in ((forward, (z, out, k)), (forward_, (z, k)), (backward, (z, g, out, k, crossing))):
                graph = make_fx(fn)(*args)
                compiled.append(torch._inductor.compile(graph, list(args)))
            built.append(_Kernels(size, *compiled))
    return tuple(built)


def _build_into_registry(dtype: torch.dtype, form: str) -> None:
    key = (dtype, form)
    try:
        with _build_lock:
            kernels = _build(dtype, form)
    except Exception as exc:  # noqa: BLE001 - any failure means: stay eager
        _give_up(key, f"compiling failed: {type(exc).__name__}: {exc}")
    else:
        with _lock:
            _ready[key] = kernels
    finally:
        with _lock:
            _building.pop(key, None)


def _give_up(key: tuple[torch.dtype, str], why: str) -> None:
    with _lock:
        _ready.pop(key, None)
        if key in _failed:
            return
        _failed[key] = why
    dtype, form = key
    warnings.warn(
        f"deadneuron: compiled SineReLU kernels for {str(dtype).removeprefix('torch.')}/{form} are off, SineReLU runs "
        f"eagerly: {why}",
        RuntimeWarning,
        stacklevel=3,
    )


def _dtype(name: object) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in _DTYPES.values():
        return name
    if isinstance(name, str) and name.removeprefix("torch.") in _DTYPES:
        return _DTYPES[name.removeprefix("torch.")]
    raise DeadNeuronError(f"compiled SineReLU kernels exist for float32 and float64; received {name!r}")


def compile_kernels(
    dtypes: Iterable[torch.dtype | str] = ("float32",),
    forms: Iterable[str] = ("piecewise",),
    *,
    wait: bool = True,
) -> dict[str, str]:
    """Build the fused CPU kernels that SineReLU then uses on CPU tensors of that dtype and form, of any size.

    Takes ~10-20 s per dtype and form on 2 cores the first time (TorchInductor caches on disk, so a later process
    is faster). With `wait=False` the build runs on a daemon thread and SineReLU stays eager until it is done.
    Returns `kernel_status()`. Kernels that failed to build are reported there, with one RuntimeWarning.
    """
    keys = [(_dtype(d), check_form(f)) for d in dtypes for f in forms]
    threads = []
    with _lock:
        for key in keys:
            if key in _ready or key in _failed:
                continue
            thread = _building.get(key)
            if thread is None:
                thread = threading.Thread(
                    target=_build_into_registry, args=key, name=f"deadneuron-kernels-{key[0]}-{key[1]}", daemon=True
                )
                _building[key] = thread
                thread.start()
            threads.append(thread)
    if wait:
        for thread in threads:
            thread.join()
    return kernel_status()


def kernel_status() -> dict[str, str]:
    """{"float32/piecewise": "ready" | "building" | "failed: ..."} for every kernel asked for so far."""
    with _lock:
        status = {key: "ready" for key in _ready}
        status.update({key: "building" for key in _building if key not in status})
        status.update({key: f"failed: {why}" for key, why in _failed.items()})
    return {f"{str(dtype).removeprefix('torch.')}/{form}": state for (dtype, form), state in status.items()}


def clear_kernels() -> None:
    """Forget every compiled kernel and failure (a build still running publishes its kernels when it ends)."""
    with _lock:
        _ready.clear()
        _failed.clear()


@contextmanager
def suspended() -> Iterator[None]:
    """Run SineReLU eagerly in this thread inside the block: neither compiled kernels nor the fused loops
    (`fused.py`) that run by default (benchmarks, comparisons)."""
    global _suspending
    before = getattr(_suspended, "on", False)
    _suspended.on = True
    with _lock:
        _suspending += 1
    try:
        yield
    finally:
        _suspended.on = before
        with _lock:
            _suspending -= 1


def built_any() -> bool:
    """Whether any kernel is ready (then the flat paths ask them first)."""
    return bool(_ready)


def is_suspended() -> bool:
    """Whether this thread is inside `suspended()` (a global count first: the thread-local lookup costs more, and
    this runs on every SineReLU call)."""
    return _suspending > 0 and getattr(_suspended, "on", False)


def _usable(src: Tensor, form: str, *others: Tensor) -> tuple[_Kernels, ...] | None:
    if not _ready or is_suspended() or src.device.type != "cpu" or src.numel() == 0:
        return None
    kernels = _ready.get((src.dtype, form))
    if kernels is None:
        return None
    for t in (src, *others):
        if t.dtype != src.dtype or t.device.type != "cpu" or t.dim() != 1 or t.stride(0) != 1:
            return None
    return kernels


def _scalar(value: float, dtype: torch.dtype) -> Tensor:
    return torch.tensor(value, dtype=dtype)


def _pieces(n: int, kernels: tuple[_Kernels, ...]) -> Iterator[tuple[slice, _Kernels]]:
    """Whole pieces from the start of an n-element vector: as many of the largest length as fit, then the next."""
    start = 0
    for kernel in kernels:
        while n - start >= kernel.size:
            yield slice(start, start + kernel.size), kernel
            start += kernel.size


def _padded(kernel: _Kernels, vectors: list[Tensor], tails: tuple[Tensor, ...]) -> list[Tensor]:
    """The pooled vectors cut to the kernel's length, the first ones holding `tails` and zeros after them (a zero
    is a cheap argument for the transcendental; stale values could be huge, which Sleef reduces slowly)."""
    cut = [vector[: kernel.size] for vector in vectors]
    for vector, tail in zip(cut, tails, strict=False):  # the output vectors hold no tail
        vector[: tail.numel()].copy_(tail)
        vector[tail.numel() :].zero_()
    return cut


def _run(
    key: tuple[torch.dtype, str],
    kernels: tuple[_Kernels, ...],
    inputs: tuple[Tensor, ...],
    dst: Tensor,
    call: Callable[..., Any],
    whole: Callable[[_Kernels, slice], Any] | None = None,
) -> int:
    """dst = call(kernel, *inputs, out) over whole pieces, largest first, then over the zero-padded tail; returns
    how many elements were done: all of them, or fewer when a call failed (the eager path then does the rest).
    `whole(kernel, piece)` replaces `call` on whole pieces (the in-place forward)."""
    n = dst.numel()
    done = 0
    try:
        with torch.no_grad():
            for piece, kernel in _pieces(n, kernels):
                if whole is not None:
                    whole(kernel, piece)
                else:
                    call(kernel, *(t[piece] for t in inputs), dst[piece])
                done = piece.stop
            if done < n:
                small = kernels[-1]
                with scratch_vectors(len(inputs) + 1, small.size, small.size, dst.dtype, dst.device) as vectors:
                    padded = _padded(small, vectors, tuple(t[done:] for t in inputs))
                    call(small, *padded)
                    dst[done:].copy_(padded[-1][: n - done])
                done = n
    except Exception as exc:  # noqa: BLE001 - the eager path finishes the tensor
        _give_up(key, f"a call failed: {type(exc).__name__}: {exc}")
    return done


def forward(src: Tensor, dst: Tensor, k: float, form: str) -> int:
    """dst = SineReLU(src) through the kernels; returns how many elements were done (see `_run`; 0 when no kernel
    applies). `k` is epsilon * sqrt(2); dst may be src."""
    kernels = _usable(src, form, dst)
    if kernels is None:
        return 0
    scale = _scalar(k, src.dtype)
    inplace = dst.data_ptr() == src.data_ptr()
    return _run(
        (src.dtype, form), kernels, (src,), dst,
        lambda kernel, z, out: kernel.forward(z, out, scale),
        (lambda kernel, piece: kernel.forward_(src[piece], scale)) if inplace else None,
    )


def backward(src: Tensor, grad: Tensor, dst: Tensor, k: float, crossing: float, form: str) -> int:
    """dst = grad * SineReLU'(src), as `forward`; `crossing` is where the linear branch starts."""
    kernels = _usable(src, form, grad, dst)
    if kernels is None:
        return 0
    scale, threshold = _scalar(k, src.dtype), _scalar(crossing, src.dtype)
    return _run(
        (src.dtype, form), kernels, (src, grad), dst,
        lambda kernel, z, g, out: kernel.backward(z, g, out, scale, threshold),
    )
