"""A reference training loop, readable in one sitting, monitored by ``vanishing.watch``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import vanishing


@dataclass
class TrainResult:
    """What one monitored training run produced."""

    run_dir: Path
    test_accuracy: float
    final_loss: float
    diverged: bool


def train_classifier(
    model: nn.Module,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    run_dir: str | Path,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 0.1,
    seed: int = 0,
    stats: str = "all",
) -> TrainResult:
    """Minibatch SGD with cross-entropy for ``steps`` steps under a monitor.

    A run whose loss becomes NaN or infinite stops there and is reported as diverged.

    Example:
        >>> import tempfile
        >>> from vanishing.experiments.data import digits
        >>> from vanishing.experiments.models import mlp
        >>> from vanishing.experiments.train import train_classifier
        >>> res = train_classifier(mlp(64, 10, depth=2, activation="relu"), digits(),
        ...                        run_dir=tempfile.mkdtemp() + "/r", steps=20)
        >>> 0.0 <= res.test_accuracy <= 1.0, res.diverged
        (True, False)
    """
    x, y, xt, yt = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_value, diverged = float("nan"), False
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir, stats=stats) as mon:
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch_size,), generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            loss_value = loss.item()  # host sync: the demo loop prints it; fine on the CPU
            if not math.isfinite(loss_value):
                diverged = True
                break
    model.eval()
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    return TrainResult(mon.run_dir, accuracy, loss_value, diverged)
