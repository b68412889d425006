"""How the monitor behaves in real training loops: never changing them, cleaning up, edge cases."""

import copy

import pandas as pd
import pytest
import torch
from torch import nn

import vanishing
from helpers import assert_thinned_run_equals, mlp, row, train
from vanishing.monitor import WatchError


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stats", ["all", "parameters"])
def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path, stats):
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(
            nn.Linear(5, 16),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(16, 16),
            nn.BatchNorm1d(16),
            nn.Tanh(),
            nn.Linear(16, 3),
        )
        return m, torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1)

    m1, o1 = make()
    torch.manual_seed(1)
    l1 = train(m1, o1, steps=12)
    m2, o2 = make()
    torch.manual_seed(1)
    with vanishing.watch(m2, optimizer=o2, run_dir=tmp_path / "r", stats=stats, flush_every=5):
        l2 = train(m2, o2, steps=12)
    assert l1 == l2
    s1, s2 = _state(m1), _state(m2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_recurrent_training_is_bit_identical(tmp_path):
    def make():
        torch.manual_seed(0)
        rnn = nn.LSTM(3, 6, batch_first=True)
        head = nn.Linear(6, 1)
        m = nn.ModuleDict({"rnn": rnn, "head": head})
        return m, torch.optim.SGD(m.parameters(), lr=0.1)

    def loop(m, opt):
        g = torch.Generator().manual_seed(2)
        out = []
        for _ in range(5):
            opt.zero_grad()
            x = torch.randn(4, 7, 3, generator=g)
            h, _ = m["rnn"](x)
            loss = m["head"](h[:, -1]).pow(2).mean()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    m1, o1 = make()
    l1 = loop(m1, o1)
    m2, o2 = make()
    with vanishing.watch(m2, optimizer=o2, run_dir=tmp_path / "r"):
        l2 = loop(m2, o2)
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def _hook_count(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_close_removes_every_hook_and_is_idempotent(run_dir):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before_backward = torch.autograd.backward
    mon = vanishing.watch(model, optimizer=opt, run_dir=run_dir)
    assert _hook_count(model) > 0 and len(opt._optimizer_step_pre_hooks) == 1
    train(model, opt, steps=2)
    mon.close()
    mon.close()
    assert _hook_count(model) == 0
    assert len(opt._optimizer_step_pre_hooks) == 0 and len(opt._optimizer_step_post_hooks) == 0
    assert torch.autograd.backward is before_backward
    train(model, opt, steps=1)  # training goes on, nothing recorded
    assert mon.step == 2
    mon2 = vanishing.watch(model, optimizer=opt, run_dir=run_dir.parent / "again")
    mon2.close()


def test_hooks_are_removed_when_training_raises(run_dir):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(RuntimeError, match="boom"),
        vanishing.watch(model, optimizer=opt, run_dir=run_dir),
    ):
        train(model, opt, steps=3)
        raise RuntimeError("boom")
    assert _hook_count(model) == 0
    assert len(vanishing.load_run(run_dir).steps) == 3  # what was recorded is kept


def test_watching_a_watched_model_is_an_error(run_dir):
    model = mlp()
    with vanishing.watch(model, run_dir=run_dir):
        with pytest.raises(WatchError, match="already watched"):
            vanishing.watch(model, run_dir=run_dir.parent / "other")


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (("not a model",), {}, "needs a torch.nn.Module"),
        ((nn.ReLU(),), {}, "no parameters"),
        ((nn.Linear(2, 2), "sgd"), {}, "torch.optim.Optimizer"),
        ((nn.Linear(2, 2),), {"stats": "everything"}, "stats must be one of"),
        ((nn.Linear(2, 2),), {"flush_every": 0}, "flush_every"),
        ((nn.Linear(2, 2),), {"every": 0}, "every must be"),
        ((nn.Linear(2, 2),), {"every": "sometimes"}, "every must be"),
        ((nn.Linear(2, 2),), {"low_memory": "yes"}, "low_memory must be"),
    ],
)
def test_bad_input_gives_one_clear_error(run_dir, args, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        vanishing.watch(*args, run_dir=run_dir, **kwargs)
    assert "\n" not in str(info.value)


def test_optimizer_that_does_not_hold_the_model_is_an_error(run_dir):
    other = nn.Linear(3, 3)
    with pytest.raises(WatchError, match="holds none of the model's parameters"):
        vanishing.watch(
            mlp(), optimizer=torch.optim.SGD(other.parameters(), lr=0.1), run_dir=run_dir
        )


def test_existing_run_is_never_overwritten(run_dir):
    with vanishing.watch(mlp(), run_dir=run_dir):
        pass
    with pytest.raises(WatchError, match="already holds a run"):
        vanishing.watch(mlp(), run_dir=run_dir)


def test_zero_length_run_reads_as_empty(run_dir):
    with vanishing.watch(mlp(), run_dir=run_dir) as mon:
        pass
    run = vanishing.load_run(mon.run_dir)
    assert len(run.steps) == 0 and len(run.metrics) == 0
    assert run.manifest["status"] == "completed"
    with pytest.raises(ValueError, match="recorded no steps"):
        run.pivot("grad_norm", param="bias")


def test_layers_are_in_forward_order_not_registration_order(run_dir):
    class Shuffled(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(4, 2)  # registered first, runs last
            self.act = nn.Tanh()
            self.inp = nn.Linear(3, 4)  # registered last, runs first

        def forward(self, x):
            return self.out(self.act(self.inp(x)))

    model = Shuffled()
    with vanishing.watch(model, run_dir=run_dir):
        model(torch.randn(2, 3)).sum().backward()
    run = vanishing.load_run(run_dir)
    assert run.layers == ["inp", "act", "out"]
    assert [layer["depth"] for layer in run.layer_info] == [0, 1, 2]
    assert run.layer_info[0]["activation"] == "tanh"
    assert run.pivot("grad_norm", param="weight").columns.tolist() == ["inp", "out"]


def test_gradient_accumulation_gives_one_record_per_optimizer_step(run_dir):
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin_losses = train(twin, twin_opt, steps=1, accumulate=3)  # grads of the one step stay in twin
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir):
        losses = train(model, opt, steps=1, accumulate=3)
    assert losses == twin_losses
    run = vanishing.load_run(run_dir)
    assert run.steps.step.tolist() == [0]
    assert run.steps.n_backward[0] == 3
    assert run.steps.loss[0] == pytest.approx(sum(losses), rel=1e-6)
    assert row(run, 0, "0", "weight").grad_norm == pytest.approx(
        twin[0].weight.grad.norm().item(), rel=1e-6
    )


def test_without_optimizer_each_backward_is_a_step(run_dir):
    model = mlp()
    with vanishing.watch(model, run_dir=run_dir):
        for _ in range(3):
            model(torch.randn(4, 5)).sum().backward()
    run = vanishing.load_run(run_dir)
    assert run.steps.step.tolist() == [0, 1, 2]
    assert run.metrics.update_norm.isna().all()
    # grads accumulate (never zeroed): step 2 sees the sum of three backward passes
    assert row(run, 2, "0", "weight").grad_norm == pytest.approx(
        model[0].weight.grad.norm().item(), rel=1e-6
    )


def test_frozen_and_unused_parameters(run_dir):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(3, 4)
            self.used = nn.Linear(4, 1)
            self.branch = nn.Linear(4, 1)  # used on odd steps only

        def forward(self, x, odd):
            h = self.frozen(x)
            return self.used(h) + (self.branch(h) if odd else 0)

    model = Net()
    model.frozen.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir):
        for step in range(2):
            opt.zero_grad()
            model(torch.randn(8, 3), odd=step == 1).pow(2).mean().backward()
            opt.step()
    run = vanishing.load_run(run_dir)
    frozen = row(run, 0, "frozen", "weight")
    assert pytest.approx(frozen.param_norm) == model.frozen.weight.norm().item()
    assert frozen[["grad_norm", "update_norm"]].isna().all()
    assert row(run, 0, "branch", "weight")[["grad_norm"]].isna().all()
    assert row(run, 0, "branch", "weight").update_norm == 0  # Adam leaves it untouched
    assert row(run, 1, "branch", "weight").grad_norm > 0
    info = {layer["name"]: layer for layer in run.layer_info}
    assert info["frozen"]["params"][0]["trainable"] is False
    assert info["used"]["params"][0]["trainable"] is True


