"""Finding and watching activation sites of a PyTorch model while it runs.

Two mechanisms, one `SiteWatcher`:
- activation modules (`nn.ReLU`, ..., SineReLU) get a forward pre-hook, which sees the pre-activation even for
  `inplace=True` and registers the gradient hook on it, and a forward hook, which sees the output;
- functional calls (`F.relu`, `torch.relu`, `Tensor.relu_`, `clamp(min=0)`, the aten ops of an exported graph)
  are caught by a `TorchFunctionMode` active only during the model's forward pass. Calls made inside an
  activation module's own forward are the module's site, never a second one.

Site names (design.md: one site per call, in order of first execution):
- a module site is the module's qualified name (`layer1.0.relu`); its second call in one forward pass is
  `layer1.0.relu#2`, and so on;
- a functional site is the qualified name of the module whose `forward` made the call, a dot and the function
  with parentheses (`layer1.0.relu()`, `encoder.layers.0.relu()`, `clamp()` at the root); repeated calls from the
  same module count up the same way (`relu()#2`). Trailing underscores are dropped (`relu_` -> `relu()`).
- in a torch.export graph the same names are rebuilt from each node's `nn_module_stack`.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.kinds import repeated_site_name
from ..errors import DeadNeuronError
from ..report import SiteInfo
from .accumulate import Scratch, SiteAccumulator
from .decomposed import module_parts, swapped_site_name
from .kinds import (
    call_name,
    default_unit_axis,
    function_spec,
    is_inplace,
    module_kind,
    module_kinds,
    module_kinds_by_name,
    producer_layout,
)

# dL/d(pre-activation) from the output alone, for in-place calls on views (their input's hook never fires).
_OUTPUT_DERIVATIVE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": lambda out: out > 0,
    "relu6": lambda out: (out > 0) & (out < 6),
}


_UNOBSERVED = -1  # `SiteWatcher._tokens`: the site's layout is not one a scan can read

# The keyword inputs of a transformers encoder-decoder's decoder (T5, BART): one of them, or labels, from which
# the model builds them itself.
DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds")


def real_tokens(x: Any, n: int | None, model: nn.Module) -> torch.Tensor | None:
    """(N, L) True at the real tokens of a batch of keyword inputs whose `attention_mask` pads some sequences, for
    `SiteWatcher.forward`; None when nothing is padded. Padding tokens are no positions of a token site
    (design.md): a unit that fires only on padding is dead on the data. A mask on an accelerator is returned unread:
    asking whether it has zeros would wait for the device at every step (`DeadNeuronMonitor` promises no sync
    between window ends), and a mask of ones counts every position, as None does."""
    mask = x.get("attention_mask") if isinstance(x, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or n is None or int(mask.shape[0]) != n:
        return None
    if any(key in x for key in DECODER_INPUTS) or is_encoder_decoder(model):
        # an encoder-decoder: its decoder's sites may have the encoder's length without its padding (also when the
        # model builds its decoder inputs from labels, as a training step under DeadNeuronMonitor calls it)
        return None
    real = mask != 0
    return None if real.device.type == "cpu" and bool(real.all()) else real


def is_encoder_decoder(model: nn.Module) -> bool:
    """A transformers encoder-decoder (T5, BART, Whisper), as its config says."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


