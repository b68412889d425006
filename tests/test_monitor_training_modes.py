"""AMP, schedules, compile and DDP: the monitor in the training setups people really use."""

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import vanishing
from helpers import mlp, row, train


def _amp_loop(model, opt, scaler, batches, poison_step=None):
    losses = []
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if i == poison_step:
            model[0].weight.grad[0, 0] = float("inf")  # what an fp16 overflow looks like
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    return losses


def test_grad_scaler_values_are_unscaled_and_skipped_steps_are_not_recorded(run_dir):
    torch.manual_seed(0)
    model = mlp()
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)
    ]
    # the reference: the same steps without scaling (a skipped step changes nothing)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    ref = []
    for i, (x, y) in enumerate(batches):
        plain_opt.zero_grad()
        loss = nn.functional.cross_entropy(plain(x), y)
        loss.backward()
        if i != 1:
            ref.append((loss.item(), plain[0].weight.grad.norm().item()))
            plain_opt.step()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir, scaler=scaler):
        _amp_loop(model, opt, scaler, batches, poison_step=1)
    run = vanishing.load_run(run_dir)
    assert len(run.steps) == 3  # the skipped step is not a step
    assert run.steps.skipped.tolist() == [0, 1, 0]
    assert run.steps.grad_nonfinite.sum() == 0  # and not an explosion
    for step, (loss, gnorm) in enumerate(ref):
        assert run.steps.loss[step] == pytest.approx(loss, rel=1e-5)
        assert row(run, step, "0", "weight").grad_norm == pytest.approx(gnorm, rel=1e-5)
    # the error signal is unscaled too: same order as without a scaler
    err = run.pivot("error_norm").iloc[0]
    assert err.max() < 10


@pytest.mark.parametrize(
    "every,expected",
    [(1, list(range(12))), (4, [0, 4, 8]), (lambda s: s in (2, 3, 11), [2, 3, 11])],
)
def test_schedules(run_dir, every, expected):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir, every=every, flush_every=2):
        losses = train(model, opt, steps=12)
    run = vanishing.load_run(run_dir)
    assert run.steps.step.tolist() == expected
    assert run.steps.loss.tolist() == pytest.approx([losses[s] for s in expected], rel=1e-6)
    assert sorted(run.metrics.step.unique().tolist()) == expected


def test_log_schedule_is_dense_early_and_sparse_late():
    from vanishing.schedule import log_spaced

    sched = log_spaced()
    recorded = [s for s in range(100_000) if sched(s)]
    assert recorded[:100] == list(range(100))
    assert 80 <= sum(1 for s in recorded if 1000 <= s < 10_000) <= 200
    assert len(recorded) < 500


def test_update_statistics_with_unrecorded_steps_in_between(run_dir):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    twin, twin_opt = copy.deepcopy(model), None
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9)
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir, every=3):
        train(model, opt, steps=7)
    # replay: the update of step 3 is the change made by the 4th optimizer step
    g = torch.Generator().manual_seed(1)
    for step in range(7):
        twin_opt.zero_grad()
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        nn.functional.cross_entropy(twin(x), y).backward()
        before = twin[0].weight.detach().clone()
        twin_opt.step()
        if step == 3:
            expected = (twin[0].weight.detach() - before).norm().item()
    run = vanishing.load_run(run_dir)
    assert row(run, 3, "0", "weight").update_norm == pytest.approx(expected, rel=1e-5)


def test_torch_compile_does_not_break(run_dir):
    pytest.importorskip("torch._dynamo")
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, backend="eager")
    with vanishing.watch(compiled, optimizer=opt, run_dir=run_dir):
        losses = train(compiled, opt, steps=3)
    assert all(map(lambda v: v == v, losses))
    run = vanishing.load_run(run_dir)
    assert run.steps.step.tolist() == [0, 1, 2]
    assert run.layers[0] == "0"  # names of the inner model, not _orig_mod.0
    assert row(run, 2, "0", "weight").grad_norm > 0


def test_ddp_wrapped_model_uses_inner_names(run_dir, tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        with vanishing.watch(ddp, optimizer=opt, run_dir=run_dir):
            train(ddp, opt, steps=2)
        run = vanishing.load_run(run_dir)
        assert run.layers[0] == "0" and not any(n.startswith("module") for n in run.layers)
        assert row(run, 1, "0", "weight").grad_norm == pytest.approx(
            model[0].weight.grad.norm().item(), rel=1e-6
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_per_step_on_cuda(run_dir):
    model = mlp(width=64).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 5, device="cuda"), torch.randint(0, 3, (32,), device="cuda")

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    with vanishing.watch(model, optimizer=opt, run_dir=run_dir, flush_every=1000) as mon:
        for _ in range(3):
            step()  # warm-up: first-step discovery may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(20):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len(vanishing.load_run(mon.run_dir).steps) == 23


def test_monitor_errors_never_break_training(run_dir, monkeypatch):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = vanishing.watch(model, optimizer=opt, run_dir=run_dir)
    train(model, opt, steps=2)

    def broken(*a, **k):
        raise RuntimeError("internal bug")

    from vanishing.probes.params import ParamProbe

    probe = next(p for p in mon._probes if isinstance(p, ParamProbe))
    monkeypatch.setattr(probe, "grads_ready", broken)
    with pytest.warns(RuntimeWarning, match="monitoring stopped"):
        train(model, opt, steps=2)
    mon.close()
    assert vanishing.load_run(run_dir).steps.step.tolist() == [0, 1]


def test_default_run_dir_is_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with vanishing.watch(mlp()) as mon:
        pass
    assert mon.run_dir.parent == Path("runs")
    assert os.path.isfile(mon.run_dir / "manifest.json")


def test_torch_compile_with_inductor_does_not_break(run_dir):
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model)
    with vanishing.watch(compiled, optimizer=opt, run_dir=run_dir):
        train(compiled, opt, steps=2)
    run = vanishing.load_run(run_dir)
    assert run.steps.step.tolist() == [0, 1]
    assert row(run, 1, "0", "weight").grad_norm > 0
    assert row(run, 1, "1", "").act_deriv_mean > 0
