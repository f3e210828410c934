"""SineReLU written out in aten ops, and read back: the one place that knows the shape of the decomposition.

`swap.swap_exported` replaces each activation node of an `ExportedProgram` by SineReLU in aten ops (`decompose`), so
the saved program runs with plain `torch.export.load`, without deadneuron. The nodes are tagged as a SineReLU (in
`nn_module_stack` for a module; for a functional ReLU, the name a scan gives the call, in the nodes' `custom`
metadata). A scan of such a program folds each complete, tagged decomposition back into one call of
`kinds.folded_sinerelu` (`fold_sinerelu`), which its watcher sees as one `sinerelu` site under the ReLU's name.

torch.export also writes some activation modules of the ecosystem out in primitive ops (GPT-2's `NewGELUActivation`:
pow, mul, add, tanh). `fold_activation_scopes` folds each such module scope into one call of
`kinds.folded_activation` that runs the same ops, so the scan sees one site named and kinded as the eager module.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .kinds import (
    SWAPPED_SITE_KEY,
    call_name,
    folded_activation,
    folded_sinerelu,
    function_spec,
    is_inplace,
    module_kinds_by_name,
)
from .sinerelu import SineReLU

__all__ = [
    "activation_entry", "decompose", "fold", "fold_activation_scopes", "fold_sinerelu", "module_parts",
    "swapped_site_name",
    "without_activation_entry",
]

_QUARTER_PI = math.pi / 4
# How `decompose` tags a module's nodes in nn_module_stack.
_SINERELU_CLASS = f"{SineReLU.__module__}.{SineReLU.__qualname__}"


def activation_entry(node: torch.fx.Node) -> tuple[str, str] | None:
    """The (path, class) of the activation module that made this node, from `nn_module_stack`, if any."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return (path, name) if name in module_kinds_by_name() else None


def without_activation_entry(node: torch.fx.Node) -> dict[str, Any]:
    stack = dict(node.meta.get("nn_module_stack") or {})
    if activation_entry(node) is not None:
        stack.pop(list(stack)[-1])
    return stack


def decompose(graph: torch.fx.Graph, node: torch.fx.Node, epsilon: float, form: str) -> None:
    """Replace one activation node by SineReLU in aten ops; autograd's derivative of them is SineReLU's
    (clamp passes the gradient at its bound, so f'(0) = eps*(cos 0 + sin 0) = eps, as in `sinerelu`)."""
    aten = torch.ops.aten
    x = node.args[0]
    assert isinstance(x, torch.fx.Node)
    fake = x.meta.get("val")
    fake_mode = getattr(fake, "fake_mode", None)
    scale = epsilon * math.sqrt(2.0)
    meta = dict(node.meta)
    spec = function_spec(node.target, tuple(node.args), dict(node.kwargs))  # None for nothing but activations
    inplace = spec is not None and is_inplace(spec, tuple(node.args), dict(node.kwargs))
    # Say what the nodes are, so that a scan of the saved program folds them back into one SineReLU site
    # (`fold_sinerelu`) under the name the ReLU had. A module's nodes name SineReLU as their module's class
    # in nn_module_stack; a functional call's nodes carry the name a scan gives the call (`block.relu()`) in the
    # node's `custom` metadata, which torch.export saves and which adds no module (`torch.export.unflatten` builds
    # modules from nn_module_stack).
    entry = activation_entry(node)
    if entry is not None:
        stack = dict(meta["nn_module_stack"])
        stack[list(stack)[-1]] = (entry[0], _SINERELU_CLASS)
        meta["nn_module_stack"] = stack
    else:
        stack = meta.get("nn_module_stack") or {}
        owner = list(stack.values())[-1][0] if stack else ""
        name = call_name(owner, spec.label if spec is not None else "relu")
        meta["custom"] = {**(meta.get("custom") or {}), SWAPPED_SITE_KEY: name}
    base = f"{node.name}_sinerelu"

    def emit(op: Any, *args: Any) -> torch.fx.Node:
        new = graph.create_node("call_function", op, args, name=f"{base}_{op.overloadpacket.__name__}")
        new.meta = {k: v for k, v in meta.items() if k != "val"}
        if fake_mode is not None:
            with fake_mode:
                new.meta["val"] = op(*[a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args])
        return new

    with graph.inserting_before(node):
        if form == "max":
            shifted = emit(aten.sub.Tensor, x, _QUARTER_PI)
            sine = emit(aten.mul.Tensor, emit(aten.sin.default, shifted), scale)
            out = emit(aten.maximum.default, sine, x)
        else:
            positive = emit(aten.gt.Scalar, x, 0.0)
            # The sine sees min(z, 0): +inf must not become sin(inf) = nan.
            clamped = emit(aten.clamp.default, x, None, 0.0)
            shifted = emit(aten.sub.Tensor, clamped, _QUARTER_PI)
            sine = emit(aten.mul.Tensor, emit(aten.sin.default, shifted), scale)
            out = emit(aten.where.self, positive, x, sine)
        if inplace:
            out = emit(aten.copy_.default, x, out)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def fold_sinerelu(graph_module: torch.fx.GraphModule) -> int:
    """Fold each SineReLU that `decompose` wrote into aten ops back into one `folded_sinerelu` call.

    Changes `graph_module`'s graph in place (pass a copy: `ExportedProgram.module()` makes a new one each call);
    returns how many were folded. Only complete decompositions are folded: nodes tagged with SineReLU in their
    `nn_module_stack`, in the exact shape `decompose` writes (piecewise: gt, clamp, sub, sin, mul, where; max:
    sub, sin, mul, maximum; then `copy_` into the input when in place), whose intermediate values nothing else
    reads. epsilon comes back from the sine's factor (eps * sqrt(2)). The folded call computes what the live
    SineReLU module computes, so a scan measures the same site as in a model swapped with `deadneuron.swap`.
    """
    graph = graph_module.graph
    folded = 0
    for node in list(graph.nodes):
        if node.graph is not graph or node.op != "call_function":  # erased by an earlier fold
            continue
        match = _match_sinerelu(node)
        if match is None:
            continue
        x, epsilon, form, inplace, final, pattern = match
        _replace(graph, final, folded_sinerelu, (x, epsilon, form, inplace), pattern)
        folded += 1
    return _recompiled(graph_module, folded)


