"""Pure statistics: functions of tensors, computed on the tensors' device.

Nothing here synchronises with a GPU except where a ``# host sync:`` comment says so (and those
are CPU-only paths, where a "sync" costs nothing). The names below are imported on first use,
so that :mod:`vanishing.stats.names` can be read without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ACTIVATION_STATS",
    "l2_norms",
    "nonfinite_counts",
    "summarize",
    "temporal_profile",
]

_LAZY = {
    "ACTIVATION_STATS": "vanishing.stats.names",
    "summarize": "vanishing.stats.activations",
    "l2_norms": "vanishing.stats.norms",
    "nonfinite_counts": "vanishing.stats.norms",
    "temporal_profile": "vanishing.stats.norms",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vanishing.stats' has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(module), name)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
