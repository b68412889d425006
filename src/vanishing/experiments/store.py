"""The reading side of a sweep's results store (``sweep.sqlite``), apart from the sweep runner so
that the views that only read it (plots, the terminal table, notebooks) do not import the runner.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

__all__ = ["DB", "read_sweep"]

DB = "sweep.sqlite"


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for column in ("params", "config", "summary", "kinds"):
        if out[column] is not None:
            out[column] = json.loads(out[column])
    return out


def read_sweep(sweep: str | os.PathLike) -> list[dict[str, Any]]:
    """Every row of a sweep's results store, JSON columns decoded, in the order the runs were
    added: the one reader of ``sweep.sqlite`` (the reports, the terminal table and analyses
    call it). ``sweep``: the sweep directory or its ``sweep.sqlite``. Read-only: it may run
    while the sweep writes. Raises ``ValueError`` when there is no readable store.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from vanishing.experiments.sweep import SweepStore, plan_sweep, read_sweep
        >>> d = Path(tempfile.mkdtemp())
        >>> store = SweepStore(d / "sweep.sqlite"); store.add(plan_sweep({"model": {"depth": [2, 4]}}))
        >>> store.close()
        >>> [(r["params"]["model.depth"], r["status"], r["summary"]) for r in read_sweep(d)]
        [(2, 'pending', None), (4, 'pending', None)]
    """
    path = Path(sweep)
    db = path / DB if path.is_dir() else path
    if not db.is_file():
        raise ValueError(f"{path}: not a sweep directory (no {DB})")
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        conn.row_factory = sqlite3.Row
        try:
            return [_decode(r) for r in conn.execute("SELECT * FROM runs ORDER BY rowid")]
        finally:
            conn.close()
    except (sqlite3.Error, ValueError) as e:
        raise ValueError(f"{db}: unreadable sweep store ({e})") from e
