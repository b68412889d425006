"""vanishing: find, explain and fix vanishing and exploding gradients in PyTorch.

    >>> import vanishing
    >>> mon = vanishing.watch(model, optimizer=opt)      # doctest: +SKIP
    >>> run = vanishing.load_run(mon.run_dir)            # doctest: +SKIP

The public names are listed in ``__all__``; everything else is private. Heavy modules (torch,
pyarrow, pandas) are imported when a name that needs them is first used, so that
``import vanishing`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "watch",
    "Monitor",
    "load_run",
    "Run",
    "inspect",
    "Diagnosis",
    "Finding",
    "Remedy",
    "repair",
    "Repair",
    "Candidate",
    "__version__",
]

_LAZY = {
    "watch": "vanishing.monitor",
    "Monitor": "vanishing.monitor",
    "WatchError": "vanishing.monitor",
    "load_run": "vanishing.recorder.reader",
    "Run": "vanishing.recorder.reader",
    "RunError": "vanishing.recorder.errors",
    "inspect": "vanishing.diagnose",
    "Diagnosis": "vanishing.diagnose",
    "Finding": "vanishing.diagnose",
    "Remedy": "vanishing.diagnose",
    "Repair": "vanishing.repair.engine",
    "Candidate": "vanishing.repair.engine",
}

#: subpackages reachable as attributes after a plain ``import vanishing`` (loaded on first use):
#: the extension points (``vanishing.sinks.TensorBoardSink``, ``vanishing.probes.Probe``,
#: ``vanishing.activations.register``) and the integrations
_SUBPACKAGES = (
    "sinks",
    "probes",
    "activations",
    "integrations",
    "recorder",
    "plots",
    "theory",
    "repair",  # a callable package: vanishing.repair(model, batches, loss_fn)
)

if TYPE_CHECKING:
    from vanishing.diagnose import Diagnosis, Finding, Remedy, inspect
    from vanishing.monitor import Monitor, WatchError, watch  # noqa: F401
    from vanishing.recorder.errors import RunError  # noqa: F401
    from vanishing.recorder.reader import Run, load_run


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"vanishing.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vanishing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))
