"""Rich display in Jupyter: the HTML that a run, a diagnosis, a finding and a sweep show as.

``vanishing.Run``, ``vanishing.Diagnosis`` and ``vanishing.Finding`` have a ``_repr_html_``
that calls these functions, so that a notebook cell ending in one of them shows a compact
summary instead of its ``repr``; :class:`Sweep` does the same for a sweep directory. The HTML
is a fragment with inline styles only (no ``<style>``, no script, nothing fetched: it must
not restyle the notebook around it), every user string (module names, config values,
messages, paths) is HTML-escaped, and the plot is a small inline PNG (a ``data:`` URI) drawn by
:mod:`vanishing.report.plots`.

Example:
    >>> import vanishing
    >>> from vanishing.report.data import example_run
    >>> from vanishing.report.notebook import diagnosis_html, run_html
    >>> run = vanishing.load_run(example_run())
    >>> page = run_html(run)
    >>> '<img alt="depth profile" src="data:image/png;base64,' in page
    True
    >>> "vanishing_gradient" in diagnosis_html(run.diagnose())
    True
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from vanishing.report.data import as_run_data
from vanishing.report.html import _e, _num  # one escaping and number format for every page

__all__ = ["diagnosis_html", "finding_html", "run_html", "sweep_html", "Sweep"]

#: rows of a layer or run table shown before the rest are summarised as "… N more"
MAX_ROWS = 24
#: layers named in a finding before the rest are counted
MAX_LAYERS = 12
#: resolution of the inline plots (small: a notebook keeps every output in the .ipynb file)
DPI = 72

_FONT = "font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif"
_BOX = f"{_FONT};font-size:13px;line-height:1.4;max-width:980px"
_TABLE = "border-collapse:collapse;font-size:12px;margin:4px 0"
_CELL = "border:1px solid #dde1e6;padding:2px 7px;text-align:left;vertical-align:top"
_NUM = _CELL.replace("text-align:left", "text-align:right")
_MUTED = "color:#6b7580"
_COLORS = {"critical": ("#c62828", "#fff4f4"), "warning": ("#e0a100", "#fffaf0")}
_OK = ("#2e7d32", "#f2fbf3")


def _badge(text: str, color: str) -> str:
    return (
        f'<span style="display:inline-block;font-size:11px;font-weight:600;padding:0 7px;'
        f'border-radius:9px;color:#fff;background:{color};margin-right:6px">{_e(text)}</span>'
    )


def _table(head: list[str], rows: list[list[str]], numeric: Collection[int] = ()) -> str:
    """A table of already-escaped cells; ``numeric``: indices of right-aligned columns."""
    th = "".join(f'<th style="{_CELL};background:#f0f2f5">{_e(h)}</th>' for h in head)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td style="{_NUM if i in numeric else _CELL}">{c}</td>' for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f'<table style="{_TABLE}"><tr>{th}</tr>{body}</table>'


def _kv(rows: list[tuple[str, str]]) -> str:
    body = "".join(
        f'<tr><th style="{_CELL};background:#f0f2f5">{_e(k)}</th><td style="{_CELL}">{v}</td></tr>'
        for k, v in rows
    )
    return f'<table style="{_TABLE}">{body}</table>'


def _more(shown: int, total: int, what: str) -> str:
    if total <= shown:
        return ""
    return f'<div style="{_MUTED}">… {total - shown} more {_e(what)} (of {total})</div>'


def _img(fig: Any, alt: str) -> str:
    """A figure of :mod:`vanishing.report.plots` as an inline PNG; "" for None (no data)."""
    if fig is None:
        return ""
    from vanishing.report.plots import png_bytes

    data = base64.b64encode(png_bytes(fig, dpi=DPI)).decode("ascii")
    return (
        f'<div><img alt="{_e(alt)}" src="data:image/png;base64,{data}" '
        'style="max-width:100%;height:auto;border:1px solid #e3e6ea"></div>'
    )


def _depth_profile(run: Any) -> str:
    from vanishing.report.plots import depth_profile

    return _img(depth_profile(run), "depth profile")


# ---- findings and diagnoses ---------------------------------------------------------------------


def finding_html(f: Any) -> str:
    """One finding: severity, kind, message, layers, cause, evidence and remedies.

    Example:
        >>> from vanishing import Finding, Remedy
        >>> from vanishing.report.notebook import finding_html
        >>> f = Finding("dead_units", ["<b>fc1</b>"], "warning", "60% of units never fire",
        ...             evidence={"max_dead_fraction": 0.6}, remedies=[Remedy("leaky_relu", "...")])
        >>> page = finding_html(f)
        >>> "dead_units" in page, "&lt;b&gt;fc1&lt;/b&gt;" in page, "<b>fc1" in page
        (True, True, False)
    """
    color, background = _COLORS.get(f.severity, _COLORS["warning"])
    layers = ", ".join(f.layers[:MAX_LAYERS])
    if len(f.layers) > MAX_LAYERS:
        layers += f" … (+{len(f.layers) - MAX_LAYERS})"
    parts = [
        f'<div style="{_BOX};border-left:5px solid {color};background:{background};'
        f'padding:6px 12px;margin:6px 0">',
        _badge(f.severity, color),
        f"<b>{_e(f.kind)}</b>: {_e(f.message)}",
    ]
    if layers:
        parts.append(f"<div>layers: <code>{_e(layers)}</code></div>")
    if f.cause:
        parts.append(f"<div><b>cause</b>: {_e(f.cause)}</div>")
    if f.evidence:
        rows = [[_e(k), _num(v, "{:.4g}")] for k, v in f.evidence.items()]
        parts.append(
            f"<details><summary>evidence ({len(rows)})</summary>"
            f"{_table(['measure', 'value'], rows, {1})}</details>"
        )
    if f.remedies:
        items = "".join(f"<li><b>{_e(r.name)}</b>: {_e(r.why)}</li>" for r in f.remedies)
        parts.append(
            f'<div>remedies (best first):<ul style="margin:2px 0;padding-left:20px">{items}</ul>'
            "</div>"
        )
    parts.append("</div>")
    return "".join(parts)


def diagnosis_html(diag: Any, run: Any = None) -> str:
    """A diagnosis: the verdict, every finding (:func:`finding_html`), the notes and, when it has
    a run (``run``, else ``diag.run`` if set), the run's depth profile.

    Example:
        >>> import vanishing
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.notebook import diagnosis_html
        >>> run = vanishing.load_run(example_run())
        >>> page = diagnosis_html(run.diagnose(), run)
        >>> "2 problems" in page, "stalled_layers" in page, "data:image/png;base64," in page
        (True, True, True)
        >>> "healthy" in diagnosis_html(vanishing.Diagnosis(findings=[]))
        True
    """
    run = run if run is not None else getattr(diag, "run", None)
    if diag.healthy:
        color, background = _OK
        verdict = _badge("healthy", color) + "No gradient-flow problems found."
    else:
        worst = "critical" if any(f.severity == "critical" for f in diag.findings) else "warning"
        color, background = _COLORS[worst]
        n = len(diag.findings)
        verdict = (
            _badge(worst, color)
            + f"<b>{n} problem{'s' if n != 1 else ''}</b>: {_e(', '.join(diag.kinds))}"
        )
    parts = [
        f'<div style="{_BOX}">',
        f'<div style="border-left:5px solid {color};background:{background};padding:6px 12px">'
        f"<b>vanishing.Diagnosis</b> {verdict}</div>",
        *(finding_html(f) for f in diag.findings),
    ]
    if diag.notes:
        parts.append(
            f'<ul style="{_MUTED};margin:4px 0;padding-left:20px">'
            + "".join(f"<li>{_e(n)}</li>" for n in diag.notes)
            + "</ul>"
        )
    if run is not None:
        parts.append(_depth_profile(run))
    parts.append(_phase_diagram(diag))
    parts.append("</div>")
    return "".join(parts)


def _phase_diagram(diag: Any) -> str:
    """An ``inspect`` diagnosis' model on the mean-field phase diagram ("" without theory)."""
    layers = (getattr(diag, "theory", None) or {}).get("layers") or {}
    points = [
        (x["activation"], x["sigma_w2"], x["sigma_b2"])
        for x in layers.values()
        if {"activation", "sigma_w2", "sigma_b2"} <= set(x)
    ]
    if not points:
        return ""
    from vanishing.theory import model_phase_diagram

    try:
        return _img(model_phase_diagram(points, resolution=24), "phase diagram")
    except Exception:  # noqa: BLE001 - a display extra never breaks showing the diagnosis
        return ""


