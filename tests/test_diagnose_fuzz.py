"""The diagnosis never raises: corrupted tables of real recorded runs, and models in any state
(NaN/inf weights, no gradients), give findings or notes, not an exception.

A few small runs are recorded once (an MLP, a ReLU RNN, a 2-layer LSTM, a small transformer);
their DataFrames are then corrupted column by column (NaN, inf, negative, zero), rows are
dropped, one step is kept, steps are shuffled, and the result is diagnosed with and without the
model, whose weights are also made non-finite.
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import vanishing
from vanishing.diagnose import Diagnosis, diagnose_run, model_facts


class _Seq(nn.Module):
    def __init__(self, cell, layers=1, **kw):
        super().__init__()
        self.rnn = cell(2, 8, num_layers=layers, batch_first=True, **kw)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def _jobs():
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(16, 6, 2, generator=g)
    ys = xs[:, -1, 0]
    xt = torch.randint(0, 10, (16, 5), generator=g)
    yt = (xt[:, 0] > 4).long()
    xm = torch.randn(16, 8, generator=g)
    ym = (xm[:, 0] > 0).long()
    mlp = nn.Sequential(
        nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)
    )
    return {
        "mlp": (mlp, xm, ym, nn.functional.cross_entropy),
        "relu_rnn": (_Seq(nn.RNN, nonlinearity="relu"), xs, ys, nn.functional.mse_loss),
        "lstm2": (_Seq(nn.LSTM, layers=2), xs, ys, nn.functional.mse_loss),
        "transformer": (_Tiny(), xt, yt, nn.functional.cross_entropy),
    }


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for name, (model, x, y, loss_fn) in _jobs().items():
        run_dir = tmp_path_factory.mktemp("fuzz") / name
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        with vanishing.watch(model, optimizer=opt, run_dir=run_dir):
            for _ in range(4):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        run = vanishing.load_run(run_dir)
        out[name] = (run, model)
    return out


def _copy(run):
    return SimpleNamespace(
        path=run.path,
        manifest=copy.deepcopy(run.manifest),
        layer_info=copy.deepcopy(run.layer_info),
        metrics=run.metrics.copy(),
        steps=run.steps.copy(),
        temporal=run.temporal.copy(),
    )


def _numeric(df):
    return [
        c for c in df.columns if c not in ("step", "layer", "param") and df[c].dtype.kind in "fiu"
    ]


_VALUES = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "neg": -1.0, "zero": 0.0}


def _set_column(run, table, column, label, value):
    r = _copy(run)
    t = getattr(r, table)
    t[column] = t[column].astype(float)
    t[column] = value
    yield f"{table}.{column}={label}", r


def _corruptions(run):
    """(label, corrupted copy) pairs: every numeric column of every table set to two of the values,
    rows dropped, one step, shuffled steps."""
    for table in ("metrics", "steps", "temporal"):
        df = getattr(run, table)
        values = list(_VALUES.items())
        for k, column in enumerate(_numeric(df)):  # two of the values per column, in rotation
            for label, value in (values[k % 5], values[(k + 2) % 5]):
                yield from _set_column(run, table, column, label, value)
        for column in _numeric(df):  # one value corrupted, the rest real
            r = _copy(run)
            t = getattr(r, table)
            if len(t):
                t[column] = t[column].astype(float)
                t.loc[t.index[len(t) // 2], column] = np.inf
                yield f"{table}.{column}: one inf", r
    rng = random.Random(0)
    for table in ("metrics", "temporal"):
        r = _copy(run)
        t = getattr(r, table)
        setattr(r, table, t.iloc[[i for i in range(len(t)) if rng.random() < 0.5]])
        yield f"{table}: half the rows", r
        r = _copy(run)
        setattr(r, table, getattr(r, table).iloc[0:0])
        yield f"{table}: no rows", r
    r = _copy(run)
    first = int(r.steps["step"].min())
    r.steps = r.steps[r.steps["step"] == first]
    r.metrics = r.metrics[r.metrics["step"] == first]
    r.temporal = r.temporal[r.temporal["step"] == first] if len(r.temporal) else r.temporal
    yield "one step", r
    r = _copy(run)
    r.steps = r.steps.sample(frac=1.0, random_state=0)
    r.metrics = r.metrics.sample(frac=1.0, random_state=0)
    yield "shuffled steps", r
    r = _copy(run)
    r.steps["loss_nonfinite"] = 1  # every step non-finite: an empty window
    yield "empty window", r
    r = _copy(run)
    for layer in r.layer_info:
        layer["params"] = []
        layer["num_params"] = 0
    yield "no parameters in the manifest", r
    r = _copy(run)
    r.layer_info = []
    yield "no layers in the manifest", r


def _broken_models(model):
    """The model with NaN / inf / huge weights, and with no gradients at all."""
    for label, value in (("nan", float("nan")), ("inf", float("inf")), ("huge", 1e38)):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for p in twin.parameters():
                p.fill_(value)
        yield label, twin
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.grad = None
    yield "no grads", twin


@pytest.mark.parametrize("name", ["mlp", "relu_rnn", "lstm2", "transformer"])
def test_diagnose_never_raises_on_corrupted_tables(recorded, name):
    run, model = recorded[name]
    n = 0
    for i, (label, bad) in enumerate(_corruptions(run)):
        # with the model for every 4th corruption: the facts it adds are measured once per model
        for m in (None, model) if i % 4 == 0 else (None,):
            try:
                diag = diagnose_run(bad, m)
            except Exception as e:  # noqa: BLE001 - the point of the test
                pytest.fail(f"{name}, {label}, model={m is not None}: {type(e).__name__}: {e}")
            assert isinstance(diag, Diagnosis)
            str(diag)
            diag.to_dict()
            # the engine's safety net (a rule that raises becomes a note) is not what passes this
            assert not [x for x in diag.notes if "could not judge" in x], (name, label, diag.notes)
            n += 1
    assert n > 40


@pytest.mark.parametrize("name", ["mlp", "relu_rnn", "lstm2", "transformer"])
def test_diagnose_never_raises_on_broken_models(recorded, name):
    run, model = recorded[name]
    for label, twin in _broken_models(model):
        try:
            facts = model_facts(twin)
            diag = diagnose_run(run, twin)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{name} with {label} weights: {type(e).__name__}: {e}")
        assert isinstance(facts, dict)
        assert isinstance(diag, Diagnosis)
        assert not [x for x in diag.notes if "could not" in x or "not measured" in x], diag.notes


def test_inspect_of_a_model_with_non_finite_weights_reports_it():
    torch.manual_seed(0)
    rnn = _Seq(nn.RNN, nonlinearity="relu")
    with torch.no_grad():
        rnn.rnn.weight_hh_l0.fill_(float("inf"))
    x = torch.rand(8, 6, 2)
    diag = vanishing.inspect(rnn, x, x[:, -1, 0], nn.functional.mse_loss)
    assert "non_finite" in diag.kinds


def test_a_relu_rnn_trained_until_its_weights_overflow_is_diagnosed(run_dir):
    # the crash: an SVD of the non-finite recurrent weight raised _LinAlgError
    torch.manual_seed(0)
    model = _Seq(nn.RNN, nonlinearity="relu")
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(1.5 * torch.eye(8))
    x = torch.rand(16, 30, 2)
    y = x[:, -1, 0]
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir) as mon:
        for _ in range(6):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert not all(torch.isfinite(p).all() for p in model.parameters())
        diag = mon.diagnose()
    assert "non_finite" in diag.kinds
