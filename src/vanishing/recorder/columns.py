"""The column registry: every recorded statistic, declared once.

A :class:`Column` says what a probe fills and how the rest of the package treats it: its level
decides where it lives in the monitor's buffer and in which run table it lands (``step`` ->
``steps``, ``param`` and ``module`` -> ``metrics``, ``time`` -> ``temporal``); ``reduce`` says
how shards of one parameter (FSDP2) or several calls of one module in a step combine; ``scale``
is the axis the report plots it on. The built-in probes declare the columns below; a probe of
your own declares more (see docs/architecture.md), and they become columns of the run's tables.

Example:
    >>> from vanishing.recorder.columns import Column, BUILTIN
    >>> Column("weight_max_abs", level="param", reduce="max")
    Column(name='weight_max_abs', level='param', reduce='max', scale='log', integer=False)
    >>> [c.name for c in BUILTIN if c.level == "step"]
    ['loss', 'loss_nonfinite', 'n_backward']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from vanishing.recorder.schema import MODULE_STATS, PARAM_STATS, STEP_STATS

Level = Literal["step", "param", "module", "time"]
Reduce = Literal["sum_sq", "sum", "max", "mean"]
LEVELS: tuple[str, ...] = ("step", "param", "module", "time")
_REDUCE = ("sum_sq", "sum", "max", "mean")
_RESERVED = {"step", "time", "layer", "param", "depth", "t", "length", "skipped"}


@dataclass(frozen=True)
class Column:
    """One recorded statistic.

    ``reduce``: ``"sum_sq"`` for norms (shards combine as the root of their summed squares),
    ``"sum"`` for counts, ``"max"`` for maxima, ``"mean"`` for values averaged over the calls of
    a module within a step. ``integer``: stored as int64 in the run tables.
    """

    name: str
    level: Level
    reduce: Reduce = "mean"
    scale: Literal["log", "linear"] = "log"
    integer: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a column name must be an identifier, got {self.name!r}")
        if self.name in _RESERVED:
            raise ValueError(f"column name {self.name!r} is reserved for the run tables' keys")
        if self.level not in LEVELS:
            raise ValueError(f"column level must be one of {LEVELS}, got {self.level!r}")
        if self.reduce not in _REDUCE:
            raise ValueError(f"column reduce must be one of {_REDUCE}, got {self.reduce!r}")


_STEP = {
    "loss": Column("loss", "step", "sum", "linear"),
    "loss_nonfinite": Column("loss_nonfinite", "step", "sum", "linear"),
    "n_backward": Column("n_backward", "step", "sum", "linear", integer=True),
}
_PARAM = {
    "grad_norm": Column("grad_norm", "param", "sum_sq"),
    "param_norm": Column("param_norm", "param", "sum_sq"),
    "update_norm": Column("update_norm", "param", "sum_sq"),
    "grad_nonfinite": Column("grad_nonfinite", "param", "sum", "linear"),
    "param_nonfinite": Column("param_nonfinite", "param", "sum", "linear"),
}
# activation statistics are shares and values of order one: plotted and averaged linearly
_MODULE = {
    name: Column(name, "module", "mean", "log" if name == "error_norm" else "linear")
    for name in MODULE_STATS
}
#: the temporal profile of a recurrent layer: the gradient norm at each kept time step
TIME_GRAD = Column("grad_norm", "time", "mean")

#: Every built-in column, in buffer order within each level (the order of the run tables).
BUILTIN: tuple[Column, ...] = (
    *(_STEP[n] for n in STEP_STATS),
    *(_PARAM[n] for n in PARAM_STATS),
    *(_MODULE[n] for n in MODULE_STATS),
    TIME_GRAD,
)

#: Ratios derived when a block is written: (name, numerator, denominator), per parameter.
DERIVED_RATIOS: tuple[tuple[str, str, str], ...] = (
    ("grad_ratio", "grad_norm", "param_norm"),
    ("update_ratio", "update_norm", "param_norm"),
)


def by_level(columns: Iterable[Column]) -> dict[str, tuple[Column, ...]]:
    """The columns of each level, in order; names must be unique within the tables they share
    (``param`` and ``module`` columns share the metrics table).

    Example:
        >>> from vanishing.recorder.columns import BUILTIN, by_level
        >>> {k: len(v) for k, v in by_level(BUILTIN).items()}
        {'step': 3, 'param': 5, 'module': 9, 'time': 1}
    """
    out: dict[str, list[Column]] = {level: [] for level in LEVELS}
    seen: dict[tuple[str, str], Column] = {}
    for c in columns:
        table = "metrics" if c.level in ("param", "module") else c.level
        if (table, c.name) in seen:
            raise ValueError(f"column {c.name!r} is declared twice")
        seen[(table, c.name)] = c
        out[c.level].append(c)
    if len(out["time"]) > 1:
        raise ValueError("only one time-level column (the temporal gradient profile) is supported")
    return {k: tuple(v) for k, v in out.items()}


def scale_of(name: str, columns: Sequence[Column] = BUILTIN) -> str:
    """The plot scale of a column by name (``"log"`` for unknown names: norms are the rule).

    Example:
        >>> from vanishing.recorder.columns import scale_of
        >>> scale_of("act_mean"), scale_of("grad_norm")
        ('linear', 'log')
    """
    for c in columns:
        if c.name == name:
            return c.scale
    return "log"
