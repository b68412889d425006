"""One flush of the monitor (a :class:`Block`) and its conversion to the run's Arrow tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vanishing.recorder.columns import BUILTIN, DERIVED_RATIOS, Column, by_level
from vanishing.recorder.schema import MODULE_STATS, PARAM_STATS, STEP_STATS
from vanishing.stats.norms import time_points

_BUILTIN_NAMES = {c.name for c in BUILTIN}


@dataclass
class Block:
    """The steps recorded since the last flush, on the host: what every sink receives.

    ``values[level][column]`` is an array ``[n]`` (step level), ``[n, P]`` (param level, one
    entry per parameter row named by ``params``) or ``[n, M]`` (module level, rows named by
    ``modules``); NaN where a statistic was not measured. ``time_profile[i, r]`` holds the
    gradient norms at the kept time steps of recurrent layer ``recurrent[r]``, ``time_length``
    its sequence length (NaN: not measured). ``manifest`` is the run's manifest as of this
    flush. A block may hold no steps (``n == 0``): the final one of a run, which carries the
    final manifest.
    """

    steps: np.ndarray
    times: np.ndarray
    skipped: np.ndarray
    columns: tuple[Column, ...]
    values: dict[str, dict[str, np.ndarray]]
    time_profile: np.ndarray
    time_length: np.ndarray
    params: Sequence[tuple[str, str, int]] = ()  # (layer, param, depth) per parameter row
    modules: Sequence[tuple[str, int]] = ()  # (layer, depth) per module row
    recurrent: Sequence[str] = ()
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.steps)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    out[den == 0] = np.nan
    return out


def block_to_tables(block: Block) -> dict:
    """Arrow tables ``steps``, ``metrics`` and ``temporal`` of a block (docs/run-format.md).

    Columns follow the block's declared columns: the built-in ones in their documented order,
    then any a custom probe declared (param level, then module level, in declaration order).
    """
    import pyarrow as pa

    n = block.n
    levels = by_level(block.columns)
    pcols, mcols = levels["param"], levels["module"]
    P, M, R = len(block.params), len(block.modules), len(block.recurrent)
    steps = block.steps
    pvals, mvals = block.values["param"], block.values["module"]

    step_cols: dict[str, np.ndarray] = {"step": steps, "time": block.times}
    for c in levels["step"]:
        v = block.values["step"][c.name]
        step_cols[c.name] = v.astype(np.int64) if c.integer else v
    for name in ("grad_nonfinite", "param_nonfinite"):
        step_cols[name] = np.nansum(pvals[name], axis=1) if P else np.zeros(n)
    step_cols["skipped"] = block.skipped
    order = ["step", "time", *STEP_STATS, "grad_nonfinite", "param_nonfinite", "skipped"]
    order += [c.name for c in levels["step"] if c.name not in STEP_STATS]
    steps_table = pa.table({c: step_cols[c] for c in order})

    # metrics: P parameter rows, then the module rows that hold any value, per step
    ratios = [r for r in DERIVED_RATIOS if r[1] in pvals and r[2] in pvals]
    keys = ["step", "layer", "param", "depth"]
    # every built-in column is in every run's table (NaN where no probe measured it, e.g.
    # stats="parameters"), so that readers see one format; a probe's own columns follow
    extra = [c.name for c in pcols + mcols if c.name not in _BUILTIN_NAMES]
    names = [*PARAM_STATS, *(r[0] for r in DERIVED_RATIOS), *MODULE_STATS, *extra]

    p_rows: dict[str, np.ndarray] = {
        "step": np.repeat(steps, P),
        "layer": np.tile(np.array([p[0] for p in block.params], dtype=object), n),
        "param": np.tile(np.array([p[1] for p in block.params], dtype=object), n),
        "depth": np.tile(np.array([p[2] for p in block.params], dtype=np.int32), n),
    }
    for c in pcols:
        p_rows[c.name] = pvals[c.name].reshape(-1)
    for name, num, den in ratios:
        p_rows[name] = _ratio(pvals[num], pvals[den]).reshape(-1)

    if mcols:
        measured = np.stack([mvals[c.name] for c in mcols], axis=2)  # [n, M, Km]
        keep = ~np.all(np.isnan(measured), axis=2).reshape(-1)  # (n*M,)
    else:
        keep = np.zeros(n * M, dtype=bool)
    k = int(keep.sum())
    m_rows: dict[str, np.ndarray] = {
        "step": np.repeat(steps, M)[keep],
        "layer": np.tile(np.array([m[0] for m in block.modules], dtype=object), n)[keep],
        "param": np.full(k, "", dtype=object),
        "depth": np.tile(np.array([m[1] for m in block.modules], dtype=np.int32), n)[keep],
    }
    for c in mcols:
        m_rows[c.name] = mvals[c.name].reshape(-1)[keep]

    def column(name):
        first = p_rows.get(name)
        second = m_rows.get(name)
        if first is None:
            first = np.full(n * P, np.nan)
        if second is None:
            second = np.full(k, np.nan)
        values = np.concatenate([first, second])
        if name in ("layer", "param"):
            return pa.array(values, type=pa.string())
        if name == "step":
            return pa.array(values, type=pa.int64())
        if name == "depth":
            return pa.array(values, type=pa.int32())
        return pa.array(values, type=pa.float64(), from_pandas=False)

    metrics_table = pa.table({c: column(c) for c in keys + names})
    metrics_table = metrics_table.sort_by([("step", "ascending"), ("depth", "ascending")])

    # temporal: per recurrent layer, the kept time steps of each recorded step
    t_cols: dict[str, list] = {c: [] for c in ("step", "layer", "t", "length", "grad_norm")}
    for i in range(n):
        for r in range(R):
            length = block.time_length[i, r]
            if np.isnan(length):
                continue
            T = int(length)
            pts = time_points(T)
            t_cols["step"].extend([steps[i]] * len(pts))
            t_cols["layer"].extend([block.recurrent[r]] * len(pts))
            t_cols["t"].extend(pts)
            t_cols["length"].extend([T] * len(pts))
            t_cols["grad_norm"].extend(block.time_profile[i, r, : len(pts)].tolist())
    temporal_table = pa.table(
        {
            "step": pa.array(t_cols["step"], type=pa.int64()),
            "layer": pa.array(t_cols["layer"], type=pa.string()),
            "t": pa.array(t_cols["t"], type=pa.int64()),
            "length": pa.array(t_cols["length"], type=pa.int64()),
            "grad_norm": pa.array(t_cols["grad_norm"], type=pa.float64()),
        }
    )
    return {"steps": steps_table, "metrics": metrics_table, "temporal": temporal_table}
