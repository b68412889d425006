"""One self-contained HTML report for a run, a sweep, or a directory of runs.

The page has no script, no external stylesheet, font or image: every picture is an inline
base64 PNG, so it opens anywhere, offline, and fetches nothing. Every string that comes from
the user (module names, config values, paths, messages) is HTML-escaped.

Example:
    >>> from vanishing.report.html import write_report
    >>> write_report("runs/my-run")                 # doctest: +SKIP
    PosixPath('runs/my-run/report.html')
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import os
from pathlib import Path
from typing import Any

from vanishing.recorder.semantics import param_unit, recurrent_layer_of
from vanishing.report.data import RunData, finite_or_none
from vanishing.report.formatting import DASH, metric_text, ratio_label, stat_text

__all__ = [
    "write_report",
    "write_page",
    "render_run",
    "render_sweep",
    "render_collection",
    "render_compare",
    "target_kind",
]

#: Runs with more metric rows than this are diagnosed from the sampled steps, i.e. from the
#: bounded run that :class:`RunData` holds (the rules read whole tables into pandas: a 100-layer
#: run of 4,000 steps would take about 20 s and 800 MiB).

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
 color:#1d232b;background:#f6f7f9;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff;min-height:100vh}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.25em;margin:34px 0 10px;
 border-bottom:2px solid #e3e6ea;padding-bottom:4px}h3{font-size:1.05em;margin:18px 0 6px}
.sub{color:#5a6470;margin:0 0 18px}
table{border-collapse:collapse;font-size:.86em;margin:6px 0 12px}
th,td{border:1px solid #dde1e6;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.scroll{overflow-x:auto;max-height:560px;overflow-y:auto}
.finding{border-left:5px solid #e0a100;background:#fffaf0;padding:8px 14px;margin:10px 0}
.finding.critical{border-color:#c62828;background:#fff4f4}
.badge{display:inline-block;font-size:.75em;font-weight:600;padding:1px 7px;border-radius:9px;
 color:#fff;background:#e0a100;margin-right:6px;text-transform:uppercase}
.badge.critical{background:#c62828}.badge.ok{background:#2e7d32}
.healthy{border-left:5px solid #2e7d32;background:#f2fbf3;padding:8px 14px}
figure{margin:14px 0 22px}figure img{max-width:100%;height:auto;border:1px solid #e3e6ea}
figcaption{color:#4a545f;font-size:.88em;margin-top:4px}
pre{background:#f3f5f7;padding:10px;overflow-x:auto;font-size:.82em;border:1px solid #e3e6ea}
code{background:#f3f5f7;padding:0 3px}
ul.remedies{margin:4px 0 4px 0;padding-left:20px}
.muted{color:#6b7580}
.verdict{font-size:1.08em;padding:10px 14px;margin:0 0 8px;border-left:6px solid #e0a100;
 background:#fffaf0}.verdict.critical{border-color:#c62828;background:#fff4f4}
.verdict.ok{border-color:#2e7d32;background:#f2fbf3}.verdict.none{border-color:#9aa3ad;
 background:#f3f5f7}
.side{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:18px}
.card{min-width:0}.card .finding h3{margin-top:8px}
"""

_CAPTIONS = {
    "loss": "Training loss per step (band: min..max within a time bucket) and the evaluation "
    "curves when the run has eval.parquet.",
    "depth_profile": "Gradient norm of each weight matrix (left{matrices}) and the "
    "backpropagated error signal at each layer's output (right), through depth in forward "
    "order, at the first, middle and last recorded steps. A line that falls toward the input "
    "(left) is the vanishing gradient; one that rises is the exploding gradient.",
    "speed_heatmap": "log10 of the speed of learning ‖∂C/∂b‖ of each hidden layer (rows, first "
    "at top) over training (columns). Dark rows near the top that stay dark: the first layers "
    "barely learn.",
    "speed_curves": "Nielsen's speed-of-learning curves: one line per hidden layer, log scale. "
    "A wide vertical spread between the layers is the vanishing (or exploding) gradient.",
    "activations": "Left: activation values over training (each layer's mean; band "
    "{band} of the first and the last layer shown; Glorot & Bengio's saturation picture). Right: the mean derivative φ'(z) of each activation against its "
    "largest possible value; backpropagation multiplies the gradient by it at every layer.",
    "saturation": "Share of activation entries in the flat tails (|φ'(z)| < 5% of its maximum) and "
    "share of ReLU-like units that are off for the whole batch (dead).",
    "temporal": "Gradient norm reaching each time step of a recurrent layer: a curve falling "
    "toward t = 0 is the gradient vanishing through time.",
    "update_ratio": "Size of each step's weight update relative to the weight, per weight "
    "matrix{matrices}. Matrices far below the others barely change.",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, fmt: str = "{:.3g}") -> str:
    """A number for a page (:func:`vanishing.report.formatting.stat_text`: a dash where it does
    not apply, never ``nan``; an infinity stays visible)."""
    spec = fmt[2:-1] if fmt.startswith("{:") and fmt.endswith("}") else ".3g"
    return _e(stat_text(value, spec))


def _metric(value: Any, name: Any) -> str:
    """A test or eval metric as everywhere else (:func:`vanishing.report.formatting.metric_text`)."""
    return _e(metric_text(value, name))


def _cell(value: Any) -> str:
    """A table cell of a statistic: a dash where it does not apply (missing or NaN); an
    infinity stays visible."""
    return _num(value)


def _img(fig: Any, alt: str) -> str:
    from vanishing.report.plots import png_bytes

    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _figure(fig: Any, name: str, caption: str) -> str:
    if fig is None:
        return ""
    return f"<figure>{_img(fig, name)}<figcaption>{_e(caption)}</figcaption></figure>"