def test_tied_parameters_are_counted_once(run_dir):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.mid = nn.Linear(4, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, idx):
            return self.out(torch.tanh(self.mid(self.emb(idx))))

    model = Tied()
    with vanishing.watch(model, run_dir=run_dir):
        nn.functional.cross_entropy(
            model(torch.tensor([1, 2, 3])), torch.tensor([3, 2, 1])
        ).backward()
    run = vanishing.load_run(run_dir)
    weights = run.metrics[(run.metrics.param == "weight")]
    assert sorted(weights.layer) == ["emb", "mid"]  # the shared weight appears once, at emb
    assert row(run, 0, "emb", "weight").grad_norm == pytest.approx(
        model.emb.weight.grad.norm().item(), rel=1e-6
    )
    info = {layer["name"]: layer for layer in run.layer_info}
    assert info["emb"]["params"][0]["shared_with"] == ["out.weight"]


def test_module_called_several_times_per_forward(run_dir):
    block = nn.Linear(4, 4)
    act = nn.Tanh()
    model = nn.ModuleDict({"block": block, "act": act})
    x = torch.randn(6, 4)
    outs = []

    def forward(x):
        h1 = block(x)
        h1.retain_grad()
        a1 = act(h1)
        h2 = block(a1)
        h2.retain_grad()
        outs.extend([h1, h2])
        return act(h2)

    with vanishing.watch(model, run_dir=run_dir):
        forward(x).sum().backward()
    run = vanishing.load_run(run_dir)
    r = row(run, 0, "block", "")
    expected = (outs[0].grad.norm().item() + outs[1].grad.norm().item()) / 2
    assert r.error_norm == pytest.approx(expected, rel=1e-6)  # mean over the two calls
    assert row(run, 0, "block", "weight").grad_norm == pytest.approx(
        block.weight.grad.norm().item(), rel=1e-6
    )


