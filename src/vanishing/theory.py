"""Mean-field theory of signal and gradient propagation through deep feed-forward stacks.

A stack ``h_{l+1} = W_{l+1} phi(h_l) + b_{l+1}`` with weights ``W ~ N(0, sigma_w^2 / fan_in)``
and biases ``b ~ N(0, sigma_b^2)``, in the limit of infinite width (Poole et al. 2016,
"Exponential expressivity in deep neural networks through transient chaos"; Schoenholz et al.
2017, "Deep information propagation"). With ``z ~ N(0, 1)``:

- the **length map** ``q_{l+1} = sigma_w^2 E[phi(sqrt(q_l) z)^2] + sigma_b^2`` carries the mean
  square pre-activation ``q`` from layer to layer; its attracting fixed point is ``q*``;
- ``chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2]`` is the factor by which the squared norm of the
  back-propagated error signal ``dL/dh`` grows per layer (going back), so ``chi_1 < 1`` is the
  **ordered** phase (vanishing gradients), ``chi_1 > 1`` the **chaotic** one (exploding), and
  ``chi_1 = 1`` the **critical** line (the edge of chaos);
- the gradient depth scale ``-1 / log chi_1`` (the layers over which the squared gradient changes
  by a factor e; negative when it grows), and the correlation depth scale
  ``xi_c = -1 / log chi_c`` with ``chi_c = sigma_w^2 E[phi'(u_1) phi'(u_2)]`` at the fixed point
  ``c*`` of the correlation map (``chi_c = chi_1`` in the ordered phase, where ``c* = 1``).

Expectations are Gauss-Hermite quadratures (:func:`numpy.polynomial.hermite_e.hermegauss`,
:data:`NODES` nodes; tests check them against adaptive integration). The derivatives ``phi'`` are
those of :mod:`vanishing.activations` (the ones whose statistics runs record); the forward
functions are torch's own. torch is imported when a function runs, not at import.

See docs/theory.md for the formulas, the special cases (ReLU without bias has no finite ``q*``)
and :func:`predict`, which applies the same propagation to a real model's weights.

Example:
    >>> from vanishing import theory
    >>> r = theory.mean_field("tanh", sigma_w2=1.0, sigma_b2=0.05)
    >>> round(r.q_star, 4), round(r.chi1, 4), r.phase
    (0.1936, 0.759, 'ordered')
    >>> round(theory.critical_sigma_w2("tanh", sigma_b2=0.05), 4)
    1.761
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = [
    "KINDS",
    "NODES",
    "MeanField",
    "mean_field",
    "critical_sigma_w2",
    "length_map",
    "chi",
    "LayerPrediction",
    "Prediction",
    "predict",
    "phase_diagram",
    "model_phase_diagram",
]

#: Activation kinds the theory knows (names as in :mod:`vanishing.activations`; ``"linear"`` is
#: the identity, ``"erf"`` the error function, ``"softplus"`` ``log(1 + e^x)``). Aliases:
#: ``"swish"`` for ``"silu"``, ``"identity"`` for ``"linear"``.
KINDS = (
    "linear",
    "tanh",
    "sigmoid",
    "softsign",
    "hardtanh",
    "erf",
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
    "silu",
    "quick_gelu",
    "softplus",
)
_ALIASES = {"swish": "silu", "identity": "linear"}
#: kinds whose derivative the theory defines itself (the registry has no entry for them)
_OWN_DERIVATIVE = ("linear", "erf", "softplus")

#: Gauss-Hermite nodes of the one-dimensional expectations. Smooth activations converge to
#: machine precision with far fewer; 200 keeps the kinked ones (ELU, SELU at 0) within ~1e-7 of
#: adaptive integration (tests/test_theory.py checks both).
NODES = 200
#: nodes per dimension of the two-dimensional expectations of the correlation map
NODES_2D = 96
#: |chi_1 - 1| at or below this is the critical line; anything else is ordered or chaotic
CRITICAL_TOL = 1e-6
# q searched over [_Q_MIN, _Q_MAX]: beyond, the fixed point is reported as 0 or inf, and chi_1 is
# the limit taken at _Q_ZERO / _Q_INF
_Q_MIN, _Q_MAX = 1e-30, 1e15
_Q_ZERO, _Q_INF = 1e-24, 1e12
_Z = 12.0  # the split quadrature integrates z over [-_Z, _Z]


# ------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class _Phi:
    """An activation the theory can integrate: its kind and options (hashable)."""

    kind: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def kinks(self) -> tuple[float, ...]:
        """Where phi' jumps (x values): the split quadrature breaks the integral there."""
        p, k = self.params, self.kind
        if k in ("relu", "leaky_relu", "elu", "selu", "softsign"):  # softsign: |x|
            return (0.0,)
        if k == "hardtanh":
            return (float(p.get("min_val", -1.0)), float(p.get("max_val", 1.0)))
        if k == "relu6":
            return (float(p.get("min_val", 0.0)), float(p.get("max_val", 6.0)))
        return ()

    @property
    def breaks(self) -> tuple[float, ...]:
        """Where the quadrature splits the line: the kinks and 0 (where the Gaussian peaks)."""
        return tuple(sorted({0.0, *self.kinks}))

    def label(self) -> str:
        if not self.options:
            return self.kind
        return f"{self.kind}({', '.join(f'{k}={v}' for k, v in self.options)})"

    def forward(self, x):
        """phi(x) for a float64 tensor, by torch's own functions."""
        import torch
        from torch.nn import functional as F

        p, k = self.params, self.kind
        if k == "linear":
            return x
        if k == "tanh":
            return torch.tanh(x)
        if k == "sigmoid":
            return torch.sigmoid(x)
        if k == "softsign":
            return F.softsign(x)
        if k in ("hardtanh", "relu6"):
            lo, hi = (-1.0, 1.0) if k == "hardtanh" else (0.0, 6.0)
            return F.hardtanh(x, p.get("min_val", lo), p.get("max_val", hi))
        if k == "erf":
            return torch.erf(x)
        if k == "relu":
            return F.relu(x)
        if k == "leaky_relu":
            return F.leaky_relu(x, **p)
        if k == "elu":
            return F.elu(x, **p)
        if k == "selu":
            return F.selu(x)
        if k == "gelu":
            return F.gelu(x, **p)
        if k == "silu":
            return F.silu(x)
        if k == "quick_gelu":
            return x * torch.sigmoid(1.702 * x)
        if k == "softplus":
            return F.softplus(x, **p)
        raise AssertionError(k)  # _resolve admits only KINDS

    def derivative(self, x):
        """phi'(x): the registry's definition where it has one (one definition per idea)."""
        import torch

        k = self.kind
        if k == "linear":
            return torch.ones_like(x)
        if k == "erf":
            return (2.0 / math.sqrt(math.pi)) * torch.exp(-x * x)
        if k == "softplus":
            return torch.sigmoid(self.params.get("beta", 1.0) * x)
        from vanishing import activations

        return activations.get(k).derivative(x, None, **self.params).to(x.dtype)


