"""Read a run directory back, without the model: ``vanishing.load_run``."""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
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
    first_nonfinite_step,
    hidden_layers,
    ratio_pairs,
    speed_source,
    speed_units,
    step_ratios,
)
from vanishing.recorder.tables import step_table

__all__ = [
    "Run",
    "RunError",
    "DamagedPart",
    "load_run",
    "committed_parts",
    "read_part",
    "check_manifest",
    "hidden_layers",
]

if TYPE_CHECKING:
    import pandas as pd

_PART = re.compile(r"^part-(\d{5,})\.parquet$")
_COLUMNS = {"metrics": METRIC_COLUMNS, "steps": STEP_COLUMNS, "temporal": TEMPORAL_COLUMNS}


#: above this many metric rows, :meth:`Run.diagnose` reads a sample of the steps (the rows of
#: about 1,200 steps of a 200-layer run: a few seconds and well under 1 GB)
EXACT_DIAGNOSIS_ROWS = 250_000
#: the steps such a diagnosis reads, and the report's default sample
DIAGNOSIS_STEPS = 200


def _parts(directory: Path) -> dict[int, Path]:
    if not directory.is_dir():
        return {}
    out = {}
    for p in directory.iterdir():
        m = _PART.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def _part_number(path: Path) -> int:
    m = _PART.match(Path(path).name)
    return int(m.group(1)) if m else -1


def committed_parts(run_dir: Path, table: str) -> list[Path]:
    """A table's part files in order, without the torn tail: parts numbered after the last
    ``steps`` part were written by a flush that did not finish (``steps`` is written last)."""
    done = max(_parts(run_dir / "steps"), default=-1)
    return [p for i, p in sorted(_parts(run_dir / table).items()) if i <= done]


def read_part(path: Path, read: Any = None, damaged: dict[Path, str] | None = None) -> Any:
    """``read(pyarrow.parquet.ParquetFile(path))`` (default: the whole table), or None with a
    warning when the file is damaged: one bad part never hides the rest of a run. ``damaged``,
    when given, gets ``{path: reason}`` for such a part.

    A part that reads but is not a part of its table (a key column missing, a column of the
    wrong type: see :func:`check_part_schema`) is a :class:`RunError` naming the file: that is
    not damage but a file that does not belong there.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        check_part_schema(path, f.schema_arrow)
        return f.read() if read is None else read(f)
    except (OSError, pa.ArrowException) as e:
        if damaged is not None:
            damaged[Path(path)] = str(e).splitlines()[0] if str(e) else type(e).__name__
        warnings.warn(
            f"vanishing: skipping unreadable part {path}: {e}", RuntimeWarning, stacklevel=3
        )
        return None


#: the key columns each table's parts must have, and the kind of each
_KEYS = {
    "metrics": {"step": "integer", "layer": "string", "param": "string"},
    "steps": {"step": "integer"},
    "temporal": {"step": "integer", "layer": "string", "t": "integer"},
}


def _kind_of(dtype: Any) -> str:
    """``"integer"``, ``"number"`` (float, bool, all-null), ``"string"``, or the type's name."""
    import pyarrow as pa

    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_integer(dtype):
        return "integer"
    if pa.types.is_floating(dtype) or pa.types.is_boolean(dtype) or pa.types.is_null(dtype):
        return "number"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "string"
    return str(dtype)


_ARTICLE = {"integer": "an integer", "string": "a string", "number": "a number"}


