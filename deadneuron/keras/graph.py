"""How TensorFlow runs the scan's step: without Grappler's graph rewrites on CPU.

TensorFlow optimises a `tf.function`'s graph (Grappler: pruning, constant folding, arithmetic rewrites, remapper
fusions, layout, two passes of all that) the first time it runs. For the scan's step of a Keras ResNet50 (64x64, batch
64, 4,700 graph nodes) on this project's 2-core CPU, that cost ~0.55 s of the first batch and bought nothing on the
later ones: the step needs every site's pre-activation and output as separate tensors, so the fusions that make
inference fast (Conv2D+BiasAdd+ReLU into one kernel) cannot apply, and the reductions are plain. Measured side by
side in one process on an idle machine (`benchmarks/scan_keras_resnet.py --grappler`, docs/benchmarks.md): the
first batch 2.06 s without against 2.46 s with, the three later ones 1.88 s against 1.84 s.

So on CPU the step is called with the meta-optimizer off. The option goes with each call (TensorFlow's per-thread
function call options, which key the instantiated function), so the user's own functions, other threads and later
calls keep their configuration. With a GPU visible the defaults stay: Grappler's layout optimizer turns NHWC
convolutions into cuDNN's NCHW there, which this machine cannot measure. `GRAPPLER_ON_CPU = True` brings the
defaults back (the benchmark's A/B switch). The options object is TensorFlow's internal API: if it is missing or
changes shape, the step runs with the defaults.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

__all__ = ["GRAPPLER_ON_CPU", "step_options"]

GRAPPLER_ON_CPU = False


def _lean_options() -> tuple[Any, Any] | None:
    """(context, call options with the meta-optimizer off), or None to keep TensorFlow's defaults."""
    if GRAPPLER_ON_CPU:
        return None
    try:
        import tensorflow as tf
        from tensorflow.core.protobuf import config_pb2
        from tensorflow.python.eager import context

        if tf.config.list_logical_devices("GPU"):
            return None
        ctx = context.context()
        lean = copy.copy(ctx.function_call_options)
        proto = config_pb2.ConfigProto()
        proto.ParseFromString(lean.config_proto_serialized)
        proto.graph_options.rewrite_options.disable_meta_optimizer = True
        lean.config_proto_serialized = proto
        return ctx, lean
    except Exception:  # an internal API that moved: the defaults are correct, only slower to start
        return None


def step_options() -> Callable[[], AbstractContextManager[None]]:
    """A context for each call of the step: within it (this thread), a function that instantiates runs without
    Grappler on CPU. Decided once per step, when the step is made."""
    found = _lean_options()
    if found is None:
        return nullcontext
    ctx, lean = found

    @contextmanager
    def lean_calls() -> Iterator[None]:
        saved = ctx.function_call_options
        ctx.function_call_options = lean
        try:
            yield
        finally:
            ctx.function_call_options = saved

    return lean_calls
