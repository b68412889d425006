"""The gallery page of ``vanishing reproduce all``: every reproduction's checks, tables and plots.

One self-contained HTML file (plots embedded as PNG data URIs, no script, the report's style and
content security policy), written atomically beside the reproductions' own folders.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from vanishing.experiments.reproductions.base import Check, Reproduction
    >>> from vanishing.report.gallery import write_gallery
    >>> r = Reproduction("x", "A title", "Someone 2010", [Check.below("MSE", published=0.1, measured=0.05, limit=0.1)])
    >>> page = write_gallery([r], Path(tempfile.mkdtemp()) / "index.html")
    >>> "A title" in page.read_text()
    True
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vanishing.report.html import _e, _page, write_page

if TYPE_CHECKING:
    from vanishing.experiments.reproductions.base import Reproduction

__all__ = ["render_gallery", "write_gallery"]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _checks(result: Reproduction) -> str:
    rows = "".join(
        f'<tr><td>{_e(c.what)}</td><td class="num">{_e(_value(c.published))}</td>'
        f'<td class="num">{_e(_value(c.measured))}</td><td class="num">{_e(c.tolerance)}</td>'
        f"<td>{'yes' if c.ok else '<strong>no</strong>'}</td></tr>"
        for c in result.checks
    )
    return (
        "<table><thead><tr><th>check</th><th>published</th><th>measured</th>"
        f"<th>tolerance</th><th>ok</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _tables(result: Reproduction) -> str:
    parts = []
    for table in result.tables:
        head = "".join(f"<th>{_e(h)}</th>" for h in table.header)
        body = "".join(
            "<tr>" + "".join(f'<td class="num">{_e(c)}</td>' for c in row) + "</tr>"
            for row in table.cells()
        )
        parts.append(
            f"<h3>{_e(table.title)}</h3><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>"
        )
    return "".join(parts)


def _plots(result: Reproduction) -> str:
    parts = []
    for path in result.plots:
        path = Path(path)
        if path.suffix.lower() != ".png" or not path.is_file():
            continue  # the SVG twin of each PNG is on disk; one embedded copy is enough
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img alt="{_e(path.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(path.name)}</figcaption></figure>"
        )
    return "".join(parts)


def render_gallery(results: list[Reproduction], *, seconds: dict[str, float] | None = None) -> str:
    """The gallery page as a string: a summary table, then one section per reproduction.

    Example:
        >>> from vanishing.experiments.reproductions.base import Reproduction
        >>> from vanishing.report.gallery import render_gallery
        >>> "<h2" in render_gallery([Reproduction("x", "T", "C", [])])
        True
    """
    seconds = seconds or {}
    passed = sum(r.ok for r in results)
    summary_rows = "".join(
        f'<tr><td><a href="#{_e(r.name)}">{_e(r.name)}</a></td><td>{_e(r.title)}</td>'
        f'<td class="num">{sum(c.ok for c in r.checks)} of {len(r.checks)}</td>'
        f"<td>{'reproduced' if r.ok else '<strong>not reproduced</strong>'}</td>"
        f'<td class="num">{_e(f"{seconds[r.name]:.0f} s") if r.name in seconds else "—"}</td></tr>'
        for r in results
    )
    summary = (
        "<table><thead><tr><th>name</th><th>result</th><th>checks passed</th><th>verdict</th>"
        f"<th>time</th></tr></thead><tbody>{summary_rows}</tbody></table>"
    )
    sections = "".join(
        f'<section id="{_e(r.name)}"><h2>{_e(r.title)} '
        f'<span class="muted">(vanishing reproduce {_e(r.name)})</span></h2>'
        f'<p class="muted">{_e(r.citation)}</p>'
        + (f"<p>{_e(r.summary)}</p>" if r.summary else "")
        + _checks(r)
        + _tables(r)
        + _plots(r)
        + "</section>"
        for r in results
    )
    quick = any(r.quick for r in results)
    verdict = (
        f'<p class="verdict {"ok" if passed == len(results) else "critical"}">'
        f"<b>Verdict</b>: {passed} of {len(results)} published results reproduced"
        + (" (quick runs, with their own looser checks)" if quick else "")
        + ".</p>"
    )
    return _page(
        "Reproductions",
        "Each published number beside the one measured here, with the tolerance that decides "
        "the check; every gradient measured with vanishing.watch.",
        summary + sections,
        verdict,
    )


def write_gallery(
    results: list[Reproduction],
    dest: str | os.PathLike,
    *,
    seconds: dict[str, float] | None = None,
) -> Path:
    """Write :func:`render_gallery` to ``dest`` atomically and return the path.

    Example:
        >>> write_gallery(results, "runs/reproduce-all/index.html")   # doctest: +SKIP
    """
    return write_page(dest, render_gallery(results, seconds=seconds))
