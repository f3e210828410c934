"""What a `.pt2` program may hold, checked before and after torch's deserializer builds it (`pt2.py` reads the
archive): graph targets from an allowlist of compute operators whose schemas take data only, symbolic-shape
expressions of a strict grammar (never Python), no `guards_code`, inputs keyed by plain names; and the guard that
keeps torch's deserializer to weights-only unpickling and plain sympy parsing while it runs.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import DeadNeuronError

EXPECTED = "a file written by torch.export.save"
MODEL = "model"  # torch.export.save names its one program "model"

# Graph targets that are not aten-style operators: the scalar shape arithmetic torch.export emits.
_SCALAR_OPS = frozenset(
    """add sub mul truediv floordiv mod pow neg pos eq ne lt le gt ge and_ or_ xor not_ lshift rshift getitem
    trunc abs sym_int sym_float sym_max sym_min sym_ite sym_not sym_sqrt _sym_sqrt sym_sum floor ceil""".split()
)
_SCALAR_HOMES = {"_operator": operator, "operator": operator, "math": math, "torch": torch}
_HIGHER_ORDER = frozenset({"cond", "while_loop", "map_impl", "wrap_with_set_grad_enabled"})
_OPERATOR_NAMESPACES = frozenset({"aten", "prims"})
OWN_NAMESPACE = "deadneuron"  # ops our package registers (a swapped .pt2 may call them)
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_OPERATOR_TARGET = re.compile(rf"torch\.ops\.({_NAME})\.({_NAME})(?:\.({_NAME}))?")
_SCALAR_TARGET = re.compile(r"(_operator|operator|math|torch)\.([A-Za-z_][A-Za-z0-9_]*)")

# Schema argument types an allowed operator may take: data, never names of files, storages or objects.
_SAFE_ARG_TYPES = frozenset(
    """Tensor int SymInt float bool number Scalar complex ScalarType Layout Device MemoryFormat Generator
    Dimname NoneType SymBool SymFloat""".split()
)
# `str` arguments that select a mode or carry a message; any other `str` (a file name...) is refused.
_SAFE_STR_ARGS = frozenset(
    """approximate assert_msg rounding_mode equation indexing interpolation mode norm ord p pad_mode padding
    padding_side reduce side UPLO driver""".split()
)
_TYPE_WRAPPER = re.compile(r"^(?:Optional|List)\[(.*)\]$")
# Characters that end a line of Python source: text holding them could leave a comment in generated code.
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00]")


def refuse(where: str, problem: str, fix: str = f"expected {EXPECTED}") -> DeadNeuronError:
    """'WHERE PROBLEM; refused (...); FIX', the one line for a file the allowlists do not admit."""
    what = f"{where} {problem}".strip().rstrip(";:,")
    return DeadNeuronError(f"{what}; refused (loading it could run code or exhaust memory); {fix}")


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """During torch.export.load only: every torch.load is weights-only, whatever the caller asked for, and
    `sympy.sympify` reads only plain symbolic-shape expressions.

    torch.export.load retries a failed safe load with full unpickling, and it parses the shape expressions of
    the program's JSON with `sympy.sympify`, which evaluates Python; this closes both doors (the archive's
    expressions were already checked by `check_program_json`; this also covers any path that check did not foresee).
    """
    import sympy

    original = torch.load
    original_sympify = sympy.sympify

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    def plain_sympify(a: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(a, str):
            problem = _unsafe_expression(a)
            if problem:
                raise DeadNeuronError(
                    f"a shape expression {a[:80]!r} holds {problem}, which is not a plain expression; refused "
                    "(parsing it would run Python code)"
                )
        return original_sympify(a, *args, **kwargs)

    torch.load = weights_only_load  # type: ignore[assignment]
    sympy.sympify = plain_sympify
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]
        sympy.sympify = original_sympify


# Names a symbolic-shape expression may call or mention (sympy's printed forms, torch's shape functions).
_SYMPY_NAMES = frozenset(
    """Symbol Integer Rational Float Add Mul Pow Max Min Mod floor ceiling Abs sqrt Eq Ne Lt Le Gt Ge
    StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not Xor Piecewise
    ExprCondPair oo zoo nan true false True False None""".split()
)
_PLAIN_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9.eE+\-/]+")
_SYMBOL_NAME = re.compile(r"[a-z]+([0-9]+)")
# torch numbers its symbols s0, s1, ... (backed sizes: a hash modulo 100, then the next free one) and u0, u1, ...
# (unbacked values); its deserializer counts up to the largest index of a range constraint's symbol one step at a
# time, so an index of 10**11 would hang the load for hours.
_SYMBOL_INDEX_LIMIT = 1 << 20
# Functions that raise to a power: like `**`, their exponent must be small, or parsing could take forever.
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift", "RShift"})
_EXPRESSION_LIMIT = 4096
_EXPONENT_LIMIT = 64


def _shape_function_names() -> frozenset[str]:
    import sympy
    import torch.utils._sympy.functions as shape_functions  # the functions torch's own deserializer allows

    return frozenset(
        name
        for name in dir(shape_functions)
        if not name.startswith("_")
        and isinstance(getattr(shape_functions, name), type)
        and issubclass(getattr(shape_functions, name), sympy.Basic)
    )


def _unsafe_expression(text: str) -> str | None:
    """What makes `text` more than a symbolic-shape expression, or None when it is plain.

    A strict grammar on Python's own parse of the text: numbers, symbol names, the sympy and torch shape
    functions, arithmetic and comparisons; no attribute access, no other names, no strings but plain names.
    Powers take a small literal or a symbol as exponent and do not nest, so parsing cannot blow up
    (`2**2**2**40` would take forever to evaluate)."""
    import ast

    if len(text) > _EXPRESSION_LIMIT:
        return f"{len(text)} characters (more than {_EXPRESSION_LIMIT})"
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "text that does not parse"
    allowed = _SYMPY_NAMES | _shape_function_names()

    def has_power(node: ast.AST) -> bool:
        return any(
            (isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow))
            or (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _POWERS)
            for n in ast.walk(node)
        )

    def power_problem(base: ast.AST, exponent: ast.AST) -> str | None:
        if has_power(base) or has_power(exponent):
            return "a power of a power"
        if isinstance(exponent, ast.UnaryOp) and isinstance(exponent.op, (ast.USub, ast.UAdd)):
            exponent = exponent.operand
        if isinstance(exponent, ast.Name):
            return None
        if isinstance(exponent, ast.Constant) and isinstance(exponent.value, (int, float)):
            return None if abs(exponent.value) <= _EXPONENT_LIMIT else f"the exponent {exponent.value}"
        return "a computed exponent"

    binary = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd, ast.BitOr)
    compare = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
    for node in ast.walk(tree):
        unary = (ast.USub, ast.UAdd, ast.Not, ast.Invert)
        plain = (ast.Expression, ast.Load, ast.keyword, ast.Compare, ast.Tuple)  # tuples: Piecewise's pairs
        if isinstance(node, (*plain, *binary, *compare, *unary)):
            continue
        if isinstance(node, ast.BinOp):
            if not isinstance(node.op, binary):
                return f"the operator {type(node.op).__name__}"
            if isinstance(node.op, ast.Pow) and (problem := power_problem(node.left, node.right)):
                return problem
        elif isinstance(node, ast.UnaryOp):
            continue  # its operator is one of `unary` or refused as a node of its own
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in allowed:
                return f"a call of {ast.unparse(node.func)[:40]!r}"
            for keyword in node.keywords:
                value = keyword.value
                if not (keyword.arg and re.fullmatch(r"[a-z]+", keyword.arg) and isinstance(value, ast.Constant)
                        and isinstance(value.value, bool)):
                    return f"the argument {ast.unparse(keyword)[:40]!r}"
            if node.func.id in _POWERS and len(node.args) == 2 and (problem := power_problem(*node.args)):
                return problem
        elif isinstance(node, ast.Name):
            if node.id not in allowed and not _SYMBOL_NAME.fullmatch(node.id):
                return f"the name {node.id!r}"
            if problem := _symbol_index_problem(node.id):
                return problem
        elif isinstance(node, ast.Constant):
            constant = node.value
            if isinstance(constant, str) and not _PLAIN_STRING.fullmatch(constant):
                return f"the string {constant[:40]!r}"
            if isinstance(constant, str) and (problem := _symbol_index_problem(constant)):
                return problem
            if isinstance(constant, int) and not isinstance(constant, bool) and abs(constant) > 2**64:
                return f"the number {str(constant)[:20]}..."
            if not isinstance(constant, (str, int, float, type(None))):
                return f"the constant {constant!r:.40}"
        else:
            return f"{type(node).__name__.lower()} syntax"
    return None


def _symbol_index_problem(name: str) -> str | None:
    """Why the symbol `name` (s3, u12) has an implausibly large index, or None."""
    match = _SYMBOL_NAME.fullmatch(name)
    if match and (len(match.group(1)) > 9 or int(match.group(1)) > _SYMBOL_INDEX_LIMIT):
        return f"the symbol {name[:40]!r}, whose index is larger than {_SYMBOL_INDEX_LIMIT:,}"
    return None


def _expressions(value: Any) -> Iterator[str]:
    """Every string of a program's JSON that torch.export.load hands to sympy: `expr_str` values and the
    keys of `range_constraints`."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "expr_str" and isinstance(item, str):
                yield item
            elif key == "range_constraints" and isinstance(item, dict):
                yield from (k for k in item if isinstance(k, str))
                yield from _expressions(item)
            else:
                yield from _expressions(item)
    elif isinstance(value, list):
        for item in value:
            yield from _expressions(item)


