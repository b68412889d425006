"""Read-only views of a run's tables that the rules share: windows, profiles through depth."""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

_NOT_IN_PROFILE = (
    "Embedding",
    "EmbeddingBag",
    "BatchNorm",
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "InstanceNorm",
    "LocalResponseNorm",
)
_BOUNDED = {"sigmoid", "tanh", "softsign", "hardtanh"}


class RunView:
    """What the rules read: a run's tables, its layers in forward order, the recent window."""

    def __init__(self, run: Any, *, window: float = 0.5) -> None:
        self.run = run
        self.layers: list[dict] = run.layer_info
        self.metrics: pd.DataFrame = run.metrics
        self.steps: pd.DataFrame = run.steps
        self.temporal: pd.DataFrame = run.temporal
        s = self.steps
        bad = s[(s["loss_nonfinite"] > 0) | (s["grad_nonfinite"] > 0) | (s["param_nonfinite"] > 0)]
        #: the first step with NaN/inf; the other rules judge only the steps before it
        self.first_nonfinite = int(bad["step"].min()) if not bad.empty else None
        recorded = sorted(s["step"].tolist())
        if self.first_nonfinite is not None:
            recorded = [x for x in recorded if x < self.first_nonfinite]
        n = max(1, int(math.ceil(len(recorded) * window))) if recorded else 0
        self.window_steps = recorded[-n:] if n else []  # persistence: the last half of the run

    @cached_property
    def by_name(self) -> dict[str, dict]:
        return {layer["name"]: layer for layer in self.layers}

    def recent(self, df: pd.DataFrame) -> pd.DataFrame:
        return df[df["step"].isin(self.window_steps)]

    @cached_property
    def hidden(self) -> list[str]:
        """Layers whose gradient profile tells depth: parameter-owning, non-recurrent modules in
        forward order, without the output layer (the last one), embeddings and norm layers."""
        names = [
            layer["name"]
            for layer in self.layers
            if layer["role"] == "layer"
            and not layer["recurrent"]
            and layer["num_params"] > 0
            and not layer["type"].startswith(_NOT_IN_PROFILE)
        ]
        return names[:-1]

    def profile(self, stat: str, param: str | None = None) -> pd.DataFrame:
        """step x hidden layer table of ``stat`` over the window (NaN where missing)."""
        df = self.recent(self.metrics)
        rows = df[df["param"] == (param or "")]
        table = rows.pivot_table(index="step", columns="layer", values=stat, aggfunc="mean")
        cols = [c for c in self.hidden if c in table.columns]
        return table[cols] if cols else pd.DataFrame()

    @cached_property
    def depth_signal(self) -> tuple[str, pd.DataFrame]:
        """The per-layer gradient magnitude through depth: the error signal if recorded,
        else the speed of learning (bias gradient), else the weight gradient."""
        for stat, param, label in (
            ("error_norm", None, "error signal"),
            ("grad_norm", "bias", "speed of learning"),
            ("grad_norm", "weight", "weight gradient"),
        ):
            table = self.profile(stat, param)
            if not table.empty and table.notna().any().sum() >= 3:
                return label, table.dropna(axis=1, how="all")
        return "", pd.DataFrame()

    def time_profiles(self) -> list[tuple[str, float, int, str]]:
        """Per recurrent layer over the window: (layer, gradient at t=0 / at t=T-1, T, cell type),
        from the median over steps of each time step's gradient norm."""
        out = []
        t = self.recent(self.temporal)
        for layer, rows in t.groupby("layer", sort=False):
            prof = rows.groupby("t")["grad_norm"].median().sort_index()
            if len(prof) < 3 or not (prof.iloc[-1] > 0):
                continue
            ratio = float(prof.iloc[0] / prof.iloc[-1])
            cell = self.by_name.get(layer, {}).get("type", "")
            out.append((layer, ratio, int(rows["length"].max()), cell))
        return out

    def dominant_activation(self, layers: list[str]) -> str | None:
        """The activation kind that follows most of these layers."""
        kinds = [a for a in (self.activation_of(n) for n in layers) if a]
        return max(set(kinds), key=kinds.count) if kinds else None

    def median_gain(self, layers: list[str]) -> float:
        gains = [g for g in (self.weight_gain(n) for n in layers) if math.isfinite(g)]
        return float(np.median(gains)) if gains else float("nan")

    def activation_of(self, layer: str) -> str | None:
        return self.by_name.get(layer, {}).get("activation")

    def activation_rows(self) -> pd.DataFrame:
        df = self.recent(self.metrics)
        names = [
            layer["name"]
            for layer in self.layers
            if layer["role"] == "activation"
            or (layer.get("activation") and layer["type"].startswith("PReLU"))
        ]
        return df[(df["param"] == "") & (df["layer"].isin(names))]

    def weight_gain(self, layer: str) -> float:
        """Measured std(W) * sqrt(fan_in) of a layer's weight in the window (He for ReLU: sqrt 2)."""
        info = self.by_name.get(layer, {})
        weight = next((p for p in info.get("params", []) if p["name"] == "weight"), None)
        if weight is None or len(weight["shape"]) < 2:
            return float("nan")
        fan_in = int(np.prod(weight["shape"][1:]))
        rows = self.recent(self.metrics)
        rows = rows[(rows["layer"] == layer) & (rows["param"] == "weight")]
        if rows.empty:
            return float("nan")
        norm = float(rows["param_norm"].iloc[0])  # the earliest weight in the window
        return norm / math.sqrt(weight["numel"]) * math.sqrt(fan_in)


def depth_slope(table: pd.DataFrame) -> tuple[float, float]:
    """Median over steps of (decades per layer of log10 |signal| from first to last layer,
    log10 of last / first). Positive slope: the signal is larger near the output."""
    slopes, spans = [], []
    values = table.to_numpy(dtype=float)
    for row in values:
        ok = np.isfinite(row) & (row > 0)
        if ok.sum() < 3:
            continue
        x = np.arange(len(row))[ok]
        y = np.log10(row[ok])
        slopes.append(np.polyfit(x, y, 1)[0])
        spans.append(y[-1] - y[0])
    if not slopes:
        return float("nan"), float("nan")
    return float(np.median(slopes)), float(np.median(spans))


def gain_target(activation: str | None) -> tuple[float, str]:
    """The weight gain std(W) * sqrt(fan_in) a careful init gives for an activation."""
    if activation in ("relu", "relu6", "prelu", "leaky_relu", "gelu", "silu"):
        return math.sqrt(2.0), "he_init"
    if activation == "selu":
        return 1.0, "lecun_init"
    return 1.0, "xavier_init"
