"""The PyTorch backend of the scan engine (`deadneuron.core.engine`): the primitives a scan needs from torch.

A scan runs the model in eval mode (BatchNorm uses its running statistics and leaves them alone, dropout is off:
the scan is deterministic and every sample's gradient is its own), with PyTorch's fused transformer fast path
switched off so that every activation runs, and puts everything back afterwards, also when it fails: the train/eval
flag of every submodule, requires_grad, `.grad`, buffers, the fast-path switch, and no hooks.

Gradients are taken with `torch.autograd.grad` with respect to the trainable parameters (the inputs when nothing is
trainable), so no parameter's `.grad` is touched; the per-site hooks read dL/d(pre-activation) as it passes.
The loss is summed over samples (never averaged), so a sample's gradient does not depend on the batch it came in.
"""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.engine import Backend
from ..core.options import ResolvedLoss, ScanOptions
from ..core.plan import PLAIN, Batch, Shape, Source, is_one_hot, leading
from ..core.stats import SiteStats
from ..errors import DeadNeuronError
from ..report import SiteInfo
from .accumulate import SiteAccumulator, collect
from .decomposed import fold
from .loading import load_model
from .objective import Probe, batch_probe, first_output, own_loss, task_loss
from .program_inputs import KeywordInputs, cut, embedding_rows, keyword_inputs
from .sites import DECODER_INPUTS, SiteWatcher, graph_sites, is_encoder_decoder, real_tokens
from .swap import copy_model, swap_file, swap_for_scan, swap_model

__all__ = ["BACKEND", "TorchRun", "prepare", "train", "with_probe"]


def _to_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise DeadNeuronError(f"{what} holds {value.dtype} values; expected numbers (float or int)")
        if not value.flags.writeable or not value.flags.c_contiguous:
            value = np.array(value)  # one batch read into memory (from a memory map)
        return torch.from_numpy(value)
    try:
        return torch.as_tensor(value)
    except Exception as error:
        raise DeadNeuronError(
            f"cannot turn {what} of type {type(value).__name__} into a tensor; expected an array or a tensor"
        ) from error


