"""The trees of a `.pt2` program's inputs and outputs (its pytree specs), checked before torch parses them.

A program's JSON holds each module call's `in_spec` and `out_spec` as JSON text that torch's parser turns into
Python types: a node's type is looked up by name in torch's pytree registry, and its context is parsed with a hook
that imports any module an `{"__enum__": ..., "fqn": "module:name"}` object names (so a crafted context imports,
and runs, a module of the attacker's choosing found on `sys.path`). Here, before torch sees them:

- every node's type is a plain container (tuple, list, dict, OrderedDict, torch.fx's immutable list and dict) or
  a transformers `ModelOutput` class in an output tree, resolved by `model_output_class`;
- every context is JSON null or a flat list of names (the keys of a dict or a ModelOutput): no objects, so no
  `__enum__` hook and no other type can be reached.

A transformers model exported with torch.export returns a `ModelOutput` (`CausalLMOutputWithPast`, ...), which
transformers registers with torch's pytree registry when the class is defined. Such a name is admitted only when
transformers is installed, the module is `transformers.modeling_outputs` or a model's own
`transformers.models.NAME.modeling_NAME`, and the class found there is defined in that module under that name and
is a strict subclass of `transformers.utils.ModelOutput`; only then is that module imported (it ships with the
installed transformers, nothing comes from the file). Anything else is refused in one line, before any import.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import DeadNeuronError
from .hf import INSTALL_HINT

# The containers torch registers itself whose context is null or a list of keys.
CONTAINERS = frozenset(
    {
        "builtins.tuple",
        "builtins.list",
        "builtins.dict",
        "collections.OrderedDict",
        "torch.fx.immutable_collections.immutable_list",
        "torch.fx.immutable_collections.immutable_dict",
    }
)
_MODEL_OUTPUT = re.compile(
    r"(?P<module>transformers\.modeling_outputs|transformers\.models\.[a-z0-9_]+\.modeling_[a-z0-9_]+)"
    r"\.(?P<name>[A-Z][A-Za-z0-9_]*)"
)
_SPEC_LIMIT = 1 << 20  # characters of one spec; a tree of a few thousand tensors is far below
_DEPTH_LIMIT = 64
_FIX = "expected outputs that are tensors in tuples, lists, dicts or transformers ModelOutputs"
_FIX_INPUTS = "expected inputs that are tensors in tuples, lists or dicts"


def _refuse(path: str, problem: str, fix: str = _FIX) -> DeadNeuronError:
    return DeadNeuronError(f"{path}: {problem}; refused (loading it could run code); {fix}")


def specs(document: Any) -> list[tuple[str, str]]:
    """(key, text) of every `in_spec` / `out_spec` string anywhere in a program's JSON."""
    found: list[tuple[str, str]] = []
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("in_spec", "out_spec") and isinstance(item, str):
                    found.append((key, item))
                elif isinstance(item, (dict, list)):
                    stack.append(item)
        elif isinstance(value, list):
            stack.extend(item for item in value if isinstance(item, (dict, list)))
    return found


def _context_problem(context: Any) -> str | None:
    """Why a node's serialized context is more than null or a flat list of names, or None."""
    if context is None:
        return None
    if not isinstance(context, str):
        return "a context that is not text"
    try:
        value = json.loads(context)  # no object hook: nothing is imported or looked up
    except (ValueError, RecursionError):
        return "a context that is not JSON"
    if value is None:
        return None
    if not isinstance(value, list):
        return f"a context of type {type(value).__name__} (an object could name a module to import)"
    for item in value:
        if not (item is None or isinstance(item, (str, int, float, bool))):
            return f"a context holding a {type(item).__name__} (an object could name a module to import)"
    return None


def check_specs(document: Any, path: str) -> None:
    """Refuse a program whose input or output trees hold anything but the containers above, or (outputs only)
    transformers ModelOutput classes that `model_output_class` admits; import those classes' modules."""
    for key, text in specs(document):
        fix = _FIX if key == "out_spec" else _FIX_INPUTS
        tree = f"{'output' if key == 'out_spec' else 'input'} tree ({key})"
        if len(text) > _SPEC_LIMIT:
            raise _refuse(path, f"its {tree} is {len(text):,} characters long", fix)
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise _refuse(path, f"its {tree} is not JSON", fix) from error
        if not (isinstance(parsed, list) and len(parsed) == 2 and parsed[0] == 1):
            raise _refuse(path, f"its {tree} is not a tree spec of protocol 1", fix)
        stack = [(parsed[1], 0)]
        while stack:
            node, depth = stack.pop()
            if not isinstance(node, dict) or depth > _DEPTH_LIMIT:
                raise _refuse(path, f"its {tree} holds a malformed or too deeply nested tree", fix)
            kind, children = node.get("type"), node.get("children_spec")
            if not isinstance(children, list):
                raise _refuse(path, f"its {tree} holds a node without children_spec", fix)
            if kind is None:
                if node.get("context") is not None or children:
                    raise _refuse(path, f"its {tree} holds a leaf with a context or children", fix)
                continue
            if not isinstance(kind, str):
                raise _refuse(path, f"its {tree} holds a node type that is not a name", fix)
            problem = _context_problem(node.get("context"))
            if problem:
                raise _refuse(path, f"its {tree} holds {problem} for a {kind[:80]}", fix)
            if kind not in CONTAINERS:
                if key != "out_spec":
                    raise _refuse(path, f"its inputs are a {kind[:80]}", fix)
                model_output_class(kind, path)
            stack.extend((child, depth + 1) for child in children)


def model_output_class(name: str, path: str) -> type:
    """The transformers ModelOutput class serialized as `name`, registered with torch's pytree registry; one
    line naming the missing piece when transformers is not installed or `name` is not such a class."""
    import importlib
    import importlib.util

    match = _MODEL_OUTPUT.fullmatch(name)
    if match is None:
        raise _refuse(
            path, f"its outputs are a {name[:80]}, which is not a transformers ModelOutput nor a tuple, list or dict"
        )
    module_name, class_name = match.group("module"), match.group("name")
    try:
        import transformers
        from transformers.utils import ModelOutput
    except ImportError as error:
        raise DeadNeuronError(
            f"{path} returns {name}, a transformers ModelOutput, and the transformers package is not installed; "
            f"{INSTALL_HINT}"
        ) from error
    version = getattr(transformers, "__version__", "?")
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise DeadNeuronError(
            f"{path} returns {name}, and the installed transformers {version} has no module {module_name}; "
            "expected a model type of the installed transformers (upgrade it)"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a model module that needs an optional dependency, say
        raise DeadNeuronError(
            f"{path} returns {name}, and importing {module_name} of transformers {version} failed: "
            f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        ) from error
    cls = vars(module).get(class_name)
    if not (
        isinstance(cls, type)
        and cls.__module__ == module_name
        and cls.__qualname__ == class_name
        and issubclass(cls, ModelOutput)
        and cls is not ModelOutput
    ):
        raise _refuse(
            path,
            f"its outputs are a {name}, which is not a ModelOutput class defined in {module_name} "
            f"of transformers {version}",
        )
    from torch.utils import _pytree as pytree

    registered = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(name)
    if registered is not cls:
        raise DeadNeuronError(
            f"{path} returns {name}, which transformers {version} did not register with torch's pytree registry; "
            "expected a transformers release that registers its ModelOutputs (upgrade it)"
        )
    return registered
