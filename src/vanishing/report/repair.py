"""The HTML page of a :class:`vanishing.repair.Repair`: what was tried, what it did, before/after.

One self-contained page in the report's style: the verdict (the fix measured to work, or why
there is none), every candidate's verdict with its loss and first/last ratio before and after,
the gradient profile through depth of the baseline beside the candidates that fixed or improved
it, and the best one's change as code.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from vanishing.repair import Candidate, Repair
    >>> from vanishing.report.repair import write_repair
    >>> rep = Repair(healthy=False, steps=10, loss_before=2.3, ratio_before=1e-3,
    ...              profile_before={"0": 1e-4, "2": 1e-2},
    ...              candidates=[Candidate("relu", True, verdict="fixed", loss_before=2.3,
    ...                  loss_after=0.4, ratio_before=1e-3, ratio_after=0.7,
    ...                  profile_after={"0": 0.5, "2": 0.7}, code="...")])
    >>> "relu" in write_repair(rep, Path(tempfile.mkdtemp()) / "repair.html").read_text()
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vanishing.report.html import _e, _img, _num, _page, write_page

__all__ = ["render_repair", "write_repair", "profile_figure"]

_SHOWN = 4  # candidates drawn beside the baseline: more lines stop being readable


def profile_figure(rep: Any) -> Any:
    """The gradient profile through depth (log scale, first hidden layer left) of the baseline
    and of up to four candidates that fixed or improved it; None without profiles.

    Example:
        >>> profile_figure(rep).axes[0].get_yscale()   # doctest: +SKIP
        'log'
    """
    from matplotlib.figure import Figure

    shown = [c for c in rep.candidates if c.verdict in ("fixed", "improved") and c.profile_after]
    if not rep.profile_before and not shown:
        return None
    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    ax = fig.subplots()
    import numpy as np

    from vanishing.report.plots import _axis_label, _name_ticks

    lines = [("baseline", rep.profile_before, "k")]
    lines += [(f"{c.label} ({c.verdict})", c.profile_after, None) for c in shown[:_SHOWN]]
    base = [k for k, v in (rep.profile_before or {}).items() if v is not None and v > 0]
    for label, profile, color in lines:
        values = [v for v in profile.values() if v is not None and v > 0]
        if not values:
            continue
        # the baseline's layers name the axis; a candidate that adds or renames layers (a
        # residual wrapper, an inserted norm) is spread over the same first-to-last span
        n = len(base) or len(values)
        x = np.arange(n) if len(values) == n else np.linspace(0, n - 1, len(values))
        ax.plot(x, values, marker="o", ms=3, label=label, color=color)
    ax.set_yscale("log")
    if base:
        _name_ticks(ax, list(range(len(base))), base)
        ax.set_xlabel(_axis_label("hidden layer of the baseline", base), fontsize=8)
    ax.set_ylabel("gradient norm")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def render_repair(rep: Any, *, title: str = "Repair") -> str:
    """The page as a string (see the module doc).

    Example:
        >>> from vanishing.repair import Repair
        >>> from vanishing.report.repair import render_repair
        >>> "Nothing to repair" in render_repair(Repair(healthy=True, steps=5))
        True
    """
    if rep.healthy:
        verdict = (
            '<p class="verdict ok"><b>Verdict</b>: Nothing to repair: the diagnosis found no '
            "gradient-flow problem.</p>"
        )
        return _page(title, "vanishing.repair", "", verdict)
    kinds = ", ".join(dict.fromkeys(f.kind for f in rep.baseline_findings)) or "none"
    best = rep.best
    if best is not None:
        verdict = (
            f'<p class="verdict ok"><b>Verdict</b>: {_e(best.label)} fixes it: {_e(kinds)} '
            f"gone, loss {_num(best.loss_before)} -> {_num(best.loss_after)}, first / last "
            f"{_num(best.ratio_before)} -> {_num(best.ratio_after)} over {rep.steps} steps.</p>"
        )
    else:
        verdict = (
            f'<p class="verdict critical"><b>Verdict</b>: no candidate fixed {_e(kinds)} in '
            f"{rep.steps} steps.</p>"
        )
    rows = "".join(
        f"<tr><td><code>{_e(c.label)}</code>{'' if c.changes_model else ' (loop)'}</td>"
        f"<td>{_e(c.verdict)}</td>"
        f'<td class="num">{_num(c.loss_before)} → {_num(c.loss_after)}</td>'
        f'<td class="num">{_num(c.ratio_before)} → {_num(c.ratio_after)}</td>'
        f"<td>{_e(c.description)}</td></tr>"
        for c in rep.candidates
    )
    body = (
        f"<h2>Candidates</h2><p>Each remedy applied to a copy of the model and trained "
        f"{rep.steps} steps on the same batches with the same seed; loss: the mean of the last "
        f"10% of the steps; first / last: the first hidden layer's gradient over the last's. "
        f"Best first.</p><table><thead><tr><th>remedy</th><th>verdict</th><th>loss</th>"
        f"<th>first / last</th><th>what changed</th></tr></thead><tbody>{rows}</tbody></table>"
    )
    if rep.skipped:
        body += (
            "<ul>"
            + "".join(
                f'<li class="muted">{_e(r)} not tried: {_e(why)}</li>' for r, why in rep.skipped
            )
            + "</ul>"
        )
    fig = profile_figure(rep)
    if fig is not None:
        body += (
            f"<h2>Through depth, before and after</h2><figure>"
            f"{_img(fig, 'gradient profile before and after')}<figcaption>Gradient norm of each "
            "hidden layer (log scale) at the end of the probe: the baseline and the candidates "
            "that fixed or improved it. A flat line is a gradient that reaches the first layers."
            "</figcaption></figure>"
        )
    if best is not None and best.code:
        body += f"<h2>The change, as code</h2><pre>{_e(best.code)}</pre>"
    return _page(title, f"vanishing.repair, {rep.steps} steps per candidate", body, verdict)


def write_repair(rep: Any, dest: str | os.PathLike, *, title: str = "Repair") -> Path:
    """Write :func:`render_repair` to ``dest`` atomically; returns the path.

    Example:
        >>> write_repair(rep, "repair.html")   # doctest: +SKIP
    """
    return write_page(dest, render_repair(rep, title=title))
