"""Watch units die in an ordinary PyTorch training loop: a learning rate that is too high kills ReLU units.

Run: python docs/examples/torch_monitor.py  (a TensorBoard writer with --tensorboard DIR, a page with --html FILE)
"""

from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn

from deadneuron.torch import DeadNeuronMonitor

logging.basicConfig(level=logging.INFO, format="%(message)s")  # the monitor logs one line per window
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
x_all, y_all = torch.randn(4096, 20), torch.randint(0, 10, (4096,))
writer = None
if "--tensorboard" in sys.argv:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(sys.argv[sys.argv.index("--tensorboard") + 1])

optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
# every=10: hooks on one step in ten; window=200: one report (and one host transfer) per 200 steps. The monitor
# counts steps by the optimizer's; the loop needs no monitor call.
with DeadNeuronMonitor(model, every=10, window=200, alert=0.2, writer=writer, optimizer=optimizer) as monitor:
    for step in range(600):
        if step == 200:
            for group in optimizer.param_groups:
                group["lr"] = 10.0  # far too high: many units die
        i = torch.randint(0, 4096, (64,))
        loss = F.cross_entropy(model(x_all[i]), y_all[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # ends the step; at a window end the report is built

print(monitor.report())
print(monitor.changes())
if "--html" in sys.argv:  # the dead fraction of each site over the steps, as a page
    from deadneuron.report.html import to_html

    with open(sys.argv[sys.argv.index("--html") + 1], "w") as page:
        page.write(to_html(monitor.history()))
