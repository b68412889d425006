"""Norms of many tensors at once, robust to the float32 range.

A squared L2 norm underflows in float32 once the entries fall below ~1e-19 and overflows above
~1e19: exactly the regimes of vanishing and exploding gradients (and squares below ~1e-38 are
denormal floats, with few significant bits). ``l2_norms`` therefore returns float64 norms and, on
the CPU, recomputes in float64 any float32 norm that came out as 0, non-finite, or so small that
its squares were denormal or flushed.

On a CPU where it pays, the float32 pass runs with denormals flushed to zero
(:class:`flush_denormals`, switched on around the monitor's own operations only and restored
after): a square below 1.2e-38 costs a microcode assist on Intel cores (9x slower norms of a
vanishing network's gradients, measured in issue 17), and the norms it affects are recomputed
anyway. Whether it pays is measured once per process (:func:`_flush_pays`): on the AMD EPYC of
the CI it does not (denormals cost nothing there, and flushing moves more norms to the recheck). The float64
recheck runs with flushing off, so that denormal entries themselves count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "l2_norm",
    "l2_norms",
    "nonfinite_counts",
    "temporal_profile",
    "flush_denormals",
    "MAX_TIME_POINTS",
]

#: The temporal gradient profile of a recurrent layer keeps at most this many time steps.
MAX_TIME_POINTS = 64


def l2_norms(
    tensors: Sequence[Tensor], *, exact_tiny: bool = True, fused: bool | None = None
) -> Tensor:
    """L2 norm of each tensor, ``||t||_2 = sqrt(sum_i t_i^2)``, as one float64 vector.

    On a GPU, with no host sync and exact float64 sums: tensors of fewer than 2^20 entries are
    concatenated and their squares summed per tensor with ``segment_reduce`` (a handful of kernels
    however many small tensors there are: their cost is launching kernels), each larger tensor
    gets its own float64 norm kernel (its cost is reading memory, so it is read once).
    (``_foreach_norm`` runs one kernel per tensor anyway when asked for float64.) On the CPU the
    fast float32 kernel is used, with denormals flushed to zero (:class:`flush_denormals`), and
    only the norms it cannot get right are recomputed in float64: the non-finite ones, those
    whose mean square is below 7e-33 (squares below 1.2e-38 may have been flushed: see
    ``_TRUSTED_MEAN_SQUARE_FLUSHED``; 4e-40 on a CPU that cannot flush) and, with ``exact_tiny``
    (the default), the zero ones. Pass ``exact_tiny=False`` when a zero norm can
    only mean all zeros (e.g. differences of float32 weights of ordinary size). ``fused`` forces
    the GPU strategy (default: GPU strategy off the CPU).

    Example:
        >>> import torch
        >>> from vanishing.stats import l2_norms
        >>> norms = l2_norms([torch.tensor([3.0, 4.0]), torch.full((4,), 1e-30)])
        >>> norms[0].item(), f"{norms[1].item():.3g}"   # float32 would have said 0.0
        (5.0, '2e-30')
    """
    if len(tensors) == 0:
        return torch.empty(0, dtype=torch.float64)
    if fused if fused is not None else tensors[0].device.type != "cpu":
        return _small_and_large(
            tensors,
            lambda small: _segment_sums(small, lambda f: f.to(torch.float64).square_()).sqrt_(),
            lambda t: torch.linalg.vector_norm(t, dtype=torch.float64),
        )
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    values = [0.0] * len(tensors)
    with flush_denormals() as flushed:
        for dtype, idx in by_dtype.items():
            group = [tensors[i] for i in idx]
            kwargs = {} if dtype in (torch.float32, torch.float64) else {"dtype": torch.float32}
            fast = torch.stack(torch._foreach_norm(group, 2, **kwargs)).tolist()  # host sync: CPU
            for i, v in zip(idx, fast):
                values[i] = v
    redo = [
        i
        for i, (v, t) in enumerate(zip(values, tensors))
        if not _trusted(v, t.numel(), exact_tiny, flushed)
    ]
    if redo:
        for i, v in zip(redo, _exact_norms([tensors[i] for i in redo])):
            values[i] = v
    return torch.tensor(values, dtype=torch.float64)


#: A float32 sum of squares is trusted when its mean square is at least this: each square below
#: the smallest normal float32 (1.2e-38) is rounded to a multiple of 1.4e-45 (or flushed to 0),
#: an error of at most 0.7e-45 per entry, so the relative error of the sum is then <= 1.75e-6
#: (of the norm <= 0.9e-6). An RMS entry of 2e-20: far inside the vanishing-gradient regime.
_TRUSTED_MEAN_SQUARE = 4e-40
#: The same when denormals are flushed to zero (``torch.set_flush_denormal(True)``): then every
#: square below 1.2e-38 is lost, an error of up to 1.2e-38 per entry.
_TRUSTED_MEAN_SQUARE_FLUSHED = 7e-33
_INF = float("inf")


def _trusted(norm: float, numel: int, exact_tiny: bool = True, flushed: bool | None = None) -> bool:
    """Whether a float32 norm is exact to float32 precision (not under/overflowed, not NaN).

    ``flushed``: whether the norm was computed with denormals flushed to zero (None: ask the
    processor now). A norm computed partly flushed (worker threads keep their own setting) is
    judged as flushed, which is the stricter test.
    """
    if not norm < _INF:  # inf or NaN: overflowed, or non-finite entries
        return False
    if norm == 0.0:  # all zeros, or every square flushed to 0
        return not exact_tiny
    mean_square = norm * norm / max(numel, 1)
    if mean_square >= _TRUSTED_MEAN_SQUARE_FLUSHED:
        return True
    if mean_square < _TRUSTED_MEAN_SQUARE:
        return False
    if flushed is None:  # only asked in between, where it makes the difference
        flushed = _flushes_denormals()
    return not flushed


_probe: tuple | None = None


def _flushes_denormals() -> bool:
    """Whether float arithmetic here flushes denormals to zero (``torch.set_flush_denormal``).

    Asked with two NumPy float32 scalars (0.1 us): the same processor flags rule them.
    """
    global _probe
    if _probe is None:
        import numpy as np

        _probe = (np.float32(1e-39), np.float32(1.0))  # a denormal float32, and one
    return bool(_probe[0] * _probe[1] == 0)


#: Whether flushing pays on this CPU: None until measured once (:func:`_flush_pays`); tests
#: set it to force either path.
_FLUSH_PAYS: bool | None = None
#: Flushing is used where it makes a norm of denormal squares at least this many times faster.
FLUSH_SPEEDUP = 2.0


def _flush_pays() -> bool:
    """Whether flushing denormals makes this CPU's norms of tiny gradients much faster.

    Measured once per process (~2 ms): the best of five float32 norms of 65536 entries of
    1e-20 (squares of 1e-40, denormal) with and without flushing. Intel cores take a microcode
    assist per denormal result (9x slower norms, issue 17); the AMD EPYC of this project's CI
    computes them at full speed, and there flushing only moves norms with mean squares between
    4e-40 and 7e-33 to the float64 recheck (measured: 1.26x instead of 1.18x a step on the
    20-layer sigmoid MLP). So flushing is used only where it is measured to pay.
    """
    global _FLUSH_PAYS
    if _FLUSH_PAYS is None:
        import time

        x = torch.full((65536,), 1e-20)
        user = _flushes_denormals()

        def best(flush: bool) -> float:
            if not torch.set_flush_denormal(flush) and flush:
                return math.inf  # this CPU cannot flush
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                torch.linalg.vector_norm(x).item()  # host sync: CPU, once per process
                times.append(time.perf_counter() - t0)
            return min(times)

        try:
            plain, flushed = best(False), best(True)
        finally:
            torch.set_flush_denormal(user)
        _FLUSH_PAYS = flushed * FLUSH_SPEEDUP <= plain
    return _FLUSH_PAYS


class flush_denormals:
    """Flush denormals to zero for the operations inside (this thread) where that is measured to
    pay (:func:`_flush_pays`), then restore the setting.

    ``with flush_denormals() as on:`` gives whether this CPU flushes inside the block. The
    user's own setting (``torch.set_flush_denormal``) is read on entry and put back on exit, so
    the training step around the block never sees a change. Flushing is a per-thread processor
    flag: intra-op worker threads keep theirs, so a result computed inside may be flushed in
    part only (judge it as flushed: ``_trusted(..., flushed=on)``). The pair costs ~0.5 us.

    Example:
        >>> import torch
        >>> from vanishing.stats.norms import flush_denormals
        >>> x = torch.full((4,), 1e-40)  # denormal float32 entries
        >>> with flush_denormals() as on:
        ...     inside = (x * 1.0).sum().item()
        >>> (inside == 0.0) == on, (x * 1.0).sum().item() > 0  # restored after the block
        (True, True)
    """

    __slots__ = ("_user", "on")

    def __enter__(self) -> bool:
        self._user = _flushes_denormals()
        self.on = self._user or (_flush_pays() and torch.set_flush_denormal(True))
        return self.on

    def __exit__(self, *exc: object) -> None:
        if not self._user:
            torch.set_flush_denormal(False)


def _exact_norms(tensors: Sequence[Tensor]) -> list[float]:
    """Float64 norms of tensors whose float32 norms were not trusted (CPU only).

    Computed with flushing off (the user's setting is put back after): with it on, the
    conversion to float64 would itself read denormal entries as zero. A float64 copy and a
    ``dot`` (each square is exact in float64, and nothing under/overflows for float32 inputs):
    ``vector_norm(t, dtype=torch.float64)`` measured 7x slower here (0.16 vs 0.022 ms for a
    256 x 256 tensor).
    """
    user = _flushes_denormals()
    if user:
        torch.set_flush_denormal(False)
    try:
        out = []
        for t in tensors:
            flat = t.detach().reshape(-1).to(torch.float64)
            out.append(math.sqrt(torch.dot(flat, flat).item()))  # host sync: CPU only
        return out
    finally:
        if user:
            torch.set_flush_denormal(True)


def _exact_norm(t: Tensor) -> float:
    """The float64 norm of a tensor whose float32 norm was not trusted (CPU only)."""
    return _exact_norms([t])[0]


_CHUNK = 2**24  # entries per float64 working copy on a GPU (128 MiB)
_LARGE = 2**20  # on a GPU, a tensor this large gets its own kernel


def _small_and_large(tensors: Sequence[Tensor], small_fn, large_fn) -> Tensor:
    """``small_fn`` on all small tensors at once, ``large_fn`` on each large one, in order."""
    large = [i for i, t in enumerate(tensors) if t.numel() >= _LARGE]
    if not large:
        return small_fn(tensors)
    parts: list[Tensor | None] = [None] * len(tensors)
    for i in large:
        parts[i] = large_fn(tensors[i])
    small = [i for i, t in enumerate(tensors) if t.numel() < _LARGE]
    if small:
        for i, v in zip(small, small_fn([tensors[i] for i in small]).unbind()):
            parts[i] = v
    return torch.stack(parts)


_lengths_cache: dict[tuple, Tensor] = {}


def _lengths(numels: tuple[int, ...], device: torch.device) -> Tensor:
    key = (numels, str(device))
    lengths = _lengths_cache.get(key)
    if lengths is None:
        if len(_lengths_cache) >= 256:
            _lengths_cache.clear()
        # host sync: one copy to the device per distinct list of sizes, then cached
        lengths = _lengths_cache[key] = torch.tensor(numels, dtype=torch.long).to(device)
    return lengths


def _segment_sums(tensors: Sequence[Tensor], transform) -> Tensor:
    """Per tensor, the sum of ``transform(entries)`` (float64), from one concatenation per chunk.

    ``segment_reduce(..., unsafe=True)`` skips its check that the lengths add up (a host sync);
    they do by construction.
    """
    sums: list[Tensor] = []
    chunk: list[Tensor] = []
    size = 0

    def reduce() -> None:
        flat = torch.cat([t.reshape(-1) for t in chunk])
        numels = tuple(t.numel() for t in chunk)
        lengths = _lengths(numels, flat.device)
        sums.append(torch.segment_reduce(transform(flat), "sum", lengths=lengths, unsafe=True))

    for t in tensors:
        if chunk and size + t.numel() > _CHUNK:
            reduce()
            chunk, size = [], 0
        chunk.append(t)
        size += t.numel()
    reduce()
    return sums[0] if len(sums) == 1 else torch.cat(sums)


def l2_norm(t: Tensor) -> Tensor:
    """L2 norm of one tensor as a float64 scalar, exact where float32 would under/overflow.

    Example:
        >>> import torch
        >>> from vanishing.stats.norms import l2_norm
        >>> f"{l2_norm(torch.full((4,), 1e-30)).item():.3g}"
        '2e-30'
    """
    if t.device.type != "cpu":
        return torch.linalg.vector_norm(t, dtype=torch.float64)
    return torch.tensor(cpu_norm(t), dtype=torch.float64)


_EXACT_DTYPES = (torch.float32, torch.float64)


def cpu_norm(t: Tensor) -> float:
    """:func:`l2_norm` of a CPU tensor as a Python float (no float64 tensor is made).

    Example:
        >>> import torch
        >>> from vanishing.stats.norms import cpu_norm
        >>> cpu_norm(torch.tensor([3.0, 4.0])), f"{cpu_norm(torch.full((4,), 3e-23)):.3g}"
        (5.0, '6e-23')
    """
    kwargs = {} if t.dtype in _EXACT_DTYPES else {"dtype": torch.float32}
    if _FLUSH_PAYS is False:
        # called once per layer inside backward hooks, where each Python step costs 2-3x what
        # it costs outside: with flushing measured not to pay, the context (7 us there, half a
        # norm) is skipped, and the user's own setting is read only where it matters (_trusted)
        value = torch.linalg.vector_norm(t, **kwargs).item()  # host sync: CPU only, it is free
        flushed = None
    else:
        with flush_denormals() as flushed:
            value = torch.linalg.vector_norm(t, **kwargs).item()  # host sync: CPU only, free
    # the common case, a mean square well inside float32's range (trusted flushed or not),
    # without the call
    if value < _INF and value * value >= _TRUSTED_MEAN_SQUARE_FLUSHED * t.numel():
        return value
    return value if _trusted(value, t.numel(), True, flushed) else _exact_norm(t)


def nonfinite_counts(
    tensors: Sequence[Tensor], norms: Tensor | None = None, *, fused: bool | None = None
) -> Tensor:
    """Number of NaN or infinite entries in each tensor, as a float64 vector.

    ``norms`` (from :func:`l2_norms`) lets the CPU path skip every tensor whose norm is finite:
    a finite float64 norm proves that all of its entries are finite. On a GPU the count is
    computed for all tensors with two fused kernels (``0 * x`` is NaN exactly where ``x`` is not
    finite; its L0 norm counts those entries) and no host sync.

    Example:
        >>> import torch
        >>> from vanishing.stats import nonfinite_counts
        >>> nonfinite_counts([torch.tensor([1.0, float("nan"), float("inf")]), torch.ones(3)]).tolist()
        [2.0, 0.0]
    """
    if len(tensors) == 0:
        return torch.empty(0, dtype=torch.float64)
    if fused if fused is not None else tensors[0].device.type != "cpu":
        return _small_and_large(
            tensors,
            lambda small: _segment_sums(small, lambda f: (~torch.isfinite(f)).to(torch.float64)),
            lambda t: torch.count_nonzero(~torch.isfinite(t)).to(torch.float64),
        )
    counts = torch.zeros(len(tensors), dtype=torch.float64)
    if norms is None:
        candidates = range(len(tensors))
    else:
        values = norms.tolist()  # host sync: CPU tensors only, where it costs nothing
        candidates = [i for i, v in enumerate(values) if not math.isfinite(v)]
    for i in candidates:
        counts[i] = (~torch.isfinite(tensors[i])).sum()
    return counts


def temporal_profile(
    grad: Tensor,
    *,
    time_dim: int = 0,
    batch_sizes: Tensor | None = None,
    max_points: int = MAX_TIME_POINTS,
) -> tuple[Tensor, int]:
    """Norm of a sequence gradient at each time step, ``||g_t||_2`` over batch and features.

    ``grad`` is either a padded sequence tensor whose time axis is ``time_dim`` or, when
    ``batch_sizes`` is given, the ``data`` of a ``PackedSequence`` (time-major, ``batch_sizes[t]``
    rows for step ``t``). Returns ``(profile, T)``: ``profile`` holds float64 norms at the time steps
    :func:`time_points` ``(T, max_points)`` picks (all steps when ``T <= max_points``, else evenly
    spaced ones including the first and last), padded with NaN to ``max_points``.

    Example:
        >>> import torch
        >>> from vanishing.stats import temporal_profile
        >>> g = torch.zeros(3, 2, 4); g[0] = 1.0; g[2, 0, 0] = 3.0
        >>> profile, T = temporal_profile(g, time_dim=0, max_points=4)
        >>> T, profile.tolist()[:3]
        (3, [2.8284271247461903, 0.0, 3.0])
    """
    g = grad.detach()
    if batch_sizes is not None:
        lengths = batch_sizes.tolist()  # host sync: batch_sizes of a PackedSequence live on the CPU
        sq = g.to(torch.float64).pow(2).reshape(g.shape[0], -1).sum(dim=1)
        per_step = torch.stack([chunk.sum() for chunk in sq.split(lengths)]).sqrt()
    else:
        g = g.movedim(time_dim, 0)
        per_step = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1, dtype=torch.float64)
    T = per_step.shape[0]
    out = torch.full((max_points,), float("nan"), dtype=torch.float64, device=g.device)
    if max_points >= T:
        out[:T] = per_step
    else:
        out.copy_(per_step[_time_index(T, max_points, g.device)])
    return out, T


@functools.lru_cache(maxsize=256)
def _time_index(T: int, max_points: int, device: torch.device) -> Tensor:
    # Cached so that no host-to-device copy happens on every backward pass.
    return torch.tensor(time_points(T, max_points), device=device)


def time_points(T: int, max_points: int = MAX_TIME_POINTS) -> list[int]:
    """The time steps a temporal profile of a length-``T`` sequence keeps (first and last included).

    Example:
        >>> from vanishing.stats.norms import time_points
        >>> time_points(5), time_points(100, 4)
        ([0, 1, 2, 3, 4], [0, 33, 66, 99])
    """
    if max_points >= T:
        return list(range(T))
    return [round(i * (T - 1) / (max_points - 1)) for i in range(max_points)]
