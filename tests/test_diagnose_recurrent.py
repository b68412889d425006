"""Recurrent stacks: outcome and gradient together for gated cells, stacked layers shown and
judged apart, and recurrent/attention weights in every per-parameter view."""

import math

import pandas as pd
import pytest
import torch
from torch import nn

import vanishing
from vanishing.diagnose import diagnose_run, model_facts
from vanishing.diagnose.view import RunView


class _Seq(nn.Module):
    def __init__(self, cell=nn.LSTM, hidden=8, layers=2):
        super().__init__()
        self.rnn = cell(2, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)


class _GatedRun:
    """A recorded run built by hand: one LSTM (2 layers) and a head, a loss curve and a time
    profile decaying ``decay`` per step over T steps (the tables a monitor writes)."""

    def __init__(self, losses, decay=0.5, T=30, cell="LSTM"):
        h = 8
        gates = {"LSTM": 4, "GRU": 3}[cell]
        params = [
            {"name": f"{k}_l{i}", "shape": s, "numel": math.prod(s)}
            for i in range(2)
            for k, s in (
                ("weight_ih", [gates * h, 2 if i == 0 else h]),
                ("weight_hh", [gates * h, h]),
                ("bias_ih", [gates * h]),
                ("bias_hh", [gates * h]),
            )
        ]
        self.path = "recorded"
        self.manifest = {"optimizer": "Adam"}
        self.layer_info = [
            {"name": "rnn", "depth": 0, "type": cell, "role": "layer", "activation": None,
             "recurrent": True, "params": params, "num_params": sum(p["numel"] for p in params)},
            {"name": "head", "depth": 1, "type": "Linear", "role": "layer", "activation": None,
             "recurrent": False, "num_params": h + 1,
             "params": [{"name": "weight", "shape": [1, h], "numel": h},
                        {"name": "bias", "shape": [1], "numel": 1}]},
        ]  # fmt: skip
        rows, trows = [], []
        for step in range(len(losses)):
            for p in params:
                rows.append({"step": step, "layer": "rnn", "param": p["name"], "depth": 0,
                             "grad_norm": 0.1, "param_norm": 1.0, "update_norm": 1e-3,
                             "update_ratio": 1e-3, "grad_ratio": 0.1})  # fmt: skip
            for t in range(T):
                trows.append({"step": step, "layer": "rnn", "t": t, "length": T,
                              "grad_norm": decay ** (T - 1 - t)})  # fmt: skip
        self.metrics = pd.DataFrame(rows)
        for col in ("error_norm", "act_std", "act_mean", "act_deriv_mean", "act_saturated",
                    "act_dead", "grad_nonfinite", "param_nonfinite"):  # fmt: skip
            self.metrics[col] = float("nan")
        self.steps = pd.DataFrame(
            {
                "step": range(len(losses)),
                "loss": losses,
                "loss_nonfinite": 0.0,
                "grad_nonfinite": 0.0,
                "param_nonfinite": 0.0,
            }  # fmt: skip
        )
        self.temporal = pd.DataFrame(trows)


def _plateau(n=60, start=1.2, level=0.17):
    # falls to the baseline within the first tenth, then stays (+-1% noise)
    return [level + (start - level) * math.exp(-i / 2) + 0.002 * (-1) ** i for i in range(n)]


def _falling(n=60, start=1.2):
    return [start * 0.95**i for i in range(n)]


def test_gated_cell_at_its_initial_plateau_with_a_decayed_gradient_is_vanishing():
    diag = diagnose_run(_GatedRun(_plateau()))
    [f] = [f for f in diag.findings if f.kind == "vanishing_gradient"]
    assert f.layers == ["rnn"]
    assert f.evidence["first_to_last_ratio_time"] == pytest.approx(0.5**29, rel=1e-6)
    losses = _plateau()
    k = len(losses) // 10
    assert f.evidence["loss_last_over_first"] == pytest.approx(
        (sum(losses[-k:]) / k) / (sum(losses[:k]) / k), rel=1e-9
    )
    # from the records alone the gate's bias is unknown: the remedy says so
    names = [r.name for r in f.remedies]
    assert names[0] == "forget_gate_bias" and "records do not show" in f.remedies[0].why
    assert "lstm" not in names and "gru" not in names  # it is a gated cell already
    # both stacked layers shown apart
    assert set(f.per_layer) == {"rnn.l0", "rnn.l1"}
    # the same decay while the loss still falls (or with too few steps): a note, not a finding
    for losses in (_falling(), _plateau(n=10)):
        d = diagnose_run(_GatedRun(losses))
        assert d.healthy, str(d)
        assert any("not judged a problem" in n for n in d.notes)


