"""The activation registry against independent computations (autograd of torch's functions)."""

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vanishing import activations
from vanishing.activations import Activation
from vanishing.stats.activations import summarize, summarize_stacked

STATS = Path(__file__).resolve().parents[1] / "src" / "vanishing" / "stats"

# One module per built-in kind, with non-default options where it has them.
MODULES = {
    "sigmoid": nn.Sigmoid(),
    "tanh": nn.Tanh(),
    "softsign": nn.Softsign(),
    "hardtanh": nn.Hardtanh(-0.5, 0.7),
    "relu": nn.ReLU(),
    "relu6": nn.ReLU6(),
    "leaky_relu": nn.LeakyReLU(0.2),
    "prelu": nn.PReLU(3, init=0.3),
    "elu": nn.ELU(alpha=0.7),
    "selu": nn.SELU(),
    "gelu": nn.GELU(),
    "silu": nn.SiLU(),
}
EXTRA = [nn.LeakyReLU(-1.5), nn.ELU(alpha=2.0), nn.GELU(approximate="tanh")]
BUILTIN = tuple(MODULES)
REMEDIES = {"relu", "leaky_relu", "prelu", "elu", "selu", "gelu"}
INIT_REMEDIES = {"he_init", "xavier_init", "orthogonal_init", "lecun_init"}


def mish_derivative(z, y):
    if z is None:
        return None
    t = torch.tanh(nn.functional.softplus(z))
    return t + z * torch.sigmoid(z) * (1 - t * t)


@pytest.fixture
def mish():
    entry = activations.register(
        Activation(
            "mish",
            ("Mish",),
            mish_derivative,
            bound=1.0884982,  # at z = 1.49, from a fine grid
            input_needed=True,
            tails="lower",
            signed=True,
            init_gain=math.sqrt(2.0),
            init_remedy="he_init",
        )
    )
    yield entry
    activations.unregister("mish")


def _autograd(module, z):
    z = z.detach().requires_grad_(True)
    (d,) = torch.autograd.grad(module(z).sum(), z)
    return d


def _random_z(n=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, dtype=torch.float64, generator=gen) * 3
    for kink in (0.0, -0.5, 0.7, 6.0):  # keep off the kinks, where autograd picks a side
        z[(z - kink).abs() < 1e-3] = 0.25
    return z


def test_the_builtin_kinds_are_the_recorded_ones_in_order():
    assert activations.kinds()[: len(BUILTIN)] == BUILTIN
    assert activations.buildable_kinds() == (
        "sigmoid", "tanh", "softsign", "relu", "leaky_relu", "prelu", "elu", "selu", "gelu",
    )  # fmt: skip


@pytest.mark.parametrize("kind", BUILTIN)
def test_registry_resolves_each_module_and_its_subclasses(kind):
    module = MODULES[kind]
    assert activations.for_module(module).kind == kind

    class Custom(type(module)):
        pass

    assert activations.for_module(Custom()).kind == kind
    assert activations.unmeasured(module) is None


def test_non_activations_are_not_resolved():
    for module in (nn.Linear(2, 2), nn.Sequential(), nn.LayerNorm(3)):
        assert activations.for_module(module) is None
        assert activations.unmeasured(module) is None


@pytest.mark.parametrize("module", list(MODULES.values()) + EXTRA, ids=repr)
def test_derivative_matches_autograd(module):
    """The hand-derived formula against autograd's derivative of the torch module itself."""
    entry = activations.for_module(module)
    module = module.double()
    params = entry.params(module)
    z = _random_z()
    expected = _autograd(module, z)
    y = module(z).detach()
    ways = {"z and y": entry.derivative(z, y, **params)}
    if not entry.needs_input(module):
        ways["y only"] = entry.derivative(None, y, **params)
    elif entry.kind in ("gelu", "silu", "prelu"):
        assert entry.derivative(None, y, **params) is None  # never made up from the output
    if entry.output_derivative is not None:
        ways["output_derivative"] = entry.output_derivative(y, torch.empty_like(y))
    if entry.kind != "prelu":  # needs its weight: no z-only path without the module
        ways["z only"] = entry.derivative(z, None, **params)
    for way, got in ways.items():
        torch.testing.assert_close(got.to(torch.float64), expected, rtol=1e-6, atol=1e-9, msg=way)


