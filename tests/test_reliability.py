"""Nothing lost, nothing mixed: real processes racing for a run directory, a real SIGTERM, a
run directory that refuses writes for a while."""

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

import vanishing
from helpers import mlp, train

RACE = textwrap.dedent(
    """
    import sys, time, torch, vanishing
    from torch import nn
    start, run_dir = float(sys.argv[1]), sys.argv[2] or None
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    while time.time() < start:
        pass
    try:
        mon = vanishing.watch(model, opt, run_dir=run_dir)
    except vanishing.WatchError as e:
        print("refused", e)
        sys.exit(3)
    for _ in range(3):
        opt.zero_grad(); model(torch.randn(8, 3)).sum().backward(); opt.step()
    mon.close()
    print("recorded", mon.run_dir)
    """
)


def _race(tmp_path, run_dir, n=2):
    script = tmp_path / "race.py"
    script.write_text(RACE)
    start = time.time() + 4.0  # both processes are up and spinning by then
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(start), run_dir],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    return [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]


@pytest.mark.slow
def test_two_processes_on_one_run_dir_one_wins_the_other_is_refused(tmp_path):
    results = _race(tmp_path, str(tmp_path / "shared"))
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 3], results
    refused = next(out for rc, out, _ in results if rc == 3)
    assert "already holds a run" in refused
    run = vanishing.load_run(tmp_path / "shared")
    assert run.steps.step.tolist() == [0, 1, 2]  # one run's steps, not two interleaved


@pytest.mark.slow
def test_default_run_dirs_started_in_the_same_second_are_distinct(tmp_path):
    results = _race(tmp_path, "")
    assert [rc for rc, _, _ in results] == [0, 0], results
    dirs = {out.split()[-1] for _, out, _ in results}
    assert len(dirs) == 2
    for d in dirs:
        assert vanishing.load_run(tmp_path / d).steps.step.tolist() == [0, 1, 2]


