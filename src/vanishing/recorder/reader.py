"""Read a run directory back, without the model: ``vanishing.load_run``."""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vanishing.recorder.schema import (
    MANIFEST,
    METRIC_COLUMNS,
    SCHEMA_VERSION,
    STEP_COLUMNS,
    TEMPORAL_COLUMNS,
)

if TYPE_CHECKING:
    import pandas as pd

_PART = re.compile(r"^part-(\d{5,})\.parquet$")
_COLUMNS = {"metrics": METRIC_COLUMNS, "steps": STEP_COLUMNS, "temporal": TEMPORAL_COLUMNS}


class RunError(ValueError):
    """A path that is not a readable run directory."""


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


#: module types whose gradient does not belong to the profile through depth
NOT_IN_DEPTH_PROFILE = (
    "Embedding",
    "EmbeddingBag",
    "BatchNorm",
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "InstanceNorm",
    "LocalResponseNorm",
)


def hidden_layers(layer_info: list[dict[str, Any]]) -> list[str]:
    """The hidden layers of a run, in forward order: modules that own parameters, without
    recurrent layers, embeddings, normalisation layers and the output layer (the last one).
    Their gradient profile is what tells depth (the diagnosis and the report both read it).

    Example:
        >>> from vanishing.recorder.reader import hidden_layers
        >>> info = [{"name": n, "role": r, "recurrent": False, "num_params": p, "type": t}
        ...         for n, r, p, t in [("0", "layer", 40, "Linear"), ("1", "activation", 0, "Sigmoid"),
        ...                            ("2", "layer", 72, "Linear"), ("3", "layer", 16, "BatchNorm1d"),
        ...                            ("4", "layer", 9, "Linear")]]
        >>> hidden_layers(info)
        ['0', '2']
    """
    names = [
        layer["name"]
        for layer in layer_info
        if layer.get("role") == "layer"
        and not layer.get("recurrent")
        and layer.get("num_params", 0) > 0
        and not str(layer.get("type", "")).startswith(NOT_IN_DEPTH_PROFILE)
    ]
    return names[:-1]


class Run:
    """The records of one monitored run, read from its run directory.

    Tables are pandas DataFrames read on first use: ``steps`` (one row per recorded step),
    ``metrics`` (one row per step, layer and parameter; ``param == ""`` rows hold the module-level
    statistics) and ``temporal`` (the per-time-step gradient profile of recurrent layers).

    Example:
        >>> import torch, tempfile, vanishing
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with vanishing.watch(model, optimizer=opt, run_dir=tempfile.mkdtemp() + "/r") as mon:
        ...     for _ in range(3):
        ...         opt.zero_grad(); model(torch.randn(16, 4)).pow(2).mean().backward(); opt.step()
        >>> run = vanishing.load_run(mon.run_dir)
        >>> run.layers, len(run.steps)
        (['0', '1', '2'], 3)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise RunError(f"{self.path}: no such run directory")
        if not manifest_path.is_file():
            raise RunError(
                f"{self.path}: not a run directory (no manifest.json); "
                "pass the directory that vanishing.watch(run_dir=...) wrote"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunError(f"{manifest_path}: unreadable manifest ({e})") from e
        version = self.manifest.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise RunError(
                f"{manifest_path}: schema version {version!r} is not readable by this version "
                f"of vanishing (reads up to {SCHEMA_VERSION}); upgrade vanishing"
            )

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, layers={len(self.layers)})"

    @property
    def layers(self) -> list[str]:
        """Qualified names of the watched modules, in forward execution order."""
        return [layer["name"] for layer in self.manifest.get("layers", [])]

    @property
    def layer_info(self) -> list[dict[str, Any]]:
        """The manifest's description of each watched module, in forward order."""
        return list(self.manifest.get("layers", []))

    def _read(self, table: str) -> pd.DataFrame:
        import pandas as pd
        import pyarrow as pa

        frames = [
            t for path in committed_parts(self.path, table) if (t := read_part(path)) is not None
        ]
        if not frames:
            return pd.DataFrame({c: [] for c in _COLUMNS[table]})
        return pa.concat_tables(frames, promote_options="default").to_pandas()

    @functools.cached_property
    def steps(self) -> pd.DataFrame:
        """One row per recorded step: step, time, loss, non-finite counts, backward passes."""
        return self._read("steps")

    @functools.cached_property
    def metrics(self) -> pd.DataFrame:
        """One row per (step, layer, param); module-level rows have ``param == ""``."""
        return self._read("metrics")

    @functools.cached_property
    def temporal(self) -> pd.DataFrame:
        """Gradient norm at each time step of each recurrent layer: step, layer, t, grad_norm."""
        return self._read("temporal")

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

    def diagnose(self, model=None):
        """The diagnosis of this run (see :func:`vanishing.diagnose`).

        ``model``, the watched model as it is now, lets the diagnosis measure what the run does
        not record (the recurrent weights' largest singular value).

        Example:
            >>> vanishing.load_run("runs/my-run").diagnose().kinds   # doctest: +SKIP
            ['vanishing_gradient']
        """
        from vanishing.diagnose import diagnose_run

        return diagnose_run(self, model)


def load_run(path: str | os.PathLike) -> Run:
    """Open the run directory that a monitor wrote; everything flushed is readable.

    A run whose process was killed reads up to its last complete flush.

    Example:
        >>> import vanishing
        >>> run = vanishing.load_run("runs/my-run")   # doctest: +SKIP
        >>> run.pivot("grad_norm", param="bias").tail()   # doctest: +SKIP
    """
    return Run(path)