@pytest.mark.parametrize("module", list(MODULES.values()) + EXTRA, ids=repr)
def test_bound_holds_and_is_attained(module):
    entry = activations.for_module(module)
    module = module.double()
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64).unsqueeze(1).repeat(1, 3)
    sup = float(_autograd(module, z).abs().max())
    bound = entry.max_derivative(module)
    assert bound >= sup * (1 - 1e-6)
    assert bound == pytest.approx(sup, rel=1e-4)


def test_sigmoid_bound_is_a_quarter_attained_at_zero():
    entry = activations.get("sigmoid")
    assert entry.max_derivative() == 0.25
    assert float(entry.derivative(torch.zeros(1), None)) == 0.25


def test_default_bounds_need_no_module():
    assert activations.get("leaky_relu").max_derivative() == 1.0
    assert activations.get("selu").max_derivative() == pytest.approx(1.0507 * 1.6733, rel=1e-4)
    assert activations.get("gelu").max_derivative() == pytest.approx(1.1289761)


@pytest.mark.parametrize("kind", BUILTIN)
def test_declarations_are_consistent(kind):
    entry = activations.get(kind)
    assert entry.remedy in REMEDIES | {None} and entry.init_remedy in INIT_REMEDIES
    assert entry.init_gain == pytest.approx(
        math.sqrt(2.0) if entry.init_remedy == "he_init" else 1.0
    )
    if entry.builder is None:
        with pytest.raises(ValueError, match="no module class"):
            entry.module_class()
    else:
        assert isinstance(entry.module_class()(), type(MODULES[kind]))


def test_gains_agree_with_the_diagnosis():
    from vanishing.diagnose.view import gain_target

    for entry in activations.registered():
        gain, remedy = gain_target(entry.kind)
        assert (gain, remedy) == (pytest.approx(entry.init_gain), entry.init_remedy), entry.kind


@pytest.mark.parametrize("kind", BUILTIN)
def test_binary_derivative_and_negative_slope_hold(kind):
    entry, module = activations.get(kind), MODULES[kind]
    z = torch.linspace(-10, 10, 2001, dtype=torch.float64)[:, None].repeat(1, 3)
    values = set(_autograd(module, z).unique().tolist())
    assert entry.binary_derivative == (values <= {0.0, 1.0}), (kind, sorted(values)[:4])
    if entry.negative_slope:  # the off side's slope of the module built with its defaults
        built = entry.module_class()().double()
        assert float(_autograd(built, -torch.ones(1, dtype=torch.float64))) == pytest.approx(
            entry.negative_slope
        )
    assert (entry.negative_slope != 0) == (kind in ("leaky_relu", "prelu"))


def test_the_diagnosis_reads_its_activation_sets_off_the_registry():
    from vanishing.diagnose.view import (
        derivative_rms,
        dies_outright,
        is_squashing,
        max_derivative_text,
    )

    assert [k for k in BUILTIN if is_squashing(k)] == ["sigmoid", "tanh", "softsign", "hardtanh"]
    assert [k for k in BUILTIN if dies_outright(k)] == ["relu", "relu6"]
    assert derivative_rms("hardtanh", 0.25) == 0.5 and derivative_rms("tanh", -0.25) == 0.25
    assert max_derivative_text("sigmoid") == "1/4" and max_derivative_text("relu") == "1"
    assert not is_squashing("not-registered") and max_derivative_text("not-registered") == "1"


# ------------------------------------------------------------------- the extension point
def test_a_registered_activation_is_resolved(mish):
    assert activations.for_module(nn.Mish()) is mish
    assert activations.unmeasured(nn.Mish()) is None
    assert "mish" in activations.kinds() and "mish" not in activations.buildable_kinds()


