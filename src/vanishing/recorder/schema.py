"""The run directory format (documented in docs/run-format.md).

```
RUN/
  manifest.json               what was watched: layers in forward order, optimizer, versions
  steps/part-NNNNN.parquet    one row per recorded step
  metrics/part-NNNNN.parquet  one row per (step, layer, param); param "" for module-level rows
  temporal/part-NNNNN.parquet one row per (step, recurrent layer, time step)
```
Each flush writes one part per table, `steps` last: a flush is complete once its `steps` part
exists, so a reader ignores `metrics`/`temporal` parts numbered above the last `steps` part.
Every file is written to a temporary name and renamed, so no reader ever sees half a file.
"""

from __future__ import annotations

# Statistics of an activation module's output, in the order they are computed: named where
# they are computed, so that stats/ needs nothing from here.
from vanishing.stats.names import ACTIVATION_STATS

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TABLES = ("metrics", "temporal", "steps")  # write order: steps last marks a complete flush
PART_FORMAT = "part-{:05d}.parquet"

#: Per-parameter statistics (rows with param != "").
PARAM_STATS = (
    "grad_norm",
    "param_norm",
    "update_norm",
    "grad_nonfinite",
    "param_nonfinite",
)
#: Derived per-parameter ratios, computed when a block is written.
PARAM_RATIOS = ("grad_ratio", "update_ratio")
#: Per-module statistics (rows with param == ""); ``error_numel``: the entries the error
#: signal's norm is over, last so that the older columns keep their places (runs recorded
#: before 2026-12-02 lack it).
MODULE_STATS = ("error_norm", *ACTIVATION_STATS, "error_numel")
#: Per-step statistics.
STEP_STATS = ("loss", "loss_nonfinite", "n_backward")

METRIC_COLUMNS = ("step", "layer", "param", "depth", *PARAM_STATS, *PARAM_RATIOS, *MODULE_STATS)
STEP_COLUMNS = ("step", "time", *STEP_STATS, "grad_nonfinite", "param_nonfinite", "skipped")
TEMPORAL_COLUMNS = ("step", "layer", "t", "length", "grad_norm")
