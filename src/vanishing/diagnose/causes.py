"""Why the gradient shrinks or grows through depth: each hidden layer's factors, and the dominant one.

Going back through hidden layer ``l`` the error signal is multiplied by ``diag(phi'(z_l)) W^T``.
Its norm changes by about ``gain * rms(phi'(z))``, where ``gain = std(W) * sqrt(fan_in)``. Each
factor is compared with what a careful design gives, in decades (log10) per layer:

- **activation**: ``log10(rms(phi') * g*)`` where ``g*`` is the gain He/Xavier/LeCun would set for
  that activation (sqrt 2 for ReLU, 1 for tanh/sigmoid/SELU). ReLU with He init: 0 (the gain makes
  up for the units that are off); sigmoid: ``log10(0.25) = -0.6`` at best, because
  ``sigmoid' <= 1/4``; saturated tanh: far below 0.
- **weights**: ``log10(gain / g*)``: the weight scale against the init that fits the activation.

For activations whose derivative is 0 or 1 (ReLU, ReLU6, hardtanh: the registry's
``binary_derivative``) ``rms(phi') = sqrt(mean(phi'))``; for the others the mean derivative stands
in for its RMS. What is known of each activation (bound, init gain) comes from
:mod:`vanishing.activations`. The dominant cause is the factor with the largest share of
the measured change. Facts that modulate it (no normalization layer; saturated inputs) are stated
with it.
"""

from __future__ import annotations

import math

import numpy as np

from vanishing.diagnose.view import RunView, derivative_rms, gain_target, max_derivative_text

_INIT_NAME = {"he_init": "He", "xavier_init": "Xavier", "lecun_init": "LeCun"}


def layer_factors(view: RunView, layers: list[str]) -> dict[str, dict[str, float]]:
    """Per hidden layer: its activation's mean derivative, saturated and dead shares, the weight
    gain and the gain a careful init would give, and the two contributions in decades.

    Example:
        >>> layer_factors(view, ["0", "2"])["0"]["mean_dphi"]   # doctest: +SKIP
        0.19
    """
    out: dict[str, dict[str, float]] = {}
    for name in layers:
        kind = view.activation_of(name)
        dphi = view.activation_stat(name, "act_deriv_mean")
        target, _ = gain_target(kind)
        gain = view.weight_gain(name)
        row = {
            "mean_dphi": dphi,
            "saturated_fraction": view.activation_stat(name, "act_saturated"),
            "dead_fraction": view.activation_stat(name, "act_dead"),
            "weight_gain": gain,
            "gain_target": target,
            "weight_gain_vs_target": gain / target if math.isfinite(gain) else float("nan"),
        }
        if kind is None:
            dphi = 1.0  # no activation module: a linear map, derivative 1
        rms = derivative_rms(kind, dphi)
        row["activation_decades"] = math.log10(rms * target) if rms > 0 else float("nan")
        row["weight_decades"] = (
            math.log10(gain / target) if math.isfinite(gain) and gain > 0 else float("nan")
        )
        out[name] = row
    return out


def _median(values) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.median(vals)) if vals else float("nan")


def attribute(view: RunView, layers: list[str], *, growing: bool) -> tuple[str, dict, dict]:
    """The dominant cause of a shrink (``growing=False``) or growth through ``layers``.

    Returns (cause sentence, summary evidence, per-layer factors). Summary keys: ``mean_dphi``,
    ``saturated_fraction``, ``weight_gain``, ``weight_gain_vs_target`` (and
    ``weight_gain_vs_he`` for ReLU-like activations), ``activation_decades_per_layer``,
    ``weight_decades_per_layer``, ``normalization_layers``.

    Example:
        >>> cause, ev, per_layer = attribute(view, view.hidden, growing=False)  # doctest: +SKIP
        >>> cause                                                             # doctest: +SKIP
        "activation derivative: mean sigmoid'(z) is 0.20 (at most 1/4) ..."
    """
    per_layer = layer_factors(view, layers)
    kind = view.dominant_activation(layers)
    target, init_name = gain_target(kind)
    act = _median(r["activation_decades"] for r in per_layer.values())
    wts = _median(r["weight_decades"] for r in per_layer.values())
    dphi = _median(r["mean_dphi"] for r in per_layer.values())
    sat = _median(r["saturated_fraction"] for r in per_layer.values())
    gain = _median(r["weight_gain"] for r in per_layer.values())
    norms = len(view.normalization_layers)
    ev = {
        "mean_dphi": dphi,
        "saturated_fraction": sat,
        "weight_gain": gain,
        "weight_gain_vs_target": gain / target if math.isfinite(gain) else float("nan"),
        "activation_decades_per_layer": act,
        "weight_decades_per_layer": wts,
        "normalization_layers": float(norms),
    }
    if init_name == "he_init":
        ev["weight_gain_vs_he"] = ev["weight_gain_vs_target"]
    sign = 1.0 if growing else -1.0
    shares = {
        "activation": sign * act if math.isfinite(act) else -math.inf,
        "weights": sign * wts if math.isfinite(wts) else -math.inf,
    }
    dominant = max(shares, key=shares.get)
    name = kind or "the activation"
    top = max_derivative_text(kind)
    if shares[dominant] <= 0:
        cause = "no single factor: the activation and the weight scale are each near their ideal"
    elif dominant == "activation" and math.isfinite(sat) and sat >= 0.5:
        cause = (
            f"saturation: {sat:.0%} of {name} inputs sit in the flat tails, so mean {name}'(z) "
            f"is {dphi:.2g}; the pre-activations are too large (input scale or weight scale)"
        )
    elif dominant == "activation":
        cause = (
            f"activation derivative: mean {name}'(z) is {dphi:.2g} (at most {top}), "
            f"{-act if not growing else act:.2f} decades per layer"
        )
        if math.isfinite(gain) and gain > 1.25 * target and not growing:
            cause += (
                f"; the weights' gain {gain:.2f} (above the {target:.2f} of "
                f"{_INIT_NAME[init_name]} init) pushes pre-activations off the slope"
            )
    else:
        cause = (
            f"weight scale: std(W)*sqrt(fan_in) is {gain:.2f}, {gain / target:.2g}x the "
            f"{target:.2f} that {_INIT_NAME[init_name]} init gives for {name}"
        )
    if norms == 0:
        cause += "; no normalization layer resets the scale"
    skip = view.skip_connections
    if skip is not None:
        ev["skip_connections"] = float(skip)
        if not skip:
            cause += "; no skip connection gives the gradient a path around the layers"
    return cause, ev, per_layer
