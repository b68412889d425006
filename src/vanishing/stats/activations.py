"""Activation statistics: output moments, mean derivative, saturation and dead units.

The functions are pure: what an activation contributes (its derivative ``phi'``, the bound of
``|phi'|`` and whether it has flat tails or units that can die) comes in as arguments, and
:meth:`vanishing.activations.Activation.stat_options` gives them for a registered activation.

*Saturated* means ``|phi'(z)| < 0.05 max |phi'|`` (the flat tails); it is measured for
activations with a tail (``saturates=True``) and NaN for the others (the piecewise-linear ReLU
family, whose zero side is counted as *dead* instead). A *dead unit* is a unit (a feature, or a
channel of a convolutional map) whose input is <= 0 for every example of the batch, so that it
is off for all of them; measured when ``can_die=True``, NaN otherwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from vanishing.stats.names import ACTIVATION_STATS

__all__ = [
    "SATURATION_THRESHOLD",
    "STAT_NAMES",
    "summarize",
    "summarize_into",
    "summarize_stacked",
]

#: A unit is saturated when ``|phi'(z)|`` is below this fraction of the activation's maximum.
SATURATION_THRESHOLD = 0.05

#: The statistics :func:`summarize` returns, in order (the run format's columns).
STAT_NAMES = ACTIVATION_STATS
#: Percentiles of a larger output are read from this many of its entries, drawn at random once
#: per output size (seeded by it: the same entries every step) so that no layout aligns with
#: them (an even stride through a conv map can land on one pixel of every channel). 256 puts
#: a 2nd percentile within ~1 percentile point; selecting from it costs ~1/3 of a 1024-entry
#: selection once training has pushed the buffers out of the cache.
PERCENTILE_SAMPLE = 256


def summarize(z: Tensor | None, y: Tensor, *, unit_dim: int = -1, **options) -> Tensor:
    """Statistics of one activation call, as a float64 vector in :data:`STAT_NAMES` order.

    ``[mean(y), std(y), mean(phi'(z)), saturated fraction, dead fraction, p2(y), p98(y)]`` where
    the saturated fraction is the share of entries with ``|phi'(z)| < 0.05 * bound``, the dead
    fraction the share of units (indices along ``unit_dim``; the first axis is the batch) whose
    input is ``<= 0`` for every example, and p2, p98 the 2nd and 98th percentiles of the output
    (nearest rank, i.e. the smallest value with at least that share of entries at or below it;
    from a fixed sample of :data:`PERCENTILE_SAMPLE` entries when there are more). Entries that
    do not apply, or that cannot be computed from the tensors given, are NaN. ``options`` are
    those of :func:`summarize_into`. Everything stays on the tensors' device.

    Example:
        >>> import torch
        >>> from vanishing.stats.activations import summarize
        >>> z = torch.tensor([[-1.0, 2.0], [-3.0, 4.0]])
        >>> relu = lambda z, y: (z > 0).to(z.dtype)
        >>> summarize(z, z.relu(), unit_dim=1, derivative=relu, bound=1.0, can_die=True).tolist()[2:5]
        [0.5, nan, 0.5]
    """
    zs = z.unsqueeze(0) if z is not None else None
    return summarize_stacked(zs, y.unsqueeze(0), unit_dim=unit_dim, **options)[0]


def summarize_stacked(z: Tensor | None, y: Tensor, *, unit_dim: int = -1, **options) -> Tensor:
    """:func:`summarize` of ``L`` calls at once: ``z``, ``y`` are stacked ``[L, batch, ...]``.

    Returns an ``[L, 7]`` float64 tensor; one reduction kernel per statistic serves all ``L``
    calls (the monitor stacks the same-shaped outputs of all layers of one kind).

    Example:
        >>> import torch
        >>> from vanishing.stats.activations import summarize_stacked
        >>> y = torch.sigmoid(torch.zeros(3, 4, 2))   # three calls, output 0.5 everywhere
        >>> d = lambda z, y: y * (1 - y)
        >>> summarize_stacked(None, y, derivative=d, bound=0.25, saturates=True)[:, 2].tolist()
        [0.25, 0.25, 0.25]
    """
    y = y.detach()
    work = y.reshape(y.shape[0], -1)
    work = work.clone() if work.dtype in (torch.float32, torch.float64) else work.float()
    return summarize_into(
        z.detach() if z is not None else None,
        y,
        work,
        torch.empty_like(work),
        unit_dim=unit_dim,
        **options,
    )


def summarize_into(
    z: Tensor | None,
    y: Tensor,
    work: Tensor,
    scratch: Tensor,
    *,
    derivative: Callable[..., Tensor | None],
    bound: float,
    params: Mapping[str, Any] | None = None,
    output_derivative: Callable[[Tensor, Tensor], Tensor] | None = None,
    saturates: bool = False,
    signed: bool = False,
    can_die: bool = False,
    unit_dim: int = -1,
) -> Tensor:
    """:func:`summarize_stacked` computed in two caller-owned ``[L, N]`` buffers.

    ``work`` holds a copy of ``y`` (flattened per call) and is overwritten, like ``scratch``.
    Everything is in-place float arithmetic on those two buffers (boolean reductions and fresh
    multi-megabyte temporaries are what make such statistics slow on a CPU), so a caller that
    keeps the buffers between steps pays no allocation at all.

    The activation comes in as: ``derivative(z, y, **params)``, ``phi'`` elementwise for one
    call's layout (the ``L`` calls are merged into the batch axis), None when it cannot be
    computed from what is given; ``output_derivative(y, out)``, if given, ``phi'`` from the
    output alone written into ``out`` (used instead of ``derivative``); ``bound``, the maximum
    of ``|phi'|``; ``saturates``: it has flat tails (else the saturated share is NaN);
    ``signed``: ``phi'`` can be negative; ``can_die``: its units can die (else the dead share
    is NaN).

    Example:
        >>> import torch
        >>> from vanishing.stats.activations import summarize_into
        >>> y = torch.tanh(torch.tensor([[[0.0, 20.0]]]))       # one call, two entries
        >>> work = y.reshape(1, -1).clone()
        >>> d = lambda z, y: 1 - y * y
        >>> summarize_into(None, y, work, torch.empty_like(work), derivative=d, bound=1.0,
        ...                saturates=True)[0, 2:4].tolist()      # mean phi', saturated share
        [0.5, 0.5]
    """
    L = work.shape[0]
    nan = torch.full((L,), float("nan"), dtype=work.dtype, device=work.device)
    p02, p98 = _percentiles(work)  # before `work` is overwritten
    dead = nan
    if can_die and y.dim() >= 3:
        x = z if z is not None else y
        unit = unit_dim % (y.dim() - 1) + 1  # the unit axis of one call's tensor, shifted by L
        others = [i for i in range(1, x.dim()) if i != unit]
        peak = x.amax(dim=others)  # [L, units]: a unit is dead if even its peak input is <= 0
        dead = (peak <= 0).to(work.dtype).mean(dim=1)
    mean = work.mean(dim=1)
    if output_derivative is not None:
        d = output_derivative(work, scratch)
    else:
        d = derivative(_one_batch(z), _one_batch(y), **(params or {}))
        if d is not None:
            d = scratch.copy_(d.reshape(scratch.shape))
    if d is None:
        deriv_mean, saturated = nan, nan
    else:
        deriv_mean = d.mean(dim=1)
        if saturates:
            if signed:
                d.abs_()
            # 1.0 where |phi'| < threshold, else 0.0, written over d: one pass, no bool tensor
            saturated = torch.lt(d, SATURATION_THRESHOLD * bound, out=d).mean(dim=1)
            # lt says False for NaN: a call with NaN entries gets a NaN share, like its mean
            saturated = torch.where(deriv_mean.isnan(), deriv_mean, saturated)
        else:
            saturated = nan
    n = work.shape[1]
    if n > 1:  # two passes: exact even when the spread is tiny next to the mean
        std = torch.linalg.vector_norm(work.sub_(mean.unsqueeze(1)), dim=1).div_(math.sqrt(n - 1))
    else:
        std = nan
    return torch.stack([mean, std, deriv_mean, saturated, dead, p02, p98], dim=1).to(torch.float64)


def _one_batch(t: Tensor | None) -> Tensor | None:
    """``[L, batch, ...]`` as ``[L * batch, ...]``: the layout of one call (channels at dim 1),
    which per-channel parameters (PReLU's slopes) are shaped for."""
    return t.flatten(0, 1) if t is not None and t.dim() >= 3 else t


def _percentiles(work: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest-rank 2nd and 98th percentiles of each row, from a fixed sample of the row.

    Two selections (``kthvalue``) on at most PERCENTILE_SAMPLE entries: a full sort of the
    sample costs several times more.
    """
    n = work.shape[1]
    if n == 0:
        nan = torch.full((work.shape[0],), float("nan"), dtype=work.dtype, device=work.device)
        return nan, nan
    sample = work if n <= PERCENTILE_SAMPLE else work.index_select(1, _sample(n, work.device))
    m = sample.shape[1]
    return tuple(
        torch.kthvalue(sample, max(math.ceil(q * m), 1), dim=1).values for q in (0.02, 0.98)
    )


@functools.lru_cache(maxsize=128)
def _sample(n: int, device: torch.device) -> Tensor:
    """PERCENTILE_SAMPLE positions in ``range(n)``, drawn with a generator seeded by ``n`` (the
    global random state is never touched), sorted for memory order."""
    gen = torch.Generator().manual_seed(n)
    positions = torch.randint(0, n, (PERCENTILE_SAMPLE,), generator=gen).sort().values
    return positions.to(device)  # host sync: one copy per output size and device, then cached