def _kv_table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _page(title: str, subtitle: str, body: str, verdict: str = "") -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f'<h1>{_e(title)}</h1><p class="sub">{subtitle}</p>{verdict}{body}'
        '<p class="muted">Written by vanishing '
        f"{_e(_version())} on {_e(dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}."
        "</p></main></body></html>\n"
    )


def _version() -> str:
    from vanishing import __version__

    return __version__


# ---- diagnosis ------------------------------------------------------------------------------


def _diagnose(data: RunData) -> tuple[Any, str]:
    """The run's diagnosis (:meth:`vanishing.Run.diagnose`: a very large run is diagnosed from
    a sample of its steps, and its notes say so), reusing the page's bounded read."""
    import vanishing
    from vanishing.recorder import reader
    from vanishing.recorder.errors import RunError

    # once per run and page: the verdict and the detailed section both read it
    cached = data.__dict__.get("_page_diagnosis")
    if cached is not None:
        return cached
    total_rows = sum(p["rows"] for p in data.parts)
    try:
        if total_rows > reader.EXACT_DIAGNOSIS_ROWS:
            result = data.run.diagnose(), ""  # the page's sample of steps, already read
        else:
            result = vanishing.load_run(data.path).diagnose(), ""
    except RunError as e:  # nothing recorded yet
        result = None, str(e)
    data.__dict__["_page_diagnosis"] = result
    return result


def _diagnosis_html(diag: Any, note: str) -> str:
    if diag is None:
        return f'<p class="muted">No diagnosis: {_e(note)}</p>'
    from vanishing.diagnose.engine import NO_LAYERS

    parts = []
    if diag.healthy and NO_LAYERS in diag.notes:
        parts.append(f'<div class="finding warning"><b>Not judged</b>: {_e(NO_LAYERS)}.</div>')
    elif diag.healthy:
        parts.append(
            '<div class="healthy"><span class="badge ok">healthy</span>'
            "No gradient-flow problems found.</div>"
        )
    for f in diag.findings:
        sev = "critical" if f.severity == "critical" else "warning"
        layers = ", ".join(f.layers[:12]) + (
            f" … (+{len(f.layers) - 12})" if len(f.layers) > 12 else ""
        )
        evidence = "".join(
            f'<tr><td>{_e(k)}</td><td class="num">{_num(v, "{:.4g}")}</td></tr>'
            for k, v in f.evidence.items()
        )
        remedies = "".join(f"<li><b>{_e(r.name)}</b>: {_e(r.why)}</li>" for r in f.remedies)
        parts.append(
            f'<div class="finding {sev}"><span class="badge {sev}">{_e(f.severity)}</span>'
            f"<b>{_e(f.kind)}</b>: {_e(f.message)}"
            + (f"<div>layers: <code>{_e(layers)}</code></div>" if layers else "")
            + (f"<div><b>Cause</b>: {_e(f.cause)}</div>" if getattr(f, "cause", "") else "")
            + (
                f"<h3>Evidence</h3><table><tr><th>measure</th><th>value</th></tr>{evidence}</table>"
                if evidence
                else ""
            )
            + (
                f'<h3>Remedies (best first)</h3><ul class="remedies">{remedies}</ul>'
                if remedies
                else ""
            )
            + "</div>"
        )
    notes = [n for n in diag.notes if n != NO_LAYERS] + ([note] if note else [])
    if notes:
        parts.append("<ul>" + "".join(f'<li class="muted">{_e(n)}</li>' for n in notes) + "</ul>")
    return "".join(parts)


_KIND_WORDS = {"non_finite": "NaN or infinity"}


def _layers_phrase(layers: list[str]) -> str:
    quoted = [f"'{n}'" for n in layers]
    if not layers:
        return ""
    if len(layers) == 1:
        return f" in layer {quoted[0]}"
    if len(layers) <= 3:
        return f" in layers {', '.join(quoted[:-1])} and {quoted[-1]}"
    return f" in {len(layers)} layers, {quoted[0]} to {quoted[-1]}"


def verdict_sentence(diag: Any, note: str = "", *, below: bool = True) -> str:
    """The one-sentence verdict of a diagnosis, as the terminal's conclusion gives it: what is
    wrong, where, how bad and the best remedy (from the first finding), or that nothing is.

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.html import verdict_sentence
        >>> import vanishing
        >>> print(verdict_sentence(vanishing.load_run(example_run()).diagnose()))  # doctest: +ELLIPSIS
        Vanishing gradient (critical) in ... layers, ... best remedy: relu...
    """
    from vanishing.diagnose.engine import NO_LAYERS

    if diag is None:
        return f"No diagnosis: {note}." if note else "No diagnosis."
    if not diag.findings:
        if NO_LAYERS in diag.notes:
            return f"Not judged: {NO_LAYERS}."
        return "No gradient-flow problems found."
    f = diag.findings[0]
    what = _KIND_WORDS.get(f.kind, f.kind.replace("_", " "))
    text = f"{what[0].upper()}{what[1:]} ({f.severity}){_layers_phrase(list(f.layers))}"
    ratio = finite_or_none(f.evidence.get("first_to_last_ratio"))
    if ratio is not None:
        # named by the measure it was read from (the report's tables show the speed of
        # learning, which may differ): "error signal", "speed of learning", "weight gradient"
        prefix = "gradient through depth read from the "
        source = next((n[len(prefix) :] for n in diag.notes if n.startswith(prefix)), "")
        measure = source.split(" (")[0] or "gradient"
        text += f" (the first gets {ratio:.2g} of the last one's {measure})"
    if f.remedies:
        text += f"; best remedy: {f.remedies[0].name}"
    more = len(diag.findings) - 1
    if more:
        text += f" ({more} more finding{'s' if more > 1 else ''}{' below' if below else ''})"
    return text + "."