def _replace(graph: torch.fx.Graph, final: torch.fx.Node, target: Any, args: tuple[Any, ...], nodes: list[Any]) -> None:
    """One call of `target` in place of `nodes` (users first), `final` being the one whose value is read after."""
    with graph.inserting_before(final):
        new = graph.call_function(target, args)
    new.meta = dict(final.meta)
    final.replace_all_uses_with(new)
    for old in nodes:
        graph.erase_node(old)


def _recompiled(graph_module: torch.fx.GraphModule, folded: int) -> int:
    if folded:
        graph_module.graph.lint()
        graph_module.recompile()
    return folded


def fold(graph_module: torch.fx.GraphModule) -> int:
    """Both folds, in place: SineReLUs that `deadneuron swap` wrote out, then activation modules written out in
    primitive ops (`fold_activation_scopes`); how many sites were folded."""
    return fold_sinerelu(graph_module) + fold_activation_scopes(graph_module)


def fold_activation_scopes(graph_module: torch.fx.GraphModule) -> int:
    """Fold each activation module that torch.export wrote out in primitive ops into one `folded_activation` call.

    A scope is a run of consecutive nodes made by one call of an activation module of a known kind (the last entry
    of their `nn_module_stack`). It is folded when it reads exactly one tensor from outside (the pre-activation),
    exactly one of its nodes is read outside it (the output, of the pre-activation's shape), and it writes in place
    into nothing but its own intermediate values and its input (`_foldable`). Activation ops inside the scope are
    folded with it (ReLUSquared's relu, a hard-swish's relu6: their input and output are not the module's); only a
    scope whose output is one activation op applied to its input (`nn.ReLU`, a functional `gelu`) is left as it is,
    that op being the module's site already. The scope's nodes move into a graph module registered on
    `graph_module` (`deadneuron_scope_<k>`), which the folded call runs; the call keeps the output node's metadata,
    so the site is named by the module's path, as in the eager model. Changes `graph_module` in place; returns how
    many scopes were folded; a scope that does not fit stays as it is (not observed).
    """
    graph = graph_module.graph
    by_class = module_kinds_by_name()
    folded = 0
    for scope in _scopes(graph):
        found = _foldable(scope)  # after the folds before it: a scope's input may be a folded call
        if found is None:
            continue
        x, out, inplace = found
        body = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {x: body.placeholder("x")}
        for node in scope:
            env[node] = body.node_copy(node, env.__getitem__)
        body.output(env[out])
        name = f"deadneuron_scope_{folded}"
        while hasattr(graph_module, name):
            name += "_"
        graph_module.add_submodule(name, torch.fx.GraphModule(graph_module, body))
        entry = activation_entry(out)
        assert entry is not None  # `_scopes` made sure
        with graph.inserting_before(out):
            attribute = graph.get_attr(name)
        _replace(graph, out, folded_activation, (x, by_class[entry[1]], attribute, inplace), scope[::-1])
        folded += 1
    return _recompiled(graph_module, folded)


