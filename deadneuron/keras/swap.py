"""Swapping ReLU for SineReLU in a Keras model: a new model, the original untouched (design.md, issue 5).

- Sequential and Functional models (nested ones too) are cloned with `keras.models.clone_model(recursive=True)` and
  a clone function that turns a ReLU layer or `Activation("relu")` into a `SineReLU` layer of the same name, a fused
  `activation="relu"` into `activation=SineReLU(eps)`, and a raw `keras.ops.relu` operation of a Functional graph
  into a `SineReLU` layer called in its place (the clone rebuilds the graph); then every weight is copied. The clone
  saves to `.keras` and loads again once `deadneuron.keras` is imported.
- Subclassed models cannot be cloned (Keras refuses): they are deep-copied and swapped live on the copy: fused
  activations and `Activation` layers get a SineReLU as their `activation`, ReLU layer attributes are replaced by
  SineReLU layers. Activation functions called inside a subclassed model's own `call` (`keras.ops.relu(x)` there)
  are plain function calls and stay ReLU; `swap` says so with a warning only when it cannot be sure, so check the
  model's code.

Epsilon per site: a fused activation takes its own layer's kind (Conv* -> the conv value, Dense -> the dense value);
an activation layer or operation takes the nearest Conv/Dense layer before it in model order (the first one after it
when none is before; the conv value when the model has neither).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import keras

from ..core.options import SwapKeywords, SwapOptions
from ..core.swap import nearest, write_then_rename
from ..errors import DeadNeuronError
from .sinerelu import SineReLU
from .sites import activation_kind, children, layer_kind, operation_kind

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["copy_model", "swap", "swap_file", "swap_model"]


def _layer_role(obj: Any) -> str | None:
    """ "conv" or "dense" for the layers whose output decides a following activation's epsilon."""
    conv = tuple(
        getattr(keras.layers, name)
        for name in (
            "Conv1D",
            "Conv2D",
            "Conv3D",
            "Conv1DTranspose",
            "Conv2DTranspose",
            "Conv3DTranspose",
            "SeparableConv1D",
            "SeparableConv2D",
            "DepthwiseConv1D",
            "DepthwiseConv2D",
        )
        if hasattr(keras.layers, name)
    )
    dense = tuple(
        getattr(keras.layers, name) for name in ("Dense", "EinsumDense") if hasattr(keras.layers, name)
    )
    if isinstance(obj, conv):
        return "conv"
    if isinstance(obj, dense):
        return "dense"
    return None


def _kind(obj: Any) -> str | None:
    """The activation kind of a layer or raw operation (None when it is not an activation)."""
    if isinstance(obj, keras.layers.Layer):
        return layer_kind(obj)
    return operation_kind(obj)


class _Plan:
    """Which objects of the model are swapped, and with which epsilon, decided before anything is copied."""

    def __init__(self, model: Any, options: SwapOptions) -> None:
        self.options = options
        epsilons, include = options.epsilons, options.include
        self.form = options.form
        self.layer_eps: dict[int, float] = {}  # activation layers and operations: replace by a SineReLU layer
        self.fused_eps: dict[int, float] = {}  # layers with a fused activation: activation=SineReLU
        self.order: list[tuple[Any, str | None]] = []
        self._walk(model, set())
        roles = [role for _, role in self.order]
        for index, (obj, _) in enumerate(self.order):
            kind = _kind(obj)
            if kind in include:
                self.layer_eps[id(obj)] = epsilons[nearest(roles, index)]
                continue
            fused = (
                activation_kind(getattr(obj, "activation", None))
                if isinstance(obj, keras.layers.Layer)
                else None
            )
            if fused in include and kind is None:
                self.fused_eps[id(obj)] = epsilons[_layer_role(obj) or nearest(roles, index)]

    def _walk(self, obj: Any, seen: set[int]) -> None:
        for child in children(obj):
            if id(child) in seen or isinstance(child, keras.layers.InputLayer):
                continue
            seen.add(id(child))
            self.order.append((child, _layer_role(child)))
            if isinstance(child, keras.layers.Layer) and _kind(child) is None:
                self._walk(child, seen)

    @property
    def count(self) -> int:
        return len(self.layer_eps) + len(self.fused_eps)

    def sinerelu(self, epsilon: float, name: str | None = None) -> SineReLU:
        return SineReLU(epsilon, self.form, name=name) if name else SineReLU(epsilon, self.form)


def swap(model: Any, **options: Unpack[SwapKeywords]) -> Any:
    """A new Keras model with every ReLU site replaced by SineReLU; `model` is left as it was."""
    return swap_model(model, SwapOptions.make(**options))


def swap_model(model: Any, options: SwapOptions) -> Any:
    """`swap` with its options checked (`SwapOptions`)."""
    return _swap(model, _Plan(model, options))