@dataclass
class TorchRun:
    """What a scan runs (an `nn.Module`; an `ExportedProgram` as its graph module), and what the model itself
    says about its inputs."""

    module: nn.Module
    display: str
    probe: Callable[[int], Probe] = batch_probe
    graph_names: list[str | None] | None = None  # sites.graph_sites
    unobserved: list[str] = field(default_factory=list)
    example_shape: tuple[int, ...] | None = None  # one sample's shape
    example_dtype: torch.dtype | None = None
    static_batch: int | None = None
    vocabulary: int | None = None  # a model that starts with an embedding takes token ids in [0, vocabulary)
    warnings: list[str] = field(default_factory=list)
    source: Source = PLAIN
    keywords: KeywordInputs | None = None  # a program exported with keyword inputs only
    labels_input: bool = False  # a graph that takes `labels` as a required input (a program's own loss)

    @property
    def device(self) -> torch.device:
        return _device_dtype(self.module, self.example_dtype)[0]

    def sample_shapes(self, input_shape: Shape | None) -> list[Shape] | None:
        if input_shape is not None:
            if self.example_shape is not None and tuple(input_shape) != self.example_shape:
                raise DeadNeuronError(
                    f"--input-shape {tuple(input_shape)} does not fit the program; expected samples of "
                    f"shape {self.example_shape} (its example input)"
                )
            return [tuple(input_shape)]
        shape = self.example_shape or _guess_sample_shape(self.module)
        if shape is None and self.vocabulary is not None:
            shape = (RANDOM_TOKENS,)
        return None if shape is None else [shape]

    def class_labels(self, y: Any) -> bool:
        return not y.is_floating_point() or is_one_hot(y.detach().cpu().numpy())  # once per scan

    def own_loss(self, batch: Batch) -> bool:
        return isinstance(batch.x, dict) and batch.y is not None and _takes_labels(self.module)

    def place(self, batch: Batch) -> Iterator[Batch]:
        """On the model's device and floating dtype (labels: integer labels as int64); cut into static
        batches, the last padded by repeating its first sample, when the program has a static batch size."""
        device, dtype = _device_dtype(self.module, self.example_dtype)

        def move(value: Any) -> torch.Tensor:
            t = _to_tensor(value, "a batch of inputs")
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        x = _structure(batch.x, move)
        y = batch.y
        if y is not None:
            y = _to_tensor(y, "a batch of labels")
            y = y.to(device=device, dtype=dtype if y.is_floating_point() else torch.long)
            if self.labels_input and isinstance(x, dict) and "labels" not in x:
                x = {**x, "labels": y}  # the program cannot run without them (compare, inspect)
            x = _decoder_inputs(self.module, x, y)
        elif is_encoder_decoder(self.module):
            x = self._teacher_forced(x)
        if self.keywords is not None and isinstance(x, (torch.Tensor, dict)):
            x = self.keywords.complete(x)  # one tensor is the main keyword; missing keywords follow the example
        if leading(x) == 0:
            return
        if self.static_batch is None:
            yield Batch(x, y, batch.valid)
            return
        for xs, ys, valid in cut(x, y, self.static_batch):
            yield Batch(xs, ys, valid)

    def _teacher_forced(self, x: Any) -> Any:
        """Token ids without decoder inputs or labels for a transformers encoder-decoder (random inputs, `inspect`,
        an .npz of input_ids): its decoder cannot run without input, so it reads the same tokens shifted right (the
        model's own `prepare_decoder_input_ids_from_labels`), and the report says so."""
        prepare = getattr(self.module, "prepare_decoder_input_ids_from_labels", None)
        main = getattr(self.module, "main_input_name", None)
        inputs = x if isinstance(x, dict) else {main: x}
        ids = inputs.get(main) if isinstance(main, str) else None
        if (
            prepare is None
            or not isinstance(ids, torch.Tensor)
            or ids.is_floating_point()
            or any(key in inputs for key in (*DECODER_INPUTS, "labels"))
        ):
            return x
        note = (
            f"{type(self.module).__name__} is an encoder-decoder and the data held token ids only: its decoder read "
            f"the same tokens shifted right; pass decoder_input_ids or labels beside {main} for your own targets"
        )
        if note not in self.warnings:
            self.warnings.append(note)
        return {**inputs, "decoder_input_ids": prepare(labels=ids)}

    @contextmanager
    def watch(self, options: ScanOptions, loss: ResolvedLoss, first: Batch) -> Iterator[TorchWatch]:
        watcher = SiteWatcher(
            self.module,
            atol=options.atol,
            gtol=options.gtol,
            unit_axis=options.unit_axis,
            gradients=loss != "none",
            graph_names=self.graph_names,
            unobserved=self.unobserved,
        )
        with ExitStack() as stack:
            stack.enter_context(preserved(self.module))
            stack.enter_context(watcher)
            yield TorchWatch(self, watcher, loss, self.probe(options.seed + 1))

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        with preserved(self.module), torch.no_grad():
            yield

    def output(self, x: Any) -> torch.Tensor:
        return first_output(self.forward(x))

    def drift_sums(self, a: Any, b: Any, classifier: bool) -> tuple[Any, Any, Any]:
        a, b = a.double(), b.double()
        agreed = (a.argmax(-1) == b.argmax(-1)).sum() if classifier else None  # per position (token, pixel)
        return (b - a).square().sum(), a.square().sum(), agreed

    def forward(self, x: Any, labels: torch.Tensor | None = None) -> Any:
        """The model's output on `x` (a tensor; a dict of keyword inputs; a tuple of positional ones), with
        `labels=` when given; a model that refuses the batch is a user error naming the expected input."""
        try:
            if isinstance(x, dict):
                return self.module(**x) if labels is None else self.module(**{**x, "labels": labels})
            if isinstance(x, (list, tuple)):
                return self.module(*x)
            return self.module(x)
        except DeadNeuronError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
            mismatch = _missing_inputs(self.module, x, labels)
            if mismatch is not None:
                raise DeadNeuronError(f"the model failed on a batch of {_describe(x)}: {mismatch}") from error
            text = str(error).strip().splitlines()
            expected = _expected_input(self)
            if labels is not None:  # the model computed its own loss: its labels may be what it refused
                expected += f" with labels it accepts ({_expected_labels(self.module)})"
            raise DeadNeuronError(
                f"the model failed on a batch of {_describe(x)}: "
                f"{text[0] if text else type(error).__name__}; {expected}; check the data or --input-shape"
            ) from error