# 3. the program's JSON -----------------------------------------------------------------------------------------
def _walk_nodes(value: Any) -> Any:
    """Every serialized graph node (a dict with `target`, `inputs`, `outputs`) anywhere in `value`."""
    if isinstance(value, dict):
        if "target" in value and "inputs" in value and "outputs" in value:
            yield value
        for item in value.values():
            yield from _walk_nodes(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk_nodes(item)


# Names torch writes into the Python it generates from a graph, unquoted (`def forward(self, NAME)`, `NAME = ...`)
# or between quotes it does not escape (`getattr(self, "PART")`): a name holding other characters is code.
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A part of a module path: what nn.Module accepts as a child's name (a ModuleDict key such as `block-1` too), but no
# quote, backslash, white space or control character, which could close or continue `getattr(self, "PART")`.
PATH_PART = r"[^\"'\\\s.\x00-\x1f\x7f]+"
_DOTTED = re.compile(rf"{PATH_PART}(?:\.{PATH_PART})*")  # a module path: layers.0.weight, a call of one: fc1@1


def name_problem(key: str, value: Any) -> str | None:
    """Why the value of a program's JSON field `key` is not a plain name where torch expects one, or None (fields
    that hold no name pass)."""
    if key in ("name", "as_name", "user_input_name") or key == "forward_arg_names[]":
        rule, what = IDENTIFIER, "a Python identifier"
    elif key in ("parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name"):
        rule, what = _DOTTED, "a module path without quotes, backslashes or white space"
    elif key == "fqn":
        rule, what = _DOTTED, "a module path"
        if value == "":
            return None
    else:
        return None
    if value is None or (value == "" and key == "name"):  # unnamed nodes and positional arguments
        return None
    # a keyword (an operator's argument named `from`) is no code: at worst the generated Python does not compile
    if not isinstance(value, str) or not rule.fullmatch(value):
        label = {"forward_arg_names[]": "forward argument name", "as_name": "name", "fqn": "module path"}.get(key, key)
        return f"the {label.replace('_', ' ')} {str(value)[:60]!r}, which is not {what}"
    return None


def check_names(graph_module: Any, path: str) -> None:
    """Refuse a program whose node, input, parameter, buffer or module names are more than plain names: torch's
    code generator writes them into Python source, where a crafted name runs as code when the graph is built."""
    stack = [graph_module]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, (dict, list)))
            continue
        if not isinstance(item, dict):
            continue
        for key, value in item.items():
            if key == "metadata":  # stack traces and module stacks: text for people, checked after loading
                continue
            pairs = [("forward_arg_names[]", v) for v in value] if key == "forward_arg_names" and isinstance(
                value, list) else [(key, value)]
            problem = next((p for k, v in pairs if (p := name_problem(k, v))), None)
            if problem:
                raise refuse(f"{path} holds {problem}", "in its program", f"expected {EXPECTED}")
            if isinstance(value, (dict, list)):
                stack.append(value)


