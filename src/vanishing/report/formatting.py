"""How a number is written in every view: one function per kind of number.

The HTML pages, the terminal tables, the demo, ``vanishing run`` and the sweep's progress all
write a test metric with :func:`metric_text` (accuracy in percent with one decimal, any other
metric with four significant digits) and a statistic with :func:`stat_text` (a dash where it
does not apply: missing or NaN; an infinity stays visible), so that one run's accuracy reads
``8.6%`` everywhere.

Example:
    >>> from vanishing.report.formatting import metric_text, stat_text
    >>> metric_text(0.08635, "accuracy"), metric_text(0.1234567, "mse"), stat_text(float("nan"))
    ('8.6%', '0.1235', '—')
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DASH", "RATIO_LABEL", "RATIO_LABEL_BY_ROLE", "metric_text", "ratio_label", "stat_text"]

#: What a cell shows where a number does not apply.
DASH = "—"

#: How every view labels :meth:`vanishing.Run.first_last_ratio` of a chain of layers.
RATIO_LABEL = "speed of learning, first / last hidden layer (median of per-step ratios)"
#: The same for a stack of blocks compared role by role
#: (:func:`~vanishing.recorder.semantics.ratio_pairs`).
RATIO_LABEL_BY_ROLE = (
    "speed of learning, first / last block, role by role (median of per-step ratios)"
)


def ratio_label(layer_info: list[dict]) -> str:
    """The label of a run's first/last ratio: by role when it compares several roles of a
    stack's first and last blocks (a transformer), else first / last hidden layer.

    Example:
        >>> from vanishing.report.formatting import ratio_label
        >>> ratio_label([])
        'speed of learning, first / last hidden layer (median of per-step ratios)'
    """
    from vanishing.recorder.semantics import ratio_pairs

    return RATIO_LABEL_BY_ROLE if len(ratio_pairs(layer_info)) > 1 else RATIO_LABEL


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def stat_text(value: Any, spec: str = ".3g") -> str:
    """A statistic as text: ``format(value, spec)``; :data:`DASH` for None, NaN or a value
    that is not a number; ``inf``/``-inf`` as they are (an overflow must stay visible).

    Example:
        >>> from vanishing.report.formatting import stat_text
        >>> stat_text(0.000123456), stat_text(None), stat_text(float("inf")), stat_text("x")
        ('0.000123', '—', 'inf', '—')
    """
    v = _float(value)
    if v is None or math.isnan(v):
        return DASH
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def metric_text(value: Any, name: Any = None) -> str:
    """A test or evaluation metric as text: accuracy (``name == "accuracy"``) in percent with
    one decimal, any other metric with four significant digits; :data:`DASH` when missing.

    Example:
        >>> from vanishing.report.formatting import metric_text
        >>> metric_text(0.6612, "accuracy"), metric_text(0.16800001, "mse"), metric_text(None, "accuracy")
        ('66.1%', '0.168', '—')
    """
    v = _float(value)
    if v is not None and math.isfinite(v) and str(name) == "accuracy":
        return f"{v:.1%}"
    return stat_text(value, ".4g")
