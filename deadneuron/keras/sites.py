"""Which parts of a Keras model are activation sites, and the wrappers that watch them during a scan.

Keras 3 has no hook API, so a scan replaces, on the instance and for the duration of the scan only:
- `layer.call` of activation layers (ReLU, LeakyReLU, ELU, PReLU, Activation, our SineReLU) and of the raw
  activation operations (`keras.ops.relu(x)`) that Functional graphs list in `model.operations`;
- `layer.activation` of layers with a fused activation (`Dense(..., activation="relu")`, Conv*), which exposes the
  pre-activation.
This works for Sequential, Functional, nested and subclassed models alike. `Watch.remove()` puts every attribute
back exactly as it was (and may run twice).

Site kinds are unit nonlinearities whose zero region makes "dead" meaningful: the ReLU family and the smooth
rectifiers (`SITE_KINDS`). Softmax, sigmoid, tanh and the like are output or gating nonlinearities and are not
sites; a softmax or sigmoid that ends the model is watched only to recover its logits for the cross-entropy loss.
What cannot be watched: activation functions called inside a subclassed model's own `call` body (`tf.nn.relu(x)`,
`keras.ops.relu(x)` there are plain function calls), Lambda layers, and activations inside recurrent layers (their
cells run in a loop); the last two are listed in the report as unobserved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import keras

from ..core.kinds import LOGIT_KINDS, SITE_KINDS, canonical, repeated_site_name


@dataclass(eq=False)
class Candidate:
    """A place in the model that may produce sites: one per layer or operation, one site per call."""

    path: str  # display name: "dense", "block/re_lu" for a layer inside a nested model
    obj: Any  # the layer or operation
    attribute: str  # "call" or "activation": what the wrapper replaces
    kind: str
    channels_first: bool = False  # the nearest conv before it says data_format="channels_first"
    role: str = "site"  # "site", or "logits" for the output softmax/sigmoid


def sinerelu_class() -> type | None:
    """Our SineReLU layer class, when its module is importable (it imports Keras, which is loaded already)."""
    try:
        from .sinerelu import SineReLU
    except ImportError:
        return None
    return SineReLU


def _refine_relu(obj: Any, default: str = "relu") -> str:
    """keras.layers.ReLU and keras.activations.relu carry their variant as parameters."""
    slope = getattr(obj, "negative_slope", 0.0) or 0.0
    max_value = getattr(obj, "max_value", None)
    if slope:
        return "leaky_relu"
    if max_value is not None and float(max_value) == 6.0:
        return "relu6"
    return default


def activation_kind(fn: Any) -> str | None:
    """The kind of an activation callable (`layer.activation`), or None for linear/unknown ones."""
    if fn is None:
        return None
    sine = sinerelu_class()
    if sine is not None and isinstance(fn, sine):
        return "sinerelu"
    if isinstance(fn, keras.layers.Layer):
        return layer_kind(fn)
    try:
        name = keras.saving.get_registered_name(fn)
    except Exception:  # an object Keras cannot name: not an activation we know
        return None
    return canonical(str(name)) if name else None


def layer_kind(layer: Any) -> str | None:
    """The kind of an activation layer, or None when the layer is not one."""
    sine = sinerelu_class()
    if sine is not None and isinstance(layer, sine):
        return "sinerelu"
    if isinstance(layer, keras.layers.ReLU):
        return _refine_relu(layer)
    if isinstance(layer, keras.layers.LeakyReLU):
        return "leaky_relu"
    if isinstance(layer, keras.layers.PReLU):
        return "prelu"
    if isinstance(layer, keras.layers.ELU):
        return "elu"
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    if isinstance(layer, keras.layers.Activation):
        return activation_kind(layer.activation)
    return None


# The public functions whose symbolic call adds one activation operation to a Functional graph.
_OP_FUNCTIONS = (
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "hard_silu", "softplus", "squareplus",
    "sparse_plus", "softmax", "sigmoid",
)


@cache
def operation_kinds() -> dict[type, str]:
    """Operation class -> kind, learned from the public `keras.ops`/`keras.activations` functions themselves.

    Each function is applied to a symbolic input and the class of the one operation it adds is recorded, so no
    private module is named and no class name is parsed.
    """
    kinds: dict[type, str] = {}
    for name in _OP_FUNCTIONS:
        for namespace in (keras.ops, keras.activations):
            fn = getattr(namespace, name, None)
            if fn is None:
                continue
            inputs = keras.Input((2,))
            try:
                operations = keras.Model(inputs, fn(inputs)).operations
            except Exception:  # some activations are not symbolic on every backend
                continue
            if len(operations) == 2:  # the input and exactly one operation
                kinds.setdefault(type(operations[1]), canonical(name))
    return kinds


def operation_kind(op: Any) -> str | None:
    kind = operation_kinds().get(type(op))
    if kind == "relu":
        return _refine_relu(op)
    return kind


def is_recurrent(layer: Any) -> bool:
    return isinstance(layer, keras.layers.RNN) or hasattr(layer, "recurrent_activation") or hasattr(
        layer, "state_size"
    )


def children(layer: Any) -> list[Any]:
    """Direct sub-layers (and operations, for Functional models) in model order."""
    operations = getattr(layer, "operations", None)
    if isinstance(layer, keras.Model) and operations is not None:
        return list(operations)
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    return list(layer._flatten_layers(include_self=False, recursive=False))


@dataclass
class Survey:
    """The candidates of a model, in model order, and what cannot be watched."""

    candidates: list[Candidate] = field(default_factory=list)
    unobserved: list[str] = field(default_factory=list)


def survey(model: Any) -> Survey:
    """Walk the model (recursing into nested models and layers) and list every candidate site."""
    found = Survey()
    seen: set[int] = set()
    fmt: dict[str, str | None] = {"last": None}  # data_format of the most recent layer that has one, in walk order

    def visit(obj: Any, prefix: str) -> None:
        for child in children(obj):
            if id(child) in seen or isinstance(child, keras.layers.InputLayer):
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            data_format = getattr(child, "data_format", None)
            if isinstance(data_format, str):
                fmt["last"] = data_format
            channels_first = fmt["last"] == "channels_first"
            if not isinstance(child, keras.layers.Layer):
                kind = operation_kind(child)
                if kind in SITE_KINDS:
                    found.candidates.append(Candidate(path, child, "call", kind, channels_first))
                continue
            kind = layer_kind(child)
            if kind is not None:
                if kind in SITE_KINDS:
                    found.candidates.append(Candidate(path, child, "call", kind, channels_first))
                continue
            if isinstance(child, keras.layers.Lambda):
                found.unobserved.append(f"{path} (a Lambda layer: activations inside it cannot be watched)")
                continue
            activation = getattr(child, "activation", None)
            fused = activation_kind(activation)
            if isinstance(activation, keras.layers.Layer):
                seen.add(id(activation))  # a layer used as `activation=` is watched as the fused activation
            if fused in SITE_KINDS:
                if is_recurrent(child):
                    found.unobserved.append(f"{path} ({fused} inside a recurrent layer: not watched)")
                else:
                    found.candidates.append(Candidate(path, child, "activation", fused, channels_first))
            if not is_recurrent(child):
                visit(child, path + "/")

    visit(model, "")
    return found


def output_activation(model: Any) -> Candidate | None:
    """The softmax or sigmoid that ends a Sequential or Functional model, if any, to recover its logits."""
    last = _output_producer(model)
    while isinstance(last, keras.Model):
        inner = _output_producer(last)
        if inner is None:
            return None
        last = inner
    if last is None:
        return None
    if isinstance(last, keras.layers.Layer):
        kind = layer_kind(last)
        if kind in LOGIT_KINDS:
            return Candidate(last.name, last, "call", kind, role="logits")
        fused = activation_kind(getattr(last, "activation", None)) if kind is None else None
        if fused in LOGIT_KINDS and not is_recurrent(last):
            return Candidate(last.name, last, "activation", fused, role="logits")
        return None
    kind = operation_kind(last)
    return Candidate(last.name, last, "call", kind, role="logits") if kind in LOGIT_KINDS else None


def _output_producer(model: Any) -> Any:
    if not isinstance(model, keras.Model):
        return None
    outputs = getattr(model, "outputs", None) if getattr(model, "operations", None) is not None else None
    if outputs is None:
        layers = model.layers if isinstance(model, keras.Sequential) else []
        return layers[-1] if layers else None
    if len(outputs) != 1:
        return None
    history = getattr(outputs[0], "_keras_history", None)
    return history[0] if history else None


class Recorder:
    """What the wrappers saw during one forward pass: (site name, pre-activation, output) in call order."""

    def __init__(self) -> None:
        self.records: list[tuple[str, Any, Any, Candidate]] = []
        self.logits: Any = None
        self.expose: Callable[[Any], Any] = lambda z: z  # set by the step: make z a gradient source
        self._calls: dict[str, int] = {}

    def begin(self) -> None:
        self.records = []
        self.logits = None
        self._calls = {}

    def clear(self) -> None:
        self.begin()

    def record(self, candidate: Candidate, z: Any, a: Any) -> None:
        if candidate.role == "logits":
            self.logits = z
            return
        name = repeated_site_name(candidate.path, self._calls)
        self.records.append((name, z, a, candidate))


def _wrapper(candidate: Candidate, original: Callable[..., Any], recorder: Recorder) -> Callable[..., Any]:
    """`original` (a layer's `call` or a fused `activation`) recording its input and output as one site call."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if args:
            z = args[0]
            args = args[1:]
        else:  # the input passed by keyword ("inputs" for layers, "x" for operations)
            key = "inputs" if "inputs" in kwargs else "x"
            z = kwargs.pop(key)
        if candidate.role == "site":
            z = recorder.expose(z)
        a = original(z, *args, **kwargs)
        recorder.record(candidate, z, a)
        return a

    return call


_MISSING = object()


class Watch:
    """Wrap the candidates' `call`/`activation` on their instances; `remove()` restores them (idempotent).

    Attributes are set in the instance `__dict__` directly so that Keras attribute tracking (and nn.Module
    registration on the torch backend) never sees the wrappers.
    """

    def __init__(self, candidates: list[Candidate], recorder: Recorder) -> None:
        self.candidates = candidates
        self.recorder = recorder
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> Watch:
        try:
            for candidate in self.candidates:
                obj, attribute = candidate.obj, candidate.attribute
                if any(o is obj and a == attribute for o, a, _ in self._saved):
                    continue
                original = getattr(obj, attribute)
                self._saved.append((obj, attribute, vars(obj).get(attribute, _MISSING)))
                vars(obj)[attribute] = _wrapper(candidate, original, self.recorder)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        while self._saved:
            obj, attribute, before = self._saved.pop()
            if before is _MISSING:
                vars(obj).pop(attribute, None)
            else:
                vars(obj)[attribute] = before
        self.recorder.clear()