def test_a_converged_model_is_not_at_its_initial_plateau():
    # flat over the second half, but at 1% of the initial loss: the task was fitted
    losses = [1.0 * 0.8**i if i < 20 else 0.01 for i in range(60)]
    assert diagnose_run(_GatedRun(losses)).healthy


def test_remedies_do_not_suggest_what_the_model_already_has(tmp_path):
    torch.manual_seed(0)
    model = _Seq()
    with torch.no_grad():
        model.rnn.bias_hh_l0[8:16].fill_(1.0)
        model.rnn.bias_ih_l0[8:16].zero_()
        model.rnn.bias_hh_l1[8:16].fill_(2.0)
        model.rnn.bias_ih_l1[8:16].zero_()
    facts = model_facts(model)["rnn"]
    assert facts["forget_gate_bias_l0"] == pytest.approx(1.0)
    assert facts["forget_gate_bias_l1"] == pytest.approx(2.0)
    assert facts["forget_gate_bias"] == pytest.approx(1.0)  # the smallest of the layers
    diag = diagnose_run(_GatedRun(_plateau()), model=model)
    [f] = diag.findings
    assert "forget_gate_bias" not in [r.name for r in f.remedies]
    assert "already 1" in f.cause
    # a model whose gate bias is the default: advised, citing the measured value
    plain = _Seq()
    r = {n: p.detach().double()[8:16] for n, p in plain.rnn.named_parameters()}
    b = float((r["bias_ih_l0"] + r["bias_hh_l0"]).mean())
    b1 = float((r["bias_ih_l1"] + r["bias_hh_l1"]).mean())
    [f] = diagnose_run(_GatedRun(_plateau()), model=plain).findings
    assert f.remedies[0].name == "forget_gate_bias"
    assert f.evidence["forget_gate_bias"] == pytest.approx(min(b, b1), abs=1e-9)


def test_stacked_layers_weight_views_by_hand(tmp_path):
    """A 2-layer LSTM under the monitor: each layer's update/weight in the views is the norm of
    the change of its two weight matrices over their norm, as snapshots in plain torch give."""
    torch.manual_seed(0)
    model = _Seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(16, 12, 2), torch.rand(16)
    snaps = []
    with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "r"):
        for _ in range(3):
            before = {n: p.detach().clone() for n, p in model.rnn.named_parameters()}
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            snaps.append((before, {n: p.detach().clone() for n, p in model.rnn.named_parameters()}))
    view = RunView(vanishing.load_run(tmp_path / "r"))
    u = view.all_weight_units
    assert {"rnn.l0", "rnn.l1", "head"} <= set(u["unit"])
    for step, (before, after) in enumerate(snaps):
        for layer in (0, 1):
            names = [f"weight_ih_l{layer}", f"weight_hh_l{layer}"]
            du = math.sqrt(sum(float((after[n] - before[n]).double().norm()) ** 2 for n in names))
            w = math.sqrt(sum(float(before[n].double().norm()) ** 2 for n in names))
            row = u[(u["step"] == step) & (u["unit"] == f"rnn.l{layer}")].iloc[0]
            assert row["update_ratio"] == pytest.approx(du / w, rel=1e-4)
    stack = view.recurrent_stack("rnn")
    assert list(stack) == ["rnn.l0", "rnn.l1"]
    assert stack["rnn.l1"]["grad_vs_top_layer"] == pytest.approx(1.0)