def test_latest_gives_last_recorded_step_per_layer_in_forward_order(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, opt, run_dir=tmp_path / "r", flush_every=2) as mon:
        assert mon.latest() == {}
        for _ in range(3):  # the third step sits after a flush: the buffer row must still be found
            opt.zero_grad()
            nn.functional.cross_entropy(
                model(torch.randn(5, 4)), torch.randint(0, 3, (5,))
            ).backward()
            expected = {n: model.get_submodule(n).weight.grad.norm().item() for n in ("0", "2")}
            opt.step()
        got = mon.latest("grad_norm")
        assert list(got) == ["0", "2"]
        for name in got:
            assert got[name] == pytest.approx(expected[name], rel=1e-6)
        with pytest.raises(ValueError, match="unknown stat"):
            mon.latest("loss")


class _Mixed(nn.Module):
    """A block called twice per forward, an LSTM, a frozen layer and a layer the optimizer lacks."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.block = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.extra = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.rnn(x)[0][:, -1]
        h = self.act(self.block(self.act(self.block(h))))
        return self.head(self.extra(self.frozen(h)))


def _record(run_dir, host_writes):
    torch.manual_seed(0)
    model = _Mixed()
    held = [p for n, p in model.named_parameters() if not n.startswith("extra")]
    opt = torch.optim.Adam(held, lr=0.01)
    g = torch.Generator().manual_seed(3)
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir, flush_every=4) as mon:
        mon._buffer.host_writes = host_writes  # before the buffer exists (first step)
        for _ in range(6):
            opt.zero_grad()
            for _ in range(2):  # two micro-batches: two losses per step
                x = torch.randn(5, 7, 3, generator=g)
                y = torch.randint(0, 2, (5,), generator=g)
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert (mon._buffer._host is not None) == host_writes  # the path asked for ran
    return vanishing.load_run(run_dir)


def test_cpu_rows_written_through_numpy_equal_the_device_path(tmp_path):
    # On the CPU the monitor writes each step's row through NumPy views; GPUs use torch ops.
    # Both must record the same numbers (the device path is forced here on the CPU).
    host, device = _record(tmp_path / "host", True), _record(tmp_path / "device", False)
    for table in ("steps", "metrics", "temporal"):
        a, b = getattr(host, table), getattr(device, table)
        assert len(a) > 0 and list(a.columns) == list(b.columns)
        cols = [c for c in a.columns if c != "time"]
        pd.testing.assert_frame_equal(a[cols], b[cols], rtol=1e-15, atol=0)
    m = host.metrics
    assert m[(m.layer == "block") & (m.param == "")].error_norm.notna().all()  # mean of 2 calls
    assert m[(m.layer == "extra") & (m.param == "weight")].update_norm.isna().all()
    assert m[(m.layer == "extra") & (m.param == "weight")].grad_norm.notna().all()
    assert host.steps.loss.notna().all()


@pytest.mark.parametrize("loop", ["retain_graph", "autograd.grad"])
def test_error_signals_of_every_backward_of_a_step_are_recorded(run_dir, loop):
    # A second backward through a retained graph, and torch.autograd.grad, run the error-signal
    # hooks without the end-of-backward callback; their values still count (mean over calls).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    expected = []
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir):
        for _ in range(3):
            opt.zero_grad()
            logits = model(x)
            # dLoss/dlogits of the mean cross-entropy, by hand: (softmax - one-hot) / batch
            p = logits.detach().double().softmax(dim=1)
            g = (p - nn.functional.one_hot(y, 2).double()) / len(y)
            loss = nn.functional.cross_entropy(logits, y)
            if loop == "retain_graph":
                loss.backward(retain_graph=True)
                (3 * loss).backward()
                expected.append((g.norm().item() + 3 * g.norm().item()) / 2)
            else:
                grads = torch.autograd.grad(loss, list(model.parameters()))
                for param, grad in zip(model.parameters(), grads):
                    param.grad = grad
                expected.append(g.norm().item())
            opt.step()
    m = vanishing.load_run(run_dir).metrics
    got = m[(m.layer == "2") & (m.param == "")].sort_values("step").error_norm.tolist()
    assert got == pytest.approx(expected, rel=1e-6)


def test_status_words_match_a_config_runs(run_dir, tmp_path):
    """completed after a normal close, failed when the watched block raised, the same word
    a config run's summary uses; an older run's "closed" reads as completed."""
    with vanishing.watch(mlp(), run_dir=run_dir):
        pass
    assert vanishing.load_run(run_dir).manifest["status"] == "completed"
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="boom"), vanishing.watch(mlp(), run_dir=failed):
        raise RuntimeError("boom")
    assert vanishing.load_run(failed).manifest["status"] == "failed"
    manifest = run_dir / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"completed"', '"closed"'))
    assert vanishing.load_run(run_dir).manifest["status"] == "completed"


class _LastState(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(5, 8, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


class _Seq(nn.Module):
    """An MLP after an RNN, inside the entry module ``net``: probes' hooks on module outputs
    and on the RNN's input."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(_LastState(), mlp(depth=3, d_in=8))

    def forward(self, x):
        return self.net(x)


