"""Denormal-free and fused step-end measurement (issue 17), against float64 references.

The eager path measures in float32 with denormals flushed around the monitor's own operations
and rechecks in float64; the fused path (``VANISHING_FUSED=1``) sums squares in float64 in
compiled kernels. Both must record the exact norms down to the smallest denormal gradients,
never change the user's flush-denormal setting, and agree with each other.
"""

import math

import pytest
import torch
from torch import nn

import vanishing
from helpers import mlp, row, train
from vanishing.stats import fused as fused_mod
from vanishing.stats import norms as norms_mod
from vanishing.stats.norms import _flushes_denormals, cpu_norm, l2_norms

SCALES = [1e-20, 1e-25, 1e-30, 1e-35, 1e-38, 1e-40, 1e-42, 1e-45]
CAN_FLUSH = torch.set_flush_denormal(True)
torch.set_flush_denormal(False)


def f64_norm(t):
    return math.sqrt(sum(float(v) ** 2 for v in t.detach().double().flatten()))


@pytest.fixture
def policy(request, monkeypatch):
    """The monitor flushing around its own ops (True) or not (False), whatever the CPU's
    measured trade-off (``_flush_pays``) would pick: both paths must be exact."""
    if request.param and not CAN_FLUSH:
        pytest.skip("this CPU cannot flush denormals")
    monkeypatch.setattr(norms_mod, "_FLUSH_PAYS", request.param)
    return request.param


@pytest.fixture
def user_flush(request):
    """The user's own flush-denormal setting for the test, put back to off after it."""
    if request.param and not CAN_FLUSH:
        pytest.skip("this CPU cannot flush denormals")
    yield request.param
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("policy", [False, True], indirect=True)
@pytest.mark.parametrize("user_flush", [False, True], indirect=True)
@pytest.mark.parametrize("scale", SCALES)
def test_norms_are_exact_down_to_denormal_entries_and_the_setting_is_kept(
    scale, user_flush, policy
):
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(256, 256, generator=gen) * scale, torch.randn(300, generator=gen) * scale]
    ts.append(torch.full((64,), scale))  # every entry the same: 1e-45 is the smallest denormal
    expected = [f64_norm(t) for t in ts]
    assert expected[2] > 0
    torch.set_flush_denormal(user_flush)
    got = l2_norms(ts).tolist()
    one = [cpu_norm(t) for t in ts]
    assert _flushes_denormals() == user_flush
    assert got == pytest.approx(expected, rel=1e-6)
    assert one == pytest.approx(expected, rel=1e-6)


def _tiny_run(run_dir, scale, user_flush, steps=3):
    """A model trained on gradients of size ``scale`` (written after backward, so that even
    denormal ones reach the monitor as they are), its first layer starting at zero weights so
    that the updates are representable. Returns the float64 references per step."""
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) * scale for p in model.parameters()]]
    grads += [[torch.randn(p.shape, generator=gen) * scale for p in model.parameters()]]
    grads += [[g.flip(0) for g in grads[0]]]
    x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    saved = []
    with vanishing.watch(model, opt, run_dir=run_dir) as mon:
        torch.set_flush_denormal(user_flush)
        for step in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            for p, g in zip(model.parameters(), grads[step]):
                p.grad.copy_(g)  # a copy does no arithmetic: denormal entries stay
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            after = [p.detach().clone() for p in model.parameters()]
            assert _flushes_denormals() == user_flush  # after every step
            saved.append((list(grads[step]), before, after))
        torch.set_flush_denormal(False)
    refs = []
    for g, before, after in saved:
        refs.append(
            [
                (f64_norm(gi), f64_norm(b), f64_norm(a.double() - b.double()))
                for gi, b, a in zip(g, before, after)
            ]
        )
    return mon, refs


