"""TensorBoard: the selected scalars of every recorded step as TensorBoard scalar summaries."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vanishing.sinks.scalars import ScalarSelector


class TensorBoardSink:
    """Writes the :class:`~vanishing.sinks.scalars.ScalarSelector`'s scalars to TensorBoard.

    Each tag (``vanishing/loss``, ``vanishing/first_last_ratio``, ``vanishing/grad_norm/<layer>``
    for at most ``max_layers`` layers, ...; docs/sinks.md) becomes a scalar curve, written with
    ``add_scalar(tag, value, global_step=step)`` so that steps are the training steps even when
    a block arrives late. ``writer``: a ``SummaryWriter`` (or anything with ``add_scalar``) to
    write to instead of creating one in ``log_dir``; it is flushed at ``close`` but not closed.
    Needs ``tensorboard`` (``pip install "vanishing[tensorboard]"``) unless a writer is given.
    If the writer cannot be created (an unwritable ``log_dir``), the monitor warns once and
    the run directory is written as usual; this sink then writes nothing.

    Read back with ``tensorboard --logdir <log_dir>`` or TensorBoard's ``EventAccumulator``.

    Example:
        >>> import tempfile, torch, vanishing
        >>> from vanishing.sinks import TensorBoardSink
        >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        >>> tb = tempfile.mkdtemp()
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with vanishing.watch(model, opt, run_dir=tb + "/run", sinks=[TensorBoardSink(tb)]):
        ...     for _ in range(3):
        ...         opt.zero_grad(); model(torch.randn(8, 3)).pow(2).mean().backward(); opt.step()
        >>> events = EventAccumulator(tb); _ = events.Reload()
        >>> [e.step for e in events.Scalars("vanishing/loss")]
        [0, 1, 2]
    """

    def __init__(
        self, log_dir: str | os.PathLike, *, max_layers: int = 3, writer: Any = None
    ) -> None:
        if writer is None:
            from vanishing.sinks import _require

            _require("tensorboard", "TensorBoardSink", "tensorboard")
        self.log_dir = Path(log_dir)
        self.selector = ScalarSelector(max_layers=max_layers)
        self._given = writer
        self.writer: Any = writer

    def open(self, manifest: dict[str, Any]) -> None:
        self.selector.observe_manifest(manifest)
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, block: Any) -> None:
        if self.writer is None:  # open failed (and was reported): nothing to write to
            self.selector.observe_manifest(block.manifest)
            return
        for step, scalars in self.selector.scalars(block):
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        if self.writer is None:
            return
        if self._given is not None:
            flush = getattr(self.writer, "flush", None)
            if flush is not None:
                flush()
        else:
            self.writer.close()
            self.writer = None
