"""VanishingCallback in lightning.Trainer: what it records is checked against truths computed on
independent paths (a plain PyTorch loop on an identical copy, or gradient norms read by a second
callback / inside the module itself)."""

import copy
import json
import warnings

import pytest

L = pytest.importorskip("lightning")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import vanishing  # noqa: E402
from helpers import assert_thinned_run_equals  # noqa: E402
from vanishing.integrations.lightning import VanishingCallback  # noqa: E402
from vanishing.probes import Probe  # noqa: E402

N_BATCHES = 24
BATCH = 16


def _mlp():
    layers, d = [], 5
    for _ in range(6):
        layers += [nn.Linear(d, 8), nn.Sigmoid()]
        d = 8
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_BATCHES * BATCH, 5, generator=g)
    y = torch.randint(0, 3, (N_BATCHES * BATCH,), generator=g)
    return x, y


def _loader():
    x, y = _data()
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False)


def _batches():
    x, y = _data()
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]


class Net(L.LightningModule):
    """training_step calls the submodule (self.net), not self(x): the common pattern."""

    def __init__(self, lr=0.5, poison_at=None):
        super().__init__()
        self.net = _mlp()
        self.lr = lr
        self.poison_at = poison_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_after_backward(self):
        poison = self.poison_at is not None and self.trainer.global_step == self.poison_at
        if poison and not getattr(self, "_poisoned", False):
            self._poisoned = True
            self.net[0].weight.grad[0, 0] = float("inf")  # an fp16 overflow

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ForwardNet(Net):
    """training_step calls self(x): the monitor's hook on the module's forward fires too."""

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


class ManualNet(Net):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.truth = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        self.truth.append(_grad_norms(self))  # independent: read right after the backward
        opt.step()


class TwoOptimizers(L.LightningModule):
    """GAN-style: two halves, two optimizers, manual optimization."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Sequential(nn.Linear(5, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid())
        self.b = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 3))
        self.truth_a = []

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        x, y = batch
        # step of a ("generator"): b fixed
        loss_a = nn.functional.cross_entropy(self.b(self.a(x)), y)
        opt_a.zero_grad()
        self.manual_backward(loss_a)
        self.truth_a.append({n: p.grad.norm().item() for n, p in self.a.named_parameters()})
        opt_a.step()
        # step of b ("discriminator") on a's detached output
        loss_b = nn.functional.cross_entropy(self.b(self.a(x).detach()), y)
        opt_b.zero_grad()
        self.manual_backward(loss_b)
        opt_b.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.a.parameters(), lr=0.1),
            torch.optim.SGD(self.b.parameters(), lr=0.1),
        )


def _grad_norms(module):
    return {n: p.grad.norm().item() for n, p in module.named_parameters() if p.grad is not None}


class GradTruth(L.Callback):
    """Every parameter's gradient norm (and the total) as the optimizer is about to step:
    Lightning calls this after the closure and unscaling, before clipping."""

    def __init__(self):
        self.norms = []
        self.total = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(_grad_norms(pl_module))
        grads = [p.grad.detach().double() for p in pl_module.parameters() if p.grad is not None]
        self.total.append(torch.stack([g.norm() for g in grads]).norm().item())


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def _trainer(tmp_path, callbacks, max_steps=6, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kw,
    )


def _fit(tmp_path, model, callbacks, max_steps=6, **kw):
    trainer = _trainer(tmp_path, callbacks, max_steps, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(num_workers|log_every_n_steps|LightningModule).*")
        trainer.fit(model, _loader())
    return trainer


def _recorded(run, prefix=""):
    """{(step, "layer.param"): grad_norm} of a run; prefix: the module's attribute path."""
    m = run.metrics
    m = m[m.param != ""]
    return {(int(r.step), f"{prefix}{r.layer}.{r.param}"): r.grad_norm for r in m.itertuples()}


def _assert_norms_equal(run, truth, steps):
    rec = _recorded(run)
    for step, norms in zip(steps, truth, strict=True):
        for name, value in norms.items():
            assert rec[(step, name)] == pytest.approx(value, rel=1e-6), (step, name)


# ---------------------------------------------------------------------- the closure
@pytest.mark.parametrize("module", [Net, ForwardNet])
def test_automatic_optimization_records_the_closures_gradients(tmp_path, module):
    truth, losses = GradTruth(), Losses()
    cb = VanishingCallback(verbose=False)
    _fit(tmp_path, module(), [cb, truth, losses], max_steps=8)
    run = vanishing.load_run(cb.run_dir)
    assert run.steps.step.tolist() == list(range(8))
    assert run.steps.n_backward.tolist() == [1] * 8
    assert len(truth.norms) == 8
    _assert_norms_equal(run, truth.norms, range(8))
    assert run.steps.loss.tolist() == pytest.approx(losses.losses, rel=1e-6)
    assert cb.run_dir == tmp_path / "vanishing"  # logger=False: default_root_dir/vanishing


