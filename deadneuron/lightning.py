"""`DeadNeuronCallback`: the PyTorch monitor (`deadneuron.torch.DeadNeuronMonitor`) as a Lightning callback.

Importing this module imports lightning; `import deadneuron` does not. A thin wrapper (docs/callbacks.md):

- `setup` (fit) builds the monitor on the LightningModule; `on_train_start` attaches it (after a checkpoint was
  restored and the model placed on its device); `teardown` takes every hook off.
- A step is one training batch: `on_train_batch_end` calls `monitor.step()`. The forward pass of a sampled batch is
  observed from `on_train_batch_start` to `on_before_backward`, so `training_step` may call `self(x)` or any
  submodule; the backward that Lightning runs fills the gradient statistics.
- At each window end it logs through `pl_module.log` (identical values on every rank, so no sync):
  `deadneuron/dead_fraction`, `deadneuron/dormant_fraction`, `deadneuron/grad_dead_fraction` and, with
  `log_per_site=True`, `deadneuron/dead_fraction/<site>`. Windows end every `window` batches (logged on_step;
  Lightning writes step metrics to the logger only on steps that are multiples of `Trainer(log_every_n_steps=...)`,
  so keep `window` a multiple of it, checked at setup) and at each epoch's end, where the partial window is closed
  and logged on_epoch, so a run shorter than a window reports too. `on_train_end` closes what is left (a run that
  stopped mid-epoch) into `report` and the history, without logging (Lightning refuses logs there).
- Statistics are combined across ranks at window ends; the text report (log line, alert) comes from rank zero.
- `state_dict`/`load_state_dict`: a checkpoint keeps the window in progress (step counter, statistics combined
  across ranks, the previous window's dead units), so a resumed run ends its window where the first would have.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from .core.window import figures
from .report import Report
from .report.history import History
from .torch.distributed import all_reduce_sites, is_distributed, rank_zero
from .torch.monitor import DEFAULT_EVERY, DEFAULT_WINDOW, DeadNeuronMonitor, batch_size_of, check_options

__all__ = ["KEYS", "DeadNeuronCallback"]

#: Keys logged at every window end; per-site keys (`log_per_site=True`) are `deadneuron/dead_fraction/<site>`.
KEYS = ("deadneuron/dead_fraction", "deadneuron/dormant_fraction", "deadneuron/grad_dead_fraction")


class DeadNeuronCallback(Callback):
    """Log dead-unit fractions of the trained LightningModule window by window (docs/callbacks.md).

    `every`: observe one training batch in `every` (hooks attached for that batch only); `window`: batches per
    report. `alert=F` warns once when the dead fraction exceeds F. After training, `report` is the last window's
    `Report` (`monitor.changes()` says which units newly died or revived).
    """

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        window: int = DEFAULT_WINDOW,
        alert: float | None = None,
        log_per_site: bool = False,
        *,
        atol: float = 0.0,
        gtol: float = 0.0,
    ) -> None:
        check_options(every=every, window=window, alert=alert, atol=atol, gtol=gtol)
        self.every = every
        self.window = window
        self.alert = alert
        self.log_per_site = log_per_site
        self.atol = atol
        self.gtol = gtol
        self.monitor: DeadNeuronMonitor | None = None
        self._restored: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every=self.every, window=self.window)

    @property
    def report(self) -> Report | None:
        return self.monitor.last_report if self.monitor is not None else None

    # lifecycle --------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.monitor = DeadNeuronMonitor(
            pl_module,
            every=self.every,
            window=self.window,
            alert=self.alert,
            atol=self.atol,
            gtol=self.gtol,
            name=type(pl_module).__name__,
            count_steps=False,  # on_train_batch_end ends each step
        )
        if self._restored is not None:
            self.monitor.load_state_dict(self._restored, statistics=trainer.global_rank == 0)
            self._restored = None
        every_n = getattr(trainer, "log_every_n_steps", 0)  # set by the connector, not declared on Trainer
        if every_n and self.window % every_n:
            rank_zero_warn(
                f"DeadNeuronCallback(window={self.window}) ends windows on steps that Lightning does not log "
                f"(log_every_n_steps={every_n}): its keys reach the logger only when a window end falls on a "
                f"logging step; make window a multiple of {every_n}"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.start()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None and self.monitor.running:
            report = self.monitor.close_window()
            if report is not None:
                self._log(pl_module, report, on_step=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None and self.monitor.running:
            self.monitor.close_window()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is not None:
            self.monitor.stop(close=False)  # on_train_end closed it; after an error, the window stays as it is

    def history(self) -> History | None:
        """The figures of every window of the run (`deadneuron.report.html.to_html` draws them)."""
        return self.monitor.history() if self.monitor is not None else None

    # steps ------------------------------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is not None:
            self.monitor.begin_forward(batch_size_of(batch))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self.monitor is not None:
            self.monitor.end_forward()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is None or not self.monitor.running:
            return
        report = self.monitor.step()
        if report is not None:
            self._log(pl_module, report)

    def _log(self, pl_module: pl.LightningModule, report: Report, *, on_step: bool = True) -> None:
        per_site = ("dead_fraction",) if self.log_per_site else ()
        for key, value in figures(report, prefix="deadneuron/", per_site=per_site).items():
            pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, logger=True, sync_dist=False)

    # state for resuming -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        monitor = self.monitor
        if monitor is None:
            return {"monitor": self._restored} if self._restored is not None else {}
        # Lightning gathers callback states on every rank and writes rank zero's: save the combined statistics
        # (a collective, as every rank is here), and restore them on rank zero only.
        combined = None
        if is_distributed() and not monitor.restoring:
            combined = all_reduce_sites(monitor.accumulators(), atol=self.atol, gtol=self.gtol)
        return {"monitor": monitor.state_dict(combined)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("monitor")
        if state is None:
            return
        if self.monitor is None:
            self._restored = state
        else:
            self.monitor.load_state_dict(state, statistics=rank_zero())
