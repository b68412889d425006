"""One layer naming in every view: report/names.py, report/formatting.py, and the plots, the
HTML layer table and the demo reading them (module names, never a second numbering)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vanishing.report.formatting import DASH, metric_text, stat_text
from vanishing.report.names import ELLIPSIS, common_prefix, param_label, short_names


def _bert_names(layers: int = 12) -> list[str]:
    """The Linear/Embedding module names of a BERT classifier, as named_modules() gives them."""
    block = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    return (
        ["bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings"]
        + [f"bert.encoder.layer.{i}.{m}" for i in range(layers) for m in block]
        + ["bert.pooler.dense", "classifier"]
    )


def _undo(label: str, name: str) -> bool:
    """Whether ``label`` is ``name`` with leading components dropped (the only shortening)."""
    tail = label.split(ELLIPSIS)[-1]
    return name == tail or name.endswith("." + tail)


@pytest.mark.parametrize("limit", [None, 8, 16, 40])
def test_bert_names_stay_distinct_and_keep_their_distinguishing_part(limit):
    names = _bert_names()
    labels = short_names(names, limit)
    assert len(set(labels)) == len(names)  # two layers never share a label
    for name, label in zip(names, labels):
        assert _undo(label, name), (name, label)
        parts = name.split(".")
        if "layer" in parts:
            # the block index and everything after it stay: '11.attention.self.query'
            i = parts.index("layer") + 1
            assert label.endswith(".".join(parts[i:])), (name, label)


def test_bert_labels_under_a_limit_drop_only_the_shared_container_path():
    labels = dict(zip(_bert_names(), short_names(_bert_names(), 16)))
    assert labels["bert.encoder.layer.11.attention.self.query"] == "…11.attention.self.query"
    assert labels["bert.encoder.layer.0.output.dense"] == "…0.output.dense"
    assert labels["classifier"] == "classifier"
    # nothing in common with 'classifier', so only the limit shortens it; two components stay
    assert labels["bert.pooler.dense"] == "…pooler.dense"


def test_a_sequential_keeps_its_module_names():
    model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(4, 4), nn.Sigmoid())])
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert short_names(names) == names == [str(i) for i in range(0, 20, 2)]
    assert short_names(names, limit=1) == names  # a block index is never dropped


def test_names_sharing_all_but_a_middle_index():
    names = [f"encoder.layers.{i}.self_attn.out_proj" for i in (0, 1, 2, 10, 11)]
    assert common_prefix(names) == "encoder.layers"
    assert short_names(names) == [f"{i}.self_attn.out_proj" for i in (0, 1, 2, 10, 11)]
    # a tight limit cannot drop anything after the index: labels stay apart and complete
    assert short_names(names, limit=4) == short_names(names)


def test_names_that_differ_only_at_the_front_are_not_cut_there():
    names = ["model.encoder.q", "model.decoder.q"]
    labels = short_names(names, limit=3)
    assert labels == ["encoder.q", "decoder.q"]


def test_collisions_step_back_to_distinct_labels():
    # under a limit both would become '…x.fc'; the clash brings their components back
    names = ["a.u.x.fc", "b.v.x.fc", "c"]
    labels = short_names(names, limit=3)
    assert len(set(labels)) == 3 and all(_undo(lab, n) for lab, n in zip(labels, names))


def test_root_and_bad_input():
    assert short_names(["", "0"]) == ["(root)", "0"]
    with pytest.raises(ValueError, match="distinct"):
        short_names(["0", "0"])


def test_param_label_is_named_parameters_naming():
    lstm = nn.Module()
    lstm.rnn = nn.LSTM(3, 4, num_layers=2)
    named = {n for n, _ in lstm.named_parameters()}
    assert param_label("rnn", "weight_hh_l1") in named
    assert param_label("rnn", "weight_ih_l0") in named
    assert param_label("0", "weight") == "0"  # a plain weight is its layer


def test_formatting_one_function_per_kind():
    assert metric_text(0.08635, "accuracy") == "8.6%"
    assert metric_text(1.0, "accuracy") == "100.0%"
    assert metric_text(0.123456, "mse") == "0.1235"
    assert metric_text(None, "accuracy") == metric_text(math.nan, "mse") == DASH
    assert stat_text(math.nan) == stat_text(None) == stat_text("n/a") == DASH
    assert stat_text(math.inf) == "inf" and stat_text(-math.inf) == "-inf"
    assert stat_text(0.000123456) == "0.000123"


# ---- the views ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stacked_lstm(tmp_path_factory):
    """A 2-layer LSTM and a head, 4 SGD steps under the monitor."""
    import vanishing

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 8, num_layers=2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d = tmp_path_factory.mktemp("lstm") / "run"
    g = torch.Generator().manual_seed(0)
    with vanishing.watch(model, optimizer=opt, run_dir=d):
        for _ in range(4):
            opt.zero_grad()
            x = torch.randn(8, 6, 3, generator=g)
            nn.functional.cross_entropy(model(x), torch.randint(0, 2, (8,), generator=g)).backward()
            opt.step()
    return d, model


def test_stacked_lstm_weight_views_show_each_layer(stacked_lstm):
    from vanishing.report import plots
    from vanishing.report.data import RunData

    d, model = stacked_lstm
    data = RunData(d)
    expected = [
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "rnn.weight_ih_l1",
        "rnn.weight_hh_l1",
        "head",
    ]
    assert [label for label, _, _ in data.weight_params] == expected
    # the depth profile's left panel: one point per matrix, ticked with those names, and the
    # recorded norm is the real gradient norm of that parameter (oracle: the model's .grad
    # after the last step, which the monitor recorded)
    fig = plots.depth_profile(data)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == expected
    last = data.step_list[-1]
    table = data.weight_at_steps("grad_norm", [last])
    for label, module, param in data.weight_params:
        p = model.get_parameter(f"{module}.{param}")
        assert table.loc[last, label] == pytest.approx(float(p.grad.norm()), rel=1e-5)
    # the update-ratio plot: a line per matrix, the l0 and l1 recurrent weights among them
    fig = plots.update_ratio(data)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[: len(expected)] == expected


def test_stacked_lstm_layer_table_has_a_row_per_matrix(stacked_lstm):
    from vanishing.report.data import RunData
    from vanishing.report.html import _layer_table

    page = _layer_table(RunData(stacked_lstm[0]))
    for name in ("rnn.weight_ih_l0", "rnn.weight_hh_l1"):
        assert f"<code>{name}</code>" in page
    assert "layer l1" in page and "nan" not in page


def test_every_depth_axis_is_ticked_with_module_names_even_when_deep(tmp_path):
    """40 hidden layers: more than the plots tick one by one; the ticks shown are still names."""
    import vanishing
    from vanishing.report import plots
    from vanishing.report.data import RunData

    torch.manual_seed(0)
    layers = [m for _ in range(40) for m in (nn.Linear(4, 4), nn.Tanh())]
    model = nn.Sequential(*layers, nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "r") as mon:
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    data = RunData(mon.run_dir)
    modules = {n for n, _ in model.named_modules()}
    fig = plots.depth_profile(data)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks[0] == "0" and ticks[-1] == "80" and 2 < len(ticks) <= 24
    assert set(ticks) <= modules
    heat = plots.speed_heatmap(data)
    rows = [t.get_text() for t in heat.axes[0].get_yticklabels()]
    assert rows[0] == "0" and rows[-1] == "78" and set(rows) <= modules
