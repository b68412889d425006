"""Read a run directory back, without the model: ``vanishing.load_run``."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vanishing.recorder.errors import RunError
from vanishing.recorder.schema import (
    MANIFEST,
    METRIC_COLUMNS,
    SCHEMA_VERSION,
    STEP_COLUMNS,
    TEMPORAL_COLUMNS,
)
from vanishing.recorder.semantics import (
    first_last_ratio,
    first_nonfinite_step,
    hidden_layers,
    speed_source,
)

__all__ = ["Run", "RunError", "load_run", "committed_parts", "read_part", "hidden_layers"]

if TYPE_CHECKING:
    import pandas as pd

_PART = re.compile(r"^part-(\d{5,})\.parquet$")
_COLUMNS = {"metrics": METRIC_COLUMNS, "steps": STEP_COLUMNS, "temporal": TEMPORAL_COLUMNS}


def _parts(directory: Path) -> dict[int, Path]:
    if not directory.is_dir():
        return {}
    out = {}
    for p in directory.iterdir():
        m = _PART.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def committed_parts(run_dir: Path, table: str) -> list[Path]:
    """A table's part files in order, without the torn tail: parts numbered after the last
    ``steps`` part were written by a flush that did not finish (``steps`` is written last)."""
    done = max(_parts(run_dir / "steps"), default=-1)
    return [p for i, p in sorted(_parts(run_dir / table).items()) if i <= done]


def read_part(path: Path, read: Any = None) -> Any:
    """``read(pyarrow.parquet.ParquetFile(path))`` (default: the whole table), or None with a
    warning when the file is damaged: one bad part never hides the rest of a run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        return f.read() if read is None else read(f)
    except (OSError, pa.ArrowException) as e:
        warnings.warn(
            f"vanishing: skipping unreadable part {path}: {e}", RuntimeWarning, stacklevel=3
        )
        return None


