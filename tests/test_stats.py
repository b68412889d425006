"""The pure statistics against independent computations (float64 brute force, autograd)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from helpers import QuickGELU
from vanishing import activations
from vanishing.stats import l2_norms, nonfinite_counts, summarize, temporal_profile
from vanishing.stats.norms import l2_norm, time_points


def brute_norm(t):
    return math.sqrt(sum(float(v) ** 2 for v in t.double().flatten()))


def test_l2_norms_match_float64_brute_force():
    ts = [torch.randn(7, 5), torch.randn(3), torch.zeros(4), torch.randn(2, 2, 2) * 1e3]
    got = l2_norms(ts)
    assert got.dtype == torch.float64
    for g, t in zip(got.tolist(), ts):
        assert g == pytest.approx(brute_norm(t), rel=1e-6)


@pytest.mark.parametrize("scale", [1e-25, 1e-40, 1e25, 3e-23, 1e-21, 7e-21])
def test_l2_norms_survive_float32_under_and_overflow(scale):
    # 3e-23 .. 7e-21: the squares are denormal floats (a float32 sum of them is off by up to
    # 50%: 3e-23 squared rounds to 1.4e-45), yet not zero, so only their size gives them away
    t = torch.full((100,), scale, dtype=torch.float32)
    expected = float(t.double()[0]) * 10.0  # sqrt(100 x^2), with x as float32 stores it
    assert l2_norms([t, torch.ones(4)]).tolist() == pytest.approx([expected, 2.0], rel=1e-6, abs=0)
    assert l2_norm(t).item() == pytest.approx(expected, rel=1e-6, abs=0)


def test_l2_norms_of_random_entries_across_the_denormal_range_match_float64():
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(300, generator=gen) * 10.0**-e for e in range(15, 26)]
    ts += [torch.randn(256, 256, generator=gen) * 1e-20]
    got = l2_norms(ts).tolist()
    assert got == pytest.approx([brute_norm(t) for t in ts], rel=2e-6, abs=0)


def test_l2_norms_mixed_dtypes_and_empty():
    ts = [torch.ones(4, dtype=torch.float16), torch.ones(9, dtype=torch.float64), torch.ones(1)]
    assert l2_norms(ts).tolist() == pytest.approx([2.0, 3.0, 1.0])
    assert l2_norms([]).numel() == 0


def test_l2_norms_keep_nan_and_inf():
    got = l2_norms([torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 0.0])])
    assert math.isnan(got[0]) and math.isinf(got[1])


def test_nonfinite_counts():
    a = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    b = torch.randn(10)
    assert nonfinite_counts([a, b]).tolist() == [3.0, 0.0]
    assert nonfinite_counts([a, b], l2_norms([a, b])).tolist() == [3.0, 0.0]
    # a finite tensor whose float32 norm overflows has no non-finite entry
    big = torch.full((10,), 1e30)
    assert nonfinite_counts([big], torch.tensor([float("inf")])).tolist() == [0.0]


def test_temporal_profile_padded_time_major_and_batch_first():
    g = torch.randn(9, 3, 4)  # (T, B, F)
    profile, T = temporal_profile(g, time_dim=0)
    assert T == 9
    expected = [brute_norm(g[t]) for t in range(9)]
    assert profile[:9].tolist() == pytest.approx(expected)
    assert torch.isnan(profile[9:]).all()
    profile_bf, _ = temporal_profile(g.transpose(0, 1), time_dim=1)
    assert profile_bf[:9].tolist() == pytest.approx(expected)


def test_temporal_profile_downsamples_keeping_first_and_last():
    g = torch.randn(200, 2, 3)
    profile, T = temporal_profile(g, time_dim=0, max_points=64)
    pts = time_points(200, 64)
    assert len(pts) == 64 and pts[0] == 0 and pts[-1] == 199
    assert profile.tolist() == pytest.approx([brute_norm(g[t]) for t in pts])


def test_temporal_profile_packed_sequence():
    seqs = [torch.randn(5, 3), torch.randn(3, 3), torch.randn(2, 3)]
    packed = nn.utils.rnn.pack_sequence(seqs)
    profile, T = temporal_profile(packed.data, batch_sizes=packed.batch_sizes)
    assert T == 5
    expected = [math.sqrt(sum(brute_norm(s[t]) ** 2 for s in seqs if t < len(s))) for t in range(5)]
    assert profile[:5].tolist() == pytest.approx(expected)


_MODULES = {
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
    "quick_gelu": QuickGELU(),
}


def _kwargs(kind, module):
    return activations.get(kind).params(module)


def _derivative(kind, z, y, **params):
    return activations.get(kind).derivative(z, y, **params)


def _stats(kind, z, y, *, unit_dim=-1):
    """The pure summary with the options the registry gives the stock module of ``kind``."""
    module = _MODULES[kind]
    return summarize(z, y, unit_dim=unit_dim, **activations.get(kind).stat_options(module))


@pytest.mark.parametrize("kind", activations.kinds())
def test_derivative_matches_autograd(kind):
    module = _MODULES[kind]
    z = (torch.randn(64, 3, dtype=torch.float64) * 3).requires_grad_(True)
    z.data[z.data.abs() < 1e-3] = 0.5  # stay off the kinks
    module = module.double()
    y = module(z)
    (expected,) = torch.autograd.grad(y.sum(), z)
    got = _derivative(kind, z.detach(), y.detach(), **_kwargs(kind, module))
    torch.testing.assert_close(got.to(torch.float64), expected, rtol=1e-6, atol=1e-9)
    if kind not in ("prelu", "gelu", "silu", "quick_gelu"):  # these need the input
        got_y = _derivative(kind, None, y.detach(), **_kwargs(kind, module))
        torch.testing.assert_close(got_y.to(torch.float64), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", activations.kinds())
def test_max_derivative_is_the_sup_over_a_fine_grid(kind):
    module = _MODULES[kind].double()
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64).unsqueeze(1).repeat(1, 3)
    z.requires_grad_(True)
    (d,) = torch.autograd.grad(module(z).sum(), z)
    assert activations.get(kind).max_derivative(module) == pytest.approx(
        float(d.abs().max()), rel=1e-4
    )


def test_sigmoid_derivative_bound_is_a_quarter():
    z = torch.randn(10000) * 5
    d = _derivative("sigmoid", z, torch.sigmoid(z))
    assert float(d.max()) <= 0.25


def test_activation_stats_by_brute_force():
    z = torch.randn(12, 20) * 4  # 240 entries: below PERCENTILE_SAMPLE, so exact ranks
    y = torch.sigmoid(z)
    mean, std, dmean, sat, dead, p02, p98 = _stats("sigmoid", z, y).tolist()
    ys = [float(v) for v in y.flatten()]
    # nearest rank: the smallest value with at least 2% (98%) of the entries at or below it
    ordered = sorted(ys)
    assert p02 == pytest.approx(ordered[math.ceil(0.02 * len(ys)) - 1])
    assert p98 == pytest.approx(ordered[math.ceil(0.98 * len(ys)) - 1])
    assert p02 == pytest.approx(float(np.percentile(ys, 2, method="inverted_cdf")))
    m = sum(ys) / len(ys)
    assert mean == pytest.approx(m)
    assert std == pytest.approx(math.sqrt(sum((v - m) ** 2 for v in ys) / (len(ys) - 1)))
    ds = [v * (1 - v) for v in ys]
    assert dmean == pytest.approx(sum(ds) / len(ds), rel=1e-5)
    assert sat == pytest.approx(sum(d < 0.05 * 0.25 for d in ds) / len(ds))
    assert math.isnan(dead)  # not a ReLU-like activation


def test_dead_units_count_units_off_for_every_example():
    z = torch.randn(32, 10)
    z[:, 3] = -torch.rand(32) - 0.1  # unit 3 never active
    z[:, 7] = -1.0  # unit 7 never active
    z[0, 5] = -1.0  # unit 5 sometimes active: not dead
    _, _, dmean, sat, dead = _stats("relu", z, torch.relu(z), unit_dim=1).tolist()[:5]
    assert dead == pytest.approx(2 / 10)
    assert math.isnan(sat)
    assert dmean == pytest.approx(float((z > 0).double().mean()))


def test_dead_units_of_a_conv_map_are_channels():
    z = torch.randn(4, 6, 5, 5)
    z[:, 2] = -1.0
    stats = _stats("relu", z, torch.relu(z), unit_dim=1).tolist()
    assert stats[4] == pytest.approx(1 / 6)


def test_inplace_activation_without_input_still_measured():
    z = torch.randn(8, 4)
    y = torch.tanh(z)
    assert _stats("tanh", None, y).tolist()[2] == pytest.approx(float((1 - y * y).mean()), rel=1e-6)
    # GELU needs its input: without it the derivative is unknown, never made up
    assert math.isnan(_stats("gelu", None, y).tolist()[2])


def test_fused_strategy_used_on_gpus_agrees_with_the_cpu_one():
    ts = [
        torch.randn(7, 5),
        torch.full((100,), 1e-30),
        torch.tensor([1.0, float("nan"), float("inf")]),
    ]
    cpu, fused = l2_norms(ts), l2_norms(ts, fused=True)
    assert cpu[:2].tolist() == pytest.approx(fused[:2].tolist(), rel=1e-6)
    assert math.isnan(fused[2])
    assert nonfinite_counts(ts, fused=True).tolist() == nonfinite_counts(ts).tolist() == [0, 0, 2]


def test_gpu_strategy_mixes_small_and_large_tensors_in_order(monkeypatch):
    """The GPU strategy sums small tensors together and norms large ones alone; either way each
    result is the float64 norm / non-finite count of its own tensor, in the input order."""
    import vanishing.stats.norms as norms_module

    monkeypatch.setattr(norms_module, "_LARGE", 10)
    monkeypatch.setattr(norms_module, "_CHUNK", 16)  # several concatenation chunks too
    g = torch.Generator().manual_seed(0)
    ts = [
        torch.randn(3, 4, generator=g),
        torch.full((5,), 1e-30),
        torch.tensor([1.0, float("nan"), float("inf")]),
        torch.zeros(0),
        torch.ones(2, dtype=torch.float16),
        torch.randn(20, generator=g) * 1e-25,
        torch.randn(7, generator=g),
        torch.tensor([float("inf")] * 12),
    ]
    got = l2_norms(ts, fused=True).tolist()
    want = [torch.linalg.vector_norm(t.double()).item() for t in ts]
    for a, b in zip(got, want):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12)
    counts = nonfinite_counts(ts, fused=True).tolist()
    assert counts == [(~torch.isfinite(t)).sum().item() for t in ts]


def test_percentiles_of_a_large_output_come_from_a_fixed_sample():
    """Above PERCENTILE_SAMPLE entries the percentiles are read from a fixed random sample:
    on a uniform ramp they land within ~4 standard errors of the exact ones, every time."""
    from vanishing.stats.activations import PERCENTILE_SAMPLE

    n = PERCENTILE_SAMPLE * 25
    y = torch.linspace(0, 1, n).reshape(100, -1)
    state = torch.get_rng_state()
    p02, p98 = _stats("sigmoid", None, y).tolist()[5:]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is not touched
    se = math.sqrt(0.02 * 0.98 / PERCENTILE_SAMPLE)  # of a quantile from that many draws
    assert abs(p02 - 0.02) < 4 * se and abs(p98 - 0.98) < 4 * se
    assert _stats("sigmoid", None, y).tolist()[5:] == [p02, p98]  # same sample


def test_percentiles_of_a_conv_map_are_not_aligned_with_its_layout():
    # [batch, channels, 16, 16] whose value depends only on the pixel: an even stride that is a
    # multiple of 16 x 16 would read one pixel of every channel (and say p02 = p98)
    pixel = torch.linspace(0.1, 0.9, 256).reshape(16, 16)
    y = pixel.expand(64, 16, 16, 16).contiguous()
    p02, p98 = _stats("sigmoid", None, y, unit_dim=1).tolist()[5:]
    values = np.sort(y.flatten().numpy())
    exact02, exact98 = (
        values[math.ceil(0.02 * len(values)) - 1],
        values[math.ceil(0.98 * len(values)) - 1],
    )
    assert abs(p02 - exact02) < 0.05 and abs(p98 - exact98) < 0.05


def test_activation_stats_of_an_output_with_nan_are_nan_not_made_up():
    y = torch.sigmoid(torch.randn(16, 8) * 4)
    y[3, 5] = float("nan")
    mean, std, dmean, sat = _stats("sigmoid", None, y).tolist()[:4]
    assert all(math.isnan(v) for v in (mean, std, dmean, sat))


def test_norms_stay_exact_when_denormals_are_flushed_to_zero():
    # torch.set_flush_denormal(True) drops every square below 1.2e-38: entries of 1e-19 square
    # to 1e-38 and vanish, so a sum dominated by them must be redone in float64
    t = torch.cat([torch.full((1,), 1e-18), torch.full((999,), 1e-19)])
    expected = brute_norm(t)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert l2_norms([t]).item() == pytest.approx(expected, rel=1e-6)
        assert l2_norm(t).item() == pytest.approx(expected, rel=1e-6)
    finally:
        torch.set_flush_denormal(False)
    assert l2_norms([t]).item() == pytest.approx(expected, rel=1e-6)