def _check_tiny_run(run_dir, refs, scale, user_flush):
    run = vanishing.load_run(run_dir)
    names = [n.rpartition(".") for n, _ in mlp().named_parameters()]
    moved = 0
    for step, per_param in enumerate(refs):
        for (layer, _, param), (gn, wn, un) in zip(names, per_param):
            r = row(run, step, layer, param)
            assert r.grad_norm == pytest.approx(gn, rel=1e-6), (step, layer, param)
            assert r.param_norm == pytest.approx(wn, rel=1e-6), (step, layer, param)
            assert r.update_norm == pytest.approx(un, rel=1e-6), (step, layer, param)
            moved += un > 0
    # some update was representable, so the test measured one (with the user's flushing on,
    # SGD itself reads denormal gradients as zero and changes nothing)
    assert moved > 0 or (user_flush and scale < 1.18e-38)
    return run


@pytest.mark.parametrize("policy", [False, True], indirect=True)
@pytest.mark.parametrize("user_flush", [False, True], indirect=True)
@pytest.mark.parametrize("scale", SCALES)
def test_monitor_records_exact_gradient_and_update_norms_of_tiny_gradients(
    run_dir, scale, user_flush, policy
):
    mon, refs = _tiny_run(run_dir, scale, user_flush)
    run = _check_tiny_run(run_dir, refs, scale, user_flush)
    measurement = run.manifest["measurement"]
    assert measurement["update"] == "eager" and measurement["grad"] == "eager"
    assert measurement["flush_denormal"] == policy  # the user's flushing starts after attach


def test_flushing_is_used_only_where_it_is_measured_to_pay(monkeypatch):
    """The once-per-process measurement decides; the user's setting is kept either way."""
    monkeypatch.setattr(norms_mod, "_FLUSH_PAYS", None)
    pays = norms_mod._flush_pays()
    assert isinstance(pays, bool) and not _flushes_denormals()
    assert norms_mod._FLUSH_PAYS is pays  # measured once
    x = torch.full((8,), 1e-40)
    with norms_mod.flush_denormals() as on:
        flushed = (x * 1.0).sum().item() == 0.0
    assert on == pays == flushed
    assert not _flushes_denormals()


# ----------------------------------------------------------------------------- fused path
# Each test below compiles at most a kernel or two (cached for the whole session and on disk
# by torch itself): every model is mlp()'s shape unless the test is about another one.


@pytest.fixture
def fused_on(monkeypatch):
    pytest.importorskip("torch._inductor")
    monkeypatch.setenv(fused_mod.ENV, "1")


def _frozen(model):
    model[2].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


MODES = {
    "sgd": (lambda m: torch.optim.SGD(m.parameters(), lr=0.5), 1, lambda m: m),
    "adam": (lambda m: torch.optim.Adam(m.parameters(), lr=0.01), 1, lambda m: m),
    "frozen-layer": (lambda m: torch.optim.SGD(m.parameters(), lr=0.5), 1, _frozen),
    "accumulation": (lambda m: torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9), 3, None),
}


def _records(run_dir, mode, steps=6):
    make_opt, accumulate, prepare = MODES[mode]
    torch.manual_seed(0)
    model = (prepare or (lambda m: m))(mlp())
    opt = make_opt(model)
    with vanishing.watch(model, opt, run_dir=run_dir):
        losses = train(model, opt, steps=steps, accumulate=accumulate)
    run = vanishing.load_run(run_dir)
    return run, losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_fused_records_equal_eager_records(tmp_path, monkeypatch, mode):
    pytest.importorskip("torch._inductor")
    eager, eager_losses, eager_weights = _records(tmp_path / "eager", mode)
    monkeypatch.setenv(fused_mod.ENV, "1")
    fused, fused_losses, fused_weights = _records(tmp_path / "fused", mode)
    assert fused.manifest["measurement"]["update"] == "fused-inductor"
    assert fused.manifest["measurement"]["grad"] == "fused-inductor"
    assert eager.manifest["measurement"]["update"] == "eager"
    # the monitor never changes training: same losses and weights bit for bit
    assert fused_losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(fused_weights, eager_weights))
    a, b = eager.metrics, fused.metrics
    assert a[["step", "layer", "param"]].equals(b[["step", "layer", "param"]])
    # Norms: fused sums in float64, eager in float32 and trusts a float32 norm only where its
    # relative error is <= ~1e-6 (_TRUSTED_MEAN_SQUARE*), plus float32 summation rounding
    # (~1e-7 at these sizes): they agree to 2e-6. Every other column is identical.
    norms = [
        c
        for c in a.columns
        if c.endswith(("_norm", "_ratio")) and c.startswith(("grad", "param", "update"))
    ]
    for c in a.columns:
        if c in ("step", "layer", "param", "depth"):
            continue
        x, y = a[c].to_numpy(dtype=float), b[c].to_numpy(dtype=float)
        if c in norms:
            assert y.tolist() == pytest.approx(x.tolist(), rel=2e-6, nan_ok=True), c
        else:
            assert y.tolist() == pytest.approx(x.tolist(), rel=0, abs=0, nan_ok=True), c
    assert (b.update_norm.dropna() > 0).any()