def _verdict_html(
    diag: Any, note: str = "", prefix: str = "", below: bool = True, then: str = ""
) -> str:
    from vanishing.diagnose.engine import NO_LAYERS

    if diag is None or (not diag.findings and NO_LAYERS in diag.notes):
        cls = "none"
    elif not diag.findings:
        cls = "ok"
    else:
        cls = "critical" if diag.findings[0].severity == "critical" else "warning"
    text = verdict_sentence(diag, note, below=below)
    if then and diag is not None and diag.findings:
        text = f"{text[:-1]}; {then}."
    return f'<p class="verdict {cls}"><b>Verdict</b>: {_e(prefix)}{_e(text)}</p>'


def _worst(
    datas: list[RunData],
    labels: list[str],
    kinds: list[Any],
    then: str = "",
    detailed: int | None = None,
) -> str:
    """The verdict of several runs: how many have problems and the sentence of one of them:
    the run the page shows in detail (``detailed``, :func:`most_informative`'s choice) when it
    has findings, so that the verdict and the section below it speak of the same run; else
    the worst (the first with a critical finding, else the first with any). ``then`` ends it.
    """
    judged = [i for i, k in enumerate(kinds) if k is not None]
    bad = [i for i in judged if kinds[i]]
    if not bad:
        if not judged:
            return _verdict_html(None, "no run has a diagnosis yet")
        return (
            '<p class="verdict ok"><b>Verdict</b>: No gradient-flow problems found in '
            f"{'any of the ' + str(len(judged)) + ' runs' if len(judged) > 1 else 'the run'}.</p>"
        )
    have = "has" if len(bad) == 1 else "have"
    count = f"{len(bad)} of {len(judged)} runs {have} gradient-flow problems"
    if detailed in bad:
        diag, _ = _diagnose(datas[detailed])
        if diag is not None and diag.findings:
            where = "the one in detail below" if len(bad) > 1 else "in detail below"
            prefix = f"{count}; {where}, {labels[detailed]}: "
            return _verdict_html(diag, "", prefix, below=False, then=then)
    diags = {}
    for i in bad:
        diags[i], _ = _diagnose(datas[i])
        if diags[i] is not None and any(f.severity == "critical" for f in diags[i].findings):
            break
    worst = next(
        (i for i, d in diags.items() if d and any(f.severity == "critical" for f in d.findings)),
        next((i for i, d in diags.items() if d and d.findings), bad[0]),
    )
    prefix = f"{count}; worst, {labels[worst]}: "
    return _verdict_html(diags.get(worst), "", prefix, below=False, then=then)


# ---- one run ----------------------------------------------------------------------------------


def _median(values: Any) -> float | None:
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else None


def _summary_rows(data: RunData, diag: Any) -> list[tuple[str, str]]:
    m = data.manifest
    summary = data.summary or {}
    loss = data.steps["loss"] if not data.steps.empty else []
    opt = m.get("optimizer") or {}
    rows = [
        ("run directory", f"<code>{_e(data.path)}</code>"),
        ("model", _e(m.get("model", "?")) + f" on {_e(m.get('device', '?'))}"),
        (
            "layers",
            f"{len(data.param_layers)} with parameters ({len(data.hidden)} hidden), "
            f"{len(data.activation_layers)} activations, {len(data.recurrent_layers)} recurrent",
        ),
        ("optimizer", _e(opt.get("type", "none"))),
        (
            "recorded steps",
            f"{len(data.step_list)}"
            + (f" (steps {data.step_list[0]}..{data.step_list[-1]})" if data.step_list else ""),
        ),
        ("status", _e(summary.get("status", m.get("status", "?")))),
    ]
    if len(loss):
        rows.append(("loss, first → last", f"{_num(loss.iloc[0])} → {_num(loss.iloc[-1])}"))
    ev = data.eval
    if ev is not None and {"step", "split", "loss", "metric"} <= set(ev.columns):
        name = str(ev["metric_name"].dropna().iloc[0]) if "metric_name" in ev else "metric"
        for split in sorted(set(ev["split"])):
            last = ev[ev["split"] == split].sort_values("step").iloc[-1]
            rows.append(
                (
                    f"{split} (eval at step {int(last['step'])})",
                    f"loss {_num(last['loss'], '{:.4g}')}, {_e(name)} {_metric(last['metric'], name)}",
                )
            )
    if summary.get("test_metric") is not None:
        rows.append(
            (
                f"test {summary.get('metric_name') or 'metric'}",
                _metric(summary["test_metric"], summary.get("metric_name")),
            )
        )
    ratio = data.first_last_ratio()
    if ratio is not None:
        rows.append((ratio_label(data.layer_info), _num(ratio, "{:.3g}")))
    damaged = data.run.damaged
    if damaged:
        rows.append(
            (
                "damaged run",
                '<span class="badge critical">damaged</span> '
                + _e("; ".join(str(d) for d in damaged)),
            )
        )
    if diag is not None:
        rows.append(("diagnosis", _verdict(diag)))
    elif not data.step_list:
        rows.append(("diagnosis", "none: no steps recorded"))
    return rows


def _verdict(diag: Any) -> str:
    """The one-cell verdict of a diagnosis: its kinds, "healthy", or why there is none."""
    from vanishing.diagnose.engine import NO_LAYERS

    if diag.findings:
        return _e(", ".join(diag.kinds))
    return f"not judged: {_e(NO_LAYERS)}" if NO_LAYERS in diag.notes else "healthy"