def test_every_k_records_what_every_step_records_at_those_steps(tmp_path):
    """every=3 under Lightning's closure: the module hooks are detached between recorded steps
    and attached again before the closure's forward; steps 0, 3, 6 hold exactly what every=1
    records there (activations and error signals included)."""
    runs = {}
    for every in (1, 3):
        torch.manual_seed(0)
        cb = VanishingCallback(verbose=False, every=every, run_dir=tmp_path / f"every{every}")
        _fit(tmp_path / str(every), Net(), [cb], max_steps=8)
        runs[every] = vanishing.load_run(cb.run_dir)
    assert_thinned_run_equals(runs[1], runs[3], [0, 3, 6])


def test_accumulation_one_record_per_step_equal_to_a_plain_loop(tmp_path):
    k, steps = 3, 4
    torch.manual_seed(0)
    model = Net()
    plain = copy.deepcopy(model.net)
    cb = VanishingCallback(verbose=False)
    _fit(tmp_path, model, [cb], max_steps=steps, accumulate_grad_batches=k)

    # the truth: a plain PyTorch loop on an identical copy, same batches in the same order
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    batches = iter(_batches())
    ref_loss, ref_norms = [], []
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for _ in range(k):
            x, y = next(batches)
            loss = nn.functional.cross_entropy(plain(x), y) / k  # as Lightning scales it
            loss.backward()
            total += loss.item()
        ref_loss.append(total)
        ref_norms.append({f"net.{n}": p.grad.norm().item() for n, p in plain.named_parameters()})
        opt.step()

    run = vanishing.load_run(cb.run_dir)
    assert run.steps.step.tolist() == list(range(steps))
    assert run.steps.n_backward.tolist() == [k] * steps
    assert run.steps.loss.tolist() == pytest.approx(ref_loss, rel=1e-5)
    _assert_norms_equal(run, ref_norms, range(steps))


def test_manual_optimization(tmp_path):
    cb = VanishingCallback(verbose=False)
    model = ManualNet()
    _fit(tmp_path, model, [cb], max_steps=5)
    run = vanishing.load_run(cb.run_dir)
    assert run.steps.step.tolist() == list(range(5))
    assert run.steps.n_backward.tolist() == [1] * 5
    _assert_norms_equal(run, model.truth, range(5))


def test_two_optimizers_record_the_first_optimizers_steps(tmp_path):
    cb = VanishingCallback(verbose=False)
    model = TwoOptimizers()
    with pytest.warns(RuntimeWarning, match="2 optimizers"):
        trainer = _fit(tmp_path, model, [cb], max_steps=8)  # global_step counts both
    run = vanishing.load_run(cb.run_dir)
    batches = trainer.global_step // 2
    assert run.steps.step.tolist() == list(range(batches))  # one record per step of opt 0
    # the second optimizer's backward passes belong to no record
    assert run.steps.n_backward.tolist() == [1] * batches
    assert run.steps.skipped.tolist() == [0] * batches
    rec = _recorded(run)
    for step, norms in enumerate(model.truth_a):
        for name, value in norms.items():
            assert rec[(step, f"a.{name}")] == pytest.approx(value, rel=1e-6)
    # only the first optimizer's parameters are trainable in the record (updates measured)
    manifest = run.manifest
    trainable = {
        f"{layer['name']}.{p['name']}": p.get("trainable")
        for layer in manifest["layers"]
        for p in layer.get("params", [])
    }
    assert trainable["a.0.weight"] is True and trainable["b.0.weight"] is False


# ---------------------------------------------------------------------- precision, clipping
def test_bf16_mixed_values_as_they_are(tmp_path):
    truth = GradTruth()
    cb = VanishingCallback(verbose=False)
    _fit(tmp_path, Net(), [cb, truth], max_steps=4, precision="bf16-mixed")
    run = vanishing.load_run(cb.run_dir)
    assert run.steps.step.tolist() == list(range(4))
    _assert_norms_equal(run, truth.norms, range(4))
    assert run.manifest["amp_scaler"] is False


