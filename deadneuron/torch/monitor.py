"""`DeadNeuronMonitor`: dead units watched during ordinary PyTorch training (docs/callbacks.md).

It reuses the scan's machinery: `SiteWatcher` (module hooks, a `TorchFunctionMode` for functional calls, gradient
hooks on the pre-activations) and `SiteAccumulator` (per-unit sums and maxima on the device). Only the driving
differs: the scan runs its own forward and backward passes; the monitor observes the user's.

- Steps count themselves. With `optimizer=`, a step ends at each `optimizer.step()` (its step post-hook), which
  is right with gradient accumulation too. Without, a step ends when the next training forward of the model begins
  (a forward pre-hook on the model as passed, which costs one Python call per forward), and the last one at the
  monitor's exit. Calling `monitor.step()` (after `optimizer.step()`) instead is explicit and robust to several
  forward calls per step: from the first call on (from the start with `count_steps=False`, as the Lightning
  callback does), the monitor counts only those calls (never a step twice).
- Sampling: hooks are attached only for sampled steps (step k, from 0, when k % every == 0), from the end of the
  step before to the end of that step; unsampled steps run the bare model. The figures describe the sampled steps
  only. A forward is observed when the model runs in train mode with autograd on; its gradient statistics come
  from the user's own `loss.backward()` through tensor hooks registered in it: the monitor runs no pass of its own.
- A window ends every `window` steps, at `close_window()` (the Lightning callback calls it at epoch ends) and at
  the monitor's exit, so short runs report too. Only then do statistics go to the host: reduced across ranks
  under torch.distributed, built into a `Report`, handed to the window tracker (died/revived, alert), logged and
  written to the writer. Nothing between window ends synchronises with the device.
- Wrapped models: DDP/DataParallel are hooked through `.module`, torch.compile'd ones through `._orig_mod`. Hooks do
  not fire inside compiled code, so sampled steps run under `torch.compiler.set_stance("force_eager")` (whenever
  torch._dynamo is loaded): the compiled model runs its original eager code for those steps only, and compiled
  code is back for the others. With `every=1` a compiled model therefore always runs eagerly.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..core.window import WindowChanges, WindowTracker, figures
from ..errors import DeadNeuronError
from ..report import Report
from ..report.history import FRACTIONS, History
from .accumulate import SiteAccumulator, collect
from .distributed import all_reduce_sites, rank_zero
from .sites import SiteWatcher, real_tokens

logger = logging.getLogger("deadneuron.torch")

#: Defaults: hooks on one step in 200 keep the cost of a small model's training step under 5% with a margin
#: (benchmarks/monitor.py: a hooked step of a 0.3 ms MLP costs ~0.5 ms more; one in 100 measured 3.6-6.9%,
#: at the line); a window of 1000 steps then observes 5 steps. `every=1` counts every step.
DEFAULT_EVERY = 200
DEFAULT_WINDOW = 1000

#: The Report's `loss` field for monitor reports: the gradients are those of the user's own training loss.
LOSS = "training"


def unwrap(model: Any) -> tuple[nn.Module, bool]:
    """The module whose hooks fire (through DDP/DataParallel and torch.compile wrappers), and whether a compiled
    wrapper was seen."""
    compiled = False
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
            compiled = True
        else:
            break
    if isinstance(model, torch.jit.ScriptModule) or not isinstance(model, nn.Module):
        raise DeadNeuronError(
            f"cannot monitor a {type(model).__name__}; expected a torch.nn.Module (plain, DDP-wrapped or "
            "torch.compile'd)"
        )
    return model, compiled


def check_options(*, every: int, window: int, alert: float | None, atol: float, gtol: float) -> None:
    """The monitor's options, checked once (the Lightning callback checks them at construction too)."""
    for label, value in (("every", every), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DeadNeuronError(f"{label} must be a positive whole number of steps; received {value!r}")
    if alert is not None and not 0.0 <= alert <= 1.0:
        raise DeadNeuronError(f"alert is a fraction of units; expected a number in [0, 1], received {alert!r}")
    if atol < 0 or gtol < 0:
        raise DeadNeuronError(f"atol and gtol must be >= 0; received atol={atol!r}, gtol={gtol!r}")


def _first_batch_size(values: Iterable[Any]) -> int | None:
    for value in values:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.ndim else None
        if isinstance(value, (list, tuple)):
            found = _first_batch_size(value)
            if found is not None:
                return found
        if isinstance(value, dict):
            found = _first_batch_size(value.values())
            if found is not None:
                return found
    return None


def batch_size_of(batch: Any) -> int | None:
    """The leading size of the first tensor in a batch (a tensor, tuple, list or dict); None if there is none."""
    return _first_batch_size([batch])


class DeadNeuronMonitor:
    """Watch dead, dormant and gradient-dead units during training, window by window.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with DeadNeuronMonitor(model, every=1, window=2) as monitor:  # no call in the loop: it counts steps
    ...     for _ in range(2):
    ...         loss = model(torch.randn(16, 4)).square().mean()
    ...         opt.zero_grad(); loss.backward(); opt.step()
    >>> monitor.steps, monitor.report().samples
    (2, 32)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = DEFAULT_EVERY,
        window: int = DEFAULT_WINDOW,
        writer: Any = None,
        alert: float | None = None,
        atol: float = 0.0,
        gtol: float = 0.0,
        gradients: bool = True,
        unit_axis: int | None = None,
        name: str | None = None,
        optimizer: Any = None,
        count_steps: bool = True,
    ) -> None:
        check_options(every=every, window=window, alert=alert, atol=atol, gtol=gtol)
        if optimizer is not None and not callable(getattr(optimizer, "register_step_post_hook", None)):
            raise DeadNeuronError(
                f"optimizer must be a torch.optim.Optimizer (it ends each step); received {type(optimizer).__name__}"
            )
        self.model = model  # as passed: its forward calls are what the monitor counts without an optimizer
        self.module, self.compiled = unwrap(model)
        self.optimizer = optimizer
        self.every = every
        self.window = window
        self.writer = writer
        self.alert = alert
        self.atol = atol
        self.gtol = gtol
        self.gradients = gradients
        self.unit_axis = unit_axis
        self.name = name or type(self.module).__name__
        self.steps = 0  # completed steps
        self._window_start = 0  # the step the window in progress began at
        self._explicit = not count_steps  # the user calls step(): count only those calls
        self._forwarded = False  # a training forward ran in the step in progress
        self._counting: Any = None  # the step counter's hook handle
        self._counted_report: Report | None = None  # the window the optimizer's hook ended at the first step() call
        self._counted = False  # the optimizer's hook ended the step in progress (see step())
        self.last_report: Report | None = None
        self.last_changes: WindowChanges | None = None
        self._tracker = WindowTracker(self.name, axis="step", alert=alert)
        self._watcher: SiteWatcher | None = None
        self._running = False
        self._attached = False
        self._root_handles: list[Any] = []
        self._scope: Any = None  # the open forward scope (the watcher's forward context)
        self._scope_owner: str | None = None  # "root" (the model's own call) or "explicit" (begin_forward)
        self._stance: Any = None
        self._pending: list[dict[str, Any]] | None = None  # restored statistics, built on start

    # lifecycle --------------------------------------------------------------------------------------------------
    def __enter__(self) -> DeadNeuronMonitor:
        return self.start()

    def __exit__(self, kind: object, *exc: object) -> None:
        self.stop(close=kind is None)  # after an error, leave the window open (and readable) as it is

    def start(self) -> DeadNeuronMonitor:
        if self._running:
            return self
        if self._watcher is None:
            self._watcher = SiteWatcher(
                self.module, atol=self.atol, gtol=self.gtol, unit_axis=self.unit_axis, gradients=self.gradients
            )
        self._watcher.paused = True
        self._restore_pending()
        self._running = True
        if not self._explicit:
            self._counting = (
                self.optimizer.register_step_post_hook(self._on_optimizer_step)
                if self.optimizer is not None
                else self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
            )
        if self._sampled(self.steps):
            self._attach()
        return self

    def stop(self, *, close: bool = True) -> None:
        """End the step and the window in progress (unless `close=False`), take every hook off and put
        torch.compile's stance back; may run twice. Statistics stay readable."""
        try:
            if close and self._running:
                self.close_window()
        finally:
            self._running = False
            counting, self._counting = self._counting, None
            if counting is not None:
                counting.remove()
            self._detach()

    def _attach(self) -> None:
        watcher = self._require_watcher()
        try:
            watcher.attach()
            self._root_handles.append(self.module.register_forward_pre_hook(self._root_pre, with_kwargs=True))
            self._root_handles.append(self.module.register_forward_hook(self._root_post, always_call=True))
            if "torch._dynamo" in sys.modules:
                # Compiled code ignores hooks added after compiling; run the sampled step eagerly.
                self._stance = torch.compiler.set_stance("force_eager")
            self._attached = True
        except BaseException:
            self._detach()
            raise

    def _detach(self) -> None:
        try:
            if self._scope is not None:
                self._close()
        finally:
            if self._watcher is not None:
                self._watcher.remove()
            while self._root_handles:
                self._root_handles.pop().remove()
            stance, self._stance = self._stance, None
            if stance is not None:
                stance.__exit__(None, None, None)
            self._attached = False

    def _require_watcher(self) -> SiteWatcher:
        if self._watcher is None:
            raise DeadNeuronError("the monitor is not started; use `with DeadNeuronMonitor(model) as m:` or m.start()")
        return self._watcher

    # forward scopes ---------------------------------------------------------------------------------------------
    def _open(self, n: int | None, owner: str, real: torch.Tensor | None = None) -> None:
        watcher = self._require_watcher()
        scope = watcher.forward(n, n or 0, real)
        scope.__enter__()
        self._scope, self._scope_owner = scope, owner
        watcher.paused = False

    def _close(self) -> None:
        scope, self._scope, self._scope_owner = self._scope, None, None
        if self._watcher is not None:
            self._watcher.paused = True
        if scope is not None:
            scope.__exit__(None, None, None)

    def _root_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
        # Also called by _on_forward: a hook registered while the model's pre-hooks run takes effect at its next
        # call only, and one removed then still runs once (without its kwargs).
        if not self._attached or self._scope is not None or not (module.training and torch.is_grad_enabled()):
            return
        n = _first_batch_size([*args, *(kwargs or {}).values()])
        self._open(n, "root", real_tokens(kwargs, n, module))  # a padded batch's keyword attention_mask

    def _root_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._scope_owner == "root":
            self._close()

    def begin_forward(self, batch_size: int | None = None) -> None:
        """Observe the forward passes from now until `end_forward()` (or `step()`), for training code that does not
        call the monitored module itself (Lightning's `training_step` may call a submodule). No-op on unsampled
        steps. `batch_size=None` counts every sample of each site's tensor."""
        if self._attached and self._scope is None:
            self._open(batch_size, "explicit")

    def end_forward(self) -> None:
        if self._scope_owner == "explicit":
            self._close()

    # steps and windows ------------------------------------------------------------------------------------------
    def _sampled(self, step: int) -> bool:
        return step % self.every == 0

    def _on_forward(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The step counter without an optimizer: a training forward of the model begins a step, ending the one
        before it if that one had a training forward."""
        if not (self.module.training and torch.is_grad_enabled()):
            return
        if self._forwarded:
            self._end_step()
        self._forwarded = True
        if model is self.module:
            self._root_pre(model, args, kwargs)

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._counted_report = self._end_step()
        self._counted = True

    def step(self) -> Report | None:
        """End a training step (call it after `optimizer.step()`); returns the window's Report when a window ended.
        Optional: without calls the monitor counts steps itself; from the first call on it counts only calls."""
        if not self._running:
            raise DeadNeuronError(
                "monitor.step() called on a monitor that is not running; use `with DeadNeuronMonitor(model) as m:` "
                "or call m.start() before training"
            )
        if not self._explicit:
            self._explicit = True
            if self._counting is not None:
                self._counting.remove()
                self._counting = None
            if self._counted:  # the optimizer's hook already ended this step
                return self._counted_report
        return self._end_step()

    def _end_step(self) -> Report | None:
        self.end_forward()
        self._forwarded = self._counted = False
        self.steps += 1
        report = self._end_window() if self.steps % self.window == 0 else None
        sampled = self._sampled(self.steps)
        if sampled and not self._attached:
            self._attach()
        elif not sampled and self._attached:
            self._detach()
        return report

    @property
    def running(self) -> bool:
        return self._running

    @property
    def restoring(self) -> bool:
        """True between `load_state_dict` and `start()`: the restored statistics are not on the device yet."""
        return self._pending is not None

    def accumulators(self) -> list[SiteAccumulator]:
        """The window in progress: one accumulator per site, on the device, in order of first execution."""
        if self._watcher is not None:
            return list(self._watcher.accumulators.values())
        return []

    def _build(self, accumulators: list[SiteAccumulator], observed: int, steps: int) -> Report:
        watcher = self._watcher
        notes = list(watcher.warnings) if watcher is not None else []
        if observed and not accumulators:
            notes.append(
                "no activation site ran under the monitor's hooks: the model calls none of the activations "
                "deadneuron knows, or it ran compiled code the monitor did not see (create the monitor with the "
                "model you train: plain, DDP-wrapped or torch.compile'd)"
            )
        elif self.every > 1:
            notes.append(
                f"sampled: {observed} of {steps} steps observed (one in {self.every}); a unit counted dead did not "
                "fire on the observed steps and may have fired on others"
            )
        return Report.build(
            framework="torch",
            model=self.name,
            loss=LOSS if self.gradients else "none",
            sites=collect(accumulators),
            atol=self.atol,
            gtol=self.gtol,
            warnings=notes,
            unobserved=watcher.unobserved if watcher is not None else (),
        )

    def _observed_in(self, first: int, stop: int) -> int:
        """Sampled steps among steps first..stop-1."""
        return len(range(-(-first // self.every) * self.every, stop, self.every))

    @property
    def windows(self) -> int:
        """Completed windows."""
        return self._tracker.windows

    def close_window(self) -> Report | None:
        """End the window in progress now (at an epoch's end, say) and report it as at any window's end; None when
        none of its steps was observed (it then stays open). The next window still ends on a multiple of `window`."""
        if self._forwarded and not self._explicit and self.optimizer is None:
            self._end_step()  # the step in progress is over: nothing else would end it
        if not self._observed_in(self._window_start, self.steps):
            return None
        return self._end_window()

    def _end_window(self) -> Report:
        first, self._window_start = self._window_start, self.steps
        accumulators = all_reduce_sites(self.accumulators(), atol=self.atol, gtol=self.gtol)
        report = self._build(accumulators, self._observed_in(first, self.steps), self.steps - first)
        if self._watcher is not None:
            self._watcher.accumulators = {}
        self.last_report = report
        self.last_changes = self._tracker.close(report, first_step=first, last_step=self.steps - 1, step=self.steps)
        if rank_zero():
            self._publish(report, self.last_changes)
        return report

    def _publish(self, report: Report, changes: WindowChanges) -> None:
        label = f"{self.name} window {changes.window} (steps {changes.first_step}-{changes.last_step})"
        logger.info("%s", self._tracker.describe(report, changes, label=label, samples="observed"))
        if self.writer is not None:
            self._write(report)
        self._tracker.check_alert(
            report, when=f"in {self.name} at step {self.steps}", details="monitor.report()", stacklevel=4
        )

    def _write(self, report: Report) -> None:
        """TensorBoard: the figures in total and per site as scalars, and each site's firing rates as a histogram
        where the writer has `add_histogram`."""
        step = self.steps
        for key, value in figures(report, prefix="deadneuron/", per_site=FRACTIONS).items():
            self.writer.add_scalar(key, value, step)
        add_histogram = getattr(self.writer, "add_histogram", None)
        if add_histogram is None:
            return
        for layer in report.layers:
            if layer.stats is not None and layer.stats.samples:
                add_histogram(f"deadneuron/firing_rate/{layer.name}", layer.stats.firing_rate, step)

    def history(self) -> History:
        """The figures of every completed window, in order (`deadneuron.report.html.to_html` draws them)."""
        return self._tracker.history

    # results ----------------------------------------------------------------------------------------------------
    def report(self) -> Report:
        """The Report of the last completed window; before the first window ends, the window so far (this
        process's statistics only: ranks are combined at window ends)."""
        if self.last_report is not None:
            return self.last_report
        if self._pending is not None:
            accumulators = [self._from_state(s, torch.device("cpu")) for s in self._pending]
        else:
            accumulators = self.accumulators()
        first = self._window_start
        return self._build(accumulators, self._observed_in(first, self.steps), self.steps - first)

    def changes(self) -> WindowChanges | None:
        """Units that newly died or revived at the last window end (None before the first)."""
        return self.last_changes

    # state for resuming -----------------------------------------------------------------------------------------
    def state_dict(self, accumulators: list[SiteAccumulator] | None = None) -> dict[str, Any]:
        """The window in progress as plain values (ints, lists, CPU tensors): one host copy, at checkpoints only."""
        if self._pending is not None and accumulators is None:
            sites = [dict(s) for s in self._pending]
        else:
            sites = [acc.state() for acc in (self.accumulators() if accumulators is None else accumulators)]
        return {
            "version": 1,
            "steps": self.steps,
            "window_start": self._window_start,
            "every": self.every,
            "window": self.window,
            **self._tracker.state_dict(),
            "sites": sites,
        }

    def load_state_dict(self, state: dict[str, Any], *, statistics: bool = True) -> None:
        """Resume a window: step counter, previous window's dead units, and (unless `statistics=False`, for the
        ranks other than the one that holds them) the statistics accumulated so far."""
        if state.get("version") != 1:
            raise DeadNeuronError(
                f"unknown monitor state version {state.get('version')!r}; expected 1 (a state from state_dict())"
            )
        if (state["every"], state["window"]) != (self.every, self.window):
            logger.warning(
                "resuming a monitor saved with every=%s, window=%s into one with every=%s, window=%s",
                state["every"],
                state["window"],
                self.every,
                self.window,
            )
        self.steps = int(state["steps"])
        self._window_start = int(state.get("window_start", self.steps - self.steps % self.window))
        self._tracker.load_state_dict(state)
        self._pending = [dict(s) for s in state["sites"]] if statistics else []
        if self._watcher is not None:
            self._watcher.accumulators = {}
        if self._running:
            self._restore_pending()

    def _device(self) -> torch.device:
        for tensor in self.module.parameters():
            return tensor.device
        return torch.device("cpu")

    def _from_state(self, state: dict[str, Any], device: torch.device) -> SiteAccumulator:
        return SiteAccumulator.from_state(state, device, atol=self.atol, gtol=self.gtol)

    def _restore_pending(self) -> None:
        if self._pending is None or self._watcher is None:
            return
        device = self._device()
        self._watcher.accumulators = {s["name"]: self._from_state(s, device) for s in self._pending}
        self._pending = None
