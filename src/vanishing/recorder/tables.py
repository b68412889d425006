"""Step x layer tables from the long records: one fast pivot used by every reader."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def step_table(rows: pd.DataFrame, stat: str, columns: str = "layer", *, dropna: bool = False):
    """A step x ``columns`` table of the mean of ``stat``: what ``rows.pivot_table(index="step",
    columns=columns, values=stat, aggfunc="mean", dropna=dropna)`` gives (``dropna``: without
    the rows, then the columns, that are all NaN; rows whose step or column is missing are
    left out, NaN values skipped), in a tenth of its time: the diagnosis makes a few dozen such
    tables per run, and a repair diagnoses every candidate's run.

    Example:
        >>> import pandas as pd
        >>> from vanishing.recorder.tables import step_table
        >>> rows = pd.DataFrame({"step": [0, 0, 1, 1], "layer": ["a", "a", "a", "b"],
        ...                      "g": [1.0, 3.0, 5.0, 7.0]})
        >>> step_table(rows, "g").to_dict()
        {'a': {0: 2.0, 1: 5.0}, 'b': {0: nan, 1: 7.0}}
    """
    import numpy as np
    import pandas as pd

    # one bincount per table instead of a groupby and an unstack: each pandas operation costs
    # ~0.1 ms whatever the size, and a short run's tables have a few hundred rows
    steps, step_keys = pd.factorize(rows["step"], sort=True)
    cols, col_keys = pd.factorize(rows[columns], sort=True)
    values = rows[stat].to_numpy(dtype=float, na_value=np.nan)
    keep = (steps >= 0) & (cols >= 0) & ~np.isnan(values)
    shape = (len(step_keys), len(col_keys))
    cell = steps[keep] * shape[1] + cols[keep]
    total = np.bincount(cell, weights=values[keep], minlength=shape[0] * shape[1])
    count = np.bincount(cell, minlength=shape[0] * shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (total / count).reshape(shape)  # 0 / 0: NaN, as the mean of no value
    if dropna:
        known = ~np.isnan(mean)
        mean, step_keys = mean[known.any(axis=1)], step_keys[known.any(axis=1)]
        known = ~np.isnan(mean)
        mean, col_keys = mean[:, known.any(axis=0)], col_keys[known.any(axis=0)]
    return pd.DataFrame(
        mean,
        index=pd.Index(step_keys, name="step"),
        columns=pd.Index(col_keys, name=columns),
    )
