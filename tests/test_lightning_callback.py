"""deadneuron.lightning.DeadNeuronCallback in real (CPU) Lightning runs, checked against a scan of the same batches."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import deadneuron  # noqa: E402
from deadneuron.lightning import DeadNeuronCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The module and data, also run as a script by the two-process test (Lightning's ddp launcher re-runs a file).
COMMON = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Lit(pl.LightningModule):
        def __init__(self, lr=0.0):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
            with torch.no_grad():  # forced dead units
                self.net[0].weight[:5] = 0.0
                self.net[0].bias[:5] = -1.0
            self.lr = lr

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)  # a submodule, not self(x): the callback still sees it

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    def data(n=64):
        g = torch.Generator().manual_seed(1)
        return TensorDataset(torch.randn(n, 20, generator=g), torch.randint(0, 10, (n,), generator=g))
    """
)
namespace: dict = {}
exec(COMMON, namespace)
Lit, data = namespace["Lit"], namespace["data"]


def _trainer(tmp_path, callback, **kwargs):
    options = dict(
        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, logger=False, log_every_n_steps=1, default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=[callback], **options)


def _scan_all(module):
    x, y = data().tensors
    return deadneuron.scan(module.net, (x, y), batch_size=16)


def test_trainer_logs_the_keys_and_they_match_a_scan(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = Lit()
    callback = DeadNeuronCallback(every=1, window=4, log_per_site=True)
    trainer = _trainer(tmp_path, callback, max_steps=4, logger=CSVLogger(str(tmp_path), name="run"))
    trainer.fit(module, DataLoader(data(), batch_size=16))
    report = callback.report
    scanned = _scan_all(module)
    assert report.samples == 64
    assert [layer.dead_units for layer in report.layers] == [layer.dead_units for layer in scanned.layers]
    assert report.grad_dead_fraction == scanned.grad_dead_fraction
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = [row for row in rows if row.get("deadneuron/dead_fraction")]
    assert len(logged) == 1 and logged[0]["step"] == "3"
    assert float(logged[0]["deadneuron/dead_fraction"]) == pytest.approx(scanned.dead_fraction)
    assert float(logged[0]["deadneuron/grad_dead_fraction"]) == pytest.approx(scanned.grad_dead_fraction)
    assert float(logged[0]["deadneuron/dead_fraction/net.1"]) == pytest.approx(5 / 64)
    assert "deadneuron/dormant_fraction" in logged[0]
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()) == 0


def test_a_run_shorter_than_a_window_logs_at_each_epoch_end(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    callback = DeadNeuronCallback()  # defaults: one batch in 200 observed, windows of 1000
    trainer = _trainer(tmp_path, callback, max_epochs=2, logger=CSVLogger(str(tmp_path), name="run"))
    trainer.fit(Lit(), DataLoader(data(1024), batch_size=16))  # 2 epochs of 64 batches: 128 steps
    assert callback.monitor.steps == 128
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = [row for row in rows if row.get("deadneuron/dead_fraction")]
    # Epoch 1 observed its first batch and is logged at its end; epoch 2 observed none (it stays open).
    assert len(logged) == 1 and logged[0]["step"] == "63"
    for key in ("deadneuron/dormant_fraction", "deadneuron/grad_dead_fraction"):
        assert 0.0 <= float(logged[0][key]) <= 1.0
    assert callback.report.samples == 16
    history = callback.history()
    assert [window.step for window in history.windows] == [64]
    assert history.series("dead_fraction") == ([64], [float(logged[0]["deadneuron/dead_fraction"])])


def test_window_not_on_a_logging_step_is_flagged_at_setup(tmp_path):
    callback = DeadNeuronCallback(every=1, window=3)
    with pytest.warns(UserWarning, match="make window a multiple of 2"):
        _trainer(tmp_path, callback, max_steps=1, log_every_n_steps=2).fit(Lit(), DataLoader(data(16), batch_size=16))


def test_resume_keeps_the_window(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # 16 equal batches an epoch: the runs stop mid-epoch (an epoch's end closes a window), and the resumed run,
    # which restarts the epoch's batches (the loader is not resumable), sees what the uninterrupted one saw.
    x, y = data(16).tensors
    loader = DataLoader(TensorDataset(x.repeat(16, 1), y.repeat(16)), batch_size=16)
    whole = DeadNeuronCallback(every=1, window=8)
    _trainer(tmp_path / "whole", whole, max_steps=8).fit(Lit(), loader)

    first = DeadNeuronCallback(every=1, window=8)
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=6, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=6, callbacks=[first, saver], enable_progress_bar=False,
        enable_model_summary=False, logger=False, log_every_n_steps=1,
    )
    trainer.fit(Lit(), loader)
    assert first.monitor.steps == 6 and first.report.samples == 96  # closed when training ended
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    resumed = DeadNeuronCallback(every=1, window=8)
    _trainer(tmp_path / "resumed", resumed, max_steps=8).fit(Lit(), loader, ckpt_path=str(path))
    assert resumed.monitor.steps == 8 and resumed.monitor.windows == 1
    a, b = resumed.report, whole.report
    assert a.samples == b.samples == 128
    assert [layer.stats.fired.tolist() for layer in a.layers] == [layer.stats.fired.tolist() for layer in b.layers]
    assert a.grad_dead_fraction == b.grad_dead_fraction


SCRIPT = COMMON + textwrap.dedent(
    """
    import json, sys
    from deadneuron.lightning import DeadNeuronCallback

    if __name__ == "__main__":
        callback = DeadNeuronCallback(every=1, window=4)
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_steps=4, callbacks=[callback],
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, logger=False,
            log_every_n_steps=1,
        )
        trainer.fit(Lit(), DataLoader(data(), batch_size=8))  # 2 ranks x 8 = one process's 16
        if trainer.global_rank == 0:
            report = callback.report
            totals = report.to_dict()["totals"]
            totals["samples"] = report.samples
            totals["fired"] = [layer.stats.fired.tolist() for layer in report.layers]
            json.dump(totals, open(sys.argv[1], "w"))
    """
)


@pytest.mark.slow
def test_two_ddp_processes_report_the_same_totals_as_one(tmp_path):
    single = DeadNeuronCallback(every=1, window=4)
    _trainer(tmp_path, single, max_steps=4).fit(Lit(), DataLoader(data(), batch_size=16))
    expected = single.report.to_dict()["totals"]

    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "totals.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    totals = json.loads(out.read_text())
    assert totals["samples"] == 64
    assert totals["fired"] == [layer.stats.fired.tolist() for layer in single.report.layers]
    for key in ("units", "dead", "dead_fraction", "dormant", "grad_dead", "grad_dead_fraction"):
        assert totals[key] == expected[key], key


def test_import_deadneuron_does_not_import_lightning():
    code = "import sys, deadneuron; print('lightning' in sys.modules, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.split() == ["False", "False"]