def test_steps_not_recorded_run_without_module_hooks_and_record_the_same(tmp_path):
    def run(every, hooks_seen):
        torch.manual_seed(0)
        model = _Seq()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(1)
        with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / str(every), every=every):
            for _ in range(7):
                # what the model's own modules carry as this step's forward starts
                hooks_seen.append(_hook_count_of(model))
                opt.zero_grad()
                x = torch.randn(16, 6, 5, generator=g)
                y = torch.randint(0, 3, (16,), generator=g)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        return vanishing.load_run(tmp_path / str(every))

    every_step, sparse = [], []
    full, thinned = run(1, every_step), run(3, sparse)
    # none on the modules inside on steps 1, 2, 4, 5
    assert sparse[1] == sparse[2] == sparse[4] == sparse[5] == 0
    assert sparse[3] == sparse[6] == every_step[3] == every_step[1] > 0  # (step 0: discovery too)
    assert_thinned_run_equals(full, thinned, [0, 3, 6], frames=("metrics", "temporal"))


def _hook_count_of(model):
    """The hooks on the modules other than the entries (the monitor's entry hooks stay)."""
    from vanishing.monitor.layout import entry_modules

    entries = {id(m) for m in entry_modules(model)}
    assert len(entries) == 2
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks)
        for m in model.modules()
        if id(m) not in entries
    )


class _CountingBlock(nn.Module):
    """``x + f(x)``, counting its calls as some forwards do (a schedule, a cache)."""

    def __init__(self, width=4, skip=True):
        super().__init__()
        self.f = nn.Linear(width, width)
        self.skip = skip
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.f(x) if self.skip else self.f(x)


class _Branchy(nn.Module):
    """A forward torch.fx cannot trace: control flow on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.f(x) if x.sum() > 0 else self.f(x)


@pytest.mark.parametrize(
    "model, expected",
    [
        (lambda: nn.Sequential(_CountingBlock(), _CountingBlock(), nn.Linear(4, 2)), True),
        (lambda: nn.Sequential(_CountingBlock(skip=False), nn.Tanh(), nn.Linear(4, 2)), False),
        (lambda: nn.Sequential(_Branchy(), nn.Linear(4, 2)), None),
    ],
    ids=["residual", "plain", "untraceable"],
)
def test_the_manifest_says_whether_the_model_has_skip_connections(tmp_path, model, expected):
    import json

    torch.manual_seed(0)
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with vanishing.watch(net, opt, run_dir=tmp_path / "r") as mon:
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(8, 4)).sum().backward()
            opt.step()
        mid = json.loads((tmp_path / "r" / "manifest.json").read_text())
        assert mid["skip_connections"] is None  # known only once training is over
    assert (
        json.loads((tmp_path / "r" / "manifest.json").read_text())["skip_connections"] is expected
    )
    assert vanishing.load_run(mon.run_dir).manifest["skip_connections"] is expected
    # the trace ran the forward's Python, and its call counters read the 3 real calls
    assert [m.calls for m in net.modules() if isinstance(m, _CountingBlock)] in ([3, 3], [3], [])