def _layer_table(data: RunData) -> str:
    """Every module in forward order under its qualified name; under a module whose weight
    matrices are not one plain ``weight`` (a stacked LSTM's ``weight_ih_l0`` ... ``weight_hh_l1``,
    attention's ``in_proj_weight``), one row per matrix with its stacked layer (``l0``, ``l1``).
    A dash where a statistic does not apply."""
    last = data.profile_steps()[-1:] if data.step_list else []
    speed = data.speed().mean
    cols = {
        "err": data.at_steps("error_norm", None, last),
        "deriv": data.at_steps("act_deriv_mean", None, last),
        "sat": data.at_steps("act_saturated", None, last),
        "dead": data.at_steps("act_dead", None, last),
    }
    weights = {
        "grad": data.weight_at_steps("grad_norm", last),
        "upd": data.weight_at_steps("update_ratio", last),
    }

    def at(table: Any, name: str) -> str:
        if table.empty or name not in table.columns:
            return DASH
        return _cell(table[name].iloc[-1])

    matrices: dict[str, list[tuple[str, str]]] = {}
    for label, module, param in data.weight_params:
        matrices.setdefault(module, []).append((label, param))

    def row(name: str, kind: str, role: str, act: str, params: str, med: Any, w: str) -> str:
        return (
            f"<tr><td><code>{_e(name)}</code></td><td>{_e(kind)}</td><td>{_e(role)}</td>"
            f'<td>{_e(act)}</td><td class="num">{params}</td><td class="num">{_cell(med)}</td>'
            f'<td class="num">{at(weights["grad"], w)}</td>'
            f'<td class="num">{at(cols["err"], name) if kind else DASH}</td>'
            f'<td class="num">{at(weights["upd"], w)}</td>'
            + "".join(
                f'<td class="num">{at(cols[k], name) if kind else DASH}</td>'
                for k in ("deriv", "sat", "dead")
            )
            + "</tr>"
        )

    rows = []
    for info in data.layer_info:
        name = info["name"]
        med = _median(speed[name].to_numpy(float)) if name in speed.columns else None
        own = matrices.get(name, [])
        plain = [label for label, param in own if param == "weight"]
        rows.append(
            row(
                name,
                info.get("type", ""),
                info.get("role", ""),
                info.get("activation") or "",
                f"{int(info.get('num_params', 0) or 0):,}",
                med,
                plain[0] if plain else "",
            )
        )
        shown = set()
        for label, param in own:
            if param == "weight":
                continue
            stacked = recurrent_layer_of(param)
            role = f"layer {stacked}" if stacked else "weight matrix"
            # a stacked layer's speed (speed_units: ``rnn.l1``) on its first matrix's row
            unit = param_unit(name, param)
            med = None
            if unit != name and unit in speed.columns and unit not in shown:
                shown.add(unit)
                med = _median(speed[unit].to_numpy(float))
            rows.append(row(label, "", role, "", "", med, label))
    step = f" (step {last[0]})" if last else ""
    head = (
        "<tr><th>module / weight matrix</th><th>type</th><th>role</th><th>activation</th>"
        "<th>params</th><th>speed of learning ‖∂C/∂b‖ (median)</th><th>‖∂L/∂W‖"
        + _e(step)
        + "</th><th>error ‖∂L/∂h‖</th><th>‖ΔW‖/‖W‖</th><th>mean φ'(z)</th><th>saturated</th>"
        "<th>dead</th></tr>"
    )
    return f'<div class="scroll"><table>{head}{"".join(rows)}</table></div>'


def _json_block(title: str, value: Any) -> str:
    if value is None:
        return ""
    text = json.dumps(value, indent=2, sort_keys=False, default=str)
    return f"<h3>{_e(title)}</h3><pre>{_e(text)}</pre>"


def _caption(name: str, data: RunData, fig: Any = None) -> str:
    """The caption of a run plot, saying only what this run's plot draws."""
    from vanishing.report.plots import _downsampled, activation_band

    if name == "loss":
        text = "Training loss per step"
        if _downsampled(data.loss()):
            text += " (band: min..max within a time bucket)"
        ev = data.eval
        if ev is not None and not ev.empty:
            metric = "metric"
            if "metric_name" in ev and ev["metric_name"].notna().any():
                metric = str(ev["metric_name"].dropna().iloc[0])
            text += f", and the evaluation loss and {metric} of each split (eval.parquet)"
        return text + "."
    if name == "activations":
        return _CAPTIONS[name].format(band=activation_band(data))
    if name in ("depth_profile", "update_ratio"):
        return _CAPTIONS[name].format(matrices=_matrices_note(data))
    if name == "saturation" and fig is not None:  # the panels drawn: saturated, dead, or both
        titles = [ax.get_title() for ax in fig.axes]
        parts = []
        if any(t.startswith("Saturated") for t in titles):
            parts.append(
                "Share of activation entries in the flat tails (|φ'(z)| < 5% of its maximum)"
            )
        if any(t.startswith("Dead") for t in titles):
            parts.append("share of ReLU-like units that are off for the whole batch (dead)")
        if parts:
            text = " and ".join(parts) + "."
            return text[0].upper() + text[1:]
    return _CAPTIONS.get(name, "")


def _matrices_note(data: RunData) -> str:
    """What the weight views draw beyond plain ``weight``s, for their captions ("" if nothing)."""
    others = [label for label, _, param in data.weight_params if param != "weight"]
    if not others:
        return ""
    stacked = any(recurrent_layer_of(p) for _, _, p in data.weight_params)
    what = (
        "each stacked recurrent layer's input and recurrent matrices (weight_ih_lK, weight_hh_lK)"
        if stacked
        else "matrices such as attention's in_proj_weight"
    )
    return f"; {what} each drawn apart, named module.parameter"


def _run_plots(data: RunData) -> str:
    from vanishing.report.plots import RUN_PLOTS

    out = []
    for name, fn in RUN_PLOTS:
        fig = fn(data)
        out.append(_figure(fig, name, _caption(name, data, fig) if fig is not None else ""))
    return "".join(out)


