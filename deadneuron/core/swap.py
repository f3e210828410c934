"""What both frameworks' swaps share: which epsilon a site gets, and writing a swapped model file safely."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence


def nearest(layers: Sequence[str | None], index: int) -> str:
    """The layer kind ("conv" or "dense") deciding the epsilon of the site at `index` in model order: the last one
    before it, else the first one after it, else "conv" (SineReLU's default epsilon).

    >>> nearest(["conv", None, "dense", None], 3), nearest([None, "dense"], 0), nearest([None], 0)
    ('dense', 'dense', 'conv')
    """
    for layer in reversed(layers[:index]):
        if layer is not None:
            return layer
    for layer in layers[index + 1 :]:
        if layer is not None:
            return layer
    return "conv"


def write_then_rename(save: Callable[[str], object], output: str) -> None:
    """`save(path)` to a hidden name beside `output` (same suffix), then rename it into place: a failed write never
    leaves half a file at `output`, and never a partial file behind."""
    folder, base = os.path.split(os.path.abspath(output))
    partial = os.path.join(folder, f".{base}.partial{os.path.splitext(base)[1]}")
    try:
        save(partial)
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
