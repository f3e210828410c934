"""Swapping ReLU for SineReLU in a PyTorch model: a new model, the original untouched (design.md, issue 5).

Three kinds of model, three mechanisms:
- An eager `nn.Module` is deep-copied. Every activation module of a swapped kind (`nn.ReLU`, in-place or not;
  `nn.ReLU6`/`nn.LeakyReLU` on request) is replaced by a `SineReLU` with the same `inplace` flag, in one recursive
  pass that replaces a child only where it changes (a module shared by two parents stays shared). Functional calls
  (`F.relu`, `torch.relu`, `Tensor.relu`/`relu_`, `clamp(min=0)`, ...) cannot be edited out of the model's code: the
  copy's `forward` is wrapped on the instance so that every call of it runs under a `TorchFunctionMode` that sends
  those calls to SineReLU (left out when every module is torch.nn's own, as in an `nn.Sequential` of built-in
  layers: no code there can make such a call, and the mode costs a Python call per torch function). The swapped
  model therefore works when called normally, with no context manager. The functional calls go through two
  SineReLU modules (after a conv, after a dense layer) that are kept on the side, not registered as submodules (an
  `nn.Sequential` would run them); a scan sees each call as a functional
  `sinerelu()` site of the module that made it (one site per call, in order).
- A graph module from `torch.export` (`ExportedProgram.module()`) gets its activation nodes replaced by calls of
  `SineReLU` submodules registered at the activation's module path (`relu1`), so site names are unchanged.
- An `ExportedProgram` gets its activation nodes rewritten into the SineReLU formula written with aten ops (`where(z
  > 0, z, eps*sqrt(2)*sin(min(z, 0) - pi/4))`), so the program saved with `torch.export.save` loads and runs with
  plain `torch.export.load`, without deadneuron installed. The new nodes are tagged as a SineReLU (in
  `nn_module_stack` for a module; for a functional ReLU, the name a scan gives the call, in the nodes' `custom`
  metadata), so that a scan of the saved program folds each back into one site under the ReLU's name
  (`decomposed.fold_sinerelu`).

Epsilon per site (design.md: the article's 0.0025 after convolutions, 0.025 after dense layers). "After" means:
- for a module site, the nearest Conv/Linear module before it in the model's registration order (`named_modules()`);
  for functional calls, the last convolution or linear function executed before the call; in a graph, the last
  convolution or linear node before the activation node;
- with no convolution or linear layer before a site, the first one after it decides; with none at all, the conv
  value (SineReLU's default, 0.0025).
"""

from __future__ import annotations

import copy
import sys
import types
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.options import SwapKeywords, SwapOptions
from ..core.swap import nearest, write_then_rename
from ..errors import DeadNeuronError
from .decomposed import activation_entry, decompose, fold, module_parts, without_activation_entry
from .kinds import function_spec, is_inplace, layer_of, module_kind, module_kinds
from .sinerelu import SineReLU

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "copy_model", "site_epsilons", "swap", "swap_exported", "swap_file", "swap_for_scan", "swap_graph_module",
    "swap_model", "swap_module",
]


_CONV_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_DENSE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear)


def swap(model: Any, **options: Unpack[SwapKeywords]) -> Any:
    """A new model with every ReLU site replaced by SineReLU; `model` is left as it was.

    An `nn.Module` gives an `nn.Module`, an `ExportedProgram` gives an `ExportedProgram` that runs without
    deadneuron, a torch.export graph module gives a graph module.
    """
    return swap_model(model, SwapOptions.make(**options))


def swap_model(model: Any, options: SwapOptions) -> Any:
    """`swap` with its options checked (`SwapOptions`)."""
    if isinstance(model, torch.export.ExportedProgram):
        return swap_exported(model, options)
    if isinstance(model, torch.jit.ScriptModule):
        raise DeadNeuronError(
            "cannot swap activations inside a TorchScript module; expected an nn.Module or a torch.export "
            "program: swap the eager model, or re-export it with torch.export.export(model, example_inputs)"
        )
    if not isinstance(model, nn.Module):
        raise DeadNeuronError(
            f"cannot swap a {type(model).__name__}; expected a torch.nn.Module or an ExportedProgram"
        )
    original = getattr(model, "_orig_mod", None)
    if isinstance(
        original, nn.Module
    ):  # torch.compile: swap the module it compiled; compile the result again
        model = original
    if isinstance(model, torch.fx.GraphModule) and _graph_activation_nodes(model.graph, options.include):
        return swap_graph_module(model, options)
    return swap_module(model, options)