def render_run(path: str | os.PathLike, *, data: RunData | None = None) -> str:
    """The HTML page of one run directory.

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.html import render_run
        >>> page = render_run(example_run())
        >>> page.startswith("<!DOCTYPE html>"), "vanishing_gradient" in page
        (True, True)
    """
    data = data or RunData(path)
    diag, note = _diagnose(data)
    title = (data.config or {}).get("name") or data.path.name
    m = data.manifest
    config_parts = (
        _json_block("config.json", data.config)
        + _json_block("summary.json", data.summary)
        + _json_block(
            "monitor (manifest.json)",
            {
                k: m.get(k)
                for k in (
                    "created",
                    "status",
                    "stats",
                    "schedule",
                    "flush_every",
                    "optimizer",
                    "amp_scaler",
                    "memory",
                    "steps_completed",
                    "versions",
                )
            },
        )
    )
    body = (
        "<h2>Summary</h2>"
        + _kv_table(_summary_rows(data, diag))
        + "<h2>Diagnosis</h2>"
        + _diagnosis_html(diag, note)
        + "<h2>Plots</h2>"
        + _run_plots(data)
        + "<h2>Layers (forward order)</h2>"
        + _layer_table(data)
        + "<h2>Configuration</h2>"
        + (config_parts or '<p class="muted">No config.json.</p>')
    )
    return _page(
        f"vanishing report: {title}",
        f"Run <code>{_e(data.path)}</code>",
        body,
        _verdict_html(diag, note),
    )


# ---- several runs -----------------------------------------------------------------------------


def _run_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and (p / "manifest.json").is_file())


def _overview_row(data: RunData, label: str) -> tuple[str, dict[str, Any]]:
    summary = data.summary or {}
    kinds = summary.get("kinds")
    verdict = None
    if not data.step_list:
        verdict = "no steps recorded"
    elif kinds is None:
        diag, _ = _diagnose(data)
        kinds = None if diag is None else diag.kinds
        verdict = None if diag is None else _verdict(diag)
    loss = data.steps["loss"] if not data.steps.empty else []
    metric, metric_name = summary.get("test_metric"), summary.get("metric_name")
    if metric is None and data.eval is not None:
        ev = data.eval[data.eval["split"] == "test"]
        metric = ev.sort_values("step")["metric"].iloc[-1] if not ev.empty else None
        if "metric_name" in ev and ev["metric_name"].notna().any():
            metric_name = str(ev["metric_name"].dropna().iloc[0])
    ratio = data.first_last_ratio()
    row = (
        f"<tr><td><code>{_e(label)}</code></td><td>{_e(summary.get('status', data.manifest.get('status', '')))}</td>"
        f'<td class="num">{len(data.step_list)}</td>'
        f'<td class="num">{_num(loss.iloc[-1]) if len(loss) else "—"}</td>'
        f'<td class="num">{_metric(metric, metric_name)}</td><td class="num">{_num(ratio)}</td>'
        f"<td>{verdict or _e(_sweep_verdict(kinds, {}))}</td></tr>"
    )
    return row, {"ratio": ratio, "kinds": kinds}


def most_informative(kinds: list[Any], ratios: list[Any]) -> tuple[int, str] | None:
    """Which of several runs to show in detail, and why, in words: among the runs with
    findings (all runs when none has any), the one whose first / last speed-of-learning ratio
    is furthest from 1 (in decades, either way): the clearest case of a gradient that does not
    flow evenly. None when there is no run.

    Example:
        >>> from vanishing.report.html import most_informative
        >>> most_informative([[], ["vanishing_gradient"], ["vanishing_gradient"]], [0.9, 1e-3, 1e-6])
        (2, 'of the 2 runs with findings, the one whose first / last ratio is furthest from 1 (1e-06)')
    """
    import math

    if not kinds:
        return None

    def decades(r: Any) -> float:
        v = finite_or_none(r)
        return abs(math.log10(v)) if v is not None and v > 0 else -1.0

    flagged = [i for i, k in enumerate(kinds) if k]
    pool = flagged or list(range(len(kinds)))
    best = max(pool, key=lambda i: (decades(ratios[i]), -i))
    ratio = finite_or_none(ratios[best])
    far = (
        f"the one whose first / last ratio is furthest from 1 ({ratio:.2g})"
        if ratio is not None
        else "the first"
    )
    if len(pool) == 1:
        return best, ("the only run with findings" if flagged else "the only run")
    if flagged:
        return best, f"of the {len(pool)} runs with findings, {far}"
    return best, f"no run has findings; {far}"


def _detail(data: RunData, label: str, why: str, report: str | None = None) -> str:
    """The section of the run shown in full on a page of several runs."""
    diag, note = _diagnose(data)
    link = f' (<a href="{_e(report)}">its own report</a>)' if report else ""
    return (
        f"<h2>Run in detail: {_e(label)}</h2>"
        f'<p class="muted">Why this run: {_e(why)}{link}.</p>'
        + "<h3>Diagnosis</h3>"
        + _diagnosis_html(diag, note)
        + _run_plots(data)
        + "<h3>Layers (forward order)</h3>"
        + _layer_table(data)
    )


_OVERVIEW_HEAD = (
    "<tr><th>run</th><th>status</th><th>steps</th><th>last loss</th><th>test metric</th>"
    "<th>speed of learning first / last hidden</th><th>diagnosis</th></tr>"
)


def _measured_fix(path: Path) -> str | None:
    """The remedy a repair beside the runs (``repair.json``, as ``vanishing demo`` writes it)
    measured to fix the baseline; None without one or when it fixed nothing."""
    try:
        best = json.loads((path / "repair.json").read_text()).get("best")
    except (OSError, ValueError, AttributeError):
        return None
    return str(best) if best else None


