"""The monitor's seams: optimizer.step(closure), probes of one's own, sinks of one's own."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import vanishing
from helpers import mlp, row
from vanishing.probes import Column, Probe


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)
    ]


def _closure_loop(model, opt, batches, *, closure=True):
    for x, y in batches:

        def step_closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if closure:
            opt.step(step_closure)
        else:
            step_closure()
            opt.step()


def _true_first_evaluations(model, make_opt, batches):
    """Per step: the loss and each parameter's gradient norm at the closure's first evaluation,
    computed by plain autograd on a twin of the model."""
    opt = make_opt(model.parameters())
    out = []
    for x, y in batches:
        first = []

        def step_closure(x=x, y=y, first=first):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if not first:
                norms = {n: p.grad.norm().item() for n, p in model.named_parameters()}
                first.append((loss.item(), norms))
            return loss

        opt.step(step_closure)
        out.append(first[0])
    return out


@pytest.mark.parametrize(
    "make_opt,backwards",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 1),
        (lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=3), 3),
    ],
    ids=["sgd", "lbfgs"],
)
def test_step_with_closure_records_the_gradients_of_that_step(run_dir, make_opt, backwards):
    torch.manual_seed(0)
    model = mlp(act=nn.Tanh)
    twin = copy.deepcopy(model)
    batches = _batches()
    truth = _true_first_evaluations(twin, make_opt, batches)
    opt = make_opt(model.parameters())
    with vanishing.watch(model, opt, run_dir=run_dir):
        _closure_loop(model, opt, batches)
    run = vanishing.load_run(run_dir)
    assert run.steps.step.tolist() == [0, 1, 2, 3]
    assert run.steps.n_backward.tolist() == [backwards] * 4  # every evaluation counted
    assert run.steps.skipped.tolist() == [0] * 4  # LBFGS's re-evaluations are not skipped steps
    for step, (loss, norms) in enumerate(truth):
        assert run.steps.loss[step] == pytest.approx(loss, rel=1e-6)  # the first evaluation's
        for name, norm in norms.items():
            layer, param = name.rsplit(".", 1)
            assert row(run, step, layer, param).grad_norm == pytest.approx(norm, rel=1e-6)
    # the update is the whole step's change, which LBFGS makes over its iterations
    assert (run.metrics[run.metrics.param == "weight"].update_norm > 0).all()
    assert torch.equal(model[0].weight, twin[0].weight)  # the monitor changed nothing


def test_a_closure_records_what_the_plain_loop_records(tmp_path):
    def record(closure):
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        with vanishing.watch(model, opt, run_dir=tmp_path / str(closure)):
            _closure_loop(model, opt, _batches(), closure=closure)
        return vanishing.load_run(tmp_path / str(closure))

    a, b = record(True), record(False)
    pd.testing.assert_frame_equal(a.metrics, b.metrics, check_exact=True)
    pd.testing.assert_frame_equal(a.temporal, b.temporal, check_exact=True)
    pd.testing.assert_frame_equal(
        a.steps.drop(columns="time"), b.steps.drop(columns="time"), check_exact=True
    )


class MaxAbsWeight(Probe):
    """A statistic the package does not have: the largest |weight| of every parameter."""

    columns = (Column("weight_max_abs", level="param", reduce="max", scale="linear"),)

    def attach(self, ctx):
        self.params = [r.param for r in ctx.layout.params]

    def measure(self, row):
        row.set_params(
            "weight_max_abs", torch.stack([p.detach().abs().max() for p in self.params]).double()
        )


class GradMaxAbs(Probe):
    """A module-level and a step-level column, measured at grads_ready."""

    columns = (
        Column("out_abs_max", level="module", reduce="max"),
        Column("grad_sq_total", level="step", reduce="sum"),
    )

    def attach(self, ctx):
        self.ctx = ctx
        self.rows = [r for r in ctx.layout.modules if r.owns_params]
        self.seen = {}
        for r in self.rows:
            ctx.events.on_output(r.module, lambda m, a, out, r=r: self._keep(r, out))

    def _keep(self, r, out):
        if self.ctx.capturing():
            self.seen[r.index] = out.detach().abs().max().double()

    def grads_ready(self):
        self.total = sum(p.param.grad.double().pow(2).sum() for p in self.ctx.layout.params)

    def measure(self, row):
        rows = sorted(self.seen)
        row.set_modules(
            "out_abs_max", rows, torch.stack([self.seen[i] for i in rows]).reshape(-1, 1)
        )
        row.set_step("grad_sq_total", self.total)

    def reset(self):
        self.seen = {}


def test_a_new_statistic_through_the_public_probe_api(run_dir):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    weights, outputs, totals = [], [], []
    with vanishing.watch(model, opt, run_dir=run_dir, probes=[MaxAbsWeight(), GradMaxAbs()]):
        for x, y in _batches(3):
            opt.zero_grad()
            h = x
            per_layer = {}
            for i, m in enumerate(model):
                h = m(h)
                if isinstance(m, nn.Linear):
                    per_layer[str(i)] = h.detach().abs().max().item()
            nn.functional.cross_entropy(h, y).backward()
            totals.append(sum(p.grad.double().pow(2).sum().item() for p in model.parameters()))
            outputs.append(per_layer)
            opt.step()
            # measure() runs at step end: the weights after this step's update
            weights.append({n: p.detach().abs().max().item() for n, p in model.named_parameters()})
    run = vanishing.load_run(run_dir)
    m = run.metrics
    for step in range(3):
        for name, value in weights[step].items():
            layer, param = name.rsplit(".", 1)
            assert row(run, step, layer, param).weight_max_abs == pytest.approx(value, rel=1e-7)
        for layer, value in outputs[step].items():
            assert row(run, step, layer, "").out_abs_max == pytest.approx(value, rel=1e-7)
    assert run.steps.grad_sq_total.tolist() == pytest.approx(totals, rel=1e-9)
    # the built-in columns are where they always are, the new ones after them
    assert list(m.columns[: len(vanishing.recorder.schema.METRIC_COLUMNS)]) == list(
        vanishing.recorder.schema.METRIC_COLUMNS
    )
    assert list(m.columns[-2:]) == ["weight_max_abs", "out_abs_max"]
    assert m[m.param == ""].weight_max_abs.isna().all()  # module rows have no parameter stats


def test_a_probe_column_that_clashes_is_refused(run_dir):
    class Clash(MaxAbsWeight):
        columns = (Column("grad_norm", level="param"),)

    with pytest.raises(vanishing.WatchError, match="'grad_norm' is declared twice"):
        vanishing.watch(mlp(), run_dir=run_dir, probes=[Clash()])
    with pytest.raises(ValueError, match="reserved"):
        Column("layer", level="param")


class MemorySink:
    """A sink of one's own: keeps every block."""

    def __init__(self):
        self.calls = []

    def open(self, manifest):
        self.calls.append(("open", manifest["schema_version"]))
        self.blocks = []

    def write(self, block):
        self.calls.append(("write", block.n))
        self.blocks.append(block)

    def close(self):
        self.calls.append(("close",))