def _resolve(activation: Any) -> _Phi:
    """A kind name or an activation module -> _Phi; a one-line ValueError otherwise."""
    accepted = f"expected one of {', '.join(KINDS)} (or swish, identity), or a module of those"
    if isinstance(activation, _Phi):
        return activation
    if isinstance(activation, str):
        kind = _ALIASES.get(activation.lower(), activation.lower())
        if kind not in KINDS:
            raise ValueError(f"unknown activation {activation!r} for the theory; {accepted}")
        return _Phi(kind)
    return _from_module(activation, accepted)


def _from_module(module: Any, accepted: str) -> _Phi:
    from vanishing import activations

    names = {cls.__name__ for cls in type(module).__mro__}
    if "Identity" in names:
        return _Phi("linear")
    if "Softplus" in names:
        return _Phi(
            "softplus", (("beta", float(module.beta)), ("threshold", float(module.threshold)))
        )
    entry = activations.for_module(module)
    if entry is None:
        raise ValueError(f"activation {type(module).__name__} is unknown to the theory; {accepted}")
    params = entry.params(module)
    if entry.kind == "prelu":
        w = params.get("weight")
        if w is None or w.numel() != 1:
            raise ValueError(
                "a PReLU with one slope per channel is not an elementwise map the theory can "
                "integrate; use nn.PReLU(num_parameters=1)"
            )
        # host sync: once, reading the single slope
        return _Phi("leaky_relu", (("negative_slope", float(w.detach().reshape(()))),))
    if entry.kind not in KINDS:
        raise ValueError(f"activation kind {entry.kind!r} is unknown to the theory; {accepted}")
    options = tuple(
        sorted((k, float(v) if isinstance(v, (int, float)) else v) for k, v in params.items())
    )
    return _Phi(entry.kind, options)


# ---------------------------------------------------------------------------- quadrature


