"""What every reproduction returns: checks of published against measured numbers, tables, plots.

A reproduction module (``glorot.py``, ``he.py``, ...) defines ``TITLE`` (one line), ``CITATION``
(authors, year, the figure or table reproduced) and
``reproduce(*, quick=False, out=None, progress=None) -> Reproduction``. The command line, the
``--json`` output and the gallery page (``vanishing reproduce all``) read only this object, so a
new reproduction needs nothing outside its own module and one name in ``AVAILABLE``.

Example:
    >>> from vanishing.experiments.reproductions.base import Check, Reproduction
    >>> c = Check.within("chi_1 at sigma_w^2 = 1", published=0.759, measured=0.7588, rel=0.01)
    >>> c.ok, c.tolerance
    (True, '+-1%')
    >>> r = Reproduction(name="demo", title="t", citation="c", checks=[c])
    >>> r.ok, r.to_dict()["checks"][0]["published"]
    (True, 0.759)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Check", "Table", "Reproduction", "Progress", "check_out", "one_thread", "save_figure"]

#: ``progress(done, total)``: called as a reproduction advances (for the CLI's progress bar)
Progress = Callable[[int, int], None]


def _plain(value: Any) -> Any:
    """A JSON-safe copy: floats that are not finite become strings, numpy scalars plain."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict, str)):
        with contextlib.suppress(TypeError, ValueError):
            value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


