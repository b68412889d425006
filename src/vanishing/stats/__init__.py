"""Pure statistics: functions of tensors, computed on the tensors' device.

Nothing here synchronises with a GPU except where a ``# host sync:`` comment says so (and those
are CPU-only paths, where a "sync" costs nothing).
"""

from vanishing.stats.activations import (
    ACTIVATION_KINDS,
    activation_kind,
    activation_stats,
    derivative,
)
from vanishing.stats.norms import l2_norms, nonfinite_counts, temporal_profile

__all__ = [
    "ACTIVATION_KINDS",
    "activation_kind",
    "activation_stats",
    "derivative",
    "l2_norms",
    "nonfinite_counts",
    "temporal_profile",
]
