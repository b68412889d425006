"""Destinations for the monitor's flushed blocks.

``vanishing.watch(model, opt, sinks=[...])`` sends every flush to each sink besides the run
directory (:class:`ParquetSink`, always written). A sink is any object with ``open(manifest)``,
``write(block)`` and ``close()`` (:class:`Sink`); ``block`` is a
:class:`vanishing.recorder.block.Block`.

Experiment loggers get a bounded set of scalars per step chosen by :class:`ScalarSelector`
(docs/sinks.md): :class:`TensorBoardSink`, :class:`MLflowSink`, :class:`WandbSink`. They are
imported on first use, so ``import vanishing.sinks`` never imports tensorboard, mlflow or
wandb; one whose library is missing raises :class:`MissingExtraError` naming the extra to
install. :func:`by_name` builds one from a name (for the command line and configs).

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

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vanishing.sinks.base import Sink
from vanishing.sinks.parquet import ParquetSink

__all__ = [
    "Sink",
    "ParquetSink",
    "ScalarSelector",
    "TensorBoardSink",
    "MLflowSink",
    "WandbSink",
    "MissingExtraError",
    "by_name",
]

_LAZY = {
    "ScalarSelector": "vanishing.sinks.scalars",
    "TensorBoardSink": "vanishing.sinks.tensorboard",
    "MLflowSink": "vanishing.sinks.mlflow",
    "WandbSink": "vanishing.sinks.wandb",
}

if TYPE_CHECKING:
    from vanishing.sinks.mlflow import MLflowSink
    from vanishing.sinks.scalars import ScalarSelector
    from vanishing.sinks.tensorboard import TensorBoardSink
    from vanishing.sinks.wandb import WandbSink


class MissingExtraError(ImportError):
    """A sink's library is not installed; the message names the extra that installs it.

    Example:
        >>> from vanishing.sinks import MissingExtraError
        >>> print(MissingExtraError("TensorBoardSink", "tensorboard"))
        TensorBoardSink needs tensorboard: pip install "vanishing[tensorboard]"
    """

    def __init__(self, sink: str, extra: str, module: str | None = None) -> None:
        self.sink, self.extra = sink, extra
        super().__init__(f'{sink} needs {extra}: pip install "vanishing[{extra}]"', name=module)


def _require(module: str, sink: str, extra: str) -> Any:
    """``module`` imported, or :class:`MissingExtraError` for ``sink``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(sink, extra, module) from e


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vanishing.sinks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


#: The names :func:`by_name` knows.
NAMES = ("mlflow", "tensorboard", "wandb")


def by_name(name: str, run_dir: str | os.PathLike, **options: Any) -> Any:
    """A sink from its name, for the command line and configs.

    ``"tensorboard"``: :class:`TensorBoardSink` (``log_dir`` defaults to
    ``<run_dir>/tensorboard``); ``"mlflow"``: :class:`MLflowSink`; ``"wandb"``:
    :class:`WandbSink`. ``options`` go to the sink's constructor. An unknown name is a
    ``ValueError`` listing the names.

    Example:
        >>> import tempfile
        >>> from vanishing.sinks import by_name
        >>> sink = by_name("tensorboard", tempfile.mkdtemp(), max_layers=2)
        >>> sink.log_dir.name, sink.selector.max_layers
        ('tensorboard', 2)
        >>> by_name("csv", "runs/r")
        Traceback (most recent call last):
        ...
        ValueError: unknown sink 'csv'; known: mlflow, tensorboard, wandb
    """
    key = str(name).strip().lower()
    if key == "tensorboard":
        from vanishing.sinks.tensorboard import TensorBoardSink

        log_dir = options.pop("log_dir", None) or Path(run_dir) / "tensorboard"
        return TensorBoardSink(log_dir, **options)
    if key == "mlflow":
        from vanishing.sinks.mlflow import MLflowSink

        return MLflowSink(**options)
    if key == "wandb":
        from vanishing.sinks.wandb import WandbSink

        return WandbSink(**options)
    raise ValueError(f"unknown sink {name!r}; known: {', '.join(NAMES)}")
