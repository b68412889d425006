"""When to record: schedules are plain ``step -> bool`` callables."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["Schedule", "every_k", "log_spaced", "resolve_schedule"]

Schedule = Callable[[int], bool]


class every_k:
    """Record steps 0, k, 2k, ...

    Example:
        >>> from vanishing.schedule import every_k
        >>> [s for s in range(10) if every_k(3)(s)]
        [0, 3, 6, 9]
    """

    def __init__(self, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"every must be a positive integer, got {k!r}")
        self.k = k

    def __call__(self, step: int) -> bool:
        return step % self.k == 0

    def __repr__(self) -> str:
        return f"every {self.k} steps" if self.k > 1 else "every step"


class log_spaced:
    """Dense early, sparse late: every step below ``dense``, then ~``per_decade`` steps a decade.

    Suits long runs: the first steps (where most of the action is) are all kept, and the number
    of recorded steps grows with the logarithm of the run's length.

    Example:
        >>> from vanishing.schedule import log_spaced
        >>> sched = log_spaced(dense=10, per_decade=10)
        >>> [s for s in range(200) if sched(s)][8:16]
        [8, 9, 10, 20, 30, 40, 50, 60]
    """

    def __init__(self, dense: int = 100, per_decade: int = 100) -> None:
        if dense < 1 or per_decade < 1:
            raise ValueError("log_spaced needs dense >= 1 and per_decade >= 1")
        self.dense = dense
        self.per_decade = per_decade

    def __call__(self, step: int) -> bool:
        if step < self.dense:
            return True
        return step % _nice_stride(10 ** (math.floor(math.log10(step)) + 1) // self.per_decade) == 0

    def __repr__(self) -> str:
        return f"log-spaced (all steps below {self.dense}, ~{self.per_decade} a decade after)"


def _nice_stride(raw: int) -> int:
    """The largest of 1, 2, 5 x 10^k not above ``raw`` (so recorded steps are round numbers)."""
    if raw <= 1:
        return 1
    base = 10 ** math.floor(math.log10(raw))
    return max(m * base for m in (1, 2, 5) if m * base <= raw)


def resolve_schedule(every: int | str | Schedule) -> Schedule:
    """Turn the ``every`` argument of :func:`vanishing.watch` into a schedule.

    Example:
        >>> from vanishing.schedule import resolve_schedule
        >>> resolve_schedule(1)(7), resolve_schedule(5)(7), resolve_schedule("log")(7)
        (True, False, True)
    """
    if isinstance(every, str):
        if every == "log":
            return log_spaced()
        raise ValueError(
            f"every must be a positive int, 'log' or a step -> bool callable, got {every!r}"
        )
    if callable(every):
        return every
    return every_k(every)