def _operator_arguments(value: Any) -> Iterator[Any]:
    """Every `as_operator` argument anywhere in `value`: torch's deserializer resolves it as a dotted path from
    `torch`, `operator` or `math` (any function reachable from them), and a higher-order op calls it."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "as_operator" in item:
                yield item["as_operator"]
            stack.extend(v for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, (dict, list)))


def own_operator(name: str) -> bool:
    """True when `deadneuron::name` is an operator our package registered in this process."""
    import importlib

    for module in ("deadneuron.torch.sinerelu", "deadneuron.torch.kernels"):
        try:
            importlib.import_module(module)  # registering our ops, if this version has any
        except ImportError:
            pass
    return bool(torch._C._jit_get_schemas_for_operator(f"{OWN_NAMESPACE}::{name}"))


def target_problem(target: str) -> str | None:
    """Why a serialized graph target is not an allowed operator, or None when it is."""
    if not isinstance(target, str):
        return "a target that is not a name"
    match = _OPERATOR_TARGET.fullmatch(target)
    if match:
        namespace, name, overload = match.groups()
        if namespace == "higher_order" and name in _HIGHER_ORDER and overload is None:
            return None
        if namespace not in _OPERATOR_NAMESPACES and not (namespace == OWN_NAMESPACE and own_operator(name)):
            allowed = ", ".join(sorted(_OPERATOR_NAMESPACES | {OWN_NAMESPACE}))
            return f"the operator {target}, outside the allowed namespaces ({allowed})"
        try:
            op = getattr(getattr(getattr(torch.ops, namespace), name), overload or "default")
        except (AttributeError, RuntimeError):
            return f"the operator {target}, which this torch does not define"
        problem = schema_problem(op)
        return f"the operator {target} ({problem})" if problem else None
    match = _SCALAR_TARGET.fullmatch(target)
    if match and match.group(2) in _SCALAR_OPS:
        return None
    return f"{target}, which is not a PyTorch compute operator"


def check_program_json(document: Any, path: str) -> None:
    """Refuse a program whose graph calls anything but allowed operators, or whose shape expressions are more
    than plain symbolic arithmetic; drop `guards_code` (Python source that torch would exec)."""
    if not isinstance(document, dict) or not isinstance(document.get("graph_module"), dict):
        raise DeadNeuronError(f"{path}: models/{MODEL}.json is not a serialized program; expected {EXPECTED}")
    document["guards_code"] = []  # never exec'd: module() regenerates the input checks from the signature
    for node in _walk_nodes(document["graph_module"]):
        problem = target_problem(node["target"])
        if problem:
            raise refuse(f"{path} calls {problem}", "in its graph", "expected a program of PyTorch operators")
    for name in _operator_arguments(document["graph_module"]):
        # an operator passed as an argument (a higher-order op's body) is called like a graph target
        problem = target_problem(name)
        if problem:
            raise refuse(f"{path} passes {problem}", "as an argument in its graph",
                         "expected a program of PyTorch operators")
    check_names(document["graph_module"], path)
    custom = document["graph_module"].get("graph", {}).get("custom_obj_values")
    if custom:
        raise refuse(f"{path} uses custom (TorchBind) objects", "", "export a model without custom objects")
    for expression in _expressions(document):
        problem = _unsafe_expression(expression)
        if problem:
            raise DeadNeuronError(
                f"{path}: the shape expression {expression[:80]!r} holds {problem}, which is not a plain symbolic "
                f"expression; refused (torch's loader would evaluate it as Python code or count up to it); expected "
                f"{EXPECTED}"
            )


# 5. the graph torch built ----------------------------------------------------------------------------------------
def _base_types(text: str) -> list[str]:
    """'Optional[List[Tensor]]' -> ['Tensor']; 'Tuple[int, int]' -> ['int', 'int']."""
    while (match := _TYPE_WRAPPER.match(text)) is not None:
        text = match.group(1)
    if text.startswith("Tuple[") and text.endswith("]"):
        return [t for part in text[6:-1].split(",") for t in _base_types(part.strip())]
    return [text]


def schema_problem(op: Any) -> str | None:
    """Why the schema of OpOverload `op` takes something other than data, or None."""
    for argument in op._schema.arguments:
        for base in _base_types(str(argument.type)):
            if base == "str" and argument.name in _SAFE_STR_ARGS:
                continue
            if base not in _SAFE_ARG_TYPES:
                return f"its argument {argument.name!r} is a {argument.type}"
    return None


def check_graph(program: Any, path: str) -> None:
    """Every node of every graph is a placeholder, an output, a subgraph reference or a call of an allowed
    operator; placeholders hold tensors or numbers; metadata text cannot break a line of generated code."""
    import torch.fx

    for graph_module in program.graph_module.modules():
        graph = getattr(graph_module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            trace = node.meta.get("stack_trace")
            if isinstance(trace, str):  # kept for site names; every line break becomes a plain newline
                node.meta["stack_trace"] = _LINE_BREAKS.sub("\n", trace)
            if node.op in ("placeholder", "output"):
                value = node.meta.get("val")
                if node.op == "placeholder" and isinstance(value, str):
                    raise refuse(f"{path}: the input {node.name!r} is a string constant", "in its graph")
                continue
            subgraph = getattr(graph_module, str(node.target), None) if node.op == "get_attr" else None
            if isinstance(subgraph, torch.fx.GraphModule):
                continue
            if node.op != "call_function":
                raise refuse(f"{path}: the graph node {node.name!r} is a {node.op}", "",
                             "expected a program of PyTorch operators")
            problem = _argument_problem((node.args, node.kwargs))
            if problem:
                raise refuse(f"{path}: the graph node {node.name!r} takes {problem}", "",
                             "expected a program of PyTorch operators on tensors and numbers")
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                namespace = target.namespace
                allowed = namespace in _OPERATOR_NAMESPACES or (
                    namespace == OWN_NAMESPACE and own_operator(target._schema.name.split("::")[-1])
                )
                problem = None if allowed else "its namespace is not allowed"
                problem = problem or schema_problem(target)
                if problem:
                    raise refuse(f"{path} calls {target} in its graph:", problem,
                                 "expected a program of PyTorch compute operators")
                continue
            if isinstance(target, torch._ops.HigherOrderOperator) and target.name() in _HIGHER_ORDER:
                continue
            name = getattr(target, "__name__", "")
            home = next((m for m in _SCALAR_HOMES.values() if getattr(m, name, None) is target), None)
            if home is not None and name in _SCALAR_OPS:
                continue
            raise refuse(
                f"{path} calls {getattr(target, '__module__', '?')}.{name or target!r} in its graph, which is not "
                "a PyTorch operator;", "", "expected a program of PyTorch compute operators"
            )


_PLAIN_ARGUMENTS = (bool, int, float, complex, str, type(None), torch.dtype, torch.layout, torch.memory_format,
                    torch.device, torch.SymInt, torch.SymFloat, torch.SymBool)


def _argument_problem(value: Any) -> str | None:
    """What in a node's arguments is neither data nor another node (a function a higher-order op would call),
    or None. An operator argument must pass the same allowlist as a graph target."""
    import torch.fx

    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (torch.fx.Node, *_PLAIN_ARGUMENTS)):
            continue
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, slice):
            stack.extend((item.start, item.stop, item.step))
        elif isinstance(item, torch._ops.OpOverload):
            allowed = item.namespace in _OPERATOR_NAMESPACES or (
                item.namespace == OWN_NAMESPACE and own_operator(item._schema.name.split("::")[-1])
            )
            problem = None if allowed else "its namespace is not allowed"
            problem = problem or schema_problem(item)
            if problem:
                return f"the operator {item} as an argument ({problem})"
        else:
            kind = type(item)
            return f"a {kind.__module__}.{kind.__qualname__} as an argument"
    return None


def check_inputs_spec(program: Any, path: str) -> None:
    """The inputs' tree holds tuples, lists and dicts keyed by plain names: its paths become generated code."""
    from torch.utils import _pytree as pytree

    spec = program.call_spec.in_spec
    if spec is None:
        return
    stack = [spec]
    while stack:
        node = stack.pop()
        if node.type not in (tuple, list, dict, type(None)) and not node.is_leaf():
            raise refuse(f"{path}: its inputs are a {getattr(node.type, '__name__', node.type)}", "",
                         "expected tensors in tuples, lists or dicts")
        if node.type is dict:
            for key in node.context:
                if not (isinstance(key, int) or (isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_.\-]*", key))):
                    raise refuse(f"{path}: an input is keyed by {str(key)[:40]!r}", "")
        stack.extend(node.children())
    del pytree