TERM = textwrap.dedent(
    """
    import os, signal, sys, torch, vanishing
    from torch import nn
    run_dir, chain = sys.argv[1], sys.argv[2] == "chain"
    if chain:  # a handler the program had before watch(): it must still run
        def mine(signum, frame):
            open(run_dir + ".handled", "w").write("yes")
            sys.exit(7)
        signal.signal(signal.SIGTERM, mine)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = vanishing.watch(model, opt, run_dir=run_dir, flush_every=10_000)
    step = 0
    while True:
        opt.zero_grad(); model(torch.randn(8, 3)).sum().backward(); opt.step()
        step += 1
        if step == 25:
            print("ready", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "chain"])
def test_sigterm_flushes_what_was_recorded_then_does_what_it_did_before(tmp_path, mode):
    script = tmp_path / "term.py"
    script.write_text(TERM)
    run_dir = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), mode], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=60)
    if mode == "default":
        assert rc == -signal.SIGTERM  # terminated by the signal, as without the monitor
    else:
        assert rc == 7 and (tmp_path / "run.handled").read_text() == "yes"
    steps = vanishing.load_run(run_dir).steps.step.tolist()
    assert len(steps) >= 25 and steps == list(range(len(steps)))  # nothing unflushed lost


def test_a_refused_write_keeps_the_steps_and_retries(run_dir, monkeypatch):
    from vanishing.recorder import writer

    real = writer.RunWriter.write_block
    full = {"on": False}

    def write_block(self, tables):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tables)

    monkeypatch.setattr(writer.RunWriter, "write_block", write_block)
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, opt, run_dir=run_dir, flush_every=2) as mon:
        losses = train(model, opt, steps=2)
        full["on"] = True
        with pytest.warns(RuntimeWarning, match="No space left on device.*kept in memory"):
            losses += train(model, opt, steps=4, seed=2)  # two flushes refused
        assert mon.step == 6  # recording went on
        full["on"] = False
        with pytest.warns(RuntimeWarning, match="writable again"):
            losses += train(model, opt, steps=2, seed=3)
    run = vanishing.load_run(run_dir)
    assert run.steps.step.tolist() == list(range(8))
    assert run.steps.loss.tolist() == pytest.approx(losses, rel=1e-6)


def test_leftovers_of_a_killed_writer_are_removed_when_the_run_is_reopened(run_dir):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, opt, run_dir=run_dir):
        train(model, opt, steps=2)
    leftover = run_dir / "metrics" / ".part-00001.parquetab12cd.tmp"
    leftover.write_bytes(b"half a file")
    with vanishing.watch(model, opt, run_dir=run_dir, resume=True):
        train(model, opt, steps=1)
    assert not leftover.exists()
    assert vanishing.load_run(run_dir).steps.step.tolist() == [0, 1, 2]


def test_a_planted_symlink_at_a_temporary_name_is_not_followed(tmp_path):
    from vanishing.recorder.writer import atomic_write_bytes

    target = tmp_path / "precious"
    target.write_text("keep me")
    out = tmp_path / "summary.json"
    for guess in (".summary.json.tmp", ".summary.jsontmp", "summary.json.tmp"):
        os.symlink(target, tmp_path / guess)
    atomic_write_bytes(out, b"{}")
    assert target.read_text() == "keep me" and out.read_bytes() == b"{}"
    assert not (tmp_path / "precious").is_symlink()


def test_under_distributed_each_rank_records_into_its_own_subdirectory(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:  # world size 1: no subdirectory (the layout only changes with several processes)
        with vanishing.watch(nn.Linear(2, 2), run_dir=tmp_path / "one") as mon:
            pass
        assert mon.run_dir == tmp_path / "one"
    finally:
        dist.destroy_process_group()


def _steps_with_validation(run_dir, validate):
    torch.manual_seed(0)
    model = mlp(depth=3, act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)
    ]
    held = []
    with vanishing.watch(model, opt, run_dir=run_dir) as mon:
        probe = next(p for p in mon._probes if type(p).__name__ == "ActivationProbe")
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if validate and i == 0:
                model.eval()  # validation, forgetting torch.no_grad()
                for _ in range(40):
                    model(torch.randn(64, 5) * 5)
                held.append(len(probe._tensors))
                model.train()
    return vanishing.load_run(run_dir), held


def test_forwards_without_a_backward_do_not_count_and_are_not_kept(tmp_path):
    plain, _ = _steps_with_validation(tmp_path / "plain", validate=False)
    validated, held = _steps_with_validation(tmp_path / "validated", validate=True)
    cols = ["act_mean", "act_std", "act_deriv_mean", "act_saturated", "act_p02", "act_p98"]
    a = plain.metrics[plain.metrics.param == ""][["step", "layer", *cols]].reset_index(drop=True)
    b = validated.metrics[validated.metrics.param == ""][["step", "layer", *cols]].reset_index(
        drop=True
    )
    assert a.equals(b)  # step 1 is not mixed with the 40 validation batches
    from vanishing.probes.activations import _KEPT_FORWARDS

    assert held[0] <= _KEPT_FORWARDS * 3  # 3 activations: bounded, not 40 forwards' worth


def test_two_forwards_before_one_backward_both_count(run_dir):
    torch.manual_seed(0)
    model = mlp(depth=2, act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    real, fake = torch.randn(8, 5), torch.randn(8, 5) + 2
    with vanishing.watch(model, opt, run_dir=run_dir):
        opt.zero_grad()
        (model(real).mean() - model(fake).mean()).backward()  # a discriminator's two batches
        opt.step()
    run = vanishing.load_run(run_dir)
    m = run.metrics
    got = m[(m.layer == "1") & (m.param == "")].act_mean.item()
    # measured before the step changed the weights: recompute on a twin at the old weights
    torch.manual_seed(0)
    twin = mlp(depth=2, act=nn.Sigmoid)
    with torch.no_grad():
        means = [torch.sigmoid(twin[0](v)).mean().item() for v in (real, fake)]
    assert got == pytest.approx(sum(means) / 2, rel=1e-6)


def test_parametrized_layers_are_one_layer_each(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0] = nn.utils.parametrizations.weight_norm(model[0])
    model[2] = nn.utils.parametrizations.spectral_norm(model[2])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, opt, run_dir=run_dir):
        opt.zero_grad()
        model(torch.randn(5, 3)).sum().backward()
        norms = {n: p.grad.norm().item() for n, p in model.named_parameters()}
        opt.step()
    run = vanishing.load_run(run_dir)
    assert run.layers == ["0", "1", "2"]  # not 0.parametrizations.weight as a layer of its own
    m = run.metrics
    got = m[(m.layer == "0") & (m.param == "weight.original1")].grad_norm.item()
    assert got == pytest.approx(norms["0.parametrizations.weight.original1"], rel=1e-6)
    assert {p["name"] for p in run.layer_info[2]["params"]} == {"bias", "weight.original"}


def test_an_empty_batch_is_a_note_not_the_end_of_recording(run_dir):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, opt, run_dir=run_dir) as mon:
        for n in (0, 5, 5):
            opt.zero_grad()
            model(torch.randn(n, 3)).sum().backward()
            opt.step()
        assert mon._broken is None
    run = vanishing.load_run(run_dir)
    assert run.steps.step.tolist() == [0, 1, 2]
    m = run.metrics
    assert m[(m.layer == "1") & (m.param == "")].act_mean.notna().sum() == 2  # steps 1 and 2
    [note] = run.manifest["notes"]
    assert "empty batch" in note["text"] and note["first_step"] == 0 and note["steps"] == 1


def test_sparse_gradients_have_norms(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.tensor([[1, 2], [1, 3]])  # token 1 twice: duplicates sum before the norm
    with vanishing.watch(model, opt, run_dir=run_dir):
        opt.zero_grad()
        model(ids).sum().backward()
        dense = model[0].weight.grad.to_dense().norm().item()
        opt.step()
    run = vanishing.load_run(run_dir)
    m = run.metrics
    assert m[(m.layer == "0") & (m.param == "weight")].grad_norm.item() == pytest.approx(
        dense, rel=1e-6
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"run_dir": ""}, "run_dir is empty"),
        ({"run_dir": "/proc/vanishing-x"}, "cannot be written"),
        ({"run_dir": "/tmp/" + "x" * 300}, "cannot be written.*File name too long"),
        ({"flush_every": 10**9}, r"flush_every=1000000000 would hold .* GiB"),
    ],
)
def test_bad_run_dirs_and_sizes_are_one_clear_error(tmp_path, kwargs, match):
    kwargs = {"run_dir": tmp_path / "run", **kwargs}
    with pytest.raises(vanishing.WatchError, match=match):
        vanishing.watch(mlp(), **kwargs)


def test_inspect_works_on_a_model_being_watched(run_dir):
    torch.manual_seed(0)
    model = mlp(depth=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    with vanishing.watch(model, opt, run_dir=run_dir) as mon:
        train(model, opt, steps=2)
        diag = vanishing.inspect(model, x, y, nn.functional.cross_entropy)
        train(model, opt, steps=1)
        assert mon.step == 3  # inspect's batch is not one of the run's steps
    assert isinstance(diag.healthy, bool)
    assert vanishing.load_run(run_dir).steps.n_backward.tolist() == [1, 1, 1]


def test_in_a_gan_loop_the_watched_generator_records_its_own_loss(run_dir):
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    D = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)
    bce = nn.functional.binary_cross_entropy_with_logits
    g_losses, g_norms = [], []
    with vanishing.watch(G, opt_g, run_dir=run_dir):
        for _ in range(3):
            real, z = torch.randn(16, 6), torch.randn(16, 4)
            fake = G(z)
            opt_d.zero_grad()
            ones, zeros = torch.ones(16, 1), torch.zeros(16, 1)
            loss_d = bce(D(real), ones) + bce(D(fake.detach()), zeros)
            loss_d.backward()
            opt_d.step()
            opt_g.zero_grad()
            loss_g = bce(D(fake), ones)
            loss_g.backward()
            g_losses.append(loss_g.item())
            g_norms.append(G[0].weight.grad.norm().item())
            opt_g.step()
    run = vanishing.load_run(run_dir)
    assert run.steps.loss.tolist() == pytest.approx(g_losses, rel=1e-6)  # not the discriminator's
    assert run.steps.n_backward.tolist() == [1, 1, 1]
    assert run.steps.skipped.tolist() == [0, 0, 0]
    m = run.metrics
    got = m[(m.layer == "0") & (m.param == "weight")].grad_norm.tolist()
    assert got == pytest.approx(g_norms, rel=1e-6)


def _module_rows(run_dir):
    m = vanishing.load_run(run_dir).metrics
    return m[m.param == ""]


def test_a_model_compiled_and_run_before_watch_still_records_every_signal(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    compiled = torch.compile(model, backend="eager")
    compiled(torch.randn(2, 3)).sum().backward()  # it ran before the monitor existed
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(compiled, opt, run_dir=run_dir):
        for _ in range(2):
            opt.zero_grad()
            compiled(torch.randn(5, 3)).sum().backward()
            opt.step()
    rows = _module_rows(run_dir)
    assert rows[rows.layer == "1"].act_mean.notna().sum() == 2
    assert rows[rows.layer == "0"].error_norm.notna().sum() == 2


def test_reentrant_checkpointing_records_activations_and_error_signals(run_dir):
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(checkpoint(self.a, x, use_reentrant=True))

    torch.manual_seed(0)
    model = Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 3, requires_grad=True)
    with vanishing.watch(model, opt, run_dir=run_dir):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    with torch.no_grad():
        torch.manual_seed(0)
        twin = Checkpointed()
        expected = twin.a(x).mean().item()
    rows = _module_rows(run_dir)
    assert rows[rows.layer == "a.1"].act_mean.item() == pytest.approx(expected, rel=1e-6)
    assert rows[rows.layer == "a.0"].error_norm.notna().all()


def test_a_script_that_forgets_close_keeps_its_records(tmp_path):
    code = textwrap.dedent(
        f"""
        import torch, vanishing
        from torch import nn
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = vanishing.watch(model, opt, run_dir={str(tmp_path / "run")!r}, flush_every=100)
        for _ in range(3):
            opt.zero_grad(); model(torch.randn(8, 3)).sum().backward(); opt.step()
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert vanishing.load_run(tmp_path / "run").steps.step.tolist() == [0, 1, 2]


def test_a_module_replaced_mid_run_is_recorded_as_the_new_one(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    truth = {}
    with vanishing.watch(model, opt, run_dir=run_dir):
        for step in range(6):
            if step == 3:
                model[2] = nn.Linear(4, 4)  # the new module, and its parameters to the optimizer
                model.insert(3, nn.Linear(4, 4))  # and a module added
                opt.add_param_group({"params": [*model[2].parameters(), *model[3].parameters()]})
            opt.zero_grad()
            model(torch.randn(5, 3)).sum().backward()
            truth[step] = {n: p.grad.norm().item() for n, p in model.named_parameters()}
            opt.step()
    run = vanishing.load_run(run_dir)
    assert run.manifest["revisions"] == [
        {"step": 3, "added": ["5"], "removed": [], "replaced": ["2", "3", "4"]}
    ]
    assert "layout changed at step 3" in run.manifest["notes"][0]["text"]
    assert "3" in run.layers and len(run.layers) == 6
    m = run.metrics
    for step in (4, 5):  # the new layout, every parameter as it is now
        for name, norm in truth[step].items():
            layer, param = name.rsplit(".", 1)
            got = m[(m.step == step) & (m.layer == layer) & (m.param == param)].grad_norm.item()
            assert got == pytest.approx(norm, rel=1e-6), (step, name)
    assert run.steps.step.tolist() == list(range(6))


def test_a_module_swapped_without_telling_the_optimizer_is_a_revision_and_a_note(run_dir):
    """Found by torch's registration hooks before the step's forward: the whole step is
    recorded under the new layout, and the note says the new parameters will not train."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    truth = {}
    with vanishing.watch(model, opt, run_dir=run_dir):
        for step in range(4):
            if step == 2:
                model[0] = nn.Linear(3, 4)  # the optimizer still holds the old one
            opt.zero_grad()
            model(torch.randn(5, 3)).sum().backward()
            truth[step] = {n: p.grad.norm().item() for n, p in model.named_parameters()}
            opt.step()
    run = vanishing.load_run(run_dir)
    assert run.manifest["revisions"] == [{"step": 2, "added": [], "removed": [], "replaced": ["0"]}]
    (note,) = [n["text"] for n in run.manifest["notes"] if "layout changed" in n["text"]]
    assert "not recorded" not in note and "does not hold the parameters of '0'" in note
    m = run.metrics
    for step in (2, 3):  # the new module's gradients, every step since the swap
        got = m[(m.step == step) & (m.layer == "0") & (m.param == "weight")].grad_norm.item()
        assert got == pytest.approx(truth[step]["0.weight"], rel=1e-6)
    # no update is measured for a parameter the optimizer does not hold (not a zero update)
    assert np.isnan(m[(m.step == 3) & (m.layer == "0") & (m.param == "weight")].update_norm.item())
    assert (m[(m.layer == "2") & (m.param != "")].update_norm > 0).all()  # held: measured
    assert run.steps.step.tolist() == list(range(4))


@pytest.mark.parametrize("activation", [nn.Sigmoid, nn.ReLU])
def test_a_large_run_is_diagnosed_from_a_sample_with_the_full_reads_verdict(
    tmp_path, monkeypatch, activation
):
    """Above EXACT_DIAGNOSIS_ROWS, Run.diagnose() reads DIAGNOSIS_STEPS of the steps (bounded
    time and memory); the full read is the oracle for the findings (kinds and layers)."""
    from vanishing.diagnose.engine import diagnose_run
    from vanishing.recorder import reader

    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [nn.Linear(16, 16), activation()]
    model = nn.Sequential(*layers, nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    with vanishing.watch(model, opt, run_dir=tmp_path / "run", flush_every=25):
        for _ in range(300):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    full = diagnose_run(vanishing.load_run(tmp_path / "run"))
    monkeypatch.setattr(reader, "EXACT_DIAGNOSIS_ROWS", 1_000)
    monkeypatch.setattr(reader, "DIAGNOSIS_STEPS", 25)
    sampled = vanishing.load_run(tmp_path / "run").diagnose()
    assert [(f.kind, f.layers) for f in sampled.findings] == [
        (f.kind, f.layers) for f in full.findings
    ]
    assert any(re.search(r"diagnosed from 2[0-5] of 300 recorded steps", n) for n in sampled.notes)
    assert not any("diagnosed from" in n for n in full.notes)
