"""A pool of CPU scratch vectors, kept between calls of SineReLU and its compiled kernels.

Scratch allocated per call was handed back to the OS by malloc's trimming and page-faulted in again on the next call:
on 256K float32 elements that cost 4x the whole SineReLU forward (1127 us against 265 us with this pool;
docs/benchmarks.md). One pool for the process, behind a lock, keeps at most `KEPT` free vectors per (dtype, length):
16 x 1 MiB for the eager path's float32 chunks however many threads call SineReLU (a thread takes up to 7 at once;
more are allocated when several threads need them together, and dropped when they come back to a full pool).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["scratch_vectors"]


KEPT = 16
_free: dict[tuple[torch.dtype, int], list[Tensor]] = {}
_lock = threading.Lock()


@contextmanager
def scratch_vectors(
    count: int, needed: int, length: int, dtype: torch.dtype, device: torch.device
) -> Iterator[list[Tensor]]:
    """`count` 1-D scratch vectors of at least `needed` elements, for the length of a `with` block.

    On CPU they are pooled vectors of `length` (>= `needed`) elements, taken from the pool and given back on exit; no
    two blocks hold the same vector, across threads or nested on one. Vectors made in inference mode could not be
    written outside it, so they are always made outside it. On other devices they are `needed` elements allocated per
    call: the device's caching allocator already reuses memory.
    """
    assert needed <= length, (needed, length)
    if device.type != "cpu":
        yield [torch.empty(needed, dtype=dtype, device=device) for _ in range(count)]
        return
    key = (dtype, length)
    with _lock:
        free = _free.setdefault(key, [])
        taken = [free.pop() for _ in range(min(count, len(free)))]
    if len(taken) < count:
        with torch.inference_mode(False):
            taken += [torch.empty(length, dtype=dtype) for _ in range(count - len(taken))]
    try:
        yield taken
    finally:
        with _lock:
            free = _free.setdefault(key, [])
            free.extend(taken[: max(KEPT - len(free), 0)])