def check_part_schema(path: Path, schema: Any) -> None:
    """Raise :class:`RunError` unless ``schema`` (a pyarrow schema) is that of a part of the
    table its folder names (``metrics``, ``steps``, ``temporal``): the table's key columns, of
    their kinds (``step`` an integer, ``layer`` and ``param`` strings), and every other column a
    number (the statistics; a probe of your own declares numeric columns too).

    Example:
        >>> import pyarrow as pa
        >>> from pathlib import Path
        >>> from vanishing.recorder.reader import check_part_schema
        >>> part = Path("RUN/steps/part-00000.parquet")
        >>> check_part_schema(part, pa.schema([("step", pa.int64()), ("loss", pa.float64())]))
        >>> check_part_schema(part, pa.schema([("a", pa.int64())]))
        Traceback (most recent call last):
        ...
        vanishing.recorder.errors.RunError: RUN/steps/part-00000.parquet: not a part of the steps table: no 'step' column (it has: a)
    """
    table = Path(path).parent.name
    keys = _KEYS.get(table)
    if keys is None:
        return
    names = list(schema.names)
    for name in keys:
        if name not in names:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise RunError(
                f"{path}: not a part of the {table} table: no {name!r} column "
                f"(it has: {shown or 'no columns'})"
            )
    for field in schema:
        want = keys.get(field.name, "number")
        got = _kind_of(field.type)
        if got == want or (want == "number" and got == "integer"):
            continue
        raise RunError(
            f"{path}: not a part of the {table} table: column {field.name!r} is "
            f"{field.type}, expected {_ARTICLE[want]}"
        )


_TYPES = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
    "number": (int, float),
}
_TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "bool": "true or false",
    "list": "a list",
    "dict": "an object",
    "number": "a number",
}
#: the manifest's layer fields the readers use: (type, required); others are kept unread
_LAYER_FIELDS = {
    "name": ("str", True),
    "depth": ("int", False),
    "type": ("str", True),
    "role": ("str", True),
    "activation": ("str?", False),
    "recurrent": ("bool", False),
    "params": ("list", False),
    "num_params": ("int", True),
    "examples_per_unit": ("int", False),
    "ran_forward": ("bool", False),
}
_PARAM_FIELDS = {
    "name": ("str", True),
    "shape": ("list", False),
    "numel": ("int", False),
    "trainable": ("bool", False),
    "shared_with": ("list", False),
}


def _is(value: Any, kind: str) -> bool:
    if kind.endswith("?"):
        if value is None:
            return True
        kind = kind[:-1]
    if kind in ("int", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[kind])


def _check_fields(where: str, obj: Any, fields: dict[str, tuple[str, bool]]) -> str | None:
    if not isinstance(obj, dict):
        return f"{where} is {_shown(obj)}, expected an object"
    for key, (kind, required) in fields.items():
        if key not in obj:
            if required:
                return f"{where} has no {key!r}"
            continue
        if not _is(obj[key], kind):
            expected = _TYPE_NAMES[kind.rstrip("?")] + (" or null" if kind.endswith("?") else "")
            return f"{where}.{key} is {_shown(obj[key])}, expected {expected}"
    return None


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def check_manifest(manifest: Any) -> str | None:
    """What is wrong with a parsed ``manifest.json`` (one line), or None when the readers can
    use it: an object, an integer ``schema_version``, ``layers`` a list of objects with a string
    ``name``, ``type`` and ``role`` and an integer ``num_params`` (each name once), their
    ``params`` a list of objects with a string ``name`` and a list ``shape``, ``optimizer`` an
    object (with ``defaults`` an object) or null. Fields the readers do not use are not checked.

    Example:
        >>> from vanishing.recorder.reader import check_manifest
        >>> check_manifest({"schema_version": 1, "layers": "x"})
        'layers is "x", expected a list'
        >>> check_manifest({"schema_version": 1, "layers": []}) is None
        True
    """
    if not isinstance(manifest, dict):
        return f"not a JSON object (it is {_shown(manifest)})"
    version = manifest.get("schema_version")
    if not _is(version, "int") or version < 1:
        return f"schema version {version!r} is not a positive integer"
    layers = manifest.get("layers", [])
    if not isinstance(layers, list):
        return f"layers is {_shown(layers)}, expected a list"
    seen: set[str] = set()
    for i, layer in enumerate(layers):
        problem = _check_fields(f"layers[{i}]", layer, _LAYER_FIELDS)
        if problem:
            return problem
        if layer["num_params"] < 0:
            return f"layers[{i}].num_params is {layer['num_params']}, expected >= 0"
        if layer["name"] in seen:
            return f"layers[{i}].name {layer['name']!r} is listed twice"
        seen.add(layer["name"])
        for j, param in enumerate(layer.get("params", [])):
            problem = _check_fields(f"layers[{i}].params[{j}]", param, _PARAM_FIELDS)
            if problem:
                return problem
            shape = param.get("shape", [])
            if not all(_is(n, "int") for n in shape):
                return f"layers[{i}].params[{j}].shape is {_shown(shape)}, expected integers"
    optimizer = manifest.get("optimizer")
    if optimizer is not None:
        problem = _check_fields("optimizer", optimizer, {"type": ("str", False)})
        if problem:
            return problem
        if not isinstance(optimizer.get("defaults", {}), dict):
            return f"optimizer.defaults is {_shown(optimizer['defaults'])}, expected an object"
    for key, kind in (("notes", "list"), ("status", "str"), ("resumed_at", "list")):
        if key in manifest and not _is(manifest[key], kind):
            return f"{key} is {_shown(manifest[key])}, expected {_TYPE_NAMES[kind]}"
    return None


