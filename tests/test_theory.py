"""vanishing.theory against closed forms, adaptive integration, published values and simulation."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import integrate, special
from torch import nn

from vanishing import theory

SELU_A, SELU_L = 1.6732632423543772, 1.0507009873554805


def _sig(x):
    return 1 / (1 + np.exp(-x))


# Independent numpy definitions (phi, phi', kinks) of every kind: the oracle for the quadrature.
ORACLE = {
    "linear": (lambda x: x, lambda x: 1.0, ()),
    "tanh": (np.tanh, lambda x: 1 - np.tanh(x) ** 2, ()),
    "sigmoid": (_sig, lambda x: _sig(x) * (1 - _sig(x)), ()),
    "softsign": (lambda x: x / (1 + abs(x)), lambda x: 1 / (1 + abs(x)) ** 2, (0.0,)),
    "hardtanh": (lambda x: min(1.0, max(-1.0, x)), lambda x: float(-1 < x < 1), (-1.0, 1.0)),
    "erf": (special.erf, lambda x: 2 / math.sqrt(math.pi) * math.exp(-x * x), ()),
    "relu": (lambda x: max(x, 0.0), lambda x: float(x > 0), (0.0,)),
    "relu6": (lambda x: min(6.0, max(0.0, x)), lambda x: float(0 < x < 6), (0.0, 6.0)),
    "leaky_relu": (lambda x: x if x > 0 else 0.01 * x, lambda x: 1.0 if x > 0 else 0.01, (0.0,)),
    "elu": (
        lambda x: x if x > 0 else math.expm1(x),
        lambda x: 1.0 if x > 0 else math.exp(x),
        (0.0,),
    ),
    "selu": (
        lambda x: SELU_L * (x if x > 0 else SELU_A * math.expm1(x)),
        lambda x: SELU_L * (1.0 if x > 0 else SELU_A * math.exp(x)),
        (0.0,),
    ),
    "gelu": (
        lambda x: x * 0.5 * (1 + math.erf(x / math.sqrt(2))),
        lambda x: (
            0.5 * (1 + math.erf(x / math.sqrt(2)))
            + x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        ),
        (),
    ),
    "silu": (lambda x: x * _sig(x), lambda x: _sig(x) * (1 + x * (1 - _sig(x))), ()),
    "quick_gelu": (
        lambda x: x * _sig(1.702 * x),
        lambda x: _sig(1.702 * x) * (1 + 1.702 * x * (1 - _sig(1.702 * x))),
        (),
    ),
    "softplus": (lambda x: np.logaddexp(0, x), _sig, ()),
}


def _gauss_quad(f, q, kinks):
    """E[f(sqrt(q) z)] by adaptive quadrature, split at the kinks (in z)."""
    s = math.sqrt(q)
    pts = sorted({k / s for k in kinks if abs(k / s) < 30})
    edges = [-40.0, *pts, 40.0]
    dens = lambda z: f(s * z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    return sum(
        integrate.quad(dens, a, b, epsabs=1e-14, epsrel=1e-12, limit=200)[0]
        for a, b in zip(edges[:-1], edges[1:])
    )


def test_every_kind_has_an_oracle():
    assert set(ORACLE) == set(theory.KINDS)


@pytest.mark.parametrize("kind", theory.KINDS)
@pytest.mark.parametrize("q", [0.3, 1.0, 4.0])
def test_quadrature_matches_adaptive_integration(kind, q):
    phi, dphi, kinks = ORACLE[kind]
    want_phi2 = _gauss_quad(lambda x: float(phi(x)) ** 2, q, kinks)
    want_dphi2 = _gauss_quad(lambda x: float(dphi(x)) ** 2, q, kinks)
    # sigma_w^2 = 1, sigma_b^2 = 0: the length map is E[phi^2] and chi is E[phi'^2]
    assert theory.length_map(kind, q, 1.0) == pytest.approx(want_phi2, rel=1e-9, abs=1e-12)
    assert theory.chi(kind, q, 1.0) == pytest.approx(want_dphi2, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind", ["tanh", "gelu", "selu", "hardtanh", "relu6", "elu"])
def test_quadrature_has_converged(kind):
    # doubling the nodes changes nothing that matters: the default is enough
    for q in (0.05, 1.0, 9.0):
        a = theory.chi(kind, q, 1.0)
        b = theory.chi(kind, q, 1.0, nodes=2 * theory.NODES)
        assert a == pytest.approx(b, rel=1e-11, abs=1e-14)
        a = theory.length_map(kind, q, 1.0)
        b = theory.length_map(kind, q, 1.0, nodes=2 * theory.NODES)
        assert a == pytest.approx(b, rel=1e-11, abs=1e-14)


@pytest.mark.parametrize("kind", theory.KINDS)
def test_derivative_is_the_derivative_of_the_forward(kind):
    # the registry's phi' (used by the theory) against autograd of the forward it pairs with
    phi = theory._resolve(kind)
    x = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    x = x[(x.abs() > 1e-3) & ((x - 6).abs() > 1e-3) & ((x.abs() - 1).abs() > 1e-3)]  # off kinks
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(phi.forward(x).sum(), x)
    # (the registry's leaky_relu slope is a float32 constant: 2e-8 relative)
    torch.testing.assert_close(phi.derivative(x.detach()), g, rtol=5e-8, atol=1e-12)


# ---------------------------------------------------------------- published values


@pytest.mark.parametrize(
    ("sigma_b2", "published"), [(0.01, 1.4242), (0.05, 1.7610), (0.1, 1.9861), (0.2, 2.2852)]
)
def test_tanh_critical_line_matches_published(sigma_b2, published):
    assert theory.critical_sigma_w2("tanh", sigma_b2=sigma_b2) == pytest.approx(published, abs=3e-3)


def test_chi1_of_tanh_at_unit_weight_variance_is_0759():
    # 0.759 is chi_1 itself, at the fixed point q* = 0.1936 of the length map
    r = theory.mean_field("tanh", sigma_w2=1.0, sigma_b2=0.05)
    assert r.chi1 == pytest.approx(0.759, abs=5e-4)
    assert r.q_star == pytest.approx(0.05 + _gauss_quad(lambda x: math.tanh(x) ** 2, r.q_star, ()))
    assert r.phase == "ordered" and r.depth_scale == pytest.approx(-1 / math.log(r.chi1))


def test_chi1_is_one_on_the_critical_line_and_the_phase_flips_across_it():
    for b in (0.01, 0.1, 0.3):
        w = theory.critical_sigma_w2("tanh", b)
        assert theory.mean_field("tanh", w, b).chi1 == pytest.approx(1.0, abs=1e-9)
        assert theory.mean_field("tanh", w * 0.99, b).phase == "ordered"
        assert theory.mean_field("tanh", w * 1.01, b).phase == "chaotic"


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize(("sw2", "sb2"), [(0.5, 0.1), (0.9, 0.02), (0.25, 1.0)])
def test_linear_closed_form(sw2, sb2):
    r = theory.mean_field("linear", sw2, sb2)
    assert r.q_star == pytest.approx(sb2 / (1 - sw2), rel=1e-12)
    assert r.chi1 == pytest.approx(sw2, rel=1e-12)
    assert r.phase == "ordered"


def test_linear_without_a_finite_fixed_point():
    assert math.isinf(theory.mean_field("linear", 1.5, 0.1).q_star)
    assert math.isinf(theory.mean_field("linear", 1.0, 0.1).q_star)  # q grows by sb2 per layer
    r = theory.mean_field("identity", 1.0, 0.0, q0=3.0)  # every q is fixed: the start stays
    assert r.q_star == 3.0 and r.phase == "critical"


@pytest.mark.parametrize("sw2", [0.5, 1.0, 1.9, 2.0, 2.5, 4.0])
@pytest.mark.parametrize("sb2", [0.0, 0.05, 0.5])
def test_relu_chi1_is_half_the_weight_variance(sw2, sb2):
    r = theory.mean_field("relu", sw2, sb2)
    assert r.chi1 == pytest.approx(sw2 / 2, rel=1e-12)
    if sw2 < 2 and sb2 > 0:
        assert r.q_star == pytest.approx(sb2 / (1 - sw2 / 2), rel=1e-10)
    elif sw2 < 2:
        assert r.q_star == 0.0  # the signal dies out geometrically: no positive fixed point
    elif sw2 > 2 or sb2 > 0:
        assert math.isinf(r.q_star)  # it grows geometrically (or by sb2 per layer at 2)
    else:
        assert r.q_star == 1.0  # sigma_w^2 = 2, no bias: every q is a fixed point
    assert r.phase == ("ordered" if sw2 < 2 else "critical" if sw2 == 2 else "chaotic")


def test_relu_is_critical_at_he_init_and_leaky_relu_at_its_gain():
    assert theory.critical_sigma_w2("relu", 0.0) == pytest.approx(2.0, rel=1e-12)
    assert theory.critical_sigma_w2("relu", 0.3) == pytest.approx(2.0, rel=1e-12)
    a = 0.2  # He et al.: sigma_w^2 = 2 / (1 + a^2)
    # rel 1e-7: the registry's derivative holds the slope as a float32 constant
    assert theory.critical_sigma_w2(nn.LeakyReLU(a)) == pytest.approx(2 / (1 + a * a), rel=1e-7)
    assert theory.mean_field(nn.LeakyReLU(a), 1.5).chi1 == pytest.approx(1.5 * (1 + a * a) / 2)


def test_tanh_without_bias_is_critical_at_one():
    assert theory.critical_sigma_w2("tanh", 0.0) == pytest.approx(1.0, abs=1e-6)
    ordered = theory.mean_field("tanh", 0.8, 0.0)
    assert ordered.q_star == 0.0 and ordered.chi1 == pytest.approx(0.8, rel=1e-9)
    assert theory.mean_field("tanh", 1.2, 0.0).phase == "chaotic"


def test_selu_fixed_point_is_unit_variance():
    # Klambauer et al.'s constants make q* = 1 exactly for sigma_w^2 = 1 (LeCun) without bias
    r = theory.mean_field("selu", 1.0, 0.0)
    assert r.q_star == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------- correlation depth scale


def test_correlation_depth_scale_equals_gradient_one_in_the_ordered_phase():
    r = theory.mean_field("tanh", 1.2, 0.05)
    assert r.c_star == 1.0 and r.correlation_depth_scale == pytest.approx(r.depth_scale)


def test_chaotic_tanh_without_bias_decorrelates_fully():
    # odd phi, no bias: c* = 0, so chi_c = sigma_w^2 E[phi'(u)]^2 (u1, u2 independent)
    r = theory.mean_field("tanh", 4.0, 0.0)
    mean_dphi = _gauss_quad(lambda x: 1 - math.tanh(x) ** 2, r.q_star, ())
    assert r.c_star == pytest.approx(0.0, abs=1e-9)
    assert r.chi_c == pytest.approx(4.0 * mean_dphi**2, rel=1e-8)
    assert r.correlation_depth_scale == pytest.approx(-1 / math.log(r.chi_c))


@pytest.mark.parametrize("kind", ["tanh", "hardtanh"])
def test_correlation_fixed_point_by_monte_carlo(kind):
    sw2, sb2 = 3.0, 0.1
    r = theory.mean_field(kind, sw2, sb2)
    assert r.phase == "chaotic" and 0 < r.c_star < 1
    g = np.random.default_rng(0)
    z1, z2 = g.standard_normal((2, 2_000_000))
    phi, dphi, _ = ORACLE[kind]
    phi, dphi = np.vectorize(phi), np.vectorize(dphi)
    u1 = math.sqrt(r.q_star) * z1
    u2 = math.sqrt(r.q_star) * (r.c_star * z1 + math.sqrt(1 - r.c_star**2) * z2)
    c_next = (sw2 * np.mean(phi(u1) * phi(u2)) + sb2) / r.q_star
    assert c_next == pytest.approx(r.c_star, abs=3e-3)  # c* is a fixed point of the c-map
    assert sw2 * np.mean(dphi(u1) * dphi(u2)) == pytest.approx(r.chi_c, abs=3e-3)


def test_correlation_depth_scale_diverges_at_the_critical_line():
    w = theory.critical_sigma_w2("tanh", 0.05)
    near = [theory.mean_field("tanh", w * f, 0.05).correlation_depth_scale for f in (0.999, 1.001)]
    far = [theory.mean_field("tanh", w * f, 0.05).correlation_depth_scale for f in (0.6, 2.0)]
    assert min(near) > 20 * max(far)
    assert math.isinf(theory.mean_field("relu", 2.0).correlation_depth_scale)


# ---------------------------------------------------------------- predict on a model


def _stack(widths, act, sw2, sb2, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(
                torch.randn(b, a, generator=g, dtype=torch.float64) * math.sqrt(sw2 / a)
            )
            lin.bias.copy_(torch.randn(b, generator=g, dtype=torch.float64) * math.sqrt(sb2))
        layers.append(lin)
        if act is not None and i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def test_predict_deep_linear_net_by_hand():
    model = _stack([16, 32, 32, 32, 8], None, 0.7, 0.1)
    x = torch.randn(5, 16, dtype=torch.float64)
    p = theory.predict(model, x)
    lins = [m for m in model if isinstance(m, nn.Linear)]
    sw2 = [m.weight.shape[1] * float(m.weight.square().mean()) for m in lins]
    sb2 = [float(m.bias.square().mean()) for m in lins]
    q = sw2[0] * x.square().mean(1).numpy() + sb2[0]  # per example
    for i, layer in enumerate(p.layers):
        assert layer.activation == "linear" and layer.sigma_w2 == pytest.approx(sw2[i])
        assert layer.q == pytest.approx(float(q.mean()), rel=1e-12)
        if i + 1 < len(lins):
            assert layer.chi == pytest.approx(sw2[i + 1], rel=1e-12)  # phi' = 1
            q = sw2[i + 1] * q + sb2[i + 1]
    assert p.layers[-1].chi is None and p.plain
    assert p.ratio == pytest.approx(math.sqrt(sw2[1] * sw2[2]), rel=1e-12)


def test_predict_relu_he_init_gives_factor_one():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        lin = nn.Linear(512, 512)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    p = theory.predict(nn.Sequential(*layers, nn.Linear(512, 10)), torch.randn(16, 512))
    for a, b in zip(p.layers[:-2], p.layers[1:-1]):
        assert a.chi == pytest.approx(b.sigma_w2 / 2, rel=1e-9)  # ReLU: E[relu'^2] = 1/2
        assert a.chi == pytest.approx(1.0, abs=0.02)  # He init: sigma_w^2 = 2
    assert p.ratio == pytest.approx(1.0, abs=0.05)


def test_predicted_error_signal_matches_autograd_for_a_wide_tanh_net():
    # the theory's per-layer chi against the measured ||dL/dh_l||^2 ratios of a real net
    sw2, sb2, width, depth = 1.8, 0.05, 1024, 12
    model = _stack([width] * (depth + 1), nn.Tanh, sw2, sb2)
    x = torch.randn(64, width, dtype=torch.float64)
    p = theory.predict(model, x)
    hs = []
    h = x
    for m in model:
        h = m(h)
        if isinstance(m, nn.Linear):
            h.retain_grad()
            hs.append(h)
    g = torch.Generator().manual_seed(1)
    (h * torch.randn(h.shape, generator=g, dtype=torch.float64)).sum().backward()
    measured = [float(a.grad.square().sum() / b.grad.square().sum()) for a, b in zip(hs, hs[1:])]
    predicted = p.chis
    assert np.exp(np.mean(np.log(measured))) == pytest.approx(
        np.exp(np.mean(np.log(predicted))), rel=0.03
    )
    for m_, p_ in zip(measured, predicted):
        assert m_ == pytest.approx(p_, rel=0.15)


def test_predict_reads_activation_options_and_conv_fan_in():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.3), nn.Flatten(), nn.Linear(8 * 5 * 5, 2)
    )
    p = theory.predict(model, torch.randn(4, 3, 5, 5))
    conv = model[0].weight
    assert p.layers[0].sigma_w2 == pytest.approx(27 * float(conv.square().mean()))
    assert p.layers[0].activation == "leaky_relu(negative_slope=0.3)"
    fc = model[3].weight
    assert p.layers[0].chi == pytest.approx(200 * float(fc.square().mean()) * (1 + 0.09) / 2)


def test_predict_flags_broken_assumptions():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.act(self.a(x))) + x

    assert any("residual" in c for c in theory.predict(Residual(), torch.randn(4, 8)).caveats)
    bn = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    p = theory.predict(bn, torch.randn(4, 8))
    assert not p.plain and "normalization" in p.caveats[0]

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    assert any(
        "between modules" in c for c in theory.predict(Functional(), torch.randn(4, 8)).caveats
    )


def test_predict_refuses_what_it_cannot_model():
    with pytest.raises(ValueError, match="MaxPool1d"):
        theory.predict(
            nn.Sequential(nn.Linear(8, 8), nn.MaxPool1d(2), nn.Linear(4, 2)), torch.randn(2, 8)
        )
    with pytest.raises(ValueError, match="at least two"):
        theory.predict(nn.Sequential(nn.Linear(8, 2)), torch.randn(2, 8))
    with pytest.raises(ValueError, match="Module"):
        theory.predict("model", torch.randn(2, 8))


# ---------------------------------------------------------------- bad input, import, plot


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: theory.mean_field("mish", 1.0), "expected one of linear, tanh"),
        (lambda: theory.mean_field("tanh", -1.0), "sigma_w2 must be a finite number >= 0"),
        (lambda: theory.mean_field("tanh", 1.0, float("nan")), "sigma_b2"),
        (lambda: theory.mean_field("tanh", "big"), "sigma_w2 must be a number"),
        (lambda: theory.mean_field("tanh", 1.0, q0=0.0), "q0 must be a finite number > 0"),
        (lambda: theory.mean_field("tanh", 1.0, nodes=3), "nodes must be an integer >= 8"),
        (lambda: theory.chi("tanh", -1.0, 1.0), "q must be finite"),
        (lambda: theory.critical_sigma_w2(nn.Mish()), "Mish is unknown to the theory"),
        (lambda: theory.critical_sigma_w2(nn.PReLU(4)), "one slope per channel"),
    ],
)
def test_bad_input_is_a_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_aliases():
    assert theory.mean_field("swish", 1.0).chi1 == theory.mean_field("silu", 1.0).chi1
    assert theory.mean_field(nn.SiLU(), 1.0).activation == "silu"
    assert theory.mean_field(nn.Softplus(), 1.0).chi1 == pytest.approx(
        theory.mean_field("softplus", 1.0).chi1
    )


def test_import_is_light():
    code = (
        "import sys, vanishing.theory; "
        "print([m for m in ('torch', 'matplotlib', 'scipy', 'pandas') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_phase_diagram_draws_the_critical_line():
    fig = theory.phase_diagram(
        "tanh", sigma_b2=(0.0, 0.2), resolution=5, markers=[(1.0, 0.05, "x")]
    )
    ax = fig.axes[0]
    line = next(x for x in ax.get_lines() if "critical" in str(x.get_label()))
    w, b = line.get_data()
    assert len(w) == 5
    for wi, bi in zip(w, b):
        assert wi == pytest.approx(theory.critical_sigma_w2("tanh", bi))
    assert any(
        tuple(x.get_xydata()[0]) == (1.0, 0.05) for x in ax.get_lines() if x.get_marker() == "*"
    )


def test_prediction_phase_diagram_marks_each_hidden_layer_at_its_actual_variances():
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 2),
    )  # fmt: skip
    with torch.no_grad():
        model[2].weight.mul_(3.0)  # sigma_w^2 = 3 x 3 x 1/3 = 3: outside the default range's middle
    fig = theory.predict(model, torch.randn(16, 32)).phase_diagram(resolution=4)
    ax = fig.axes[0]
    dots = next(x for x in ax.get_lines() if x.get_label() == "its hidden layers")
    # by hand: fan_in * mean(W^2) and mean(b^2) of the two tanh layers (the ReLU one is left out)
    expected = [
        (32 * float(m.weight.pow(2).mean()), float(m.bias.pow(2).mean())) for m in model[0:3:2]
    ]
    assert dots.get_xydata().ravel().tolist() == pytest.approx([v for xy in expected for v in xy])
    star = next(x for x in ax.get_lines() if x.get_marker() == "*")
    assert tuple(star.get_xydata()[0]) == pytest.approx(
        (sum(w for w, _ in expected) / 2, sum(b for _, b in expected) / 2)
    )
    lo, hi = ax.get_xlim()
    assert lo < min(w for w, _ in expected) and max(w for w, _ in expected) < hi
    assert "tanh" in ax.get_title() and "1 layer of another activation" in ax.get_title()
