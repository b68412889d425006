"""Published experiments reproduced under the monitor: ``vanishing reproduce NAME``.

Each reproduction is a module of this package with ``TITLE``, ``CITATION`` and a
``reproduce(*, quick=False, out=None, progress=None)`` that returns a
:class:`~vanishing.experiments.reproductions.base.Reproduction` (published numbers beside ours,
tables, plots). This package stays light (no torch import) so that the command line can list
the names cheaply.

Example:
    >>> from vanishing.experiments.reproductions import AVAILABLE, load
    >>> AVAILABLE[0]
    'nielsen'
    >>> load("nielsen").TITLE
    'Nielsen: the speed of learning of each hidden layer of deep sigmoid nets'
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: every reproduction in the order ``vanishing reproduce all`` runs them and the gallery shows
#: them: the history first (Nielsen's sigmoid nets, Glorot's and He's initialisations, ResNets),
#: then recurrent nets, then the theory (SELU's fixed point, mean field, batch norm at init,
#: shattered gradients) and pretraining last
ORDER = (
    "nielsen",
    "glorot",
    "he",
    "resnet",
    "adding",
    "pascanu",
    "selu",
    "meanfield",
    "batchnorm",
    "shattered",
    "pretraining",
)

#: names accepted by ``vanishing reproduce NAME`` (besides ``all``): those of ORDER that exist
AVAILABLE = tuple(n for n in ORDER if importlib.util.find_spec(f"{__name__}.{n}") is not None)


def load(name: str) -> ModuleType:
    """The module of reproduction ``name``; a ValueError naming the available ones otherwise.

    Example:
        >>> from vanishing.experiments.reproductions import load
        >>> load("nielsen").__name__
        'vanishing.experiments.reproductions.nielsen'
    """
    if name not in AVAILABLE:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(AVAILABLE)}, all")
    return importlib.import_module(f"{__name__}.{name}")
