"""Dead-unit fractions logged by Lightning: `deadneuron/dead_fraction` and friends in the CSV logger's metrics.csv.

Run: python docs/examples/lightning_callback.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deadneuron.lightning import DeadNeuronCallback


class Classifier(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


torch.manual_seed(0)
data = TensorDataset(torch.randn(4096, 20), torch.randint(0, 10, (4096,)))
callback = DeadNeuronCallback(every=10, window=100, log_per_site=True)  # window: a multiple of log_every_n_steps
trainer = pl.Trainer(
    max_epochs=3, callbacks=[callback], logger=CSVLogger("lightning_logs", name="deadneuron"),
    log_every_n_steps=50, enable_progress_bar=False, accelerator="cpu",
)
trainer.fit(Classifier(lr=5.0), DataLoader(data, batch_size=64, shuffle=True))
print(callback.report)
print(f"metrics: {trainer.logger.log_dir}/metrics.csv")