def render_collection(path: str | os.PathLike, *, max_runs_shown: int = 20) -> str:
    """The HTML page of a directory whose subdirectories are runs (e.g. a ``vanishing demo``):
    a table across runs, a comparison plot, the most informative run in full
    (:func:`most_informative`) and the depth profile of each of the first ``max_runs_shown``
    runs.

    Example:
        >>> page = render_collection("runs/demo-20260101-120000")   # doctest: +SKIP
    """
    from vanishing.report.plots import depth_profile, speed_by_layer

    path = Path(path)
    dirs = _run_dirs(path)
    datas = [RunData(d) for d in dirs]
    labels = [
        (d.config or {}).get("name") or (d.summary or {}).get("label") or d.path.name for d in datas
    ]
    overview = [_overview_row(d, label) for d, label in zip(datas, labels)]
    rows = [row for row, _ in overview]
    fixed = _measured_fix(path)
    chosen = most_informative(
        [info["kinds"] for _, info in overview], [info["ratio"] for _, info in overview]
    )
    verdict = _worst(
        datas,
        labels,
        [info["kinds"] for _, info in overview],
        then=f"the fix measured to work: {fixed} (repair.html)" if fixed else "",
        detailed=chosen[0] if chosen is not None else None,
    )
    body = []
    conclusion = path / "conclusion.txt"  # written by vanishing demo beside its runs
    if conclusion.is_file():
        paragraphs = [p for p in conclusion.read_text().split("\n\n") if p.strip()]
        body.append("<h2>Conclusion</h2>" + "".join(f"<p>{_e(p.strip())}</p>" for p in paragraphs))
    if (path / "repair.html").is_file():
        body.append(
            '<p><a href="repair.html">The repair: every candidate remedy, measured before and '
            "after</a></p>"
        )
    body += ['<h2>Runs</h2><div class="scroll"><table>', _OVERVIEW_HEAD, *rows, "</table></div>"]
    body.append("<h2>Comparison</h2>")
    body.append(
        _figure(
            speed_by_layer(datas[:max_runs_shown], labels[:max_runs_shown]),
            "speed_by_layer",
            "Median speed of learning of each hidden layer, one line per run. A line "
            "that falls steeply toward the first hidden layer (left) is a vanishing gradient.",
        )
    )
    if chosen is not None:
        i, why = chosen
        body.append(_detail(datas[i], labels[i], why))
        body.append(_json_block("config.json", datas[i].config))
    if len(datas) > 1:
        body.append("<h2>Depth profiles of the other runs</h2>")
        others = [j for j in range(len(datas)) if chosen is None or j != chosen[0]]
        if len(others) > max_runs_shown:
            body.append(f'<p class="muted">first {max_runs_shown} of {len(others)} runs</p>')
        for d, label in ((datas[j], labels[j]) for j in others[:max_runs_shown]):
            body.append(f"<h3>{_e(label)}</h3>")
            body.append(_figure(depth_profile(d), "depth_profile", _caption("depth_profile", d)))
    return _page(
        f"vanishing report: {path.name}",
        f"{len(datas)} runs in <code>{_e(path)}</code>",
        "".join(body),
        verdict,
    )


def representative_runs(params: list[dict[str, Any]], limit: int = 12) -> tuple[list[int], str]:
    """Which runs of a sweep to draw in one comparison plot: one per combination of the swept
    values (its first seed), all of them when there are at most ``limit``; else ``limit`` of
    them chosen so that every value of every swept field appears at least once (each pick
    adds the most values not shown yet), the rest evenly spread over the grid. Returns the
    indices (grid order) and how they were chosen, in words.

    Example:
        >>> from vanishing.report.html import representative_runs
        >>> grid = [{"depth": d, "act": a, "seed": s} for d in (2, 5, 10, 20) for a in ("relu", "tanh")
        ...         for s in (0, 1)]
        >>> idx, how = representative_runs(grid, limit=4)
        >>> sorted({grid[i]["depth"] for i in idx}), sorted({grid[i]["act"] for i in idx}), how
        ([2, 5, 10, 20], ['relu', 'tanh'], '4 of the 8 combinations of swept values (first seed of each), chosen so that every swept value appears')
    """
    combos: dict[str, int] = {}
    for i, p in enumerate(params):
        key = json.dumps({k: v for k, v in p.items() if k != "seed"}, sort_keys=True, default=str)
        combos.setdefault(key, i)
    picks = list(combos.values())
    if len(picks) <= limit:
        seeds = " (first seed of each)" if any("seed" in p for p in params) else ""
        return picks, f"one run per combination of swept values{seeds}: all {len(picks)}"

    def values(i: int) -> set[tuple[str, str]]:
        return {(k, json.dumps(v, default=str)) for k, v in params[i].items() if k != "seed"}

    chosen: list[int] = []
    missing = set().union(*(values(i) for i in picks))
    while missing and len(chosen) < limit:
        best = max((i for i in picks if i not in chosen), key=lambda i: len(values(i) & missing))
        chosen.append(best)
        missing -= values(best)
    rest = [i for i in picks if i not in chosen]
    step = max(len(rest) / max(limit - len(chosen), 1), 1.0)
    chosen += [rest[int(k * step)] for k in range(min(limit - len(chosen), len(rest)))]
    how = (
        f"{len(chosen)} of the {len(picks)} combinations of swept values (first seed of each), "
        + ("chosen so that every swept value appears" if not missing else "as many values as fit")
    )
    return sorted(chosen), how


