"""`deadneuron demo`: scan and compare the bundled sample model on its held-out digits."""

from __future__ import annotations

from typing import Any

from .errors import NotBuiltError


def run_demo(framework: str = "torch", *, console: Any = None) -> int:
    raise NotBuiltError("the demo is not built yet (it lands with the sample models); try deadneuron scan --help")