def _swap(model: Any, plan: _Plan) -> Any:
    if not isinstance(model, keras.Model):
        raise DeadNeuronError(f"cannot swap a {type(model).__name__}; expected a Keras model")
    if _clonable(model):
        return _clone(model, plan)
    return _live(model, plan)


def _clonable(model: Any) -> bool:
    """Sequential/Functional all the way down: clone_model can rebuild it."""
    if not isinstance(model, (keras.Sequential,)) and getattr(model, "operations", None) is None:
        return False
    for child in children(model):
        if isinstance(child, keras.Model) and not _clonable(child):
            return False
    return True


def _clone(model: Any, plan: _Plan) -> Any:
    def clone_function(obj: Any) -> Any:
        if id(obj) in plan.layer_eps:
            return plan.sinerelu(plan.layer_eps[id(obj)], name=obj.name)
        if id(obj) in plan.fused_eps:
            config = obj.get_config()
            config["activation"] = plan.sinerelu(plan.fused_eps[id(obj)])
            return obj.__class__.from_config(config)
        return obj.__class__.from_config(obj.get_config())

    swapped = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    swapped.set_weights(model.get_weights())
    return swapped


def _live(model: Any, plan: _Plan) -> Any:
    """Subclassed models: a deep copy, swapped in place. Layers are matched to the plan by their position in
    the walk, which the copy shares with the original."""
    swapped = _deep_copy(model)
    original = [obj for obj, _ in plan.order]
    copied = [obj for obj, _ in _Plan(swapped, plan.options).order]
    if len(original) != len(copied):
        raise DeadNeuronError("the copy of the model has another structure than the model; cannot swap it")
    replaced: dict[int, Any] = {}
    for old, new in zip(original, copied, strict=True):
        if id(old) in plan.fused_eps:
            _assign(new, "activation", plan.sinerelu(plan.fused_eps[id(old)]))
        elif id(old) in plan.layer_eps:
            if isinstance(new, keras.layers.Activation):
                _assign(new, "activation", plan.sinerelu(plan.layer_eps[id(old)]))
            else:
                replaced[id(new)] = plan.sinerelu(plan.layer_eps[id(old)], name=new.name)
    if replaced:
        _replace_attributes(swapped, replaced, set())
    return swapped


def _deep_copy(model: Any) -> Any:
    # Keras copies a model by saving and loading it: the model's own classes must be known by name meanwhile.
    classes = {type(obj).__name__: type(obj) for obj in [model, *model._flatten_layers(include_self=False)]}
    try:
        with keras.saving.custom_object_scope(classes):
            copied = copy.deepcopy(model)
    except Exception as error:
        raise DeadNeuronError(
            f"cannot copy the subclassed model {model.name!r} to swap it ({type(error).__name__}: {error}); "
            "expected a subclassed model whose layers implement get_config (Keras copies models through "
            "their config), or a Sequential/Functional model"
        ) from error
    return copied


def _replace_attributes(parent: Any, replaced: dict[int, Any], seen: set[int]) -> None:
    """Point every attribute (or list item) of every layer that holds a replaced layer at its SineReLU."""
    if id(parent) in seen:
        return
    seen.add(id(parent))
    for name, value in list(vars(parent).items()):
        if name.startswith("_"):
            continue
        if id(value) in replaced:
            _assign(parent, name, replaced[id(value)])
            _retrack(parent, value, replaced[id(value)])
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if id(item) in replaced:
                    list.__setitem__(value, i, replaced[id(item)])
                    _retrack(parent, item, replaced[id(item)])
    for child in children(parent):
        if isinstance(child, keras.layers.Layer):
            _replace_attributes(child, replaced, seen)


def _assign(layer: Any, name: str, value: Any) -> None:
    # A built Keras layer refuses new tracked state (even a weightless SineReLU): set the attribute plainly;
    # the
    # layer lists in `_layers` are fixed up by `_retrack`. SineReLU has no weights, so nothing is lost.
    object.__setattr__(layer, name, value)


def _retrack(parent: Any, old: Any, new: Any) -> None:
    # Keras lists sub-layers in `_layers` (what `model.layers` and a scan walk): put the SineReLU where the
    # ReLU was.
    layers = getattr(parent, "_layers", None)
    if isinstance(layers, list):
        for i, item in enumerate(layers):
            if item is old:
                list.__setitem__(layers, i, new)


def swap_file(model: Any, output: str, options: SwapOptions) -> int:
    """Swap a loaded Keras model, save it to `output` (`.keras`, or legacy `.h5`); the sites swapped."""
    plan = _Plan(model, options)
    swapped = _swap(model, plan)
    write_then_rename(swapped.save, output)
    return plan.count


def copy_model(model: Any) -> Any:
    """An independent copy of `model` with its weights: a clone for Sequential/Functional models, a deep copy of
    a subclassed one."""
    if _clonable(model):
        copied = keras.models.clone_model(model, recursive=True)
        copied.set_weights(model.get_weights())
        return copied
    return _deep_copy(model)
