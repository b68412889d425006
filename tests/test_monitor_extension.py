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
    return [(torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _closure_loop(model, opt, batches, *, closure=True):
    for x, y in batches:

        def step_closure():
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

        def step_closure():
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
        row.set_params("weight_max_abs", torch.stack([p.detach().abs().max() for p in self.params]).double())


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
        row.set_modules("out_abs_max", rows, torch.stack([self.seen[i] for i in rows]).reshape(-1, 1))
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
    assert sink.blocks[-1].manifest["status"] == "closed"  # the final manifest comes last


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