def test_a_new_sink_receives_every_flushed_step(run_dir):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = MemorySink()
    with vanishing.watch(model, opt, run_dir=run_dir, sinks=[sink], flush_every=2):
        _closure_loop(model, opt, _batches(5), closure=False)
    assert sink.calls[0] == ("open", 1) and sink.calls[-1] == ("close",)
    steps = np.concatenate([b.steps for b in sink.blocks])
    assert steps.tolist() == [0, 1, 2, 3, 4]
    # what the sink got is what the run directory holds
    run = vanishing.load_run(run_dir)
    losses = np.concatenate([b.values["step"]["loss"] for b in sink.blocks])
    assert losses.tolist() == run.steps.loss.tolist()
    last = [b for b in sink.blocks if b.n][-1]
    layer, param, _ = last.params[0]
    assert last.values["param"]["grad_norm"][-1, 0] == row(run, 4, layer, param).grad_norm
    assert sink.blocks[-1].manifest["status"] == "completed"  # the final manifest comes last


def test_a_failing_sink_warns_and_the_run_directory_is_still_written(run_dir):
    class Broken(MemorySink):
        def write(self, block):
            raise OSError("disk gone")

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="Broken.write failed: OSError: disk gone"):
        with vanishing.watch(model, opt, run_dir=run_dir, sinks=[Broken()]):
            _closure_loop(model, opt, _batches(2), closure=False)
    assert vanishing.load_run(run_dir).steps.step.tolist() == [0, 1]


def test_something_that_is_not_a_sink_or_probe_is_refused(run_dir):
    with pytest.raises(vanishing.WatchError, match="is not a sink"):
        vanishing.watch(mlp(), run_dir=run_dir, sinks=[object()])
    with pytest.raises(vanishing.WatchError, match="is not a probe"):
        vanishing.watch(mlp(), run_dir=run_dir, probes=[object()])