def prepare(model: Any, name: str | None, probe: Callable[[int], Probe] = batch_probe) -> TorchRun:
    """`model` ready to scan: an `ExportedProgram` as a fresh graph module (SineReLUs that `deadneuron swap` wrote
    out in aten ops, and activation modules that torch.export wrote out in primitive ops, folded back into sites),
    a `torch.compile`d module as its original."""
    if isinstance(model, torch.export.ExportedProgram):
        module = model.module()  # a new graph module each call: folding leaves `model` as it was
        fold(module)
        run = TorchRun(module, name or "ExportedProgram", probe)
        run.graph_names, run.unobserved = graph_sites(module)
        args = model.example_inputs[0] if model.example_inputs else ()
        if args and isinstance(args[0], torch.Tensor):
            run.example_shape = tuple(args[0].shape[1:])
            run.example_dtype = args[0].dtype
        run.keywords = keyword_inputs(model)
        run.labels_input = _takes_labels(module)
        if run.keywords is not None:
            main = run.keywords.examples[run.keywords.main]
            run.example_shape = run.keywords.sample_shape
            if main.is_floating_point():
                run.example_dtype = main.dtype
            else:
                run.vocabulary = embedding_rows(module, run.keywords.main)
        _static_batch(run)
        return run
    if isinstance(model, torch.jit.ScriptModule):
        raise DeadNeuronError(
            "TorchScript modules cannot be hooked; expected an nn.Module or a torch.export program: re-export it "
            "with torch.export.export(model, example_inputs)"
        )
    if not isinstance(model, nn.Module):
        raise DeadNeuronError(f"cannot scan a {type(model).__name__}; expected a torch.nn.Module or an ExportedProgram")
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module):  # torch.compile: hooks fire only on the original module
        model = original
    run = TorchRun(model, name or type(model).__name__, probe)
    run.vocabulary = _vocabulary(model)
    run.labels_input = isinstance(model, torch.fx.GraphModule) and _takes_labels(model)
    if isinstance(model, torch.fx.GraphModule) and any("nn_module_stack" in node.meta for node in model.graph.nodes):
        run.graph_names, run.unobserved = graph_sites(model)
        _static_batch(run)  # a program's graph module (the swap a comparison scans) keeps the program's batch
    return run


def _static_batch(run: TorchRun) -> None:
    """The batch size a graph from torch.export was traced with, when its batch dimension is not dynamic."""
    placeholders = [n for n in run.module.graph.nodes if n.op == "placeholder"]  # type: ignore[union-attr]
    value = placeholders[0].meta.get("val") if placeholders else None
    if isinstance(value, torch.Tensor) and value.ndim and isinstance(value.shape[0], int):
        run.static_batch = int(value.shape[0])  # exported without a dynamic batch dimension
        run.warnings.append(
            f"the program was exported with a static batch of {run.static_batch}: scanned in batches "
            "of that size (export with a dynamic batch dimension for speed)"
        )


# Tokens per random sequence for a model that takes token ids (`--samples N` without data).
RANDOM_TOKENS = 16


def _vocabulary(module: nn.Module) -> int | None:
    """The vocabulary of a model whose main input is token ids (a transformers model with `input_ids`)."""
    config = getattr(module, "config", None)
    vocabulary = getattr(config, "vocab_size", None)
    if getattr(module, "main_input_name", None) == "input_ids" and isinstance(vocabulary, int) and vocabulary > 0:
        return vocabulary
    return None


def _takes_labels(module: nn.Module) -> bool:
    """Whether `module.forward` has a `labels` parameter (transformers models compute their loss from it). A forward
    set on the instance that takes any keyword (`deadneuron.swap`'s wrapper of a swapped copy: `*args, **kwargs`)
    passes them on to the class's forward, whose signature then decides."""
    forwards = [module.forward]
    if "forward" in module.__dict__:
        forwards.append(types.MethodType(type(module).forward, module))
    for forward in forwards:
        try:
            parameters = inspect.signature(forward).parameters
        except (TypeError, ValueError):
            return False
        if "labels" in parameters:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return False
    return False


