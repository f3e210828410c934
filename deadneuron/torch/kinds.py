"""What counts as an activation site in PyTorch: module classes, functional calls and aten ops, with their kinds.

A *kind* is the activation's name in reports (`relu`, `relu6`, `leaky_relu`, `gelu`, `sinerelu`, ...). Functional
calls are recognised by the function object a `TorchFunctionMode` receives; `clamp`/`clip`/`clamp_min` count only
with a lower bound of exactly 0 and no upper bound (a ReLU spelled as a clamp), `hardtanh` only as (0, 6) (ReLU6).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function

T = TypeVar("T")

_MODULE_KINDS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.RReLU: "rrelu",
    nn.ELU: "elu",
    nn.CELU: "celu",
    nn.SELU: "selu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
    nn.Mish: "mish",
    nn.Softplus: "softplus",
}


# Activation modules of the libraries models come from, by module and class name. They are looked up in
# `sys.modules` when a scan starts, never imported: a model built by transformers has already imported them.
# gelu: the erf form; gelu_tanh: the tanh approximations ("gelu_new", "gelu_fast", "gelu_pytorch_tanh");
# quick_gelu: x * sigmoid(1.702 x); relu2: relu(x)**2 (Primer); hard_mish: x * clamp(x + 2, 0, 2) / 2 (timm).
ECOSYSTEM_KINDS: dict[str, dict[str, str]] = {
    "transformers.activations": {
        "GELUActivation": "gelu",
        "ClippedGELUActivation": "gelu",
        "NewGELUActivation": "gelu_tanh",
        "GELUTanh": "gelu_tanh",
        "PytorchGELUTanh": "gelu_tanh",
        "FastGELUActivation": "gelu_tanh",
        "AccurateGELUActivation": "gelu_tanh",
        "QuickGELUActivation": "quick_gelu",
        "SiLUActivation": "silu",
        "MishActivation": "mish",
        "ReLUSquaredActivation": "relu2",
    },
    # BLOOM's MLP activation: its own module (a tanh GELU in a custom autograd Function), not one of ACT2FN's.
    "transformers.models.bloom.modeling_bloom": {"BloomGelu": "gelu_tanh"},
    # timm's own modules (its models also use torch's nn.ReLU, nn.SiLU, ...; its PReLU subclasses nn.PReLU). The
    # `_me` variants are the memory-efficient autograd versions of the same formulas; timm before 0.9 kept them
    # under timm.models.layers.
    **{
        f"{package}.activations": {
            "Swish": "silu",
            "Mish": "mish",
            "HardSwish": "hardswish",
            "HardMish": "hard_mish",
            "GELU": "gelu",
            "GELUTanh": "gelu_tanh",
            "QuickGELU": "quick_gelu",
        }
        for package in ("timm.layers", "timm.models.layers")
    },
    **{
        f"{package}.activations_me": {
            "SwishMe": "silu",
            "MishMe": "mish",
            "HardSwishMe": "hardswish",
            "HardMishMe": "hard_mish",
        }
        for package in ("timm.layers", "timm.models.layers")
    },
}


def _ecosystem_kinds() -> dict[type[nn.Module], str]:
    kinds: dict[type[nn.Module], str] = {}
    for module_name, classes in ECOSYSTEM_KINDS.items():
        module = sys.modules.get(module_name)
        for class_name, kind in classes.items():
            cls = getattr(module, class_name, None) if module is not None else None
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                kinds[cls] = kind
    return kinds


def _sinerelu_class() -> type[nn.Module] | None:
    """Our SineReLU module, imported lazily; None while `deadneuron.torch.sinerelu` is not there."""
    try:
        from .sinerelu import SineReLU
    except ImportError:
        return None
    return SineReLU  # type: ignore[no-any-return]


def module_kinds() -> dict[type[nn.Module], str]:
    kinds = dict(_MODULE_KINDS)
    kinds.update(_ecosystem_kinds())
    sinerelu = _sinerelu_class()
    if sinerelu is not None:
        kinds[sinerelu] = "sinerelu"
    return kinds


def module_kind(module: nn.Module, kinds: dict[type[nn.Module], str]) -> str | None:
    """The kind of an activation module (subclasses included), or None. `nn.GELU(approximate="tanh")` is
    `gelu_tanh`, as its op is in an exported graph."""
    for cls in type(module).__mro__:
        kind = kinds.get(cls)
        if kind is not None:
            return "gelu_tanh" if kind == "gelu" and getattr(module, "approximate", None) == "tanh" else kind
    return None


def module_kinds_by_name() -> dict[str, str]:
    """Kinds keyed by 'module.QualName', as torch.export records classes in `nn_module_stack`; the ecosystem's
    classes by their names alone, so a loaded program's sites are named alike whatever this process imported."""
    names = {f"{module}.{name}": kind for module, classes in ECOSYSTEM_KINDS.items() for name, kind in classes.items()}
    return {**names, **{f"{cls.__module__}.{cls.__qualname__}": kind for cls, kind in module_kinds().items()}}


