"""recorder.semantics against hand-computed values, and the readers that use it."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import vanishing
from helpers import mlp, train
from vanishing.recorder.semantics import (
    first_last_ratio,
    first_nonfinite_step,
    hidden_layers,
    is_embedding,
    is_normalization,
    nonfinite_steps,
    ratio_pairs,
    speed_source,
    step_ratios,
)


def _layer(name, kind, params=("weight", "bias"), role="layer", recurrent=False):
    return {
        "name": name,
        "type": kind,
        "role": role,
        "recurrent": recurrent,
        "num_params": 3 * len(params),
        "params": [{"name": p, "shape": [3], "numel": 3} for p in params],
    }


INFO = [
    _layer("tok", "Embedding", ("weight",)),
    _layer("pos", "PositionalEmbedding", ("weight",)),
    _layer("in", "Linear"),
    _layer("bn", "BatchNorm1d"),
    _layer("act", "ReLU", (), role="activation"),
    _layer("attn", "MultiheadAttention", ("in_proj_weight", "in_proj_bias")),
    _layer("ln", "LayerNorm"),
    _layer("rnn", "GRU", ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0"), recurrent=True),
    _layer("nobias", "Linear", ("weight",)),
    _layer("act2", "Tanh", (), role="activation"),
    _layer("bn2", "BatchNorm1d"),
    _layer("head", "Linear"),
]


def test_normalization_and_embedding_types():
    assert [is_normalization(t) for t in ("BatchNorm2d", "RMSNorm", "LocalResponseNorm")] == [
        True
    ] * 3
    assert not is_normalization("Linear") and not is_normalization("Embedding")
    # a model's own norm classes (Hugging Face's, torchvision's, ConvNeXt's) are norms too; a
    # fused norm + projection that owns the projection's weight is not
    own = ("LlamaRMSNorm", "T5LayerNorm", "SyncBatchNorm", "FrozenBatchNorm2d", "LayerNorm2d")
    assert all(is_normalization(t) for t in own)
    for t in ("LayerNormLinear", "LayerNormMLP", "NormalizedLinear", "BatchNormalizer"):
        assert not is_normalization(t), t
    assert is_embedding("Embedding") and is_embedding("EmbeddingBag")
    assert is_embedding("PositionalEmbedding") and not is_embedding("Linear")


def test_hidden_layers_leave_out_norms_embeddings_activations_and_the_output():
    assert hidden_layers(INFO) == ["in", "attn", "rnn", "nobias"]
    assert hidden_layers(INFO[:3]) == []  # only the output layer: no hidden layer
    assert hidden_layers([]) == []


def test_speed_source_reads_the_bias_or_the_batch_norm_that_cancels_it():
    sources = {n: speed_source(INFO, n) for n in hidden_layers(INFO)}
    assert sources == {
        "in": ("bn", "bias"),  # straight into a batch norm: the norm's bias
        "attn": ("attn", "in_proj_bias"),
        "rnn": ("rnn", "bias_ih_l0"),
        "nobias": ("nobias", "weight"),  # an activation before the norm: its own parameter
    }
    assert speed_source(INFO, "act") is None  # no parameter to read
    assert speed_source(INFO, "missing") is None


@pytest.mark.parametrize(
    "build, first",
    [
        # Linear -> BN -> ReLU: the Linear's bias is cancelled by the norm; the norm's is not
        (lambda: [nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()], ("1", "bias")),
        # Linear -> BN -> Linear -> BN: the second norm cancels the first norm's bias too
        (
            lambda: [
                nn.Linear(8, 16),
                nn.BatchNorm1d(16),
                nn.Linear(16, 16),
                nn.BatchNorm1d(16),
                nn.ReLU(),
            ],
            ("1", "weight"),
        ),  # fmt: skip
        (
            lambda: [
                nn.Conv1d(2, 4, 3),
                nn.BatchNorm1d(4),
                nn.Conv1d(4, 4, 3),
                nn.BatchNorm1d(4),
                nn.ReLU(),
                nn.Flatten(),
            ],
            ("1", "weight"),
        ),  # fmt: skip
    ],
)
def test_speed_is_never_read_where_a_batch_norm_makes_the_gradient_structurally_zero(
    tmp_path, build, first
):
    """The oracle is autograd on the model itself: the parameter the speed of the first layer is
    read at has a gradient of the loss's order, and every bias the batch norms cancel (the
    layer's own, and the first norm's when a second norm follows an affine layer) has one at
    float32 rounding level. Reading one of those made a healthy Linear-BN-Linear-BN net's
    first/last ratio 1e-7."""
    torch.manual_seed(0)
    model = nn.Sequential(*build(), nn.LazyLinear(3))
    x = torch.randn(32, 8) if isinstance(model[0], nn.Linear) else torch.randn(32, 2, 9)
    model(x)  # materialise the lazy head
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with vanishing.watch(model, opt, run_dir=tmp_path / "r"):
        opt.zero_grad()
        model(x).square().mean().backward()
        grads = {n: p.grad.double().norm().item() for n, p in model.named_parameters()}
        opt.step()
    run = vanishing.load_run(tmp_path / "r")
    assert speed_source(run.layer_info, "0") == first
    chosen = grads[f"{first[0]}.{first[1]}"]
    assert chosen > 1e-4
    assert run.speeds()["0"].iloc[0] == pytest.approx(chosen, rel=1e-5)
    zero = ["0.bias"] + (["1.bias"] if first == ("1", "weight") else [])
    for name in zero:
        assert grads[name] < 1e-5 * chosen, name  # structurally zero: float32 rounding


def test_first_last_ratio_is_the_median_of_per_step_ratios():
    first = pd.Series([1.0, 2.0, 3.0, 100.0, 5.0], index=[0, 1, 2, 3, 4])
    last = pd.Series([10.0, 10.0, 10.0, 10.0, 0.0, 7.0], index=[0, 1, 2, 3, 4, 5])
    # step 4: last is 0 (left out); step 5: no first (left out); ratios 0.1, 0.2, 0.3, 10
    assert first_last_ratio(first, last) == pytest.approx(0.25)
    assert first_last_ratio(first, last, steps=[0, 1, 2]) == pytest.approx(0.2)
    assert first_last_ratio(first, last, steps=[4, 5]) is None
    # not the ratio of the medians (2.5 / 10 would be 0.25 here too, so a case where they differ)
    a, b = [1.0, 1.0, 4.0], [1.0, 4.0, 4.0]
    assert first_last_ratio(a, b) == pytest.approx(1.0)
    assert np.median(a) / np.median(b) == pytest.approx(0.25)
    assert first_last_ratio([0.0, 0.0, 1.0], [1.0, 1.0, 1.0]) == 0.0  # a first layer at zero
    assert first_last_ratio([], []) is None


def test_nonfinite_steps():
    s = pd.DataFrame(
        {
            "step": [0, 1, 2, 3, 4],
            "loss_nonfinite": [0, 0, 0, 1, 0],
            "grad_nonfinite": [0, 0, 2, 0, 0],
            "param_nonfinite": [0, 0, 0, 0, 5],
        }
    )
    assert nonfinite_steps(s) == [2, 3, 4]
    assert first_nonfinite_step(s) == 2
    assert first_nonfinite_step(s[s.step < 2]) is None
    assert first_nonfinite_step(s.drop(columns=["grad_nonfinite"])) == 3  # older runs
    assert first_nonfinite_step(pd.DataFrame({"step": []})) is None


@pytest.fixture(scope="module")
def sigmoid_run(tmp_path_factory):
    torch.manual_seed(0)
    model = mlp(depth=5, width=12, act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    d = tmp_path_factory.mktemp("sem") / "run"
    with vanishing.watch(model, optimizer=opt, run_dir=d, flush_every=4):
        train(model, opt, steps=25)
    return d


def test_run_ratio_by_hand_and_in_every_reader(sigmoid_run):
    from vanishing.report.data import RunData

    run = vanishing.load_run(sigmoid_run)
    hidden = run.hidden
    bias = run.pivot("grad_norm", param="bias")
    by_hand = float(np.median((bias[hidden[0]] / bias[hidden[-1]]).to_numpy()))
    assert run.first_last_ratio() == pytest.approx(by_hand, rel=1e-12)
    bounded = vanishing.load_run(sigmoid_run, max_steps=5)
    assert 3 <= len(set(bounded.metrics["step"])) <= 5  # few rows in memory ...
    assert bounded.first_last_ratio() == pytest.approx(by_hand, rel=1e-12)  # ... same number
    data = RunData(sigmoid_run, max_points=4, max_samples=5)
    assert data.first_last_ratio() == pytest.approx(by_hand, rel=1e-12)
    np.testing.assert_allclose(run.speeds().to_numpy(), bias[hidden].to_numpy(), rtol=1e-12)


def test_bounded_run_samples_steps_and_keeps_the_first_nonfinite(tmp_path):
    torch.manual_seed(0)
    model = mlp(depth=2, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "r", flush_every=5) as mon:
        train(model, opt, steps=12)
        with torch.no_grad():
            model[0].weight[0, 0] = math.nan
        train(model, opt, steps=3)
    run = vanishing.load_run(mon.run_dir, max_steps=4)
    assert len(run.all_steps) == 15 and run.first_nonfinite_step == 12
    assert run.sample_steps[0] == 0 and run.sample_steps[-1] == 14
    assert 12 in run.sample_steps and 7 in run.sample_steps  # first non-finite, middle
    assert sorted(set(run.metrics["step"])) == run.sample_steps
    assert run.steps["step"].tolist() == run.sample_steps
    assert "non_finite" in run.diagnose().kinds
    with pytest.raises(ValueError, match="at least 3"):
        vanishing.load_run(mon.run_dir, max_steps=2)


def test_one_error_for_a_path_that_is_not_a_run(tmp_path):
    from vanishing.report.data import RunData

    for read in (vanishing.load_run, RunData):
        with pytest.raises(vanishing.RunError, match="not a run directory"):
            read(tmp_path)
        with pytest.raises(vanishing.RunError, match="no such run directory"):
            read(tmp_path / "missing")


def test_param_unit_keeps_the_layers_of_a_recurrent_stack_apart():
    from vanishing.recorder.semantics import param_unit

    lstm = torch.nn.LSTM(2, 4, num_layers=3, bidirectional=True)
    units = {param_unit("rnn", n) for n, _ in lstm.named_parameters()}
    assert units == {f"rnn.l{i}{s}" for i in range(3) for s in ("", "_reverse")}
    assert param_unit("fc", "weight") == "fc" and param_unit("fc", "bias") == "fc"


def test_error_source_is_the_normalization_right_after_a_layer():
    from vanishing.recorder.semantics import error_source

    info = [{"name": n, "type": t} for n, t in
            [("0", "Linear"), ("1", "LayerNorm"), ("2", "GELU"), ("3", "Linear"),
             ("4", "ReLU"), ("5", "BatchNorm1d"), ("6", "Linear")]]  # fmt: skip
    # a norm after an activation is not the layer's own normalization
    assert [error_source(info, n) for n in ("0", "3", "6", "missing")] == ["1", "3", "6", "missing"]


def test_a_frozen_first_layer_is_passed_over_by_the_ratio_and_the_live_tag(tmp_path):
    from vanishing.sinks.scalars import ScalarSelector

    torch.manual_seed(0)
    model = mlp(depth=5)
    for p in model[0].parameters():  # the first hidden layer, frozen as in fine-tuning
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(1)
    by_hand = []  # autograd's own bias gradients: layer 2 (the first that learns) over layer 8
    with vanishing.watch(model, opt, run_dir=tmp_path / "r") as mon:
        for _ in range(6):
            opt.zero_grad()
            x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            by_hand.append(float(model[2].bias.grad.norm() / model[8].bias.grad.norm()))
            opt.step()
    run = vanishing.load_run(mon.run_dir)
    assert run.hidden[0] == "0"  # still a hidden layer of the model (its error signal counts)
    assert list(run.speeds().columns) == ["2", "4", "6", "8"]
    assert run.first_last_ratio() == pytest.approx(float(np.median(by_hand)), rel=1e-5)
    sel = ScalarSelector()
    sel.observe_manifest(run.manifest)
    assert "0" not in sel.units and list(sel.units)[0] == "2"


def test_ratio_pairs_compare_each_block_role_with_itself():
    """A stem, four blocks of (attention, norm, MLP) and a head: the pairs are block 0's
    attention and MLP over block 3's, in forward order; a role missing from the last block is
    not compared; a chain of layers (and a stacked LSTM's layers) keeps first over last."""
    stem = [_layer("embed", "Embedding", params=("weight",)), _layer("conv", "Linear")]
    blocks = [
        _layer(f"enc.{b}.{r}", t)
        for b in range(4)
        for r, t in (("attn", "Linear"), ("ln", "LayerNorm"), ("mlp", "Linear"))
    ]
    head = [_layer("pooler", "Linear"), _layer("head", "Linear")]
    assert ratio_pairs(stem + blocks + head) == [
        ("enc.0.attn", "enc.3.attn"),
        ("enc.0.mlp", "enc.3.mlp"),
    ]
    # the last block without its MLP (a pruned or truncated model): attention only
    cut = [b for b in blocks if b["name"] != "enc.3.mlp"]
    assert ratio_pairs(stem + cut + head) == [("enc.0.attn", "enc.3.attn")]
    chain = [_layer(str(i), "Linear") for i in range(0, 8, 2)]
    assert ratio_pairs(chain) == [("0", "4")]
    rnn = _layer(
        "rnn", "LSTM", params=[f"{k}_l{i}" for i in (0, 1, 2) for k in ("weight_ih", "bias_ih")]
    )
    assert ratio_pairs([rnn, _layer("out", "Linear")]) == [("rnn.l0", "rnn.l2")]
    assert ratio_pairs([_layer("0", "Linear"), _layer("1", "Linear")]) == []


def test_step_ratios_are_the_median_over_pairs_of_the_finite_ratios():
    first = [[1.0, 2.0, np.nan, 1.0], [4.0, 1.0, 1.0, 0.0], [8.0, 0.0, np.inf, 1.0]]
    last = [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]
    # step 0: 1, 4, 8 -> 4; step 1: 2, 1, (0/0) -> 1.5; step 2: none finite; step 3: 0 only
    # where the last speed is not zero: none -> NaN
    got = step_ratios(first, last)
    assert got[:2].tolist() == [4.0, 1.5] and np.isnan(got[2]) and np.isnan(got[3])
    one = step_ratios([[1.0, 3.0]], [[2.0, 0.0]])
    assert one[0] == 0.5 and np.isnan(one[1])


def test_the_activation_after_a_layer_reads_through_its_norm_in_every_reader(tmp_path):
    """conv -> BatchNorm -> ReLU: the conv's activation is the ReLU (its gain, its derivative),
    as the repair's traced forward says; the manifest recorded none (the norm ended the chain),
    so a BatchNorm CNN's layers were judged as linear maps. A shared activation module (one
    nn.Tanh called after two layers) counts after each; a layer with no activation before the
    next layer has none."""
    from vanishing.diagnose.view import RunView
    from vanishing.repair.transforms import describe_activations

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 8)
            self.act = nn.Tanh()
            self.proj, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.relu(self.bn(self.conv(x))).mean((2, 3))
            h = self.act(self.fc2(self.act(self.fc1(h))))
            return self.head(self.proj(h))

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 1, 6, 6)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with vanishing.watch(net, optimizer=opt, run_dir=tmp_path / "r") as mon:
        nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 0, 1])).backward()
        opt.step()
        mon.flush()
    run = vanishing.load_run(tmp_path / "r")
    recorded = {x["name"]: x["activation"] for x in run.layer_info if x["role"] == "layer"}
    expected = {"conv": "relu", "bn": "relu", "fc1": "tanh", "fc2": "tanh", "proj": None}
    assert {k: recorded[k] for k in expected} == expected
    traced = describe_activations(net, x)
    assert {k: traced[k] for k in ("conv", "fc1", "fc2", "proj")} == {
        "conv": "relu", "fc1": "tanh", "fc2": "tanh", "proj": "linear"
    }  # fmt: skip
    after = RunView(run).activation_after
    assert after["conv"] == after["bn"] == "relu" and after["fc1"] == "act"
    assert "proj" not in after