@dataclass
class Check:
    """One published number (or statement) beside ours, with the tolerance that decides ``ok``.

    ``published`` and ``measured`` are numbers where the paper gives one, else short strings
    (``"rises with depth"``). ``tolerance`` says in words what passes (``"+-10%"``,
    ``"< 0.01"``, ``"measured > 1"``). Build numeric checks with :meth:`within`,
    :meth:`below` and :meth:`above` so that the words and the test agree.

    Example:
        >>> from vanishing.experiments.reproductions.base import Check
        >>> Check.below("tanh RNN test MSE", published=0.167, measured=0.01, limit=0.02).ok
        True
        >>> Check.above("LSTM beats baseline by", published="> 10x", measured=3.0, limit=10).ok
        False
    """

    what: str
    published: Any
    measured: Any
    tolerance: str
    ok: bool

    @classmethod
    def within(
        cls,
        what: str,
        *,
        published: float,
        measured: float,
        rel: float | None = None,
        abs: float | None = None,  # noqa: A002 - the natural name of the keyword
    ) -> Check:
        """``ok`` when ``measured`` is within ``rel`` (a fraction) or ``abs`` of ``published``."""
        if (rel is None) == (abs is None):
            raise ValueError("give exactly one of rel= or abs=")
        measured = float(measured)
        if rel is not None:
            ok = math.isfinite(measured) and math.fabs(measured - published) <= rel * math.fabs(
                published
            )
            tolerance = f"+-{rel * 100:g}%"
        else:
            ok = math.isfinite(measured) and math.fabs(measured - published) <= abs
            tolerance = f"+-{abs:g}"
        return cls(what, published, measured, tolerance, bool(ok))

    @classmethod
    def factor(cls, what: str, *, published: float, measured: float, factor: float) -> Check:
        """``ok`` when ``measured`` is within a factor ``factor`` of ``published`` either way
        (for numbers that span orders of magnitude, such as gradient norms).

        Example:
            >>> from vanishing.experiments.reproductions.base import Check
            >>> Check.factor("speed", published=0.003, measured=0.0032, factor=2).tolerance
            'within x2'
        """
        measured = float(measured)
        ok = math.isfinite(measured) and published / factor <= measured <= published * factor
        return cls(what, published, measured, f"within x{factor:g}", bool(ok))

    @classmethod
    def below(cls, what: str, *, published: Any, measured: float, limit: float) -> Check:
        """``ok`` when ``measured < limit``."""
        measured = float(measured)
        return cls(what, published, measured, f"< {limit:g}", bool(measured < limit))

    @classmethod
    def above(cls, what: str, *, published: Any, measured: float, limit: float) -> Check:
        """``ok`` when ``measured > limit``."""
        measured = float(measured)
        return cls(what, published, measured, f"> {limit:g}", bool(measured > limit))

    @classmethod
    def holds(cls, what: str, *, published: str, measured: str, ok: bool, tolerance: str) -> Check:
        """A qualitative check (an ordering, a sign): ``ok`` as computed by the caller."""
        return cls(what, published, measured, tolerance, bool(ok))

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` form: what, published, measured, tolerance, ok."""
        return _plain(
            {
                "what": self.what,
                "published": self.published,
                "measured": self.measured,
                "tolerance": self.tolerance,
                "ok": self.ok,
            }
        )


@dataclass
class Table:
    """A small table of numbers for the terminal and the gallery: a title, a header, rows.

    Cells are numbers or strings; numbers are shown with 3 significant digits.

    Example:
        >>> from vanishing.experiments.reproductions.base import Table
        >>> t = Table("variance per layer", ["layer", "standard", "normalized"], [[1, 0.5, 1.0]])
        >>> t.cells()[0]
        ['1', '0.5', '1']
    """

    title: str
    header: list[str]
    rows: list[list[Any]]

    def cells(self) -> list[list[str]]:
        """The rows as display strings."""
        return [[_cell(v) for v in row] for row in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """JSON form: title, header, rows."""
        return _plain({"title": self.title, "header": self.header, "rows": self.rows})


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else ("yes" if value else "no")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}"
    return str(value)


@dataclass
class Reproduction:
    """The result of one reproduction: its checks (published vs measured), tables and plots.

    ``ok`` is True when every check passes (``vanishing reproduce NAME`` exits 0 then, 1 if not).
    ``plots`` are files written under ``out``; ``settings`` records what was run (steps, seeds,
    widths...) so the JSON is a complete record.

    Example:
        >>> from vanishing.experiments.reproductions.base import Reproduction
        >>> r = Reproduction(name="x", title="t", citation="c", checks=[])
        >>> r.ok          # no check failed
        True
    """

    name: str
    title: str
    citation: str
    checks: list[Check]
    tables: list[Table] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    out: Path | None = None
    quick: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    @property
    def ok(self) -> bool:
        """True when every check passes."""
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object: name, title, citation, ok, quick, checks, tables, plots, ..."""
        return _plain(
            {
                "name": self.name,
                "title": self.title,
                "citation": self.citation,
                "ok": self.ok,
                "quick": self.quick,
                "checks": [c.to_dict() for c in self.checks],
                "tables": [t.to_dict() for t in self.tables],
                "plots": [str(p) for p in self.plots],
                "out": None if self.out is None else str(self.out),
                "settings": self.settings,
                "summary": self.summary,
            }
        )


def _default_out(name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    # a short random suffix: two reproductions started within the same second never share
    return Path("runs") / f"reproduce-{name}-{stamp}-{uuid.uuid4().hex[:4]}"


def check_out(out: str | os.PathLike | None, name: str, *, create: bool = True) -> Path:
    """The directory a reproduction writes to: ``out``, or a new ``runs/reproduce-NAME-...``.

    Raises ``ValueError`` if ``out`` exists and is not an empty directory (nothing is ever
    overwritten). The directory is created unless ``create=False`` (a check before running).

    Example:
        >>> import tempfile
        >>> from vanishing.experiments.reproductions.base import check_out
        >>> check_out(tempfile.mkdtemp(), "glorot").is_dir()
        True
    """
    path = Path(out) if out is not None else _default_out(name)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} already exists and is not an empty directory; pick a new --out")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread inside the block, restoring the count after: the reproductions'
    nets are small, and on a loaded machine OpenMP's spin-waiting threads make each step
    slower instead of faster.

    Example:
        >>> import torch
        >>> from vanishing.experiments.reproductions.base import one_thread
        >>> before = torch.get_num_threads()
        >>> with one_thread():
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_figure(figure: Any, out: Path, stem: str) -> list[Path]:
    """Save a matplotlib ``Figure`` as ``out/stem.png`` and ``out/stem.svg``; return both paths.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from matplotlib.figure import Figure
        >>> from vanishing.experiments.reproductions.base import save_figure
        >>> fig = Figure(); _ = fig.subplots().plot([1, 2])
        >>> [p.name for p in save_figure(fig, Path(tempfile.mkdtemp()), "curve")]
        ['curve.png', 'curve.svg']
    """
    paths = []
    for suffix in ("png", "svg"):
        path = out / f"{stem}.{suffix}"
        figure.savefig(path, dpi=120)
        paths.append(path)
    return paths