def test_16_mixed_with_grad_scaler_unscaled_and_skipped_step(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    try:
        with torch.autocast("cpu", dtype=torch.float16):
            nn.Linear(2, 2)(torch.randn(1, 2))
    except Exception:  # noqa: BLE001
        pytest.skip("fp16 autocast is not available on this CPU build")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    truth = GradTruth()
    cb = VanishingCallback(verbose=False)
    trainer = _fit(tmp_path, Net(poison_at=2), [cb, truth], max_steps=5, plugins=[plugin])
    assert trainer.precision_plugin.scaler is scaler
    run = vanishing.load_run(cb.run_dir)
    # the poisoned batch's step was skipped by the scaler: no record of its own, counted in
    # the next one (Lightning's global_step counts it: five batches, four records)
    assert trainer.global_step == 5
    assert run.steps.step.tolist() == [0, 1, 2, 3]
    assert run.steps.skipped.tolist() == [0, 0, 1, 0]
    assert run.steps.n_backward.tolist() == [1] * 4
    assert run.steps.grad_nonfinite.sum() == 0
    assert run.manifest["amp_scaler"] is True
    # truth read after Lightning's unscale_ (five batches, the third one poisoned)
    assert len(truth.norms) == 5 and truth.total[2] == float("inf")
    kept = [n for i, n in enumerate(truth.norms) if i != 2]
    _assert_norms_equal(run, kept, range(4))
    assert run.steps.amp_scale.tolist() == [2.0**12, 2.0**12, 2.0**11, 2.0**11]  # backed off


def test_gradient_clipping_records_the_norm_before_and_after(tmp_path):
    clip = 1e-3
    truth = GradTruth()  # Lightning calls it before clipping
    cb = VanishingCallback(verbose=False)
    _fit(tmp_path, Net(), [cb, truth], max_steps=4, gradient_clip_val=clip)
    s = vanishing.load_run(cb.run_dir).steps
    assert s.grad_norm_backward.tolist() == pytest.approx(truth.total, rel=1e-6)
    assert all(t > clip for t in truth.total)  # clipping engaged at every step
    assert s.grad_norm_step.tolist() == pytest.approx([clip] * 4, rel=1e-3)
    # the per-layer gradients recorded are those the optimizer used: clipped
    run = vanishing.load_run(cb.run_dir)
    rec = _recorded(run)
    for step, (norms, total) in enumerate(zip(truth.norms, truth.total, strict=True)):
        factor = clip / (total + 1e-6)  # torch.nn.utils.clip_grad_norm_
        for name, value in norms.items():
            assert rec[(step, name)] == pytest.approx(value * factor, rel=1e-4)


def test_no_clipping_probe_without_clipping(tmp_path):
    cb = VanishingCallback(verbose=False)
    _fit(tmp_path, Net(), [cb], max_steps=2)
    assert "grad_norm_backward" not in vanishing.load_run(cb.run_dir).steps.columns


# ---------------------------------------------------------------------- loggers, diagnosis
def test_scalars_and_finding_counts_go_to_the_loggers(tmp_path):
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs")
    cb = VanishingCallback(verbose=False, flush_every=4)
    _fit(tmp_path, Net(), [cb], max_steps=9, logger=logger, log_every_n_steps=3)
    assert str(cb.run_dir.parent) == logger.log_dir
    df = pd.read_csv(f"{logger.log_dir}/metrics.csv")
    tags = [c for c in df.columns if c.startswith("vanishing/")]
    assert len(tags) <= 4 + 2 * 3 + 3 + 6  # bounded: not one per parameter
    run = vanishing.load_run(cb.run_dir)
    logged = df.dropna(subset=["vanishing/loss"])
    assert logged.step.tolist() == [0, 3, 6]
    assert logged["vanishing/loss"].tolist() == pytest.approx(
        run.steps.loss[[0, 3, 6]].tolist(), rel=1e-6
    )
    assert "vanishing/grad_norm/net.0" in df.columns
    rec = _recorded(run)
    # a layer's speed of learning: its bias's gradient norm (recorder.semantics.speed_source)
    assert logged["vanishing/grad_norm/net.0"].tolist() == pytest.approx(
        [rec[(s, "net.0.bias")] for s in (0, 3, 6)], rel=1e-6
    )
    counts = df.dropna(subset=["vanishing/findings/vanishing_gradient"]).iloc[-1]
    for kind in ("vanishing_gradient", "exploding_gradient", "dead_units"):
        n = sum(f.kind == kind for f in cb.diagnosis.findings)
        assert counts[f"vanishing/findings/{kind}"] == n
    assert counts["vanishing/findings/vanishing_gradient"] >= 1


def test_diagnosis_printed_and_kept_default_dirs_do_not_collide(tmp_path, capsys):
    cb = VanishingCallback()
    _fit(tmp_path, Net(), [cb], max_steps=6)
    out = capsys.readouterr().out
    assert "vanishing_gradient" in cb.diagnosis.kinds  # six sigmoid layers
    assert str(cb.run_dir) in out and "vanishing_gradient" in out
    again = VanishingCallback(verbose=False)
    _fit(tmp_path, Net(), [again], max_steps=2)
    assert again.run_dir == tmp_path / "vanishing-1"
    assert len(vanishing.load_run(cb.run_dir).steps) == 6  # the first run is untouched


def test_explicit_run_dir_holding_a_run_is_refused_before_training(tmp_path):
    cb = VanishingCallback(run_dir=tmp_path / "r", verbose=False)
    _fit(tmp_path, Net(), [cb], max_steps=1)
    with pytest.raises(vanishing.WatchError, match="already"):
        _fit(tmp_path, Net(), [VanishingCallback(run_dir=tmp_path / "r")], max_steps=1)


# ---------------------------------------------------------------------- resume
def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = VanishingCallback(verbose=False)
    _fit(tmp_path, Net(), [first, ckpt], max_steps=6, enable_checkpointing=True)
    path = next((tmp_path / "ckpt").glob("*step=6*.ckpt"))
    state = torch.load(path, weights_only=False)["callbacks"]
    assert any(v.get("run_dir") == str(first.run_dir) for v in state.values())

    second = VanishingCallback(verbose=False)
    trainer = _trainer(tmp_path, [second], max_steps=10)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(num_workers|log_every_n_steps|LightningModule).*")
        trainer.fit(Net(), _loader(), ckpt_path=path)
    assert second.run_dir == first.run_dir
    run = vanishing.load_run(second.run_dir)
    assert run.steps.step.tolist() == list(range(10))
    assert run.metrics.groupby("step").size().nunique() == 1  # no step recorded twice
    manifest = json.loads((second.run_dir / "manifest.json").read_text())
    assert manifest["resumed_at"] == [6]


def test_state_dict_restores_the_run_dir_and_step(tmp_path):
    cb = VanishingCallback(run_dir=tmp_path / "r", verbose=False)
    _fit(tmp_path, Net(), [cb], max_steps=3)
    state = cb.state_dict()
    assert state == {"run_dir": str(tmp_path / "r"), "step": 3}
    other = VanishingCallback(verbose=False)
    other.load_state_dict(state)  # what Lightning does with a checkpoint's callback state
    _fit(tmp_path, Net(), [other], max_steps=2)
    assert other.run_dir == tmp_path / "r"
    run = vanishing.load_run(tmp_path / "r")
    assert run.steps.step.tolist() == [0, 1, 2, 3, 4]
    assert run.manifest["resumed_at"] == [3]


def test_resume_from_an_older_checkpoint_records_beside_the_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = VanishingCallback(verbose=False)
    _fit(tmp_path, Net(), [first, ckpt], max_steps=6, enable_checkpointing=True)
    older = next((tmp_path / "ckpt").glob("*step=3*.ckpt"))
    second = VanishingCallback(verbose=False)
    trainer = _trainer(tmp_path, [second], max_steps=5)
    with pytest.warns(RuntimeWarning, match="cannot continue"):
        trainer.fit(Net(), _loader(), ckpt_path=older)
    assert second.run_dir == tmp_path / "vanishing-from-step3"
    assert vanishing.load_run(second.run_dir).steps.step.tolist() == [3, 4]
    assert len(vanishing.load_run(first.run_dir).steps) == 6  # untouched


# ---------------------------------------------------------------------- training unchanged
def test_loss_trajectory_is_bit_identical_with_and_without_the_callback(tmp_path):
    def losses(callbacks):
        L.seed_everything(7, verbose=False)
        model = Net()
        rec = Losses()
        _fit(tmp_path, model, [rec, *callbacks], max_steps=12, deterministic=True)
        return rec.losses, [p.detach().clone() for p in model.parameters()]

    plain, plain_params = losses([])
    watched, watched_params = losses([VanishingCallback(run_dir=tmp_path / "w", verbose=False)])
    assert len(plain) == 12
    assert watched == plain  # exactly
    for a, b in zip(plain_params, watched_params, strict=True):
        assert torch.equal(a, b)


class Boom(Net):
    def training_step(self, batch, batch_idx):
        if batch_idx == 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_an_exception_in_training_closes_the_monitor(tmp_path):
    cb = VanishingCallback(run_dir=tmp_path / "r", verbose=False)
    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, model, [cb], max_steps=6)
    run = vanishing.load_run(tmp_path / "r")
    assert run.steps.step.tolist() == [0, 1, 2]
    assert run.manifest["status"] == "completed"
    vanishing.watch(model, run_dir=tmp_path / "again").close()  # no longer watched


class FailingProbe(Probe):
    columns = ()

    def attach(self, ctx):
        pass

    def measure(self, row):
        raise RuntimeError("probe bug")


def test_a_failing_monitor_never_stops_training(tmp_path):
    cb = VanishingCallback(run_dir=tmp_path / "r", verbose=False, probes=[FailingProbe()])
    rec = Losses()
    with pytest.warns(RuntimeWarning):
        _fit(tmp_path, Net(), [cb, rec], max_steps=5)
    assert len(rec.losses) == 5