def test_a_stalled_lower_layer_of_a_stack_is_found_per_layer(tmp_path):
    torch.manual_seed(0)
    model = _Seq(hidden=16)
    low = [p for n, p in model.rnn.named_parameters() if n.endswith("_l0")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("_l0")]
    opt = torch.optim.SGD([{"params": low, "lr": 1e-9}, {"params": rest, "lr": 0.1}])
    x, y = torch.rand(32, 10, 2), torch.rand(32)
    with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "r") as mon:
        for _ in range(10):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        diag = mon.diagnose()
    [f] = [f for f in diag.findings if f.kind == "stalled_layers"]
    assert f.layers == ["rnn"] and list(f.per_layer) == ["rnn.l0"]
    assert f.remedies[0].name == "higher_learning_rate"  # the gradient is there, the step not
    note = next(n for n in diag.notes if "stacked layers" in n)
    assert "l0" in note and "l1" in note and "fused" in note


def test_attention_in_proj_weight_is_in_the_update_view(tmp_path):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = nn.ModuleDict({"attn": mha, "head": nn.Linear(8, 1)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 5, 8)
    with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "r"):
        for _ in range(2):
            opt.zero_grad()
            out, _ = mha(x, x, x)
            model["head"](out).pow(2).mean().backward()
            opt.step()
    u = RunView(vanishing.load_run(tmp_path / "r")).all_weight_units
    assert "attn" in set(u["unit"])  # in_proj_weight, which a param == "weight" filter drops


def test_error_signal_of_a_layer_feeding_a_batch_norm_is_read_after_it(tmp_path):
    """Conv -> BatchNorm: the gradient at the conv's raw output carries 1/spread of that output;
    the profile reads the norm's output instead, as torch.autograd.grad gives it."""
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 36, 3),
    )  # fmt: skip
    with torch.no_grad():
        seq[0].weight.mul_(0.01)  # a tiny conv: its raw output's gradient is 100x larger
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    with vanishing.watch(seq, run_dir=tmp_path / "r"):
        nn.functional.cross_entropy(seq(x), y).backward()
    view = RunView(vanishing.load_run(tmp_path / "r"))
    table = view.profile("error_norm")
    outs = {}
    hooks = [
        seq[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in (1, 4)
    ]
    loss = nn.functional.cross_entropy(seq(x), y)
    for h in hooks:
        h.remove()
    g1, g4 = torch.autograd.grad(loss, [outs[1], outs[4]])
    assert float(table["0"].iloc[0]) == pytest.approx(float(g1.norm()), rel=1e-4)
    assert float(table["3"].iloc[0]) == pytest.approx(float(g4.norm()), rel=1e-4)


class _BiSeq(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.rnn = nn.GRU(2, 8, num_layers=layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)


@pytest.mark.parametrize("layers", [1, 2])
def test_a_bidirectional_layers_reverse_direction_is_not_the_next_layer_of_a_stack(
    tmp_path, layers
):
    """torch names a bidirectional GRU's reverse direction l0_reverse: the same depth as l0.
    A 1-layer bidirectional GRU was shown as '2 stacked layers' and its first/last ratio was
    forward over reverse. The oracle is autograd: the stack's layers are the forward ones, each
    direction measured against its own top layer, the ratio the forward layers' bias
    gradients."""
    import numpy as np

    torch.manual_seed(0)
    model = _BiSeq(layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(16, 12, 2), torch.rand(16)
    grads = []
    with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "r") as mon:
        for _ in range(4):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            grads.append(
                {n: p.grad.double().norm().item() for n, p in model.rnn.named_parameters()}
            )
            opt.step()
        diag = mon.diagnose()
    run = vanishing.load_run(tmp_path / "r")
    view = RunView(run)
    stack = view.recurrent_stack("rnn")
    if layers == 1:
        assert stack == {}
        assert run.first_last_ratio() is None  # one hidden depth: nothing to divide
        assert not any("stacked layers" in n for n in diag.notes)
        return
    assert list(stack) == ["rnn.l0", "rnn.l0_reverse", "rnn.l1", "rnn.l1_reverse"]
    assert stack["rnn.l1"]["grad_vs_top_layer"] == pytest.approx(1.0)
    assert stack["rnn.l1_reverse"]["grad_vs_top_layer"] == pytest.approx(1.0)
    truth = np.median([g["bias_ih_l0"] / g["bias_ih_l1"] for g in grads])
    assert run.first_last_ratio() == pytest.approx(truth, rel=1e-5)
    note = next(n for n in diag.notes if "stacked layers" in n)
    assert "2 bidirectional stacked layers" in note and "(l0 gets" in note and "of l1's)" in note