@lru_cache(maxsize=8)
def _nodes(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilists' Gauss-Hermite nodes and weights normalised to the N(0, 1) density."""
    from numpy.polynomial.hermite_e import hermegauss

    z, w = hermegauss(n)
    return z, w / math.sqrt(2.0 * math.pi)


@lru_cache(maxsize=8)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    from numpy.polynomial.legendre import leggauss

    return leggauss(n)


def _check_nodes(nodes: Any) -> int:
    if isinstance(nodes, bool) or not isinstance(nodes, (int, np.integer)) or nodes < 8:
        raise ValueError(f"nodes must be an integer >= 8, got {nodes!r}")
    return int(nodes)


def _split_rule(breaks: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of E[f(z)], z ~ N(0, 1), for f smooth between ``breaks``.

    ``breaks``: shape (..., K), the points in z where f has a kink (one row per rule). Each of the
    K + 1 pieces of [-_Z, _Z] gets n Gauss-Legendre nodes (a break outside clips to the end, its
    piece has zero length and zero weight); the Gaussian mass beyond _Z = 12 is below 1e-32.
    Returns arrays of shape (..., (K + 1) n).
    """
    x, wl = _legendre(n)
    b = np.sort(np.clip(breaks, -_Z, _Z), axis=-1)
    ends = np.full(b.shape[:-1] + (1,), _Z)
    edges = np.concatenate([-ends, b, ends], axis=-1)
    lo, hi = edges[..., :-1, None], edges[..., 1:, None]
    z = 0.5 * (lo + hi) + 0.5 * (hi - lo) * x
    w = 0.5 * (hi - lo) * wl * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    shape = b.shape[:-1] + (-1,)
    w = w.reshape(shape)
    # the rule integrates the density to 1 - 1e-15; exactly 1 makes constants exact (linear, ReLU)
    return z.reshape(shape), w / w.sum(-1, keepdims=True)


def _kink_breaks(phi: _Phi, q: np.ndarray) -> np.ndarray:
    """The kinks of phi as points in z = x / sqrt(q): shape q.shape + (K,)."""
    k = np.asarray(phi.breaks, dtype=np.float64)
    s = np.sqrt(q)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(k == 0, 0.0, k / s)  # q = 0: a kink away from 0 is at +-inf in z
    return np.where(np.isnan(out), 0.0, out)


def _expect(phi: _Phi, q: np.ndarray, what: str, nodes: int) -> np.ndarray:
    """E[f(sqrt(q) z)] for each q, f = phi^2 (``"phi2"``) or phi'^2 (``"dphi2"``).

    Gauss-Legendre on each smooth piece of [-12, 12] in z, split at 0 and at the activation's
    kinks (see :func:`_split_rule`). Gauss-Hermite (``hermegauss``) was the first choice but
    converges only algebraically across a kink (SELU's q* is 1e-4 off with 200 nodes) and slowly
    for tanh at large q (1e-8 at q = 4; more than ~400 nodes overflow in numpy).
    """
    import torch

    q = np.asarray(q, dtype=np.float64)
    z, w = _split_rule(_kink_breaks(phi, q), max(8, nodes // 2))
    x = np.sqrt(q)[..., None] * z
    t = torch.from_numpy(np.ascontiguousarray(x))
    f = phi.forward(t) if what == "phi2" else phi.derivative(t)
    return (f.square().numpy() * w).sum(-1)


def _number(name: str, value: Any, *, low: float = 0.0, strict: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < low or (strict and v == low):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


def length_map(
    activation: Any, q: Any, sigma_w2: float, sigma_b2: float = 0.0, *, nodes: int = NODES
) -> Any:
    """One step of the length map: ``sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2``.

    ``q`` is a number or an array of them (the result has its shape). ``activation`` is a kind
    name of :data:`KINDS` or an activation module (its options, e.g. a LeakyReLU's slope, apply).

    Example:
        >>> from vanishing.theory import length_map
        >>> round(length_map("relu", 3.0, sigma_w2=2.0), 12)      # ReLU: E[relu(x)^2] = q/2
        3.0
        >>> round(float(length_map("linear", 1.0, 0.5, 0.1)), 12)  # linear: sigma_w^2 q + sigma_b^2
        0.6
    """
    phi = _resolve(activation)
    sw2 = _number("sigma_w2", sigma_w2)
    sb2 = _number("sigma_b2", sigma_b2)
    qa = np.asarray(q, dtype=np.float64)
    if not np.all(np.isfinite(qa)) or np.any(qa < 0):
        raise ValueError(f"q must be finite and >= 0, got {q!r}")
    out = sw2 * _expect(phi, qa, "phi2", _check_nodes(nodes)) + sb2
    return float(out) if out.ndim == 0 else out


def chi(activation: Any, q: Any, sigma_w2: float, *, nodes: int = NODES) -> Any:
    """The gradient factor at pre-activation mean square ``q``: ``sigma_w^2 E[phi'(sqrt(q) z)^2]``.

    The squared norm of the error signal ``dL/dh_l`` is ``chi`` times that of ``dL/dh_{l+1}``
    (``sigma_w^2`` of the weights of layer ``l + 1``, ``q`` of layer ``l``). At ``q = q*`` it is
    ``chi_1``.

    Example:
        >>> from vanishing.theory import chi
        >>> round(chi("relu", 5.0, sigma_w2=2.0), 12), round(chi("linear", 0.3, sigma_w2=0.7), 12)
        (1.0, 0.7)
    """
    phi = _resolve(activation)
    sw2 = _number("sigma_w2", sigma_w2)
    qa = np.asarray(q, dtype=np.float64)
    if not np.all(np.isfinite(qa)) or np.any(qa < 0):
        raise ValueError(f"q must be finite and >= 0, got {q!r}")
    out = sw2 * _expect(phi, qa, "dphi2", _check_nodes(nodes))
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------------------- fixed points


def _brentq(f, a: float, b: float) -> float:
    from scipy.optimize import brentq  # scikit-learn's dependency, so always installed

    return float(brentq(f, a, b, xtol=1e-300, rtol=1e-15, maxiter=200))


def _q_star(phi: _Phi, sw2: float, sb2: float, q0: float, nodes: int) -> float:
    """The fixed point the length map reaches from ``q0``: 0.0 or inf when it runs off.

    ``E[phi(sqrt(q) z)^2]`` grows with ``q`` for every activation of :data:`KINDS`, so the
    iteration from ``q0`` moves monotonically to the nearest fixed point on the side where
    ``f(q0) - q0`` points; it is bracketed by doubling (or halving) and solved by Brent's method.
    """

    def g(q: float) -> float:
        return float(sw2 * _expect(phi, np.asarray(q), "phi2", nodes) + sb2 - q)

    g0 = g(q0)
    if abs(g0) <= 1e-13 * q0:  # every q is a fixed point (ReLU at sigma_w^2 = 2, no bias)
        return q0
    # a map that is q + sigma_b^2 (ReLU at 2, linear at 1) rounds to g = 0 at q ~ 1e14: a g
    # within rounding of 0 keeps the search going, so it reports inf rather than a spurious root
    tol = 1e-12
    if g0 > 0:
        a, b = q0, 2.0 * q0
        while g(b) > -tol * b:
            a, b = b, 2.0 * b
            if b > _Q_MAX:
                return math.inf
        return a if g(a) <= 0 else _brentq(g, a, b)
    a, b = 0.5 * q0, q0
    while g(a) < tol * a:
        a, b = 0.5 * a, a
        if a < _Q_MIN:
            return 0.0
    return b if g(b) >= 0 else _brentq(g, a, b)


def _chi1_at(phi: _Phi, sw2: float, q_star: float, nodes: int) -> float:
    # q* = 0 or inf: the limit of chi(q), taken at a tiny or huge q
    q = _Q_ZERO if q_star == 0 else (_Q_INF if math.isinf(q_star) else q_star)
    return float(sw2 * _expect(phi, np.asarray(q), "dphi2", nodes))


def _phase(chi1: float) -> str:
    if abs(chi1 - 1.0) <= CRITICAL_TOL:
        return "critical"
    return "ordered" if chi1 < 1.0 else "chaotic"


def _depth(chi_value: float) -> float:
    if not math.isfinite(chi_value) or chi_value < 0:
        return math.nan
    if abs(chi_value - 1.0) <= CRITICAL_TOL:
        return math.inf
    if chi_value == 0:
        return 0.0
    return -1.0 / math.log(chi_value)


def _correlation(phi: _Phi, sw2: float, sb2: float, q: float) -> tuple[float, float]:
    """(c*, chi_c) in the chaotic phase: the stable fixed point c* < 1 of the correlation map
    ``c -> (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q*`` and ``sigma_w^2 E[phi'(u1) phi'(u2)]``
    there, with ``u1 = sqrt(q*) z1``, ``u2 = sqrt(q*) (c z1 + sqrt(1 - c^2) z2)``."""
    import torch

    root = math.sqrt(q)
    n = max(8, NODES_2D // 2)
    z1, w1 = _split_rule(_kink_breaks(phi, np.asarray(q)), n)
    u1 = torch.from_numpy(root * z1)
    f1 = phi.forward(u1).numpy()[:, None]
    d1 = phi.derivative(u1).numpy()[:, None]

    def inner(c: float) -> tuple[Any, np.ndarray]:
        """u2 on the nodes of z2 given each z1 (split where c z1 + s z2 is a break of phi, in
        units of sqrt(q)), and the product weights."""
        s = math.sqrt(max(0.0, 1.0 - c * c))
        k = np.asarray(phi.breaks)[None, :] / root
        with np.errstate(divide="ignore", invalid="ignore"):
            b = (k - c * z1[:, None]) / s if s > 0 else np.full((len(z1), k.shape[1]), np.inf)
        z2, w2 = _split_rule(np.nan_to_num(b, nan=0.0), n)
        u2 = torch.from_numpy(np.ascontiguousarray(root * (c * z1[:, None] + s * z2)))
        return u2, w1[:, None] * w2

    def k(c: float) -> float:
        u2, ww = inner(c)
        return float((sw2 * (ww * f1 * phi.forward(u2).numpy()).sum() + sb2) / q - c)

    if abs(k(0.0)) < 1e-13:  # an odd activation without bias: uncorrelated inputs stay so
        c_star = 0.0
    else:
        lo = 0.0 if k(0.0) > 0 else -1.0
        c_star = 1.0
        for delta in (0.5, 0.2, 0.1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8):
            hi = 1.0 - delta
            if hi <= lo:
                continue
            if k(hi) < 0:
                c_star = _brentq(k, lo, hi)
                break
            lo = hi
    u2, ww = inner(c_star)
    chi_c = float(sw2 * (ww * d1 * phi.derivative(u2).numpy()).sum())
    return c_star, chi_c


@dataclass(frozen=True)
class MeanField:
    """What the mean-field theory says of one (activation, sigma_w^2, sigma_b^2).

    Attributes:
        activation: the kind (with its options when not the defaults, ``"leaky_relu(...)"``).
        sigma_w2, sigma_b2: the weight variance times fan-in, and the bias variance.
        q_star: the attracting fixed point of the length map reached from ``q0``; ``0.0`` when
            the signal dies out (e.g. ReLU with ``sigma_w^2 < 2`` and no bias), ``inf`` when it
            grows without bound (ReLU with ``sigma_w^2 > 2``), in both cases geometrically.
        chi1: ``sigma_w^2 E[phi'(sqrt(q*) z)^2]``, the squared-gradient factor per layer (the
            limit ``q -> 0`` or ``q -> inf`` when ``q_star`` is 0 or inf).
        depth_scale: ``-1 / log chi1``: layers over which the squared gradient shrinks by a
            factor e (negative: grows); inf on the critical line.
        phase: ``"ordered"`` (chi1 < 1), ``"critical"`` (|chi1 - 1| <= 1e-6) or ``"chaotic"``.
        c_star: the fixed point of the correlation map (1 in the ordered phase and on the
            critical line; NaN in the chaotic phase when ``q_star`` is not finite and positive).
        chi_c: ``sigma_w^2 E[phi'(u1) phi'(u2)]`` at ``c_star`` (= chi1 where ``c_star = 1``).
        correlation_depth_scale: Schoenholz et al.'s ``xi_c = -1 / log chi_c``: inf on the
            critical line, finite on both sides.

    Example:
        >>> from vanishing.theory import mean_field
        >>> r = mean_field("relu", sigma_w2=2.0, sigma_b2=0.0)
        >>> round(r.chi1, 12), r.phase, r.depth_scale
        (1.0, 'critical', inf)
    """

    activation: str
    sigma_w2: float
    sigma_b2: float
    q_star: float
    chi1: float
    depth_scale: float
    phase: str
    c_star: float
    chi_c: float
    correlation_depth_scale: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (floats as they are, inf included)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def mean_field(
    activation: Any,
    sigma_w2: float,
    sigma_b2: float = 0.0,
    *,
    q0: float = 1.0,
    nodes: int = NODES,
) -> MeanField:
    """The fixed point, gradient factor, depth scales and phase of a deep stack (infinite width).

    ``activation``: a kind of :data:`KINDS` or an activation module (``nn.LeakyReLU(0.2)``);
    ``sigma_w2``: weight variance times fan-in (He init for ReLU: 2; LeCun/Xavier-like: 1);
    ``sigma_b2``: bias variance; ``q0``: where the length map starts (it picks the fixed point
    reached when several attract, and is the answer where every ``q`` is fixed).

    Example:
        >>> from vanishing.theory import mean_field
        >>> r = mean_field("tanh", sigma_w2=1.5, sigma_b2=0.05)
        >>> round(r.q_star, 4), round(r.chi1, 4), round(r.depth_scale, 2), r.phase
        (0.418, 0.9386, 15.79, 'ordered')
        >>> r = mean_field("linear", sigma_w2=0.5, sigma_b2=0.1)   # q* = 0.1 / (1 - 0.5)
        >>> round(r.q_star, 12), r.chi1
        (0.2, 0.5)
    """
    phi = _resolve(activation)
    sw2 = _number("sigma_w2", sigma_w2)
    sb2 = _number("sigma_b2", sigma_b2)
    q0 = _number("q0", q0, strict=True)
    nodes = _check_nodes(nodes)
    q_star = _q_star(phi, sw2, sb2, q0, nodes)
    chi1 = _chi1_at(phi, sw2, q_star, nodes)
    phase = _phase(chi1)
    if phase != "chaotic":
        c_star, chi_c = 1.0, chi1
    elif 0 < q_star < math.inf:
        c_star, chi_c = _correlation(phi, sw2, sb2, q_star)
    else:
        c_star = chi_c = math.nan
    return MeanField(
        activation=phi.label(),
        sigma_w2=sw2,
        sigma_b2=sb2,
        q_star=q_star,
        chi1=chi1,
        depth_scale=_depth(chi1),
        phase=phase,
        c_star=c_star,
        chi_c=chi_c,
        correlation_depth_scale=_depth(chi_c),
    )


def critical_sigma_w2(activation: Any, sigma_b2: float = 0.0, *, nodes: int = NODES) -> float:
    """The weight variance (times fan-in) at which ``chi_1 = 1`` for this bias variance.

    Solved by Brent's method on ``chi_1(sigma_w^2) - 1`` (each ``chi_1`` at its own fixed point
    ``q*``). A ``ValueError`` when there is none below ``sigma_w^2 = 1e6``.

    Example:
        >>> from vanishing.theory import critical_sigma_w2
        >>> round(critical_sigma_w2("relu"), 12), round(critical_sigma_w2("tanh", 0.0), 4)
        (2.0, 1.0)
    """
    phi = _resolve(activation)
    sb2 = _number("sigma_b2", sigma_b2)
    nodes = _check_nodes(nodes)

    def h(sw2: float) -> float:
        return _chi1_at(phi, sw2, _q_star(phi, sw2, sb2, 1.0, nodes), nodes) - 1.0

    a, b = 1e-3, 1.0
    if h(a) >= 0:
        raise ValueError(f"chi_1 of {phi.label()} is >= 1 already at sigma_w2 = {a:g}")
    while h(b) < 0:
        a, b = b, 2.0 * b
        if b > 1e6:
            raise ValueError(
                f"{phi.label()} has no critical sigma_w2 below 1e6 at sigma_b2 = {sb2:g}"
            )
    return _brentq(h, a, b)


# ------------------------------------------------------------------------------ a real model


@dataclass(frozen=True)
class LayerPrediction:
    """The prediction for one layer (a Linear or Conv) of a feed-forward stack.

    Attributes:
        name: the layer's qualified module name (as in ``model.named_modules()``).
        activation: the activation applied to its output (``"linear"`` when none).
        width: its number of output units (channels for a convolution).
        sigma_w2: ``fan_in * mean(W^2)``, the weight variance the layer actually has.
        sigma_b2: ``mean(b^2)`` (0 without a bias).
        q: the predicted mean square of its pre-activations (mean over the batch's examples).
        chi: the predicted factor ``||dL/dh_l||^2 / ||dL/dh_{l+1}||^2`` of the squared error
            signal going back from the next layer to this one (``sigma_w^2`` of the next layer,
            ``phi'`` of this one's activation at ``q``); None for the last layer.

    Example:
        >>> from vanishing.theory import LayerPrediction
        >>> LayerPrediction("0", "relu", 64, 2.0, 0.0, 1.3, 1.0).chi
        1.0
    """

    name: str
    activation: str
    width: int
    sigma_w2: float
    sigma_b2: float
    q: float
    chi: float | None


@dataclass(frozen=True)
class Prediction:
    """What :func:`predict` says of a model: per layer, and from the first to the last.

    Attributes:
        layers: one :class:`LayerPrediction` per Linear/Conv layer, in forward order.
        ratio: the predicted ``||dL/dh||`` of the first hidden layer over that of the last
            hidden layer (every layer but the output layer is hidden, as in
            :func:`vanishing.recorder.semantics.hidden_layers`): ``sqrt`` of the product of
            their ``chi``; 1.0 with a single hidden layer.
        caveats: the assumptions of the theory this model breaks (normalization layers that
            were passed over, something computed between two modules such as a residual
            connection); empty for a plain stack.

    Example:
        >>> from vanishing.theory import LayerPrediction, Prediction
        >>> p = Prediction([LayerPrediction("0", "tanh", 8, 1.0, 0.0, 1.0, 0.25),
        ...                 LayerPrediction("2", "tanh", 8, 1.0, 0.0, 0.4, 0.5),
        ...                 LayerPrediction("4", "linear", 2, 1.0, 0.0, 0.3, None)])
        >>> p.ratio, p.plain
        (0.5, True)
    """

    layers: list[LayerPrediction]
    caveats: list[str] = field(default_factory=list)

    @property
    def plain(self) -> bool:
        """True when the model is a plain stack the theory describes (no caveats)."""
        return not self.caveats

    @property
    def ratio(self) -> float:
        chis = [x.chi for x in self.layers[:-2]]
        return math.sqrt(math.prod(chis)) if chis else 1.0

    @property
    def chis(self) -> list[float]:
        """The per-layer factors (every layer but the last)."""
        return [x.chi for x in self.layers[:-1]]

    def phase_diagram(self, **kwargs: Any):
        """The mean-field phase diagram of the hidden layers' activation, with the model marked
        (:func:`model_phase_diagram` of the hidden layers, every layer but the output layer).
        Returns a matplotlib ``Figure``; ``ValueError`` when the model has no hidden layer.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from vanishing.theory import predict
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
            ...                       nn.Linear(64, 2))
            >>> fig = predict(model, torch.randn(8, 64)).phase_diagram(resolution=5)
            >>> lo, hi = fig.axes[0].get_xlim()
            >>> bool(lo < 1 / 3 < hi)  # PyTorch's default init: sigma_w^2 = 1/3
            True
        """
        points = [(x.activation, x.sigma_w2, x.sigma_b2) for x in self.layers[:-1]]
        return model_phase_diagram(points, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict: layers (as dicts), ratio, caveats."""
        return {
            "layers": [dict(vars(x)) for x in self.layers],
            "ratio": self.ratio,
            "caveats": list(self.caveats),
        }


#: modules passed through as the identity when walking a stack
_PASS_THROUGH = ("Identity", "Flatten", "Unflatten")


def _kind_of_module(module: Any) -> str:
    """'layer', 'activation', 'pass', 'norm', or 'other' (with the reason in its name)."""
    import torch

    from vanishing.recorder.semantics import is_normalization

    name = type(module).__name__
    if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return "layer"
    if name in _PASS_THROUGH:
        return "pass"
    if isinstance(module, torch.nn.Dropout) and module.p == 0:
        return "pass"
    if is_normalization(name):
        return "norm"
    try:
        _resolve(module)
    except ValueError:
        return "other"
    return "activation"


def predict(model: Any, inputs: Any, *, nodes: int = NODES) -> Prediction:
    """Predict the gradient factors of a feed-forward model from its actual weights and inputs.

    One forward pass (no gradient, the model untouched) finds the leaf modules in the order they
    run. It must be a stack of Linear/Conv layers, each optionally followed by an activation of
    :data:`KINDS` (Identity, Flatten and Dropout(0) pass through). For each layer the actual
    ``sigma_w^2 = fan_in * mean(W^2)`` and ``sigma_b^2 = mean(b^2)`` are read, and the mean
    square pre-activation ``q`` is propagated through the finite depth from each example's
    actual input (``q_1 = sigma_w^2 mean(x^2) + sigma_b^2``, then the length map); per layer,
    ``chi`` is averaged over the examples. Normalization layers are passed over and something
    computed between two modules (a residual connection, a functional activation) is ignored,
    each recorded in ``caveats``; any other module (pooling, recurrent, attention, an unknown
    activation) is a ``ValueError`` naming it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from vanishing.theory import predict
        >>> torch.manual_seed(0)   # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 4))
        >>> p = predict(model, torch.randn(8, 256))      # PyTorch's default init: Var(W) = 1/(3 fan_in)
        >>> [round(c, 2) for c in p.chis], round(p.ratio, 2)
        ([0.33, 0.32], 0.58)
    """
    import torch

    from vanishing.modules import call_model

    nodes = _check_nodes(nodes)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"predict() needs a torch.nn.Module, got {type(model).__name__}")
    names = {m: n for n, m in model.named_modules()}
    ran: list[tuple[Any, Any, Any]] = []  # (module, input, output) in forward order

    def hook(module, args, output):
        ran.append((module, args[0] if args else None, output))

    # leaves only: a container's forward is the composition of its children's
    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            output = call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    prediction = _predict_from(ran, names, nodes)
    last = ran[-1][2] if ran else None
    if not (output is last or _same_storage(output, last)):
        prediction.caveats.append(
            "the model's output is computed after its last module (e.g. a residual connection "
            "'x + f(x)'), which the theory ignores"
        )
    return prediction


def _predict_from(ran: list, names: dict, nodes: int) -> Prediction:
    import torch

    caveats: list[str] = []
    norms: list[str] = []
    layers: list[dict[str, Any]] = []  # name, module, input, activation
    prev_out = None
    for module, x, out in ran:
        kind = _kind_of_module(module)
        name = names.get(module, type(module).__name__)
        if kind == "other":
            raise ValueError(
                f"'{name}' ({type(module).__name__}) is not part of a plain feed-forward stack of "
                "Linear/Conv layers and elementwise activations; the theory does not model it"
            )
        if prev_out is not None and x is not prev_out and not _same_storage(x, prev_out):
            before = layers[-1]["name"] if layers else "the input"
            caveats.append(
                f"something is computed between modules before '{name}' (after {before!r}): a "
                "residual connection or a functional operation, which the theory ignores"
            )
        prev_out = out
        if kind == "layer":
            if layers and layers[-1]["activation"] is None:
                layers[-1]["activation"] = _Phi("linear")
            layers.append({"name": name, "module": module, "input": x, "activation": None})
        elif kind == "activation":
            if not layers:
                raise ValueError(f"activation '{name}' runs before any Linear/Conv layer")
            if layers[-1]["activation"] is not None:
                raise ValueError(f"two activations in a row after layer '{layers[-1]['name']}'")
            layers[-1]["activation"] = _resolve(module)
        elif kind == "norm":
            norms.append(name)
    if len(layers) < 2:
        raise ValueError("the model needs at least two Linear/Conv layers for a gradient factor")
    if norms:
        caveats.insert(
            0,
            f"normalization layers present ({', '.join(map(repr, norms[:3]))}"
            f"{' ...' if len(norms) > 3 else ''}): passed over, though they reset the scale "
            "the theory propagates",
        )
    for layer in layers:
        if layer["activation"] is None:
            layer["activation"] = _Phi("linear")
    stats = []
    with torch.no_grad():
        for layer in layers:
            m = layer["module"]
            w = m.weight.detach().double()
            fan_in = w[0].numel()
            # host sync: a few numbers per layer, once
            sw2 = float(fan_in * w.square().mean())
            sb2 = float(m.bias.detach().double().square().mean()) if m.bias is not None else 0.0
            width = int(w.shape[0])
            stats.append((sw2, sb2, width))
        x0 = layers[0]["input"]
        if not isinstance(x0, torch.Tensor):
            raise ValueError("the first layer's input must be a tensor")
        x0 = x0.detach().double()
        # per example: the mean square of its input (a single example if unbatched)
        m0 = x0.square().reshape(x0.shape[0], -1).mean(1) if x0.dim() > 1 else x0.square().mean()
        m0 = np.atleast_1d(m0.numpy())
    q = stats[0][0] * m0 + stats[0][1]
    out: list[LayerPrediction] = []
    for i, layer in enumerate(layers):
        phi = layer["activation"]
        sw2, sb2, width = stats[i]
        if i + 1 < len(layers):
            sw2_next, sb2_next, _ = stats[i + 1]
            factor = float(np.mean(sw2_next * _expect(phi, q, "dphi2", nodes)))
            q_next = sw2_next * _expect(phi, q, "phi2", nodes) + sb2_next
        else:
            factor, q_next = None, q
        out.append(
            LayerPrediction(
                name=layer["name"],
                activation=phi.label(),
                width=width,
                sigma_w2=sw2,
                sigma_b2=sb2,
                q=float(np.mean(q)),
                chi=factor,
            )
        )
        q = q_next
    return Prediction(out, caveats)


def _same_storage(a: Any, b: Any) -> bool:
    """An in-place module returns its input; a view (Flatten) shares it: the same tensor flows."""
    import torch

    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel()


# ------------------------------------------------------------------------------ the picture


def _legend_below(ax: Any) -> None:
    # under the axes: inside, any corner covers a contour or the critical line
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)


def model_phase_diagram(layers: Sequence[tuple[Any, float, float]], **kwargs: Any):
    """A model on the mean-field phase diagram: one point per hidden layer at its
    ``(activation, sigma_w^2, sigma_b^2)`` (as :class:`LayerPrediction` measures them from the
    weights), the median a labelled star; the ranges grow to include them. With layers of
    several activations the most common one is drawn (its layers marked) and the title says
    how many are left out. ``kwargs`` go to :func:`phase_diagram`. Returns a matplotlib
    ``Figure``; ``ValueError`` without a layer. ``Prediction.phase_diagram`` and the notebook
    view of an ``inspect`` diagnosis draw with this.

    Example:
        >>> from vanishing.theory import model_phase_diagram
        >>> fig = model_phase_diagram([("tanh", 1.0, 0.05), ("tanh", 1.2, 0.05)], resolution=5)
        >>> fig.axes[0].lines[-1].get_xdata().tolist()   # the two layers' points
        [1.0, 1.2]
    """
    layers = list(layers)
    if not layers:
        raise ValueError("the model has no hidden layer to place on a phase diagram")
    counts: dict[str, int] = {}
    for activation, _, _ in layers:
        counts[activation] = counts.get(activation, 0) + 1
    activation = max(counts, key=counts.get)
    shown = [x for x in layers if x[0] == activation]
    ws = np.array([float(x[1]) for x in shown])
    bs = np.array([float(x[2]) for x in shown])
    w_range = kwargs.pop("sigma_w2", (0.5, 4.0))
    b_range = kwargs.pop("sigma_b2", (0.0, 0.3))
    w_range = (min(w_range[0], 0.8 * ws.min()), max(w_range[1], 1.2 * ws.max()))
    b_range = (min(b_range[0], 0.0), max(b_range[1], 1.2 * bs.max()))
    label = f"this model ({len(shown)} hidden layer{'s' if len(shown) > 1 else ''})"
    markers = [(float(np.median(ws)), float(np.median(bs)), label)]
    fig = phase_diagram(activation, sigma_w2=w_range, sigma_b2=b_range, markers=markers, **kwargs)
    ax = fig.axes[0]
    ax.plot(ws, bs, "o", ms=3, color="k", alpha=0.6, label="its hidden layers")
    _legend_below(ax)
    left_out = len(layers) - len(shown)
    if left_out:
        ax.set_title(
            f"{ax.get_title()} ({left_out} layer{'s' if left_out > 1 else ''} of another "
            "activation not shown)",
            fontsize=9,
        )
    return fig


def phase_diagram(
    activation: Any = "tanh",
    *,
    sigma_w2: tuple[float, float] = (0.5, 4.0),
    sigma_b2: tuple[float, float] = (0.0, 0.3),
    resolution: int = 30,
    chi_levels: Sequence[float] = (0.5, 0.8, 0.9, 1.1, 1.25, 1.5),
    markers: Iterable[tuple[float, float, str]] = (),
    ax: Any = None,
):
    """The (sigma_w^2, sigma_b^2) plane: the critical line, chi_1 contours, optional markers.

    Shades log chi_1 (blue: ordered, red: chaotic), draws the critical line ``chi_1 = 1`` and
    the contours ``chi_levels``, and a point per ``(sigma_w2, sigma_b2, label)`` in ``markers``
    (e.g. a model's own, from :func:`predict`). Returns a matplotlib ``Figure`` (no pyplot
    global state), or draws into ``ax`` when given and returns its figure.

    Example:
        >>> from vanishing.theory import phase_diagram
        >>> fig = phase_diagram("tanh", resolution=6, markers=[(1.0, 0.05, "chi_1 = 0.759")])
        >>> fig.axes[0].get_xlabel()
        '$\\\\sigma_w^2$'
    """
    phi = _resolve(activation)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 3:
        raise ValueError(f"resolution must be an integer >= 3, got {resolution!r}")
    w_lo, w_hi = (_number("sigma_w2 range", v) for v in sigma_w2)
    b_lo, b_hi = (_number("sigma_b2 range", v) for v in sigma_b2)
    if not (w_hi > w_lo and b_hi > b_lo):
        raise ValueError("sigma_w2 and sigma_b2 must be (low, high) ranges with high > low")
    ws = np.linspace(max(w_lo, 1e-3), w_hi, resolution)
    bs = np.linspace(b_lo, b_hi, resolution)
    grid = np.empty((len(bs), len(ws)))
    for i, b in enumerate(bs):
        for j, w in enumerate(ws):
            grid[i, j] = _chi1_at(phi, w, _q_star(phi, w, b, 1.0, NODES), NODES)
    line_b, line_w = [], []
    for b in bs:
        try:
            line_w.append(critical_sigma_w2(phi, b))
            line_b.append(b)
        except ValueError:
            continue
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.2, 4.0), layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.figure
    with np.errstate(divide="ignore"):
        logchi = np.log(np.clip(grid, 1e-12, None))
    bound = max(1e-9, float(np.nanmax(np.abs(logchi[np.isfinite(logchi)]))))
    mesh = ax.pcolormesh(ws, bs, logchi, cmap="coolwarm", vmin=-bound, vmax=bound, shading="auto")
    fig.colorbar(mesh, ax=ax, label=r"$\log \chi_1$")
    levels = sorted(v for v in chi_levels if v > 0 and v != 1)
    if levels:
        cs = ax.contour(ws, bs, grid, levels=levels, colors="0.3", linewidths=0.7)
        ax.clabel(cs, fontsize=7, fmt="%g")
    ax.plot(line_w, line_b, color="k", lw=2, label=r"critical line $\chi_1 = 1$")
    for w, b, label in markers:
        ax.plot([w], [b], marker="*", ms=12, color="gold", mec="k", ls="none")
        ax.annotate(label, (w, b), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlim(ws[0], ws[-1])
    ax.set_ylim(bs[0], bs[-1])
    ax.set_xlabel(r"$\sigma_w^2$")
    ax.set_ylabel(r"$\sigma_b^2$")
    ax.set_title(f"mean-field phase diagram: {phi.label()}", fontsize=10)
    ax.text(0.03, 0.95, "ordered", transform=ax.transAxes, va="top", fontsize=9)
    ax.text(0.97, 0.05, "chaotic", transform=ax.transAxes, ha="right", fontsize=9)
    _legend_below(ax)
    return fig