class Run:
    """The records of one monitored run, read from its run directory.

    Tables are pandas DataFrames read on first use: ``steps`` (one row per recorded step),
    ``metrics`` (one row per step, layer and parameter; ``param == ""`` rows hold the module-level
    statistics) and ``temporal`` (the per-time-step gradient profile of recurrent layers).

    ``max_steps`` bounds memory on a long run: the tables then hold the exact rows of at most
    that many recorded steps (:attr:`sample_steps`: evenly spaced, always the first, the middle
    and the last step and the first step with NaN/inf), streamed from the parts a few at a time;
    :attr:`all_steps` still holds every step's row. The diagnosis reads such a run as it reads a
    whole one.

    Example:
        >>> import torch, tempfile, vanishing
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with vanishing.watch(model, optimizer=opt, run_dir=tempfile.mkdtemp() + "/r") as mon:
        ...     for _ in range(5):
        ...         opt.zero_grad(); model(torch.randn(16, 4)).pow(2).mean().backward(); opt.step()
        >>> run = vanishing.load_run(mon.run_dir)
        >>> run.layers, len(run.steps)
        (['0', '1', '2'], 5)
        >>> small = vanishing.load_run(mon.run_dir, max_steps=3)
        >>> small.sample_steps, sorted(set(small.metrics["step"])), len(small.all_steps)
        ([0, 2, 4], [0, 2, 4], 5)
    """

    def __init__(self, path: str | os.PathLike, *, max_steps: int | None = None) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise RunError(f"{self.path}: no such run directory")
        if not manifest_path.is_file():
            ranks = sorted(p.name for p in self.path.glob("rank*") if (p / MANIFEST).is_file())
            if ranks:
                raise RunError(
                    f"{self.path}: holds one run per process ({', '.join(ranks[:4])}); "
                    f"load one of them, e.g. {self.path / ranks[0]}"
                )
            raise RunError(
                f"{self.path}: not a run directory (no manifest.json); "
                "pass the directory that vanishing.watch(run_dir=...) or vanishing run wrote"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunError(f"{manifest_path}: unreadable manifest ({e})") from e
        if not isinstance(self.manifest, dict):
            raise RunError(f"{manifest_path}: unreadable manifest (not a JSON object)")
        version = self.manifest.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise RunError(
                f"{manifest_path}: schema version {version!r} is not readable by this version "
                f"of vanishing (reads up to {SCHEMA_VERSION}); upgrade vanishing"
            )
        if max_steps is not None and max_steps < 3:
            raise ValueError("max_steps must be at least 3 (the first, middle and last step)")
        self.max_steps = max_steps
        self._tables: dict[str, pd.DataFrame] = {}

    def __repr__(self) -> str:
        bounded = f", max_steps={self.max_steps}" if self.max_steps is not None else ""
        return f"Run({str(self.path)!r}, layers={len(self.layers)}{bounded})"

    @property
    def layers(self) -> list[str]:
        """Qualified names of the watched modules, in forward execution order."""
        return [layer["name"] for layer in self.manifest.get("layers", [])]

    @property
    def layer_info(self) -> list[dict[str, Any]]:
        """The manifest's description of each watched module, in forward order."""
        return list(self.manifest.get("layers", []))

    @property
    def hidden(self) -> list[str]:
        """The hidden layers, forward order (see :func:`vanishing.recorder.semantics.hidden_layers`)."""
        return hidden_layers(self.layer_info)

    # ---- tables -----------------------------------------------------------------------------

    def _read(
        self, table: str, steps: Any = None, columns: list[str] | None = None
    ) -> pd.DataFrame:
        """A table from its committed parts; only the rows of ``steps`` (an array) when given,
        filtered part by part so that memory holds no more than those rows."""
        import numpy as np
        import pandas as pd
        import pyarrow as pa

        def read(f: Any) -> Any:
            if steps is not None:
                span = _step_span(f.metadata)
                if span is not None and not ((steps >= span[0]) & (steps <= span[1])).any():
                    return pa.table({})  # the footer says none of these steps is here
            t = f.read(columns=columns, use_threads=False)
            if steps is not None and t.num_rows:
                t = t.filter(pa.array(np.isin(t.column("step").to_numpy(), steps)))
            return t

        frames = [
            t
            for path in committed_parts(self.path, table)
            if (t := read_part(path, read)) is not None and t.num_columns
        ]
        if not frames:
            return pd.DataFrame({c: [] for c in (columns or _COLUMNS[table])})
        df = pa.concat_tables(frames, promote_options="default").to_pandas()
        return df if columns else with_all_columns(df, table)

    def _table(self, table: str) -> pd.DataFrame:
        if table not in self._tables:
            if self.max_steps is None:
                self._tables[table] = self._read(table)
            else:
                import numpy as np

                wanted = np.asarray(self.sample_steps, dtype=np.int64)
                if table == "steps":
                    s = self.all_steps
                    self._tables[table] = s[s["step"].isin(wanted)].reset_index(drop=True)
                else:
                    self._tables[table] = self._read(table, wanted)
        return self._tables[table]

    @property
    def all_steps(self) -> pd.DataFrame:
        """Every recorded step's row of the ``steps`` table (one row per step: small), also in
        a bounded run."""
        if "all_steps" not in self._tables:
            self._tables["all_steps"] = self._read("steps")
        return self._tables["all_steps"]

    @property
    def steps(self) -> pd.DataFrame:
        """One row per recorded step (per sampled step in a bounded run): step, time, loss,
        non-finite counts, backward passes."""
        if self.max_steps is None:
            return self.all_steps
        return self._table("steps")

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per (step, layer, param); module-level rows have ``param == ""``."""
        return self._table("metrics")

    @property
    def temporal(self) -> pd.DataFrame:
        """Gradient norm at each time step of each recurrent layer: step, layer, t, grad_norm."""
        return self._table("temporal")

    @property
    def sample_steps(self) -> list[int]:
        """The recorded steps whose rows the tables hold: every one, or in a bounded run at
        most ``max_steps`` of them (see the class doc)."""
        if "sample_steps" not in self._tables:
            steps = sorted({int(s) for s in self.all_steps["step"]})
            self._tables["sample_steps"] = _sample(
                steps, self.max_steps, first_nonfinite_step(self.all_steps)
            )
        return self._tables["sample_steps"]  # type: ignore[return-value]

    @property
    def first_nonfinite_step(self) -> int | None:
        """The first recorded step with NaN/inf in the loss, a gradient or a weight (None if
        none; see :func:`vanishing.recorder.semantics.first_nonfinite_step`)."""
        return first_nonfinite_step(self.all_steps)

    def pivot(self, stat: str, param: str | None = None) -> pd.DataFrame:
        """A step x layer table of one statistic, layers in forward order.

        ``param`` picks the parameter rows (``"weight"``, ``"bias"``, ...) for a per-parameter
        statistic; module-level statistics (``error_norm``, ``act_*``) need none.

        Example:
            >>> speed = run.pivot("grad_norm", param="bias")   # doctest: +SKIP
        """
        from vanishing.recorder.schema import MODULE_STATS, PARAM_RATIOS, PARAM_STATS

        df = self.metrics
        if df.empty:
            raise RunError(
                f"{self.path}: the run recorded no steps yet (nothing flushed); "
                "train at least one step, and close() or flush() the monitor"
            )
        if stat in MODULE_STATS:
            rows = df[df["param"] == ""]
        elif stat in PARAM_STATS or stat in PARAM_RATIOS:
            if param is None:
                raise ValueError(f"{stat!r} is per parameter: pass param='weight' or 'bias'")
            rows = df[df["param"] == param]
        else:
            known = ", ".join(PARAM_STATS + PARAM_RATIOS + MODULE_STATS)
            raise ValueError(f"unknown statistic {stat!r}; expected one of: {known}")
        table = rows.pivot_table(index="step", columns="layer", values=stat, dropna=False)
        order = [name for name in self.layers if name in table.columns]
        return table[order]

    # ---- run semantics ------------------------------------------------------------------------

    def speeds(self, layers: list[str] | None = None) -> pd.DataFrame:
        """The speed of learning of hidden layers at every recorded step: a step x layer table
        (default: every hidden layer, forward order), each read where
        :func:`vanishing.recorder.semantics.speed_source` says. Exact for every step, also in a
        bounded run (only the two or so columns needed are streamed).

        Example:
            >>> vanishing.load_run("runs/my-run").speeds().iloc[-1]   # doctest: +SKIP
        """
        import pandas as pd

        layers = self.hidden if layers is None else layers
        sources = {n: src for n in layers if (src := speed_source(self.layer_info, n))}
        whole = self.max_steps is None or len(self.sample_steps) == len(set(self.all_steps["step"]))
        if whole:
            m = self.metrics
        else:
            m = self._read("metrics", columns=["step", "layer", "param", "grad_norm"])
            names = {src for src, _ in sources.values()}
            m = m[m["layer"].astype(str).isin(names)]
        out = {}
        for name, (src, param) in sources.items():
            rows = m[(m["layer"] == src) & (m["param"] == param)]
            if not rows.empty:
                out[name] = rows.groupby("step")["grad_norm"].mean()
        table = pd.DataFrame(out)
        table.index.name = "step"
        return table[[n for n in layers if n in table.columns]]

    def first_last_ratio(self) -> float | None:
        """The speed of learning of the first over the last hidden layer: the median over the
        recorded steps of the per-step ratio (see
        :func:`vanishing.recorder.semantics.first_last_ratio`); None with fewer than two hidden
        layers or no step where both are finite.

        Example:
            >>> vanishing.load_run("runs/my-run").first_last_ratio()   # doctest: +SKIP
            0.0021
        """
        hidden = self.hidden
        if len(hidden) < 2:
            return None
        speeds = self.speeds([hidden[0], hidden[-1]])
        if speeds.shape[1] < 2:
            return None
        return first_last_ratio(speeds[hidden[0]], speeds[hidden[-1]])

    def diagnose(self, model=None):
        """The diagnosis of this run (see :func:`vanishing.diagnose.diagnose_run`).

        ``model``, the watched model as it is now, lets the diagnosis measure what the run does
        not record (the recurrent weights' largest singular value).

        Example:
            >>> vanishing.load_run("runs/my-run").diagnose().kinds   # doctest: +SKIP
            ['vanishing_gradient']
        """
        from vanishing.diagnose.engine import diagnose_run

        return diagnose_run(self, model)


def with_all_columns(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """``df`` with every column of the schema's ``table``: a statistic the run did not record
    (``stats="parameters"``, a column added later) reads as missing values, not as an error.

    Example:
        >>> import pandas as pd
        >>> from vanishing.recorder.reader import with_all_columns
        >>> "error_norm" in with_all_columns(pd.DataFrame({"step": [0]}), "metrics")
        True
    """
    missing = [c for c in _COLUMNS[table] if c not in df.columns]
    if not missing:
        return df
    import numpy as np

    return df.assign(**{c: np.nan for c in missing})


def _sample(steps: list[int], n: int | None, first_nonfinite: int | None) -> list[int]:
    """At most ``n`` of the ascending ``steps``: evenly spaced, always the first, the middle and
    the last, plus the first non-finite step (all of them when ``n`` is None or not fewer)."""
    if n is None or len(steps) <= n:
        return list(steps)
    import numpy as np

    k = len(steps)
    idx = set(np.linspace(0, k - 1, n - 2).round().astype(int).tolist())
    idx |= {0, (k - 1) // 2, k - 1}
    chosen = {steps[i] for i in idx}
    if first_nonfinite is not None and first_nonfinite in set(steps):
        chosen.add(first_nonfinite)
    return sorted(chosen)


def _step_span(md: Any) -> tuple[int, int] | None:
    """(first, last) step of a Parquet file from its footer statistics, or None."""
    names = md.schema.names
    if "step" not in names:
        return None
    j = names.index("step")
    lo, hi = [], []
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(j).statistics
        if st is None or not st.has_min_max:
            return None
        lo.append(st.min)
        hi.append(st.max)
    return (min(lo), max(hi)) if lo else None


def load_run(path: str | os.PathLike, *, max_steps: int | None = None) -> Run:
    """Open the run directory that a monitor wrote; everything flushed is readable.

    A run whose process was killed reads up to its last complete flush. ``max_steps`` bounds
    memory on a long run: its tables then hold the exact rows of at most that many evenly
    spaced steps (see :class:`Run`).

    Example:
        >>> import vanishing
        >>> run = vanishing.load_run("runs/my-run")   # doctest: +SKIP
        >>> run.pivot("grad_norm", param="bias").tail()   # doctest: +SKIP
    """
    return Run(path, max_steps=max_steps)