def _structure(x: Any, fn: Callable[[Any], Any]) -> Any:
    """`fn` applied to each input of a batch: one value, a dict of keyword inputs or a tuple/list of positional ones."""
    if isinstance(x, dict):
        return {key: fn(value) for key, value in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(fn(value) for value in x)
    return fn(x)


def _describe(x: Any) -> str:
    """A batch's inputs in a message: `shape (8, 12)` or `input_ids (8, 12), attention_mask (8, 12)`."""
    if isinstance(x, dict):
        return ", ".join(f"{key} {tuple(getattr(v, 'shape', ()))}" for key, v in x.items())
    if isinstance(x, (list, tuple)):
        return "inputs " + ", ".join(str(tuple(getattr(v, "shape", ()))) for v in x)
    return f"shape {tuple(getattr(x, 'shape', ()))}"


def _device_dtype(module: nn.Module, fallback: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device, fallback or torch.get_default_dtype()
    return torch.device("cpu"), fallback or torch.get_default_dtype()


def _decoder_inputs(module: nn.Module, x: Any, y: torch.Tensor | None) -> Any:
    """A labelled batch of keyword inputs for a transformers encoder-decoder with its decoder inputs added, built
    from the labels by the model's own `prepare_decoder_input_ids_from_labels` (T5's and BART's right shift), as
    its forward builds them when it is given labels: so a pass without labels (compare's predictions, the probe
    loss) runs the decoder on the same tokens as the pass with them."""
    if y is None or not isinstance(x, dict) or any(key in x for key in DECODER_INPUTS):
        return x
    prepare = getattr(module, "prepare_decoder_input_ids_from_labels", None)
    if not is_encoder_decoder(module) or prepare is None or y.is_floating_point():
        return x
    return {**x, "decoder_input_ids": prepare(labels=y)}


def _expected_labels(module: nn.Module) -> str:
    """The labels a transformers model computes its loss from, as its config says."""
    config = getattr(module, "config", None)
    classes = getattr(config, "num_labels", None)
    vocabulary = getattr(config, "vocab_size", None)
    if isinstance(classes, int) and type(module).__name__.endswith("ForSequenceClassification"):
        return f"class indices in [0, {classes}) for its classification head"
    if isinstance(vocabulary, int):
        return f"token ids in [0, {vocabulary}), -100 where no loss is taken"
    return "as its own loss takes them"


def _missing_inputs(module: nn.Module, x: Any, labels: torch.Tensor | None) -> str | None:
    """What a transformers model's batch lacks, said plainly, or None: its own error names an argument of an inner
    module ("You must specify exactly one of input_ids or inputs_embeds" from T5's decoder, or from a model given
    pixel_values)."""
    main = getattr(module, "main_input_name", None)
    if getattr(module, "config", None) is None or not isinstance(main, str):
        return None
    keys = list(x) if isinstance(x, dict) else [main]  # one tensor is the main input
    name = type(module).__name__
    if main not in keys and "inputs_embeds" not in keys:
        return (
            f"{name} takes {main} (its main input), which the batch lacks; expected inputs named after the model's "
            f"keyword arguments ({main}=..., in an .npz or each batch's mapping)"
        )
    if is_encoder_decoder(module) and labels is None and not any(key in keys for key in DECODER_INPUTS):
        return (
            f"{name} is an encoder-decoder model and its decoder got no input; expected decoder_input_ids beside "
            f"{main} (an .npz array or a batch key of that name), or labels (from which the model builds them)"
        )
    return None


def _guess_sample_shape(module: nn.Module) -> tuple[int, ...] | None:
    """One sample's shape when the model says it: a transformers image model (main input `pixel_values`) by its
    config's `num_channels` and `image_size`, else a first layer that is Linear; None otherwise."""
    config = getattr(module, "config", None)
    if getattr(module, "main_input_name", None) == "pixel_values":
        channels, size = getattr(config, "num_channels", None), getattr(config, "image_size", None)
        if isinstance(size, int):
            size = (size, size)
        if isinstance(channels, int) and isinstance(size, (list, tuple)) and len(size) == 2:
            if all(isinstance(side, int) and side > 0 for side in size) and channels > 0:
                return (channels, *size)
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return (sub.in_features,)
        if any(True for _ in sub.parameters(recurse=False)):
            return None
    return None


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _expected_input(run: TorchRun) -> str:
    if run.keywords is not None:
        return f"expected the keyword inputs the program was exported with: {run.keywords.describe()} per sample"
    if run.example_shape is not None:
        return f"expected samples of shape {run.example_shape} (the program's example input)"
    if run.vocabulary is not None:
        return f"expected token ids in [0, {run.vocabulary}) and the model's keyword inputs"
    for sub in run.module.modules():
        if isinstance(sub, nn.Linear):
            return (
                f"the first layer is Linear({sub.in_features}, ...): expected {sub.in_features} features on the "
                "last axis"
            )
        if isinstance(sub, _CONVOLUTIONS):
            return (
                f"the first layer is {type(sub).__name__} with {sub.in_channels} input channels: expected "
                f"(N, {sub.in_channels}, ...)"
            )
        if any(True for _ in sub.parameters(recurse=False)):
            break
    return "expected inputs the model accepts"


@contextmanager
def preserved(module: nn.Module) -> Iterator[None]:
    """Eval mode, no transformer fast path; afterwards the model exactly as it was found."""
    training = [(m, m.training) for m in module.modules()]
    params = list(module.parameters())
    requires_grad = [(p, p.requires_grad) for p in params]
    grads = [(p, p.grad) for p in params]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        try:
            module.eval()
        except NotImplementedError:  # graph modules from torch.export: the mode was fixed at export
            pass
        yield
    finally:
        if mha is not None and fastpath is not None:
            mha.set_fastpath_enabled(fastpath)
        for m, flag in training:
            m.training = flag
        for p, flag in requires_grad:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for p, grad in grads:
            if p.grad is not grad:
                p.grad = grad
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)


class TorchWatch:
    """The hooked sites of one scan, and the step that drives them."""

    def __init__(self, run: TorchRun, watcher: SiteWatcher, loss: ResolvedLoss, probe: Probe) -> None:
        self.run = run
        self.watcher = watcher
        self.loss = loss
        self.probe = probe
        self.first = True
        self.warnings = watcher.warnings  # the watcher's own and the steps' (one list, in order)
        self.unobserved = watcher.unobserved

    def step(self, batch: Batch) -> None:
        x, y, valid = batch.x, batch.y, batch.valid
        n = leading(x)
        real = real_tokens(x, n, self.run.module)
        first, self.first = self.first, False
        if self.loss == "none":
            with torch.no_grad(), self.watcher.forward(n, valid, real):
                self.run.forward(x)
            return
        module = self.run.module
        params = [p for p in module.parameters() if p.requires_grad]
        floating = isinstance(x, torch.Tensor) and x.is_floating_point()
        if not params and not floating:
            # Integer inputs into a frozen model: no graph would be built. Trainable for this scan only
            # (`preserved` puts requires_grad back).
            params = [p for p in module.parameters() if p.is_floating_point()]
            for p in params:
                p.requires_grad_(True)
        leaf = None
        with torch.enable_grad():
            if not params and floating:
                # A frozen model: differentiate with respect to the inputs instead. (With trainable parameters the
                # inputs are left out: their gradient would cost the first layer's backward-data pass.)
                leaf = x.detach().requires_grad_(True)
                x = leaf.clone()  # the model may write into its input in place; a leaf would refuse that
            with self.watcher.forward(n, valid, real):
                out = self.run.forward(x, labels=y if self.loss == "model" else None)
            objective = task_loss(self.loss, out, y, valid, self.probe, first)
            inputs = ([leaf] if leaf is not None else []) + params
            if objective is None or not objective.requires_grad or not inputs:
                message = "no gradient taken: the model's output does not depend on anything differentiable"
                if message not in self.warnings:
                    self.warnings.append(message)
                return
            torch.autograd.grad(objective, inputs, allow_unused=True)

    def sites(self) -> list[SiteInfo]:
        return self.watcher.collect_infos()

    def accumulators(self) -> list[SiteAccumulator]:
        return list(self.watcher.accumulators.values())

    def collect(self, accumulators: list[Any]) -> list[tuple[SiteInfo, SiteStats]]:
        return collect(accumulators)


def train(model: Any, batches: Iterator[Batch], *, loss: ResolvedLoss, lr: float, seed: int) -> nn.Module:
    """A copy of `model` trained one Adam step per batch, in train mode where the model allows it (a torch.export
    graph keeps the mode it was exported in), with `seed` for anything random in the forward pass (dropout)."""
    module = copy_model(model.module() if isinstance(model, torch.export.ExportedProgram) else model)
    for p in module.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    try:
        module.train()
    except NotImplementedError:  # a torch.export graph: the mode was fixed at export
        pass
    run = TorchRun(module, type(module).__name__)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in batches:
            if loss == "model":
                value = own_loss(run.forward(batch.x, labels=batch.y))
            else:
                out = run.output(batch.x)[: batch.valid]
                y = batch.y[: batch.valid]
                if loss == "ce":
                    value = F.cross_entropy(out, y.long())
                else:
                    value = F.mse_loss(out, y.reshape(out.shape).to(out.dtype))
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
    return module


NO_SITES = (
    "no activation sites ran: the model calls none of the activations deadneuron knows "
    "(ReLU family, GELU, SiLU, ... as modules or functions)"
)


def _load(path: str, *, unsafe_deserialization: bool = False, **options: Any) -> Any:
    """A `.pt2` as an `ExportedProgram`; a state dict with `arch` (or a pickled module) as an `nn.Module`
    (`unsafe_deserialization` is Keras's)."""
    return load_model(os.fspath(path), **options)


BACKEND = Backend("torch", NO_SITES, prepare, _load, swap_model, swap_file, swap_for_scan, train)


def with_probe(probe: Callable[[int], Probe]) -> Backend:
    """The torch backend with another gradient probe (seed -> probe): `deadneuron.torch.distributed` draws by
    global sample position."""
    return replace(BACKEND, prepare=partial(prepare, probe=probe))
