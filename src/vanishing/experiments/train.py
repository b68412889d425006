"""The reference training loop, readable in one sitting, and the batches it draws.

Every training loop of the package is :func:`train`: the experiment runner (``vanishing run``,
sweeps), :func:`train_classifier` (``vanishing demo``), greedy layer-wise pretraining and the
Nielsen reproduction. What they share, so that one word means one thing in all of them:

- **a step** is one batch, ``optimizer.zero_grad``, forward, loss, backward, optional gradient
  clipping, ``optimizer.step``, then the learning-rate schedule's step;
- **the monitor** (``watch=``: the keyword arguments of :func:`vanishing.watch`) is attached
  right before the first step and closed right after the last one, so it records exactly the
  steps; nothing of the setup (building, pretraining) and nothing of the final evaluation;
- **evaluation** ``evaluate(step)`` runs after every ``eval_every``-th step but the last, while
  the monitor is open, and once more after the last step done, once it is closed;
- **divergence**: with ``stop_on_nonfinite`` (the default) a NaN or infinite loss stops training
  after that step; the loss is read on the host every step for it (and for ``on_step``);
  without it, the losses stay on the device and are read once, at the end;
- **seeding**: the loop draws no random numbers; the caller seeds the model and passes batches
  drawn from a ``torch.Generator`` of its own (:func:`minibatches`), so the global RNG only
  decides the initial weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from vanishing.monitor import Monitor

__all__ = ["TrainLog", "TrainResult", "minibatches", "train", "train_classifier"]


def minibatches(
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    generator: torch.Generator | None,
    replacement: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(x, y)`` minibatches, drawn with ``generator`` only when they are asked for.

    ``batch_size`` 0 or at least ``len(x)``: the whole of ``(x, y)`` every step (no draws).
    Otherwise ``replacement=False``: a fresh permutation each epoch, cut into batches (the
    incomplete tail of an epoch is skipped); ``replacement=True``: each batch drawn uniformly
    with replacement. ``generator`` may be None only for the full batch. Indices are drawn on
    the generator's device (the CPU for a plain
    ``torch.Generator()``) and moved to ``x``'s.

    Example:
        >>> import torch
        >>> from vanishing.experiments.train import minibatches
        >>> x = torch.arange(5.0)
        >>> batches = minibatches(x, x, batch_size=2, generator=torch.Generator().manual_seed(0))
        >>> [xb.tolist() for xb, _ in (next(batches) for _ in range(2))]  # one epoch: 2 left out
        [[4.0, 0.0], [1.0, 3.0]]
        >>> next(minibatches(x, x, batch_size=0, generator=None))[0] is x   # the full batch
        True
    """
    n = len(x)
    if not 0 < batch_size < n:
        while True:
            yield x, y
    while True:
        if replacement:
            idx = torch.randint(0, n, (batch_size,), generator=generator).to(x.device)
            yield x[idx], y[idx]
            continue
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


@dataclass
class TrainLog:
    """What :func:`train` did: the loss of every step done, in order, and the monitor (closed;
    None when the loop was not watched)."""

    losses: list[float] = field(default_factory=list)
    monitor: Monitor | None = None

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def diverged(self) -> bool:
        """Some step's loss was NaN or infinite."""
        return not all(math.isfinite(v) for v in self.losses)


def train(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    watch: dict[str, Any] | None = None,
    clip_norm: float | None = None,
    schedule: Any = None,
    evaluate: Callable[[int], None] | None = None,
    eval_every: int = 0,
    stop_on_nonfinite: bool = True,
    on_step: Callable[[int, float, Monitor | None], None] | None = None,
) -> TrainLog:
    """Train ``model`` for ``steps`` steps on ``batches`` (pairs ``(input, target)``) with
    ``loss_fn(model(input), target)``; see the module doc for what a step, the monitor,
    evaluation, divergence and seeding mean here.

    ``watch``: keyword arguments of :func:`vanishing.watch` (``run_dir``, ``stats``, ...), or
    None to train unwatched. ``on_step(step, loss, monitor)`` is called after every step
    (before the divergence check; a live display reads ``monitor.latest(...)``). An exception
    propagates after the monitor is closed (its steps are flushed).

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from vanishing.experiments.train import minibatches, train
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> batches = minibatches(x, y, batch_size=16, generator=torch.Generator().manual_seed(0))
        >>> log = train(net, batches, nn.functional.mse_loss, torch.optim.SGD(net.parameters(), 0.1),
        ...             steps=5, watch={"run_dir": tempfile.mkdtemp() + "/run"})
        >>> log.steps, log.diverged, log.monitor.run_dir.name
        (5, False, 'run')
    """
    import contextlib

    import vanishing

    read_each_step = stop_on_nonfinite or on_step is not None
    pending: list[Tensor] = []  # the losses not yet read on the host (read_each_step off)
    log = TrainLog()
    batch_iter = iter(batches)
    attached = (
        contextlib.nullcontext() if watch is None else vanishing.watch(model, optimizer, **watch)
    )
    with attached as monitor:
        log.monitor = monitor
        model.train()
        for step in range(steps):
            inputs, targets = next(batch_iter)  # drawn now: batches share the caller's generator
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            if clip_norm:
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            if schedule is not None:
                schedule.step()
            if read_each_step:
                value = loss.item()  # host sync: the divergence check (and on_step) need it
                log.losses.append(value)
                if on_step is not None:
                    on_step(step, value, monitor)
                if stop_on_nonfinite and not math.isfinite(value):
                    break
            else:
                pending.append(loss.detach())
            # every eval_every-th step but the last: the last one is evaluated after the monitor
            last = step + 1 == steps
            if evaluate is not None and eval_every and (step + 1) % eval_every == 0 and not last:
                evaluate(step)
        if pending:
            # host sync: every loss of the run in one transfer, after the last step
            log.losses = torch.stack(pending).tolist()
    if evaluate is not None and log.steps:
        evaluate(log.steps - 1)
    return log


@dataclass
class TrainResult:
    """What one monitored classifier run produced."""

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
    """Minibatch SGD with cross-entropy for ``steps`` steps under a monitor (:func:`train`;
    batches drawn with replacement from a generator seeded with ``seed``), then the test
    accuracy. A run whose loss becomes NaN or infinite stops there and is reported as diverged.

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
    accuracy = float("nan")

    def test_accuracy(step: int) -> None:
        nonlocal accuracy
        model.eval()
        with torch.no_grad():
            accuracy = (model(xt).argmax(1) == yt).float().mean().item()  # host sync: the result

    log = train(
        model,
        minibatches(x, y, batch_size=batch_size, generator=g, replacement=True),
        nn.functional.cross_entropy,
        opt,
        steps=steps,
        watch={"run_dir": run_dir, "stats": stats},
        evaluate=test_accuracy,
    )
    final_loss = log.losses[-1] if log.losses else float("nan")
    return TrainResult(log.monitor.run_dir, accuracy, final_loss, log.diverged)
