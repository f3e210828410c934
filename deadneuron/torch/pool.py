"""Per-thread pools of CPU scratch vectors, kept between calls of SineReLU and its compiled kernels.

Scratch allocated per call was handed back to the OS by malloc's trimming and page-faulted in again on the next call:
on 256K float32 elements that cost 4x the whole SineReLU forward (1127 us against 265 us with this pool;
docs/benchmarks.md). The pool keeps a few vectors per (dtype, length) and thread: at most 7 x 1 MiB for the eager
path's float32 chunks, plus the compiled kernels' padding vectors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["scratch_vectors"]


class _Pool(threading.local):
    def __init__(self) -> None:
        self.free: dict[tuple[torch.dtype, int], list[Tensor]] = {}


_POOL = _Pool()


@contextmanager
def scratch_vectors(
    count: int, needed: int, length: int, dtype: torch.dtype, device: torch.device
) -> Iterator[list[Tensor]]:
    """`count` 1-D scratch vectors of at least `needed` elements, for the length of a `with` block.

    On CPU they are pooled vectors of `length` (>= `needed`) elements from this thread's pool, returned to it on exit;
    a nested use on the same thread takes other vectors. Vectors made in inference mode could not be written outside
    it, so they are always made outside it. On other devices they are `needed` elements allocated per call: the
    device's caching allocator already reuses memory.
    """
    assert needed <= length, (needed, length)
    if device.type != "cpu":
        yield [torch.empty(needed, dtype=dtype, device=device) for _ in range(count)]
        return
    free = _POOL.free.setdefault((dtype, length), [])
    taken = [free.pop() for _ in range(min(count, len(free)))]
    if len(taken) < count:
        with torch.inference_mode(False):
            taken += [torch.empty(length, dtype=dtype) for _ in range(count - len(taken))]
    try:
        yield taken
    finally:
        free.extend(taken)
