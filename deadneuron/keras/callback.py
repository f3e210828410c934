"""`DeadNeuronCallback`: scan a probe batch at the end of training epochs and put the figures into Keras `logs`.

A thin wrapper over the scan engine with the Keras backend: every figure is the one a `deadneuron.scan` of the model
on the probe would give at that moment. Only `on_epoch_end` is overridden: a per-batch hook would switch off Keras's
asynchronous dispatch. Keys written into `logs` reach only the callbacks listed after this one (History and the
progress bar always come last), so it must come first in `callbacks=[...]`.

Distribution: the probe is scanned whole, on the mirrored weights (identical on every replica after each step),
outside any replica context. That is what summing per-replica scans of shards of the probe would give, without the
reduction. Keras runs `on_epoch_end` outside the strategy's scope; when `fit` itself was called inside
`strategy.scope()`, the scan runs in a short-lived worker thread, whose distribution context is the default one, so
its statistics variables are plain variables (mirrored ones cannot be read back to the host there).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import keras

from ..core import engine
from ..core.options import ScanOptions
from ..core.window import WindowTracker, figures
from ..errors import DeadNeuronError
from ..report import Report
from ..report.history import History
from .backend import BACKEND, Steps

logger = logging.getLogger("deadneuron.keras")

T = TypeVar("T")

#: Keys written into `logs` on every scanned epoch; the per-site keys are `dead_fraction/<site name>`.
KEYS = ("dead_fraction", "dormant_fraction", "grad_dead_fraction")


class DeadNeuronCallback(keras.callbacks.Callback):
    """Scan `probe` at the end of every `every_n_epochs`-th epoch and log dead-unit figures (docs/callbacks.md).

    Keys added to `logs` (fractions in [0, 1] of all units of all activation sites):

    - `dead_fraction`: units whose output was exactly 0 (|a| <= atol) on every probe sample and position;
    - `dormant_fraction`: units whose pre-activation was <= 0 everywhere (equal to dead for the ReLU family;
      the fair figure for SineReLU, leaky and smooth activations);
    - `grad_dead_fraction`: units whose dL/d(pre-activation) was 0 (|g| <= gtol) everywhere; absent with
      `loss="none"`;
    - with `per_site=True`, `dead_fraction/<site>` per activation site (`dense`, `block/conv`, `dense#2` for a
      second call), accepted verbatim by CSVLogger and TensorBoard (which groups them under `epoch_dead_fraction`).

    Put this callback first in `callbacks=[...]`: only the callbacks after it (and History) see its keys.
    Scanned epochs are the first one and then every `every_n_epochs`-th (0-based epoch % every_n_epochs == 0), so
    CSVLogger, which fixes its columns at the first epoch, always gets them; on other epochs the keys are absent,
    as `val_` keys are under `validation_freq`.

    After training, `reports` maps each scanned epoch (0-based, as in `logs` and CSVLogger) to its `Report`;
    `last_report` is the latest one; `newly_dead` and `revived` map site names to the unit indices that died or
    came back since the previous scan. Those changes are logged on the `deadneuron.keras` logger at INFO level
    when `verbose` >= 1 (`logging.basicConfig(level=logging.INFO)` shows them). `alert=F` warns once, with a
    `UserWarning`, the first time the dead fraction exceeds F.

    Example::

        model.fit(x, y, epochs=10, callbacks=[DeadNeuronCallback((x[:256], y[:256])), CSVLogger("log.csv")])
    """

    def __init__(
        self,
        probe: Any,
        *,
        every_n_epochs: int = 1,
        labels: Any = None,
        loss: str = "auto",
        per_site: bool = False,
        atol: float = 0.0,
        gtol: float = 0.0,
        batch_size: int = 64,
        alert: float | None = None,
        verbose: int = 1,
    ) -> None:
        super().__init__()
        if probe is None:
            raise DeadNeuronError(
                "DeadNeuronCallback needs a probe; expected an array, an (x, y) pair or a finite tf.data.Dataset "
                "of a few hundred samples"
            )
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise DeadNeuronError(f"every_n_epochs must be an integer >= 1, received {every_n_epochs!r}")
        self.options = ScanOptions(batch_size=batch_size, loss=loss, atol=atol, gtol=gtol)  # type: ignore[arg-type]
        if alert is not None and (not _number(alert) or not 0 <= alert < 1):
            raise DeadNeuronError(
                f"alert is the dead fraction above which to warn; expected a number in [0, 1) or None, received "
                f"{alert!r}"
            )
        self.probe = probe
        self.every_n_epochs = every_n_epochs
        self.labels = labels
        self.loss = loss
        self.per_site = per_site
        self.atol = float(atol)
        self.gtol = float(gtol)
        self.batch_size = batch_size
        self.alert = alert
        self.verbose = verbose
        self.reports: dict[int, Report] = {}
        self.newly_dead: dict[str, list[int]] = {}
        self.revived: dict[str, list[int]] = {}
        self._tracker = WindowTracker("model", axis="epoch", alert=alert)
        self._steps = Steps()  # each epoch's scan runs the step the first one traced (backend.Steps)

    @property
    def last_report(self) -> Report | None:
        """The report of the latest scan, or None before the first one."""
        return self.reports[max(self.reports)] if self.reports else None

    def history(self) -> History:
        """The figures of every scanned epoch, in order (`deadneuron.report.html.to_html`
        draws them); the steps are 0-based epochs, as in `logs`."""
        return self._tracker.history

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._steps.clear()  # the model may have been edited since the last fit
        self._tracker.history.model = getattr(self.model, "name", None) or "model"
        tf = sys.modules.get("tensorflow")
        if tf is not None and isinstance(self.probe, tf.data.Dataset):
            if int(self.probe.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
                raise DeadNeuronError(
                    "the probe dataset is infinite (it repeats), so a scan would never end; expected a finite "
                    "dataset: drop .repeat() or use .take(n)"
                )

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._steps.clear()  # free the traced step and its variables

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch % self.every_n_epochs:
            return

        def work() -> Report:
            with self._steps.active():
                return engine.scan(BACKEND, self.model, self.probe, self.options, labels=self.labels)

        report = _outside_strategy(work)
        self.reports[epoch] = report
        if logs is not None:
            logs.update(figures(report, per_site=("dead_fraction",) if self.per_site else ()))
        tracker = self._tracker
        changes = tracker.close(report, first_step=epoch, last_step=epoch, step=epoch)
        self.newly_dead, self.revived = changes.died, changes.revived
        if self.verbose >= 1:
            logger.info("%s", tracker.describe(report, changes, label=f"epoch {epoch + 1}", samples="probe"))
        tracker.check_alert(report, when=f"after epoch {epoch + 1}", details="the callback's last_report", stacklevel=2)


def _outside_strategy(work: Callable[[], T]) -> T:
    """Run `work` in the default distribution context (see the module docstring)."""
    tf = sys.modules.get("tensorflow")
    if keras.backend.backend() != "tensorflow" or tf is None or not tf.distribute.has_strategy():
        return work()
    # The strategy stack is thread-local: a fresh thread starts in the default strategy.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deadneuron-scan") as pool:
        return pool.submit(work).result()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
