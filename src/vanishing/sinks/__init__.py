"""Destinations for the monitor's flushed blocks.

``vanishing.watch(model, opt, sinks=[...])`` sends every flush to each sink besides the run
directory (:class:`ParquetSink`, always written). A sink is any object with ``open(manifest)``,
``write(block)`` and ``close()`` (:class:`Sink`); ``block`` is a
:class:`vanishing.recorder.block.Block`.

Example:
    >>> import tempfile, torch, vanishing
    >>> class Losses:                       # a sink of your own: keep the losses in memory
    ...     def open(self, manifest): self.losses = []
    ...     def write(self, block): self.losses += block.values["step"]["loss"].tolist()
    ...     def close(self): pass
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> sink = Losses()
    >>> with vanishing.watch(model, opt, run_dir=tempfile.mkdtemp() + "/r", sinks=[sink]):
    ...     for _ in range(3):
    ...         opt.zero_grad(); model(torch.randn(8, 3)).pow(2).mean().backward(); opt.step()
    >>> len(sink.losses)
    3
"""

from vanishing.sinks.base import Sink
from vanishing.sinks.parquet import ParquetSink

__all__ = ["Sink", "ParquetSink"]