# ---- runs -----------------------------------------------------------------------------------


def run_html(run: Any) -> str:
    """A run (a ``vanishing.Run``, a run directory or a ``RunData``): what was recorded, the
    layers in forward order, the first/last speed-of-learning ratio and the depth profile. It
    reads the run directory with bounded memory and does not diagnose (``run.diagnose()`` does).

    Example:
        >>> import vanishing
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.notebook import run_html
        >>> page = run_html(vanishing.load_run(example_run()))
        >>> "Sequential" in page, "<code>10</code>" in page, page.count("<img")
        (True, True, 1)
    """
    from vanishing.report.formatting import ratio_label

    data = as_run_data(run)
    m = data.manifest
    steps = data.step_list
    loss = data.steps["loss"] if not data.steps.empty else []
    opt = (m.get("optimizer") or {}).get("type", "none")
    summary = [
        ("directory", f"<code>{_e(data.path)}</code>"),
        ("model", f"{_e(m.get('model', '?'))} on {_e(m.get('device', '?'))}, optimizer {_e(opt)}"),
        (
            "layers",
            f"{len(data.layers)} watched: {len(data.param_layers)} with parameters "
            f"({len(data.hidden)} hidden), {len(data.activation_layers)} activations, "
            f"{len(data.recurrent_layers)} recurrent",
        ),
        (
            "recorded steps",
            f"{len(steps)}" + (f" (steps {steps[0]}..{steps[-1]})" if steps else ""),
        ),
        ("status", _e(m.get("status", "?"))),
    ]
    if len(loss):
        summary.append(("loss, first → last", f"{_num(loss.iloc[0])} → {_num(loss.iloc[-1])}"))
    if steps:
        summary.append((ratio_label(data.layer_info), _num(data.first_last_ratio())))
    infos = data.layer_info
    rows = [
        [
            str(i),
            f"<code>{_e(info.get('name', ''))}</code>",
            _e(info.get("type", "")),
            _e(info.get("role", "")),
            _e(info.get("activation") or ""),
            f"{int(info.get('num_params', 0) or 0):,}",
        ]
        for i, info in enumerate(infos[:MAX_ROWS])
    ]
    layer_table = _table(["#", "module", "type", "role", "activation", "params"], rows, {0, 5})
    return (
        f'<div style="{_BOX}"><div><b>vanishing.Run</b> <code>{_e(data.path.name)}</code></div>'
        + _kv(summary)
        + f"<details><summary>layers in forward order ({len(infos)})</summary>{layer_table}"
        + _more(len(rows), len(infos), "layers")
        + "</details>"
        + (_depth_profile(data) if steps else f'<div style="{_MUTED}">no steps recorded</div>')
        + f'<div style="{_MUTED}">run.diagnose() for the diagnosis; vanishing.plots for more '
        "plots</div></div>"
    )


