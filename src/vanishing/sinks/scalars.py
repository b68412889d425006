"""A bounded set of named scalars per step, for experiment loggers (TensorBoard, MLflow, W&B).

A logger shows curves: one per tag. A 1,000-layer model has thousands of per-parameter
statistics per step, far too many curves to read and, for hosted loggers, to send. The
:class:`ScalarSelector` turns each flushed block into at most ``4 + 2 * max_layers + 3`` tags
per step, whatever the model's size; the run directory keeps everything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vanishing.recorder.semantics import (
    is_embedding,
    is_normalization,
    param_unit,
    ratio_pairs,
    speed_units,
    step_ratios,
)

#: Optional step columns (the clipping and GradScaler probes) copied as they are when present.
OPTIONAL_STEP_TAGS = ("grad_norm_backward", "grad_norm_step", "amp_scale")


def _weight_param(names: Sequence[str]) -> str | None:
    for pick in (lambda n: n == "weight", lambda n: "weight" in n):
        found = [n for n in names if pick(n)]
        if found:
            return found[0]
    return None


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.asarray(num, dtype=float) / np.asarray(den, dtype=float)
    out = np.where(np.asarray(den) == 0, np.nan, out)
    return out


class ScalarSelector:
    """Turns blocks into a bounded set of named scalars per step, for loggers.

    Tags (``P`` = ``prefix``, default ``"vanishing"``), one value per recorded step:

    - ``P/loss``: the step's loss;
    - ``P/first_last_ratio``: that step's speed of learning of the first hidden layer over that
      of the last hidden layer (a stacked LSTM's layers apart; speeds read where
      :func:`vanishing.recorder.semantics.speed_units` says; in a stack of repeated blocks,
      the median over roles of each role's first-block over last-block speed:
      :func:`~vanishing.recorder.semantics.ratio_pairs`). The run's headline number,
      ``Run.first_last_ratio()``, is the median over steps of this curve;
    - ``P/worst_update_ratio``: the smallest ``update_norm / param_norm`` that step over the
      trainable weight-like parameters (name contains ``weight``) of layers that are neither
      normalisation layers nor embeddings;
    - ``P/grad_norm/<layer>`` (the layer's speed of learning: the gradient norm that
      ``speed_units`` reads) and ``P/update_ratio/<layer>`` (its weight's update ratio) for at
      most ``max_layers`` layers: the first hidden layer, the last hidden layer and the worst
      one (the hidden layer whose speed relative to the last hidden layer, median over the
      steps of the first block that has them, is smallest). The choice is made once and kept,
      so curves never jump between layers;
    - ``P/grad_norm_backward``, ``P/grad_norm_step``, ``P/amp_scale``: when the block has those
      step columns (``ClippingProbe``, ``ScalerProbe``);
    - ``P/skipped``: the number of optimizer steps skipped before this one, only when above 0.

    NaN values (a statistic not measured at that step) are left out, as are ratios that are not
    finite.

    Example:
        >>> import tempfile, torch, vanishing
        >>> from vanishing.sinks.scalars import ScalarSelector
        >>> class Tags:                      # a sink that keeps the selected scalars
        ...     def open(self, manifest):
        ...         self.sel, self.rows = ScalarSelector(), []
        ...         self.sel.observe_manifest(manifest)
        ...     def write(self, block): self.rows += self.sel.scalars(block)
        ...     def close(self): pass
        >>> _ = torch.manual_seed(0)
        >>> layers = [torch.nn.Linear(4, 4) if i % 2 == 0 else torch.nn.Sigmoid() for i in range(9)]
        >>> model = torch.nn.Sequential(*layers)        # 5 Linear layers: 4 hidden + output
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> tags = Tags()
        >>> with vanishing.watch(model, opt, run_dir=tempfile.mkdtemp() + "/r", sinks=[tags]):
        ...     for _ in range(3):
        ...         opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
        >>> step, scalars = tags.rows[0]
        >>> step, tags.sel.chosen           # first hidden "0", last hidden "6"; worst: "0" again
        (0, ['0', '6'])
        >>> sorted(scalars)  # doctest: +NORMALIZE_WHITESPACE
        ['vanishing/first_last_ratio', 'vanishing/grad_norm/0', 'vanishing/grad_norm/6',
         'vanishing/loss', 'vanishing/update_ratio/0', 'vanishing/update_ratio/6',
         'vanishing/worst_update_ratio']
    """

    def __init__(self, max_layers: int = 3, prefix: str = "vanishing") -> None:
        if max_layers < 0:
            raise ValueError(f"max_layers must be >= 0, got {max_layers}")
        self.max_layers = int(max_layers)
        self.prefix = prefix
        self.layers: list[dict[str, Any]] = []
        #: the speed units (hidden layers, a stacked LSTM's layers apart): name -> source
        self.units: dict[str, tuple[str, str]] = {}
        self.hidden: list[str] = []
        #: the (first, last) units the first/last ratio divides (semantics.ratio_pairs)
        self.pairs: list[tuple[str, str]] = []
        #: the layers given per-layer tags, fixed at the first block that has them
        self.chosen: list[str] | None = None

    def observe_manifest(self, manifest: Mapping[str, Any]) -> None:
        """Take the run's layers (``manifest["layers"]``); call at ``open`` and with every
        non-empty ``block.manifest`` (``scalars`` also does the latter itself)."""
        if manifest and "layers" in manifest:
            self.layers = list(manifest["layers"])
            self.units = {name: (m, p) for name, m, p in speed_units(self.layers)}
            self.hidden = list(self.units)
            self.pairs = ratio_pairs(self.layers)

    # ------------------------------------------------------------------ helpers
    def _weight_rows(self, index: Mapping[tuple[str, str], int]) -> list[int]:
        rows = []
        for layer in self.layers:
            if is_normalization(layer.get("type", "")) or is_embedding(layer.get("type", "")):
                continue
            for p in layer.get("params", []):
                if "weight" in str(p["name"]) and p.get("trainable", True):
                    j = index.get((str(layer["name"]), str(p["name"])))
                    if j is not None:
                        rows.append(j)
        return rows

    def _layer_weight(self, unit: str) -> tuple[str, str] | None:
        """The unit's weight as ``(module, param)``: its module's weight matrix, a stacked
        layer's own (``rnn.l1`` -> ``weight_ih_l1``)."""
        # a hidden layer is its own module (its speed may be read at the batch norm after it);
        # a stacked layer's unit names its module's layer
        known = {str(info["name"]) for info in self.layers}
        module = unit if unit in known or unit not in self.units else self.units[unit][0]
        for info in self.layers:
            if str(info["name"]) == module:
                names = [str(p["name"]) for p in info.get("params", [])]
                own = [n for n in names if param_unit(module, n) == unit] or names
                weight = _weight_param(own)
                return (module, weight) if weight is not None else None
        return None

    def _choose(self, speed: dict[str, np.ndarray]) -> list[str] | None:
        """first hidden, last hidden, worst hidden (deduplicated), or None when the block does
        not have the first and last hidden layers' speeds yet."""
        if not self.hidden:
            return None
        first, last = self.hidden[0], self.hidden[-1]
        if first not in speed or last not in speed:
            return None
        if not (np.isfinite(speed[first]).any() and np.isfinite(speed[last]).any()):
            return None
        chosen = [first, last] if last != first else [first]
        worst, worst_value = None, np.inf
        for layer in self.hidden:
            if layer not in speed:
                continue
            rel = _ratio(speed[layer], speed[last])
            rel = rel[np.isfinite(rel)]
            if len(rel) and float(np.median(rel)) < worst_value:
                worst, worst_value = layer, float(np.median(rel))
        if worst is not None and worst not in chosen:
            chosen.append(worst)
        return chosen[: self.max_layers]

    # ------------------------------------------------------------------ main
    def scalars(self, block: Any) -> list[tuple[int, dict[str, float]]]:
        """One ``(step, {tag: value})`` per step of the block, in the block's order."""
        if block.manifest:
            self.observe_manifest(block.manifest)
        n = len(block.steps)
        if n == 0:
            return []
        P = self.prefix
        step_values = block.values.get("step", {})
        pvals = block.values.get("param", {})
        index = {(str(layer), str(param)): j for j, (layer, param, _) in enumerate(block.params)}
        series: dict[str, np.ndarray] = {}

        def put(tag: str, values: Any) -> None:
            series[tag] = np.asarray(values, dtype=float).reshape(n)

        if "loss" in step_values:
            put(f"{P}/loss", step_values["loss"])

        grad = pvals.get("grad_norm")
        speed: dict[str, np.ndarray] = {}
        if grad is not None:
            for layer, src in self.units.items():
                if src in index:
                    speed[layer] = grad[:, index[src]].astype(float)
        pairs = [(a, b) for a, b in self.pairs if a in speed and b in speed]
        if pairs:
            ratio = step_ratios([speed[a] for a, _ in pairs], [speed[b] for _, b in pairs])
            put(f"{P}/first_last_ratio", ratio)

        update, norm = pvals.get("update_norm"), pvals.get("param_norm")
        update_ratio = None
        if update is not None and norm is not None:
            update_ratio = _ratio(update, norm)
            rows = self._weight_rows(index)
            if rows:
                sub = update_ratio[:, rows]
                sub = np.where(np.isfinite(sub), sub, np.nan)
                with np.errstate(all="ignore"):
                    has = ~np.all(np.isnan(sub), axis=1)
                    worst = np.full(n, np.nan)
                    worst[has] = np.nanmin(sub[has], axis=1)
                put(f"{P}/worst_update_ratio", worst)

        if self.chosen is None:
            self.chosen = self._choose(speed)
        for layer in self.chosen or []:
            if layer in speed:
                put(f"{P}/grad_norm/{layer}", speed[layer])
            weight = self._layer_weight(layer)
            if update_ratio is not None and weight is not None and weight in index:
                put(f"{P}/update_ratio/{layer}", update_ratio[:, index[weight]])

        for name in OPTIONAL_STEP_TAGS:
            if name in step_values:
                put(f"{P}/{name}", step_values[name])
        skipped = np.asarray(block.skipped, dtype=float).reshape(n)
        put(f"{P}/skipped", np.where(skipped > 0, skipped, np.nan))

        out = []
        for i in range(n):
            row = {}
            for tag, values in series.items():
                v = values[i]
                if not np.isnan(v):
                    row[tag] = float(v)
            out.append((int(block.steps[i]), row))
        return out