def _run_reports(sweep: Path, rows: list[dict[str, Any]]) -> None:
    """Each finished run's own report.html, written where missing or older than the run's
    summary.json; a run whose report fails keeps its records (the sweep page says nothing)."""
    for r in rows:
        run_dir = sweep / r["run_dir"]
        summary, page = run_dir / "summary.json", run_dir / "report.html"
        if not r["summary"] or not (run_dir / "manifest.json").is_file():
            continue
        if page.is_file() and summary.is_file() and page.stat().st_mtime >= summary.stat().st_mtime:
            continue
        try:
            write_page(page, render_run(run_dir))
        except Exception:  # noqa: BLE001 - one unreadable run must not cost the sweep its page
            continue


def render_sweep(
    path: str | os.PathLike, *, max_runs_shown: int = 12, page_dir: str | os.PathLike | None = None
) -> str:
    """The HTML page of a sweep directory (sweep.sqlite): every run's parameters and results
    (each linked to its own report.html where it has one), the metrics against the swept field
    per remedy, a comparison plot that represents every swept value
    (:func:`representative_runs`) and the most informative run in detail
    (:func:`most_informative`). ``page_dir``: where the page will be written (default: the
    sweep directory), for the links.

    Example:
        >>> page = render_sweep("sweeps/depth")   # doctest: +SKIP
    """
    from vanishing.experiments.store import read_sweep
    from vanishing.report.plots import speed_by_layer, sweep_metric

    path = Path(path)
    page_dir = Path(page_dir) if page_dir is not None else path
    rows = read_sweep(path)
    fields = list(dict.fromkeys(k for r in rows for k in r["params"] if k != "seed"))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1

    def report_link(r: dict[str, Any]) -> str | None:
        page = path / r["run_dir"] / "report.html"
        return os.path.relpath(page, page_dir) if page.is_file() else None

    head = "".join(f"<th>{_e(f)}</th>" for f in fields)
    table = [
        '<div class="scroll"><table><tr><th>run</th>',
        head,
        "<th>seed</th><th>status</th><th>test metric</th><th>test loss</th>"
        "<th>first / last</th><th>diagnosis</th></tr>",
    ]
    for r in rows:
        s = r["summary"] or {}
        kinds = r["kinds"] if r["kinds"] is not None else s.get("kinds")
        cells = "".join(f"<td>{_e(_value(r['params'].get(f)))}</td>" for f in fields)
        name = Path(r["run_dir"]).name
        link = report_link(r)
        run_cell = (
            f'<a href="{_e(link)}"><code>{_e(name)}</code></a>'
            if link
            else f"<code>{_e(name)}</code>"
        )
        table.append(
            f"<tr><td>{run_cell}</td>{cells}"
            f'<td class="num">{_e(r["seed"])}</td>'
            f"<td>{_e(r['status'])}</td>"
            f'<td class="num">{_metric(s.get("test_metric"), s.get("metric_name"))}</td>'
            f'<td class="num">{_num(s.get("test_loss"), "{:.4g}")}</td>'
            f'<td class="num">{_num(s.get("first_last_ratio"))}</td>'
            f"<td>{_e(_sweep_verdict(kinds, s))}</td></tr>"
        )
    table.append("</table></div>")
    body = [
        "<h2>Summary</h2>",
        _kv_table(
            [
                ("sweep directory", f"<code>{_e(path)}</code>"),
                ("runs", _e(", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none")),
                ("swept fields", _e(", ".join(fields) or "none")),
            ]
        ),
        "<h2>Results</h2>",
    ]
    many_seeds = len({r["seed"] for r in rows}) > 1
    spread = "; band: min..max over seeds" if many_seeds else ""
    metric_names = {(r["summary"] or {}).get("metric_name") for r in rows} - {None}
    shown = f"test {next(iter(metric_names))}" if len(metric_names) == 1 else "test metric"
    for metric, caption in (
        (
            "test_metric",
            f"{shown[0].upper()}{shown[1:]} against the swept field, one line per "
            f"combination of the other swept fields{spread}.",
        ),
        (
            "first_last_ratio",
            "Speed of learning of the first over the last hidden layer (1 = "
            f"even learning; far below 1 = vanishing){spread}.",
        ),
    ):
        body.append(_figure(sweep_metric(path, metric), metric, caption))
    body.append("<h2>Runs</h2>")
    if any(report_link(r) for r in rows):
        body.append('<p class="muted">Each run\'s name links to its own report.</p>')
    body += table
    finished = [
        r for r in rows if r["summary"] and (path / r["run_dir"] / "manifest.json").is_file()
    ]
    # one definition of a finished run's findings: the detailed run and the verdict use it
    finished_kinds = [
        r["kinds"] if r["kinds"] is not None else (r["summary"] or {}).get("kinds")
        for r in finished
    ]
    # one RunData per run: its diagnosis is then computed once for the verdict and the detail
    finished_datas = [RunData(path / r["run_dir"]) for r in finished]
    detailed = None
    if finished:
        picked, how = representative_runs([r["params"] for r in finished], max_runs_shown)
        shown = [finished[i] for i in picked]
        datas = [finished_datas[i] for i in picked]
        body.append("<h2>Comparison</h2>")
        body.append(
            _figure(
                speed_by_layer(datas, [_sweep_label(r) for r in shown]),
                "speed_by_layer",
                f"Median speed of learning of each hidden layer, one line per run: {how}.",
            )
        )
        ratios = [(r["summary"] or {}).get("first_last_ratio") for r in finished]
        detailed, why = most_informative(finished_kinds, ratios)
        r = finished[detailed]
        body.append(_detail(finished_datas[detailed], _sweep_label(r), why, report_link(r)))
    toml = path / "sweep.toml"
    if toml.is_file():
        body.append(f"<h2>Configuration</h2><h3>sweep.toml</h3><pre>{_e(toml.read_text())}</pre>")
    verdict = (
        _worst(
            finished_datas,
            [_sweep_label(r) for r in finished],
            finished_kinds,
            detailed=detailed,
        )
        if finished
        else _verdict_html(None, "no run of the sweep has finished")
    )
    return _page(
        f"vanishing sweep report: {path.name}",
        f"Sweep <code>{_e(path)}</code>",
        "".join(body),
        verdict,
    )


