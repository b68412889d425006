"""Read-only views of a run's tables that the rules share: windows, profiles through depth."""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from vanishing import activations
from vanishing.recorder.semantics import (
    FollowingActivation,
    error_source,
    first_nonfinite_step,
    hidden_layers,
    is_embedding,
    is_normalization,
    is_weight_param,
    layer_blocks,
    layer_placement,
    param_unit,
    recurrent_layer_of,
)
from vanishing.recorder.tables import step_table
from vanishing.stats.names import ACTIVATION_STATS

#: a stack of repeated blocks is judged through depth per role across blocks from this many on
MIN_BLOCKS = 3
#: the loss curve is read from this many judged steps on (each tenth is then >= 2 steps)
MIN_LOSS_STEPS = 20
#: the loss sits on a plateau when over the window (the last half of the judged steps) it fell
#: by less than this share: the last tenth averages >= 90% of the tenth before the window
PLATEAU_MAX_FALL = 0.1
#: ... and the plateau is the initial one (the level a model reaches without using its inputs,
#: e.g. predicting the targets' mean) when it holds at least this share of the initial loss: a
#: model that fitted its task and then flattened out sits far lower (docs/diagnosis.md)
PLATEAU_MIN_OF_INITIAL = 0.05


class RunView:
    """What the rules read: a run's tables, its layers in forward order, the recent window."""

    def __init__(
        self, run: Any, *, window: float = 0.5, facts: dict[str, dict[str, float]] | None = None
    ) -> None:
        self.run = run
        #: per layer, numbers measured on the model itself when it is at hand (``inspect``):
        #: e.g. ``{"rnn": {"sigma_max_recurrent": 0.61}}``
        self.facts: dict[str, dict[str, float]] = facts or {}
        self.layers: list[dict] = run.layer_info
        self.metrics: pd.DataFrame = run.metrics
        self.steps: pd.DataFrame = run.steps
        self.temporal: pd.DataFrame = run.temporal
        s = self.steps
        #: the first step with NaN/inf; the other rules judge only the steps before it
        self.first_nonfinite = first_nonfinite_step(s)
        recorded = sorted(s["step"].tolist())
        if self.first_nonfinite is not None:
            recorded = [x for x in recorded if x < self.first_nonfinite]
        n = max(1, int(math.ceil(len(recorded) * window))) if recorded else 0
        self.window_steps = recorded[-n:] if n else []  # persistence: the last half of the run

    @cached_property
    def by_name(self) -> dict[str, dict]:
        return {layer["name"]: layer for layer in self.layers}

    def recent(self, df: pd.DataFrame) -> pd.DataFrame:
        if df is self.metrics:
            return self.recent_metrics
        return df[df["step"].isin(self.window_steps)]

    @cached_property
    def recent_metrics(self) -> pd.DataFrame:
        """The metrics rows of the window, filtered once (rules ask for them per layer)."""
        m = self.metrics
        return m[m["step"].isin(self.window_steps)]

    @cached_property
    def _recent_rows(self) -> dict[tuple[str, str], np.ndarray]:
        # positions only: a DataFrame per group costs ~0.1 ms each, and the rules read a few
        # of the hundreds of groups (each is taken when asked for)
        m = self.recent_metrics
        return m.groupby(["layer", "param"], sort=False).indices

    def recent_values(self, layer: str, param: str, stat: str) -> np.ndarray:
        """The window's values of ``stat`` of one (layer, param), in the table's (step) order
        (float; NaN where not recorded; empty when the run has no such rows or column);
        ``param == ""`` for module rows."""
        at = self._recent_rows.get((layer, param))
        if at is None or stat not in self.recent_metrics:
            return np.empty(0)
        return self._recent_column(stat)[at]

    def _recent_param_rows(self, param: str) -> pd.DataFrame:
        """The window's rows of one parameter name (``""``: module rows), filtered once."""
        by_param = self.__dict__.setdefault("_by_param", {})
        if param not in by_param:
            m = self.recent_metrics
            by_param[param] = m[m["param"] == param]
        return by_param[param]

    def _recent_column(self, stat: str) -> np.ndarray:
        columns = self.__dict__.setdefault("_recent_columns", {})
        if stat not in columns:
            columns[stat] = self.recent_metrics[stat].to_numpy(dtype=float, na_value=np.nan)
        return columns[stat]

    @cached_property
    def loss_curve(self) -> dict[str, float]:
        """The loss over the judged steps (those before the first non-finite one), by tenths:
        ``initial`` (mean of the first tenth), ``window_start`` (the tenth before the window,
        the last half), ``final`` (the last tenth), ``last_over_first``,
        ``last_over_window_start``, ``steps``, and ``plateau`` (1.0/0.0): the loss fell by less
        than PLATEAU_MAX_FALL over the window and still holds at least
        PLATEAU_MIN_OF_INITIAL of its initial value. Empty with fewer than MIN_LOSS_STEPS
        finite losses (``inspect``'s one step has no curve)."""
        s = self.steps
        if "loss" not in s:
            return {}
        if self.first_nonfinite is not None:
            s = s[s["step"] < self.first_nonfinite]
        loss = s.sort_values("step")["loss"].to_numpy(dtype=float)
        loss = loss[np.isfinite(loss)]
        n = len(loss)
        if n < MIN_LOSS_STEPS:
            return {}
        k = max(1, n // 10)
        half = n - int(math.ceil(n * 0.5))  # where the window starts
        first = float(np.mean(loss[:k]))
        last = float(np.mean(loss[-k:]))
        start = float(np.mean(loss[max(0, half - k) : max(k, half)]))
        if not (first > 0 and start > 0):
            return {}
        out = {
            "initial": first,
            "window_start": start,
            "final": last,
            "last_over_first": last / first,
            "last_over_window_start": last / start,
            "steps": float(n),
        }
        out["plateau"] = float(
            out["last_over_window_start"] >= 1 - PLATEAU_MAX_FALL
            and out["last_over_first"] >= PLATEAU_MIN_OF_INITIAL
        )
        return out

    @cached_property
    def weight_units(self) -> pd.DataFrame:
        """The window's weight statistics per (step, unit): every weight matrix
        (:func:`~vanishing.recorder.semantics.is_weight_param`: ``weight``, ``weight_ih_l0``,
        ``in_proj_weight``...) of a parameter-owning layer, grouped by
        :func:`~vanishing.recorder.semantics.param_unit` (a module, or one layer ``rnn.l1`` of
        a stacked recurrent module). Columns: ``step``, ``unit``, ``layer`` (the module),
        ``grad_norm``, ``param_norm``, ``update_norm`` (root of the sum of squares over the
        unit's weights), ``update_ratio`` and ``grad_ratio`` (those norms over ``param_norm``;
        a unit of one weight keeps its recorded ratios)."""
        # the window's rows of the whole run's table: each row is one step's, so filtering
        # after grouping gives what grouping the window's rows gives, and the run's table is
        # built anyway (the loss and weight-drift signs read it)
        u = self.all_weight_units
        return u[u["step"].isin(self.window_steps)].reset_index(drop=True)

    @cached_property
    def all_weight_units(self) -> pd.DataFrame:
        """:attr:`weight_units` over every recorded step (not only the window)."""
        return self._weight_units(self.metrics)

    def _weight_units(self, m: pd.DataFrame) -> pd.DataFrame:
        cols = ["step", "unit", "layer", "grad_norm", "param_norm", "update_norm"]
        cols += ["update_ratio", "grad_ratio"]
        if m.empty or "param" not in m:
            return pd.DataFrame(columns=cols)
        layers = {x["name"] for x in self.layers if x.get("role") == "layer"}
        # per distinct name, not per row: a long run has thousands of rows per parameter
        params = m["param"].astype(str)
        weight = {p: bool(p) and is_weight_param(p) for p in params.unique()}
        keep = params.map(weight).to_numpy(dtype=bool) & m["layer"].isin(layers).to_numpy()
        if not keep.any():
            return pd.DataFrame(columns=cols)
        # one table built from arrays: each pandas filter, copy or column assignment costs
        # ~0.1 ms whatever the size, and a repair diagnoses every candidate's short run
        nan = np.full(int(keep.sum()), np.nan)
        data = {c: m[c].to_numpy()[keep] for c in ("step", "layer")}
        pairs = list(zip(data["layer"].astype(str), params.to_numpy()[keep]))
        unit_of = {pair: param_unit(*pair) for pair in dict.fromkeys(pairs)}
        data["unit"] = [unit_of[pair] for pair in pairs]
        for c in cols[3:]:
            data[c] = m[c].to_numpy(dtype=float, na_value=np.nan)[keep] if c in m else nan
        w = pd.DataFrame(data)
        if len(set(unit_of.values())) == len(unit_of):
            # every unit is one weight matrix (no stacked recurrent layer, no split attention
            # weights): its norms and ratios are the recorded ones, no group sums needed
            return w[cols]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            sq = w[["grad_norm", "param_norm", "update_norm"]].astype(float) ** 2
        sq[["step", "unit", "layer"]] = w[["step", "unit", "layer"]]
        g = sq.groupby(["step", "unit", "layer"], sort=False)
        out = (g[["grad_norm", "param_norm", "update_norm"]].sum(min_count=1) ** 0.5).reset_index()
        n = g.size().to_numpy()
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out["update_ratio"] = out["update_norm"] / out["param_norm"]
            out["grad_ratio"] = out["grad_norm"] / out["param_norm"]
        # a unit of one weight keeps the ratios as recorded (NaN norms, optimizer-less runs)
        single = n == 1
        if single.any():
            rec = w.groupby(["step", "unit", "layer"], sort=False)[
                ["update_ratio", "grad_ratio"]
            ].first()
            out.loc[single, "update_ratio"] = rec["update_ratio"].to_numpy(dtype=float)[single]
            out.loc[single, "grad_ratio"] = rec["grad_ratio"].to_numpy(dtype=float)[single]
        return out[cols]

    def recurrent_stack(self, layer: str) -> dict[str, dict[str, float]]:
        """Per layer of a recurrent module (``l0``, ``l1``, ... as torch names them; with
        ``l0_reverse``... for a bidirectional one), medians over the window of its weights'
        gradient norm, update/weight and gradient/weight, and its gradient relative to the top
        layer's (of the same direction): the stack's depth, which the time profile
        (measured at the stack's input, through every layer) cannot show.

        Keys: ``"<module>.l0"`` ...; empty when the module has one layer or none recorded."""
        u = self.weight_units
        rows = u[u["layer"] == layer]
        subs = [s for s in rows["unit"].unique() if s != layer]
        # a bidirectional layer's two directions (l0, l0_reverse) are one depth: a stack needs
        # two layers, and each direction is compared with its own top layer
        if len({_layer_index(s)[0] for s in subs}) < 2:
            return {}
        med = rows.groupby("unit")[["grad_norm", "update_ratio", "grad_ratio"]].median()
        order = sorted(subs, key=lambda s: _layer_index(s))
        tops = {s.endswith("_reverse"): float(med.loc[s, "grad_norm"]) for s in order}
        out = {}
        for s in order:
            row = med.loc[s]
            g = float(row["grad_norm"])
            top = tops[s.endswith("_reverse")]
            out[s] = {
                "weight_grad_norm": g,
                "update_ratio": float(row["update_ratio"]),
                "grad_ratio": float(row["grad_ratio"]),
                "grad_vs_top_layer": g / top if top > 0 and math.isfinite(top) else float("nan"),
            }
        return out

    @cached_property
    def hidden(self) -> list[str]:
        """Layers whose gradient profile tells depth: the hidden layers (see
        :func:`vanishing.recorder.semantics.hidden_layers`) that are not recurrent; a recurrent
        layer's gradient is judged through time instead (:meth:`time_profiles`)."""
        return [
            n
            for n in hidden_layers(self.layers)
            if not self.by_name[n].get("recurrent") and self.placement.get(n) != "root"
        ]

    @cached_property
    def placement(self) -> dict[str, str]:
        """Each layer's place by role (:func:`vanishing.recorder.semantics.layer_placement`)."""
        return layer_placement(self.layers)

    @cached_property
    def stack(self) -> dict[str, tuple[str, int, str]]:
        """The main stack of repeated blocks: per module in it, (block, block index, role)."""
        blocks = layer_blocks(self.layers)
        main = {b[0] for n, b in blocks.items() if self.placement.get(n) == "block"}
        return {n: b for n, b in blocks.items() if b[0] in main}

    @cached_property
    def stack_blocks(self) -> list[str]:
        """The main stack's blocks (module names), in block order."""
        seen = {b: i for b, i, _ in self.stack.values()}
        return sorted(seen, key=seen.get)

    @property
    def depth_unit(self) -> str:
        """``"block"`` when depth is judged per role across the blocks of a stack (at least
        MIN_BLOCKS of them), else ``"layer"`` (a chain of hidden layers)."""
        return "block" if len(self.stack_blocks) >= MIN_BLOCKS else "layer"

    def members(self, layers: list[str]) -> list[str]:
        """Hidden-like layers (own parameters; not norms, embeddings or recurrent) of the given
        blocks; layers that are not blocks are themselves."""
        blocks = set(layers) & set(self.stack_blocks)
        if not blocks:
            return list(layers)
        out = []
        for x in self.layers:
            b = self.stack.get(x["name"])
            if b and b[0] in blocks and self._hidden_like(x):
                out.append(x["name"])
        return out

    @staticmethod
    def _hidden_like(x: dict) -> bool:
        return (
            x.get("role") == "layer"
            and (x.get("num_params") or 0) > 0
            and not is_normalization(x.get("type", ""))
            and not is_embedding(x.get("type", ""))
            and not x.get("recurrent")
        )

    @cached_property
    def block_norms(self) -> tuple[bool, bool]:
        """(the stack's blocks have a normalization layer, the block ends with one: post-LN,
        where the sum ``x + f(x)`` is normalised, unlike pre-LN's ``x + f(norm(x))``).

        Post-LN needs that last norm to be a layer norm (LayerNorm, RMSNorm: a transformer's
        ``norm(x + f(x))``): a block of a CNN that ends with a BatchNorm (a ResNet's ``bn2``,
        an EfficientNet's projection BN) normalises its branch before the sum, not the sum."""
        if not self.stack_blocks:
            return False, False
        first = self.stack_blocks[0]
        inside = [
            x
            for x in self.layers
            if self.stack.get(x["name"], ("",))[0] == first and x.get("role") == "layer"
        ]
        norms = [is_normalization(x.get("type", "")) for x in inside]
        last = str(inside[-1].get("type", "")) if inside else ""
        layer_norm = "LayerNorm" in last or "RMSNorm" in last
        return any(norms), bool(norms) and norms[-1] and not norms[0] and layer_norm

    @property
    def residual_model(self) -> bool | None:
        """Whether the model has skip connections: measured on the model when it is at hand;
        else a stack of blocks with attention or normalization inside (a transformer, a
        ResNet: residual by construction); else unknown (None)."""
        if self.skip_connections is not None:
            return self.skip_connections
        if self.stack_blocks and (
            self.block_norms[0]
            or any("Attention" in self.by_name[n].get("type", "") for n in self.stack)
        ):
            return True
        return None

    def by_block(self, table: pd.DataFrame) -> pd.DataFrame:
        """A step x layer table as step x block of the main stack: per step, the median over
        roles (modules of the same name in every block) of each role's value relative to its
        value in the first block. So block 0's attention query is compared with block 3's
        query, not with a pooler or an FFN; an empty table when no role is in every block."""
        index = {b: i for i, b in enumerate(self.stack_blocks)}
        roles: dict[str, dict[int, str]] = {}
        for c in table.columns:
            b = self.stack.get(c)
            if b is not None:
                roles.setdefault(b[2], {})[index[b[0]]] = c
        keep = [r for r, m in roles.items() if len(m) == len(index)]
        if not keep:
            return pd.DataFrame()
        logs = []
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for r in keep:
                v = table[[roles[r][i] for i in range(len(index))]].to_numpy(dtype=float)
                v = np.where(np.isfinite(v) & (v > 0), v, np.nan)
                lg = np.log10(v)
                logs.append(lg - lg[:, :1])
            stacked = np.stack(logs)
            ok = np.isfinite(stacked).any(axis=0)
            prof = np.full(stacked.shape[1:], np.nan)
            if ok.any():
                prof[ok] = np.nanmedian(stacked[:, ok], axis=0)
            values = 10**prof
        out = pd.DataFrame(values, index=table.index, columns=list(self.stack_blocks))
        out.attrs["roles"] = len(keep)
        return out

    def profile(self, stat: str, param: str | None = None) -> pd.DataFrame:
        """step x hidden layer table of ``stat`` over the window (NaN where missing); the
        layers of the main stack (``depth_unit == "block"``) in place of the hidden layers."""
        rows = self._recent_param_rows(param or "")
        if rows.empty:
            return pd.DataFrame()
        table = step_table(rows, stat, dropna=True)
        if self.depth_unit == "block":
            names = [x["name"] for x in self.layers if x["name"] in self.stack]
            names = [n for n in names if self._hidden_like(self.by_name[n])]
        elif self.stack_blocks:
            # two blocks: too few to compare a role through depth, and the chain of their
            # sublayers would mix roles (an attention query against a pooler)
            return pd.DataFrame()
        else:
            names = self.hidden
            if stat in ("error_norm", "error_numel"):
                # a layer whose output goes straight into a normalization is read after it:
                # before it, the gradient carries 1/spread of the layer's own output
                # (semantics.error_source), e.g. 10x through 4 healthy conv+BN layers
                table = table.copy()
                for n in names:
                    src = error_source(self.layers, n)
                    if src != n and src in table.columns and table[src].notna().any():
                        table[n] = table[src]
        cols = [c for c in names if c in table.columns]
        return table[cols] if cols else pd.DataFrame()

    @cached_property
    def depth_signals(self) -> list[tuple[str, pd.DataFrame]]:
        """Every recorded per-layer gradient magnitude through depth, per unit (norm /
        sqrt(units), so that layers of different widths compare), best first: the error signal
        ``||dLoss/d output||``, then the speed of learning ``||dLoss/d bias||``, else the weight
        gradient. Each table: step x hidden layer."""
        out = []
        for stat, param, label in (
            ("error_norm", None, "error signal"),
            ("grad_norm", "bias", "speed of learning"),
            ("grad_norm", "weight", "weight gradient"),
        ):
            if label == "weight gradient" and out:
                break
            table = self.profile(stat, param)
            if not table.empty and table.notna().any().sum() >= 3:
                table = table.dropna(axis=1, how="all")
                entries = self._error_entries(table) if stat == "error_norm" else None
                if entries is not None:
                    # the gradient's RMS over its entries: a conv map's norm also grows with
                    # sqrt(positions), which pooling and strides change from layer to layer
                    table, scale = table / np.sqrt(entries), "RMS over its entries"
                else:  # per output unit (runs recorded before the entry counts)
                    units = [self.units(c, param or "bias") for c in table.columns]
                    table, scale = table / np.sqrt(np.asarray(units, dtype=float)), "per unit"
                if self.depth_unit == "block":
                    table = self.by_block(table)
                    if table.empty or table.notna().any().sum() < MIN_BLOCKS:
                        continue
                table.attrs["scale"] = scale  # how layers were made comparable (the notes say)
                out.append((label, table))
        return out

    def _error_entries(self, table: pd.DataFrame) -> np.ndarray | None:
        """The entry counts behind an error-signal table (``error_numel``, read where the table
        reads the error), cell by cell; None unless every recorded cell has one."""
        if "error_numel" not in self.metrics:
            return None
        numel = self.profile("error_numel")
        if numel.empty:
            return None
        numel = numel.reindex(index=table.index, columns=table.columns)
        values = numel.to_numpy(dtype=float)
        recorded = table.notna().to_numpy()
        if not (np.isfinite(values[recorded]).all() and (values[recorded] > 0).all()):
            return None
        return values

    @property
    def depth_signal(self) -> tuple[str, pd.DataFrame]:
        """The best recorded gradient profile through depth (see :attr:`depth_signals`)."""
        return self.depth_signals[0] if self.depth_signals else ("", pd.DataFrame())

    def units(self, layer: str, param: str = "bias") -> int:
        """Output units of a layer (rows of its weight; all entries for a weight gradient)."""
        info = self.by_name.get(layer, {})
        params = {p["name"]: p for p in info.get("params", [])}
        if param == "weight" and "weight" in params:
            return max(1, int(params["weight"]["numel"]))
        if info.get("type", "").startswith("MultiheadAttention") and "in_proj_weight" in params:
            return max(1, int(params["in_proj_weight"]["shape"][-1]))  # outputs embed_dim
        for name in ("bias", "weight"):
            if name in params and params[name]["shape"]:
                return max(1, int(params[name]["shape"][0]))
        for p in info.get("params", []):  # e.g. a custom layer with one matrix
            if p["shape"]:
                return max(1, int(p["shape"][0]))
        return 1

    @cached_property
    def activation_after(self) -> dict[str, str]:
        """Each layer's activation module: the first one that runs after it, before the next
        parameter-owning layer other than a norm right after it (forward order; the
        definition: :class:`vanishing.recorder.semantics.FollowingActivation`)."""
        follow = FollowingActivation()
        for layer in self.layers:
            act = layer["name"] if layer["role"] == "activation" else None
            follow.call(layer["name"], act, layer["num_params"] > 0, layer.get("type", ""))
        return follow.after

    def activation_stat(self, layer: str, stat: str) -> float:
        """Median over the window of an activation statistic of the layer's activation module."""
        act = self.activation_after.get(layer)
        if act is None:
            return float("nan")
        if stat not in ACTIVATION_STATS:
            vals = self.recent_values(act, "", stat)
            vals = vals[~np.isnan(vals)]
            return float(np.median(vals)) if len(vals) else float("nan")
        return self._activation_medians.get((act, stat), float("nan"))

    @cached_property
    def _activation_medians(self) -> dict[tuple[str, str], float]:
        """Every module's window median of every activation statistic, in one grouping (the
        cause attribution asks for three statistics of each hidden layer)."""
        m = self.recent_metrics
        cols = [c for c in ACTIVATION_STATS if c in m.columns]
        if m.empty or not cols or "param" not in m:
            return {}
        rows = self._recent_param_rows("")
        medians = rows.groupby(rows["layer"].astype(str), sort=False)[cols].median()
        return {
            (layer, stat): float(v)
            for stat in cols
            for layer, v in medians[stat].items()
            if not math.isnan(v)
        }

    @cached_property
    def activation_spread(self) -> pd.DataFrame:
        """The forward side of the depth profiles: step x activation module (forward order)
        of the activations' spread (``act_std``); per role across the blocks of a stack (an
        FFN's GELU against the FFN's GELU); empty when not comparable (two blocks) or not
        recorded (activations called as functions)."""
        arows = self.activation_rows()
        if arows.empty:
            return pd.DataFrame()
        order = [n["name"] for n in self.layers]
        std = step_table(arows, "act_std", dropna=True)
        std = std[[c for c in order if c in std.columns]]
        if self.depth_unit == "block":
            return self.by_block(std)
        if self.stack_blocks:
            return pd.DataFrame()
        return std

    @cached_property
    def normalization_layers(self) -> list[str]:
        """Normalisation layers of the model (batch, layer, group, RMS, instance norm, ...)."""
        return [n["name"] for n in self.layers if is_normalization(n["type"])]

    def time_profiles(self) -> list[tuple[str, float, int, str]]:
        """Per recurrent layer over the window: (layer, gradient at t=0 / at t=T-1, T, cell type),
        from the median over steps of each time step's gradient norm."""
        out = []
        t = self.recent(self.temporal)
        for layer, rows in t.groupby("layer", sort=False):
            prof = rows.groupby("t")["grad_norm"].median().sort_index()
            if len(prof) < 3 or not (prof.iloc[-1] > 0) or not np.isfinite(prof.iloc[-1]):
                continue
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                ratio = float(prof.iloc[0] / prof.iloc[-1])
            if math.isnan(ratio) or prof.iloc[0] < 0:
                continue
            cell = self.by_name.get(layer, {}).get("type", "")
            length = rows["length"].max() if "length" in rows else float("nan")
            T = int(length) if np.isfinite(length) and length >= len(prof) else len(prof)
            out.append((layer, ratio, T, cell))
        return out

    def time_trend(self, layer: str) -> float:
        """first / last time step on a least-squares line through log10 of the median profile
        (NaN if it cannot be fitted)."""
        t = self.recent(self.temporal)
        prof = t[t["layer"] == layer].groupby("t")["grad_norm"].median().sort_index()
        prof = prof[(prof > 0) & np.isfinite(prof)]
        if len(prof) < 3:
            return float("nan")
        x = prof.index.to_numpy(dtype=float)
        slope = np.polyfit(x, np.log10(prof.to_numpy(dtype=float)), 1)[0]
        return float(10 ** (-slope * (x[-1] - x[0])))

    def recurrent_scale(self, layer: str) -> dict[str, float]:
        """The recurrent weight's scale: its RMS singular value ||W_hh||_F / sqrt(hidden) from the
        records, and its largest singular value when measured on the model (``facts``)."""
        out = dict(self.facts.get(layer, {}))
        info = self.by_name.get(layer, {})
        hh = next((p for p in info.get("params", []) if p["name"] == "weight_hh_l0"), None)
        if hh is None:
            return out
        norms = self.recent_values(layer, "weight_hh_l0", "param_norm")
        if len(norms):
            gates = max(1, hh["shape"][0] // hh["shape"][1])  # 1 RNN, 3 GRU, 4 LSTM blocks
            norm = float(norms[0])
            out["rms_singular_value_recurrent"] = norm / math.sqrt(hh["shape"][1] * gates)
        return out

    def dominant_activation(self, layers: list[str]) -> str | None:
        """The activation kind that follows most of these layers."""
        kinds = [a for a in (self.activation_of(n) for n in layers) if a]
        return max(set(kinds), key=kinds.count) if kinds else None

    def activation_of(self, layer: str) -> str | None:
        return self.by_name.get(layer, {}).get("activation")

    def activation_rows(self) -> pd.DataFrame:
        """The window's rows of the activation modules (a PReLU layer's too); three rules
        read them, so they are filtered once."""
        if "_activation_rows" not in self.__dict__:
            names = [
                layer["name"]
                for layer in self.layers
                if layer["role"] == "activation"
                or (layer.get("activation") and layer["type"].startswith("PReLU"))
            ]
            rows = self._recent_param_rows("")
            self.__dict__["_activation_rows"] = rows[rows["layer"].isin(names)]
        return self.__dict__["_activation_rows"]

    @property
    def skip_connections(self) -> bool | None:
        """Whether the watched model has skip connections: measured on the model when the
        diagnosis has it, else as the monitor traced it at close (the manifest's
        ``skip_connections``); None when neither knows (an untraceable forward, an old run)."""
        value = self.facts.get("<model>", {}).get("skip_connections")
        if value is None:
            manifest = getattr(self.run, "manifest", None)
            recorded = manifest.get("skip_connections") if isinstance(manifest, dict) else None
            value = recorded if isinstance(recorded, bool) else None  # a damaged one: unknown
        return None if value is None else bool(value)

    def weight_gain(self, layer: str) -> float:
        """Measured std(W) * sqrt(fan_in) of a layer's weight in the window (He for ReLU: sqrt 2)."""
        info = self.by_name.get(layer, {})
        weight = next((p for p in info.get("params", []) if p["name"] == "weight"), None)
        if weight is None or len(weight["shape"]) < 2:
            return float("nan")
        fan_in = int(np.prod(weight["shape"][1:]))
        norms = self.recent_values(layer, "weight", "param_norm")
        if not len(norms):
            return float("nan")
        norm = float(norms[0])  # the earliest weight in the window
        return norm / math.sqrt(weight["numel"]) * math.sqrt(fan_in)


def _layer_index(unit: str) -> tuple[int, str]:
    sub = recurrent_layer_of("x_" + unit.rpartition(".")[2]) or ""
    digits = "".join(ch for ch in sub.split("_")[0] if ch.isdigit())
    return (int(digits) if digits else 0, sub)


def depth_trend(table: pd.DataFrame) -> dict[str, float]:
    """How a step x layer table changes through depth, median over its steps (rows).

    ``slope``: decades per layer of a least-squares line through log10 |value| (positive: larger
    near the output); ``fitted_span``: that line's rise from the first to the last layer;
    ``span``: log10(last / first) as measured; ``layers``: how many layers had a value.

    Example:
        >>> import pandas as pd
        >>> from vanishing.diagnose.view import depth_trend
        >>> t = pd.DataFrame([[1e-3, 1e-2, 1e-1, 1.0]], columns=list("abcd"))
        >>> {k: round(v, 6) for k, v in depth_trend(t).items()}
        {'slope': 1.0, 'fitted_span': 3.0, 'span': 3.0, 'layers': 4.0}
    """
    slopes, fitted, spans, counts = [], [], [], []
    values = table.to_numpy(dtype=float)
    for row in values:
        ok = np.isfinite(row) & (row > 0)
        if ok.sum() < 3:
            continue
        x = np.arange(len(row))[ok]
        y = np.log10(row[ok])
        slope = np.polyfit(x, y, 1)[0]
        slopes.append(slope)
        fitted.append(slope * (x[-1] - x[0]))
        spans.append(y[-1] - y[0])
        counts.append(ok.sum())
    if not slopes:
        nan = float("nan")
        return {"slope": nan, "fitted_span": nan, "span": nan, "layers": 0.0}
    return {
        "slope": float(np.median(slopes)),
        "fitted_span": float(np.median(fitted)),
        "span": float(np.median(spans)),
        "layers": float(np.median(counts)),
    }


def activation_entry(kind: str | None) -> activations.Activation | None:
    """The registry entry of a recorded activation kind; None for no activation or a kind not
    registered now (a run recorded with a custom activation, read without it).

    Example:
        >>> from vanishing.diagnose.view import activation_entry
        >>> activation_entry("tanh").tails, activation_entry("mystery"), activation_entry(None)
        ('both', None, None)
    """
    if not kind:
        return None
    try:
        return activations.get(kind)
    except ValueError:
        return None


def gain_target(activation: str | None) -> tuple[float, str]:
    """The weight gain std(W) * sqrt(fan_in) a careful init gives for an activation, and that
    init's remedy name (the registry's ``init_gain``, ``init_remedy``; Xavier's 1 without one).

    Example:
        >>> from vanishing.diagnose.view import gain_target
        >>> [(round(g, 3), r) for g, r in map(gain_target, ["relu", "selu", "tanh", None])]
        [(1.414, 'he_init'), (1.0, 'lecun_init'), (1.0, 'xavier_init'), (1.0, 'xavier_init')]
    """
    entry = activation_entry(activation)
    if entry is None:
        return 1.0, "xavier_init"
    return entry.init_gain, entry.init_remedy


def is_squashing(activation: str | None) -> bool:
    """A squashing activation (sigmoid, tanh, softsign, hardtanh): flat tails on both sides and
    no dead side, so its derivative is small wherever the input is large (unlike ReLU6, whose
    lower side is a ReLU's off half).

    Example:
        >>> from vanishing.diagnose.view import is_squashing
        >>> [k for k in ("sigmoid", "hardtanh", "relu6", "relu", "gelu") if is_squashing(k)]
        ['sigmoid', 'hardtanh']
    """
    entry = activation_entry(activation)
    return entry is not None and entry.tails == "both" and not entry.can_die


def dies_outright(activation: str | None) -> bool:
    """Its units can die and a dead unit passes exactly no gradient (ReLU, ReLU6); leaky ReLU,
    PReLU, ELU and SELU units still pass some gradient when "off".

    Example:
        >>> from vanishing.diagnose.view import dies_outright
        >>> [k for k in ("relu", "relu6", "leaky_relu", "elu", "hardtanh") if dies_outright(k)]
        ['relu', 'relu6']
    """
    entry = activation_entry(activation)
    return entry is not None and entry.can_die and entry.binary_derivative


def derivative_rms(activation: str | None, mean_derivative: float) -> float:
    """RMS of ``phi'`` from its mean: ``sqrt(mean)`` when ``phi'`` is 0 or 1 (ReLU, ReLU6,
    hardtanh), else the mean's magnitude stands in for it.

    Example:
        >>> from vanishing.diagnose.view import derivative_rms
        >>> derivative_rms("relu", 0.25), derivative_rms("sigmoid", 0.2)
        (0.5, 0.2)
    """
    entry = activation_entry(activation)
    if entry is not None and entry.binary_derivative and mean_derivative >= 0:
        return math.sqrt(mean_derivative)
    return abs(mean_derivative)


def max_derivative_text(activation: str | None) -> str:
    """``max |phi'|`` of an activation with its default options, for a sentence: a unit
    fraction as such (sigmoid's ``1/4``), else two significant digits (1 without one).

    Example:
        >>> from vanishing.diagnose.view import max_derivative_text
        >>> [max_derivative_text(k) for k in ("sigmoid", "tanh", "selu", "gelu", None)]
        ['1/4', '1', '1.8', '1.1', '1']
    """
    entry = activation_entry(activation)
    bound = 1.0 if entry is None else entry.max_derivative()
    if 0 < bound < 1 and math.isclose(1 / bound, round(1 / bound), rel_tol=1e-12):
        return f"1/{round(1 / bound)}"
    return f"{bound:.2g}"
