"""Activation statistics: output moments, mean derivative, saturation and dead units.

Each supported activation has a derivative ``phi'(z)`` computed in closed form from its input
``z`` and/or output ``y`` (no autograd), and a known maximum ``max |phi'|``:

=============  ===========================================  ===============
kind           phi'(z)                                       max |phi'|
=============  ===========================================  ===============
sigmoid        y (1 - y)                                     1/4
tanh           1 - y^2                                       1
softsign       (1 - |y|)^2 = 1 / (1 + |z|)^2                 1
hardtanh       1 if min < z < max else 0                     1
relu           1 if z > 0 else 0                             1
relu6          1 if 0 < z < 6 else 0                         1
leaky_relu     1 if z > 0 else a                             max(1, |a|)
prelu          1 if z > 0 else a (per channel)               max(1, |a|)
elu            1 if z > 0 else y + alpha                     max(1, alpha)
selu           s if z > 0 else y + s alpha                   s alpha
gelu           Phi(z) + z phi(z)  (or the tanh form)         1.1289 (1.1290)
silu           sigmoid(z) (1 + z (1 - sigmoid(z)))           1.0998
=============  ===========================================  ===============

*Saturated* means ``|phi'(z)| < 0.05 max |phi'|`` (the flat tails). It is defined for the
activations that have a flat tail (sigmoid, tanh, softsign, hardtanh, relu6, elu, selu, gelu,
silu) and NaN for the piecewise-linear ReLU family, whose zero side is counted as *dead* instead.
A *dead unit* is a unit (a feature, or a channel of a convolutional map) whose input is <= 0 for
every example of the batch, so that it is off for all of them; defined for relu, relu6,
leaky_relu, prelu, elu and selu, NaN for the others.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from vanishing.recorder.schema import ACTIVATION_STATS

__all__ = [
    "ACTIVATION_KINDS",
    "SATURATION_THRESHOLD",
    "activation_kind",
    "activation_params",
    "activation_stats",
    "activation_stats_stacked",
    "derivative",
    "max_derivative",
    "STAT_NAMES",
]

#: A unit is saturated when ``|phi'(z)|`` is below this fraction of the activation's maximum.
SATURATION_THRESHOLD = 0.05

#: The statistics :func:`activation_stats` returns, in order (the run format's columns).
STAT_NAMES = ACTIVATION_STATS
#: Percentiles of a larger output are read from this many of its entries, drawn at random once
#: per output size (seeded by it: the same entries every step) so that no layout aligns with
#: them (an even stride through a conv map can land on one pixel of every channel). 256 puts
#: a 2nd percentile within ~1 percentile point; selecting from it costs ~1/3 of a 1024-entry
#: selection once training has pushed the buffers out of the cache.
PERCENTILE_SAMPLE = 256

_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805
_MODULE_KINDS: dict[type, str] = {
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Softsign: "softsign",
    nn.ReLU6: "relu6",  # before Hardtanh: ReLU6 subclasses it
    nn.Hardtanh: "hardtanh",
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.ELU: "elu",
    nn.SELU: "selu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
}
ACTIVATION_KINDS: tuple[str, ...] = tuple(_MODULE_KINDS.values())
_HAS_TAIL = {"sigmoid", "tanh", "softsign", "hardtanh", "relu6", "elu", "selu", "gelu", "silu"}
_HAS_OFF_SIDE = {"relu", "relu6", "leaky_relu", "prelu", "elu", "selu"}
_SIGNED_DERIVATIVE = {"gelu", "silu", "prelu", "leaky_relu"}


def activation_kind(module: nn.Module) -> str | None:
    """The activation kind of a module (``"sigmoid"``, ``"relu"``, ...), or None.

    Example:
        >>> from torch import nn
        >>> from vanishing.stats import activation_kind
        >>> activation_kind(nn.Tanh()), activation_kind(nn.Linear(2, 2))
        ('tanh', None)
    """
    for cls in type(module).__mro__:
        kind = _MODULE_KINDS.get(cls)
        if kind is not None:
            return kind
    return None


def activation_params(kind: str, module: nn.Module) -> dict:
    """The options of an activation module that its derivative depends on, as keyword
    arguments of :func:`derivative` and :func:`activation_stats`.

    Example:
        >>> from torch import nn
        >>> from vanishing.stats.activations import activation_params
        >>> activation_params("leaky_relu", nn.LeakyReLU(0.2)), activation_params("tanh", nn.Tanh())
        ({'negative_slope': 0.2}, {})
    """
    if kind == "leaky_relu":
        return {"negative_slope": module.negative_slope}
    if kind == "elu":
        return {"alpha": module.alpha}
    if kind in ("hardtanh", "relu6"):
        return {"min_val": module.min_val, "max_val": module.max_val}
    if kind == "gelu":
        return {"approximate": module.approximate}
    if kind == "prelu":
        return {"weight": module.weight}
    return {}


def max_derivative(kind: str, module: nn.Module | None = None) -> float:
    """The largest ``|phi'(z)|`` of an activation (the saturation threshold is 5% of it).

    Example:
        >>> from vanishing.stats.activations import max_derivative
        >>> max_derivative("sigmoid"), max_derivative("tanh")
        (0.25, 1.0)
    """
    p = activation_params(kind, module) if module is not None else {}
    if kind == "sigmoid":
        return 0.25
    if kind in ("tanh", "softsign", "hardtanh", "relu", "relu6"):
        return 1.0
    if kind == "leaky_relu":
        return max(1.0, abs(p.get("negative_slope", 0.01)))
    if kind == "prelu":
        w = p.get("weight")
        # host sync: at most once per layer, when the manifest is written
        return 1.0 if w is None else max(1.0, float(w.detach().abs().max()))
    if kind == "elu":
        return max(1.0, p.get("alpha", 1.0))
    if kind == "selu":
        return _SELU_SCALE * _SELU_ALPHA
    if kind == "gelu":
        return 1.1289761 if p.get("approximate", "none") == "none" else 1.1290463
    if kind == "silu":
        return 1.0998393
    raise ValueError(f"unknown activation kind {kind!r}; expected one of {ACTIVATION_KINDS}")


def derivative(
    kind: str,
    z: Tensor | None,
    y: Tensor | None,
    *,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    min_val: float = -1.0,
    max_val: float = 1.0,
    approximate: str = "none",
    weight: Tensor | None = None,
) -> Tensor | None:
    """``phi'(z)`` elementwise, from the input ``z`` and/or the output ``y`` of the activation.

    Returns None when the inputs it needs are missing (e.g. the input of an in-place SiLU was
    overwritten).

    Example:
        >>> import torch
        >>> from vanishing.stats import derivative
        >>> z = torch.tensor([0.0, 2.0])
        >>> derivative("sigmoid", z, torch.sigmoid(z)).tolist()[0], derivative("relu", z, None).tolist()
        (0.25, [0.0, 1.0])
    """
    if kind == "sigmoid":
        s = y if y is not None else torch.sigmoid(z)
        return s * (1 - s)
    if kind == "tanh":
        t = y if y is not None else torch.tanh(z)
        return 1 - t * t
    if kind == "softsign":
        if y is not None:
            return (1 - y.abs()).square()
        return (1 + z.abs()).reciprocal().square()
    x = z if z is not None else y  # the sign of the output is the sign of the input below
    if kind == "hardtanh":
        return ((x > min_val) & (x < max_val)).to(x.dtype)
    if kind == "relu":
        return (x > 0).to(x.dtype)
    if kind == "relu6":
        if z is None:
            return ((y > 0) & (y < 6)).to(y.dtype)
        return ((z > 0) & (z < 6)).to(z.dtype)
    if kind == "leaky_relu":
        return torch.where(x > 0, 1.0, negative_slope).to(x.dtype)
    if kind == "prelu":
        if z is None or weight is None:
            return None
        a = weight.detach()
        if a.numel() > 1 and a.dim() == 1 and z.dim() >= 2:
            a = a.view([1, -1] + [1] * (z.dim() - 2))
        return torch.where(z > 0, torch.ones_like(z), a.to(z.dtype).expand_as(z))
    if kind == "elu":
        if y is None:
            return torch.where(z > 0, 1.0, alpha * torch.exp(z)).to(z.dtype)
        return torch.where(y > 0, 1.0, y + alpha).to(y.dtype)
    if kind == "selu":
        if y is None:
            return torch.where(z > 0, _SELU_SCALE, _SELU_SCALE * _SELU_ALPHA * torch.exp(z))
        return torch.where(y > 0, _SELU_SCALE, y + _SELU_SCALE * _SELU_ALPHA).to(y.dtype)
    if kind == "gelu":
        if z is None:
            return None
        if approximate == "tanh":
            c = math.sqrt(2.0 / math.pi)
            u = c * (z + 0.044715 * z.pow(3))
            t = torch.tanh(u)
            return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
        return cdf + z * pdf
    if kind == "silu":
        if z is None:
            return None
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    raise ValueError(f"unknown activation kind {kind!r}; expected one of {ACTIVATION_KINDS}")


def activation_stats(
    kind: str,
    z: Tensor | None,
    y: Tensor,
    *,
    unit_dim: int = -1,
    max_deriv: float | None = None,
    **params,
) -> Tensor:
    """Statistics of one activation call, as a float64 vector in :data:`STAT_NAMES` order.

    ``[mean(y), std(y), mean(phi'(z)), saturated fraction, dead fraction, p2(y), p98(y)]`` where
    the saturated fraction is the share of entries with ``|phi'(z)| < 0.05 * max|phi'|``, the dead
    fraction the share of units (indices along ``unit_dim``; the first axis is the batch) whose
    input is ``<= 0`` for every example, and p2, p98 the 2nd and 98th percentiles of the output
    (nearest rank, i.e. the smallest value with at least that share of entries at or below it;
    from a fixed sample of :data:`PERCENTILE_SAMPLE` entries when there are more). Entries that do not apply to ``kind``, or that cannot be computed
    from the tensors given, are NaN. Everything stays on the tensors' device.

    Example:
        >>> import torch
        >>> from vanishing.stats import activation_stats
        >>> z = torch.tensor([[-1.0, 2.0], [-3.0, 4.0]])
        >>> activation_stats("relu", z, torch.relu(z), unit_dim=1).tolist()[2:5]
        [0.5, nan, 0.5]
    """
    zs = z.unsqueeze(0) if z is not None else None
    return activation_stats_stacked(
        kind, zs, y.unsqueeze(0), unit_dim=unit_dim, max_deriv=max_deriv, **params
    )[0]


def activation_stats_stacked(
    kind: str,
    z: Tensor | None,
    y: Tensor,
    *,
    unit_dim: int = -1,
    max_deriv: float | None = None,
    **params,
) -> Tensor:
    """:func:`activation_stats` of ``L`` calls at once: ``z``, ``y`` are stacked ``[L, batch, ...]``.

    Returns an ``[L, 7]`` float64 tensor; one reduction kernel per statistic serves all ``L``
    calls (the monitor stacks the same-shaped outputs of all layers of one kind).

    Example:
        >>> import torch
        >>> from vanishing.stats.activations import activation_stats_stacked
        >>> y = torch.sigmoid(torch.zeros(3, 4, 2))   # three calls, output 0.5 everywhere
        >>> activation_stats_stacked("sigmoid", None, y)[:, 2].tolist()   # mean sigmoid'(0)
        [0.25, 0.25, 0.25]
    """
    y = y.detach()
    work = y.reshape(y.shape[0], -1)
    work = work.clone() if work.dtype in (torch.float32, torch.float64) else work.float()
    return stats_into(
        kind,
        z.detach() if z is not None else None,
        y,
        work,
        torch.empty_like(work),
        unit_dim=unit_dim,
        max_deriv=max_deriv,
        **params,
    )


def stats_into(
    kind: str,
    z: Tensor | None,
    y: Tensor,
    work: Tensor,
    scratch: Tensor,
    *,
    unit_dim: int = -1,
    max_deriv: float | None = None,
    **params,
) -> Tensor:
    """:func:`activation_stats_stacked` computed in two caller-owned ``[L, N]`` buffers.

    ``work`` holds a copy of ``y`` (flattened per call) and is overwritten, like ``scratch``.
    Everything is in-place float arithmetic on those two buffers (boolean reductions and fresh
    multi-megabyte temporaries are what make such statistics slow on a CPU), so a caller that
    keeps the buffers between steps pays no allocation at all.
    """
    L = work.shape[0]
    nan = torch.full((L,), float("nan"), dtype=work.dtype, device=work.device)
    p02, p98 = _percentiles(work)  # before `work` is overwritten
    dead = nan
    if kind in _HAS_OFF_SIDE and y.dim() >= 3:
        x = z if z is not None else y
        unit = unit_dim % (y.dim() - 1) + 1  # the unit axis of one call's tensor, shifted by L
        others = [i for i in range(1, x.dim()) if i != unit]
        peak = x.amax(dim=others)  # [L, units]: a unit is dead if even its peak input is <= 0
        dead = (peak <= 0).to(work.dtype).mean(dim=1)
    mean = work.mean(dim=1)
    d = _derivative_into(kind, z, y, work, scratch, params)
    if d is None:
        deriv_mean, saturated = nan, nan
    else:
        deriv_mean = d.mean(dim=1)
        if kind in _HAS_TAIL:
            bound = max_deriv if max_deriv is not None else max_derivative(kind)
            if kind in _SIGNED_DERIVATIVE:
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


def _derivative_into(kind, z, y, work, scratch, params) -> Tensor | None:
    """phi' as an [L, N] tensor, written into ``scratch`` for the common bounded kinds."""
    if kind == "sigmoid":  # y - y^2, in one pass
        return torch.addcmul(work, work, work, value=-1.0, out=scratch)
    if kind == "tanh":  # 1 - y^2, in one pass
        one = torch.ones((), dtype=work.dtype, device=work.device)
        return torch.addcmul(one, work, work, value=-1.0, out=scratch)
    if kind == "softsign":  # (1 - |y|)^2
        return torch.abs(work, out=scratch).neg_().add_(1.0).square_()
    if kind == "prelu" and params.get("weight") is not None and y.dim() >= 3:
        w = params["weight"].detach()
        if w.numel() > 1:  # one slope per channel: dim 1 of a call's tensor, dim 2 here
            params = {**params, "weight": w.view([1, 1, -1] + [1] * (y.dim() - 3))}
    d = derivative(kind, z, y, **params)
    if d is None:
        return None
    return scratch.copy_(d.reshape(scratch.shape))