def _value(v: Any) -> str:
    """A swept value as written in the table: strings without quotes."""
    return v if isinstance(v, str) else json.dumps(v)


def _sweep_label(r: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["params"].items()) or r["key"]


def _sweep_verdict(kinds: Any, summary: dict[str, Any]) -> str:
    if summary and summary.get("steps") == 0:  # e.g. failed before its first step
        return "no steps recorded"
    if kinds:
        return ", ".join(kinds)
    return "healthy" if kinds is not None else "—"


# ---- entry point ------------------------------------------------------------------------------


def target_kind(target: str | os.PathLike) -> str:
    """``"run"``, ``"sweep"`` or ``"runs"`` (a directory of run directories).

    Example:
        >>> import tempfile
        >>> from vanishing.report.html import target_kind
        >>> target_kind(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        ValueError: ...: not a run directory, a sweep directory (sweep.sqlite) or a directory of run directories
    """
    p = Path(target)
    if not p.is_dir():
        raise ValueError(f"{p}: no such directory")
    if (p / "manifest.json").is_file():
        return "run"
    if (p / "sweep.sqlite").is_file():
        return "sweep"
    if _run_dirs(p):
        return "runs"
    raise ValueError(
        f"{p}: not a run directory, a sweep directory (sweep.sqlite) or a directory of run directories"
    )


def write_report(target: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the self-contained HTML report of ``target`` and return its path.

    ``target``: a run directory, a sweep directory (has sweep.sqlite), or a directory whose
    subdirectories are run directories (the output of ``vanishing demo``). ``out`` defaults to
    ``<target>/report.html``. For a sweep, each finished run also gets its own report.html
    (where it has none, or an older one than its results), linked from the sweep's page.

    Example:
        >>> import torch, tempfile, vanishing
        >>> from vanishing.report.html import write_report
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with vanishing.watch(model, optimizer=opt, run_dir=tempfile.mkdtemp() + "/r") as mon:
        ...     for _ in range(3):
        ...         opt.zero_grad(); model(torch.randn(16, 4)).pow(2).mean().backward(); opt.step()
        >>> page = write_report(mon.run_dir)
        >>> page.name, "<img" in page.read_text()
        ('report.html', True)
    """
    kind = target_kind(target)
    p = Path(target)
    if kind == "run":
        text = render_run(p)
    elif kind == "sweep":
        from vanishing.experiments.store import read_sweep

        _run_reports(p, read_sweep(p))  # each run's own page, linked from the sweep's
        dest = Path(out) if out is not None else p / "report.html"
        text = render_sweep(p, page_dir=dest.parent)
    else:
        text = render_collection(p)
    return write_page(Path(out) if out is not None else p / "report.html", text)


def write_page(dest: str | os.PathLike, text: str) -> Path:
    """Write an HTML page to ``dest`` (its folder made as needed) and return the path; a
    directory as ``dest`` is a ValueError."""
    dest = Path(dest)
    if dest.is_dir():
        raise ValueError(f"{dest}: is a directory; pass a file name such as {dest / 'report.html'}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    from vanishing.recorder.writer import atomic_write_bytes

    # an exclusive temporary file under an unpredictable name: nothing planted is followed
    atomic_write_bytes(dest, text.encode("utf-8"))
    return dest


def render_compare(paths: list[str | os.PathLike], labels: list[str] | None = None) -> str:
    """The HTML page comparing runs that live anywhere: one summary table, the speed of
    learning of every run through depth, then each run's depth profile and diagnosis side by
    side.

    Example:
        >>> from vanishing.report.data import example_run
        >>> from vanishing.report.html import render_compare
        >>> page = render_compare([example_run(), example_run("rnn")], ["mlp", "rnn"])
        >>> page.count('<div class="card">')
        2
    """
    from vanishing.report.data import distinct_labels
    from vanishing.report.plots import depth_profile, speed_by_layer

    datas = [RunData(p) for p in paths]
    labels = list(labels) if labels is not None else distinct_labels([d.path for d in datas])
    overview = [_overview_row(d, label) for d, label in zip(datas, labels)]
    rows = [row for row, _ in overview]
    verdict = _worst(datas, labels, [info["kinds"] for _, info in overview])
    body = ['<h2>Summary</h2><div class="scroll"><table>', _OVERVIEW_HEAD, *rows, "</table></div>"]
    body.append(
        _figure(
            speed_by_layer(datas, labels),
            "speed_by_layer",
            "Median speed of learning of each hidden layer, one line per run. A line "
            "that falls steeply toward the first hidden layer (left) is a vanishing gradient.",
        )
    )
    body.append(
        "<h2>Depth profiles and diagnoses</h2>"
        f'<p class="muted">{_e(_caption("depth_profile", next((d for d in datas if _matrices_note(d)), datas[0])))}</p><div class="side">'
    )
    for d, label in zip(datas, labels):
        diag, note = _diagnose(d)
        fig = depth_profile(d)
        body.append(
            f'<div class="card"><h3><code>{_e(label)}</code></h3>'
            + (
                f"<figure>{_img(fig, 'depth_profile')}</figure>"
                if fig is not None
                else '<p class="muted">No depth profile: no layer gradients recorded.</p>'
            )
            + _diagnosis_html(diag, note)
            + "</div>"
        )
    body.append("</div>")
    return _page(
        f"vanishing compare: {len(datas)} runs",
        ", ".join(f"<code>{_e(d.path)}</code>" for d in datas),
        "".join(body),
        verdict,
    )