def test_clipping_shows_as_the_ratio_of_the_two_total_norms(run_dir):
    from vanishing.probes import ClippingProbe

    torch.manual_seed(0)
    model = mlp(act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before, after = [], []
    with vanishing.watch(model, opt, run_dir=run_dir, probes=[ClippingProbe()]):
        for i, (x, y) in enumerate(_batches(4)):
            opt.zero_grad()
            scale = 100.0 if i % 2 == 0 else 0.01  # clipping engages on even steps only
            (scale * nn.functional.cross_entropy(model(x), y)).backward()
            grads = [p.grad.double() for p in model.parameters()]
            before.append(torch.cat([g.reshape(-1) for g in grads]).norm().item())
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            grads = [p.grad.double() for p in model.parameters()]
            after.append(torch.cat([g.reshape(-1) for g in grads]).norm().item())
            opt.step()
    steps = vanishing.load_run(run_dir).steps
    assert steps.grad_norm_backward.tolist() == pytest.approx(before, rel=1e-6)
    assert steps.grad_norm_step.tolist() == pytest.approx(after, rel=1e-6)
    ratio = (steps.grad_norm_step / steps.grad_norm_backward).tolist()
    assert ratio[0] < 0.1 and ratio[2] < 0.1  # clipped hard
    assert ratio[1] == pytest.approx(1.0) and ratio[3] == pytest.approx(1.0)  # not clipped


def test_the_grad_scaler_scale_is_recorded_per_step(run_dir):
    from vanishing.probes import ClippingProbe

    torch.manual_seed(0)
    model = mlp()
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scales = []
    with vanishing.watch(model, opt, run_dir=run_dir, scaler=scaler, probes=[ClippingProbe()]):
        for i, (x, y) in enumerate(_batches(4)):
            opt.zero_grad()
            scales.append(scaler.get_scale())
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            if i == 1:
                model[0].weight.grad[0, 0] = float("inf")  # an overflow: the step is skipped
            scaler.step(opt)
            scaler.update()
    run = vanishing.load_run(run_dir)
    assert run.steps.skipped.tolist() == [0, 1, 0]
    assert run.steps.amp_scale.tolist() == [scales[0], scales[2], scales[3]]
    assert scales[2] == scales[1] / 2  # the scaler backed off after the overflow
    # the backward-end total norm is unscaled: the same as without AMP at step 0
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(plain(x), y).backward()
    true = torch.cat([p.grad.reshape(-1) for p in plain.parameters()]).norm().item()
    assert run.steps.grad_norm_backward[0] == pytest.approx(true, rel=1e-5)


def _train_steps(model, opt, n, seed=1):
    for x, y in _batches(n, seed=seed):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_overwrite_replaces_a_run_and_nothing_else(run_dir):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, opt, run_dir=run_dir):
        _train_steps(model, opt, 4)
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "summary.json").write_text("{}")
    with pytest.raises(vanishing.WatchError, match="overwrite=True to replace it"):
        vanishing.watch(model, opt, run_dir=run_dir)
    with vanishing.watch(model, opt, run_dir=run_dir, overwrite=True):
        _train_steps(model, opt, 2)
    assert vanishing.load_run(run_dir).steps.step.tolist() == [0, 1]
    assert (run_dir / "notes.txt").read_text() == "mine"  # not the run's: kept
    assert not (run_dir / "summary.json").exists()  # the old run's: gone with it


def test_resume_continues_the_run_in_the_same_directory(run_dir):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, opt, run_dir=run_dir, flush_every=2) as first:
        _train_steps(model, opt, 3)
    created = vanishing.load_run(run_dir).manifest["created"]
    with vanishing.watch(model, opt, run_dir=run_dir, resume=True, flush_every=2) as again:
        assert again.step == 3
        _train_steps(model, opt, 2, seed=2)
    run = vanishing.load_run(run_dir)
    assert run.steps.step.tolist() == [0, 1, 2, 3, 4]
    assert run.manifest["created"] == created and run.manifest["resumed_at"] == [3]
    assert run.manifest["steps_completed"] == 5 and first.run_dir == again.run_dir
    assert sorted(run.metrics.step.unique().tolist()) == [0, 1, 2, 3, 4]
    # a trainer that knows its global step says where to continue
    with vanishing.watch(model, opt, run_dir=run_dir, resume=True, start_step=10):
        _train_steps(model, opt, 1)
    assert vanishing.load_run(run_dir).steps.step.tolist() == [0, 1, 2, 3, 4, 10]