def swap_for_scan(model: Any, options: SwapOptions) -> Any:
    """The swap that a comparison scans: as `swap_model`, except that an `ExportedProgram` becomes a graph module
    whose SineReLUs are submodules at the ReLUs' module paths, so the scan sees them under the same names (and
    what the scan of the program folds is folded first: SineReLUs written out by an earlier swap, activation modules
    written out in primitive ops, which stay as they are, as a swap of the eager model leaves them)."""
    if isinstance(model, torch.export.ExportedProgram):
        module = model.module()
        fold(module)
        return swap_graph_module(module, options)
    return swap_model(model, options)


def copy_model(model: Any) -> Any:
    """A deep copy of a module or program (torch's pytree deprecation noise silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecation noise when copying graphs
        return copy.deepcopy(model)


# Eager modules
# --------------------------------------------------------------------------------------------------
def site_epsilons(model: nn.Module, options: SwapOptions) -> dict[str, float]:
    """The epsilon each activation module of `model` gets, by qualified name (the registration-order rule)."""
    kinds = module_kinds()
    entries = list(model.named_modules())
    layers: list[str | None] = [
        "conv" if isinstance(m, _CONV_MODULES) else "dense" if isinstance(m, _DENSE_MODULES) else None
        for _, m in entries
    ]
    chosen: dict[str, float] = {}
    for index, (name, module) in enumerate(entries):
        if module_kind(module, kinds) in options.include:
            chosen[name] = options.epsilons[nearest(layers, index)]
    return chosen


def swap_module(model: nn.Module, options: SwapOptions) -> nn.Module:
    swapped = copy_model(model)
    kinds = module_kinds()
    by_id = {
        id(m): eps
        for name, eps in site_epsilons(swapped, options).items()
        for m in [swapped.get_submodule(name)]
    }
    replaced: dict[int, nn.Module] = {}

    def replacement(module: nn.Module) -> nn.Module | None:
        if id(module) in replaced:
            return replaced[id(module)]
        if id(module) not in by_id or module_kind(module, kinds) not in options.include:
            return None
        new = SineReLU(by_id[id(module)], options.form, inplace=bool(getattr(module, "inplace", False)))
        new.train(module.training)
        replaced[id(module)] = new
        return new

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(parent, name, new)
            else:
                _swap_activation_attribute(child, options)
                visit(child)

    root = replacement(swapped)
    if root is not None:  # the model is itself a ReLU
        return root
    visit(swapped)
    if _may_call_functional_activations(swapped):
        _install_functional(swapped, options)
    return swapped


def _may_call_functional_activations(model: nn.Module) -> bool:
    """False only when no code of the model can call a functional activation: every module is one of torch.nn's own
    (their forwards call only the functions of their own kind, and their activation modules were replaced where
    swapped) or a SineReLU, with no forward set on an instance, no hook and no function-valued `activation` left.
    Then the functional TorchFunctionMode is left out: it costs a Python call per torch function in every forward
    (~0.4 ms of a batch-32 LeNet-5 forward of ~2.5 ms here, issue 15) and would have nothing to swap."""
    for module in model.modules():
        if not (isinstance(module, SineReLU) or type(module).__module__.startswith("torch.nn.modules.")):
            return True
        if "forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks:
            return True
        activation = module.__dict__.get("activation")
        if callable(activation) and not isinstance(activation, nn.Module):
            return True
    return False


def _swap_activation_attribute(module: nn.Module, options: SwapOptions) -> None:
    """`nn.TransformerEncoderLayer`/`DecoderLayer` keep `activation=F.relu` as a plain function attribute
    and, in eval mode without gradients, take a fused fast path that never calls it. Make it a SineReLU module
    (a site named `layer.activation`, epsilon of a dense layer: it follows `linear1`); no fast path."""
    activation = module.__dict__.get("activation")
    spec = function_spec(activation, (), {}) if callable(activation) else None
    if spec is None or spec.kind not in options.include or isinstance(activation, nn.Module):
        return
    del module.activation
    module.activation = SineReLU(options.epsilons["dense"], options.form)
    if hasattr(module, "activation_relu_or_gelu"):
        setattr(module, "activation_relu_or_gelu", 0)  # noqa: B010  (typed as a Module attribute)


class _Functional:
    """What the wrapped forward of a swapped module needs; deep-copied with the module.

    The SineReLU modules for functional calls are kept here, not registered as submodules: an extra child would be
    run by `nn.Sequential.forward` (which calls every child), show up in `len()`, indexing and `named_modules()`, and
    they hold no parameters or buffers to move or save.
    """

    def __init__(
        self, include: tuple[str, ...], modules: dict[str, SineReLU], inner: Any, kept: tuple[types.CodeType, ...]
    ) -> None:
        self.include = include
        self.modules = modules  # "conv" and "dense": the SineReLU that functional calls after such a layer go to
        self.inner = inner  # an instance-level forward the model had before the swap, or None
        # The code of the forwards of the activation modules the swap left in the model, and their ids: a frame's
        # code is looked up by id (hashing a code object costs ~0.5 us, and every frame of the stack is looked up).
        self.kept = kept
        self.kept_ids = frozenset(map(id, kept))


def _install_functional(model: nn.Module, options: SwapOptions) -> None:
    modules = {layer: SineReLU(options.epsilons[layer], options.form) for layer in ("conv", "dense")}
    inner = model.__dict__.get("forward")
    kinds = module_kinds()
    # Activation modules left in the model are of kinds the swap leaves alone (the others were replaced), and a
    # functional call in their forward is part of them: ReLUSquared's relu, a hard-swish's relu6.
    kept = tuple({type(m).forward.__code__ for m in model.modules() if module_kind(m, kinds) is not None})
    model._deadneuron_functional = _Functional(options.include, modules, inner, kept)  # type: ignore[assignment]
    # A bound method: `copy.deepcopy` rebinds it to the copy, so copies of the swapped model stay swapped.
    model.forward = types.MethodType(_swapped_forward, model)  # type: ignore[method-assign]


def _swapped_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    config: _Functional = self._deadneuron_functional  # type: ignore[assignment]
    forward = config.inner if config.inner is not None else types.MethodType(type(self).forward, self)
    with _FunctionalSwap(config.modules, config.include, config.kept_ids):
        return forward(*args, **kwargs)


class _FunctionalSwap(TorchFunctionMode):
    """Sends functional ReLU calls to SineReLU modules while the swapped model's forward runs.

    Calls with `out=` are never the model's activations (SineReLU's own kernels write through `out=`), and
    activation modules of a swapped kind were all replaced, so no activation is handled twice. Calls made inside an
    activation module the swap left alone (`kept`: the ids of their forwards' code) are parts of that module and stay:
    swapping ReLUSquared's relu would make relu(x)**2 a SineReLU(x)**2 that nobody asked for.
    """

    def __init__(self, modules: dict[str, SineReLU], include: tuple[str, ...], kept: frozenset[int]) -> None:
        super().__init__()
        self.sites = modules
        self.include = include
        self.kept = kept
        self.last: str | None = None  # "conv" or "dense": the last such function executed

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        layer = layer_of(func)
        if layer is not None:
            self.last = layer
            return func(*args, **kwargs)
        if kwargs.get("out") is not None or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        spec = function_spec(func, args, kwargs)
        if spec is None or spec.kind not in self.include or not args[0].is_floating_point() or self._in_kept():
            return func(*args, **kwargs)
        site = self.sites[self.last or "conv"]
        x = args[0]
        if is_inplace(spec, args, kwargs):
            # In place under autograd: compute on a copy of the input, then write into it (field notes).
            return x.copy_(site(x.clone()))
        return site(x)

    def _in_kept(self) -> bool:
        """Whether the call is made (at any depth) by the forward of an activation module left alone: the frames
        of the model's forward are walked up to the swapped forward that entered this mode."""
        if not self.kept:
            return False
        frame = sys._getframe(2)
        while frame is not None and frame.f_code is not _SWAPPED_FORWARD:
            if id(frame.f_code) in self.kept:
                return True
            frame = frame.f_back  # type: ignore[assignment]
        return False


_SWAPPED_FORWARD = _swapped_forward.__code__


# Graphs from torch.export
# ---------------------------------------------------------------------------------------
def _graph_activation_nodes(graph: torch.fx.Graph, include: tuple[str, ...]) -> list[torch.fx.Node]:
    """The activation nodes of the kinds `include`, but not those that are parts of an activation module of another
    kind (ReLUSquared's relu, a hard-swish's relu6, `decomposed.module_parts`): the eager swap leaves those modules
    whole, so the program's swap does too."""
    found = []
    parts = module_parts(graph)
    for node in graph.nodes:
        if node.op != "call_function" or getattr(node.target, "overloadpacket", None) is None or node in parts:
            continue
        spec = function_spec(node.target, tuple(node.args), dict(node.kwargs))
        if spec is not None and spec.kind in include:
            found.append(node)
    return found


def _graph_epsilons(
    graph: torch.fx.Graph, nodes: list[torch.fx.Node], options: SwapOptions
) -> dict[torch.fx.Node, float]:
    order = list(graph.nodes)
    layers = [layer_of(n.target) if n.op == "call_function" else None for n in order]
    position = {n: i for i, n in enumerate(order)}
    return {n: options.epsilons[nearest(layers, position[n])] for n in nodes}


def swap_graph_module(model: torch.fx.GraphModule, options: SwapOptions) -> torch.fx.GraphModule:
    """Activation nodes of a torch.export graph module become calls of SineReLU submodules (named sites)."""
    swapped = copy_model(model)
    graph = swapped.graph
    nodes = _graph_activation_nodes(graph, options.include)
    epsilons = _graph_epsilons(graph, nodes, options)
    made: dict[str, SineReLU] = {}
    for index, node in enumerate(nodes):
        spec = function_spec(node.target, tuple(node.args), dict(node.kwargs))
        inplace = spec is not None and is_inplace(spec, tuple(node.args), dict(node.kwargs))
        entry = activation_entry(node)
        path = _free_path(swapped, entry[0] if entry and entry[0] else f"sinerelu_{index}", made)
        if path not in made:
            made[path] = SineReLU(epsilons[node], options.form, inplace=inplace)
            swapped.add_submodule(path, made[path])
        with graph.inserting_before(node):
            new = graph.call_module(path, (node.args[0],))
        new.meta = {**node.meta, "nn_module_stack": without_activation_entry(node)}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    swapped.recompile()
    return swapped


def _free_path(module: nn.Module, path: str, made: dict[str, SineReLU]) -> str:
    candidate, k = path, 2
    while candidate not in made and _taken(module, candidate):
        candidate, k = f"{path}_{k}", k + 1
    return candidate


def _taken(module: nn.Module, path: str) -> bool:
    target: Any = module
    for part in path.split("."):
        if not hasattr(target, part):
            return False
        target = getattr(target, part)
    return True


def swap_exported(program: torch.export.ExportedProgram, options: SwapOptions) -> torch.export.ExportedProgram:
    """A new ExportedProgram whose activation nodes compute SineReLU with aten ops only."""
    swapped = copy_model(program)
    graph = swapped.graph_module.graph
    nodes = _graph_activation_nodes(graph, options.include)
    epsilons = _graph_epsilons(graph, nodes, options)
    for node in nodes:
        decompose(graph, node, epsilons[node], options.form)
    graph.lint()
    swapped.graph_module.recompile()
    return swapped


def swap_file(model: Any, output: str, options: SwapOptions) -> int:
    """Swap a loaded `.pt2` program and save it to `output` (written then renamed); the number of sites swapped."""
    if not isinstance(model, torch.export.ExportedProgram):
        raise DeadNeuronError(
            f"expected a torch.export program from a .pt2 file, received {type(model).__name__}"
        )
    count = len(_graph_activation_nodes(model.graph_module.graph, options.include))
    swapped = swap_exported(model, options)
    write_then_rename(lambda path: torch.export.save(swapped, path), output)
    return count