def module_parts(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The nodes of activation modules' scopes that are parts of the module rather than sites of their own: every
    node of a scope that `fold_activation_scopes` folds, and in a scope that it cannot fold, every node but an
    activation op from the scope's input to its output. A swap leaves them alone, as a swap of the eager model leaves
    such a module whole (ReLUSquared's relu, a hard-swish's relu6 or clamp(min=0)); a scan takes no activation op
    among them for a site (the module is listed as not observed when its scope does not fold)."""
    parts: set[torch.fx.Node] = set()
    for scope in _scopes(graph):
        if _foldable(scope) is not None:
            parts.update(scope)
        else:
            inside = set(scope)
            parts.update(node for node in scope if not _whole(node, inside))
    return parts


def _whole(node: torch.fx.Node, inside: set[torch.fx.Node]) -> bool:
    """Whether `node` is an activation op that is its module's whole computation: it reads a tensor from outside the
    scope and the graph reads its result outside the scope (`nn.ReLU`'s relu, `GELUActivation`'s gelu)."""
    return (
        bool(node.args)
        and isinstance(node.args[0], torch.fx.Node)
        and node.args[0] not in inside
        and any(user not in inside for user in node.users)
        and function_spec(node.target, tuple(node.args), dict(node.kwargs)) is not None
    )


def _scopes(graph: torch.fx.Graph) -> list[list[torch.fx.Node]]:
    """Runs of consecutive call_function nodes made by one call of one activation module."""
    scopes: list[list[torch.fx.Node]] = []
    key = None
    for node in graph.nodes:
        entry = activation_entry(node) if node.op == "call_function" else None
        if entry is None:
            key = None
            continue
        here = (list(node.meta["nn_module_stack"])[-1], entry)
        if here != key:
            scopes.append([])
            key = here
        scopes[-1].append(node)
    return scopes


def _foldable(scope: list[torch.fx.Node]) -> tuple[torch.fx.Node, torch.fx.Node, bool] | None:
    """(pre-activation, output, whether the scope writes into its input) of a scope that `fold_activation_scopes`
    folds, else None."""
    inside = set(scope)
    inputs: list[torch.fx.Node] = []
    outputs: list[torch.fx.Node] = []
    for node in scope:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in inputs:
                inputs.append(arg)
        if any(user not in inside for user in node.users):
            outputs.append(node)
    if len(inputs) != 1 or len(outputs) != 1 or inputs[0].op == "get_attr":
        return None
    x, out = inputs[0], outputs[0]
    if _whole(out, inside):
        return None  # one activation op from the module's input to its output: that op is the site already
    inplace = False
    for node in scope:
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            return None
        for written in _written(node, schema):
            origin = _origin(written, inside)
            if origin is x:
                inplace = True  # timm's `x.mul_(...)` with inplace=True: the folded call writes into x as well
            elif origin is None or origin not in inside:
                return None
    before, after = x.meta.get("val"), out.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return None
    if str(tuple(before.shape)) != str(tuple(after.shape)):  # an activation keeps its input's shape
        return None
    if inplace and _origin(out, inside) is not x:
        return None  # writes into its input but returns another tensor: the module's output is not its result
    return x, out, inplace


def _written(node: torch.fx.Node, schema: Any) -> list[Any]:
    """The arguments an op writes into (`self` of `mul_`, `out=`), as given to the node."""
    written = []
    for index, argument in enumerate(schema.arguments):
        info = argument.alias_info
        if info is None or not info.is_write:
            continue
        if argument.kwarg_only or index >= len(node.args):
            written.append(node.kwargs.get(argument.name))
        else:
            written.append(node.args[index])
    return written


def _origin(value: Any, inside: set[torch.fx.Node]) -> Any:
    """Whose storage `value` is: views and in-place results are followed back to the tensor they alias while that is
    in the scope, ending at a node of the scope that made a new tensor or at the node outside the scope the aliases
    lead to; None when an alias cannot be followed (every node of the scope has a schema: `_foldable` checks)."""
    while isinstance(value, torch.fx.Node) and value in inside:
        schema = value.target._schema  # type: ignore[union-attr]
        returned = schema.returns[0].alias_info if schema.returns else None
        if returned is None:
            return value  # a new tensor
        sources = [
            arg
            for arg, argument in zip(value.args, schema.arguments, strict=False)
            if argument.alias_info is not None and argument.alias_info.before_set == returned.before_set
        ]
        if len(sources) != 1:
            return None
        value = sources[0]
    return value


def swapped_site_name(node: Any) -> str | None:
    """The site name `swap_exported` gave a functional ReLU it wrote out as SineReLU (in `custom` metadata)."""
    custom = node.meta.get("custom") if isinstance(node, torch.fx.Node) else None
    name = custom.get(SWAPPED_SITE_KEY) if isinstance(custom, dict) else None
    return name if isinstance(name, str) else None


def _tagged(node: Any) -> bool:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if swapped_site_name(node) is not None:
        return True
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return False
    cls = list(stack.values())[-1][1]
    name = cls if isinstance(cls, str) else f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', '')}"
    return name == _SINERELU_CLASS


def _is(node: Any, op: Any) -> bool:
    return _tagged(node) and node.target is op


def _first_arg(node: Any) -> Any:
    return node.args[0] if _tagged(node) and node.args else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sine_branch(mul: Any, argument: Any) -> tuple[float, list[torch.fx.Node]] | None:
    """`mul(sin(sub(argument, pi/4)), scale)` -> (scale, [mul, sin, sub])."""
    aten = torch.ops.aten
    if not _is(mul, aten.mul.Tensor) or len(mul.args) != 2 or not _number(mul.args[1]):
        return None
    sine = mul.args[0]
    if not _is(sine, aten.sin.default):
        return None
    sub = sine.args[0]
    if not _is(sub, aten.sub.Tensor) or len(sub.args) != 2 or sub.kwargs or sub.args[0] is not argument:
        return None
    if not _number(sub.args[1]) or abs(float(sub.args[1]) - math.pi / 4) > 1e-12:
        return None
    return float(mul.args[1]), [mul, sine, sub]


def _epsilon(scale: float) -> float | None:
    """The epsilon whose eps * sqrt(2) is `scale` (as `decompose` computed it), or None if none is valid."""
    root = math.sqrt(2.0)
    guess = scale / root
    for candidate in (guess, math.nextafter(guess, math.inf), math.nextafter(guess, -math.inf)):
        if candidate * root == scale:
            guess = candidate
            break
    return guess if math.isfinite(guess) and guess >= 0 else None


def _match_sinerelu(
    end: torch.fx.Node,
) -> tuple[torch.fx.Node, float, str, bool, torch.fx.Node, list[torch.fx.Node]] | None:
    """(x, epsilon, form, inplace, final node, nodes to erase users-first) when `end` ends a decomposition."""
    aten = torch.ops.aten
    args: tuple[Any, ...] = tuple(end.args)
    positive: Any
    x: Any
    mul: Any
    if _is(end, aten.where.self) and len(args) == 3:
        positive, x, mul = args
        clamp = _first_arg(_first_arg(_first_arg(mul)))  # mul(sin(sub(clamp, ...)), ...)
        if not (
            _is(clamp, aten.clamp.default)
            and tuple(clamp.args) == (x, None, 0.0)
            and not clamp.kwargs
            and _is(positive, aten.gt.Scalar)
            and tuple(positive.args) == (x, 0.0)
        ):
            return None
        branch = _sine_branch(mul, clamp)
        form = "piecewise"
        inner = [positive, clamp]
    elif _is(end, aten.maximum.default) and len(args) == 2:
        mul, x = args
        branch = _sine_branch(mul, x)
        form = "max"
        inner = []
    else:
        return None
    if branch is None or not isinstance(x, torch.fx.Node):
        return None
    scale, chain = branch
    epsilon = _epsilon(scale)
    if epsilon is None:
        return None
    pattern = [end, *chain, *inner]
    # Nothing outside the decomposition may read its intermediate values.
    if any(user not in pattern for node in pattern[1:] for user in node.users):
        return None
    final, inplace = end, False
    users = list(end.users)
    if len(users) == 1 and _is(users[0], aten.copy_.default) and tuple(users[0].args) == (x, end):
        final, inplace = users[0], True
        pattern.insert(0, final)
    return x, epsilon, form, inplace, final, pattern
