"""A run directory read for pictures, in one pass with bounded memory.

A 100-layer run of 100k steps holds tens of millions of metric rows: far too many to load into
pandas, and far more points than a figure can show. :class:`RunData` streams the Parquet parts
once (column projection, a few parts at a time) and keeps

- per *time bucket* (consecutive recorded steps, at most ``max_points`` buckets; the first and
  the last recorded step always get a bucket of their own), layer and parameter: the mean, the
  minimum and the maximum of every statistic, so a one-step spike survives downsampling. Norms
  (``grad_norm``, ``error_norm``, ``update_ratio``, ...) are averaged in log10 space (a geometric
  mean), since they span decades; bounded statistics (``act_*``) arithmetically;
- the exact rows of a bounded *sample* of steps (evenly spaced, always the first, the middle and
  the last step, and the first step with NaN/inf), for depth profiles; :attr:`RunData.run` is the
  bounded :class:`vanishing.Run` that holds them, and that a large run is diagnosed from.

The run directory is parsed by :class:`vanishing.Run` (one reader, one set of errors); what the
records mean (hidden layers, speed of learning, the first/last ratio) comes from
:mod:`vanishing.recorder.semantics`.

With no more recorded steps than ``max_points`` every bucket is one step and the aggregates are
the recorded values themselves.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vanishing.recorder.columns import BUILTIN, DERIVED_RATIOS
from vanishing.recorder.errors import RunError
from vanishing.recorder.reader import (
    DIAGNOSIS_STEPS,
    Run,
    committed_parts,
    read_part,
    with_all_columns,
)
from vanishing.recorder.schema import MANIFEST, METRIC_COLUMNS
from vanishing.recorder.semantics import (
    first_nonfinite_step,
    hidden_layers,
    is_normalization,
    is_weight_param,
    speed_source,
    speed_units,
)
from vanishing.recorder.tables import step_table
from vanishing.report.names import param_label

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = [
    "RunData",
    "Agg",
    "as_run_data",
    "example_run",
    "LOG_STATS",
    "LINEAR_STATS",
]


#: per-layer columns that are not statistics to show: the error signal's entry count, which
#: the diagnosis divides the error norm by (docs/run-format.md)
AUXILIARY = ("error_numel",)


def _aggregated(level: str, scale: str) -> tuple[str, ...]:
    # the per-layer columns of the metrics table, by their declared scale; counts (reduce
    # "sum": the non-finite counts) are not averaged: the first non-finite step is read instead
    return tuple(
        c.name
        for c in BUILTIN
        if c.level == level and c.scale == scale and c.reduce != "sum" and c.name not in AUXILIARY
    )


#: Statistics aggregated in log10 space (magnitudes that span decades): the metrics columns
#: declared with ``scale="log"`` (recorder/columns.py) and the ratios derived from them.
LOG_STATS = (
    *_aggregated("param", "log"),
    *(name for name, _, _ in DERIVED_RATIOS),
    *_aggregated("module", "log"),
)
#: Statistics aggregated linearly: the metrics columns declared with ``scale="linear"``.
LINEAR_STATS = (*_aggregated("param", "linear"), *_aggregated("module", "linear"))

_CHUNK_ROWS = 200_000  # rows read before one group-by: bounds memory, amortises overhead
_PARTIAL_ROWS = 300_000  # partial aggregates kept before they are combined


@dataclass
class Agg:
    """One statistic per time bucket and layer: mean (geometric for norms), min and max.

    Each is a DataFrame indexed by bucket number with one column per layer (forward order);
    ``x`` holds each bucket's representative step (its middle), ``start``/``end`` its first and
    last recorded step.

    Example:
        >>> import pandas as pd
        >>> from vanishing.report.data import Agg
        >>> a = Agg(pd.DataFrame({"0": [1.0]}), pd.DataFrame({"0": [0.5]}),
        ...         pd.DataFrame({"0": [2.0]}), x=[0.0], start=[0], end=[0])
        >>> float(a.hi.loc[0, "0"])
        2.0
    """

    mean: pd.DataFrame
    lo: pd.DataFrame
    hi: pd.DataFrame
    x: Any
    start: Any
    end: Any

    @property
    def empty(self) -> bool:
        return self.mean.empty or not self.mean.notna().to_numpy().any()


class RunData:
    """The bounded, downsampled view of a run directory that the plots and the HTML report read.

    ``max_points`` caps the time buckets of every curve; ``max_samples`` caps the steps whose
    exact rows are kept. Tables are read on first use, each in one streaming pass. A path that
    is not a readable run directory raises :class:`vanishing.RunError`, as ``load_run`` does.

    Example:
        >>> import torch, tempfile, vanishing
        >>> from vanishing.report.data import RunData
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with vanishing.watch(model, optimizer=opt, run_dir=tempfile.mkdtemp() + "/r") as mon:
        ...     for _ in range(5):
        ...         opt.zero_grad(); model(torch.randn(16, 4)).pow(2).mean().backward(); opt.step()
        >>> data = RunData(mon.run_dir, max_points=3)
        >>> data.step_list, list(data.buckets["start"]), list(data.buckets["end"])
        ([0, 1, 2, 3, 4], [0, 1, 4], [0, 3, 4])
        >>> agg = data.agg("grad_norm", "weight")
        >>> list(agg.mean.columns), len(agg.mean)
        (['0', '2'], 3)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_points: int = 400,
        max_samples: int = DIAGNOSIS_STEPS,
        max_rows: int = 1_000_000,
    ) -> None:
        if max_points < 3 or max_samples < 3:
            raise ValueError("max_points and max_samples must be at least 3 (first, middle, last)")
        #: the run, bounded to the sampled steps: its tables hold their exact rows
        self.run = Run(path, max_steps=max_samples)
        self.path = self.run.path
        self.manifest: dict[str, Any] = self.run.manifest
        self.max_points = int(max_points)
        self.max_samples = int(max_samples)
        self.max_rows = int(max_rows)
        self._agg: dict[tuple[str, str], Agg] = {}

    def __repr__(self) -> str:
        return f"RunData({str(self.path)!r}, steps={len(self.step_list)})"

    # ---- manifest -------------------------------------------------------------------------

    @property
    def layer_info(self) -> list[dict[str, Any]]:
        """The manifest's layers, in forward order."""
        return list(self.manifest.get("layers", []))

    @property
    def layers(self) -> list[str]:
        return [layer["name"] for layer in self.layer_info]

    @cached_property
    def by_name(self) -> dict[str, dict[str, Any]]:
        return {layer["name"]: layer for layer in self.layer_info}

    @property
    def param_layers(self) -> list[str]:
        """Layers that own parameters, in forward order."""
        return [x["name"] for x in self.layer_info if x.get("num_params", 0) > 0]

    @property
    def hidden(self) -> list[str]:
        """Hidden layers (see :func:`vanishing.recorder.semantics.hidden_layers`)."""
        return hidden_layers(self.layer_info)

    @property
    def activation_layers(self) -> list[str]:
        """Modules with activation statistics (activation modules, PReLU), in forward order."""
        return [
            x["name"]
            for x in self.layer_info
            if x.get("role") == "activation"
            or (x.get("activation") and str(x.get("type", "")).startswith("PReLU"))
        ]

    @property
    def recurrent_layers(self) -> list[str]:
        return [x["name"] for x in self.layer_info if x.get("recurrent")]

    def speed_source(self, layer: str) -> tuple[str, str] | None:
        """Where a hidden layer's speed of learning is read: ``(module, parameter)`` (see
        :func:`vanishing.recorder.semantics.speed_source`).

        Example:
            >>> from vanishing.report.data import RunData, example_run
            >>> RunData(example_run()).speed_source("0")
            ('0', 'bias')
        """
        return speed_source(self.layer_info, layer)

    def first_last_ratio(self) -> float | None:
        """The speed of learning of the first over the last hidden layer, exact from every
        recorded step (see :meth:`vanishing.Run.first_last_ratio`); None when not defined.

        Example:
            >>> from vanishing.report.data import RunData, example_run
            >>> RunData(example_run()).first_last_ratio() < 1e-2   # the first layer learns slower
            True
        """
        return self.run.first_last_ratio()

    # ---- side files written by ``vanishing run`` -------------------------------------------

    def _json(self, name: str) -> dict[str, Any] | None:
        import json

        p = self.path / name
        if not p.is_file():
            return None
        try:
            value = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunError(f"{p}: unreadable JSON ({e})") from e
        return value if isinstance(value, dict) else {"value": value}

    @cached_property
    def config(self) -> dict[str, Any] | None:
        """``config.json`` (the resolved experiment config), or None for a plain watched run."""
        return self._json("config.json")

    @cached_property
    def summary(self) -> dict[str, Any] | None:
        """``summary.json``, or None."""
        return self._json("summary.json")

    @cached_property
    def eval(self) -> pd.DataFrame | None:
        """``eval.parquet`` (step, split, loss, metric, metric_name), or None."""
        import pandas as pd

        p = self.path / "eval.parquet"
        if not p.is_file():
            return None
        df = pd.read_parquet(p)
        return df if not df.empty else None

    # ---- steps ------------------------------------------------------------------------------

    def _committed(self, table: str) -> list[Path]:
        return committed_parts(self.path, table)

    @cached_property
    def steps(self) -> pd.DataFrame:
        """Every recorded step's row of the ``steps`` table (one row per step: small)."""
        df = self.run.all_steps
        return df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)

    @cached_property
    def step_list(self) -> list[int]:
        """Recorded steps, ascending."""
        return [int(s) for s in self.steps["step"]]

    @cached_property
    def first_nonfinite(self) -> int | None:
        """The first step with NaN/inf in the loss, a gradient or a weight (None if none; see
        :func:`vanishing.recorder.semantics.first_nonfinite_step`)."""
        return first_nonfinite_step(self.steps)

    @cached_property
    def parts(self) -> list[dict[str, Any]]:
        """The committed ``metrics`` parts from their Parquet footers (no data read): path,
        rows, first and last step, and each statistic's minimum and maximum."""

        out = []
        for path in self._committed("metrics"):
            md = read_part(path, lambda f: f.metadata)
            if md is None:
                continue
            names = md.schema.names
            info: dict[str, Any] = {"path": path, "rows": md.num_rows, "lo": {}, "hi": {}}
            for c in ("step", *LOG_STATS, *LINEAR_STATS):
                if c not in names:
                    continue
                j = names.index(c)
                lo, hi = [], []
                for g in range(md.num_row_groups):
                    st = md.row_group(g).column(j).statistics
                    if st is not None and st.has_min_max:
                        lo.append(st.min)
                        hi.append(st.max)
                if lo:
                    info["lo"][c], info["hi"][c] = min(lo), max(hi)
            if "step" in info["lo"]:
                out.append(info)
        return out

    @cached_property
    def read_parts(self) -> list[dict[str, Any]]:
        """The parts the pass reads: all of them when they hold at most ``max_rows`` rows; else
        evenly spaced parts within that budget, plus the first and the last part, the part with
        the first NaN/inf step, and for every statistic the parts holding its global minimum
        and maximum (from the footers), so that extremes are never dropped."""
        import numpy as np

        parts = self.parts
        total = sum(p["rows"] for p in parts)
        if total <= self.max_rows or len(parts) <= 2:
            return parts
        per_part = total / len(parts)
        budget = max(2, int(self.max_rows // per_part))
        chosen = set(np.linspace(0, len(parts) - 1, budget).round().astype(int).tolist())
        for c in (*LOG_STATS, *LINEAR_STATS):
            his = [(p["hi"].get(c), i) for i, p in enumerate(parts) if p["hi"].get(c) is not None]
            los = [(p["lo"].get(c), i) for i, p in enumerate(parts) if p["lo"].get(c) is not None]
            his = [(v, i) for v, i in his if math.isfinite(v)]
            los = [(v, i) for v, i in los if math.isfinite(v)]
            if his:
                chosen.add(max(his)[1])
            if los:
                chosen.add(min(los)[1])
        bad = self.first_nonfinite
        if bad is not None:
            chosen |= {i for i, p in enumerate(parts) if p["lo"]["step"] <= bad <= p["hi"]["step"]}
        return [parts[i] for i in sorted(chosen)]

    @cached_property
    def metric_steps(self) -> list[int]:
        """Recorded steps whose metrics are read (all of them unless the run is very large)."""
        import numpy as np

        parts = self.read_parts
        if len(parts) == len(self.parts):
            return self.step_list
        steps = np.asarray(self.step_list, dtype=np.int64)
        keep = np.zeros(len(steps), dtype=bool)
        for p in parts:
            keep |= (steps >= p["lo"]["step"]) & (steps <= p["hi"]["step"])
        return [int(x) for x in steps[keep]]

    @property
    def coverage(self) -> tuple[int, int]:
        """(metric steps read, steps recorded)."""
        return len(self.metric_steps), len(self.step_list)

    @cached_property
    def _bucket_of(self) -> np.ndarray:
        """Bucket number of each of :attr:`metric_steps`."""
        return _bucketize(len(self.metric_steps), self.max_points)

    @cached_property
    def buckets(self) -> pd.DataFrame:
        """One row per time bucket of the metrics: ``start``, ``end`` (recorded steps),
        ``count``, ``x`` (middle)."""
        return _bucket_table(self.metric_steps, self._bucket_of)

    def loss(self) -> Agg:
        """The loss per time bucket of all recorded steps (mean, min, max; NaN/inf ignored)."""
        import numpy as np
        import pandas as pd

        steps = self.step_list
        if not steps:
            empty = pd.DataFrame()
            return Agg(empty, empty, empty, [], [], [])
        bucket_of = _bucketize(len(steps), self.max_points)
        b = _bucket_table(steps, bucket_of)
        loss = self.steps["loss"].to_numpy(dtype=float)
        ok = np.isfinite(loss)
        first = np.flatnonzero(np.r_[True, bucket_of[1:] != bucket_of[:-1]])
        clean = np.where(ok, loss, 0.0)
        count = np.add.reduceat(ok.astype(float), first)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.add.reduceat(clean, first) / count
        lo = np.fmin.reduceat(np.where(ok, loss, np.nan), first)
        hi = np.fmax.reduceat(np.where(ok, loss, np.nan), first)
        mk = lambda v: pd.DataFrame({"loss": v})  # noqa: E731
        return Agg(mk(mean), mk(lo), mk(hi), b["x"].to_numpy(), b["start"], b["end"])

    @property
    def sample_steps(self) -> list[int]:
        """Steps whose exact rows are kept: evenly spaced, with the first, middle and last
        recorded steps and the first step with NaN/inf (those of :attr:`run`)."""
        return self.run.sample_steps

    def profile_steps(self) -> list[int]:
        """The first, middle and last recorded steps (fewer when the run is shorter)."""
        steps = self.metric_steps
        if not steps:
            return []
        return sorted({steps[0], steps[(len(steps) - 1) // 2], steps[-1]})

    # ---- metrics: one streaming pass ---------------------------------------------------------

    def _scan_metrics(self) -> None:
        import numpy as np
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        steps = np.asarray(self.metric_steps, dtype=np.int64)
        sample = np.isin(steps, np.asarray(self.sample_steps, dtype=np.int64))
        bucket_of = self._bucket_of
        stats = LOG_STATS + LINEAR_STATS
        pairs: dict[tuple[str, str], int] = {}
        for layer in self.layer_info:  # (layer, param) keys: parameter rows, then module rows
            for prm in layer.get("params", []):
                pairs.setdefault((layer["name"], prm["name"]), len(pairs))
            pairs.setdefault((layer["name"], ""), len(pairs))
        K = 1 << 20  # composite key bucket * K + pair; a model has far fewer (layer, param)s
        partials: list[tuple[np.ndarray, dict]] = []
        samples: list[pa.Table] = []
        pending: list[tuple[np.ndarray, dict]] = []
        pending_rows = 0

        def codes(column: pa.ChunkedArray) -> list[tuple[list[str], np.ndarray]]:
            out = []
            for chunk in column.chunks:
                if pa.types.is_dictionary(chunk.type):
                    values = chunk.dictionary.to_pylist()
                    out.append((values, chunk.indices.to_numpy(zero_copy_only=False)))
                else:
                    values, index = np.unique(
                        chunk.to_numpy(zero_copy_only=False), return_inverse=True
                    )
                    out.append((values.tolist(), index))
            return out

        def pair_codes(t: pa.Table) -> np.ndarray:
            result = []
            for (lv, li), (pv, pi) in zip(codes(t.column("layer")), codes(t.column("param"))):
                table = np.empty((len(lv), len(pv)), dtype=np.int64)
                for i, name in enumerate(lv):
                    for j, prm in enumerate(pv):
                        table[i, j] = pairs.setdefault((name, prm or ""), len(pairs))
                result.append(table[li, pi])
            return np.concatenate(result) if result else np.zeros(0, dtype=np.int64)

        def flush() -> None:
            nonlocal pending, pending_rows
            key = np.concatenate([k for k, _ in pending])
            vals = {
                c: tuple(np.concatenate([v[c][i] for _, v in pending]) for i in range(4))
                for c in stats
            }
            partials.append(_reduce(key, vals))
            pending, pending_rows = [], 0
            if sum(len(k) for k, _ in partials) > _PARTIAL_ROWS:
                merged = _merge(partials)
                partials.clear()
                partials.append(merged)

        for part in self.read_parts:
            t = pq.ParquetFile(part["path"], read_dictionary=["layer", "param"]).read(
                use_threads=False
            )
            s = t.column("step").to_numpy()
            pos = np.clip(np.searchsorted(steps, s), 0, max(len(steps) - 1, 0))
            known = (steps[pos] == s) if len(steps) else np.zeros(len(s), dtype=bool)
            if (known & sample[pos]).any():
                samples.append(t.filter(pa.array(known & sample[pos])))
            key = np.where(known, bucket_of[pos], -1) * K + pair_codes(t)
            vals = {}
            for c in stats:
                if c not in t.column_names:
                    v = np.full(len(t), np.nan)
                else:
                    v = t.column(c).to_numpy().astype(float, copy=False)
                if c in LOG_STATS:
                    with np.errstate(divide="ignore", invalid="ignore"):
                        v = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
                ok = np.isfinite(v)
                vals[c] = (
                    np.where(ok, v, np.nan),
                    np.where(ok, v, np.nan),
                    np.where(ok, v, 0.0),
                    ok.astype(float),
                )
            keep = key >= 0
            pending.append((key[keep], {c: tuple(x[keep] for x in vals[c]) for c in stats}))
            pending_rows += int(keep.sum())
            if pending_rows >= _CHUNK_ROWS:
                flush()
        if pending:
            flush()
        if partials:
            key, vals = _merge(partials) if len(partials) > 1 else partials[0]
            self._acc = (key // K, key % K, vals)
        else:
            self._acc = None
        self._pairs = {v: k for k, v in pairs.items()}
        if samples:
            t = pa.concat_tables(samples, promote_options="default")
            for name in ("layer", "param"):
                i = t.column_names.index(name)
                t = t.set_column(i, name, t.column(name).cast(pa.string()))
            samples_df = with_all_columns(t.to_pandas(), "metrics")
        else:
            samples_df = pd.DataFrame({c: [] for c in METRIC_COLUMNS})
        if len(self.read_parts) == len(self.parts):
            # the pass read every part, so it holds every sampled row: the bounded run needs
            # no second pass over the metrics
            self.run._tables.setdefault("metrics", samples_df)
        self._samples = self.run.metrics

    @property
    def samples(self) -> pd.DataFrame:
        """Exact ``metrics`` rows of the :attr:`sample_steps` (all columns)."""
        if not hasattr(self, "_samples"):
            self._scan_metrics()
        return self._samples

    def agg(self, stat: str, param: str | None = None, layers: list[str] | None = None) -> Agg:
        """``stat`` per time bucket and layer, for ``param`` rows (None: module-level rows).

        ``layers`` picks and orders the columns (default: every layer with data, forward order).

        Example:
            >>> from vanishing.report.data import RunData, example_run
            >>> speed = RunData(example_run(), max_points=5).agg("grad_norm", "bias")
            >>> speed.mean.shape, speed.start.tolist(), speed.end.tolist()
            ((5, 7), [0, 1, 7, 13, 19], [0, 6, 12, 18, 19])
        """
        import numpy as np
        import pandas as pd

        if stat not in LOG_STATS + LINEAR_STATS:
            raise ValueError(
                f"unknown statistic {stat!r}; expected one of: {', '.join(LOG_STATS + LINEAR_STATS)}"
            )
        if not hasattr(self, "_acc"):
            self._scan_metrics()
        key = (stat, param or "")
        if key not in self._agg:
            b = self.buckets
            n_b = len(b)
            frames = {}
            if self._acc is not None and n_b:
                bucket, pair, vals = self._acc
                mn, mx, sm, ct = vals[stat]
                wanted = {c: name for c, (name, p) in self._pairs.items() if p == (param or "")}
                cols = {}
                for c in sorted(wanted):
                    sel = (pair == c) & (ct > 0)
                    if sel.any():
                        cols[wanted[c]] = sel
                order = [n for n in self.layers if n in cols]
                for name, arr in (("mean", None), ("lo", mn), ("hi", mx)):
                    grid = np.full((n_b, len(order)), np.nan)
                    for j, layer in enumerate(order):
                        sel = cols[layer]
                        if arr is None:
                            grid[bucket[sel], j] = sm[sel] / ct[sel]
                        else:
                            grid[bucket[sel], j] = arr[sel]
                    if stat in LOG_STATS:
                        grid = 10.0**grid
                    frames[name] = pd.DataFrame(grid, columns=order)
            else:
                frames = {k: pd.DataFrame(index=range(n_b)) for k in ("mean", "lo", "hi")}
            self._agg[key] = Agg(
                frames["mean"],
                frames["lo"],
                frames["hi"],
                b["x"].to_numpy() if n_b else np.array([]),
                b["start"].to_numpy() if n_b else np.array([]),
                b["end"].to_numpy() if n_b else np.array([]),
            )
        a = self._agg[key]
        if layers is not None:
            cols = [n for n in layers if n in a.mean.columns]
            return Agg(a.mean[cols], a.lo[cols], a.hi[cols], a.x, a.start, a.end)
        return a

    def speed(self) -> Agg:
        """Nielsen's speed of learning of each unit per time bucket (columns: the hidden layers
        in forward order, a stacked LSTM's layers apart: the units of
        :func:`vanishing.recorder.semantics.speed_units`, read where it says)."""
        import pandas as pd

        units = speed_units(self.layer_info)
        frames: dict[str, list] = {"mean": [], "lo": [], "hi": []}
        first = None
        for param in dict.fromkeys(p for _, _, p in units):
            wanted = {module: name for name, module, p in units if p == param}
            a = self.agg("grad_norm", param, list(wanted))
            first = first or a
            for k in frames:
                frames[k].append(getattr(a, k).rename(columns=wanted))
        if first is None:
            return self.agg("grad_norm", "bias", [])
        cat = {k: pd.concat(v, axis=1) for k, v in frames.items()}
        order = [name for name, _, _ in units if name in cat["mean"].columns]
        return Agg(
            cat["mean"][order], cat["lo"][order], cat["hi"][order], first.x, first.start, first.end
        )

    @cached_property
    def weight_params(self) -> list[tuple[str, str, str]]:
        """Every weight matrix of the run in forward order, as ``(label, module, param)``: a
        layer's plain ``weight`` under the module's name, a stacked recurrent layer's
        ``weight_ih_l0``/``weight_hh_l1`` and attention's ``in_proj_weight`` as
        ``module.param`` (:func:`vanishing.report.names.param_label`), so a 2-layer LSTM shows
        its layers ``l0`` and ``l1`` apart. Normalisation layers' scales are not weight
        matrices (:func:`vanishing.recorder.semantics.is_weight_param`) and are left out.

        Example:
            >>> from vanishing.report.data import RunData, example_run
            >>> RunData(example_run("rnn")).weight_params
            [('rnn.weight_ih_l0', 'rnn', 'weight_ih_l0'), ('rnn.weight_hh_l0', 'rnn', 'weight_hh_l0'), ('head', 'head', 'weight')]
        """
        out = []
        for layer in self.layer_info:
            if is_normalization(layer.get("type", "")):
                continue
            for p in layer.get("params", []) or []:
                if is_weight_param(str(p["name"])):
                    module, param = str(layer["name"]), str(p["name"])
                    out.append((param_label(module, param), module, param))
        return out

    def weight_agg(self, stat: str) -> Agg:
        """``stat`` (``grad_norm``, ``update_ratio``, ...) of every weight matrix per time
        bucket; columns: the labels of :attr:`weight_params`, forward order.

        Example:
            >>> from vanishing.report.data import RunData, example_run
            >>> list(RunData(example_run("rnn")).weight_agg("grad_norm").mean.columns)
            ['rnn.weight_ih_l0', 'rnn.weight_hh_l0', 'head']
        """
        import pandas as pd

        rows = self.weight_params
        frames: dict[str, list] = {"mean": [], "lo": [], "hi": []}
        first = None
        for param in dict.fromkeys(p for _, _, p in rows):
            wanted = {m: label for label, m, p in rows if p == param}
            a = self.agg(stat, param, list(wanted))
            first = first or a
            for k in frames:
                frames[k].append(getattr(a, k).rename(columns=wanted))
        if first is None:
            return self.agg(stat, "weight", [])
        cat = {k: pd.concat(v, axis=1) for k, v in frames.items()}
        order = [label for label, _, _ in rows if label in cat["mean"].columns]
        return Agg(
            cat["mean"][order], cat["lo"][order], cat["hi"][order], first.x, first.start, first.end
        )

    def weight_at_steps(self, stat: str, steps: list[int]) -> pd.DataFrame:
        """Exact values of ``stat`` of every weight matrix at sampled ``steps``: a step x
        weight table, columns the labels of :attr:`weight_params` in forward order.

        Example:
            >>> from vanishing.report.data import RunData, example_run
            >>> t = RunData(example_run("rnn")).weight_at_steps("grad_norm", [0, 4])
            >>> t.shape
            (2, 3)
        """
        df = self.samples
        label = {(m, p): lab for lab, m, p in self.weight_params}
        import numpy as np

        keep = np.array([k in label for k in zip(df["layer"], df["param"])], dtype=bool)
        rows = df[keep & df["step"].isin(steps).to_numpy()].copy()
        rows["label"] = [label[(m, p)] for m, p in zip(rows["layer"], rows["param"])]
        table = step_table(rows, stat, columns="label")
        table = table[[lab for lab, _, _ in self.weight_params if lab in table.columns]]
        table.columns.name = None
        return table

    def at_steps(self, stat: str, param: str | None, steps: list[int]) -> pd.DataFrame:
        """Exact values of ``stat`` at sampled ``steps``: a step x layer table, forward order."""
        df = self.samples
        rows = df[(df["param"] == (param or "")) & (df["step"].isin(steps))]
        table = step_table(rows, stat)
        order = [n for n in self.layers if n in table.columns]
        table = table[order]
        table.columns.name = None
        return table

    @property
    def temporal(self) -> pd.DataFrame:
        """Exact ``temporal`` rows at the sampled steps (step, layer, t, length, grad_norm)."""
        return self.run.temporal


def _reduce(key: np.ndarray, vals: dict) -> tuple[np.ndarray, dict]:
    """Group rows by ``key``: per statistic (min, max, sum, count) tuples reduced per key."""
    import numpy as np

    order = np.argsort(key, kind="stable")
    k = key[order]
    first = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if len(k) else np.zeros(0, dtype=int)
    out = {}
    for c, (mn, mx, sm, ct) in vals.items():
        if not len(k):
            out[c] = (mn, mx, sm, ct)
            continue
        out[c] = (
            np.fmin.reduceat(mn[order], first),
            np.fmax.reduceat(mx[order], first),
            np.add.reduceat(sm[order], first),
            np.add.reduceat(ct[order], first),
        )
    return k[first] if len(k) else k, out


def _merge(partials: list[tuple[np.ndarray, dict]]) -> tuple[np.ndarray, dict]:
    import numpy as np

    key = np.concatenate([k for k, _ in partials])
    stats = partials[0][1].keys()
    vals = {
        c: tuple(np.concatenate([v[c][i] for _, v in partials]) for i in range(4)) for c in stats
    }
    return _reduce(key, vals)


def _bucketize(n: int, max_points: int) -> np.ndarray:
    """Bucket number of each of ``n`` consecutive steps: at most ``max_points`` buckets of
    (nearly) equal counts; the first and the last step each alone in a bucket."""
    import numpy as np

    if n <= max_points:
        return np.arange(n)
    inner = np.arange(n - 2) * (max_points - 2) // (n - 2)
    return np.concatenate([[0], inner + 1, [max_points - 1]])


def _bucket_table(steps: list[int], bucket_of: np.ndarray) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    s = np.asarray(steps, dtype=np.int64)
    if not len(s):
        return pd.DataFrame({"start": [], "end": [], "count": [], "x": []})
    first = np.flatnonzero(np.r_[True, bucket_of[1:] != bucket_of[:-1]])
    last = np.r_[first[1:] - 1, len(bucket_of) - 1]
    return pd.DataFrame(
        {
            "start": s[first],
            "end": s[last],
            "count": last - first + 1,
            "x": (s[first] + s[last]) / 2.0,
        }
    )


def as_run_data(run: Any, **kwargs: Any) -> RunData:
    """A :class:`RunData` for a ``vanishing.Run``, a run directory path, or a RunData itself.

    Example:
        >>> import vanishing
        >>> from vanishing.report.data import as_run_data, example_run
        >>> as_run_data(vanishing.load_run(example_run()))   # doctest: +ELLIPSIS
        RunData('.../run', steps=20)
    """
    if isinstance(run, RunData):
        return run
    path = getattr(run, "path", run)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"expected a vanishing.Run or a run directory path, got {type(run).__name__}"
        )
    return RunData(path, **kwargs)


_EXAMPLES: dict[str, Path] = {}


def example_run(kind: str = "mlp") -> Path:
    """A small recorded run for examples: ``"mlp"``, a 6-hidden-layer sigmoid MLP (PyTorch's
    default init) trained 20 SGD steps (a textbook vanishing gradient), or ``"rnn"``, a tanh RNN
    over 30 time steps trained 5 steps. Made once per process in a temporary directory (the
    global torch seed is set to 0).

    Example:
        >>> from vanishing.report.data import example_run
        >>> import vanishing
        >>> vanishing.load_run(example_run()).layers[:3]
        ['0', '1', '2']
    """
    import atexit
    import shutil
    import tempfile

    import torch
    from torch import nn

    import vanishing

    if kind not in ("mlp", "rnn"):
        raise ValueError(f"unknown example {kind!r}; expected 'mlp' or 'rnn'")
    if kind in _EXAMPLES and (_EXAMPLES[kind] / MANIFEST).is_file():
        return _EXAMPLES[kind]
    tmp = tempfile.mkdtemp(prefix=f"vanishing-example-{kind}-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        layers: list[nn.Module] = []
        torch.manual_seed(0)
        for i in range(6):
            layers += [nn.Linear(8 if i == 0 else 16, 16), nn.Sigmoid()]
        model: nn.Module = nn.Sequential(*layers, nn.Linear(16, 3))
        shape = (64, 8)
        steps = 20
    else:

        class _RNN(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.rnn = nn.RNN(4, 16, batch_first=True)
                self.head = nn.Linear(16, 3)

            def forward(self, x):
                return self.head(self.rnn(x)[0][:, -1])

        torch.manual_seed(0)
        model = _RNN()
        shape = (16, 30, 4)
        steps = 5
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with vanishing.watch(model, optimizer=opt, run_dir=Path(tmp) / "run") as mon:
        for _ in range(steps):
            x = torch.randn(*shape, generator=g)  # a fresh batch each step
            y = torch.randint(0, 3, (shape[0],), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    _EXAMPLES[kind] = Path(mon.run_dir)
    return _EXAMPLES[kind]


def finite_or_none(value: Any) -> float | None:
    """``float(value)`` when it is a finite number, else None.

    Example:
        >>> from vanishing.report.data import finite_or_none
        >>> finite_or_none(2), finite_or_none(float("nan")), finite_or_none("x")
        (2.0, None, None)
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def distinct_labels(paths: list[str | os.PathLike]) -> list[str]:
    """The shortest trailing parts of each path that tell the paths apart (a run's folder name,
    with as many parent folders as it takes).

    Example:
        >>> from vanishing.report.data import distinct_labels
        >>> distinct_labels(["a/deep/r", "b/deep/r", "c/shallow"])
        ['a/deep/r', 'b/deep/r', 'shallow']
        >>> distinct_labels(["runs/x", "runs/y"])
        ['x', 'y']
    """
    parts = [Path(p).resolve().parts if Path(p).is_absolute() else Path(p).parts for p in paths]
    out = []
    for i, mine in enumerate(parts):
        for k in range(1, len(mine) + 1):
            tail = mine[-k:]
            if all(tuple(o[-k:]) != tuple(tail) for j, o in enumerate(parts) if j != i):
                break
        out.append("/".join(tail) if mine else str(paths[i]))
    return out