@pytest.mark.slow
@pytest.mark.parametrize("user_flush", [False, True], indirect=True)
@pytest.mark.parametrize("scale", [1e-20, 1e-40, 1e-45])
def test_fused_records_exact_norms_of_tiny_gradients(run_dir, fused_on, scale, user_flush):
    mon, refs = _tiny_run(run_dir, scale, user_flush)
    run = _check_tiny_run(run_dir, refs, scale, user_flush)
    assert run.manifest["measurement"]["update"] == "fused-inductor"


@pytest.mark.slow
def test_fused_kernels_compile_when_watching_starts_and_never_per_step(run_dir, fused_on):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, opt, run_dir=run_dir) as mon:
        graphs = counters["stats"]["unique_graphs"]
        compiled = fused_mod.compilations
        train(model, opt, steps=4)
        # a step where one parameter has no gradient: that step is measured eagerly
        opt.zero_grad()
        model(torch.randn(4, 5)).sum().backward()
        model[0].weight.grad = None
        opt.step()
        train(model, opt, steps=4, seed=2)
        assert counters["stats"]["unique_graphs"] == graphs
        assert fused_mod.compilations == compiled
    run = vanishing.load_run(mon.run_dir)
    assert run.manifest["measurement"]["update"] == "fused-inductor"
    assert len(run.steps) == 9
    assert math.isnan(row(run, 4, "0", "weight").grad_norm)  # no gradient, nothing recorded
    assert row(run, 5, "0", "weight").grad_norm > 0


@pytest.mark.slow
def test_without_a_compiler_the_eager_path_runs_and_the_manifest_says_so(tmp_path, monkeypatch):
    pytest.importorskip("torch._inductor")
    eager, _, _ = _records(tmp_path / "eager", "sgd")

    def no_compiler(fn, tag):
        raise RuntimeError("no C++ compiler found (simulated)\nsecond line")

    monkeypatch.setenv(fused_mod.ENV, "1")
    monkeypatch.setattr(fused_mod, "_compile", no_compiler)
    monkeypatch.setattr(fused_mod, "_compiled", {})  # nothing compiled before in this process
    fallback, _, _ = _records(tmp_path / "fallback", "sgd")
    m = fallback.manifest["measurement"]
    assert m["update"] == "eager" and m["grad"] == "eager"
    assert m["fused_error"] == "RuntimeError: no C++ compiler found (simulated)"
    assert any("fused measurement unavailable" in n["text"] for n in fallback.manifest["notes"])
    # the fallback is the eager path itself: the same records, value for value
    cols = [c for c in eager.metrics.columns if c not in ("layer", "param")]
    assert fallback.metrics[cols].fillna(-1).equals(eager.metrics[cols].fillna(-1))


@pytest.mark.slow
def test_a_fused_kernel_that_fails_while_training_hands_over_to_eager(run_dir, fused_on):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = vanishing.watch(model, opt, run_dir=run_dir)
    train(model, opt, steps=2)
    probe = next(p for p in mon._probes if type(p).__name__ == "ParamProbe")

    def fails():
        raise RuntimeError("Detected recompile when torch.compile stance is 'fail_on_recompile'")

    probe._tracker[1].fused.step = fails
    train(model, opt, steps=3, seed=3)
    mon.close()
    run = vanishing.load_run(run_dir)
    m = run.manifest["measurement"]
    assert m["update"] == "eager" and "fail_on_recompile" in m["fused_error"]
    assert math.isnan(row(run, 2, "0", "weight").update_norm)  # the failed step: no update
    assert row(run, 4, "0", "weight").update_norm > 0  # eager again, from a fresh snapshot