def test_a_registered_activation_is_measured_like_autograd(mish):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(64, 8, generator=gen, dtype=torch.float64) * 2
    module = nn.Mish()
    y = module(z).detach()
    expected = _autograd(module, z)
    stats = summarize(z, y, unit_dim=1, **mish.stat_options(module))
    assert float(stats[2]) == pytest.approx(float(expected.mean()), rel=1e-12)
    saturated = (expected.abs() < 0.05 * mish.max_derivative()).double().mean()
    assert float(stats[3]) == pytest.approx(float(saturated))
    assert math.isnan(float(stats[4]))  # units of a Mish cannot die
    # without its input, phi' is unknown
    assert math.isnan(float(summarize(None, y, **mish.stat_options(module))[2]))
    # stacked calls give each call's own numbers
    stacked = summarize_stacked(torch.stack([z, 2 * z]), torch.stack([y, module(2 * z)]),
                                unit_dim=1, **mish.stat_options(module))  # fmt: skip
    torch.testing.assert_close(stacked[0], stats, equal_nan=True)


def test_mish_bound_holds_and_is_attained(mish):
    z = torch.linspace(-20, 20, 400001, dtype=torch.float64)
    sup = float(_autograd(nn.Mish(), z).abs().max())
    assert mish.max_derivative() >= sup and mish.max_derivative() == pytest.approx(sup, rel=1e-6)


def test_unregistered_activation_is_unmeasured_again(mish):
    activations.unregister("mish")
    try:
        assert activations.for_module(nn.Mish()) is None
        assert activations.unmeasured(nn.Mish()) == "Mish"
    finally:
        activations.register(mish)


def test_registering_twice_is_an_error(mish):
    with pytest.raises(ValueError, match="already registered"):
        activations.register(mish)
    clash = Activation("mish2", ("Mish",), mish_derivative, 1.0)
    with pytest.raises(ValueError, match="'Mish' is already registered as activation 'mish'"):
        activations.register(clash)
    replaced = activations.register(
        Activation("mish", ("Mish",), mish_derivative, 2.0), replace=True
    )
    assert activations.for_module(nn.Mish()) is replaced


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown activation kind 'mish'.*'sigmoid'"):
        activations.get("mish")
    with pytest.raises(ValueError, match="tails"):
        Activation("x", ("X",), mish_derivative, 1.0, tails="upper")


# ------------------------------------------------------- third-party (Hugging Face) classes
# The formulas of transformers.activations, written out: the registry matches by class name.
class GELUActivation(nn.Module):
    def forward(self, x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class NewGELUActivation(nn.Module):
    def forward(self, x):
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0))))


class FastGELUActivation(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


class QuickGELUActivation(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


@pytest.mark.parametrize(
    "module, approximate",
    [(GELUActivation(), "none"), (NewGELUActivation(), "tanh"), (FastGELUActivation(), "tanh")],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else v,
)
def test_hugging_face_gelus_are_gelu_with_their_form(module, approximate):
    entry = activations.for_module(module)
    assert entry.kind == "gelu" and entry.params(module) == {"approximate": approximate}
    z = _random_z()
    got = entry.derivative(z, module(z), **entry.params(module))
    torch.testing.assert_close(got, _autograd(module, z), rtol=1e-9, atol=1e-12)


def test_quick_gelu_is_measured_with_its_own_derivative():
    # CLIP's x * sigmoid(1.702 x): SiLU's derivative at 1.702 z, so SiLU's bound too
    module = QuickGELUActivation()
    entry = activations.for_module(module)
    assert entry.kind == "quick_gelu" and activations.unmeasured(module) is None
    z = _random_z()
    got = entry.derivative(z, module(z), **entry.params(module))
    torch.testing.assert_close(got, _autograd(module, z), rtol=1e-9, atol=1e-12)
    grid = torch.linspace(-20, 20, 400001, dtype=torch.float64)
    peak = float(entry.derivative(grid, None).abs().max())
    assert peak == pytest.approx(entry.max_derivative(module), abs=1e-6)
    assert activations.unmeasured(nn.Hardswish()) == "Hardswish"


# ----------------------------------------------------------------------------- the seams
def test_registry_and_names_import_without_torch():
    code = (
        "import sys, vanishing.activations, vanishing.stats.names, vanishing.recorder.schema; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("path", sorted(STATS.glob("*.py")), ids=lambda p: p.name)
def test_stats_imports_nothing_else_of_the_package(path):
    """At module level; the kind-based wrappers' lazy imports are temporary (see the module)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            assert not name.startswith("vanishing") or name.startswith("vanishing.stats"), name