def test_resume_refuses_what_would_mix_or_lose_records(run_dir, tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(vanishing.WatchError, match="no run to resume"):
        vanishing.watch(model, opt, run_dir=run_dir, resume=True)
    with vanishing.watch(model, opt, run_dir=run_dir):
        _train_steps(model, opt, 3)
    other = mlp(depth=2)
    with pytest.raises(vanishing.WatchError, match="another model"):
        vanishing.watch(other, run_dir=run_dir, resume=True)
    with pytest.raises(vanishing.WatchError, match="recorded twice"):
        vanishing.watch(model, opt, run_dir=run_dir, resume=True, start_step=1)
    with pytest.raises(vanishing.WatchError, match="contradict"):
        vanishing.watch(model, opt, run_dir=run_dir, resume=True, overwrite=True)
    assert vanishing.load_run(run_dir).steps.step.tolist() == [0, 1, 2]  # untouched


def test_a_new_activation_through_the_public_registry_is_measured(run_dir):
    from vanishing import activations

    def mish_derivative(z, y):
        t = torch.tanh(nn.functional.softplus(z))
        return t + z * torch.sigmoid(z) * (1 - t * t)

    grid = torch.linspace(-20, 20, 400_001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(nn.functional.mish(grid).sum(), grid)
    entry = activations.Activation(
        kind="mish",
        classes=("Mish",),
        derivative=mish_derivative,
        bound=float(slope.abs().max()),
        input_needed=True,
        tails="lower",
        signed=True,
    )
    activations.register(entry)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Mish(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = _batches(1)[0]
        z = model[0](x).detach().requires_grad_(True)  # the Mish's input at step 0
        (phi,) = torch.autograd.grad(nn.functional.mish(z).sum(), z)  # phi'(z) by autograd
        with vanishing.watch(model, opt, run_dir=run_dir):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        activations.unregister("mish")
    run = vanishing.load_run(run_dir)
    assert run.layer_info[1]["activation"] == "mish"
    assert row(run, 0, "1", "").act_deriv_mean == pytest.approx(phi.mean().item(), rel=1e-6)
    assert row(run, 0, "1", "").act_mean == pytest.approx(
        nn.functional.mish(z).mean().item(), rel=1e-6
    )


def test_a_step_that_calls_a_submodule_of_the_watched_model_is_recorded(run_dir):
    class Wrapper(nn.Module):  # as a LightningModule: training code calls self.net(x)
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    model = Wrapper()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    with vanishing.watch(model, opt, run_dir=run_dir):
        for x, y in _batches(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model.net(x), y).backward()
            norms.append(model.net[0].weight.grad.norm().item())
            opt.step()
    run = vanishing.load_run(run_dir)
    assert run.steps.n_backward.tolist() == [1, 1, 1]
    assert [row(run, s, "net.0", "weight").grad_norm for s in range(3)] == pytest.approx(norms)


@pytest.mark.parametrize(
    "kwargs",
    [{"foreach": True}, {"fused": True}, {"foreach": False}],
    ids=["foreach", "fused", "loop"],
)
def test_foreach_and_fused_optimizers_record_the_true_gradients_and_updates(run_dir, kwargs):
    torch.manual_seed(0)
    model = mlp(act=nn.Tanh)
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, **kwargs)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.01)  # the reference: a plain loop
    truth = []
    for x, y in _batches(3):
        twin_opt.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        before = {n: p.detach().clone() for n, p in twin.named_parameters()}
        grads = {n: p.grad.norm().item() for n, p in twin.named_parameters()}
        twin_opt.step()
        updates = {n: (p.detach() - before[n]).norm().item() for n, p in twin.named_parameters()}
        truth.append((grads, updates))
    with vanishing.watch(model, opt, run_dir=run_dir):
        _closure_loop(model, opt, _batches(3), closure=False)
    run = vanishing.load_run(run_dir)
    for step, (grads, updates) in enumerate(truth):
        for name in grads:
            layer, param = name.rsplit(".", 1)
            r = row(run, step, layer, param)
            assert r.grad_norm == pytest.approx(grads[name], rel=1e-5)
            assert r.update_norm == pytest.approx(updates[name], rel=1e-4)