@dataclass(frozen=True)
class FunctionSpec:
    kind: str
    label: str  # the name used in site names: `owner.label()`
    inplace_arg: int | None = None  # position of an `inplace` flag, if the function takes one
    always_inplace: bool = False
    check: Callable[[tuple[Any, ...], dict[str, Any]], bool] | None = None  # extra condition on the arguments
    # The kind read from the arguments when they say more than the function does (gelu's approximate="tanh").
    variant: Callable[[tuple[Any, ...], dict[str, Any]], str | None] | None = None


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _clamp_is_relu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    low = kwargs.get("min", args[1] if len(args) > 1 else None)
    high = kwargs.get("max", args[2] if len(args) > 2 else None)
    return _is_zero(low) and high is None


def _clamp_min_is_relu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return _is_zero(kwargs.get("min", args[1] if len(args) > 1 else None))


def _gelu_variant(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    return "gelu_tanh" if kwargs.get("approximate", args[1] if len(args) > 1 else "none") == "tanh" else None


# F.selu's constants: a program in core ATen ops writes selu as elu(x, alpha, scale).
_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


def _elu_variant(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    alpha = kwargs.get("alpha", args[1] if len(args) > 1 else 1.0)
    scale = kwargs.get("scale", args[2] if len(args) > 2 else 1.0)
    numbers = all(isinstance(v, (int, float)) for v in (alpha, scale))
    return "selu" if numbers and math.isclose(alpha, _SELU_ALPHA) and math.isclose(scale, _SELU_SCALE) else None


def _folded_kind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    return args[1] if len(args) > 1 and isinstance(args[1], str) else None


def _has_folded_kind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return _folded_kind(args, kwargs) is not None


def _hardtanh_is_relu6(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return _is_zero(low) and high == 6


# In a node's `custom` metadata: the site name `swap.swap_exported` gave a functional ReLU it wrote out as SineReLU,
# which `decomposed.fold_sinerelu` and `sites.graph_sites` read back.
SWAPPED_SITE_KEY = "deadneuron_sinerelu_site"


def call_name(owner: str, label: str) -> str:
    """How a scan names a functional call: the calling module's path, a dot, the function and `()` (`block.relu()`)."""
    return f"{owner}.{label}()" if owner else f"{label}()"


def folded_sinerelu(x: torch.Tensor, epsilon: float, form: str, inplace: bool) -> torch.Tensor:
    """`deadneuron.torch.sinerelu.sinerelu`, visible to a `TorchFunctionMode` (a plain Python function is not).

    A scan of a swapped `.pt2` folds each SineReLU that `swap_exported` wrote out in aten ops back into one call
    of this (`decomposed.fold_sinerelu`), so the scan's functional-site machinery sees it as a "sinerelu" site.
    """
    if has_torch_function((x,)):
        return handle_torch_function(  # type: ignore[no-any-return]
            folded_sinerelu, (x,), x, epsilon, form, inplace
        )
    from .sinerelu import sinerelu

    return sinerelu(x, epsilon, form, inplace)  # type: ignore[arg-type]


def folded_activation(
    x: torch.Tensor, kind: str, body: Callable[[torch.Tensor], torch.Tensor], inplace: bool = False
) -> torch.Tensor:
    """`body(x)`, visible to a `TorchFunctionMode` as one activation call of `kind`.

    An activation module that torch.export wrote out in primitive ops (GPT-2's `NewGELUActivation`: pow, mul, add,
    tanh; ReLUSquared's relu and square) is folded into one call of this (`decomposed.fold_activation_scopes`),
    `body` being those ops, so a scan sees one site where the eager model has one module. `inplace`: `body` writes
    its result into `x` (a timm activation made with `inplace=True`), as an in-place module does.
    """
    if has_torch_function((x,)):
        return handle_torch_function(folded_activation, (x,), x, kind, body, inplace)  # type: ignore[no-any-return]
    return body(x)


def _functional_specs() -> dict[Any, FunctionSpec]:
    T = torch.Tensor
    specs: dict[Any, FunctionSpec] = {
        F.relu: FunctionSpec("relu", "relu", inplace_arg=1),
        torch.relu: FunctionSpec("relu", "relu"),
        T.relu: FunctionSpec("relu", "relu"),
        torch.relu_: FunctionSpec("relu", "relu", always_inplace=True),
        T.relu_: FunctionSpec("relu", "relu", always_inplace=True),
        F.relu6: FunctionSpec("relu6", "relu6", inplace_arg=1),
        F.hardtanh: FunctionSpec("relu6", "relu6", inplace_arg=3, check=_hardtanh_is_relu6),
        F.leaky_relu: FunctionSpec("leaky_relu", "leaky_relu", inplace_arg=2),
        F.leaky_relu_: FunctionSpec("leaky_relu", "leaky_relu", always_inplace=True),
        F.prelu: FunctionSpec("prelu", "prelu"),
        torch.prelu: FunctionSpec("prelu", "prelu"),
        F.elu: FunctionSpec("elu", "elu", inplace_arg=2),
        F.elu_: FunctionSpec("elu", "elu", always_inplace=True),
        F.celu: FunctionSpec("celu", "celu", inplace_arg=2),
        F.selu: FunctionSpec("selu", "selu", inplace_arg=1),
        torch.selu: FunctionSpec("selu", "selu"),
        F.gelu: FunctionSpec("gelu", "gelu", variant=_gelu_variant),
        F.silu: FunctionSpec("silu", "silu", inplace_arg=1),
        F.hardswish: FunctionSpec("hardswish", "hardswish", inplace_arg=1),
        F.mish: FunctionSpec("mish", "mish", inplace_arg=1),
        F.softplus: FunctionSpec("softplus", "softplus"),
        folded_sinerelu: FunctionSpec("sinerelu", "sinerelu", inplace_arg=3),
        folded_activation: FunctionSpec(
            "", "activation", inplace_arg=3, check=_has_folded_kind, variant=_folded_kind
        ),
    }
    from .sinerelu import sinerelu

    specs[sinerelu] = FunctionSpec("sinerelu", "sinerelu", inplace_arg=3)
    fn: Any
    for fn in (torch.clamp, T.clamp, torch.clip, T.clip):
        specs[fn] = FunctionSpec("relu", fn.__name__, check=_clamp_is_relu)
    for fn in (torch.clamp_, T.clamp_, torch.clip_, T.clip_):
        specs[fn] = FunctionSpec("relu", fn.__name__.rstrip("_"), always_inplace=True, check=_clamp_is_relu)
    for fn in (torch.clamp_min, T.clamp_min):
        specs[fn] = FunctionSpec("relu", "clamp_min", check=_clamp_min_is_relu)
    for fn in (torch.clamp_min_, T.clamp_min_):
        specs[fn] = FunctionSpec("relu", "clamp_min", always_inplace=True, check=_clamp_min_is_relu)
    return specs


def _aten_specs() -> dict[Any, FunctionSpec]:
    """Activation ops as they appear in torch.export graphs, keyed by overload packet."""
    aten = torch.ops.aten
    plain = {
        "relu": "relu",
        "relu6": "relu6",
        "leaky_relu": "leaky_relu",
        "prelu": "prelu",
        "_prelu_kernel": "prelu",
        "rrelu": "rrelu",
        "elu": "elu",
        "celu": "celu",
        "selu": "selu",
        "gelu": "gelu",
        "silu": "silu",
        "hardswish": "hardswish",
        "mish": "mish",
        "softplus": "softplus",
    }
    specs: dict[Any, FunctionSpec] = {}
    for op, kind in plain.items():
        label = op.lstrip("_").replace("_kernel", "")
        variant = {"gelu": _gelu_variant, "elu": _elu_variant}.get(kind)
        specs[getattr(aten, op)] = FunctionSpec(kind, label, variant=variant)
        if hasattr(aten, op + "_"):
            specs[getattr(aten, op + "_")] = FunctionSpec(kind, label, always_inplace=True, variant=variant)
    specs[aten.hardtanh] = FunctionSpec("relu6", "relu6", check=_hardtanh_is_relu6)
    specs[aten.hardtanh_] = FunctionSpec("relu6", "relu6", always_inplace=True, check=_hardtanh_is_relu6)
    specs[aten.clamp] = FunctionSpec("relu", "clamp", check=_clamp_is_relu)
    specs[aten.clamp_] = FunctionSpec("relu", "clamp", always_inplace=True, check=_clamp_is_relu)
    specs[aten.clamp_min] = FunctionSpec("relu", "clamp_min", check=_clamp_min_is_relu)
    specs[aten.clamp_min_] = FunctionSpec("relu", "clamp_min", always_inplace=True, check=_clamp_min_is_relu)
    return specs


# Functions by identity, aten ops by overload packet.
SPECS = {**_functional_specs(), **_aten_specs()}


def _lookup(table: dict[Any, T], func: Any) -> T | None:
    """`table`'s entry for a function, or for an aten overload through its packet."""
    try:
        found = table.get(func)
    except TypeError:  # unhashable callables
        return None
    if found is None:
        packet = getattr(func, "overloadpacket", None)
        if packet is not None:
            found = table.get(packet)
    return found


def function_spec(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> FunctionSpec | None:
    """The spec of an activation call, or None when `func(*args, **kwargs)` is not one."""
    spec = _lookup(SPECS, func)
    if spec is None:
        return None
    if spec.check is not None and not spec.check(args, kwargs):
        return None
    kind = spec.variant(args, kwargs) if spec.variant is not None else None
    return spec if kind is None else replace(spec, kind=kind)


def is_inplace(spec: FunctionSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if spec.always_inplace:
        return True
    if spec.inplace_arg is None:
        return False
    if "inplace" in kwargs:
        return bool(kwargs["inplace"])
    return len(args) > spec.inplace_arg and args[spec.inplace_arg] is True


# Which axis holds units in a 3-D activation: the last op that shaped the tensor says. Conv/BatchNorm-style ops
# produce (N, C, L) maps (channels, axis 1); Linear/attention/LayerNorm produce (N, L, D) tokens (last axis).
CHANNELS = "channels"
TOKENS = "tokens"


_CONV_FUNCTIONS: tuple[Any, ...] = (
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, torch.conv1d,
    torch.conv2d, torch.conv3d,
)
_CONV_OPS = (
    "convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "_convolution", "mkldnn_convolution",
)
_DENSE_FUNCTIONS: tuple[Any, ...] = (
    F.linear, F.bilinear, torch.addmm, torch.matmul, torch.Tensor.matmul, torch.mm, torch.bmm,
)
_DENSE_OPS = ("linear", "addmm", "mm", "bmm", "matmul", "bilinear")
# Ops that shape a tensor without being a conv or dense layer: normalisations, pools, attention, embeddings.
_OTHER_CHANNELS: tuple[Any, ...] = (
    F.batch_norm, F.instance_norm, F.group_norm, F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d,
    F.adaptive_max_pool1d, torch.batch_norm,
)
_OTHER_CHANNEL_OPS = (
    "batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm", "group_norm", "instance_norm",
    "max_pool1d", "avg_pool1d",
)
_OTHER_TOKENS: tuple[Any, ...] = (
    torch.Tensor.bmm, torch.baddbmm, F.layer_norm, F.embedding, F.scaled_dot_product_attention,
    F.multi_head_attention_forward, *((F.rms_norm,) if hasattr(F, "rms_norm") else ()),
)
_OTHER_TOKEN_OPS = (
    "baddbmm", "layer_norm", "native_layer_norm", "embedding", "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "rms_norm",
)


def _table(value: str, functions: tuple[Any, ...], ops: tuple[str, ...]) -> dict[Any, str]:
    """{function or aten op packet: value} for the functions and the aten ops (by name) that exist here."""
    aten = torch.ops.aten
    table: dict[Any, str] = {fn: value for fn in functions}
    table.update({getattr(aten, op): value for op in ops if hasattr(aten, op)})
    return table


# "conv" or "dense": the layers after which a swapped SineReLU takes the conv or the dense epsilon.
LAYERS = {**_table("conv", _CONV_FUNCTIONS, _CONV_OPS), **_table("dense", _DENSE_FUNCTIONS, _DENSE_OPS)}
LAYOUT_PRODUCERS = {
    **_table(CHANNELS, _CONV_FUNCTIONS + _OTHER_CHANNELS, _CONV_OPS + _OTHER_CHANNEL_OPS),
    **_table(TOKENS, _DENSE_FUNCTIONS + _OTHER_TOKENS, _DENSE_OPS + _OTHER_TOKEN_OPS),
}


def layer_of(func: Any) -> str | None:
    """ "conv" or "dense" when `func` computes such a layer; None otherwise."""
    return _lookup(LAYERS, func)


def producer_layout(func: Any) -> str | None:
    """CHANNELS or TOKENS when `func` decides which axis of its (N, ., .) output holds units; None otherwise."""
    return _lookup(LAYOUT_PRODUCERS, func)


def default_unit_axis(ndim: int, layout: str | None) -> int:
    """design.md: axis 1 for conv maps and 2-D outputs; the last axis for (N, L, D) token sequences."""
    if ndim <= 1:
        return 0
    if ndim == 3 and layout == TOKENS:
        return 2
    return 1