class _Token:
    """One call of a site: its accumulator, its real samples, and how its tensors map to (sample, position, unit)
    (`unfold`); the gradient hooks of the call hold it."""

    __slots__ = ("acc", "output_grad", "valid", "tokens", "real")

    def __init__(
        self, acc: SiteAccumulator, output_grad: bool, valid: int, tokens: int | None, real: torch.Tensor | None
    ) -> None:
        self.acc = acc
        self.output_grad = output_grad
        self.valid = valid
        self.tokens = tokens  # rows per sample of a folded (N*L, D) activation, None when axis 0 is the batch
        self.real = real  # (N, L, 1) True at real tokens of an (N, L, D) site of a padded batch; None: all real

    def unfold(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (the pre-activation, output or a gradient of this call) as the accumulator reads it."""
        return unfold(t, self.tokens, self.real)


def unfold(t: torch.Tensor, tokens: int | None, real: torch.Tensor | None = None) -> torch.Tensor:
    """A folded (N*L, D) activation as (N, L, D): rows are batch-major, as `x.reshape(-1, D)` of (N, L, D) gives;
    with `real`, padding tokens set to 0, which no statistic counts (not fired, not positive, no gradient)."""
    t = t if tokens is None else t.unflatten(0, (-1, tokens))
    return t if real is None else t.masked_fill(~real, 0)


class SiteWatcher:
    """Hooks every activation site of `model`; `remove()` (also via `with`) takes every hook off and may run twice.

    `graph_names`: for a graph module from torch.export, the names of its activation nodes in graph order (the
    k-th activation op executed is the k-th node); None for a node that is part of an activation module's scope
    rather than a site (`graph_sites`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        atol: float,
        gtol: float,
        unit_axis: int | None,
        gradients: bool,
        graph_names: Sequence[str | None] | None = None,
        unobserved: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.atol = atol
        self.gtol = gtol
        self.unit_axis = unit_axis
        self.gradients = gradients
        self.graph_names = list(graph_names) if graph_names is not None else None
        self.accumulators: dict[str, SiteAccumulator] = {}  # insertion order is order of first execution
        self.unobserved: list[str] = list(unobserved)
        self.warnings: list[str] = []
        self._names = {id(module): name for name, module in model.named_modules()}
        self._shared: dict[str, str] = {}  # activation modules whose units are not one neuron each: site -> why
        self._handles: list[Any] = []
        self.busy = False  # our own tensor work inside hooks is not the model's
        # True while the model runs outside a watched forward pass (the training monitor between its forward
        # scopes: validation, unsampled work); module hooks then do nothing.
        self.paused = False
        self.scratch = Scratch()  # the hooks' temporaries, shared by all sites (accumulate.Scratch)
        self._begin(0, 0)

    # lifecycle --------------------------------------------------------------------------------------------------
    def __enter__(self) -> SiteWatcher:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def attach(self) -> None:
        kinds = module_kinds()
        modules = dict(self.model.named_modules())
        try:
            for name, module in modules.items():
                if isinstance(module, torch.jit.ScriptModule):
                    self._unobserve(name or type(module).__name__, "TorchScript module: it takes no hooks")
                    continue
                if getattr(module, "_orig_mod", None) is not None and module is not self.model:
                    self._unobserve(name, "torch.compile'd module: hooks do not fire on compiled calls")
                kind = module_kind(module, kinds)
                if kind is None:
                    continue
                site = name or kind
                shared = _fused_experts(modules.get(name.rpartition(".")[0])) if name else None
                if shared is not None:
                    self._shared[site] = shared
                self._handles.append(module.register_forward_pre_hook(partial(self._module_pre, site, kind)))
                self._handles.append(module.register_forward_hook(partial(self._module_post, site)))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _begin(self, n: int | None, valid: int, real: torch.Tensor | None = None) -> None:
        self.n = n
        self.valid = valid
        self.real = real  # (N, L) bool: the batch's attention mask when it pads some sequences
        self.calls: Counter[str] = Counter()
        self.depth = 0  # > 0 while inside an activation module's forward
        self.layout: str | None = None  # what shaped the latest tensor: conv-like or linear-like
        self.graph_index = 0
        self._pending: list[_Token | None] = []

    @contextmanager
    def forward(self, n: int | None, valid: int, real: torch.Tensor | None = None) -> Iterator[None]:
        """Watch one forward pass of a batch of `n` samples of which the first `valid` are real (the rest pad).

        `n=None`: the batch size is unknown (a training step whose batch the watcher did not see); every sample
        of each site's tensor counts. `real`: (N, L) True at the real tokens of a padded batch of sequences (its
        attention mask); a token site of that (N, L) shape counts those positions only."""
        self._begin(n, valid, real)
        with _FunctionalSites(self):
            yield

    # sites ------------------------------------------------------------------------------------------------------
    def _unobserve(self, name: str, why: str) -> None:
        entry = f"{name} ({why})"
        if entry not in self.unobserved:
            self.unobserved.append(entry)

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def _call_name(self, base: str) -> str:
        return repeated_site_name(base, self.calls)

    def _new_site(self, name: str, kind: str, z: torch.Tensor, folded: bool) -> SiteAccumulator:
        if folded:  # (N, L, D) unfolded from (N*L, D) rows: the features are the units whatever produced them
            axis = 2
        elif self.unit_axis is None:
            axis = default_unit_axis(z.ndim, self.layout)
        else:
            if not -z.ndim <= self.unit_axis < z.ndim or (z.ndim > 1 and self.unit_axis % z.ndim == 0):
                raise DeadNeuronError(
                    f"unit_axis {self.unit_axis} does not fit site {name}: its activations have shape "
                    f"{tuple(z.shape)}; expected an axis between 1 and {z.ndim - 1} (axis 0 is the batch)"
                )
            axis = self.unit_axis % z.ndim
        units = 1 if z.ndim == 1 else int(z.shape[axis])
        acc = SiteAccumulator(
            SiteInfo(name, kind, units, axis), z.device, atol=self.atol, gtol=self.gtol, scratch=self.scratch
        )
        self.accumulators[name] = acc
        return acc

    def before(self, name: str, kind: str, z: torch.Tensor, inplace: bool) -> _Token | None:
        """At a site, before the activation runs: the pre-activation statistics and the gradient hook."""
        self.busy = True
        try:
            with _own_ops():
                return self._before(name, kind, z, inplace)
        finally:
            self.busy = False

    def _tokens(self, name: str, z: torch.Tensor) -> int | None:
        """Rows per sample when `z` folds the batch into its first axis ((N*L, D), as OPT's FFN runs), None when
        its first axis is the batch, `_UNOBSERVED` (and the site is listed as not observed) when neither."""
        if z.ndim == 0:
            self._unobserve(name, "a scalar activation has no batch axis")
            return _UNOBSERVED
        rows = int(z.shape[0])
        if self.n is None or rows == self.n:
            return None
        if z.ndim == 2 and self.n > 0 and rows > 0 and rows % self.n == 0:
            return rows // self.n
        self._unobserve(
            name, f"its first axis is neither the batch ({self.n}) nor batch x tokens: shape {tuple(z.shape)}"
        )
        return _UNOBSERVED

    def _real(self, acc: SiteAccumulator, z: torch.Tensor) -> torch.Tensor | None:
        """(N, L, 1) real-token flags for a site (N, L, D) with units on the last axis, in a padded batch."""
        real = self.real
        if real is None or z.ndim != 3 or acc.info.unit_axis != 2 or tuple(z.shape[:2]) != tuple(real.shape):
            return None
        return real.to(z.device).unsqueeze(-1)

    def _before(self, name: str, kind: str, z: torch.Tensor, inplace: bool) -> _Token | None:
        tokens = self._tokens(name, z)
        if tokens == _UNOBSERVED:
            return None
        valid = self.valid if self.n is not None else int(z.shape[0])
        shaped = unfold(z, tokens)
        acc = self.accumulators.get(name)
        if acc is None:
            acc = self._new_site(name, kind, shaped, tokens is not None)
        token = _Token(acc, False, valid, tokens, self._real(acc, shaped))
        acc.pre(token.unfold(z), valid)
        if self.gradients:
            if not z.requires_grad:
                self._warn(
                    f"no gradient reaches {name}: its input does not depend on the inputs or on any "
                    "trainable parameter"
                )
            elif inplace and z._base is not None:
                # An in-place call on a view never fires a hook on its input (field notes): take the
                # output's gradient times the derivative read from the output.
                if kind in _OUTPUT_DERIVATIVE:
                    token.output_grad = True
                else:
                    self._warn(f"gradient of {name} not observed: an in-place {kind} on a view")
            else:
                z.register_hook(partial(_grad_hook, token))
                acc.grad_samples += valid
        return token

    def after(self, token: _Token | None, out: Any) -> None:
        if token is None or not isinstance(out, torch.Tensor):
            return
        self.busy = True
        try:
            with _own_ops():
                self._after(token, out)
        finally:
            self.busy = False

    def _after(self, token: _Token, out: torch.Tensor) -> None:
        token.acc.post(token.unfold(out), token.valid, token.real)
        if token.output_grad:
            # The gradient reaches the modified region through the view's base, whether the model goes on
            # with the base or with the view: hook the base and cut the view's region out of its gradient.
            base = out._base
            if base is not None and base.requires_grad and base.is_contiguous():
                offset = int(out.storage_offset() - base.storage_offset())
                base.register_hook(partial(_view_grad_hook, token, out, offset))
                token.acc.grad_samples += token.valid
            else:
                self._warn(
                    f"gradient of {token.acc.info.name} not observed: an in-place "
                    f"{token.acc.info.kind} on a view of a non-contiguous tensor"
                )

    # module hooks -----------------------------------------------------------------------------------------------
    def _module_pre(self, site: str, kind: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.paused:
            return
        self.depth += 1  # also for a site not observed: its inner functional calls are not sites either
        token = None
        if site in self._shared:
            self._unobserve(site, self._shared[site])
        elif args and isinstance(args[0], torch.Tensor):
            token = self.before(self._call_name(site), kind, args[0], bool(getattr(module, "inplace", False)))
        self._pending.append(token)

    def _module_post(self, site: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.paused:
            return
        self.depth = max(self.depth - 1, 0)
        token = self._pending.pop() if self._pending else None
        self.after(token, output)

    # functional calls -------------------------------------------------------------------------------------------
    def functional_name(self, label: str) -> str | None:
        """The site name of a functional call; None when the call is no site (part of an activation module)."""
        if self.graph_names is not None and self.graph_index < len(self.graph_names):
            name = self.graph_names[self.graph_index]
            self.graph_index += 1
            return name
        owner = self._owner()
        return self._call_name(call_name(owner, label))

    def _owner(self) -> str:
        """Qualified name of the innermost module whose code is on the stack (the caller of the function)."""
        frame = sys._getframe(2)
        while frame is not None:
            obj = frame.f_locals.get("self")
            if obj is not None:
                name = self._names.get(id(obj))
                if name is not None:
                    return name
            frame = frame.f_back  # type: ignore[assignment]
        return ""

    def collect_infos(self) -> list[SiteInfo]:
        return [acc.info for acc in self.accumulators.values()]


def _fused_experts(parent: nn.Module | None) -> str | None:
    """Why the activation module of `parent` has no units of its own, when `parent` holds the weights of many
    experts in one tensor (a mixture of experts: transformers 5's `MixtralExperts`, `Qwen2MoeExperts`...,
    `num_experts` and parameters shaped (experts, ...)). Its activation runs on the routed tokens of every expert,
    at once sorted by expert or once per expert hit, so unit j of one call is a different neuron in each expert,
    and the rows are tokens in routing order, not samples. None for any other parent."""
    experts = getattr(parent, "num_experts", None)
    if parent is None or not isinstance(experts, int) or experts < 2:
        return None
    if not any(p.ndim >= 3 and p.shape[0] == experts for p in parent.parameters(recurse=False)):
        return None
    return (
        f"the activation of {experts} fused experts: it runs on the tokens routed to each expert, so its unit j is "
        "a different neuron in each expert and its rows are not samples"
    )


def _grad_hook(token: _Token, grad: torch.Tensor) -> None:
    with torch.no_grad():
        token.acc.grad(token.unfold(grad), token.valid)


def _view_grad_hook(token: _Token, out: torch.Tensor, offset: int, grad: torch.Tensor) -> None:
    with torch.no_grad():
        region = grad.contiguous().as_strided(out.size(), out.stride(), offset)
        token.acc.grad(token.unfold(region * _OUTPUT_DERIVATIVE[token.acc.info.kind](out)), token.valid)


def _own_ops() -> Any:
    """A context in which our own statistics ops skip Python-level __torch_function__ dispatch.

    While `_FunctionalSites` is active every torch call goes through Python; the two dozen small reductions of
    a site's statistics then cost more than the reductions themselves (a hooked MLP step: ~0.8 ms of 1.1 ms).
    torch offers no public switch for this; `torch._C.DisableTorchFunction` is what torch's own code uses.
    """
    disable = getattr(torch._C, "DisableTorchFunction", None)
    return disable() if disable is not None else nullcontext()


class _FunctionalSites(TorchFunctionMode):
    """Catches functional activation calls during a forward pass and remembers what shaped the last tensor."""

    def __init__(self, watcher: SiteWatcher) -> None:
        super().__init__()
        self.watcher = watcher

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        watcher = self.watcher
        if watcher.busy or watcher.depth:
            return func(*args, **kwargs)
        layout = producer_layout(func)
        if layout is not None:
            watcher.layout = layout
            return func(*args, **kwargs)
        spec = function_spec(func, args, kwargs)
        if spec is None or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        name = watcher.functional_name(spec.label)
        if name is None:
            return func(*args, **kwargs)
        token = watcher.before(name, spec.kind, args[0], is_inplace(spec, args, kwargs))
        out = func(*args, **kwargs)
        watcher.after(token, out)
        return out


# torch.export graphs --------------------------------------------------------------------------------------------
def graph_sites(graph_module: torch.fx.GraphModule) -> tuple[list[str | None], list[str]]:
    """Names of the activation nodes of an exported graph in execution order, and what cannot be observed.

    An activation node that is part of an activation module's scope (`decomposed.module_parts`: the relu of a
    ReLUSquared whose scope did not fold) gets None, no site: the module is listed as not observed instead."""
    by_class = module_kinds_by_name()
    parts = module_parts(graph_module.graph)
    names: list[str | None] = []
    counts: Counter[str] = Counter()
    activation_paths: dict[str, str] = {}  # path of an activation module -> its class name
    seen_paths: set[str] = set()
    unobserved: list[str] = []
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        entries = list(stack.values())
        for path, cls in entries:
            cls_name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
            if cls_name in by_class:
                activation_paths.setdefault(path, cls_name)
        if node.op != "call_function":
            continue
        target_name = str(node.target)
        if "transformer_encoder_layer_fwd" in target_name:
            owner = entries[-1][0] if entries else ""
            unobserved.append(
                f"{owner or 'root'} (fused transformer fast path: its activation is not in the graph; "
                "export with torch.backends.mha.set_fastpath_enabled(False))"
            )
            continue
        args = tuple(node.args)
        spec = function_spec(node.target, args, dict(node.kwargs))
        if spec is None:
            continue
        if node in parts:
            names.append(None)
            continue
        path, cls = entries[-1] if entries else ("", "")
        cls_name = (
            cls
            if isinstance(cls, str)
            else f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', '')}"
        )
        swapped = swapped_site_name(node)
        if swapped is not None:  # a functional ReLU that `deadneuron swap` wrote out, folded back
            base = swapped
        elif cls_name in by_class:
            base = path or by_class[cls_name]
            seen_paths.add(path)
        else:
            base = call_name(path, spec.label)
        names.append(repeated_site_name(base, counts))
    for path, cls_name in activation_paths.items():
        if path not in seen_paths:
            kind = by_class[cls_name]
            unobserved.append(f"{path} ({kind} module decomposed into primitive ops in the exported graph)")
    return names, unobserved