@dataclass(frozen=True)
class DamagedPart:
    """A part file of a run that could not be read, and the recorded steps it held.

    ``part``: its path in the run directory (``metrics/part-00003.parquet``); ``first_step``
    and ``last_step``: the recorded steps whose rows are missing because of it (None where
    that is not known: the steps part of the same flush is unreadable too and no later flush
    bounds it); ``reason``: the reader's error.

    Example:
        >>> from vanishing.recorder.reader import DamagedPart
        >>> str(DamagedPart("metrics/part-00003.parquet", 150, 199, "truncated"))
        'part metrics/part-00003.parquet unreadable, steps 150-199 missing'
    """

    part: str
    first_step: int | None
    last_step: int | None
    reason: str = ""

    def __str__(self) -> str:
        lo, hi = self.first_step, self.last_step
        if lo is not None and hi is not None:
            steps = f"step {lo}" if lo == hi else f"steps {lo}-{hi}"
        elif lo is not None:
            steps = f"steps from {lo} on"
        elif hi is not None:
            steps = f"steps up to {hi}"
        else:
            steps = "its steps"
        return f"part {self.part} unreadable, {steps} missing"


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
        version = self.manifest.get("schema_version") if isinstance(self.manifest, dict) else 0
        # one rule for every reader (diagnose, report, load_run): a newer format is refused
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise RunError(
                f"{manifest_path}: schema version {version!r} is not readable by this version "
                f"of vanishing (reads up to {SCHEMA_VERSION}); upgrade vanishing"
            )
        problem = check_manifest(self.manifest)
        if problem:
            raise RunError(f"{manifest_path}: unreadable manifest: {problem}")
        if self.manifest.get("status") == "closed":
            # runs written before 0.1.0's status words: a closed monitor is a completed run
            self.manifest["status"] = "completed"
        if max_steps is not None and max_steps < 3:
            raise ValueError("max_steps must be at least 3 (the first, middle and last step)")
        self.max_steps = max_steps
        self._tables: dict[str, pd.DataFrame] = {}
        self._unreadable: dict[Path, str] = {}  # parts found damaged while reading
        self._footer_damage: dict[Path, str] | None = None
        self._step_spans: dict[int, tuple[int, int, str]] = {}

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
            if (t := read_part(path, read, self._unreadable)) is not None and t.num_columns
        ]
        if not frames:
            return pd.DataFrame({c: [] for c in (columns or _COLUMNS[table])})
        try:
            df = pa.concat_tables(frames, promote_options="permissive").to_pandas()
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise RunError(
                f"{self.path / table}: its parts do not share one schema ({e})".splitlines()[0]
            ) from None
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

    @property
    def damaged(self) -> list[DamagedPart]:
        """The committed part files that cannot be read (truncated, overwritten, unreadable),
        each with the recorded steps whose rows are missing because of it; ``[]`` for an intact
        run. The tables skip such parts (with a warning); the diagnosis and the report say so.

        The steps a part held are those of the ``steps`` part of the same flush (same number);
        when that one is unreadable too, the steps between its readable neighbours.

        Example:
            >>> vanishing.load_run("runs/my-run").damaged   # doctest: +SKIP
            [DamagedPart(part='metrics/part-00003.parquet', first_step=150, last_step=199, ...)]
        """
        if self._footer_damage is None:
            self._footer_damage, self._step_spans = self._check_footers()
        bad = {**self._footer_damage, **self._unreadable}
        spans = {k: v for k, v in self._step_spans.items() if self.path / "steps" / v[2] not in bad}
        out = []
        for path in sorted(bad, key=lambda p: (_part_number(p), p.parent.name)):
            k = _part_number(path)
            if k in spans:
                lo, hi = spans[k][:2]
            else:
                before = [v[1] for j, v in spans.items() if j < k]
                after = [v[0] for j, v in spans.items() if j > k]
                lo = max(before) + 1 if before else (0 if k == 0 else None)
                hi = min(after) - 1 if after else None
            out.append(DamagedPart(f"{path.parent.name}/{path.name}", lo, hi, bad[path]))
        return out

    def _check_footers(self) -> tuple[dict[Path, str], dict[int, tuple[int, int, str]]]:
        """Every committed part's footer opened (no data read): the parts that fail, and the
        (first, last) recorded step of each readable ``steps`` part by number."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        bad: dict[Path, str] = {}
        spans: dict[int, tuple[int, int, str]] = {}
        for table in ("steps", "metrics", "temporal"):
            for path in committed_parts(self.path, table):
                try:
                    f = pq.ParquetFile(path)
                    try:
                        if table == "steps":
                            span = _step_span(f.metadata)
                            if span is None and f.metadata.num_rows:
                                s = f.read(columns=["step"]).column("step").to_numpy()
                                span = (int(s.min()), int(s.max()))
                            if span is not None:
                                spans[_part_number(path)] = (int(span[0]), int(span[1]), path.name)
                    finally:
                        f.close()
                except (OSError, pa.ArrowException) as e:
                    bad[path] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return bad, spans

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
            if rows.empty:
                present = sorted({str(p) for p in df["param"].unique()} - {""})
                raise ValueError(
                    f"param {param!r} is not in this run; its parameters are: "
                    + (", ".join(repr(p) for p in present) or "none")
                )
        else:
            known = ", ".join(PARAM_STATS + PARAM_RATIOS + MODULE_STATS)
            raise ValueError(f"unknown statistic {stat!r}; expected one of: {known}")
        table = step_table(rows, stat)
        order = [name for name in self.layers if name in table.columns]
        return table[order]

    # ---- run semantics ------------------------------------------------------------------------

    def speeds(self, layers: list[str] | None = None) -> pd.DataFrame:
        """The speed of learning at every recorded step: a step x unit table (default: every
        unit of :func:`vanishing.recorder.semantics.speed_units`, forward order: the hidden
        layers, a stacked LSTM's layers apart as ``rnn.l0``, ``rnn.l1``), each read where
        that function says; ``layers`` picks units or hidden layers by name. Exact for every
        step, also in a bounded run (only the two or so columns needed are streamed).

        Example:
            >>> vanishing.load_run("runs/my-run").speeds().iloc[-1]   # doctest: +SKIP
        """
        units = {name: (module, param) for name, module, param in speed_units(self.layer_info)}
        if layers is not None and not all(n in units for n in layers):
            return self._speeds(units, layers)
        # every unit's table once per run (the ratio, the profile and the views all read it)
        table = self.__dict__.get("_speed_table")
        if table is None:
            table = self.__dict__["_speed_table"] = self._speeds(units, list(units))
        if layers is not None:
            table = table[[n for n in layers if n in table.columns]]
        return table.copy()

    def _speeds(self, units: dict, layers: list[str]) -> pd.DataFrame:
        import numpy as np
        import pandas as pd

        sources = {
            n: tuple(src)
            for n in layers
            if (src := units.get(n) or speed_source(self.layer_info, n))
        }
        whole = self.max_steps is None or len(self.sample_steps) == len(set(self.all_steps["step"]))
        if whole:
            m = self.metrics
        else:
            m = self._read("metrics", columns=["step", "layer", "param", "grad_norm"])
            names = {src for src, _ in sources.values()}
            m = m[m["layer"].astype(str).isin(names)]
        # one bincount over the rows instead of a groupby and a lookup per unit: a short run
        # (a repair's probe) has a few hundred rows, where each pandas operation costs more
        # than the arithmetic
        pairs = list(dict.fromkeys(sources.values()))
        layer_codes, layer_names = pd.factorize(m["layer"].astype(str))
        param_codes, param_names = pd.factorize(m["param"].astype(str))
        where_layer = {str(v): i for i, v in enumerate(layer_names)}
        where_param = {str(v): i for i, v in enumerate(param_names)}
        lookup = np.full((len(layer_names) + 1, len(param_names) + 1), -1)  # -1: a NaN key
        for i, (src, param) in enumerate(pairs):
            if src in where_layer and param in where_param:
                lookup[where_layer[src], where_param[param]] = i
        pair = lookup[layer_codes, param_codes]
        keep = pair >= 0
        step_codes, step_keys = pd.factorize(m["step"].to_numpy()[keep], sort=True)
        pair = pair[keep]
        values = m["grad_norm"].to_numpy(dtype=float, na_value=np.nan)[keep]
        n = len(pairs) * len(step_keys)
        cell = pair * len(step_keys) + step_codes
        present = np.bincount(pair, minlength=len(pairs)) > 0  # a unit with rows: a column
        finite = ~np.isnan(values)
        total = np.bincount(cell[finite], weights=values[finite], minlength=n)
        count = np.bincount(cell[finite], minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (total / count).reshape(len(pairs), len(step_keys))  # no value: NaN
        column = {p: i for i, p in enumerate(pairs)}
        table = pd.DataFrame(
            {
                name: mean[column[src_param]]
                for name, src_param in sources.items()
                if present[column[src_param]]
            },
            index=pd.Index(step_keys, name="step"),
        )
        return table[[n for n in layers if n in table.columns]]

    def first_last_ratio(self) -> float | None:
        """The speed of learning of the first over the last hidden layer (a stacked LSTM's
        first layer over its last: :func:`vanishing.recorder.semantics.speed_units`; in a
        stack of repeated blocks, each role of the first block over the same role of the last,
        the median over roles: :func:`vanishing.recorder.semantics.ratio_pairs`): the median
        over the recorded steps of the per-step ratio (see
        :func:`vanishing.recorder.semantics.first_last_ratio`); None with fewer than two such
        units or no step where it is finite.

        Example:
            >>> vanishing.load_run("runs/my-run").first_last_ratio()   # doctest: +SKIP
            0.0021
        """
        import numpy as np

        per_step = self.step_ratios().to_numpy()
        per_step = per_step[np.isfinite(per_step)]
        return float(np.median(per_step)) if len(per_step) else None

    def step_ratios(self) -> pd.Series:
        """Per recorded step, the ratio :meth:`first_last_ratio` is the median of (one pair's
        ratio, or the median over the roles' pairs: :func:`~vanishing.recorder.semantics.step_ratios`),
        indexed by step; NaN where it is not defined. Empty with no pair recorded. The curve
        loggers get as ``vanishing/first_last_ratio``.

        Example:
            >>> import vanishing
            >>> from vanishing.report.data import example_run
            >>> ratios = vanishing.load_run(example_run()).step_ratios()
            >>> len(ratios), bool((ratios < 1e-2).all())   # 20 steps, the first layer slower
            (20, True)
        """
        import pandas as pd

        pairs = ratio_pairs(self.layer_info)
        speeds = self.speeds(list(dict.fromkeys(u for pair in pairs for u in pair)))
        pairs = [(a, b) for a, b in pairs if a in speeds.columns and b in speeds.columns]
        if not pairs:
            return pd.Series(dtype=float)
        per_step = step_ratios(
            [speeds[a].to_numpy() for a, _ in pairs], [speeds[b].to_numpy() for _, b in pairs]
        )
        return pd.Series(per_step, index=speeds.index, dtype=float)

    def _repr_html_(self) -> str:
        """Rich display in Jupyter: summary, layer table and the depth profile (inline)."""
        import importlib

        # the report reads runs; the reader does not depend on the report: the display hook
        # finds the report module when a notebook asks for it
        return importlib.import_module("vanishing.report.notebook").run_html(self)

    def diagnose(self, model=None):
        """The diagnosis of this run (see :func:`vanishing.diagnose.diagnose_run`).

        ``model``, the watched model as it is now, lets the diagnosis measure what the run does
        not record (the recurrent weights' largest singular value).

        A run of more than :data:`EXACT_DIAGNOSIS_ROWS` metric rows is diagnosed from the exact
        rows of :data:`DIAGNOSIS_STEPS` of its steps (evenly spaced, with the first, middle,
        last and first non-finite steps), so that time and memory stay bounded however long
        the run; a note says so. Every rule judges medians and trends over steps, which such a
        sample keeps (``tests/test_reliability.py`` checks the verdict against the full read).

        Example:
            >>> vanishing.load_run("runs/my-run").diagnose().kinds   # doctest: +SKIP
            ['vanishing_gradient']
        """
        from vanishing.diagnose.engine import diagnose_run

        if self.max_steps is None and self._metric_rows() > EXACT_DIAGNOSIS_ROWS:
            return Run(self.path, max_steps=DIAGNOSIS_STEPS).diagnose(model)
        diag = diagnose_run(self, model)
        sampled, recorded = len(self.sample_steps), len(self.all_steps)
        if sampled < recorded:
            diag.notes.append(
                f"diagnosed from {sampled} of {recorded} recorded steps (evenly spaced, with the "
                "first, middle, last and first non-finite steps), to keep time and memory "
                "bounded on this large run"
            )
        return diag

    def _metric_rows(self) -> int:
        """How many rows the ``metrics`` table holds, from the part footers (no data read)."""
        import pyarrow.parquet as pq

        rows = 0
        for path in committed_parts(self.path, "metrics"):
            try:
                rows += pq.ParquetFile(path).metadata.num_rows
            except Exception:  # noqa: BLE001 - a damaged part is reported by the reads
                continue
        return rows

    def report(self, path: str | os.PathLike | None = None) -> Path:
        """Write this run's self-contained HTML report and return its path.

        ``path`` defaults to ``<run directory>/report.html``; it is the page
        ``vanishing report RUN -o PATH`` writes.

        Example:
            >>> page = vanishing.load_run("runs/my-run").report()   # doctest: +SKIP
            >>> page                                                # doctest: +SKIP
            PosixPath('runs/my-run/report.html')
            >>> vanishing.load_run("runs/my-run").report("deep.html")   # doctest: +SKIP
            PosixPath('deep.html')
        """
        import importlib

        # the report reads runs; this module does not depend on it: found at call time
        write_report = importlib.import_module("vanishing.report.html").write_report

        return write_report(self.path, path)


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