# ---- sweeps ----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def sweep_html(sweep_dir: str | os.PathLike) -> str:
    """A sweep directory (``sweep.sqlite``, read by
    :func:`vanishing.experiments.sweep.read_sweep`): status counts, the swept fields, the
    first/last ratio against the swept field and a table of the runs.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from vanishing.experiments.sweep import SweepStore, plan_sweep
        >>> from vanishing.report.notebook import sweep_html
        >>> d = Path(tempfile.mkdtemp())
        >>> store = SweepStore(d / "sweep.sqlite"); store.add(plan_sweep({"model": {"depth": [2, 4]}}))
        >>> store.close()
        >>> page = sweep_html(d)
        >>> "2 pending" in page, "model.depth" in page
        (True, True)
    """
    from vanishing.experiments.store import read_sweep
    from vanishing.report.plots import sweep_metric

    path = Path(sweep_dir)
    rows = read_sweep(path)
    fields = list(dict.fromkeys(k for r in rows for k in r["params"] if k != "seed"))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    table_rows = []
    for r in rows[:MAX_ROWS]:
        s = r["summary"] or {}
        kinds = r["kinds"] if r["kinds"] is not None else s.get("kinds")
        diagnosis = ", ".join(kinds) if kinds else ("healthy" if kinds is not None else "—")
        table_rows.append(
            [f"<code>{_e(r['key'])}</code>"]
            + [_e(_fmt(r["params"].get(f))) for f in fields]
            + [
                _e(r["seed"]),
                _e(r["status"]),
                _num(s.get("test_metric"), "{:.4g}"),
                _num(s.get("first_last_ratio")),
                _e(diagnosis),
            ]
        )
    n = len(fields)
    table = _table(
        ["key", *fields, "seed", "status", "test metric", "first / last", "diagnosis"],
        table_rows,
        {n + 1, n + 3, n + 4},
    )
    summary = [
        ("directory", f"<code>{_e(path)}</code>"),
        ("runs", _e(", ".join(f"{c} {k}" for k, c in sorted(counts.items())) or "none")),
        ("swept fields", _e(", ".join(fields) or "none")),
    ]
    return (
        f'<div style="{_BOX}"><div><b>vanishing sweep</b> <code>{_e(path.name)}</code></div>'
        + _kv(summary)
        + _img(sweep_metric(path, "first_last_ratio"), "first/last ratio")
        + table
        + _more(len(table_rows), len(rows), "runs")
        + "</div>"
    )


class Sweep:
    """A sweep directory as a notebook shows it: ``_repr_html_`` is :func:`sweep_html`;
    :attr:`rows` the results store's rows (from ``read_sweep``, read again at each use, so a
    running sweep shows its progress).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from vanishing.experiments.sweep import SweepStore, plan_sweep
        >>> from vanishing.report.notebook import Sweep
        >>> d = Path(tempfile.mkdtemp())
        >>> store = SweepStore(d / "sweep.sqlite"); store.add(plan_sweep({"model": {"depth": [2, 4]}}))
        >>> store.close()
        >>> sweep = Sweep(d)
        >>> [r["params"]["model.depth"] for r in sweep.rows], "<table" in sweep._repr_html_()
        ([2, 4], True)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from vanishing.experiments.store import read_sweep

        self.path = Path(path)
        read_sweep(self.path)  # a path that is not a sweep fails here, not at display time

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Every row of the results store (see :func:`vanishing.experiments.sweep.read_sweep`)."""
        from vanishing.experiments.store import read_sweep

        return read_sweep(self.path)

    def __repr__(self) -> str:
        return f"Sweep({str(self.path)!r}, runs={len(self.rows)})"

    def _repr_html_(self) -> str:
        return sweep_html(self.path)
