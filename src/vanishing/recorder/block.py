"""Turn one flushed device block (a float64 matrix) into the run directory's Arrow tables."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vanishing.recorder.schema import (
    METRIC_COLUMNS,
    MODULE_STATS,
    PARAM_STATS,
    STEP_COLUMNS,
    STEP_STATS,
    TEMPORAL_COLUMNS,
)
from vanishing.stats.norms import MAX_TIME_POINTS, time_points


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    out[den == 0] = np.nan
    return out


def block_to_tables(
    block: np.ndarray,
    host_rows: Sequence[tuple[int, float, int]],
    *,
    params: Sequence[tuple[str, str, int]],
    modules: Sequence[tuple[str, int]],
    recurrent: Sequence[str],
    columns: tuple[int, int, int],
) -> dict:
    """Arrow tables ``steps``, ``metrics`` and ``temporal`` for ``n`` recorded steps.

    ``block[i]`` is step ``host_rows[i][0]``'s row of the device buffer, laid out as
    ``[step stats | P x param stats | M x module stats | R x (profile, length)]`` with the
    offsets in ``columns``; ``params`` names each parameter row ``(layer, param, depth)``,
    ``modules`` each module row ``(layer, depth)``, ``recurrent`` each recurrent layer.
    """
    import pyarrow as pa

    n = block.shape[0]
    P, M, R = len(params), len(modules), len(recurrent)
    col_param, col_module, col_time = columns
    steps = np.array([r[0] for r in host_rows], dtype=np.int64)

    pstats = block[:, col_param:col_module].reshape(n, P, len(PARAM_STATS))
    mstats = block[:, col_module:col_time].reshape(n, M, len(MODULE_STATS))

    step_cols = {
        "step": steps,
        "time": np.array([r[1] for r in host_rows], dtype=np.float64),
    }
    for j, name in enumerate(STEP_STATS):
        step_cols[name] = block[:, j]
    step_cols["n_backward"] = block[:, STEP_STATS.index("n_backward")].astype(np.int64)
    step_cols["grad_nonfinite"] = np.nansum(pstats[:, :, 3], axis=1) if P else np.zeros(n)
    step_cols["param_nonfinite"] = np.nansum(pstats[:, :, 4], axis=1) if P else np.zeros(n)
    step_cols["skipped"] = np.array([r[2] for r in host_rows], dtype=np.int64)
    steps_table = pa.table({c: step_cols[c] for c in STEP_COLUMNS})

    # metrics: P parameter rows, then the module rows that hold any value, per step
    nan_p = np.full((n, P), np.nan)
    p_rows = {
        "step": np.repeat(steps, P),
        "layer": np.tile(np.array([p[0] for p in params], dtype=object), n),
        "param": np.tile(np.array([p[1] for p in params], dtype=object), n),
        "depth": np.tile(np.array([p[2] for p in params], dtype=np.int32), n),
    }
    for j, name in enumerate(PARAM_STATS):
        p_rows[name] = pstats[:, :, j].reshape(-1)
    p_rows["grad_ratio"] = _ratio(pstats[:, :, 0], pstats[:, :, 1]).reshape(-1)
    p_rows["update_ratio"] = _ratio(pstats[:, :, 2], pstats[:, :, 1]).reshape(-1)
    for name in MODULE_STATS:
        p_rows[name] = nan_p.reshape(-1)

    keep = ~np.all(np.isnan(mstats), axis=2).reshape(-1)  # (n*M,)
    m_rows = {
        "step": np.repeat(steps, M)[keep],
        "layer": np.tile(np.array([m[0] for m in modules], dtype=object), n)[keep],
        "param": np.full(int(keep.sum()), "", dtype=object),
        "depth": np.tile(np.array([m[1] for m in modules], dtype=np.int32), n)[keep],
    }
    k = int(keep.sum())
    for name in PARAM_STATS + ("grad_ratio", "update_ratio"):
        m_rows[name] = np.full(k, np.nan)
    for j, name in enumerate(MODULE_STATS):
        m_rows[name] = mstats[:, :, j].reshape(-1)[keep]

    def column(name):
        values = np.concatenate([p_rows[name], m_rows[name]])
        if name in ("layer", "param"):
            return pa.array(values, type=pa.string())
        if name == "step":
            return pa.array(values, type=pa.int64())
        if name == "depth":
            return pa.array(values, type=pa.int32())
        return pa.array(values, type=pa.float64(), from_pandas=False)

    metrics_table = pa.table({c: column(c) for c in METRIC_COLUMNS})
    metrics_table = metrics_table.sort_by([("step", "ascending"), ("depth", "ascending")])

    # temporal: per recurrent layer, the kept time steps of each recorded step
    t_cols: dict[str, list] = {c: [] for c in TEMPORAL_COLUMNS}
    if R:
        tblock = block[:, col_time:].reshape(n, R, MAX_TIME_POINTS + 1)
        for i in range(n):
            for r in range(R):
                length = tblock[i, r, MAX_TIME_POINTS]
                if np.isnan(length):
                    continue
                T = int(length)
                pts = time_points(T)
                t_cols["step"].extend([steps[i]] * len(pts))
                t_cols["layer"].extend([recurrent[r]] * len(pts))
                t_cols["t"].extend(pts)
                t_cols["length"].extend([T] * len(pts))
                t_cols["grad_norm"].extend(tblock[i, r, : len(pts)].tolist())
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
